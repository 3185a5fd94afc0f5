//! The part of the suite about [`Bus::queue_ack_next`]: the ack of a command, its result and
//! the refill of the next ones as one step.

use serde_json::json;

use super::{LONG_TTL_MS, live_command, recv_node, unique_id};
use crate::{Bus, CommandOutcome, NodeMessage};

fn ids_and_attempts(next: &[crate::QueuedCommand]) -> Vec<(String, u32)> {
    next.iter()
        .map(|q| (q.command.msgid.as_str().to_owned(), q.attempts))
        .collect()
}

/// An ack removes the command, stores and reports its result to the waiting node only when
/// it was still queued, and returns the next commands with an attempt counted for each, as
/// `queue_next` with the same cursor would.
pub async fn queue_ack_next_acks_reports_and_refills(bus: &dyn Bus) {
    let node = unique_id("anode");
    let dev = unique_id("aqdev");
    let mut rx = bus.node_subscribe(&node).await.expect("node_subscribe");
    for m in ["a", "b", "c", "d"] {
        bus.queue_push(&live_command(&dev, m)).await.expect("push");
    }
    let first = bus
        .queue_next(&dev, None, &[], 2)
        .await
        .expect("queue_next");
    assert_eq!(ids_and_attempts(&first), [("a".into(), 1), ("b".into(), 1)]);

    let outcome = CommandOutcome::Result(json!({"done": 1.50}));
    let (removed, next) = bus
        .queue_ack_next(
            &dev,
            "a",
            Some((&node, &outcome, LONG_TTL_MS)),
            Some("b"),
            &["b"],
            1,
        )
        .await
        .expect("queue_ack_next");
    assert_eq!(removed.expect("a was queued").command.msgid.as_str(), "a");
    assert_eq!(ids_and_attempts(&next), [("c".into(), 1)]);
    assert_eq!(
        recv_node(&mut rx, "a's result").await,
        NodeMessage::CommandResult {
            device: dev.clone(),
            msgid: "a".into(),
            outcome: outcome.clone(),
        }
    );
    assert_eq!(
        bus.result_get(&dev, "a").await.unwrap(),
        Some(outcome.clone())
    );

    // A second ack finds nothing: no result is stored or sent again, the refill still runs.
    let (removed, next) = bus
        .queue_ack_next(
            &dev,
            "a",
            Some((&node, &CommandOutcome::Done, LONG_TTL_MS)),
            Some("c"),
            &["b", "c"],
            5,
        )
        .await
        .expect("queue_ack_next");
    assert!(removed.is_none(), "acked twice");
    assert_eq!(ids_and_attempts(&next), [("d".into(), 1)]);
    assert_eq!(
        bus.result_get(&dev, "a").await.unwrap(),
        Some(outcome),
        "the first result stays"
    );
    // What the node hears next is this marker, so the duplicate ack published nothing.
    bus.result_send(&node, &dev, "marker", &CommandOutcome::Done, LONG_TTL_MS)
        .await
        .expect("result_send");
    assert!(matches!(
        recv_node(&mut rx, "the marker").await,
        NodeMessage::CommandResult { msgid, .. } if msgid.as_str() == "marker"
    ));

    // Nobody waits: removed, nothing stored; a full window reads nothing.
    let (removed, next) = bus
        .queue_ack_next(&dev, "b", None, Some("d"), &["c", "d"], 0)
        .await
        .expect("queue_ack_next");
    assert_eq!(removed.expect("b was queued").attempts, 1);
    assert!(next.is_empty());
    assert_eq!(bus.result_get(&dev, "b").await.unwrap(), None);
    assert_eq!(bus.queue_len(&dev).await.expect("queue_len"), 2, "c and d");
}
