//! The fan-out part of the suite that concerns offsets, history and watching. Factories
//! must use the default [`HistoryConfig`] (100 frames, 5 minutes).

use bytes::Bytes;

use super::{recv_published, unique_id};
use crate::{Bus, Channel, HistoryConfig, Published};

fn frames(n: usize, tag: &str) -> Vec<Bytes> {
    (0..n).map(|i| Bytes::from(format!("{tag}-{i}"))).collect()
}

async fn publish_all(bus: &dyn Bus, ch: &Channel, frames: &[Bytes]) {
    for f in frames {
        bus.publish(ch, f.clone(), false).await.expect("publish");
    }
}

/// Subscribers get consecutive offsets; history after an offset returns exactly the later
/// frames under the same epoch; an offset from the future is not recoverable.
pub async fn fanout_offsets_and_history(bus: &dyn Bus) {
    let ch = Channel::Device(unique_id("hdev"));
    let mut sub = bus.subscribe(&ch).await.expect("subscribe");
    let start = bus.history(&ch, None, 10).await.expect("position");
    assert!(start.complete && start.frames.is_empty());
    let sent = frames(5, "f");
    publish_all(bus, &ch, &sent).await;
    for (i, f) in sent.iter().enumerate() {
        let p = recv_published(&mut sub, "subscriber").await;
        assert_eq!(
            p,
            Published {
                offset: start.position.offset + 1 + i as u64,
                frame: f.clone()
            },
            "frame {i}"
        );
    }
    let o = start.position.offset;
    let h = bus.history(&ch, Some(o + 2), 100).await.expect("history");
    assert_eq!(h.position.epoch, start.position.epoch, "same epoch");
    assert_eq!(h.position.offset, o + 5);
    assert!(h.complete, "everything after o+2 is kept");
    assert_eq!(
        h.frames
            .iter()
            .map(|p| (p.offset, p.frame.clone()))
            .collect::<Vec<_>>(),
        vec![
            (o + 3, sent[2].clone()),
            (o + 4, sent[3].clone()),
            (o + 5, sent[4].clone())
        ]
    );
    let now = bus.history(&ch, Some(o + 5), 100).await.expect("history");
    assert!(now.complete && now.frames.is_empty(), "nothing missed");
    let future = bus.history(&ch, Some(o + 50), 100).await.expect("history");
    assert!(
        !future.complete,
        "an offset past the end is of another epoch"
    );
}

/// Publishing on a channel nobody watches assigns no offset and keeps no history, but
/// still sets the retained value; reading the position watches it from then on.
pub async fn fanout_unwatched_channel_keeps_nothing(bus: &dyn Bus) {
    let ch = Channel::Device(unique_id("hcold"));
    publish_all(bus, &ch, &frames(3, "cold")).await;
    bus.publish(&ch, Bytes::from_static(b"state"), true)
        .await
        .expect("retained publish");
    assert_eq!(
        bus.retained(&ch).await.expect("retained"),
        Some(Bytes::from_static(b"state"))
    );
    let h = bus.history(&ch, Some(0), 100).await.expect("history");
    assert_eq!(h.position.offset, 0, "unwatched publishes get no offset");
    assert!(h.complete && h.frames.is_empty());
    // The read watched the channel: the next publish is kept.
    bus.publish(&ch, Bytes::from_static(b"warm"), false)
        .await
        .expect("publish");
    let h = bus.history(&ch, Some(0), 100).await.expect("history");
    assert_eq!(h.position.offset, 1);
    assert!(h.complete);
    assert_eq!(h.frames[0].frame, Bytes::from_static(b"warm"));
}

/// History keeps the configured number of frames: an offset older than that is reported
/// incomplete, with the newest frames returned.
pub async fn fanout_history_is_bounded(bus: &dyn Bus) {
    let size = HistoryConfig::default().size;
    let ch = Channel::Group(unique_id("hbound"));
    let start = bus.history(&ch, None, 1).await.expect("position");
    let o = start.position.offset;
    publish_all(bus, &ch, &frames(size + 5, "b")).await;
    let h = bus.history(&ch, Some(o), size * 2).await.expect("history");
    assert!(!h.complete, "the first 5 frames are gone");
    assert_eq!(h.frames.len(), size);
    assert_eq!(h.frames[0].offset, o + 6);
    assert_eq!(h.frames[size - 1].offset, o + size as u64 + 5);
    let tail = bus
        .history(&ch, Some(o + 10), size * 2)
        .await
        .expect("history");
    assert!(tail.complete, "offsets still kept recover");
    assert_eq!(tail.frames.len(), size - 5);
}

/// A channel stays watched after its last subscriber left, so a client that comes back
/// recovers what was published meanwhile.
pub async fn fanout_recovery_after_unsubscribe(bus: &dyn Bus) {
    let ch = Channel::Device(unique_id("hback"));
    let mut sub = bus.subscribe(&ch).await.expect("subscribe");
    publish_all(bus, &ch, &frames(2, "before")).await;
    let _ = recv_published(&mut sub, "first").await;
    let last = recv_published(&mut sub, "second").await.offset;
    drop(sub);
    let missed = frames(3, "missed");
    publish_all(bus, &ch, &missed).await;
    let h = bus.history(&ch, Some(last), 100).await.expect("history");
    assert!(h.complete, "everything missed is kept");
    assert_eq!(
        h.frames.iter().map(|p| p.frame.clone()).collect::<Vec<_>>(),
        missed
    );
    assert_eq!(h.frames[0].offset, last + 1);
}

/// An alert's records land in the stream in order; the open set follows fire and resolve.
pub async fn alerts_stream_and_open_set(bus: &dyn Bus) {
    let id = unique_id("rule:dev");
    let fired = format!(r#"{{"id":"{id}","state":"open"}}"#);
    let resolved = format!(r#"{{"id":"{id}","state":"resolved"}}"#);
    let first = bus.alert_record(&id, &fired, true).await.expect("fire");
    assert_eq!(
        bus.alert_open(&id).await.expect("open"),
        Some(fired.clone())
    );
    assert!(
        bus.alerts_open(100_000)
            .await
            .expect("open set")
            .contains(&fired),
        "the open set holds it"
    );
    let second = bus
        .alert_record(&id, &resolved, false)
        .await
        .expect("resolve");
    assert!(
        second.parts().unwrap() > first.parts().unwrap(),
        "later position"
    );
    assert_eq!(bus.alert_open(&id).await.expect("open"), None, "resolved");
    let after_first = bus.alerts_read(Some(&first), 100).await.expect("read");
    let ours: Vec<&str> = after_first
        .iter()
        .filter(|r| r.alert.contains(&id))
        .map(|r| r.alert.as_str())
        .collect();
    assert_eq!(ours, vec![resolved.as_str()], "only the later record");
    let all = bus.alerts_read(None, 100_000).await.expect("read all");
    let positions: Vec<_> = all.iter().map(|r| r.id.parts().unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "append order");
    assert!(all.iter().any(|r| r.alert == fired && r.id == first));
}
