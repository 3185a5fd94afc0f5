//! The `/v1/app` protocol for dashboards and apps: JSON text frames only.
//!
//! Clients send [`AppRequest`]s; the server answers with [`AppReply`]s and pushes
//! `message` frames. Data frames are the hot path: the server builds each one once per
//! channel with [`encode_message`] and shares its bytes among every subscriber, so they are
//! not a variant of [`AppReply`] on the way out (they are on the way in, for clients).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request ID echoed back (`id`).
pub const MAX_REQUEST_ID_BYTES: usize = 64;

/// A frame from an app client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AppRequest {
    /// First frame when the upgrade carried no `Authorization` header.
    Auth {
        /// A user JWT or an API key.
        token: String,
    },
    /// Start receiving a channel (`device:<id>`, `group:<name>`, `alerts`, `presence:<group>`).
    Subscribe {
        /// The channel name.
        channel: String,
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The last offset the client has: what came after it is sent first, if kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// The epoch `since` belongs to (from `subscribed`); another epoch is a gap.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    /// Stop receiving a channel.
    Unsubscribe {
        /// The channel name.
        channel: String,
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Send a command to a device, as `POST /v1/devices/{id}/commands` does.
    Command {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The device.
        device: String,
        /// Opaque to the gateway.
        payload: Value,
        /// 0, 1 (default) or 2.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        qos: Option<u8>,
        /// How long the command stays queued unacknowledged.
        #[serde(default, rename = "ttlMs", skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
        /// How long to wait for the device's result (0: answer once queued).
        #[serde(default, rename = "waitMs", skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
    },
}

/// Why a request was refused (`code` of an `error` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppErrorCode {
    /// The principal's role or scope does not allow it.
    Forbidden,
    /// No such device (or one outside the principal's scope).
    NotFound,
    /// The request is malformed or names no valid channel.
    BadRequest,
    /// What the client missed is no longer kept: re-read state over REST.
    GapTooOld,
    /// The connection holds the most subscriptions allowed.
    TooManySubscriptions,
    /// The device is offline and the command was QoS 0 (not queued).
    DeviceOffline,
    /// The device's command queue is full.
    QueueFull,
    /// No result within `waitMs` (the command stays queued until its TTL).
    Timeout,
    /// The device never acknowledged the command (attempts exhausted or expired).
    Failed,
    /// The connection has the most commands waiting that it may.
    TooManyCommands,
    /// The bus (or the audit log) could not be reached; retry.
    Unavailable,
}

/// A frame from the server other than data frames (see [`encode_message`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AppReply {
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
        /// The channel.
        channel: String,
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The offset of the last frame before live ones (the client's `since` when it
        /// recovered, with the recovered frames following this answer).
        offset: u64,
        /// The run of offsets `offset` belongs to.
        epoch: String,
        /// How many missed frames follow (when `since` was given).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<u64>,
    },
    /// A subscription ended.
    Unsubscribed {
        /// The channel.
        channel: String,
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A data frame (as the client reads it; the server writes them with
    /// [`encode_message`]).
    Message {
        /// The channel.
        channel: String,
        /// Its position in the channel (absent on a retained value sent at subscribe).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// Set on the retained value sent at subscribe.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retained: Option<bool>,
        /// The device's envelope as accepted (or an alert, or a presence change).
        data: Value,
    },
    /// A command's outcome.
    CommandResult {
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The command's msgid.
        msgid: String,
        /// `queued` when not waited for, `done` with a result.
        status: String,
        /// The device's result, when it sent one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// The device's error, when it reported one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<Value>,
    },
    /// A refused request, or a gap on a live channel.
    Error {
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The channel concerned, when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        /// The command's msgid, once it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        msgid: Option<String>,
        /// Why.
        code: AppErrorCode,
        /// For people.
        message: String,
    },
}

impl AppReply {
    /// The frame's JSON text.
    pub fn encode(&self) -> String {
        // Serializing these types cannot fail: no maps with non-string keys, no floats
        // beyond what `Value` holds.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// An `error` frame.
    pub fn error(id: Option<String>, code: AppErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            id,
            channel: None,
            msgid: None,
            code,
            message: message.into(),
        }
    }
}

/// Decodes a client frame; the error is short and does not echo the input.
pub fn decode_request(text: &[u8]) -> Result<AppRequest, String> {
    let value: Value = serde_json::from_slice(text).map_err(|_| "not a JSON object".to_owned())?;
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| "missing type".to_owned())?;
    if !["auth", "subscribe", "unsubscribe", "command"].contains(&kind) {
        return Err("unknown type".to_owned());
    }
    let request: AppRequest = serde_json::from_value(value).map_err(|e| {
        // serde names missing fields safely; other messages may quote the input.
        let m = e.to_string();
        if m.starts_with("missing field") {
            m
        } else {
            "invalid or unknown field".to_owned()
        }
    })?;
    let id = match &request {
        AppRequest::Subscribe { id, .. }
        | AppRequest::Unsubscribe { id, .. }
        | AppRequest::Command { id, .. } => id.as_deref(),
        AppRequest::Auth { .. } => None,
    };
    if id.is_some_and(|id| id.len() > MAX_REQUEST_ID_BYTES) {
        return Err(format!("id longer than {MAX_REQUEST_ID_BYTES} bytes"));
    }
    Ok(request)
}

/// A `message` frame: `{"type":"message","channel":...,"offset":N,"data":<data>}`, where
/// `data` is JSON already (the accepted envelope as the bus carries it), copied in as is.
pub fn encode_message(channel: &str, offset: Option<u64>, data: &[u8]) -> Vec<u8> {
    let name = serde_json::to_string(channel).unwrap_or_default();
    let mut out = Vec::with_capacity(data.len() + name.len() + 64);
    out.extend_from_slice(b"{\"type\":\"message\",\"channel\":");
    out.extend_from_slice(name.as_bytes());
    match offset {
        Some(n) => {
            out.extend_from_slice(b",\"offset\":");
            out.extend_from_slice(n.to_string().as_bytes());
        }
        None => out.extend_from_slice(b",\"retained\":true"),
    }
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data);
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_fixed_frames_parse_as_documented() {
        let sub = decode_request(
            br#"{"type":"subscribe","channel":"device:sensor-001","id":"r1","since":7}"#,
        )
        .unwrap();
        assert_eq!(
            sub,
            AppRequest::Subscribe {
                channel: "device:sensor-001".into(),
                id: Some("r1".into()),
                since: Some(7),
                epoch: None
            }
        );
        let cmd = decode_request(
            br#"{"type":"command","id":"r2","device":"sensor-001","payload":{},"qos":1,"waitMs":5000}"#,
        )
        .unwrap();
        assert!(matches!(
            cmd,
            AppRequest::Command {
                wait_ms: Some(5000),
                qos: Some(1),
                ..
            }
        ));
    }

    #[test]
    fn bad_requests_get_short_errors_that_do_not_echo_input() {
        let secret = "s3cr3t-value";
        let e = decode_request(format!(r#"{{"type":"{secret}"}}"#).as_bytes()).unwrap_err();
        assert!(!e.contains(secret), "{e}");
        assert_eq!(decode_request(b"nope").unwrap_err(), "not a JSON object");
        let long = "x".repeat(65);
        assert!(
            decode_request(
                format!(r#"{{"type":"unsubscribe","channel":"alerts","id":"{long}"}}"#).as_bytes()
            )
            .is_err()
        );
    }

    #[test]
    fn message_frames_are_json_a_client_reads_back() {
        let data = br#"{"type":"status","msgid":"m1","payload":{"t":1.50}}"#;
        let frame = encode_message("device:a\"b", Some(42), data);
        let back: AppReply = serde_json::from_slice(&frame).unwrap();
        assert_eq!(
            back,
            AppReply::Message {
                channel: "device:a\"b".into(),
                offset: Some(42),
                retained: None,
                data: json!({"type":"status","msgid":"m1","payload":{"t":1.50}})
            }
        );
        let retained: Value =
            serde_json::from_slice(&encode_message("alerts", None, b"1")).unwrap();
        assert_eq!(retained["retained"], json!(true));
    }
}
