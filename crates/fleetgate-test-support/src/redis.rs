//! `redis-server` processes for tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{LogStream, require_program, scratch_dir, stop_guarded};

/// How a test server runs.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only file on (`appendfsync always`), so a restart keeps every acknowledged write.
    pub aof: bool,
}

/// A running `redis-server` on a free loopback port, with its own data directory; killed
/// (and its directory removed) on drop, and killed with the test process if never dropped
/// (kept in a `static`).
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    options: RedisOptions,
}

/// Longest wait for a server to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(20);

impl RedisServer {
    /// Starts a server without persistence.
    ///
    /// # Panics
    /// When `redis-server` is missing or does not start within 20 s.
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server with `options`.
    ///
    /// # Panics
    /// When `redis-server` is missing or does not start within 20 s.
    pub fn start_with(options: RedisOptions) -> Self {
        let dir = scratch_dir("fleetgate-redis");
        // A free port can be taken by someone else between our probe and redis's bind: retry.
        for _ in 0..5 {
            let port = crate::free_port();
            let mut server = Self {
                child: None,
                port,
                dir: dir.clone(),
                options: options.clone(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The keys matching `pattern` (`SCAN MATCH`, through `redis-cli`), sorted.
    ///
    /// # Panics
    /// When `redis-cli` is missing or fails.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let cli = require_program("redis-cli", "redis-tools");
        let out = Command::new(cli)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "--scan",
                "--pattern",
                pattern,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli --scan failed: {out:?}");
        let mut keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    /// Kills the server (SIGKILL: nothing is flushed beyond what its persistence settings
    /// already wrote).
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            stop_guarded(child);
        }
    }

    /// Kills the server and starts it again on the same port and data directory.
    ///
    /// # Panics
    /// When it does not come back within 20 s.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Starts the process and waits for it to accept connections; `false` if it exited
    /// first (for example because the port was taken).
    fn spawn(&mut self) -> bool {
        let bin = require_program("redis-server", "redis-server");
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        for a in [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ] {
            args.push(a.into());
        }
        args.push("--dir".into());
        args.push(self.dir.clone().into_os_string());
        for a in [
            "--logfile",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ] {
            args.push(a.into());
        }
        let persistence: &[&str] = if self.options.aof {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        args.extend(persistence.iter().map(Into::into));
        let what = format!("redis-server on port {}", self.port);
        self.child = crate::spawn_guarded(
            &what,
            &bin,
            &args,
            LogStream::Stdout,
            "Ready to accept connections",
            START_DEADLINE,
        );
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn command(port: u16, cmd: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(cmd.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn starts_answers_and_is_gone_after_drop() {
        let server = RedisServer::start();
        let port = server.port();
        assert_eq!(command(port, "PING\r\n"), "+PONG\r\n");
        drop(server);
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "killed on drop"
        );
    }

    #[test]
    fn an_aof_server_keeps_acknowledged_writes_across_a_kill() {
        let mut server = RedisServer::start_with(RedisOptions { aof: true });
        assert_eq!(command(server.port(), "SET k v\r\n"), "+OK\r\n");
        server.restart();
        assert_eq!(command(server.port(), "GET k\r\n"), "$1\r\nv\r\n");
    }
}
