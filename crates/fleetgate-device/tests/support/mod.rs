//! A scripted gateway: a real WebSocket server on 127.0.0.1:0 that the test drives frame by
//! frame, standing in for the fleetgate gateway.

#![allow(dead_code)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_device::{Codec, Frame};
use fleetgate_protocol::{AuthResponse, Handshake, HandshakeKind, MsgId};
use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{WebSocketStream, accept_hdr_async};

/// Every wait in these tests is bounded by this deadline.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// Awaits `fut`, failing the test if it takes longer than [`DEADLINE`].
pub async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .expect("deadline exceeded")
}

/// Listens for devices.
pub struct Gateway {
    listener: TcpListener,
    /// `ws://127.0.0.1:PORT/v1/device`.
    pub url: String,
}

impl Gateway {
    pub async fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/device", listener.local_addr().unwrap());
        Self { listener, url }
    }

    /// Accepts the next device connection, echoing its subprotocol.
    pub async fn accept(&self) -> Peer {
        let (tcp, _) = within(self.listener.accept()).await.unwrap();
        let seen = Arc::new(Mutex::new((HeaderMap::new(), String::new())));
        let seen2 = Arc::clone(&seen);
        #[allow(clippy::result_large_err)] // the callback's signature is tungstenite's
        let callback = move |req: &Request, mut resp: Response| {
            if let Some(p) = req.headers().get("Sec-WebSocket-Protocol") {
                resp.headers_mut()
                    .insert("Sec-WebSocket-Protocol", p.clone());
            }
            *seen2.lock().unwrap() = (req.headers().clone(), req.uri().path().to_owned());
            Ok(resp)
        };
        let ws = within(accept_hdr_async(tcp, callback)).await.unwrap();
        let (headers, path) = seen.lock().unwrap().clone();
        let codec = headers
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(Codec::from_subprotocol)
            .unwrap_or(Codec::Json);
        Peer {
            ws,
            headers,
            path,
            codec,
            pings: 0,
        }
    }

    /// Accepts and authenticates (header mode), returning the peer.
    pub async fn accept_authed(&self, session_id: &str) -> Peer {
        let mut peer = self.accept().await;
        peer.auth_ok(session_id).await;
        peer
    }

    /// Whether a connection arrives within `wait` (for asserting that none does).
    pub async fn connection_within(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.listener.accept())
            .await
            .is_ok()
    }
}

/// The gateway's side of one device connection.
pub struct Peer {
    pub ws: WebSocketStream<TcpStream>,
    pub headers: HeaderMap,
    pub path: String,
    pub codec: Codec,
    pub pings: u32,
}

impl Peer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub async fn send(&mut self, frame: &Frame) {
        let bytes = self.codec.encode(frame);
        let msg = match self.codec {
            Codec::Json => Message::Text(String::from_utf8(bytes.to_vec()).unwrap().into()),
            Codec::Protobuf => Message::Binary(bytes),
        };
        within(self.ws.send(msg)).await.unwrap();
    }

    pub async fn send_json(&mut self, v: Value) {
        within(self.ws.send(Message::Text(v.to_string().into())))
            .await
            .unwrap();
    }

    /// The next frame from the device (pings are counted, not returned).
    pub async fn recv(&mut self) -> Frame {
        loop {
            let msg = within(self.ws.next())
                .await
                .expect("device closed")
                .unwrap();
            match msg {
                Message::Text(t) => return self.codec.decode(t.as_bytes()).unwrap(),
                Message::Binary(b) => return self.codec.decode(&b).unwrap(),
                Message::Ping(_) => self.pings += 1,
                Message::Pong(_) | Message::Frame(_) => {}
                Message::Close(c) => panic!("device closed: {c:?}"),
            }
        }
    }

    /// Reads (answering pings) until `n` pings have arrived; frames are not expected.
    pub async fn wait_pings(&mut self, n: u32) {
        while self.pings < n {
            match self.ws.next().await.expect("device closed").unwrap() {
                Message::Ping(_) => self.pings += 1,
                Message::Pong(_) => {}
                other => panic!("expected only pings, got {other:?}"),
            }
        }
    }

    /// The next frame, which must be a message envelope.
    pub async fn recv_message(&mut self) -> fleetgate_protocol::Envelope {
        match self.recv().await {
            Frame::Message(env) => env,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The next frame, which must be a handshake.
    pub async fn recv_handshake(&mut self) -> Handshake {
        match self.recv().await {
            Frame::Handshake(h) => h,
            other => panic!("expected a handshake, got {other:?}"),
        }
    }

    pub async fn auth_ok(&mut self, session_id: &str) {
        self.send(&Frame::AuthResponse(AuthResponse::Success {
            timestamp: 1,
            session_id: session_id.into(),
            heartbeat_ms: 30_000,
        }))
        .await;
    }

    pub async fn handshake(&mut self, kind: HandshakeKind, msgid: &MsgId, payload: Option<Value>) {
        let h = Handshake {
            kind,
            msgid: msgid.clone(),
            payload,
        };
        self.send(&Frame::Handshake(h)).await;
    }

    pub async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        within(self.ws.close(Some(frame))).await.unwrap();
        // Drain until the device's close reply ends the stream.
        while let Some(Ok(_)) = within(self.ws.next()).await {}
    }

    /// Waits for the device's close frame and returns its code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match within(self.ws.next()).await {
                Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("error instead of close: {e}"),
                None => return None,
            }
        }
    }
}
