//! fleetgate wire protocol v1: typed frames, the JSON and Protobuf codecs, validation and
//! close codes. This crate does no I/O; the gateway and the device SDK both build on it.
//!
//! Only this crate knows the wire shape: everything past [`Codec::decode`] works on
//! [`Frame`] values.

pub mod app;
mod close;
mod error;
mod frame;
pub mod json;
pub mod mac;
pub mod mqtt;
pub mod proto;
mod validate;

pub use close::{CloseCode, MAX_CLOSE_REASON, close_reason, parse_retry_after, retry_after_reason};
pub use error::ProtocolError;
pub use frame::{
    Auth, AuthResponse, Compact, CompactItem, Envelope, ErrorCode, ErrorFrame, Frame, Handshake,
    HandshakeKind, MessageKind, MsgId, PROTOCOL_VERSION, Qos,
};
pub use mac::{MacError, MacKey, Signature};
pub use validate::{Limits, ReplayWindow, batch_items, check_from_device};

/// WebSocket subprotocol for JSON text frames (the default).
pub const SUBPROTOCOL_JSON: &str = "fleetgate.v1.json";
/// WebSocket subprotocol for Protobuf binary frames.
pub const SUBPROTOCOL_PROTO: &str = "fleetgate.v1.proto";

/// The two encodings of protocol v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// JSON text frames (`fleetgate.v1.json`).
    #[default]
    Json,
    /// Protobuf binary frames (`fleetgate.v1.proto`).
    Protobuf,
}

impl Codec {
    /// The codec for a WebSocket subprotocol name.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name {
            SUBPROTOCOL_JSON => Some(Self::Json),
            SUBPROTOCOL_PROTO => Some(Self::Protobuf),
            _ => None,
        }
    }

    /// The WebSocket subprotocol name.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::Json => SUBPROTOCOL_JSON,
            Self::Protobuf => SUBPROTOCOL_PROTO,
        }
    }

    /// Decodes one frame.
    ///
    /// # Errors
    /// Any [`ProtocolError`] describing what is wrong with the bytes; never panics.
    pub fn decode(self, bytes: &[u8]) -> Result<Frame, ProtocolError> {
        match self {
            Self::Json => json::decode(bytes),
            Self::Protobuf => proto::decode(bytes),
        }
    }

    /// Encodes one frame.
    pub fn encode(self, frame: &Frame) -> bytes::Bytes {
        match self {
            Self::Json => json::encode(frame).into(),
            Self::Protobuf => proto::encode(frame).into(),
        }
    }
}
