//! Test harness shared by the crates' tests: real servers from Debian's packages (`redis-server`,
//! `nginx`, `mosquitto`), started on free loopback ports and killed on drop. No mocks.
//!
//! Waits are on events with deadlines: a server counts as started when it prints that it
//! accepts connections, not after a sleep.

mod mosquitto;
mod nginx;
mod redis;

pub use mosquitto::MosquittoServer;
pub use nginx::{CONFIG_TEMPLATE, NginxOptions, NginxServer, render_config};
pub use redis::{RedisOptions, RedisServer};

use std::path::PathBuf;

/// Finds a program on `PATH` or in the sbin folders Debian installs servers into.
///
/// # Panics
/// When it is missing, naming the Debian package to install (`make test` installs it).
pub fn require_program(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain([
        "/usr/sbin".into(),
        "/usr/local/sbin".into(),
        "/sbin".into(),
    ]);
    for dir in dirs {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "{program} not found: install Debian's `{package}` package (apt-get install {package}); `make test` does this when run as root"
    );
}

/// A port that was free a moment ago (callers retry if someone takes it first).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A fresh, empty directory under the system temp dir, removed by the caller's `Drop`.
pub(crate) fn scratch_dir(prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Where a server writes the log line that says it is ready.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LogStream {
    Stdout,
    Stderr,
}

/// Starts `bin args` under a guard shell and waits up to `deadline` for a log line containing
/// `ready`. The shell ties the server to our stdin: when the returned child is stopped
/// ([`stop_guarded`]) or this process exits without stopping it (servers kept in statics),
/// the pipe closes, `read` returns and the server is killed with SIGKILL, as a crash would.
/// The log keeps being drained so the server never blocks on a full pipe. `None` when the
/// server exited before it was ready (a port taken, say).
///
/// # Panics
/// When the server is still not ready at `deadline`.
pub(crate) fn spawn_guarded(
    what: &str,
    bin: &std::path::Path,
    args: &[std::ffi::OsString],
    log: LogStream,
    ready: &'static str,
    deadline: std::time::Duration,
) -> Option<std::process::Child> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let (stdout, stderr) = match log {
        LogStream::Stdout => (Stdio::piped(), Stdio::null()),
        LogStream::Stderr => (Stdio::null(), Stdio::piped()),
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"bin=$1; shift; "$bin" "$@" & pid=$!; read _; kill -9 $pid; wait $pid"#)
        .arg("sh")
        .arg(bin)
        .args(args)
        .stdout(stdout)
        .stderr(stderr)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let reader: Box<dyn std::io::Read + Send> = match log {
        LogStream::Stdout => Box::new(child.stdout.take().expect("stdout")),
        LogStream::Stderr => Box::new(child.stderr.take().expect("stderr")),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ready_sent = false;
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if !ready_sent && line.contains(ready) {
                let _ = tx.send(true);
                ready_sent = true;
            }
        }
        if !ready_sent {
            let _ = tx.send(false);
        }
    });
    match rx.recv_timeout(deadline) {
        Ok(true) => Some(child),
        Ok(false) => {
            stop_guarded(child);
            None
        }
        Err(_) => {
            stop_guarded(child);
            panic!("{what} not ready within {deadline:?}");
        }
    }
}

/// Closes the guard shell's stdin (which kills the server) and reaps the shell.
pub(crate) fn stop_guarded(mut child: std::process::Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}
