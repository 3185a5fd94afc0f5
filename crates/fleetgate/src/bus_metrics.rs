//! The bus's own figures on `/metrics`, read from the backend at scrape time.

use std::sync::Arc;

use fleetgate_bus::memory::MemoryBus;
use fleetgate_bus::redis::RedisBus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The backend a node runs on.
pub(crate) enum BusMetrics {
    Memory(MemoryBus),
    Redis(Arc<RedisBus>),
}

impl std::fmt::Debug for BusMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Memory(_) => "BusMetrics::Memory",
            Self::Redis(_) => "BusMetrics::Redis",
        })
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: usize) -> std::fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for BusMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let (connected, dropped, dropped_node) = match self {
            Self::Memory(bus) => {
                let s = bus.stats();
                gauge(
                    &mut e,
                    "fleetgate_bus_devices",
                    "Registered devices.",
                    s.devices,
                )?;
                gauge(
                    &mut e,
                    "fleetgate_bus_presence_entries",
                    "Presence entries held by the memory bus.",
                    s.presence_entries,
                )?;
                gauge(
                    &mut e,
                    "fleetgate_bus_queued_commands",
                    "Commands waiting in device queues.",
                    s.queued_commands,
                )?;
                (true, s.dropped_messages, s.dropped_node_messages)
            }
            Self::Redis(bus) => {
                let s = bus.stats();
                counter(
                    &mut e,
                    "fleetgate_bus_pubsub_lagged",
                    "Pub/sub messages missed because a reader fell behind its Redis connection.",
                    s.lagged_messages,
                )?;
                counter(
                    &mut e,
                    "fleetgate_bus_corrupt_messages",
                    "Node messages that could not be decoded.",
                    s.corrupt_messages,
                )?;
                counter(
                    &mut e,
                    "fleetgate_bus_resubscribe_failures",
                    "Failed attempts to re-issue pub/sub subscriptions after a Redis reconnect.",
                    s.resubscribe_failures,
                )?;
                gauge(
                    &mut e,
                    "fleetgate_bus_shards",
                    "Redis shards configured.",
                    bus.shard_count(),
                )?;
                (
                    bus.is_connected(),
                    s.dropped_messages,
                    s.dropped_node_messages,
                )
            }
        };
        gauge(
            &mut e,
            "fleetgate_bus_connected",
            "1 while every bus link and subscription is up.",
            usize::from(connected),
        )?;
        counter(
            &mut e,
            "fleetgate_bus_fanout_dropped",
            "Fan-out frames dropped because a local subscriber was full.",
            dropped,
        )?;
        counter(
            &mut e,
            "fleetgate_bus_node_messages_dropped",
            "Node messages dropped because this node's receiver was full (each is followed by a resync).",
            dropped_node,
        )
    }
}

/// The admin API's figures on `/metrics`, read at scrape time.
#[derive(Debug)]
pub(crate) struct AdminMetrics(pub(crate) fleetgate_admin::Admin);

impl Collector for AdminMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        counter(
            &mut e,
            "fleetgate_audit_response_failures",
            "Audit response entries that could not be written after their request had run.",
            self.0.audit_failures(),
        )
    }
}
