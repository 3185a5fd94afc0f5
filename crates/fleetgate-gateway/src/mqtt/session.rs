//! One `/v1/mqtt` session: authentication (as `/v1/app`), then one loop over the socket, the
//! session's subscriber queue on the bridge and its timer (ping, idle deadline).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use fleetgate_authz::{Principal, Scope};
use fleetgate_mqtt::{
    AclSubject, Closed, Delivery, Groups, MqttError, Qos, Subscriber, Topic, TopicFilter,
};
use fleetgate_protocol::mqtt::{
    MqttErrorCode, MqttReply, MqttRequest, decode_request, encode_mqtt, payload_bytes,
};
use fleetgate_protocol::{CloseCode, retry_after_reason};
use futures_util::SinkExt;
use tokio::time::Instant;
use tracing::Span;

use super::MqttAccess;
use crate::Shared;
use crate::app::session::{
    Close, auth_frame, expired, finish, no_later_than_expiry, principal_expiry, send_text, write,
};
use crate::app::{Admission, Slot};

/// Messages one session's queue holds at most, on top of its byte bound: many tiny
/// messages cost more than their bytes say.
const MAX_QUEUED_MESSAGES: usize = 10_000;

struct MqttSession {
    shared: Arc<Shared>,
    access: MqttAccess,
    principal: Principal,
    /// The scope's groups, for `${group}` in the ACLs (`None`: every group).
    groups: Option<Vec<String>>,
    subscriber: Subscriber,
    /// Filters held, by their text as the client wrote it.
    subs: HashMap<String, TopicFilter>,
    last_activity: Instant,
    next_ping: Instant,
    /// When the principal's credential expires (plus the grace): the session ends then.
    expires_at: Option<Instant>,
    _slot: Slot,
}

/// Runs a socket from upgrade to close.
pub(crate) async fn run(
    shared: Arc<Shared>,
    access: MqttAccess,
    mut ws: WebSocket,
    admission: Admission,
) {
    let authed = match admission {
        Admission::Authenticated(principal, slot) => Ok((principal, slot)),
        Admission::AwaitAuthFrame => auth_frame(&shared, &mut ws).await,
    };
    let close = match authed {
        Ok((principal, slot)) => {
            Span::current().record("actor", principal.actor.as_str());
            let now = Instant::now();
            let groups = match &principal.scope {
                Scope::All => None,
                Scope::Groups(g) => Some(g.iter().cloned().collect()),
            };
            let subscriber = access
                .bridge
                .subscriber(shared.config.app.queue_bytes, MAX_QUEUED_MESSAGES);
            let expires_at = principal_expiry(&shared, &principal);
            let mut session = MqttSession {
                shared: shared.clone(),
                access,
                principal,
                groups,
                subscriber,
                subs: HashMap::new(),
                last_activity: now,
                next_ping: now + shared.config.heartbeat,
                expires_at,
                _slot: slot,
            };
            shared.metrics.mqtt_sessions.inc();
            let close = session
                .serve(&mut ws)
                .await
                .err()
                .unwrap_or_else(|| Close::new(CloseCode::Normal, "bye"));
            shared
                .metrics
                .mqtt_subscriptions
                .dec_by(session.subs.len() as i64);
            shared.metrics.mqtt_sessions.dec();
            // Dropping the subscriber releases its filters on the bridge.
            drop(session);
            close
        }
        Err(close) => close,
    };
    finish(&shared, &mut ws, close).await;
}

enum Event {
    Socket(Option<Result<Message, axum::Error>>),
    Queue(Result<Vec<Delivery>, Closed>),
    Timer,
    Drain,
}

fn error(id: Option<String>, topic: &str, code: MqttErrorCode, message: &str) -> MqttReply {
    MqttReply::error(id, Some(topic.to_owned()), code, message)
}

impl MqttSession {
    /// The loop; returns the close to send.
    async fn serve(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        let (idle_timeout, heartbeat, drain_period) = {
            let c = &self.shared.config;
            (c.idle_timeout, c.heartbeat, c.drain_period)
        };
        let drain = self.shared.app.drain.clone();
        loop {
            let wake = no_later_than_expiry(
                self.next_ping.min(self.last_activity + idle_timeout),
                self.expires_at,
            );
            let event = tokio::select! {
                biased;
                () = drain.cancelled() => Event::Drain,
                msg = ws.recv() => Event::Socket(msg),
                items = self.subscriber.recv() => Event::Queue(items),
                () = tokio::time::sleep_until(wake) => Event::Timer,
            };
            match event {
                Event::Drain => {
                    let retry = rand::random_range(0..=drain_period.as_millis().max(1) as u64);
                    return Err(Close::new(
                        CloseCode::Draining,
                        retry_after_reason("node draining", retry),
                    ));
                }
                Event::Socket(None | Some(Err(_))) => {
                    return Err(Close::new(CloseCode::GoingAway, "socket closed"));
                }
                Event::Socket(Some(Ok(msg))) => {
                    self.last_activity = Instant::now();
                    match msg {
                        Message::Text(t) => self.on_request(ws, t.as_bytes()).await?,
                        Message::Binary(_) => {
                            return Err(Close::new(
                                CloseCode::ProtocolError,
                                "mqtt frames are JSON text",
                            ));
                        }
                        Message::Close(_) => return Ok(()),
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                Event::Queue(Err(Closed::Overflowed)) => {
                    self.shared.metrics.mqtt_overflows.inc();
                    return Err(Close::new(
                        CloseCode::SlowConsumer,
                        "slow consumer: queue full",
                    ));
                }
                Event::Queue(Err(Closed::Stopped)) => {
                    return Err(Close::new(
                        CloseCode::TryAgainLater,
                        retry_after_reason("MQTT bridge stopped", rand::random_range(500..5000)),
                    ));
                }
                Event::Queue(Ok(items)) => self.deliver(ws, items).await?,
                Event::Timer => {
                    let now = Instant::now();
                    expired(self.expires_at, now)?;
                    if now >= self.last_activity + idle_timeout {
                        return Err(Close::new(
                            CloseCode::HeartbeatTimeout,
                            "no frame or pong within the idle timeout",
                        ));
                    }
                    if now >= self.next_ping {
                        self.next_ping = now + heartbeat;
                        write(&self.shared, ws, Message::Ping(Bytes::new())).await?;
                    }
                }
            }
        }
    }

    /// Writes queued messages in one flush; each frame is encoded once per message, shared
    /// with every other session that receives it.
    async fn deliver(&mut self, ws: &mut WebSocket, items: Vec<Delivery>) -> Result<(), Close> {
        let timeout = self.shared.config.write_timeout;
        let slow = || Close::new(CloseCode::SlowConsumer, "slow consumer: write timed out");
        let mut n = 0u64;
        for item in items {
            let frame =
                item.encoded(|m| Bytes::from(encode_mqtt(m.topic.as_str(), &m.payload, m.retain)));
            let Ok(text) = Utf8Bytes::try_from(frame) else {
                continue;
            };
            match tokio::time::timeout(timeout, ws.feed(Message::Text(text))).await {
                Ok(Ok(())) => n += 1,
                Ok(Err(_)) => return Err(Close::new(CloseCode::GoingAway, "socket closed")),
                Err(_) => return Err(slow()),
            }
        }
        match tokio::time::timeout(timeout, ws.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Close::new(CloseCode::GoingAway, "socket closed")),
            Err(_) => return Err(slow()),
        }
        self.shared.metrics.mqtt_frames_delivered.inc_by(n);
        Ok(())
    }

    fn subject(&self) -> AclSubject<'_> {
        AclSubject {
            principal: &self.principal.actor,
            groups: match &self.groups {
                None => Groups::All,
                Some(g) => Groups::Some(g),
            },
        }
    }

    async fn answer(&self, ws: &mut WebSocket, reply: MqttReply) -> Result<(), Close> {
        send_text(&self.shared, ws, reply.encode()).await
    }

    async fn on_request(&mut self, ws: &mut WebSocket, text: &[u8]) -> Result<(), Close> {
        let request = match decode_request(text) {
            Ok(r) => r,
            Err(message) => {
                let reply = MqttReply::error(None, None, MqttErrorCode::BadRequest, message);
                return self.answer(ws, reply).await;
            }
        };
        let reply = match request {
            MqttRequest::Auth { .. } => MqttReply::error(
                None,
                None,
                MqttErrorCode::BadRequest,
                "already authenticated",
            ),
            MqttRequest::Subscribe { topic, id } => self.subscribe(topic, id).await?,
            MqttRequest::Unsubscribe { topic, id } => match self.subs.remove(&topic) {
                Some(filter) => {
                    self.subscriber.unsubscribe(&filter);
                    self.shared.metrics.mqtt_subscriptions.dec();
                    MqttReply::Unsubscribed { topic, id }
                }
                None => error(id, &topic, MqttErrorCode::BadRequest, "not subscribed"),
            },
            MqttRequest::Publish {
                topic,
                payload,
                qos,
                retain,
                id,
            } => {
                let qos = if qos == Some(1) {
                    Qos::AtLeastOnce
                } else {
                    Qos::AtMostOnce
                };
                let bytes = Bytes::from(payload_bytes(&payload));
                self.publish(topic, id, bytes, qos, retain.unwrap_or(false))
                    .await
            }
        };
        self.answer(ws, reply).await
    }

    /// Checks and holds a filter; the answer to send, or a close when the session was
    /// dropped meanwhile.
    async fn subscribe(&mut self, topic: String, id: Option<String>) -> Result<MqttReply, Close> {
        let filter = match TopicFilter::new(topic.as_str()) {
            Ok(f) => f,
            Err(e) => return Ok(error(id, &topic, MqttErrorCode::BadRequest, &e.to_string())),
        };
        if self.subs.contains_key(&topic) {
            return Ok(MqttReply::Subscribed { topic, id });
        }
        if self.subs.len() >= self.shared.config.app.max_subscriptions {
            return Ok(error(
                id,
                &topic,
                MqttErrorCode::TooManySubscriptions,
                "the connection holds the most subscriptions allowed",
            ));
        }
        if !self.access.acl.may_subscribe(&self.subject(), &filter) {
            return Ok(error(
                id,
                &topic,
                MqttErrorCode::Forbidden,
                "the topic ACLs do not allow this filter",
            ));
        }
        match self.subscriber.subscribe(&filter).await {
            Ok(()) => {
                self.subs.insert(topic.clone(), filter);
                self.shared.metrics.mqtt_subscriptions.inc();
                Ok(MqttReply::Subscribed { topic, id })
            }
            Err(MqttError::Refused) => Ok(error(
                id,
                &topic,
                MqttErrorCode::Forbidden,
                "the MQTT broker refused the subscription",
            )),
            Err(MqttError::Closed(_)) => Err(Close::new(
                CloseCode::SlowConsumer,
                "slow consumer: queue full",
            )),
            Err(_) => Ok(error(
                id,
                &topic,
                MqttErrorCode::Unavailable,
                "the MQTT broker did not answer; retry",
            )),
        }
    }

    async fn publish(
        &self,
        topic: String,
        id: Option<String>,
        payload: Bytes,
        qos: Qos,
        retain: bool,
    ) -> MqttReply {
        let name = match Topic::new(topic.as_str()) {
            Ok(t) => t,
            Err(e) => return error(id, &topic, MqttErrorCode::BadRequest, &e.to_string()),
        };
        if !self.access.acl.may_publish(&self.subject(), &name) {
            return error(
                id,
                &topic,
                MqttErrorCode::Forbidden,
                "the topic ACLs do not allow publishing here",
            );
        }
        match self
            .access
            .bridge
            .publish(&name, payload, qos, retain)
            .await
        {
            Ok(()) => {
                self.shared.metrics.mqtt_published.inc();
                MqttReply::Published { topic, id }
            }
            Err(MqttError::TooLarge(_)) => {
                error(id, &topic, MqttErrorCode::BadRequest, "payload too large")
            }
            Err(_) => error(
                id,
                &topic,
                MqttErrorCode::Unavailable,
                "the MQTT broker is unavailable; retry",
            ),
        }
    }
}
