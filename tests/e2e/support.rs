//! Test harness: starts the real `fleetgate` binary on free ports and talks to it over real
//! sockets. Nothing here sleeps to wait for a condition; every wait has a deadline.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

/// The API key every test node starts with.
pub const API_KEY: &str = "test-api-key-0123456789";

/// Upper bound for any single wait in these tests.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A running `fleetgate all` process, killed on drop.
pub struct Node {
    child: Child,
    /// Public WebSocket listener.
    pub gateway: String,
    /// Admin REST listener.
    pub admin: String,
    /// Internal listener.
    pub internal: String,
    http: reqwest::Client,
}

/// Timers short enough for tests; a test overrides what it exercises.
fn test_env() -> Vec<(&'static str, String)> {
    vec![
        ("FLEETGATE_API_KEY", API_KEY.into()),
        ("FLEETGATE_LISTEN", "127.0.0.1:0".into()),
        ("FLEETGATE_ADMIN_LISTEN", "127.0.0.1:0".into()),
        ("FLEETGATE_INTERNAL_LISTEN", "127.0.0.1:0".into()),
        ("FLEETGATE_AUTH_TIMEOUT_MS", "2000".into()),
        ("FLEETGATE_HEARTBEAT_MS", "1000".into()),
        ("FLEETGATE_IDLE_TIMEOUT_MS", "5000".into()),
        ("FLEETGATE_ACK_TIMEOUT_MS", "300".into()),
        ("FLEETGATE_DRAIN_PERIOD_MS", "500".into()),
        ("RUST_LOG", "warn".into()),
    ]
}

impl Node {
    /// Starts a node with the test defaults plus `overrides`.
    pub async fn start(overrides: &[(&str, &str)]) -> Node {
        Self::start_logged(overrides, None).await
    }

    /// As [`Node::start`], with the node's log (stderr) written to `log` when given.
    pub async fn start_logged(overrides: &[(&str, &str)], log: Option<std::fs::File>) -> Node {
        let defaults = test_env();
        let mut env: Vec<(&str, &str)> = defaults.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend_from_slice(overrides);
        let started = match log {
            Some(log) => fleetgate_e2e::spawn_all_logged(&env, DEADLINE, log).await,
            None => fleetgate_e2e::spawn_all(&env, DEADLINE).await,
        };
        let (child, addrs) = started.expect("start fleetgate");
        Node {
            gateway: addrs.gateway,
            admin: addrs.admin,
            internal: addrs.internal,
            child,
            // A hung handler fails its test with a message instead of hanging the run (waits
            // over REST are capped well below this).
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .expect("HTTP client"),
        }
    }

    /// The process, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends the process a signal (`"TERM"`, `"KILL"`).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("exit in time")
            .expect("wait")
    }

    /// `ws://.../v1/device`.
    pub fn device_url(&self) -> String {
        format!("ws://{}/v1/device", self.gateway)
    }

    /// An admin API call with the API key; returns status and JSON body (Null if empty).
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.admin_with_key(method, path, body, Some(API_KEY)).await
    }

    /// An admin API call with any (or no) key.
    pub async fn admin_with_key(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        self.admin_request(method, path, body, key, &[]).await
    }

    /// An admin API call with any (or no) key and extra headers.
    pub async fn admin_request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let url = format!("http://{}{}", self.admin, path);
        let mut req = self.http.request(method.parse().expect("method"), url);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = tokio::time::timeout(DEADLINE, req.send())
            .await
            .expect("admin answered in time")
            .expect("admin request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, json)
    }

    /// Sends a command to `device` through this node's admin API in a task of its own (the
    /// test meanwhile plays the device); the handle yields the status and JSON body.
    pub fn command_in_background(
        &self,
        device: &str,
        body: Value,
    ) -> tokio::task::JoinHandle<(u16, Value)> {
        let url = format!("http://{}/v1/devices/{device}/commands", self.admin);
        let request = self.http.post(url).bearer_auth(API_KEY).json(&body).send();
        tokio::spawn(async move {
            let resp = tokio::time::timeout(DEADLINE, request)
                .await
                .expect("admin answered in time")
                .expect("command request");
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(Value::Null))
        })
    }

    /// An internal listener GET; returns status and text.
    pub async fn internal_get(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("http://{}{}", self.internal, path))
            .send()
            .await
            .expect("internal request");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    /// Provisions `id` and returns its secret.
    pub async fn provision(&self, id: &str) -> String {
        self.provision_in(id, &[]).await
    }

    /// Provisions `id` in `groups` and returns its secret.
    pub async fn provision_in(&self, id: &str, groups: &[&str]) -> String {
        let (status, body) = self
            .admin(
                "POST",
                "/v1/devices",
                Some(json!({ "id": id, "groups": groups })),
            )
            .await;
        assert_eq!(status, 201, "provision {id}: {body}");
        body["secret"].as_str().expect("secret").to_owned()
    }
}

/// Waits until `check` returns `Some`, polling, up to `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, DEADLINE, check).await
}

/// [`eventually`] with another deadline (for waits that include a TTL running out).
pub async fn eventually_within<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Any byte stream a test socket runs over: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A raw WebSocket to the gateway, for tests that craft frames by hand.
pub struct Raw {
    ws: WebSocketStream<Box<dyn Stream>>,
}

/// What a raw socket saw when it closed.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    /// Close code (0 if the peer dropped the socket without a close frame).
    pub code: u16,
    /// Close reason.
    pub reason: String,
}

/// A status envelope from `device`.
pub fn status(device: &str, msgid: &str, qos: u8, payload: Value) -> Value {
    json!({"ver":"1.0","msgid":msgid,"timestamp":now_ms(),"from":device,"to":"server","type":"status","payload":payload,"qos":qos})
}

impl Raw {
    /// Opens a socket with extra headers; panics unless the upgrade succeeds.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Raw {
        match Self::try_connect(url, headers).await {
            Ok(raw) => raw,
            Err(status) => panic!("upgrade refused with {status}"),
        }
    }

    /// Opens a socket; `Err(http status)` if the upgrade is refused.
    pub async fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Raw, u16> {
        let authority = url
            .into_client_request()
            .expect("request")
            .uri()
            .authority()
            .expect("host:port in the URL")
            .to_string();
        let tcp = tokio::time::timeout(DEADLINE, TcpStream::connect(&authority))
            .await
            .expect("connect in time")
            .expect("connect");
        match Self::try_connect_over(Box::new(tcp), url, headers).await {
            Err(0) => panic!("upgrade of {url} failed without an HTTP answer"),
            other => other,
        }
    }

    /// Upgrades an open `stream` (TCP, or TLS for `wss://`) to a WebSocket at `url`;
    /// `Err(http status)` if the upgrade is refused, `Err(0)` if the connection failed first.
    pub async fn try_connect_over(
        stream: Box<dyn Stream>,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Raw, u16> {
        let mut req = url.into_client_request().expect("request");
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
            req.headers_mut()
                .insert(name, HeaderValue::from_str(v).expect("header"));
        }
        match tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, stream))
            .await
            .expect("upgrade in time")
        {
            Ok((ws, _)) => Ok(Raw { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(_) => Err(0),
        }
    }

    /// Opens a socket and authenticates with an auth frame; returns the auth response.
    pub async fn auth(url: &str, device: &str, token: &str) -> (Raw, Value) {
        let mut raw = Raw::connect(url, &[]).await;
        raw.send(json!({"type":"auth","deviceId":device,"token":token}))
            .await;
        let resp = raw.recv().await;
        (raw, resp)
    }

    /// Like [`Raw::auth`], asserting success.
    pub async fn authed(url: &str, device: &str, token: &str) -> Raw {
        let (raw, resp) = Raw::auth(url, device, token).await;
        assert_eq!(resp["status"], "success", "auth of {device}: {resp}");
        raw
    }

    /// Sends a JSON text frame.
    pub async fn send(&mut self, frame: Value) {
        self.send_text(frame.to_string()).await;
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::binary(bytes)).await.expect("send");
    }

    /// The next text frame as JSON; panics on close or after the deadline.
    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Ok(v) => v,
            Err(closed) => panic!("socket closed while a frame was expected: {closed:?}"),
        }
    }

    /// The next data frame, or how the socket closed.
    pub async fn next(&mut self) -> Result<Value, Closed> {
        tokio::time::timeout(DEADLINE, self.next_frame())
            .await
            .expect("frame in time")
    }

    /// The next data frame however long it takes (pings in between are answered), or how the
    /// socket closed: for devices that sit idle until the server sends them something.
    pub async fn next_frame(&mut self) -> Result<Value, Closed> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return Ok(serde_json::from_str(&t).expect("server sent JSON"));
                }
                Some(Ok(Message::Binary(b))) => return Ok(json!({ "binary": b.to_vec() })),
                Some(Ok(Message::Close(frame))) => {
                    return Err(match frame {
                        Some(f) => Closed {
                            code: f.code.into(),
                            reason: f.reason.to_string(),
                        },
                        None => Closed {
                            code: 1005,
                            reason: String::new(),
                        },
                    });
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    return Err(Closed {
                        code: 0,
                        reason: String::new(),
                    });
                }
            }
        }
    }

    /// Reads (and discards data frames) until the socket closes, within the deadline; returns
    /// how it closed.
    pub async fn closed(&mut self) -> Closed {
        let until_closed = async {
            loop {
                if let Err(closed) = self.next().await {
                    return closed;
                }
            }
        };
        tokio::time::timeout(DEADLINE, until_closed)
            .await
            .expect("socket closed in time")
    }
}

/// Command frames a device saw, by msgid: (first sends, resends marked `dup`).
pub type Seen = Arc<Mutex<HashMap<String, (u32, u32)>>>;

/// A device that answers every command: with `{"error": ...}` when `fail`, else a result.
/// It waits for commands without a deadline (an idle device only sees pings) and ends with how
/// its socket closed.
pub fn answering(mut raw: Raw, fail: bool, seen: Seen) -> JoinHandle<Closed> {
    tokio::spawn(async move {
        loop {
            let frame = match raw.next_frame().await {
                Ok(frame) => frame,
                Err(closed) => return closed,
            };
            if frame["type"] != "command" {
                continue;
            }
            let msgid = frame["msgid"].as_str().unwrap().to_owned();
            {
                let mut seen = seen.lock().unwrap();
                let e = seen.entry(msgid.clone()).or_default();
                if frame["dup"] == true {
                    e.1 += 1
                } else {
                    e.0 += 1
                }
            }
            let payload = if fail {
                json!({"error": "refused"})
            } else {
                json!({"result": frame["payload"]})
            };
            raw.send(json!({"type": "ack", "msgid": msgid, "payload": payload}))
                .await;
        }
    })
}

/// Writes a file only its owner may read: the node refuses world-readable secret files.
pub fn write_secret(path: &std::path::Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).expect("write secret file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}
