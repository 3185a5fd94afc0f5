//! Flags of a benchmark: `--name value` (or `--name=value`) on the command line, each also
//! read from `FLEETGATE_BENCH_<NAME>` (upper case, `-` as `_`); the command line wins.

use anyhow::{Context, bail};

/// The flags found, in the order they apply.
#[derive(Debug, Default)]
pub struct Flags {
    /// `(name, value)` pairs: the environment's first, then the command line's.
    pub pairs: Vec<(String, String)>,
    /// The command-line flags as given, for the report.
    pub given: Vec<String>,
}

/// Reads the environment variables of `names` and the command line; prints `help` and exits on
/// `-h`/`--help`. Names are not checked here: the caller matches them and rejects the rest.
pub fn collect(names: &[&str], help: &str) -> anyhow::Result<Flags> {
    let mut flags = Flags::default();
    for name in names {
        let key = format!("FLEETGATE_BENCH_{}", name.to_uppercase().replace('-', "_"));
        if let Ok(v) = std::env::var(key) {
            flags.pairs.push(((*name).to_owned(), v));
        }
    }
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            // `cargo bench` passes `--bench` to harness-less benchmarks.
            "--bench" => continue,
            "-h" | "--help" => {
                println!("{help}");
                std::process::exit(0);
            }
            _ => {}
        }
        let Some(flag) = a.strip_prefix("--") else {
            bail!("unexpected argument {a:?}\n{help}")
        };
        let (k, v) = match flag.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (
                flag.to_owned(),
                it.next()
                    .with_context(|| format!("--{flag} needs a value"))?,
            ),
        };
        flags.given.push(format!("--{k} {v}"));
        flags.pairs.push((k, v));
    }
    Ok(flags)
}

/// A count such as `400_000` or `400000`.
pub fn count(k: &str, v: &str) -> anyhow::Result<usize> {
    v.replace('_', "")
        .parse::<usize>()
        .with_context(|| format!("--{k} {v}: not a number"))
}

/// A comma-separated list, trimmed.
pub fn list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_owned()).collect()
}
