//! The node's fan-out hub for `/v1/app`: one bus subscription per channel, shared by every
//! app session of the node that subscribes to it (reference counted), and one bounded queue
//! per session.
//!
//! Each channel has one task reading its bus subscription. It encodes each frame into a
//! `message` frame once and hands the same bytes to every subscriber's queue without
//! waiting: a queue that would pass its byte limit is marked overflowed (its session closes
//! with 4008), so one slow client never delays the others or grows memory. The task also
//! watches the offsets: a gap (frames the bus dropped, or lost while Redis reconnected) is
//! filled from the channel's history when it can be, and reported to the subscribers as
//! `gap_too_old` when it cannot.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use fleetgate_bus::{Bus, BusError, Channel, Published};
use fleetgate_protocol::app::{AppErrorCode, AppReply, encode_message};
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::metrics::Metrics;

/// Most frames one gap fill reads.
const GAP_FILL_LIMIT: usize = 10_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One frame queued for a session.
pub(crate) struct Item {
    /// The channel it belongs to; empty for answers to the session's own requests (always
    /// delivered).
    pub(crate) channel: Arc<str>,
    /// Its offset; `None` for notices (a gap, a lost subscription).
    pub(crate) offset: Option<u64>,
    /// The encoded frame, shared with the channel's other subscribers.
    pub(crate) frame: Bytes,
    /// When the node had it (for the delivery latency metric).
    pub(crate) at: std::time::Instant,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Item>,
    bytes: usize,
    overflowed: bool,
}

/// A session's queue, bounded in bytes.
pub(crate) struct ClientQueue {
    state: Mutex<QueueState>,
    notify: Notify,
    max_bytes: usize,
}

/// The queue passed its byte limit: the session must close.
pub(crate) struct Overflowed;

impl ClientQueue {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            state: Mutex::default(),
            notify: Notify::new(),
            max_bytes: max_bytes.max(1),
        }
    }

    /// Queues `item` unless that would pass the limit; then the queue is emptied and marked
    /// overflowed, and `false` returned.
    pub(crate) fn push(&self, item: Item) -> bool {
        let mut s = lock(&self.state);
        if s.overflowed {
            return false;
        }
        if s.bytes + item.frame.len() > self.max_bytes {
            s.overflowed = true;
            s.items.clear();
            s.bytes = 0;
            drop(s);
            self.notify.notify_one();
            return false;
        }
        s.bytes += item.frame.len();
        s.items.push_back(item);
        drop(s);
        self.notify.notify_one();
        true
    }

    /// Everything queued, waiting until there is something.
    pub(crate) async fn take(&self) -> Result<Vec<Item>, Overflowed> {
        loop {
            {
                let mut s = lock(&self.state);
                if s.overflowed {
                    return Err(Overflowed);
                }
                if !s.items.is_empty() {
                    s.bytes = 0;
                    return Ok(s.items.drain(..).collect());
                }
            }
            // `notify_one` keeps a permit when nobody waits, so a push between the check
            // and this wait is not missed.
            self.notify.notified().await;
        }
    }
}

/// Whether a channel's bus subscription is up.
#[derive(Clone)]
enum Ready {
    Pending,
    Up,
    Failed(BusError),
}

struct Entry {
    name: Arc<str>,
    clients: Mutex<HashMap<u64, Arc<ClientQueue>>>,
    ready: watch::Receiver<Ready>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Entry {
    /// Hands the frame to every client's queue; counts the ones that overflowed.
    fn fan_out(&self, offset: Option<u64>, frame: Bytes, metrics: &Metrics) {
        let at = std::time::Instant::now();
        for queue in lock(&self.clients).values() {
            let item = Item {
                channel: self.name.clone(),
                offset,
                frame: frame.clone(),
                at,
            };
            if !queue.push(item) {
                metrics.app_overflows.inc();
            }
        }
    }
}

/// A session's membership in a channel; give it back with [`Hub::leave`].
pub(crate) struct Membership {
    entry: Arc<Entry>,
    channel: Channel,
    client: u64,
}

/// The node's channels with app subscribers.
pub(crate) struct Hub {
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    channels: Mutex<HashMap<Channel, Arc<Entry>>>,
}

impl Hub {
    pub(crate) fn new(bus: Arc<dyn Bus>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            bus,
            metrics,
            channels: Mutex::default(),
        })
    }

    /// Adds `queue` (session `client`) to `channel`'s subscribers, subscribing the node on
    /// the bus if it is the first; returns once frames published from now on reach it.
    pub(crate) async fn join(
        self: &Arc<Self>,
        channel: &Channel,
        client: u64,
        queue: Arc<ClientQueue>,
    ) -> Result<Membership, BusError> {
        let entry = {
            let mut channels = lock(&self.channels);
            let entry = channels
                .entry(channel.clone())
                .or_insert_with(|| self.start(channel));
            lock(&entry.clients).insert(client, queue);
            entry.clone()
        };
        let membership = Membership {
            entry: entry.clone(),
            channel: channel.clone(),
            client,
        };
        let mut ready = entry.ready.clone();
        let state = match ready.wait_for(|r| !matches!(r, Ready::Pending)).await {
            Ok(r) => r.clone(),
            Err(_) => Ready::Failed(BusError::Unavailable("channel task ended".into())),
        };
        match state {
            Ready::Failed(error) => {
                self.leave(membership);
                Err(error)
            }
            _ => Ok(membership),
        }
    }

    /// Removes a session from a channel; the last one out unsubscribes the node.
    pub(crate) fn leave(&self, membership: Membership) {
        let mut channels = lock(&self.channels);
        let empty = {
            let mut clients = lock(&membership.entry.clients);
            clients.remove(&membership.client);
            clients.is_empty()
        };
        if empty {
            if channels
                .get(&membership.channel)
                .is_some_and(|e| Arc::ptr_eq(e, &membership.entry))
            {
                channels.remove(&membership.channel);
                self.metrics.app_channels.dec();
            }
            if let Some(task) = lock(&membership.entry.task).take() {
                // Dropping the task's bus subscription unsubscribes.
                task.abort();
            }
        }
    }

    fn start(self: &Arc<Self>, channel: &Channel) -> Arc<Entry> {
        let (ready_tx, ready) = watch::channel(Ready::Pending);
        let entry = Arc::new(Entry {
            name: channel.name().into(),
            clients: Mutex::default(),
            ready,
            task: Mutex::new(None),
        });
        let task = tokio::spawn(channel_task(
            Arc::downgrade(self),
            Arc::downgrade(&entry),
            channel.clone(),
            ready_tx,
        ));
        *lock(&entry.task) = Some(task.abort_handle());
        self.metrics.app_channels.inc();
        entry
    }

    /// Drops `entry` from the table if it is still the channel's.
    fn forget(&self, channel: &Channel, entry: &Arc<Entry>) {
        let mut channels = lock(&self.channels);
        if channels.get(channel).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            channels.remove(channel);
            self.metrics.app_channels.dec();
        }
    }
}

fn notice(channel: &str, code: AppErrorCode, message: &str) -> Bytes {
    let reply = AppReply::Error {
        id: None,
        channel: Some(channel.to_owned()),
        msgid: None,
        code,
        message: message.to_owned(),
    };
    Bytes::from(reply.encode())
}

async fn channel_task(
    hub: std::sync::Weak<Hub>,
    entry: std::sync::Weak<Entry>,
    channel: Channel,
    ready: watch::Sender<Ready>,
) {
    let Some((bus, metrics)) = hub.upgrade().map(|h| (h.bus.clone(), h.metrics.clone())) else {
        return;
    };
    let mut sub = match bus.subscribe(&channel).await {
        Ok(sub) => sub,
        Err(error) => {
            if let (Some(hub), Some(entry)) = (hub.upgrade(), entry.upgrade()) {
                hub.forget(&channel, &entry);
            }
            let _ = ready.send(Ready::Failed(error));
            return;
        }
    };
    let _ = ready.send(Ready::Up);
    let mut last: Option<u64> = None;
    while let Some(published) = sub.recv().await {
        let Some(entry) = entry.upgrade() else {
            return;
        };
        if let Some(l) = last
            && published.offset != l + 1
        {
            fill_gap(&*bus, &channel, &entry, l, &published, &metrics).await;
        }
        last = Some(published.offset);
        let frame = Bytes::from(encode_message(
            &entry.name,
            Some(published.offset),
            &published.frame,
        ));
        metrics.app_frames_fanned_out.inc();
        entry.fan_out(Some(published.offset), frame, &metrics);
    }
    // The bus closed the subscription (it is shutting down): the subscribers hear of it and
    // the next subscribe starts afresh.
    if let (Some(hub), Some(entry)) = (hub.upgrade(), entry.upgrade()) {
        hub.forget(&channel, &entry);
        entry.fan_out(
            None,
            notice(&entry.name, AppErrorCode::Unavailable, "subscription lost"),
            &metrics,
        );
    }
}

/// Frames between `last` and `next` went missing: sends what the history still has, or
/// tells the subscribers that they must re-read state.
async fn fill_gap(
    bus: &dyn Bus,
    channel: &Channel,
    entry: &Entry,
    last: u64,
    next: &Published,
    metrics: &Metrics,
) {
    metrics.app_gaps.inc();
    if next.offset > last {
        match bus.history(channel, Some(last), GAP_FILL_LIMIT).await {
            Ok(h) if h.complete => {
                for p in h.frames.iter().filter(|p| p.offset < next.offset) {
                    let frame = Bytes::from(encode_message(&entry.name, Some(p.offset), &p.frame));
                    entry.fan_out(Some(p.offset), frame, metrics);
                }
                return;
            }
            Ok(_) => {}
            Err(error) => warn!(message = "could not fill a fan-out gap", %error),
        }
    }
    entry.fan_out(
        None,
        notice(
            &entry.name,
            AppErrorCode::GapTooOld,
            "frames were lost and are no longer kept; re-read state",
        ),
        metrics,
    );
}
