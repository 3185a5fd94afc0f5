//! Statistics, machine description and Markdown output.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// One figure measured once per run.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// Unit printed after the value.
    pub unit: &'static str,
    /// One value per run.
    pub runs: Vec<f64>,
    /// Digits after the point.
    pub decimals: usize,
}

impl Figure {
    /// A figure with no runs yet.
    pub fn new(name: impl Into<String>, unit: &'static str, decimals: usize) -> Self {
        Self {
            name: name.into(),
            unit,
            runs: Vec::new(),
            decimals,
        }
    }

    /// The median of the runs (mean of the middle two for an even count).
    pub fn median(&self) -> f64 {
        median(&self.runs)
    }
}

/// The median of `v` (NaN if empty).
pub fn median(v: &[f64]) -> f64 {
    fleetgate_loadtest::report::median(v).unwrap_or(f64::NAN)
}

/// `1234567.8` -> `1,234,568` (with `decimals` digits after the point).
pub fn num(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(a, b)| (a, Some(b)));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// A Markdown table of figures: median and every run.
pub fn table(figures: &[Figure]) -> String {
    let mut s = String::from("| figure | median | runs |\n|---|---:|---|\n");
    for f in figures {
        let runs: Vec<String> = f.runs.iter().map(|v| num(*v, f.decimals)).collect();
        let _ = writeln!(
            s,
            "| {} | **{} {}** | {} |",
            f.name,
            num(f.median(), f.decimals),
            f.unit,
            runs.join(" / ")
        );
    }
    s
}

/// The machine, as the load-test suite describes it.
pub fn machine() -> String {
    fleetgate_loadtest::report::machine()
}

/// The `q`-quantile (0..=1) of ascending `sorted` by nearest rank (NaN if empty).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The command that reproduces a report: the `FLEETGATE_BENCH_*`, `FLEETGATE_BIN` and
/// `CARGO_TARGET_DIR` variables set, `cargo bench` of `bench`, and the flags as given.
pub fn command_line(bench: &str, given: &[String]) -> String {
    let mut args = given.join(" ");
    if !args.is_empty() {
        args.insert_str(0, " -- ");
    }
    let env: Vec<String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("FLEETGATE_BENCH_") || k == "FLEETGATE_BIN" || k == "CARGO_TARGET_DIR"
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let env = if env.is_empty() {
        String::new()
    } else {
        format!("{} ", env.join(" "))
    };
    format!("{env}cargo bench -p fleetgate-e2e --bench {bench}{args}")
}

/// `bin` relative to the workspace (so reports name no machine's paths) and when it was built.
pub fn binary(bin: &Path) -> String {
    let shown = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(|root| bin.strip_prefix(root).ok())
        .unwrap_or(bin);
    let built = std::process::Command::new("date")
        .args(["-u", "-r"])
        .arg(bin)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("`{} all` (built {built})", shown.display())
}

/// Writes `md` to `out`, or to `<target>/<default_name>` without it; returns the path.
pub fn write(md: &str, out: Option<&Path>, default_name: &str) -> anyhow::Result<PathBuf> {
    let out = match out {
        Some(p) => p.to_path_buf(),
        None => crate::support::node::target_dir()
            .unwrap_or_else(|| PathBuf::from("target"))
            .join(default_name),
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}
