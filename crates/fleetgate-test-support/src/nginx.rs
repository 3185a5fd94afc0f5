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

/// How a test or benchmark ingress differs from the shipped config.
#[derive(Debug, Clone, Default)]
pub struct NginxOptions {
    /// Worker processes; 0 keeps the template's one per core.
    pub workers: usize,
    /// Local addresses nginx connects to the gateways from, chosen by device ID; empty lets
    /// the kernel choose. One source address reaches one gateway address with at most the
    /// ephemeral port range (about 14,000 connections with Linux's defaults, which keep odd
    /// ports for `bind`), so larger loopback clusters need several.
    pub source_addrs: Vec<String>,
}

/// `conf` adjusted as `opts` say.
fn customize(conf: &str, opts: &NginxOptions) -> String {
    let mut conf = conf.to_owned();
    if opts.workers > 0 {
        let line = "worker_processes auto;";
        assert!(conf.contains(line), "the template sets `{line}`");
        conf = conf.replace(line, &format!("worker_processes {};", opts.workers));
    }
    if !opts.source_addrs.is_empty() {
        let n = opts.source_addrs.len();
        let share = (10_000 / n) as f64 / 100.0;
        let mut split =
            String::from("split_clients \"$fleetgate_device_id\" $fleetgate_source {\n");
        for (i, a) in opts.source_addrs.iter().enumerate() {
            if i + 1 == n {
                split.push_str(&format!("        * {a};\n"));
            } else {
                split.push_str(&format!("        {share}% {a};\n"));
            }
        }
        split.push_str("    }\n\n    upstream fleetgate_gateways {");
        let upstream = "upstream fleetgate_gateways {";
        let pass = "proxy_pass http://fleetgate_gateways;";
        assert!(
            conf.contains(upstream) && conf.contains(pass),
            "the template's upstream"
        );
        conf = conf.replacen(upstream, &split, 1).replacen(
            pass,
            &format!("{pass}\n            proxy_bind $fleetgate_source;"),
            1,
        );
    }
    conf
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
        Self::start_with(upstreams, &NginxOptions::default())
    }

    /// Like [`NginxServer::start`], adjusted by `opts` (workers, source addresses).
    pub fn start_with(upstreams: &[String], opts: &NginxOptions) -> Self {
        let bin = require_program("nginx", "nginx");
        let dir = scratch_dir("fleetgate-nginx");
        for _ in 0..5 {
            let port = crate::free_port();
            let prefix = dir.to_str().expect("utf-8 temp dir");
            let conf = dir.join("nginx.conf");
            std::fs::write(
                &conf,
                customize(
                    &render_config(prefix, &format!("127.0.0.1:{port}"), upstreams),
                    opts,
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
    fn a_customized_config_is_accepted_by_nginx() {
        let dir = scratch_dir("fleetgate-nginx-custom");
        let conf = dir.join("nginx.conf");
        let opts = NginxOptions {
            workers: 3,
            source_addrs: vec!["127.0.1.1".into(), "127.0.1.2".into(), "127.0.1.3".into()],
        };
        let text = customize(
            &render_config(
                dir.to_str().unwrap(),
                "127.0.0.1:1",
                &["127.0.0.1:2".into()],
            ),
            &opts,
        );
        assert!(text.contains("worker_processes 3;"));
        assert!(text.contains("33.33% 127.0.1.1;") && text.contains("* 127.0.1.3;"));
        assert!(text.contains("proxy_bind $fleetgate_source;"));
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
