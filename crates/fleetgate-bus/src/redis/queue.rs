//! The command queue steps that run as one script call where the trait composes several.

use fred::types::Value;

use super::{RedisBus, array, codec, queued, v};
use crate::{BusError, BusResult, CommandOutcome, NodeMessage, QueuedCommand};

impl RedisBus {
    /// [`crate::Bus::queue_ack_next`] as one `QUEUE_ACK_NEXT` call: the ack, the result and
    /// the refill cost one round trip instead of three.
    pub(super) async fn ack_next(
        &self,
        device: &str,
        msgid: &str,
        result: Option<(&str, &CommandOutcome, u64)>,
        after: Option<&str>,
        skip: &[&str],
        limit: usize,
    ) -> BusResult<(Option<QueuedCommand>, Vec<QueuedCommand>)> {
        const WHAT: &str = "queue_ack_next";
        let (channel, outcome, message, ttl) = match result {
            Some((node, outcome, ttl_ms)) => {
                let message = NodeMessage::CommandResult {
                    device: device.to_owned(),
                    msgid: msgid.to_owned(),
                    outcome: outcome.clone(),
                };
                (
                    self.node_channel(node),
                    codec::encode_outcome(outcome),
                    codec::encode_node_message(&message),
                    ttl_ms.max(1),
                )
            }
            None => (String::new(), String::new(), String::new(), 1),
        };
        let mut args = vec![
            v(msgid),
            v(device),
            v(super::wall_ms().to_string()),
            Value::from(i64::try_from(limit).unwrap_or(i64::MAX)),
            v(after.unwrap_or_default()),
            v(channel),
            v(outcome),
            v(message),
            Value::from(i64::try_from(ttl).unwrap_or(i64::MAX)),
        ];
        args.extend(skip.iter().map(|m| v(*m)));
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.queue_ack_next,
                vec![
                    self.key("q:", device),
                    self.key("qh:", device),
                    self.key("qexp", ""),
                    self.key("res:", &format!("{device}:{msgid}")),
                ],
                args,
            )
            .await?;
        let mut parts = array(WHAT, reply)?.into_iter();
        let (Some(removed), Some(next)) = (parts.next(), parts.next()) else {
            return Err(BusError::Corrupt(format!("{WHAT}: short reply")));
        };
        let removed = queued(WHAT, removed)?;
        let next = array(WHAT, next)?
            .into_iter()
            .map(|q| {
                queued(WHAT, q)?.ok_or_else(|| BusError::Corrupt(format!("{WHAT}: nil entry")))
            })
            .collect::<BusResult<_>>()?;
        Ok((removed, next))
    }
}
