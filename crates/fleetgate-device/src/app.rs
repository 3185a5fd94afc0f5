//! [`AppClient`]: a small client of the gateway's `/v1/app` endpoint, for dashboards and
//! integrations written in Rust (docs/PROTOCOL.md, "App protocol").
//!
//! It remembers each channel's last offset and epoch ([`Positions`]); subscribing again on a
//! new connection with the same positions recovers what was missed, or reports
//! [`AppError::GapTooOld`] when the gateway no longer keeps it (re-read state over REST).
//!
//! ```no_run
//! # async fn demo() -> Result<(), fleetgate_device::AppError> {
//! use fleetgate_device::{AppClient, AppEvent};
//! let mut app = AppClient::connect("ws://127.0.0.1:8080/v1/app", "fg_...").await?;
//! app.subscribe("group:farm-a").await?;
//! while let AppEvent::Message { channel, data, .. } = app.next().await? {
//!     println!("{channel}: {data}");
//! }
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use fleetgate_protocol::app::{AppErrorCode, AppReply, AppRequest};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a request waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames held while a request waits for its answer.
const MAX_HELD: usize = 10_000;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Transport or WebSocket failure.
    #[error("websocket: {0}")]
    WebSocket(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// The upgrade was refused (401 bad credentials, 429 too many connections, 503...).
    #[error("upgrade refused with HTTP {0}")]
    UpgradeRefused(u16),
    /// The gateway closed the connection.
    #[error("closed (code {code:?}): {reason}")]
    Closed {
        /// The close code, when a close frame arrived.
        code: Option<u16>,
        /// The reason.
        reason: String,
    },
    /// A request was refused.
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// Why.
        code: AppErrorCode,
        /// The gateway's words.
        message: String,
    },
    /// What came after the remembered offset is no longer kept: re-read state over REST,
    /// then subscribe afresh ([`Positions::forget`]).
    #[error("gap too old on {0}")]
    GapTooOld(String),
    /// No answer in time, or a frame that is not JSON.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for AppError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                Self::UpgradeRefused(resp.status().as_u16())
            }
            other => Self::WebSocket(Box::new(other)),
        }
    }
}

/// Each channel's epoch and last offset, to recover from after a reconnect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions(HashMap<String, (String, u64)>);

impl Positions {
    /// The channel's `(epoch, last offset)`.
    pub fn get(&self, channel: &str) -> Option<(&str, u64)> {
        self.0.get(channel).map(|(e, o)| (e.as_str(), *o))
    }

    /// Forgets a channel (the next subscribe starts from now).
    pub fn forget(&mut self, channel: &str) {
        self.0.remove(channel);
    }
}

/// What the gateway pushes.
#[derive(Debug, Clone, PartialEq)]
pub enum AppEvent {
    /// A frame published on a subscribed channel (`offset` is `None` for the retained value
    /// sent at subscribe).
    Message {
        /// The channel.
        channel: String,
        /// Its position.
        offset: Option<u64>,
        /// The device's envelope, alert or presence change.
        data: Value,
    },
    /// Frames on `channel` were lost and are no longer kept: re-read state over REST.
    Gap {
        /// The channel.
        channel: String,
    },
}

/// A connection to `/v1/app`.
pub struct AppClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    positions: Positions,
    held: VecDeque<AppReply>,
    next_id: u64,
}

impl AppClient {
    /// Connects with a user token or API key (sent in the `Authorization` header).
    ///
    /// # Errors
    /// [`AppError::UpgradeRefused`] for bad credentials (401) and full nodes (503).
    pub async fn connect(url: &str, token: &str) -> Result<Self, AppError> {
        Self::connect_with(url, token, Positions::default()).await
    }

    /// Connects, recovering from `positions` (those of an earlier connection) on subscribe.
    ///
    /// # Errors
    /// As [`AppClient::connect`].
    pub async fn connect_with(
        url: &str,
        token: &str,
        positions: Positions,
    ) -> Result<Self, AppError> {
        let mut req = url.into_client_request()?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| AppError::Protocol("token is not a valid header value".into()))?;
        req.headers_mut().insert("authorization", bearer);
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Self {
            ws,
            positions,
            held: VecDeque::new(),
            next_id: 0,
        })
    }

    /// The positions so far (hand them to [`AppClient::connect_with`] after a reconnect).
    pub fn positions(&self) -> &Positions {
        &self.positions
    }

    /// Subscribes to a channel, recovering from its remembered position if there is one;
    /// returns the number of recovered frames, which [`AppClient::next`] yields first.
    ///
    /// # Errors
    /// [`AppError::Refused`] (forbidden, not found, limits), [`AppError::GapTooOld`].
    pub async fn subscribe(&mut self, channel: &str) -> Result<u64, AppError> {
        let id = self.request_id();
        let (epoch, since) = match self.positions.get(channel) {
            Some((e, o)) => (Some(e.to_owned()), Some(o)),
            None => (None, None),
        };
        let request = AppRequest::Subscribe {
            channel: channel.to_owned(),
            id: Some(id.clone()),
            since,
            epoch,
        };
        match self.request(&request, &id).await? {
            AppReply::Subscribed {
                epoch,
                offset,
                recovered,
                ..
            } => {
                self.positions.0.insert(channel.to_owned(), (epoch, offset));
                Ok(recovered.unwrap_or(0))
            }
            AppReply::Error {
                code: AppErrorCode::GapTooOld,
                ..
            } => Err(AppError::GapTooOld(channel.to_owned())),
            other => Err(refused(other)),
        }
    }

    /// Unsubscribes (the position is kept for a later subscribe).
    ///
    /// # Errors
    /// [`AppError::Refused`] when not subscribed.
    pub async fn unsubscribe(&mut self, channel: &str) -> Result<(), AppError> {
        let id = self.request_id();
        let request = AppRequest::Unsubscribe {
            channel: channel.to_owned(),
            id: Some(id.clone()),
        };
        match self.request(&request, &id).await? {
            AppReply::Unsubscribed { .. } => Ok(()),
            other => Err(refused(other)),
        }
    }

    /// The next pushed frame.
    ///
    /// # Errors
    /// [`AppError::Closed`] when the gateway closes (4008: this client fell behind; connect
    /// again with [`AppClient::positions`] to recover).
    pub async fn next(&mut self) -> Result<AppEvent, AppError> {
        loop {
            let reply = match self.held.pop_front() {
                Some(r) => r,
                None => self.read().await?,
            };
            match reply {
                AppReply::Message {
                    channel,
                    offset,
                    data,
                    ..
                } => {
                    if let (Some(o), Some(p)) = (offset, self.positions.0.get_mut(&channel)) {
                        p.1 = o;
                    }
                    return Ok(AppEvent::Message {
                        channel,
                        offset,
                        data,
                    });
                }
                AppReply::Error {
                    code: AppErrorCode::GapTooOld,
                    channel: Some(channel),
                    ..
                } => {
                    self.positions.forget(&channel);
                    return Ok(AppEvent::Gap { channel });
                }
                // Answers nobody waits for (a late one after a timeout).
                _ => {}
            }
        }
    }

    /// The next text frame as the gateway sent it, undecoded (frames held while a request
    /// waited come first, re-encoded). For clients that decode only what they need, such as
    /// a load generator; positions are not updated.
    ///
    /// # Errors
    /// As [`AppClient::next`].
    pub async fn next_text(&mut self) -> Result<String, AppError> {
        if let Some(held) = self.held.pop_front() {
            return serde_json::to_string(&held).map_err(|e| AppError::Protocol(e.to_string()));
        }
        self.read_text().await
    }

    fn request_id(&mut self) -> String {
        self.next_id += 1;
        format!("r{}", self.next_id)
    }

    /// Sends `request` and waits for the answer with `id`, holding pushed frames meanwhile.
    async fn request(&mut self, request: &AppRequest, id: &str) -> Result<AppReply, AppError> {
        let text = serde_json::to_string(request).map_err(|e| AppError::Protocol(e.to_string()))?;
        self.ws.send(Message::text(text)).await?;
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            let reply = tokio::time::timeout_at(deadline, self.read())
                .await
                .map_err(|_| AppError::Protocol("no answer in time".into()))??;
            let answer_id = match &reply {
                AppReply::Subscribed { id, .. }
                | AppReply::Unsubscribed { id, .. }
                | AppReply::CommandResult { id, .. }
                | AppReply::Error { id, .. } => id.as_deref(),
                _ => None,
            };
            if answer_id == Some(id) {
                return Ok(reply);
            }
            if self.held.len() >= MAX_HELD {
                return Err(AppError::Protocol(
                    "too many frames before the answer".into(),
                ));
            }
            self.held.push_back(reply);
        }
    }

    async fn read(&mut self) -> Result<AppReply, AppError> {
        let text = self.read_text().await?;
        serde_json::from_str(&text).map_err(|e| AppError::Protocol(format!("bad frame: {e}")))
    }

    async fn read_text(&mut self) -> Result<String, AppError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
                Some(Ok(Message::Close(frame))) => {
                    return Err(AppError::Closed {
                        code: frame.as_ref().map(|f| f.code.into()),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(AppError::Closed {
                        code: None,
                        reason: String::new(),
                    });
                }
            }
        }
    }
}

fn refused(reply: AppReply) -> AppError {
    match reply {
        AppReply::Error { code, message, .. } => AppError::Refused { code, message },
        other => AppError::Protocol(format!("unexpected answer {other:?}")),
    }
}
