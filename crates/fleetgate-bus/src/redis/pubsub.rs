//! Pub/sub plumbing: one subscriber connection per shard, a control task per shard that
//! issues `SUBSCRIBE`/`UNSUBSCRIBE` one at a time, and a reader task per shard that hands
//! each message to the local receivers without ever waiting on them.
//!
//! Local subscribers share one Redis subscription per channel (reference counting through
//! the router's table): the first local subscribe of a channel makes the control task
//! subscribe; dropping the last asks it to unsubscribe, which it does only if, when it gets
//! to the request, nobody subscribed again in between. Because the control task handles
//! requests in order and each local subscribe waits for its own request's confirmation, a
//! subscription is live in Redis once `subscribe` returns.
//!
//! A new local fan-out subscriber starts receiving at a *marker*: once the Redis subscription
//! is confirmed, the control task publishes a token on this bus's private marker channel
//! (which every subscriber connection listens to), and the reader task switches the
//! subscriber on when the token comes through. Redis delivers a connection's messages in
//! publish order, so the subscriber gets exactly the frames published after the marker, which
//! includes everything published after `subscribe` returns, and nothing published before it
//! was called (say, frames still in flight for an earlier subscription of the channel).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::interfaces::PubsubInterface;
use fred::types::{Message, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use super::{codec, fred_err};
use crate::node_tx::NodeTx;
use crate::{BusError, BusResult, NodeMessage, Published};

/// Capacity of each shard's control queue.
const CONTROL_CAPACITY: usize = 1024;

/// A request to a shard's control task.
pub(super) enum Control {
    /// Make sure the shard's connection subscribes to the channel, then answer (through the
    /// marker for fan-out subscriber `sub`, directly for node channels).
    Subscribe {
        channel: String,
        sub: Option<u64>,
        done: oneshot::Sender<BusResult<()>>,
    },
    /// Unsubscribe, unless a local subscriber wants the channel again.
    Unsubscribe { channel: String },
}

/// A local fan-out subscriber.
struct Sub {
    id: u64,
    tx: mpsc::Sender<Published>,
    /// Receiving (its marker came through).
    live: bool,
}

/// A subscriber waiting for its marker.
struct Marker {
    channel: String,
    id: u64,
    done: oneshot::Sender<BusResult<()>>,
}

/// Who receives what arrives on each Redis channel.
#[derive(Default)]
struct Table {
    channels: HashMap<String, Vec<Sub>>,
    nodes: HashMap<String, NodeTx>,
    markers: HashMap<u64, Marker>,
    next_id: u64,
}

impl Table {
    fn wanted(&self, channel: &str) -> bool {
        self.channels.get(channel).is_some_and(|s| !s.is_empty())
            || self.nodes.get(channel).is_some_and(|n| !n.is_closed())
    }
}

/// State shared by the bus, the per-shard tasks and subscription guards.
pub(super) struct Router {
    table: Mutex<Table>,
    control: Vec<mpsc::Sender<Control>>,
    /// This bus's marker channel (the same name on every shard).
    pub(super) marker_channel: String,
    /// How long a subscribe waits for its confirmation.
    timeout: Duration,
    /// Fan-out frames dropped because a local subscriber was full.
    pub(super) dropped: AtomicU64,
    /// Node messages dropped because the node's receiver was full.
    pub(super) dropped_node: AtomicU64,
    /// Messages the reader tasks missed because fred's broadcast buffer overflowed.
    pub(super) lagged: AtomicU64,
    /// Node messages that could not be decoded.
    pub(super) corrupt: AtomicU64,
    /// Attempts to re-issue the subscriptions after a reconnect that failed.
    pub(super) resubscribe_failures: AtomicU64,
    /// Asks the watch task to refresh every subscribed channel's position now.
    pub(super) rewatch: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Router {
    /// A router for `shards` shards and the receiving ends of their control queues.
    pub(super) fn new(
        shards: usize,
        marker_channel: String,
        timeout: Duration,
    ) -> (Arc<Self>, Vec<mpsc::Receiver<Control>>) {
        let (control, receivers): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| mpsc::channel(CONTROL_CAPACITY)).unzip();
        let router = Arc::new(Self {
            table: Mutex::default(),
            control,
            marker_channel,
            timeout,
            dropped: AtomicU64::new(0),
            dropped_node: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            resubscribe_failures: AtomicU64::new(0),
            rewatch: Arc::new(Notify::new()),
        });
        (router, receivers)
    }

    fn wanted(&self, channel: &str) -> bool {
        lock(&self.table).wanted(channel)
    }

    /// Asks shard `shard` to subscribe to `channel` and waits for the confirmation (for
    /// fan-out subscriber `sub`: until it is live).
    pub(super) async fn confirm(
        &self,
        shard: usize,
        channel: &str,
        sub: Option<u64>,
    ) -> BusResult<()> {
        let stopped = || BusError::Unavailable("subscriber task stopped".into());
        let (done, rx) = oneshot::channel();
        self.control[shard]
            .send(Control::Subscribe {
                channel: channel.to_owned(),
                sub,
                done,
            })
            .await
            .map_err(|_| stopped())?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(result) => result.map_err(|_| stopped())?,
            Err(_) => Err(BusError::Unavailable(format!(
                "subscription to {channel} not confirmed within {:?}",
                self.timeout
            ))),
        }
    }

    fn request_unsubscribe(&self, shard: usize, channel: &str) {
        let msg = Control::Unsubscribe {
            channel: channel.to_owned(),
        };
        if let Err(TrySendError::Full(msg)) = self.control[shard].try_send(msg) {
            // Never block a drop; finish the request on the runtime if there is one (else
            // the Redis subscription lingers until the next unsubscribe of the channel).
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let tx = self.control[shard].clone();
                rt.spawn(async move {
                    let _ = tx.send(msg).await;
                });
            }
        }
    }

    /// Registers a local fan-out subscriber on the Redis channel; returns its ID.
    pub(super) fn add_subscriber(&self, channel: &str, tx: mpsc::Sender<Published>) -> u64 {
        let mut table = lock(&self.table);
        let id = table.next_id;
        table.next_id += 1;
        table
            .channels
            .entry(channel.to_owned())
            .or_default()
            .push(Sub {
                id,
                tx,
                live: false,
            });
        id
    }

    /// Installs the node's receiver, replacing (closing) any earlier one.
    pub(super) fn set_node(&self, channel: &str, tx: mpsc::Sender<NodeMessage>) {
        lock(&self.table)
            .nodes
            .insert(channel.to_owned(), NodeTx::new(tx));
    }

    /// Messages to every local node receiver may have been lost (a subscriber connection
    /// came back, or the reader lagged): each is owed a [`NodeMessage::Resync`], sent now if
    /// it has room, else before its next message.
    pub(super) fn resync_nodes(&self) {
        let mut table = lock(&self.table);
        table.nodes.retain(|_, node| node.resync().is_ok());
    }

    /// The Redis channels with a local fan-out subscriber.
    pub(super) fn fanout_channels(&self) -> Vec<String> {
        lock(&self.table)
            .channels
            .iter()
            .filter(|(_, subs)| !subs.is_empty())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Local subscriber and node channel counts, for tests and metrics.
    pub(super) fn counts(&self, channel: &str) -> usize {
        lock(&self.table).channels.get(channel).map_or(0, Vec::len)
    }

    fn dispatch(&self, channel: &str, value: Value, node_prefix: &str) {
        if channel == self.marker_channel {
            self.marker(value);
            return;
        }
        if channel.starts_with(node_prefix) {
            let Some(bytes) = value.into_bytes() else {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let message = match codec::decode_node_message(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    self.corrupt.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(channel, error = %e, "dropping undecodable node message");
                    return;
                }
            };
            let closed = {
                let mut table = lock(&self.table);
                let Some(node) = table.nodes.get_mut(channel) else {
                    return;
                };
                let closed = node.send(message, &self.dropped_node).is_err();
                if closed {
                    table.nodes.remove(channel);
                }
                closed
            };
            if closed {
                for shard in 0..self.control.len() {
                    self.request_unsubscribe(shard, channel);
                }
            }
            return;
        }
        let Some(published) = value.into_bytes().and_then(super::fanout::split_published) else {
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let table = lock(&self.table);
        let Some(subs) = table.channels.get(channel) else {
            return;
        };
        let mut dropped = 0;
        for sub in subs.iter().filter(|s| s.live) {
            if let Err(TrySendError::Full(_)) = sub.tx.try_send(published.clone()) {
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

impl Router {
    /// A marker came through: its subscriber is live from here on.
    fn marker(&self, value: Value) {
        let token = value.as_str().and_then(|t| t.parse::<u64>().ok());
        let Some(token) = token else {
            return;
        };
        let mut table = lock(&self.table);
        let Some(marker) = table.markers.remove(&token) else {
            return;
        };
        if let Some(sub) = table
            .channels
            .get_mut(&marker.channel)
            .and_then(|subs| subs.iter_mut().find(|s| s.id == marker.id))
        {
            sub.live = true;
        }
        let _ = marker.done.send(Ok(()));
    }

    fn add_marker(&self, channel: String, id: u64, done: oneshot::Sender<BusResult<()>>) -> u64 {
        let mut table = lock(&self.table);
        let token = table.next_id;
        table.next_id += 1;
        table.markers.insert(token, Marker { channel, id, done });
        token
    }

    fn fail_marker(&self, token: u64, error: BusError) {
        if let Some(marker) = lock(&self.table).markers.remove(&token) {
            let _ = marker.done.send(Err(error));
        }
    }
}

/// Unregisters a fan-out subscriber when dropped.
pub(super) struct Guard {
    pub(super) router: Weak<Router>,
    pub(super) shard: usize,
    pub(super) channel: String,
    pub(super) id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(router) = self.router.upgrade() else {
            return;
        };
        let last = {
            let mut table = lock(&router.table);
            let Some(subs) = table.channels.get_mut(&self.channel) else {
                return;
            };
            subs.retain(|s| s.id != self.id);
            if subs.is_empty() {
                table.channels.remove(&self.channel);
                true
            } else {
                false
            }
        };
        if last {
            router.request_unsubscribe(self.shard, &self.channel);
        }
    }
}

/// Runs one shard's control queue until the bus is dropped.
pub(super) async fn control_task(
    router: Weak<Router>,
    client: SubscriberClient,
    publisher: Client,
    mut rx: mpsc::Receiver<Control>,
) {
    let mut active: HashSet<String> = HashSet::new();
    while let Some(op) = rx.recv().await {
        let Some(router) = router.upgrade() else {
            return;
        };
        match op {
            Control::Subscribe { channel, sub, done } => {
                let result = if active.contains(&channel) {
                    Ok(())
                } else {
                    match client.subscribe(channel.clone()).await {
                        Ok(()) => {
                            active.insert(channel.clone());
                            Ok(())
                        }
                        Err(e) => Err(fred_err(e)),
                    }
                };
                match (result, sub) {
                    (Ok(()), Some(id)) => {
                        let token = router.add_marker(channel, id, done);
                        let sent = publisher
                            .publish::<i64, _, _>(router.marker_channel.clone(), token.to_string())
                            .await;
                        if let Err(e) = sent {
                            router.fail_marker(token, fred_err(e));
                        }
                    }
                    (result, _) => {
                        let _ = done.send(result);
                    }
                }
            }
            Control::Unsubscribe { channel } => {
                if !router.wanted(&channel)
                    && active.remove(&channel)
                    && let Err(e) = client.unsubscribe(channel.clone()).await
                {
                    tracing::warn!(channel, error = %e, "redis unsubscribe failed");
                }
            }
        }
    }
}

/// Reads one shard's messages until its connection closes or the bus is dropped. `rx` must
/// be taken from the subscriber client before any subscription is made (a broadcast receiver
/// sees only messages sent after it was created).
pub(super) async fn reader_task(
    router: Weak<Router>,
    mut rx: broadcast::Receiver<Message>,
    node_prefix: String,
) {
    loop {
        match rx.recv().await {
            Ok(message) => {
                let Some(router) = router.upgrade() else {
                    return;
                };
                router.dispatch(&message.channel, message.value, &node_prefix);
            }
            Err(RecvError::Lagged(n)) => {
                let Some(router) = router.upgrade() else {
                    return;
                };
                router.lagged.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(missed = n, "redis pub/sub reader lagged");
                router.resync_nodes();
            }
            Err(RecvError::Closed) => return,
        }
    }
}
