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
