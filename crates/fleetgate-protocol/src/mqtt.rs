//! The `/v1/mqtt` protocol: web clients subscribing and publishing to MQTT topics through
//! the node's bridge, in JSON text frames.
//!
//! Clients send [`MqttRequest`]s; the server answers each with one [`MqttReply`] and pushes an
//! `mqtt` frame per broker message. Those are built once per message with [`encode_mqtt`]
//! and shared by every session that receives it.
//!
//! Payloads: a request's JSON string is published as its UTF-8 bytes, any other JSON value as
//! its JSON text. A broker payload that is valid UTF-8 arrives as a string; anything else as
//! base64 with `"encoding":"base64"`.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::app::MAX_REQUEST_ID_BYTES;

/// A frame from a `/v1/mqtt` client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum MqttRequest {
    /// First frame when the upgrade carried no `Authorization` header.
    Auth {
        /// A user JWT or an API key.
        token: String,
    },
    /// Start receiving what matches a topic filter (`+` and `#` wildcards).
    Subscribe {
        /// The topic filter.
        topic: String,
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Stop receiving a filter.
    Unsubscribe {
        /// The topic filter, as subscribed.
        topic: String,
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Publish to a topic (no wildcards).
    Publish {
        /// The topic name.
        topic: String,
        /// A string is sent as its UTF-8 bytes, any other value as its JSON text.
        payload: Value,
        /// 0 (default) or 1.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        qos: Option<u8>,
        /// Ask the broker to retain it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retain: Option<bool>,
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

impl MqttRequest {
    /// The request's `id`, if any.
    pub fn id(&self) -> Option<&str> {
        match self {
            Self::Subscribe { id, .. }
            | Self::Unsubscribe { id, .. }
            | Self::Publish { id, .. } => id.as_deref(),
            Self::Auth { .. } => None,
        }
    }
}

/// Why a request was refused (`code` of an `error` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttErrorCode {
    /// The topic ACLs (or the broker) do not allow it.
    Forbidden,
    /// Malformed frame, invalid topic or filter, or a payload over the limit.
    BadRequest,
    /// The broker is not connected or did not answer in time; retry.
    Unavailable,
    /// The connection holds the most subscriptions allowed.
    TooManySubscriptions,
}

/// How an `mqtt` frame's payload is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadEncoding {
    /// Standard base64 with padding: the payload was not valid UTF-8.
    Base64,
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MqttReply {
    /// The answer to authentication (failure closes the socket with 4403).
    AuthResponse {
        /// `success`.
        status: String,
        /// Who the server took the client for (`user:<name>`, `key:<id>`, `bootstrap`).
        actor: String,
        /// The principal's role.
        role: String,
    },
    /// A subscription is live.
    Subscribed {
        /// The filter.
        topic: String,
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A subscription ended.
    Unsubscribed {
        /// The filter.
        topic: String,
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A publish was handed to the broker connection (QoS 0) or acknowledged by the broker
    /// (QoS 1).
    Published {
        /// The topic.
        topic: String,
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A message from the broker (as the client reads it; the server writes them with
    /// [`encode_mqtt`]).
    Mqtt {
        /// Its topic.
        topic: String,
        /// UTF-8 text, or base64 when `encoding` says so.
        payload: String,
        /// Set when the payload was not UTF-8.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoding: Option<PayloadEncoding>,
        /// Set on a retained message the broker sent on subscribing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retained: Option<bool>,
    },
    /// A refused request.
    Error {
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The topic or filter concerned, when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        /// Why.
        code: MqttErrorCode,
        /// For people.
        message: String,
    },
}

impl MqttReply {
    /// The frame's JSON text.
    pub fn encode(&self) -> String {
        // Cannot fail: string keys only, and `Value`s serialize.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// An `error` frame.
    pub fn error(
        id: Option<String>,
        topic: Option<String>,
        code: MqttErrorCode,
        message: impl Into<String>,
    ) -> Self {
        Self::Error {
            id,
            topic,
            code,
            message: message.into(),
        }
    }
}

/// Decodes a client frame; the error is short and does not echo the input.
pub fn decode_request(text: &[u8]) -> Result<MqttRequest, String> {
    let value: Value = serde_json::from_slice(text).map_err(|_| "not a JSON object".to_owned())?;
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| "missing type".to_owned())?;
    if !["auth", "subscribe", "unsubscribe", "publish"].contains(&kind) {
        return Err("unknown type".to_owned());
    }
    let request: MqttRequest = serde_json::from_value(value).map_err(|e| {
        // serde names missing fields safely; other messages may quote the input.
        let m = e.to_string();
        if m.starts_with("missing field") {
            m
        } else {
            "invalid or unknown field".to_owned()
        }
    })?;
    if request
        .id()
        .is_some_and(|id| id.len() > MAX_REQUEST_ID_BYTES)
    {
        return Err(format!("id longer than {MAX_REQUEST_ID_BYTES} bytes"));
    }
    if let MqttRequest::Publish { qos: Some(q), .. } = &request
        && *q > 1
    {
        return Err("qos must be 0 or 1".to_owned());
    }
    Ok(request)
}

/// The bytes a publish request's payload stands for: a string's UTF-8, else the JSON text.
pub fn payload_bytes(payload: &Value) -> Vec<u8> {
    match payload {
        Value::String(s) => s.as_bytes().to_vec(),
        other => other.to_string().into_bytes(),
    }
}

/// An `mqtt` frame for a broker message.
pub fn encode_mqtt(topic: &str, payload: &[u8], retained: bool) -> Vec<u8> {
    let (payload, encoding) = match std::str::from_utf8(payload) {
        Ok(text) => (text.to_owned(), None),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(payload),
            Some(PayloadEncoding::Base64),
        ),
    };
    let frame = MqttReply::Mqtt {
        topic: topic.to_owned(),
        payload,
        encoding,
        retained: retained.then_some(true),
    };
    frame.encode().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_documented_frames_parse() {
        assert_eq!(
            decode_request(br#"{"type":"subscribe","topic":"farm/+/temp","id":"r1"}"#).unwrap(),
            MqttRequest::Subscribe {
                topic: "farm/+/temp".into(),
                id: Some("r1".into())
            }
        );
        let p = decode_request(br#"{"type":"publish","topic":"a/b","payload":{"t":1},"qos":1}"#)
            .unwrap();
        let MqttRequest::Publish { payload, qos, .. } = p else {
            panic!("{p:?}")
        };
        assert_eq!(
            (payload_bytes(&payload), qos),
            (br#"{"t":1}"#.to_vec(), Some(1))
        );
        assert!(
            decode_request(br#"{"type":"publish","topic":"a","payload":"x","qos":2}"#).is_err()
        );
        assert!(decode_request(br#"{"type":"subscribe","topic":"a","extra":1}"#).is_err());
        let e = decode_request(br#"{"type":"s3cr3t"}"#).unwrap_err();
        assert!(!e.contains("s3cr3t"));
    }

    #[test]
    fn string_payloads_are_their_bytes_and_others_their_json() {
        assert_eq!(payload_bytes(&json!("héllo")), "héllo".as_bytes());
        assert_eq!(payload_bytes(&json!(21.5)), b"21.5");
        assert_eq!(payload_bytes(&json!(null)), b"null");
        assert_eq!(payload_bytes(&json!("{\"a\":1}")), b"{\"a\":1}");
    }

    #[test]
    fn broker_payloads_are_text_when_utf8_else_base64() {
        let text: Value = serde_json::from_slice(&encode_mqtt("a/b", b"21.5", false)).unwrap();
        assert_eq!(text, json!({"type":"mqtt","topic":"a/b","payload":"21.5"}));
        let bin: Value = serde_json::from_slice(&encode_mqtt("a", &[0xff, 0, 1], true)).unwrap();
        assert_eq!(
            bin,
            json!({"type":"mqtt","topic":"a","payload":"/wAB","encoding":"base64","retained":true})
        );
    }
}
