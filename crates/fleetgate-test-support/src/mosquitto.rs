//! `mosquitto` (Eclipse Mosquitto, the MQTT broker) processes for tests of the MQTT bridge.

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use crate::{LogStream, require_program, scratch_dir, stop_guarded};

/// Longest wait for the broker to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A running `mosquitto` on a free loopback port with persistence in its own directory (so a
/// restart keeps persistent sessions and retained messages, as a production broker would);
/// killed, and its directory removed, on drop.
pub struct MosquittoServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl MosquittoServer {
    /// Starts a broker that takes anonymous clients.
    ///
    /// # Panics
    /// When `mosquitto` is missing or does not start within 20 s.
    pub fn start() -> Self {
        let dir = scratch_dir("fleetgate-mosquitto");
        // A free port can be taken between our probe and the broker's bind: retry.
        for _ in 0..5 {
            let mut server = Self {
                child: None,
                port: crate::free_port(),
                dir: dir.clone(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("mosquitto did not start on any of 5 free ports");
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the broker (SIGKILL, as a crash).
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            stop_guarded(child);
        }
    }

    /// Kills the broker and starts it again on the same port and persistence directory.
    ///
    /// # Panics
    /// When it does not come back within 20 s.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "mosquitto did not restart on port {}",
            self.port
        );
    }

    fn spawn(&mut self) -> bool {
        let bin = require_program("mosquitto", "mosquitto");
        let config = self.dir.join("mosquitto.conf");
        // `user root`: started as root, mosquitto otherwise switches to the `mosquitto` user,
        // which cannot write our scratch directory (ignored when not started as root).
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\npersistence_location {dir}/\nautosave_interval 1\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
            port = self.port,
            dir = self.dir.display()
        );
        std::fs::write(&config, text).expect("write mosquitto.conf");
        let what = format!("mosquitto on port {}", self.port);
        // Its log goes to stderr: unbuffered, unlike stdout into a pipe.
        self.child = crate::spawn_guarded(
            &what,
            &bin,
            &["-c".into(), config.into_os_string()],
            LogStream::Stderr,
            " running",
            START_DEADLINE,
        );
        self.child.is_some()
    }
}

impl Drop for MosquittoServer {
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

    /// An MQTT 3.1.1 CONNECT (client ID `t`, clean session) and the CONNACK it gets.
    fn connect(port: u16) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let packet = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b't',
        ];
        s.write_all(&packet).unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        buf.to_vec()
    }

    #[test]
    fn accepts_an_mqtt_client_survives_a_restart_and_is_gone_after_drop() {
        let mut broker = MosquittoServer::start();
        let port = broker.port();
        assert_eq!(connect(port), [0x20, 2, 0, 0], "CONNACK, accepted");
        broker.restart();
        assert_eq!(connect(port), [0x20, 2, 0, 0], "accepted after a restart");
        drop(broker);
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "killed on drop"
        );
    }
}
