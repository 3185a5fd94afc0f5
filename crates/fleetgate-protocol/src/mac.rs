//! Message integrity: an HMAC-SHA256 (`sig`) over a message frame's canonical form, with a
//! `nonce` that the receiver refuses to see twice.
//!
//! The canonical form is built from the decoded fields and the payload's bytes exactly as they
//! were on the wire, so a device in C never has to reproduce our JSON serialiser: it signs the
//! payload text it is about to send. docs/PROTOCOL.md ("Message signatures") is the reference.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Envelope;

/// First line of every canonical form: the scheme and its version.
const SCHEME: &[u8] = b"fleetgate-mac-v1";
/// Nonce length bounds (characters of `[A-Za-z0-9_-]`).
const NONCE_MIN: usize = 8;
const NONCE_MAX: usize = 64;

/// A device's MAC key (256 bits, given out once by the admin API).
pub type MacKey = [u8; 32];

/// The signature fields of a message frame, as received or as about to be sent. Two are
/// equal when their `nonce` and `sig` are: the payload bytes kept from the wire are how the
/// frame arrived, not part of what it says.
#[derive(Debug, Clone)]
pub struct Signature {
    /// The sender's single-use value (8-64 characters of `[A-Za-z0-9_-]`).
    pub nonce: String,
    /// Lowercase hex of the HMAC-SHA256 over the canonical form.
    pub sig: String,
    /// The payload's bytes as received; `None` for a signature built locally, whose payload is
    /// what the encoder writes.
    pub(crate) payload: Option<Vec<u8>>,
}

impl PartialEq for Signature {
    fn eq(&self, other: &Self) -> bool {
        self.nonce == other.nonce && self.sig == other.sig
    }
}

impl Eq for Signature {}

/// Why a signed frame was refused. Each text is fixed: nothing from the frame is quoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// The device must sign its messages and this one has no `sig`.
    #[error("signature required")]
    Missing,
    /// `nonce` is absent or not 8-64 characters of `[A-Za-z0-9_-]`.
    #[error("nonce must be 8-64 characters of [A-Za-z0-9_-]")]
    BadNonce,
    /// `sig` is not 64 hex digits, or a signed field holds a line feed.
    #[error("sig must be 64 hex digits")]
    BadFormat,
    /// The HMAC does not match.
    #[error("signature mismatch")]
    Mismatch,
    /// The nonce was seen before inside the replay window.
    #[error("nonce seen before inside the replay window")]
    NonceReused,
    /// The device must sign (its group requires it) but was given no MAC key.
    #[error("signature required; no MAC key was issued for this device")]
    NoKey,
    /// A compact (seed) frame has no envelope to sign.
    #[error("compact frames cannot be signed; send envelopes")]
    Unsignable,
}

impl MacError {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::BadNonce => "bad_nonce",
            Self::BadFormat => "bad_format",
            Self::Mismatch => "mismatch",
            Self::NonceReused => "nonce_reused",
            Self::NoKey => "no_key",
            Self::Unsignable => "unsignable",
        }
    }
}

impl Signature {
    /// Signs `env` with `key` and `nonce`, over the payload bytes that [`crate::json::encode`]
    /// and [`crate::proto::encode`] write for it.
    pub fn sign(env: &Envelope, nonce: impl Into<String>, key: &MacKey) -> Self {
        let nonce = nonce.into();
        let payload = payload_text(env);
        let mac = mac_over(key, &canonical(env, &nonce, &payload));
        Self {
            nonce,
            sig: hex::encode(mac.finalize().into_bytes()),
            payload: None,
        }
    }

    /// A received signature: the payload's wire bytes are what it covers.
    pub(crate) fn received(nonce: String, sig: String, payload: Vec<u8>) -> Self {
        Self {
            nonce,
            sig,
            payload: Some(payload),
        }
    }

    /// Checks the signature of `env` (the envelope it arrived on) against `key`, in constant
    /// time. The nonce's freshness is the caller's ([`crate::ReplayWindow::check_nonce`]).
    ///
    /// # Errors
    /// [`MacError`] for a malformed nonce or sig, or a mismatch.
    pub fn verify(&self, env: &Envelope, key: &MacKey) -> Result<(), MacError> {
        if !valid_nonce(&self.nonce) {
            return Err(MacError::BadNonce);
        }
        // A line feed in a free-text field would let two different frames share a canonical
        // form; `ver`, `msgid`, `from` and the nonce cannot hold one, `to` can.
        if env.to.contains('\n') || env.ver.contains('\n') {
            return Err(MacError::BadFormat);
        }
        let mut expected = [0u8; 32];
        hex::decode_to_slice(&self.sig, &mut expected).map_err(|_| MacError::BadFormat)?;
        let computed;
        let payload = match &self.payload {
            Some(p) => p.as_slice(),
            None => {
                computed = payload_text(env);
                computed.as_slice()
            }
        };
        mac_over(key, &canonical(env, &self.nonce, payload))
            .verify_slice(&expected)
            .map_err(|_| MacError::Mismatch)
    }
}

/// Whether `nonce` is 8-64 characters of `[A-Za-z0-9_-]`.
fn valid_nonce(nonce: &str) -> bool {
    (NONCE_MIN..=NONCE_MAX).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn payload_text(env: &Envelope) -> Vec<u8> {
    // Writing a Value cannot fail: its map keys are strings.
    serde_json::to_vec(&env.payload).expect("a JSON value always serialises")
}

fn mac_over(key: &MacKey, message: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac
}

/// The bytes the HMAC covers: the scheme, then one line per field, then the payload.
fn canonical(env: &Envelope, nonce: &str, payload: &[u8]) -> Vec<u8> {
    let flag = |b: bool| if b { "1" } else { "0" };
    let head = format!(
        "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
        env.ver,
        env.kind.as_str(),
        env.msgid,
        env.timestamp,
        env.from,
        env.to,
        env.qos.as_u8(),
        flag(env.retain),
        flag(env.dup),
        nonce,
    );
    let mut out = Vec::with_capacity(SCHEME.len() + 1 + head.len() + payload.len());
    out.extend_from_slice(SCHEME);
    out.push(b'\n');
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MessageKind, MsgId, Qos};
    use serde_json::json;

    fn env() -> Envelope {
        Envelope {
            ver: "1.0".into(),
            msgid: MsgId::new("m1").unwrap(),
            timestamp: 1_700_000_000_000,
            from: "dev-1".into(),
            to: "server".into(),
            kind: MessageKind::Status,
            payload: json!({"t": 21.5}),
            qos: Qos::AtLeastOnce,
            retain: false,
            dup: false,
            sig: None,
        }
    }

    /// The documented example (docs/PROTOCOL.md), so the text and the code cannot drift.
    #[test]
    fn canonical_form_is_the_documented_one() {
        let e = env();
        let text = canonical(&e, "n0nce-0001", br#"{"t":21.5}"#);
        assert_eq!(
            text,
            b"fleetgate-mac-v1\n1.0\nstatus\nm1\n1700000000000\ndev-1\nserver\n1\n0\n0\nn0nce-0001\n{\"t\":21.5}"
        );
    }

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let key = [7u8; 32];
        let e = env();
        let s = Signature::sign(&e, "n0nce-0001", &key);
        assert_eq!(s.verify(&e, &key), Ok(()));
        assert_eq!(s.verify(&e, &[8u8; 32]), Err(MacError::Mismatch));
        for change in [
            (|e: &mut Envelope| e.timestamp += 1) as fn(&mut Envelope),
            |e| e.qos = Qos::AtMostOnce,
            |e| e.dup = true,
            |e| e.to = "other".into(),
            |e| e.payload = json!({"t": 21.6}),
        ] {
            let mut changed = env();
            change(&mut changed);
            assert_eq!(s.verify(&changed, &key), Err(MacError::Mismatch));
        }
    }

    #[test]
    fn malformed_fields_are_named() {
        let key = [7u8; 32];
        let e = env();
        let mut s = Signature::sign(&e, "n0nce-0001", &key);
        s.sig.pop();
        assert_eq!(s.verify(&e, &key), Err(MacError::BadFormat));
        let s = Signature::sign(&e, "short", &key);
        assert_eq!(s.verify(&e, &key), Err(MacError::BadNonce));
        let mut lf = env();
        lf.to = "server\n1".into();
        let s = Signature::sign(&lf, "n0nce-0001", &key);
        assert_eq!(s.verify(&lf, &key), Err(MacError::BadFormat));
    }

    fn signed_message(frame: crate::Frame) -> Envelope {
        match frame {
            crate::Frame::Message(env) => env,
            other => panic!("not a message: {other:?}"),
        }
    }

    #[test]
    fn signed_frames_survive_both_codecs() {
        let key = [3u8; 32];
        let mut e = env();
        e.sig = Some(Box::new(Signature::sign(&e, "n0nce-0002", &key)));
        for codec in [crate::Codec::Json, crate::Codec::Protobuf] {
            let back = signed_message(
                codec
                    .decode(&codec.encode(&crate::Frame::Message(e.clone())))
                    .unwrap(),
            );
            let sig = back.sig.as_deref().expect("signature decoded");
            assert_eq!(sig.nonce, "n0nce-0002");
            assert_eq!(sig.verify(&back, &key), Ok(()), "{codec:?}");
        }
    }

    /// The MAC covers the payload's bytes as sent, so a device may format its JSON as it likes.
    #[test]
    fn the_payload_is_covered_as_sent() {
        let key = [5u8; 32];
        let payload = br#"{ "t" : 21.50, "unit":"C" }"#;
        let mut text =
            b"fleetgate-mac-v1\n1.0\nstatus\nm9\n1700000000000\ndev-1\nserver\n0\n0\n0\nabcdefgh\n"
                .to_vec();
        text.extend_from_slice(payload);
        let sig = hex::encode(mac_over(&key, &text).finalize().into_bytes());
        let frame = format!(
            r#"{{"ver":"1.0","msgid":"m9","timestamp":1700000000000,"from":"dev-1","to":"server","type":"status","payload":{},"qos":0,"nonce":"abcdefgh","sig":"{sig}"}}"#,
            std::str::from_utf8(payload).unwrap()
        );
        let env = signed_message(crate::json::decode(frame.as_bytes()).unwrap());
        let received = env.sig.as_deref().unwrap();
        assert_eq!(received.verify(&env, &key), Ok(()));
        let tampered = frame.replace("21.50", "21.60");
        let env = signed_message(crate::json::decode(tampered.as_bytes()).unwrap());
        assert_eq!(
            env.sig.as_deref().unwrap().verify(&env, &key),
            Err(MacError::Mismatch)
        );
    }

    #[test]
    fn a_nonce_is_refused_the_second_time() {
        let limits = crate::Limits::default();
        let mut w = crate::ReplayWindow::default();
        assert_eq!(w.check_nonce("abcdefgh", 0, &limits), Ok(()));
        assert_eq!(w.check_nonce("abcdefgi", 1, &limits), Ok(()));
        assert_eq!(
            w.check_nonce("abcdefgh", 2, &limits),
            Err(MacError::NonceReused)
        );
        // Past the window it is forgotten; its frame's timestamp is stale by then.
        let later = 2 * limits.max_skew_ms.max(limits.replay_window_ms) + 10;
        assert_eq!(w.check_nonce("abcdefgh", later, &limits), Ok(()));
    }
}
