//! The MQTT side of a fleetgate node: topic names and filters ([`topic`]), per-principal
//! topic ACLs ([`acl`]), and [`Bridge`], the node's one shared MQTT client.
//!
//! Every consumer of broker messages on a node (each `/v1/mqtt` WebSocket session, and the
//! router of MQTT devices) is a [`Subscriber`] of the same bridge: filters are reference
//! counted across them, so the broker sees one SUBSCRIBE per filter per node however many
//! sessions share it, and incoming PUBLISHes are routed locally. This crate knows nothing of
//! the gateway or of WebSockets.

pub mod acl;
mod bridge;
mod inbox;
pub mod topic;

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

pub use acl::{
    AclPattern, AclSubject, DEFAULT_PUBLISH_ACL, DEFAULT_SUBSCRIBE_ACL, Groups, TopicAcl,
};
pub use bridge::{Bridge, BridgeConfig, BrokerAddr, Stats, Subscriber};
pub use inbox::Closed;
pub use topic::{MAX_TOPIC_BYTES, Topic, TopicFilter};

/// Errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    /// A topic name or filter breaks the MQTT rules.
    #[error("invalid topic: {0}")]
    InvalidTopic(&'static str),
    /// An ACL pattern is malformed.
    #[error("invalid ACL pattern {0}")]
    InvalidAcl(String),
    /// The broker URL cannot be used.
    #[error("invalid MQTT URL: {0}")]
    InvalidUrl(String),
    /// The broker is not connected, or did not answer in time.
    #[error("the MQTT broker is unavailable")]
    Unavailable,
    /// The broker refused a subscription (its own ACL).
    #[error("the MQTT broker refused the subscription")]
    Refused,
    /// The payload is larger than the bridge's packet limit.
    #[error("payload larger than {0} bytes")]
    TooLarge(usize),
    /// The subscriber was dropped (its queue overflowed) or the bridge stopped.
    #[error("subscriber closed: {0:?}")]
    Closed(Closed),
}

/// Delivery guarantee towards the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Qos {
    /// At most once: answered once handed to the connection.
    #[default]
    AtMostOnce,
    /// At least once: answered when the broker's PUBACK arrives.
    AtLeastOnce,
}

/// A message from the broker, shared by every subscriber it is routed to.
#[derive(Debug)]
pub struct Message {
    /// Its topic.
    pub topic: Topic,
    /// Its payload, as the broker sent it.
    pub payload: Bytes,
    /// Whether the broker sent it as a retained message (on subscribing).
    pub retain: bool,
    encoded: OnceLock<Bytes>,
}

impl Message {
    /// A message (the router builds these; tests too).
    pub fn new(topic: Topic, payload: Bytes, retain: bool) -> Self {
        Self {
            topic,
            payload,
            retain,
            encoded: OnceLock::new(),
        }
    }

    /// An encoding of the message shared by every consumer: the first caller computes it
    /// with `encode`, the rest get the same bytes (a frame is built once per message, not
    /// once per session). Consumers of one bridge must agree on one encoding.
    pub fn encoded(&self, encode: impl FnOnce(&Message) -> Bytes) -> Bytes {
        self.encoded.get_or_init(|| encode(self)).clone()
    }

    /// What it costs a queue: payload, topic and a fixed overhead (an encoded frame is
    /// about the same size).
    pub fn size(&self) -> usize {
        self.payload.len() + self.topic.as_str().len() + 64
    }
}

/// A routed message as a subscriber receives it.
pub type Delivery = Arc<Message>;
