//! Device -> server messages: validation, replay and rate checks, the QoS 0/1/2 answers, and
//! what an accepted message does (telemetry append, shadow merge, fan-out publish).

use std::borrow::Cow;

use bytes::Bytes;
use fleetgate_bus::{Accepted, Channel, TelemetryRecord};
use fleetgate_protocol::{
    Envelope, ErrorCode, Frame, Handshake, HandshakeKind, MacError, MessageKind, MsgId, Qos,
    batch_items, check_from_device, json,
};
use serde_json::{Map, Value};
use tracing::{debug, warn};

use crate::metrics::{KindLabel, ReasonLabel};
use crate::now_ms;
use crate::session::{Close, Session};

/// The answer a message's QoS asks for once it is durable.
fn answer(qos: Qos, msgid: &MsgId) -> Option<Frame> {
    let kind = match qos {
        Qos::AtMostOnce => return None,
        Qos::AtLeastOnce => HandshakeKind::Ack,
        Qos::ExactlyOnce => HandshakeKind::Rec,
    };
    Some(Frame::Handshake(Handshake {
        kind,
        msgid: msgid.clone(),
        payload: None,
    }))
}

/// The shadow patch a status carries: IIoT `values` merge as `reported.<tag> = value`,
/// other objects merge as they are.
fn shadow_patch(payload: &Value) -> Option<Cow<'_, Map<String, Value>>> {
    let obj = payload.as_object()?;
    match obj.get("values").and_then(Value::as_array) {
        Some(values) => {
            let mut patch = Map::new();
            for v in values {
                if let (Some(tag), Some(value)) =
                    (v.get("tag").and_then(Value::as_str), v.get("value"))
                {
                    patch.insert(tag.to_owned(), value.clone());
                }
            }
            if let Some(q) = obj.get("quality") {
                patch.insert("quality".to_owned(), q.clone());
            }
            Some(Cow::Owned(patch))
        }
        None => Some(Cow::Borrowed(obj)),
    }
}

impl Session {
    /// Handles a status, event or batch from the device.
    pub(crate) async fn ingest(&mut self, mut env: Envelope) -> Result<Vec<Frame>, Close> {
        let now = now_ms();
        let shared = self.shared.clone();
        let limits = &shared.config.limits;
        let items = if env.kind == MessageKind::Batch {
            match batch_items(&env, &self.device, now, limits) {
                Ok(items) => items,
                Err(error) => return self.reject(Some(&env.msgid), &error),
            }
        } else {
            Vec::new()
        };
        self.charge(items.len().max(1) as u32)?;
        if self.must_sign {
            let checked = match (env.sig.as_deref(), self.mac_key.as_deref()) {
                (None, _) => Err(MacError::Missing),
                (Some(_), None) => Err(MacError::NoKey),
                (Some(sig), Some(key)) => sig.verify(&env, key),
            };
            if let Err(error) = checked {
                return Ok(vec![self.signature_refused(Some(&env.msgid), error)]);
            }
        }
        if let Err(error) = check_from_device(&env, &self.device, now, limits) {
            return self.reject(Some(&env.msgid), &error);
        }
        // Recorded only once the MAC and the timestamp passed: nobody else can spend the
        // device's nonces, and a stale frame is refused for its timestamp anyway.
        if let (true, Some(sig)) = (self.must_sign, env.sig.as_deref())
            && let Err(error) = self.replay.check_nonce(&sig.nonce, now, limits)
        {
            return Ok(vec![self.signature_refused(Some(&env.msgid), error)]);
        }
        // Verified: what is stored and fanned out is the message, not its proof (whose payload
        // bytes a re-encoding would not reproduce anyway).
        env.sig = None;
        let fresh = match self.replay.check(&env.msgid, env.dup, now, limits) {
            Ok(fresh) => fresh,
            Err(error) => return self.reject(Some(&env.msgid), &error),
        };
        if !fresh {
            // A retransmission of something already accepted: answer again, don't reprocess.
            return Ok(answer(env.qos, &env.msgid).into_iter().collect());
        }
        if env.qos == Qos::ExactlyOnce {
            match self
                .shared
                .bus
                .qos2_receive(&self.device, env.msgid.as_str(), self.qos2_ttl_ms())
                .await
            {
                Ok(true) => {}
                Ok(false) => return Ok(answer(env.qos, &env.msgid).into_iter().collect()),
                Err(error) => return Ok(vec![self.unavailable(&env.msgid, &error)]),
            }
        }
        let mut replies = Vec::new();
        let (msgid, qos, is_batch) = (env.msgid.clone(), env.qos, env.kind == MessageKind::Batch);
        let accepted: Vec<Envelope> = if is_batch {
            let mut accepted = Vec::with_capacity(items.len());
            for item in items {
                match self.replay.check(&item.msgid, item.dup, now, limits) {
                    Ok(true) => accepted.push(item),
                    // Already accepted earlier: only its answer is owed.
                    Ok(false) => replies.extend(answer(item.qos, &item.msgid)),
                    Err(error) => replies.push(Session::error_frame(
                        Some(item.msgid.clone()),
                        error.error_code(),
                        error.to_string(),
                    )),
                }
            }
            accepted
        } else {
            vec![env]
        };
        // What each accepted batch item is owed once stored.
        let item_answers: Vec<(Qos, MsgId)> = if is_batch {
            accepted.iter().map(|i| (i.qos, i.msgid.clone())).collect()
        } else {
            Vec::new()
        };
        if let Err(error) = self.accept(accepted, now).await {
            // Nothing was stored: forget the msgids so the device's retry is processed, not
            // refused as a replay or acked unstored.
            self.replay.forget(&msgid);
            for (_, item) in &item_answers {
                self.replay.forget(item);
            }
            if qos == Qos::ExactlyOnce {
                // Undo the dedupe mark so the device's retransmission is processed.
                let _ = self
                    .shared
                    .bus
                    .qos2_release(&self.device, msgid.as_str())
                    .await;
            }
            return Ok(vec![self.unavailable(&msgid, &error)]);
        }
        for (item_qos, item) in &item_answers {
            replies.extend(answer(*item_qos, item));
        }
        replies.extend(answer(qos, &msgid));
        Ok(replies)
    }

    fn qos2_ttl_ms(&self) -> u64 {
        self.shared.config.qos2_ttl.as_millis() as u64
    }

    fn reject(
        &self,
        msgid: Option<&MsgId>,
        error: &fleetgate_protocol::ProtocolError,
    ) -> Result<Vec<Frame>, Close> {
        self.shared.metrics.messages_rejected.inc();
        match error.close_code() {
            Some(code) => Err(Close::new(code, error.close_reason())),
            None => Ok(vec![Session::error_frame(
                msgid.cloned(),
                error.error_code(),
                error.to_string(),
            )]),
        }
    }

    /// The answer to a message refused for its signature: an error frame, counted by reason;
    /// the session goes on (a bad frame is not processed, the next one may be fine).
    pub(crate) fn signature_refused(&self, msgid: Option<&MsgId>, error: MacError) -> Frame {
        // The session's span names the device.
        debug!(
            message = "message refused for its signature",
            reason = error.as_str()
        );
        self.shared.metrics.messages_rejected.inc();
        self.shared
            .metrics
            .signature_failures
            .get_or_create(&ReasonLabel {
                reason: error.as_str(),
            })
            .inc();
        Session::error_frame(msgid.cloned(), ErrorCode::BadSignature, error.to_string())
    }

    fn unavailable(&self, msgid: &MsgId, error: &fleetgate_bus::BusError) -> Frame {
        self.shared.metrics.bus_errors.inc();
        warn!(message = "could not store device message", %error);
        Session::error_frame(
            Some(msgid.clone()),
            ErrorCode::Unavailable,
            "could not store the message; retry".to_owned(),
        )
    }

    /// Makes accepted messages durable (telemetry), merges shadows and publishes, in one bus
    /// call ([`fleetgate_bus::Bus::accept`]). Only the telemetry append decides success: it is
    /// what QoS 1/2 answers promise. Payloads move into the records rather than being copied;
    /// the fan-out frames are encoded first.
    async fn accept(
        &mut self,
        messages: Vec<Envelope>,
        now: i64,
    ) -> Result<(), fleetgate_bus::BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        let accepted: Vec<Accepted> = messages
            .into_iter()
            .map(|m| {
                let frame = Bytes::from(json::encode_envelope(&m));
                let alert = m.kind == MessageKind::Event && m.payload.get("severity").is_some();
                let shadow = (m.kind == MessageKind::Status)
                    .then(|| shadow_patch(&m.payload).map(Cow::into_owned))
                    .flatten();
                Accepted {
                    channels: self.channels(m.retain, alert),
                    shadow,
                    frame,
                    record: TelemetryRecord {
                        device: self.device.clone(),
                        msgid: m.msgid.into_string(),
                        kind: m.kind,
                        timestamp: m.timestamp,
                        received_ms: now,
                        payload: m.payload,
                    },
                }
            })
            .collect();
        let report = self.shared.bus.accept(&accepted, now).await?;
        let failed = report.shadow_failed + report.publish_failed;
        if failed > 0 {
            self.shared.metrics.bus_errors.inc_by(failed as u64);
            warn!(
                message = "shadow merge or publish failed after storing",
                shadow_failed = report.shadow_failed,
                publish_failed = report.publish_failed
            );
        }
        for m in &accepted {
            let kind = m.record.kind;
            self.shared
                .metrics
                .messages_received
                .get_or_create(&KindLabel {
                    kind: kind.as_str(),
                })
                .inc();
            if kind == MessageKind::Status {
                crate::alerts::DeviceAlerts::on_status(
                    &mut self.alerts,
                    &self.shared,
                    &self.device,
                    &self.groups,
                    &m.record.payload,
                    m.record.timestamp,
                )
                .await;
            }
        }
        Ok(())
    }

    /// The channels an accepted message goes to: `device:<id>`, its groups and, for events
    /// with a `severity`, `alerts`. Only the device's own channel keeps a retained value.
    fn channels(&self, retain: bool, alert: bool) -> Vec<(Channel, bool)> {
        let mut channels = Vec::with_capacity(2 + self.groups.len());
        channels.push((Channel::Device(self.device.clone()), retain));
        channels.extend(
            self.groups
                .iter()
                .map(|g| (Channel::Group(g.clone()), false)),
        );
        if alert {
            channels.push((Channel::Alerts, false));
        }
        channels
    }

    /// Handles ack / rec / comp (answers to our commands) and rel (QoS 2 from the device).
    pub(crate) async fn on_handshake(&mut self, h: Handshake) -> Result<Vec<Frame>, Close> {
        match h.kind {
            HandshakeKind::Rel => {
                if let Err(error) = self
                    .shared
                    .bus
                    .qos2_release(&self.device, h.msgid.as_str())
                    .await
                {
                    return Ok(vec![self.unavailable(&h.msgid, &error)]);
                }
                Ok(vec![Frame::Handshake(Handshake {
                    kind: HandshakeKind::Comp,
                    msgid: h.msgid,
                    payload: None,
                })])
            }
            HandshakeKind::Ack | HandshakeKind::Rec | HandshakeKind::Comp => {
                let shared = self.shared.clone();
                Ok(self.outgoing.on_handshake(&shared, &self.device, h).await)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn iiot_values_merge_by_tag() {
        let p = json!({"values":[{"tag":"temperature","value":42.5,"unit":"C"},{"tag":"pressure","value":101.3}],"quality":"good"});
        let patch = shadow_patch(&p).unwrap();
        assert_eq!(
            Value::Object(patch.into_owned()),
            json!({"temperature":42.5,"pressure":101.3,"quality":"good"})
        );
    }

    #[test]
    fn plain_objects_merge_as_they_are_and_scalars_not_at_all() {
        assert_eq!(
            Value::Object(shadow_patch(&json!({"battery":80})).unwrap().into_owned()),
            json!({"battery":80})
        );
        assert!(shadow_patch(&json!(5)).is_none());
    }
}
