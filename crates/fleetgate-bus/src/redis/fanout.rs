//! Fan-out channels on Redis: offsets, history and the watch that gates both.
//!
//! A channel's position hash (`pos:<channel>`: epoch and last offset) exists only while the
//! channel is watched: every node with a local subscriber refreshes it (and creates it with
//! a new epoch when missing) every third of the history TTL and after each reconnect, and
//! reading history refreshes it too. A publish on a channel without one writes the retained
//! value at most: no offset, no history, no `PUBLISH`, so a fleet of devices nobody watches
//! costs one script call per message and no pub/sub traffic. Frames go out as
//! `<offset> <frame>`; the reader task splits them without copying the frame.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use fred::types::Value;
use tokio::sync::{Notify, mpsc};

use super::{Inner, RedisBus, pubsub, v};
use crate::{BusResult, Channel, ChannelPosition, History, Published, Subscription};

/// Position hashes per watch script call.
const WATCH_BATCH: usize = 500;

fn epoch_prefix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Splits a published `<offset> <frame>` payload; `None` if it is not one.
pub(super) fn split_published(payload: Bytes) -> Option<Published> {
    let space = payload.iter().position(|b| *b == b' ')?;
    let offset = std::str::from_utf8(&payload[..space]).ok()?.parse().ok()?;
    Some(Published {
        offset,
        frame: payload.slice(space + 1..),
    })
}

impl RedisBus {
    fn ttl_ms(&self) -> u64 {
        self.inner.config.history.ttl.as_millis().max(1000) as u64
    }

    fn position_key(&self, channel: &Channel) -> String {
        self.key("pos:", &channel.name())
    }

    /// The keys a publish to `channel` touches: position hash, history stream, retained value.
    pub(super) fn publish_keys(&self, channel: &Channel) -> [String; 3] {
        let name = channel.name();
        [
            self.key("pos:", &name),
            self.key("hist:", &name),
            self.key("ret:", &name),
        ]
    }

    /// Publishes `frame` to `channels`: one script call per shard, the shards at once.
    pub(super) async fn fanout_publish(
        &self,
        channels: &[(Channel, bool)],
        frame: Bytes,
    ) -> BusResult<()> {
        let mut by_shard: BTreeMap<usize, (Vec<String>, Vec<Value>)> = BTreeMap::new();
        for (channel, retain) in channels {
            let (keys, args) = by_shard.entry(self.channel_shard(channel)).or_default();
            keys.extend(self.publish_keys(channel));
            args.extend([
                v(self.channel_name(channel)),
                v(if *retain { "1" } else { "0" }),
            ]);
        }
        let now = now_ms();
        let calls = by_shard.into_iter().map(|(shard, (keys, per_channel))| {
            let mut args = vec![
                Value::Bytes(frame.clone()),
                Value::Integer(now),
                Value::Integer(self.inner.config.history.size as i64),
                Value::Integer(self.ttl_ms() as i64),
            ];
            args.extend(per_channel);
            self.eval(shard, &self.inner.scripts.fanout_publish, keys, args)
        });
        for result in futures_util::future::join_all(calls).await {
            result?;
        }
        Ok(())
    }

    /// Watches `channels` (creating their positions) on their shards.
    pub(super) async fn fanout_watch(&self, channels: &[Channel]) -> BusResult<()> {
        let mut by_shard: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for c in channels {
            by_shard
                .entry(self.channel_shard(c))
                .or_default()
                .push(self.position_key(c));
        }
        for (shard, keys) in by_shard {
            for chunk in keys.chunks(WATCH_BATCH) {
                self.eval(
                    shard,
                    &self.inner.scripts.fanout_watch,
                    chunk.to_vec(),
                    vec![Value::Integer(self.ttl_ms() as i64), v(epoch_prefix())],
                )
                .await?;
            }
        }
        Ok(())
    }

    pub(super) async fn fanout_subscribe(&self, channel: &Channel) -> BusResult<Subscription> {
        let shard = self.channel_shard(channel);
        let name = self.channel_name(channel);
        // Watched before the subscription goes live, so nothing published after `subscribe`
        // returns is skipped as unwatched.
        self.fanout_watch(std::slice::from_ref(channel)).await?;
        let (tx, rx) = mpsc::channel(self.inner.config.subscription_capacity);
        let id = self.inner.router.add_subscriber(&name, tx);
        let guard = pubsub::Guard {
            router: Arc::downgrade(&self.inner.router),
            shard,
            channel: name.clone(),
            id,
        };
        // On failure the guard drops here, unregistering the subscriber.
        self.inner.router.confirm(shard, &name, Some(id)).await?;
        Ok(Subscription::new(rx, guard))
    }

    pub(super) async fn fanout_history(
        &self,
        channel: &Channel,
        since: Option<u64>,
        limit: usize,
    ) -> BusResult<History> {
        let name = channel.name();
        let reply = self
            .eval(
                self.channel_shard(channel),
                &self.inner.scripts.fanout_history,
                vec![self.key("pos:", &name), self.key("hist:", &name)],
                vec![
                    Value::Integer(self.ttl_ms() as i64),
                    v(epoch_prefix()),
                    v(since.map(|s| s.to_string()).unwrap_or_default()),
                    Value::Integer(limit.max(1) as i64),
                    Value::Integer(now_ms()),
                ],
            )
            .await?;
        let corrupt = || crate::BusError::Corrupt("bad history reply".into());
        let Value::Array(items) = reply else {
            return Err(corrupt());
        };
        let mut items = items.into_iter();
        let epoch = items
            .next()
            .and_then(|e| e.into_string())
            .ok_or_else(corrupt)?;
        let offset = items.next().and_then(|n| n.as_u64()).ok_or_else(corrupt)?;
        let complete = items.next().and_then(|c| c.as_u64()).ok_or_else(corrupt)? == 1;
        let mut frames = Vec::new();
        while let (Some(off), Some(frame)) = (items.next(), items.next()) {
            frames.push(Published {
                offset: off.as_u64().ok_or_else(corrupt)?,
                frame: frame.into_bytes().ok_or_else(corrupt)?,
            });
        }
        Ok(History {
            position: ChannelPosition { epoch, offset },
            frames,
            complete,
        })
    }
}

/// Keeps the positions of every channel this process subscribes to alive: every third of
/// the TTL, and at once when a subscriber connection came back (Redis may have lost them).
pub(super) async fn watch_task(inner: Weak<Inner>, rewatch: Arc<Notify>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate, and nothing is subscribed yet.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = rewatch.notified() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let bus = RedisBus { inner };
        let prefix = bus.key("ch:", "");
        let channels: Vec<Channel> = bus
            .inner
            .router
            .fanout_channels()
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix).and_then(Channel::parse))
            .collect();
        if let Err(error) = bus.fanout_watch(&channels).await {
            tracing::warn!(message = "refreshing watched channels failed", %error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_payloads_split_at_the_first_space() {
        let p = split_published(Bytes::from_static(b"42 {\"a\": 1}")).unwrap();
        assert_eq!(p.offset, 42);
        assert_eq!(&p.frame[..], b"{\"a\": 1}");
        assert!(split_published(Bytes::from_static(b"x {}")).is_none());
        assert!(split_published(Bytes::from_static(b"12")).is_none());
    }
}
