//! The bridge's two tasks: the event loop's poller (connects, routes, matches acks) and the
//! reconciler (keeps the broker's subscriptions equal to the table's filters).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{Event, EventLoop, Outgoing, Packet, QoS, SubscribeFilter, SubscribeReasonCode};
use tracing::{info, warn};

use super::{Inner, SentPublish, lock};
use crate::inbox::{Closed, Inbox};
use crate::{Message, MqttError, Topic};

/// Filters per SUBSCRIBE packet when resubscribing many.
const FILTERS_PER_PACKET: usize = 64;

/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Keeps the broker's subscriptions equal to the table's filters.
pub(super) async fn reconcile_task(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = inner.reconcile.notified() => {}
        }
        loop {
            let (subscribe, unsubscribe) = {
                let mut guard = lock(&inner.table);
                let t = &mut *guard;
                if !inner.connected.load(Ordering::Acquire) {
                    break;
                }
                let subscribe: Vec<String> = t
                    .filters
                    .keys()
                    .filter(|f| !t.broker.contains(*f))
                    .cloned()
                    .collect();
                let unsubscribe: Vec<String> = t
                    .broker
                    .iter()
                    .filter(|f| !t.filters.contains_key(*f))
                    .cloned()
                    .collect();
                for f in &subscribe {
                    t.broker.insert(f.clone());
                }
                for f in &unsubscribe {
                    t.broker.remove(f);
                }
                (subscribe, unsubscribe)
            };
            if subscribe.is_empty() && unsubscribe.is_empty() {
                break;
            }
            for chunk in subscribe.chunks(FILTERS_PER_PACKET) {
                lock(&inner.sent_subscribes).push_back(chunk.to_vec());
                let filters = chunk
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                let sent = tokio::select! {
                    () = inner.stop.cancelled() => return,
                    r = inner.client.subscribe_many(filters) => r,
                };
                if sent.is_err() {
                    lock(&inner.sent_subscribes).pop_back();
                    return;
                }
                inner
                    .counters
                    .broker_subscribes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            for f in unsubscribe {
                let sent = tokio::select! {
                    () = inner.stop.cancelled() => return,
                    r = inner.client.unsubscribe(f) => r,
                };
                if sent.is_err() {
                    return;
                }
                inner
                    .counters
                    .broker_unsubscribes
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Polls the event loop: connects and reconnects, routes messages, matches acks.
pub(super) async fn poll_task(inner: Arc<Inner>, mut eventloop: EventLoop) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            () = inner.stop.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                inner.counters.connects.fetch_add(1, Ordering::Relaxed);
                if !ack.session_present {
                    // The broker kept nothing: every live filter is subscribed again.
                    lock(&inner.table).broker.clear();
                }
                inner.connected.store(true, Ordering::Release);
                info!(message = "MQTT broker connected", broker = %inner.config.broker.host, port = inner.config.broker.port);
                inner.reconcile.notify_one();
            }
            Ok(Event::Incoming(Packet::Publish(p))) => route(&inner, p.topic, p.payload, p.retain),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                inner
                    .counters
                    .broker_subacks
                    .fetch_add(1, Ordering::Relaxed);
                let filters = lock(&inner.subscribe_pkids).remove(&ack.pkid);
                if let Some(filters) = filters {
                    confirm(&inner, &filters, &ack.return_codes);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(w) = lock(&inner.publish_pkids).remove(&ack.pkid) {
                    let _ = w.send(Ok(()));
                }
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                if let Some(filters) = lock(&inner.sent_subscribes).pop_front() {
                    lock(&inner.subscribe_pkids).insert(pkid, filters);
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let sent = lock(&inner.sent_publishes).pop_front();
                if let Some(SentPublish {
                    waiter: Some(w),
                    qos1,
                }) = sent
                {
                    if qos1 {
                        lock(&inner.publish_pkids).insert(pkid, w);
                    } else {
                        let _ = w.send(Ok(()));
                    }
                }
            }
            Ok(_) => {}
            Err(error) => {
                if inner.connected.swap(false, Ordering::AcqRel) {
                    warn!(message = "MQTT broker connection lost", %error);
                } else {
                    warn!(message = "MQTT broker connect failed", %error);
                }
                disconnected(&inner);
                tokio::select! {
                    () = inner.stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    inner.connected.store(false, Ordering::Release);
    let subscribers: Vec<Arc<Inbox>> = lock(&inner.table)
        .subscribers
        .values()
        .map(|s| s.inbox.clone())
        .collect();
    for inbox in subscribers {
        inbox.close(Closed::Stopped);
    }
}

/// The connection is gone: nothing is confirmed any more, waiting subscribes are answered
/// (their filters stay and are subscribed on reconnect), waiting publishes fail.
fn disconnected(inner: &Inner) {
    {
        let mut t = lock(&inner.table);
        t.broker.clear();
        for entry in t.filters.values_mut() {
            entry.confirmed = false;
            entry.refused = false;
            for w in entry.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
    }
    lock(&inner.subscribe_pkids).clear();
    for (_, w) in lock(&inner.publish_pkids).drain() {
        let _ = w.send(Err(MqttError::Unavailable));
    }
}

fn confirm(inner: &Inner, filters: &[String], codes: &[SubscribeReasonCode]) {
    let mut refused = Vec::new();
    {
        let mut t = lock(&inner.table);
        for (i, f) in filters.iter().enumerate() {
            let ok = !matches!(codes.get(i), Some(SubscribeReasonCode::Failure) | None);
            let Some(entry) = t.filters.get_mut(f) else {
                continue;
            };
            if ok {
                entry.confirmed = true;
                for w in entry.waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            } else {
                // Kept in the broker set, so it is not asked for again before a reconnect.
                entry.refused = true;
                for w in entry.waiters.drain(..) {
                    let _ = w.send(Err(MqttError::Refused));
                }
                refused.push(f.clone());
            }
        }
    }
    if !refused.is_empty() {
        warn!(
            message = "MQTT broker refused subscriptions",
            count = refused.len()
        );
    }
}

/// Hands a broker message to every subscriber with a matching filter, once each.
pub(super) fn route(inner: &Inner, topic: String, payload: Bytes, retain: bool) {
    inner
        .counters
        .messages_received
        .fetch_add(1, Ordering::Relaxed);
    if payload.len() > inner.config.max_packet_bytes {
        inner.counters.oversized.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Ok(topic) = Topic::new(topic) else {
        return;
    };
    let message = Arc::new(Message::new(topic, payload, retain));
    let mut t = lock(&inner.table);
    let mut targets: HashSet<u64> = HashSet::new();
    for entry in t.filters.values() {
        if entry.filter.matches(&message.topic) {
            targets.extend(entry.subscribers.iter().copied());
        }
    }
    let mut overflowed = Vec::new();
    let mut delivered = 0u64;
    for id in targets {
        if let Some(s) = t.subscribers.get(&id) {
            if s.inbox.push(message.clone()) {
                delivered += 1;
            } else {
                overflowed.push(id);
            }
        }
    }
    let dropped = !overflowed.is_empty();
    for id in overflowed {
        t.drop_subscriber(id);
        inner.counters.overflows.fetch_add(1, Ordering::Relaxed);
    }
    drop(t);
    inner
        .counters
        .deliveries
        .fetch_add(delivered, Ordering::Relaxed);
    if dropped {
        inner.reconcile.notify_one();
    }
}
