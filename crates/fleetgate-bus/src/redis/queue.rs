//! The command queue steps that run as one script call where the trait composes several.

use fred::types::Value;

use super::{RedisBus, array, codec, queued, queued_list, v};
use crate::{BusError, BusResult, CommandOutcome, NodeMessage, QueuedCommand};

impl RedisBus {
    /// Where a command's outcome is kept for [`crate::Bus::result_get`].
    pub(super) fn result_key(&self, device: &str, msgid: &str) -> String {
        self.key("res:", &format!("{device}:{msgid}"))
    }

    /// What the scripts that report an outcome take after their other arguments: the
    /// waiting node's channel, the encoded outcome, the encoded result message and the TTL.
    pub(super) fn result_args(
        &self,
        node: &str,
        device: &str,
        msgid: &str,
        outcome: &CommandOutcome,
        ttl_ms: u64,
    ) -> [Value; 4] {
        let message = NodeMessage::CommandResult {
            device: device.to_owned(),
            msgid: msgid.to_owned(),
            outcome: outcome.clone(),
        };
        [
            v(self.node_channel(node)),
            v(codec::encode_outcome(outcome)),
            v(codec::encode_node_message(&message)),
            Value::from(i64::try_from(ttl_ms.max(1)).unwrap_or(i64::MAX)),
        ]
    }

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
        let reported = match result {
            Some((node, outcome, ttl_ms)) => self.result_args(node, device, msgid, outcome, ttl_ms),
            // An empty channel tells the script that nobody waits.
            None => [v(""), v(""), v(""), Value::from(1)],
        };
        let mut args = vec![
            v(msgid),
            v(device),
            v(super::wall_ms().to_string()),
            Value::from(i64::try_from(limit).unwrap_or(i64::MAX)),
            v(after.unwrap_or_default()),
        ];
        args.extend(reported);
        args.extend(skip.iter().map(|m| v(*m)));
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.queue_ack_next,
                vec![
                    self.key("q:", device),
                    self.key("qh:", device),
                    self.key("qexp", ""),
                    self.result_key(device, msgid),
                ],
                args,
            )
            .await?;
        let mut parts = array(WHAT, reply)?.into_iter();
        let (Some(removed), Some(next)) = (parts.next(), parts.next()) else {
            return Err(BusError::Corrupt(format!("{WHAT}: short reply")));
        };
        Ok((queued(WHAT, removed)?, queued_list(WHAT, next)?))
    }
}
