//! The memory backend's alerts: a bounded stream of records and the open alerts by ID.

use std::collections::{HashMap, VecDeque};

use crate::{AlertRecord, StreamId};

/// The alerts stream (the oldest records trimmed past `max_len`) and the open set.
pub(super) struct Alerts {
    max_len: usize,
    records: VecDeque<((u64, u64), String)>,
    open: HashMap<String, String>,
}

impl Alerts {
    pub(super) fn new(max_len: usize) -> Self {
        Self {
            max_len: max_len.max(1),
            records: VecDeque::new(),
            open: HashMap::new(),
        }
    }

    pub(super) fn record(&mut self, wall_ms: u64, id: &str, alert: &str, open: bool) -> StreamId {
        let last = self.records.back().map_or((0, 0), |(id, _)| *id);
        // Strictly increasing even when the clock stands still or steps back.
        let pos = if wall_ms > last.0 {
            (wall_ms, 0)
        } else {
            (last.0, last.1 + 1)
        };
        self.records.push_back((pos, alert.to_owned()));
        while self.records.len() > self.max_len {
            self.records.pop_front();
        }
        if open {
            self.open.insert(id.to_owned(), alert.to_owned());
        } else {
            self.open.remove(id);
        }
        super::format_stream_id(pos)
    }

    pub(super) fn open(&self, id: &str) -> Option<String> {
        self.open.get(id).cloned()
    }

    pub(super) fn all_open(&self, limit: usize) -> Vec<String> {
        self.open.values().take(limit).cloned().collect()
    }

    pub(super) fn read(&self, after: Option<(u64, u64)>, limit: usize) -> Vec<AlertRecord> {
        let from = after.map_or(0, |a| self.records.partition_point(|(id, _)| *id <= a));
        self.records
            .iter()
            .skip(from)
            .take(limit)
            .map(|(id, alert)| AlertRecord {
                id: super::format_stream_id(*id),
                alert: alert.clone(),
            })
            .collect()
    }
}
