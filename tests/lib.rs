//! What the end-to-end tests and the benchmarks share: finding the `fleetgate` binary and
//! starting `fleetgate` roles on free loopback ports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `fleetgate` binary: `FLEETGATE_BIN`, else the one beside the running test or bench
/// executable (`<target>/<profile>/fleetgate`).
///
/// # Errors
/// When it does not exist, with the command that builds it.
pub fn fleetgate_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FLEETGATE_BIN") {
        let p = PathBuf::from(p);
        if !p.exists() {
            bail!("FLEETGATE_BIN={} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("executable path")?;
    // <target>/<profile>/deps/<name>-<hash> -> <target>/<profile>/fleetgate
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .context("target dir")?
        .join("fleetgate");
    if !bin.exists() {
        bail!(
            "{} not found: build it first with the same profile (`make test` does; or \
             `cargo build -p fleetgate`, `cargo build --release -p fleetgate` for benches), or \
             point FLEETGATE_BIN at a fleetgate binary",
            bin.display()
        );
    }
    Ok(bin)
}

/// The addresses a node printed on start.
#[derive(Debug, Clone)]
pub struct Addrs {
    /// Public WebSocket listener.
    pub gateway: String,
    /// Admin REST listener.
    pub admin: String,
    /// Internal listener.
    pub internal: String,
}

/// Starts `fleetgate all` with `env` (listeners should be `127.0.0.1:0`) and reads the
/// address line it prints. The child is killed when dropped; its stdout keeps being drained so
/// it never blocks on a full pipe.
///
/// # Errors
/// When the binary is missing, fails to start, or prints no address line within `deadline`.
pub async fn spawn_all(env: &[(&str, &str)], deadline: Duration) -> anyhow::Result<(Child, Addrs)> {
    let (child, listeners) = spawn_role("all", env, deadline).await?;
    addrs_of(child, listeners)
}

/// [`spawn_all`] with the node's stderr (its log) written to `log`.
///
/// # Errors
/// As [`spawn_all`].
pub async fn spawn_all_logged(
    env: &[(&str, &str)],
    deadline: Duration,
    log: std::fs::File,
) -> anyhow::Result<(Child, Addrs)> {
    let (child, listeners) =
        spawn_with(&fleetgate_binary()?, "all", env, deadline, Stdio::from(log)).await?;
    addrs_of(child, listeners)
}

fn addrs_of(
    child: Child,
    mut listeners: BTreeMap<String, String>,
) -> anyhow::Result<(Child, Addrs)> {
    let mut take = |k: &str| {
        listeners
            .remove(k)
            .with_context(|| format!("`fleetgate all` printed no {k} address"))
    };
    let addrs = Addrs {
        gateway: take("gateway")?,
        admin: take("admin")?,
        internal: take("internal")?,
    };
    Ok((child, addrs))
}

/// Starts `fleetgate <role>` (`all`, `gateway` or `admin`) with `env` and returns the
/// listeners it printed, by name (`gateway`, `admin`, `internal`). As [`spawn_all`] otherwise.
///
/// # Errors
/// When the binary is missing, fails to start, or prints no address line within `deadline`.
pub async fn spawn_role(
    role: &str,
    env: &[(&str, &str)],
    deadline: Duration,
) -> anyhow::Result<(Child, BTreeMap<String, String>)> {
    spawn_binary(&fleetgate_binary()?, role, env, deadline).await
}

/// [`spawn_role`] with a given binary (a benchmark compares two builds).
///
/// # Errors
/// When the binary fails to start or prints no address line within `deadline`.
pub async fn spawn_binary(
    bin: &std::path::Path,
    role: &str,
    env: &[(&str, &str)],
    deadline: Duration,
) -> anyhow::Result<(Child, BTreeMap<String, String>)> {
    spawn_with(bin, role, env, deadline, Stdio::inherit()).await
}

async fn spawn_with(
    bin: &std::path::Path,
    role: &str,
    env: &[(&str, &str)],
    deadline: Duration,
    stderr: Stdio,
) -> anyhow::Result<(Child, BTreeMap<String, String>)> {
    let mut cmd = Command::new(bin);
    cmd.arg(role)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    // The first line that is a JSON object (a wrapper such as a profiler may print first).
    let line = tokio::time::timeout(deadline, async {
        loop {
            match lines.next_line().await? {
                Some(l) if l.trim_start().starts_with('{') => return Ok(l),
                Some(_) => continue,
                None => bail!("fleetgate exited before printing its addresses"),
            }
        }
    })
    .await
    .context("fleetgate did not print its addresses in time")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let listeners: BTreeMap<String, String> = serde_json::from_str(&line)
        .with_context(|| format!("address line is not a map of strings: {line}"))?;
    Ok((child, listeners))
}
