//! MQTT devices: devices provisioned with `"transport": "mqtt"` publish on
//! `devices/<id>/status`, `devices/<id>/events` and `devices/<id>/acks`, and get commands and
//! every answer (ack, rec, rel, comp, error, delta) on `devices/<id>/commands`.
//!
//! A device is held by one node at a time, as a WebSocket device is: that node runs a
//! [`Session`] for it (replay window, rate limit, QoS answers, alert state, command window,
//! retransmits) whose socket is the broker, and presence names that node, so commands reach
//! it the usual way. Every node with a broker takes the three filters as one shared
//! subscription (`$share/fleetgate/...`), so the broker hands each message to one node: the
//! node that holds the device handles it, a node that does not passes it on over the bus (one
//! node message), and a device nobody holds is claimed by the node its message reached. The
//! holder lets go after `device_idle` without a message (the device reads as offline).
//!
//! Identity is the broker's: whoever may publish on `devices/<id>/...` is device `<id>`, so
//! the broker's ACL must tie those topics to the device's credentials. Only provisioned,
//! unrevoked devices marked `mqtt` are read; messages for anyone else are counted and dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_bus::{NodeMessage, Transport};
use fleetgate_mqtt::{Closed, Delivery, Qos as MqttQos, Subscriber, Topic, TopicFilter};
use fleetgate_protocol::{
    CloseCode, Codec, Compact, CompactItem, Envelope, ErrorCode, Frame, MsgId, Qos,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::MqttAccess;
use crate::auth::AuthedDevice;
use crate::metrics::OutcomeLabel;
use crate::outbox::Outbox;
use crate::registry::{Offer, Outbound};
use crate::session::{Close, Session, insert_local, register_claimed};
use crate::{Shared, now_ms};

/// The shared-subscription group every node joins: the broker gives each message to one.
const SHARE_GROUP: &str = "fleetgate";
/// Broker messages the ingest subscriber may hold before the bridge drops it (it then
/// subscribes again; what overflowed is lost and counted).
const INGEST_QUEUE_MESSAGES: usize = 50_000;
const INGEST_QUEUE_BYTES: usize = 64 << 20;
/// Messages passed on by other nodes waiting for the router.
const FORWARDED_QUEUE: usize = 10_000;
/// How long a device record and a "held by node X" answer are trusted. A revoked or
/// regrouped device is read again within this; a device that moved is found again through
/// the node it was passed to.
const RECORD_TTL: Duration = Duration::from_secs(10);
const HOLDER_TTL: Duration = Duration::from_secs(2);
/// Entries each cache keeps at most; past it, it starts over (bounded memory, no LRU needed
/// for a cache whose entries live seconds).
const CACHE_ENTRIES: usize = 100_000;

/// Which device topic a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceTopic {
    Status,
    Events,
    Acks,
}

impl DeviceTopic {
    const ALL: [DeviceTopic; 3] = [Self::Status, Self::Events, Self::Acks];

    fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Events => "events",
            Self::Acks => "acks",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A message an MQTT device published.
#[derive(Debug)]
pub(crate) struct Inbound {
    topic: DeviceTopic,
    payload: Bytes,
}

/// `devices/<id>/<kind>` split, if it is one of ours.
fn parse_topic(topic: &str) -> Option<(&str, DeviceTopic)> {
    let mut levels = topic.split('/');
    match (levels.next(), levels.next(), levels.next(), levels.next()) {
        (Some("devices"), Some(id), Some(kind), None) if !id.is_empty() => {
            Some((id, DeviceTopic::parse(kind)?))
        }
        _ => None,
    }
}

/// The topic a device reads everything fleetgate sends it on.
fn commands_topic(device: &str) -> Option<Topic> {
    Topic::new(format!("devices/{device}/commands")).ok()
}

/// A message for the router that did not come from the broker subscription.
pub(crate) struct Forwarded {
    device: String,
    inbound: Inbound,
    /// Passed on by another node (presence named this one), or left in the outbox of a
    /// session of this node that ended (it is routed afresh).
    passed_on: bool,
}

/// Hands a message passed on by another node to this node's router (never waits: a full
/// router queue drops it, counted).
pub(crate) fn forwarded(shared: &Shared, device: String, kind: &str, payload: String) {
    let Some(topic) = DeviceTopic::parse(kind) else {
        return;
    };
    let msg = Forwarded {
        device,
        inbound: Inbound {
            topic,
            payload: Bytes::from(payload),
        },
        passed_on: true,
    };
    to_router(shared, msg);
}

fn to_router(shared: &Shared, msg: Forwarded) {
    let sent = shared
        .mqtt_forwarded
        .get()
        .is_some_and(|tx| tx.try_send(msg).is_ok());
    if !sent {
        count(shared, "dropped");
    }
}

fn count(shared: &Shared, outcome: &'static str) {
    shared
        .metrics
        .mqtt_device_messages
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

/// What the router knows of a device: its groups if it is a live MQTT device.
type Known = Option<Arc<Vec<String>>>;

/// A small expiring map (see [`CACHE_ENTRIES`]).
struct Cache<V> {
    ttl: Duration,
    map: HashMap<String, (Instant, V)>,
}

impl<V: Clone> Cache<V> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: HashMap::new(),
        }
    }

    fn get(&self, key: &str) -> Option<V> {
        self.map
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    fn put(&mut self, key: &str, value: V) {
        if self.map.len() >= CACHE_ENTRIES {
            self.map.clear();
        }
        self.map.insert(key.to_owned(), (Instant::now(), value));
    }

    fn forget(&mut self, key: &str) {
        self.map.remove(key);
    }
}

/// The node's one router of MQTT device messages. Serial on purpose: a device's messages
/// are claimed and handed over in the order they come, and a node never claims one device
/// twice.
struct Router {
    shared: Arc<Shared>,
    access: MqttAccess,
    records: Cache<Known>,
    holders: Cache<String>,
}

/// Starts the router if the node has a broker. Call once, before the node serves.
pub(crate) fn start(shared: &Arc<Shared>, stop: CancellationToken) {
    let Some(access) = shared.mqtt.get().cloned() else {
        return;
    };
    let (tx, rx) = mpsc::channel(FORWARDED_QUEUE);
    if shared.mqtt_forwarded.set(tx).is_err() {
        return;
    }
    let router = Router {
        shared: shared.clone(),
        access,
        records: Cache::new(RECORD_TTL),
        holders: Cache::new(HOLDER_TTL),
    };
    tokio::spawn(router.run(rx, stop));
}

impl Router {
    async fn subscribe(&self) -> Subscriber {
        let sub = self
            .access
            .bridge
            .subscriber(INGEST_QUEUE_BYTES, INGEST_QUEUE_MESSAGES);
        for topic in DeviceTopic::ALL {
            let text = format!("$share/{SHARE_GROUP}/devices/+/{}", topic.as_str());
            let filter = TopicFilter::new(text).expect("a valid filter");
            // While the broker is away the bridge keeps the filter and subscribes on
            // reconnect; a refusal (the broker's ACL) is the operator's to fix.
            if let Err(error) = sub.subscribe(&filter).await {
                warn!(message = "could not subscribe to MQTT device topics", filter = filter.as_str(), %error);
            }
        }
        sub
    }

    async fn run(mut self, mut forwarded: mpsc::Receiver<Forwarded>, stop: CancellationToken) {
        let mut sub = Some(self.subscribe().await);
        let drain = self.shared.app.drain.clone();
        loop {
            let from_broker = async {
                match &sub {
                    Some(sub) => sub.recv().await,
                    None => std::future::pending().await,
                }
            };
            let batch = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                // Draining: leave the shared subscription so the broker gives the devices'
                // messages to the other nodes; what is passed on here is still routed.
                () = drain.cancelled(), if sub.is_some() => {
                    sub = None;
                    continue;
                }
                f = forwarded.recv() => match f {
                    Some(f) => {
                        self.on_forwarded(f).await;
                        continue;
                    }
                    None => return,
                },
                batch = from_broker => batch,
            };
            match batch {
                Ok(batch) => {
                    for msg in batch {
                        self.on_broker_message(&msg).await;
                    }
                }
                Err(Closed::Stopped) => return,
                Err(Closed::Overflowed) => {
                    count(&self.shared, "overflowed");
                    warn!(message = "MQTT device ingest fell behind; subscribing again");
                    // The new subscriber takes the filters before the old one lets go, so
                    // the broker subscription stays.
                    sub = Some(self.subscribe().await);
                }
            }
        }
    }

    async fn on_broker_message(&mut self, msg: &Delivery) {
        let Some((device, topic)) = parse_topic(msg.topic.as_str()) else {
            count(&self.shared, "bad_topic");
            return;
        };
        if msg.retain {
            // A retained message replayed because this node subscribed is old state, not a
            // new message: ingesting it would report it again on every node start.
            count(&self.shared, "retained");
            return;
        }
        let inbound = Inbound {
            topic,
            payload: msg.payload.clone(),
        };
        self.route(device, inbound, false).await;
    }

    async fn on_forwarded(&mut self, f: Forwarded) {
        self.route(&f.device, f.inbound, f.passed_on).await;
    }

    /// To the session here, else to the node that holds the device, else to a new session
    /// here. A message another node passed on (presence named this one) is handled here
    /// whatever this node's caches say: a message is passed on once at most.
    async fn route(&mut self, device: &str, inbound: Inbound, passed_on: bool) {
        let Some(inbound) = self.offer_local(device, inbound) else {
            return;
        };
        let Some(groups) = self.known(device).await else {
            return;
        };
        let draining = self
            .shared
            .draining
            .load(std::sync::atomic::Ordering::Relaxed);
        if (!passed_on || draining)
            && let Some(node) = self.holder(device).await
        {
            self.pass_on(device, &node, inbound).await;
            return;
        }
        if draining {
            // Nobody else holds it yet: the device's next message, at another node, will.
            count(&self.shared, "dropped");
            return;
        }
        self.claim(device, &groups, inbound);
    }

    /// Gives the message to the device's session here, if there is one; hands it back if
    /// there is none.
    fn offer_local(&self, device: &str, inbound: Inbound) -> Option<Inbound> {
        // The offer consumes the message; an absent session is rare once a device is held,
        // so the payload (`Bytes`, shared) is cloned rather than threaded back.
        let copy = Inbound {
            topic: inbound.topic,
            payload: inbound.payload.clone(),
        };
        match self
            .shared
            .sessions
            .offer(device, None, Outbound::Mqtt(Box::new(inbound)))
        {
            Offer::Sent => {
                count(&self.shared, "handled");
                None
            }
            Offer::Dropped => {
                self.shared.metrics.outbox_dropped.inc();
                count(&self.shared, "dropped");
                None
            }
            Offer::NoSession => Some(copy),
        }
    }

    /// The device's groups if it is a provisioned, unrevoked MQTT device.
    async fn known(&mut self, device: &str) -> Known {
        let known = match self.records.get(device) {
            Some(known) => known,
            None => {
                let known = match self.shared.bus.device_get(device).await {
                    Ok(Some(r)) if !r.revoked && r.transport == Transport::Mqtt => {
                        Some(Arc::new(r.groups))
                    }
                    Ok(_) => None,
                    Err(error) => {
                        self.shared.metrics.bus_errors.inc();
                        warn!(message = "could not read an MQTT device's record", %error);
                        count(&self.shared, "dropped");
                        return None;
                    }
                };
                self.records.put(device, known.clone());
                known
            }
        };
        if known.is_none() {
            debug!(message = "message on the topics of no MQTT device", device);
            count(&self.shared, "unknown_device");
        }
        known
    }

    /// The live node other than this one that holds `device`, if any.
    async fn holder(&mut self, device: &str) -> Option<String> {
        if let Some(node) = self.holders.get(device) {
            return Some(node);
        }
        match self.shared.bus.presence_get(device).await {
            Ok(Some(p)) if p.node != self.shared.config.node_id => {
                self.holders.put(device, p.node.clone());
                Some(p.node)
            }
            Ok(_) => None,
            Err(error) => {
                // Claiming here is the answer that loses nothing: the worst case replaces
                // the holder elsewhere (4409), which the next message repairs.
                self.shared.metrics.bus_errors.inc();
                warn!(message = "could not read an MQTT device's presence", %error);
                None
            }
        }
    }

    async fn pass_on(&mut self, device: &str, node: &str, inbound: Inbound) {
        let Ok(payload) = String::from_utf8(inbound.payload.to_vec()) else {
            // Not JSON in any case: answered by whoever holds the device would say the same.
            let refusal = malformed("payload is not UTF-8");
            reply(&self.access, device, &[error_frame(refusal)]).await;
            count(&self.shared, "rejected");
            return;
        };
        let msg = NodeMessage::MqttInbound {
            device: device.to_owned(),
            kind: inbound.topic.as_str().to_owned(),
            payload,
        };
        match self.shared.bus.node_publish(node, &msg).await {
            Ok(()) => count(&self.shared, "passed_on"),
            Err(error) => {
                self.shared.metrics.bus_errors.inc();
                self.holders.forget(device);
                count(&self.shared, "dropped");
                warn!(message = "could not pass an MQTT device message on", %error);
            }
        }
    }

    /// Starts holding `device` here with `inbound` as its first message. The session is in
    /// the local registry before this returns, so the device's next message finds it.
    fn claim(&mut self, device: &str, groups: &Arc<Vec<String>>, inbound: Inbound) {
        let shared = &self.shared;
        let Ok(permit) = shared.sessions_capacity.clone().try_acquire_owned() else {
            shared.metrics.connections_rejected.inc();
            count(shared, "dropped");
            return;
        };
        let conn_id: u64 = rand::random();
        let outbox = Arc::new(Outbox::new(shared.config.outbox_capacity));
        if outbox.try_push(Outbound::Mqtt(Box::new(inbound))).is_err() {
            return;
        }
        insert_local(shared, device, conn_id, outbox.clone());
        self.holders.forget(device);
        count(shared, "claimed");
        let device = AuthedDevice {
            id: device.to_owned(),
            groups: groups.as_ref().clone(),
            expires_at_ms: None,
            mac_key: None,
        };
        let span = info_span!("mqtt_device", device_id = %device.id, conn_id, node_id = %shared.config.node_id);
        let holder = Holder {
            shared: shared.clone(),
            access: self.access.clone(),
        };
        shared.tracker.spawn(
            async move {
                holder.hold(device, conn_id, permit, outbox).await;
            }
            .instrument(span),
        );
    }
}

/// The task of one held MQTT device.
struct Holder {
    shared: Arc<Shared>,
    access: MqttAccess,
}

impl Holder {
    async fn hold(
        self,
        device: AuthedDevice,
        conn_id: u64,
        permit: tokio::sync::OwnedSemaphorePermit,
        outbox: Arc<Outbox<Outbound>>,
    ) {
        let id = device.id.clone();
        self.shared.metrics.auth_success.inc();
        let mut session = match Box::pin(register_claimed(
            &self.shared,
            device,
            conn_id,
            Codec::Json,
            permit,
        ))
        .await
        {
            Ok(session) => session,
            Err(close) => {
                debug!(message = "could not hold an MQTT device", reason = %close.reason);
                self.shared.sessions.remove(&id, conn_id);
                outbox.close();
                return;
            }
        };
        self.shared.metrics.mqtt_devices_held.inc();
        let close = self.serve(&mut session, &outbox).await;
        debug!(message = "no longer holding an MQTT device", code = close.code.as_u16(), reason = %close.reason);
        outbox.close();
        let rest = outbox.take_rest();
        self.shared.metrics.mqtt_devices_held.dec();
        Box::pin(session.unregister()).await;
        // Messages that arrived after the close (a takeover, the idle deadline): routed
        // again, now that presence says who holds the device, rather than lost.
        for out in rest {
            if let Outbound::Mqtt(inbound) = out {
                let msg = Forwarded {
                    device: id.clone(),
                    inbound: *inbound,
                    passed_on: false,
                };
                to_router(&self.shared, msg);
            }
        }
    }

    /// The session loop: messages from the broker and from the node, and one timer (idle
    /// deadline, retransmits). Ends when the device idles, is taken over or the node drains.
    async fn serve(&self, session: &mut Session, outbox: &Outbox<Outbound>) -> Close {
        let idle = self.access.device_idle;
        // A device that appears gets what a connecting one gets: its delta, then its queue.
        let mut frames: Vec<Frame> = session.pending_delta().await.into_iter().collect();
        frames.extend(session.outgoing.fill(&self.shared, &session.device).await);
        reply(&self.access, &session.device, &frames).await;
        let mut last_message = Instant::now();
        loop {
            let mut wake = last_message + idle;
            if let Some(retry) = session.outgoing.next_deadline() {
                wake = wake.min(retry);
            }
            let out = tokio::select! {
                biased;
                out = outbox.recv() => out,
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if now >= last_message + idle {
                        return Close::new(CloseCode::HeartbeatTimeout, "no message within device_idle");
                    }
                    let frames = session.outgoing.on_timer(&self.shared, &session.device, now).await;
                    reply(&self.access, &session.device, &frames).await;
                    continue;
                }
            };
            let frames = match out {
                None => return Close::new(CloseCode::TryAgainLater, "outbox closed"),
                Some(Outbound::Mqtt(inbound)) => {
                    last_message = Instant::now();
                    Box::pin(inbound_frames(session, *inbound)).await
                }
                Some(out) => match Box::pin(session.outbound_frames(out)).await {
                    Ok(frames) => frames,
                    Err(close) => return close,
                },
            };
            reply(&self.access, &session.device, &frames).await;
        }
    }
}

/// Publishes frames on the device's commands topic: commands with QoS 1 or 2 at MQTT QoS 1
/// (the bridge's highest; fleetgate's own rec/rel/comp make QoS 2 exactly once on top),
/// everything else at QoS 0 (a lost answer is retransmitted by whoever waits for it).
async fn reply(access: &MqttAccess, device: &str, frames: &[Frame]) {
    let Some(topic) = commands_topic(device) else {
        return;
    };
    for frame in frames {
        let qos = match frame {
            Frame::Message(env) if env.qos != Qos::AtMostOnce => MqttQos::AtLeastOnce,
            _ => MqttQos::AtMostOnce,
        };
        let bytes = Codec::Json.encode(frame);
        if let Err(error) = access.bridge.publish(&topic, bytes, qos, false).await {
            // Commands stay queued and are retransmitted; answers are asked for again.
            warn!(message = "could not publish to an MQTT device", %error);
        }
    }
}

/// Why a broker message is refused: the `error` frame's code and message.
type Refusal = (ErrorCode, String);

fn malformed(message: &str) -> Refusal {
    (ErrorCode::Malformed, message.to_owned())
}

fn error_frame((code, message): Refusal) -> Frame {
    Session::error_frame(None, code, message)
}

/// What the session makes of one broker message. A device on a broker cannot be
/// disconnected by us: what would close a WebSocket (a malformed frame, the rate limit) is
/// answered with an `error` frame and the message dropped.
async fn inbound_frames(session: &mut Session, inbound: Inbound) -> Vec<Frame> {
    let frame = match decode(&session.device, &inbound) {
        Ok(frame) => frame,
        Err(refusal) => {
            session.shared.metrics.messages_rejected.inc();
            return vec![error_frame(refusal)];
        }
    };
    match session.on_frame(frame).await {
        Ok(replies) => replies,
        Err(close) => {
            let code = match close.code {
                CloseCode::RateLimited => ErrorCode::Unavailable,
                _ => ErrorCode::Malformed,
            };
            vec![error_frame((code, close.reason))]
        }
    }
}

/// The frame a broker message carries: on `status`/`events` a JSON envelope (or compact
/// frame), or a plain JSON object taken as the payload of a QoS 0 status or event; on `acks`
/// an `ack`/`rec`/`rel`/`comp` frame.
fn decode(device: &str, inbound: &Inbound) -> Result<Frame, Refusal> {
    let decoded = Codec::Json.decode(&inbound.payload);
    match (inbound.topic, decoded) {
        (DeviceTopic::Acks, Ok(f @ Frame::Handshake(_))) => Ok(f),
        (DeviceTopic::Acks, Ok(_)) => Err((
            ErrorCode::UnsupportedType,
            "devices/<id>/acks carries ack, rec, rel or comp frames".to_owned(),
        )),
        (DeviceTopic::Acks, Err(error)) => Err(malformed(&error.to_string())),
        (_, Ok(f @ (Frame::Message(_) | Frame::Compact(_)))) => Ok(f),
        (_, Ok(_)) => Err((
            ErrorCode::UnsupportedType,
            "status and events topics carry messages; answers go on devices/<id>/acks".to_owned(),
        )),
        (topic, Err(_)) => match serde_json::from_slice::<Value>(&inbound.payload) {
            Ok(payload @ Value::Object(_)) => Ok(Frame::Message(wrap(device, topic, payload))),
            _ => Err(malformed(
                "payload must be a JSON envelope or a JSON object",
            )),
        },
    }
}

/// The envelope of a plain object published on `status` or `events`: what a compact frame
/// of the WebSocket protocol makes (QoS 0, timestamp and msgid assigned on arrival).
fn wrap(device: &str, topic: DeviceTopic, payload: Value) -> Envelope {
    let item = CompactItem {
        device_id: device.to_owned(),
        timestamp: None,
        data: payload,
    };
    let compact = match topic {
        DeviceTopic::Events => Compact::Event(item),
        _ => Compact::Status(item),
    };
    let msgid = MsgId::new(format!("m{:x}", rand::random::<u64>())).expect("a valid msgid");
    compact.into_envelope(msgid, now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_protocol::MessageKind;
    use serde_json::json;

    fn inbound(topic: DeviceTopic, payload: &str) -> Inbound {
        Inbound {
            topic,
            payload: Bytes::from(payload.to_owned()),
        }
    }

    #[test]
    fn device_topics_parse_and_others_do_not() {
        assert_eq!(
            parse_topic("devices/pump-1/status"),
            Some(("pump-1", DeviceTopic::Status))
        );
        assert_eq!(
            parse_topic("devices/pump-1/acks"),
            Some(("pump-1", DeviceTopic::Acks))
        );
        for t in [
            "devices/pump-1/commands",
            "devices//status",
            "devices/pump-1/status/x",
            "farm/pump-1/status",
        ] {
            assert_eq!(parse_topic(t), None, "{t}");
        }
    }

    #[test]
    fn plain_objects_become_qos0_messages_of_the_topic_kind() {
        let Ok(Frame::Message(env)) = decode("d1", &inbound(DeviceTopic::Events, r#"{"x":1}"#))
        else {
            panic!("an event")
        };
        assert_eq!(
            (env.kind, env.qos, env.from.as_str(), env.payload),
            (MessageKind::Event, Qos::AtMostOnce, "d1", json!({"x":1}))
        );
    }

    #[test]
    fn envelopes_pass_as_they_are_and_wrong_frames_are_refused() {
        let env = r#"{"ver":"1.0","type":"status","msgid":"m-1","timestamp":1,"from":"d1","to":"server","payload":{"t":1},"qos":1}"#;
        match decode("d1", &inbound(DeviceTopic::Status, env)) {
            Ok(Frame::Message(e)) => {
                assert_eq!((e.msgid.as_str(), e.qos), ("m-1", Qos::AtLeastOnce))
            }
            other => panic!("{other:?}"),
        }
        let ack = r#"{"type":"ack","msgid":"c-1"}"#;
        assert!(matches!(
            decode("d1", &inbound(DeviceTopic::Acks, ack)),
            Ok(Frame::Handshake(_))
        ));
        let refused = |topic, payload| match decode("d1", &inbound(topic, payload)) {
            Err((code, _)) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(DeviceTopic::Status, ack),
            ErrorCode::UnsupportedType
        );
        assert_eq!(refused(DeviceTopic::Acks, env), ErrorCode::UnsupportedType);
        assert_eq!(refused(DeviceTopic::Acks, "{}"), ErrorCode::Malformed);
        assert_eq!(refused(DeviceTopic::Status, "[1,2]"), ErrorCode::Malformed);
        assert_eq!(
            refused(DeviceTopic::Status, "not json"),
            ErrorCode::Malformed
        );
    }
}
