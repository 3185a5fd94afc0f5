//! Fan-out channels of the memory bus: subscribers, retained values, offsets and history.
//!
//! A channel is watched while it has a subscriber and for the history TTL after the last one
//! left (or after its history was last read); only then do publishes get an offset, enter the
//! history and reach subscribers. A channel that stops being watched loses its offsets and
//! history and starts a new epoch when watched again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;

use super::lock;
use crate::{Channel, ChannelPosition, History, HistoryConfig, Published, Subscription};

/// Every this many subscribes, channels that are neither watched nor retained are dropped.
const SWEEP_EVERY: u64 = 1024;

/// The fan-out state of one memory bus.
pub(super) struct Fanout {
    state: Mutex<PubSub>,
    history: HistoryConfig,
    capacity: usize,
    /// Frames dropped because a subscriber had no room.
    pub(super) dropped: AtomicU64,
    /// Distinguishes this bus's epochs from another process's.
    epoch_base: String,
}

#[derive(Default)]
struct PubSub {
    channels: HashMap<Channel, ChannelState>,
    next_id: u64,
    next_epoch: u64,
}

#[derive(Default)]
struct ChannelState {
    subs: Vec<(u64, mpsc::Sender<Published>)>,
    retained: Option<Bytes>,
    /// The current epoch, `None` while unwatched.
    epoch: Option<String>,
    offset: u64,
    history: VecDeque<(Published, Instant)>,
    /// Watched until then even without subscribers.
    watched_until: Option<Instant>,
}

impl ChannelState {
    fn watched(&self, now: Instant) -> bool {
        !self.subs.is_empty() || self.watched_until.is_some_and(|t| now < t)
    }

    /// Makes the state current: an unwatched channel forgets its stream.
    fn refresh(&mut self, now: Instant) {
        if self.epoch.is_some() && !self.watched(now) {
            self.epoch = None;
            self.offset = 0;
            self.history.clear();
            self.watched_until = None;
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.retained.is_none() && !self.watched(now)
    }
}

impl PubSub {
    /// The channel's state with a current epoch (creating one if needed).
    fn watch(&mut self, channel: &Channel, base: &str, now: Instant) -> &mut ChannelState {
        let next_epoch = &mut self.next_epoch;
        let state = self.channels.entry(channel.clone()).or_default();
        state.refresh(now);
        if state.epoch.is_none() {
            *next_epoch += 1;
            state.epoch = Some(format!("{base}-{next_epoch}"));
        }
        state
    }
}

impl Fanout {
    pub(super) fn new(history: HistoryConfig, capacity: usize) -> Self {
        Self {
            state: Mutex::default(),
            history: HistoryConfig {
                size: history.size,
                ttl: history.ttl.max(std::time::Duration::from_secs(1)),
            },
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
            epoch_base: format!("{:08x}", rand::random::<u32>()),
        }
    }

    /// Channels with state, and subscribers in total (idle channels are freed first).
    pub(super) fn counts(&self) -> (usize, usize) {
        let now = Instant::now();
        let mut p = lock(&self.state);
        p.channels.retain(|_, c| !c.idle(now));
        (
            p.channels.len(),
            p.channels.values().map(|c| c.subs.len()).sum(),
        )
    }

    pub(super) fn subscriber_count(&self, channel: &Channel) -> usize {
        lock(&self.state)
            .channels
            .get(channel)
            .map_or(0, |c| c.subs.len())
    }

    pub(super) fn publish(&self, channel: &Channel, frame: Bytes, retain: bool) {
        let now = Instant::now();
        let mut pubsub = lock(&self.state);
        let state = if retain {
            let state = pubsub.channels.entry(channel.clone()).or_default();
            state.retained = Some(frame.clone());
            state
        } else {
            match pubsub.channels.get_mut(channel) {
                Some(state) => state,
                None => return,
            }
        };
        state.refresh(now);
        if state.epoch.is_none() {
            return;
        }
        state.offset += 1;
        let published = Published {
            offset: state.offset,
            frame,
        };
        if self.history.size > 0 {
            if state.history.len() == self.history.size {
                state.history.pop_front();
            }
            state.history.push_back((published.clone(), now));
        }
        let mut dropped = 0;
        // Closed senders belong to subscriptions being dropped right now; their guard
        // removes them, so skipping them here is enough.
        for (_, tx) in &state.subs {
            if let Err(TrySendError::Full(_)) = tx.try_send(published.clone()) {
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    pub(super) fn subscribe(self: &Arc<Self>, channel: &Channel) -> Subscription {
        let (tx, rx) = mpsc::channel(self.capacity);
        let now = Instant::now();
        let id = {
            let mut pubsub = lock(&self.state);
            let id = pubsub.next_id;
            pubsub.next_id += 1;
            if id % SWEEP_EVERY == SWEEP_EVERY - 1 {
                pubsub.channels.retain(|_, c| !c.idle(now));
            }
            pubsub
                .watch(channel, &self.epoch_base, now)
                .subs
                .push((id, tx));
            id
        };
        let guard = Guard {
            fanout: Arc::downgrade(self),
            channel: channel.clone(),
            id,
        };
        Subscription::new(rx, guard)
    }

    pub(super) fn retained(&self, channel: &Channel) -> Option<Bytes> {
        lock(&self.state)
            .channels
            .get(channel)
            .and_then(|c| c.retained.clone())
    }

    pub(super) fn history(&self, channel: &Channel, since: Option<u64>, limit: usize) -> History {
        let now = Instant::now();
        let ttl = self.history.ttl;
        let mut pubsub = lock(&self.state);
        let state = pubsub.watch(channel, &self.epoch_base, now);
        let until = now + ttl;
        state.watched_until = Some(state.watched_until.map_or(until, |t| t.max(until)));
        let position = ChannelPosition {
            epoch: state.epoch.clone().unwrap_or_default(),
            offset: state.offset,
        };
        let Some(since) = since else {
            return History {
                position,
                frames: Vec::new(),
                complete: true,
            };
        };
        let kept: Vec<&Published> = state
            .history
            .iter()
            .filter(|(p, at)| p.offset > since && now.duration_since(*at) < ttl)
            .map(|(p, _)| p)
            .collect();
        let complete = since <= state.offset
            && (since == state.offset || kept.first().is_some_and(|p| p.offset == since + 1));
        History {
            position,
            frames: kept.into_iter().take(limit).cloned().collect(),
            complete,
        }
    }
}

/// Removes its subscription when dropped; the channel stays watched for the history TTL.
/// Holds the fan-out weakly so that dropping the bus closes outstanding subscriptions
/// instead of keeping the state alive.
struct Guard {
    fanout: Weak<Fanout>,
    channel: Channel,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(fanout) = self.fanout.upgrade() else {
            return;
        };
        let until = Instant::now() + fanout.history.ttl;
        let mut pubsub = lock(&fanout.state);
        if let Some(state) = pubsub.channels.get_mut(&self.channel) {
            state.subs.retain(|(id, _)| *id != self.id);
            if state.subs.is_empty() {
                state.watched_until = Some(state.watched_until.map_or(until, |t| t.max(until)));
            }
        }
    }
}
