//! An `nginx` process running the project's ingress config (`nginx/fleetgate.conf.template`)
//! in front of test gateways.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{require_program, scratch_dir};

/// The project's ingress config, compiled in so tests always run the file that ships.
pub const CONFIG_TEMPLATE: &str = include_str!("../../../nginx/fleetgate.conf.template");

/// Renders the ingress config for `listen` and `upstreams` (gateway `host:port`s), with its
/// pid file, logs and temp files under `prefix`.
pub fn render_config(prefix: &str, listen: &str, upstreams: &[String]) -> String {
    let servers: Vec<String> = upstreams
        .iter()
        .map(|u| format!("server {u} max_fails=2 fail_timeout=5s;"))
        .collect();
    CONFIG_TEMPLATE
        .replace("@PREFIX@", prefix)
        .replace("@LISTEN@", listen)
        .replace("@UPSTREAM_SERVERS@", &servers.join("\n        "))
}

/// `conf` with `workers` worker processes (0 leaves the template's one per core).
fn with_workers(conf: &str, workers: usize) -> String {
    if workers == 0 {
        return conf.to_owned();
    }
    let line = "worker_processes auto;";
    assert!(conf.contains(line), "the template sets `{line}`");
    conf.replace(line, &format!("worker_processes {workers};"))
}

/// A running nginx on a free loopback port; killed (and its directory removed) on drop.
pub struct NginxServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl NginxServer {
    /// Starts nginx proxying to `upstreams`.
    ///
    /// # Panics
    /// When nginx is missing, rejects the config, or does not listen within 20 s.
    pub fn start(upstreams: &[String]) -> Self {
        Self::start_with_workers(upstreams, 0)
    }

    /// Like [`NginxServer::start`] with `workers` worker processes (0 = one per core): each
    /// holds at most ~9,000 descriptors, two per proxied WebSocket.
    pub fn start_with_workers(upstreams: &[String], workers: usize) -> Self {
        let bin = require_program("nginx", "nginx");
        let dir = scratch_dir("fleetgate-nginx");
        for _ in 0..5 {
            let port = crate::free_port();
            let prefix = dir.to_str().expect("utf-8 temp dir");
            let conf = dir.join("nginx.conf");
            std::fs::write(
                &conf,
                with_workers(
                    &render_config(prefix, &format!("127.0.0.1:{port}"), upstreams),
                    workers,
                ),
            )
            .expect("write nginx.conf");
            let mut child = Command::new(&bin)
                .args([
                    "-p".as_ref(),
                    dir.as_os_str(),
                    "-c".as_ref(),
                    conf.as_os_str(),
                ])
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn nginx");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { child, port, dir };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    if err.contains("Address already in use") {
                        break;
                    }
                    panic!("nginx exited: {err}");
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx did not listen on {port} within 20 s"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("nginx did not start on any of 5 free ports");
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for NginxServer {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master stops its workers only when it is asked to; a
        // killed master leaves them running, still holding the port.
        let stopped = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_template_renders_and_nginx_accepts_it() {
        let dir = scratch_dir("fleetgate-nginx-check");
        let conf = dir.join("nginx.conf");
        let text = render_config(
            dir.to_str().unwrap(),
            "127.0.0.1:1",
            &["127.0.0.1:2".into(), "127.0.0.1:3".into()],
        );
        assert!(!text.contains('@'), "every placeholder filled");
        std::fs::write(&conf, text).unwrap();
        let out = Command::new(require_program("nginx", "nginx"))
            .arg("-t")
            .args([
                "-p".as_ref(),
                dir.as_os_str(),
                "-c".as_ref(),
                conf.as_os_str(),
            ])
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "nginx -t: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
