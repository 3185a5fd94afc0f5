//! The node's one MQTT client: a `rumqttc::AsyncClient` whose `EventLoop` is polled by one
//! task, plus a reconciler task that keeps the broker's subscriptions equal to the filters
//! the node's subscribers hold.
//!
//! - **Reference counting.** The table maps each filter to the subscribers holding it. The
//!   first subscriber makes the reconciler SUBSCRIBE, the last one out makes it UNSUBSCRIBE.
//!   The reconciler works from the difference between the table and what the broker was
//!   asked, so requests that cross (a leave and a join of the same filter) settle correctly.
//! - **Reconnects.** The session is clean (nothing is kept by the broker), and rumqttc does
//!   not resubscribe by itself: on every ConnAck without a kept session the broker set is
//!   reset and the reconciler subscribes every live filter again.
//! - **Acks.** rumqttc picks packet IDs itself and reports them as `Outgoing` events in the
//!   order it takes requests. Its request channel has capacity 0 (a rendezvous), so a request
//!   is never parked in a buffer that a reconnect would throw away; subscribes are sent by the
//!   reconciler alone and publishes one at a time, each recording what it sent in a FIFO
//!   before sending, so the n-th `Outgoing::Subscribe` (or `Publish`) names the n-th entry.
//! - **Routing.** Each PUBLISH is matched against every live filter; each subscriber gets it
//!   once however many of its filters match, through a queue bounded in bytes and messages.
//!   A subscriber whose queue is full is dropped from every filter (it learns from
//!   [`Subscriber::recv`]), never allowed to grow memory.

use bytes::Bytes;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

mod config;
mod tasks;

pub use config::{BridgeConfig, BrokerAddr, Stats};

use crate::inbox::{Closed, Inbox};
use crate::{Delivery, MqttError, Qos, Topic, TopicFilter};

/// Largest packet accepted from the broker. rumqttc drops the connection on a bigger one,
/// and one oversized message on a subscribed topic would then make the node reconnect over
/// and over; messages past `max_packet_bytes` are instead dropped when routed.
const MAX_INCOMING_PACKET: usize = 16 << 20;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    broker_subscribes: AtomicU64,
    broker_subacks: AtomicU64,
    broker_unsubscribes: AtomicU64,
    messages_received: AtomicU64,
    deliveries: AtomicU64,
    published: AtomicU64,
    overflows: AtomicU64,
    oversized: AtomicU64,
}

type Waiter = oneshot::Sender<Result<(), MqttError>>;

struct FilterEntry {
    filter: TopicFilter,
    subscribers: HashSet<u64>,
    /// The broker acknowledged it on the current connection.
    confirmed: bool,
    /// The broker refused it on the current connection (asked again after a reconnect).
    refused: bool,
    waiters: Vec<Waiter>,
}

struct SubscriberEntry {
    inbox: Arc<Inbox>,
    filters: HashSet<String>,
}

#[derive(Default)]
struct Table {
    filters: HashMap<String, FilterEntry>,
    subscribers: HashMap<u64, SubscriberEntry>,
    /// Filters the broker was asked for on this connection and not released since.
    broker: HashSet<String>,
    next_id: u64,
}

impl Table {
    /// Removes `id` from `filter`; drops the filter when nobody holds it any more.
    fn release(&mut self, id: u64, filter: &str) {
        if let Some(entry) = self.filters.get_mut(filter) {
            entry.subscribers.remove(&id);
            if entry.subscribers.is_empty() {
                for w in self
                    .filters
                    .remove(filter)
                    .into_iter()
                    .flat_map(|e| e.waiters)
                {
                    let _ = w.send(Err(MqttError::Unavailable));
                }
            }
        }
    }

    /// Removes a subscriber and every filter it held.
    fn drop_subscriber(&mut self, id: u64) -> Option<Arc<Inbox>> {
        let entry = self.subscribers.remove(&id)?;
        for f in &entry.filters {
            self.release(id, f);
        }
        Some(entry.inbox)
    }
}

/// A publish waiting for the connection to take it (and, at QoS 1, for its PUBACK).
struct SentPublish {
    waiter: Option<Waiter>,
    qos1: bool,
}

struct Inner {
    client: AsyncClient,
    config: BridgeConfig,
    table: Mutex<Table>,
    connected: AtomicBool,
    counters: Counters,
    /// Wakes the reconciler.
    reconcile: Notify,
    /// What each `Outgoing::Subscribe` to come carries, in order.
    sent_subscribes: Mutex<VecDeque<Vec<String>>>,
    /// Filters of SUBSCRIBE packets sent, by packet ID, until their SUBACK.
    subscribe_pkids: Mutex<HashMap<u16, Vec<String>>>,
    /// Serialises publishes so that `sent_publishes` is in the order rumqttc takes them.
    publish_turn: tokio::sync::Mutex<()>,
    sent_publishes: Mutex<VecDeque<SentPublish>>,
    publish_pkids: Mutex<HashMap<u16, Waiter>>,
    stop: CancellationToken,
}

/// The node's shared MQTT client (a cheap `Clone` handle).
#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("broker", &self.inner.config.broker)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Bridge {
    /// Starts the client's tasks; it connects (and reconnects) in the background. The tasks
    /// end when `stop` is cancelled, and every subscriber then receives
    /// [`Closed::Stopped`].
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns the tasks).
    pub fn start(config: BridgeConfig, stop: CancellationToken) -> Self {
        let mut options = MqttOptions::new(
            config.client_id.clone(),
            config.broker.host.clone(),
            config.broker.port,
        );
        options
            .set_keep_alive(config.keep_alive)
            .set_clean_session(true)
            .set_max_packet_size(
                MAX_INCOMING_PACKET.max(config.max_packet_bytes + 1024),
                config.max_packet_bytes + 1024,
            );
        if let Some(user) = &config.username {
            options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
        }
        // Capacity 0: see the module docs (no request may wait in a buffer across reconnects).
        let (client, eventloop) = AsyncClient::new(options, 0);
        let inner = Arc::new(Inner {
            client,
            config,
            table: Mutex::default(),
            connected: AtomicBool::new(false),
            counters: Counters::default(),
            reconcile: Notify::new(),
            sent_subscribes: Mutex::default(),
            subscribe_pkids: Mutex::default(),
            publish_turn: tokio::sync::Mutex::new(()),
            sent_publishes: Mutex::default(),
            publish_pkids: Mutex::default(),
            stop,
        });
        tokio::spawn(tasks::poll_task(inner.clone(), eventloop));
        tokio::spawn(tasks::reconcile_task(inner.clone()));
        Self { inner }
    }

    /// Whether the broker connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
    }

    /// Counts for metrics.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let (filters, filters_confirmed, subscribers) = {
            let t = lock(&self.inner.table);
            let confirmed = t.filters.values().filter(|f| f.confirmed).count();
            (
                t.filters.len() as u64,
                confirmed as u64,
                t.subscribers.len() as u64,
            )
        };
        Stats {
            connected: self.is_connected(),
            connects: c.connects.load(Ordering::Relaxed),
            filters,
            filters_confirmed,
            subscribers,
            broker_subscribes: c.broker_subscribes.load(Ordering::Relaxed),
            broker_subacks: c.broker_subacks.load(Ordering::Relaxed),
            broker_unsubscribes: c.broker_unsubscribes.load(Ordering::Relaxed),
            messages_received: c.messages_received.load(Ordering::Relaxed),
            deliveries: c.deliveries.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            overflows: c.overflows.load(Ordering::Relaxed),
            oversized: c.oversized.load(Ordering::Relaxed),
        }
    }

    /// A new subscriber whose queue holds at most `max_bytes` (see [`Message::size`]) and
    /// `max_messages`. It holds no filter yet; dropping it releases every filter it holds.
    pub fn subscriber(&self, max_bytes: usize, max_messages: usize) -> Subscriber {
        let inbox = Arc::new(Inbox::new(max_bytes, max_messages));
        let mut t = lock(&self.inner.table);
        t.next_id += 1;
        let id = t.next_id;
        t.subscribers.insert(
            id,
            SubscriberEntry {
                inbox: inbox.clone(),
                filters: HashSet::new(),
            },
        );
        Subscriber {
            bridge: self.clone(),
            id,
            inbox,
        }
    }

    /// Publishes towards the broker. QoS 0 answers once the connection took the message,
    /// QoS 1 once the broker acknowledged it.
    ///
    /// # Errors
    /// [`MqttError::Unavailable`] while the broker is not connected or does not answer within
    /// the request timeout; [`MqttError::TooLarge`] past the packet limit.
    pub async fn publish(
        &self,
        topic: &Topic,
        payload: Bytes,
        qos: Qos,
        retain: bool,
    ) -> Result<(), MqttError> {
        let inner = &self.inner;
        if payload.len() + topic.as_str().len() > inner.config.max_packet_bytes {
            return Err(MqttError::TooLarge(inner.config.max_packet_bytes));
        }
        if !self.is_connected() {
            return Err(MqttError::Unavailable);
        }
        let timeout = inner.config.request_timeout;
        let (tx, rx) = oneshot::channel();
        let qos1 = qos == Qos::AtLeastOnce;
        let Ok(turn) = tokio::time::timeout(timeout, inner.publish_turn.lock()).await else {
            return Err(MqttError::Unavailable);
        };
        lock(&inner.sent_publishes).push_back(SentPublish {
            waiter: Some(tx),
            qos1,
        });
        let mqtt_qos = if qos1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let send = inner
            .client
            .publish_bytes(topic.as_str(), mqtt_qos, retain, payload);
        match tokio::time::timeout(timeout, send).await {
            Ok(Ok(())) => {}
            _ => {
                // Not taken by the connection; the turn is still ours, so our entry is last.
                lock(&inner.sent_publishes).pop_back();
                return Err(MqttError::Unavailable);
            }
        }
        drop(turn);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => {
                inner.counters.published.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(e),
            _ => Err(MqttError::Unavailable),
        }
    }
}

/// One consumer of broker messages: a set of filters and a bounded queue.
pub struct Subscriber {
    bridge: Bridge,
    id: u64,
    inbox: Arc<Inbox>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber").field("id", &self.id).finish()
    }
}

impl Subscriber {
    /// Adds `filter`. The first subscriber of a filter on this node makes the bridge
    /// SUBSCRIBE and waits for the SUBACK; later ones share it. While the broker is down the
    /// filter is kept and subscribed on reconnect, and this returns at once.
    ///
    /// # Errors
    /// [`MqttError::Refused`] when the broker refuses it, [`MqttError::Unavailable`] when it
    /// does not answer in time, [`MqttError::Closed`] for a dropped subscriber. The filter is
    /// not held after an error.
    pub async fn subscribe(&self, filter: &TopicFilter) -> Result<(), MqttError> {
        let inner = &self.bridge.inner;
        let key = filter.as_str().to_owned();
        let wait = {
            let mut guard = lock(&inner.table);
            let t = &mut *guard;
            let Some(me) = t.subscribers.get_mut(&self.id) else {
                return Err(MqttError::Closed(Closed::Overflowed));
            };
            if !me.filters.insert(key.clone()) {
                return Ok(());
            }
            let on_broker = t.broker.contains(&key);
            let entry = t.filters.entry(key.clone()).or_insert_with(|| FilterEntry {
                filter: filter.clone(),
                subscribers: HashSet::new(),
                // Still subscribed from an earlier holder whose UNSUBSCRIBE was never sent.
                confirmed: on_broker,
                refused: false,
                waiters: Vec::new(),
            });
            if entry.refused {
                me_release(t, self.id, &key);
                return Err(MqttError::Refused);
            }
            entry.subscribers.insert(self.id);
            if entry.confirmed || !self.bridge.is_connected() {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                entry.waiters.push(tx);
                Some(rx)
            }
        };
        inner.reconcile.notify_one();
        let Some(rx) = wait else {
            return Ok(());
        };
        let result = match tokio::time::timeout(inner.config.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            _ => Err(MqttError::Unavailable),
        };
        if result.is_err() {
            self.unsubscribe(filter);
        }
        result
    }

    /// Releases `filter`; the last holder on this node makes the bridge UNSUBSCRIBE.
    /// `false` when it was not held.
    pub fn unsubscribe(&self, filter: &TopicFilter) -> bool {
        let inner = &self.bridge.inner;
        let held = {
            let mut t = lock(&inner.table);
            let held = t
                .subscribers
                .get_mut(&self.id)
                .is_some_and(|me| me.filters.remove(filter.as_str()));
            if held {
                t.release(self.id, filter.as_str());
            }
            held
        };
        if held {
            inner.reconcile.notify_one();
        }
        held
    }

    /// How many filters it holds.
    pub fn filters(&self) -> usize {
        lock(&self.bridge.inner.table)
            .subscribers
            .get(&self.id)
            .map_or(0, |me| me.filters.len())
    }

    /// Every message queued, waiting until there is one. Cancel-safe.
    ///
    /// # Errors
    /// [`Closed`] once the subscriber was dropped for a full queue, or the bridge stopped.
    pub async fn recv(&self) -> Result<Vec<Delivery>, Closed> {
        self.inbox.take().await
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let inner = &self.bridge.inner;
        lock(&inner.table).drop_subscriber(self.id);
        inner.reconcile.notify_one();
    }
}

/// Takes back a filter just added to a subscriber's set.
fn me_release(t: &mut Table, id: u64, filter: &str) {
    if let Some(me) = t.subscribers.get_mut(&id) {
        me.filters.remove(filter);
    }
    t.release(id, filter);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with(subs: &[(u64, &[&str])]) -> (Table, Vec<Arc<Inbox>>) {
        let mut t = Table::default();
        let mut inboxes = Vec::new();
        for (id, filters) in subs {
            let inbox = Arc::new(Inbox::new(1 << 20, 100));
            inboxes.push(inbox.clone());
            t.subscribers.insert(
                *id,
                SubscriberEntry {
                    inbox,
                    filters: filters.iter().map(|f| f.to_string()).collect(),
                },
            );
            for f in *filters {
                t.filters
                    .entry(f.to_string())
                    .or_insert_with(|| FilterEntry {
                        filter: TopicFilter::new(*f).unwrap(),
                        subscribers: HashSet::new(),
                        confirmed: true,
                        refused: false,
                        waiters: Vec::new(),
                    })
                    .subscribers
                    .insert(*id);
            }
        }
        (t, inboxes)
    }

    /// A bridge whose broker never answers (port 9 on loopback: nothing listens there).
    fn offline_bridge() -> (Bridge, CancellationToken) {
        let stop = CancellationToken::new();
        let broker = BrokerAddr::parse("mqtt://127.0.0.1:9").unwrap();
        (
            Bridge::start(BridgeConfig::new(broker, "t"), stop.clone()),
            stop,
        )
    }

    #[tokio::test]
    async fn a_message_reaches_each_subscriber_once_however_many_filters_match() {
        let (bridge, stop) = offline_bridge();
        let a = bridge.subscriber(1 << 20, 100);
        let b = bridge.subscriber(1 << 20, 100);
        for f in ["farm/+/temp", "farm/#", "#"] {
            a.subscribe(&TopicFilter::new(f).unwrap()).await.unwrap();
        }
        b.subscribe(&TopicFilter::new("farm/a/temp").unwrap())
            .await
            .unwrap();
        assert_eq!(bridge.stats().filters, 4);
        tasks::route(
            &bridge.inner,
            "farm/a/temp".into(),
            Bytes::from_static(b"1"),
            false,
        );
        tasks::route(
            &bridge.inner,
            "other".into(),
            Bytes::from_static(b"2"),
            false,
        );
        let got_a: Vec<_> = a
            .recv()
            .await
            .unwrap()
            .iter()
            .map(|m| m.payload.clone())
            .collect();
        let got_b: Vec<_> = b
            .recv()
            .await
            .unwrap()
            .iter()
            .map(|m| m.payload.clone())
            .collect();
        assert_eq!(got_a, [Bytes::from_static(b"1"), Bytes::from_static(b"2")]);
        assert_eq!(got_b, [Bytes::from_static(b"1")]);
        assert_eq!(bridge.stats().deliveries, 3);
        drop(a);
        assert_eq!(bridge.stats().filters, 1, "only b's filter is left");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_full_subscriber_is_dropped_from_every_filter() {
        let (bridge, stop) = offline_bridge();
        let slow = bridge.subscriber(1 << 20, 1);
        slow.subscribe(&TopicFilter::new("a").unwrap())
            .await
            .unwrap();
        tasks::route(&bridge.inner, "a".into(), Bytes::new(), false);
        tasks::route(&bridge.inner, "a".into(), Bytes::new(), false);
        assert_eq!(slow.recv().await.unwrap_err(), Closed::Overflowed);
        let s = bridge.stats();
        assert_eq!((s.filters, s.subscribers, s.overflows), (0, 0, 1));
        assert!(
            bridge
                .publish(
                    &Topic::new("x").unwrap(),
                    Bytes::new(),
                    Qos::AtMostOnce,
                    false
                )
                .await
                .is_err(),
            "offline"
        );
        stop.cancel();
    }

    #[test]
    fn releasing_the_last_holder_drops_the_filter() {
        let (mut t, _inboxes) = table_with(&[(1, &["a/#", "b"]), (2, &["a/#"])]);
        t.drop_subscriber(1);
        assert_eq!(t.filters.len(), 1, "a/# is still held by 2");
        t.release(2, "a/#");
        assert!(t.filters.is_empty());
    }
}
