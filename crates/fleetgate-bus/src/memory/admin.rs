//! The memory bus's registry with its group index, admin documents, audit log and job
//! executions. Each is a plain structure that the bus keeps behind its own mutex.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use tokio::time::Instant;

use crate::{
    AuditRecord, DeviceQuery, DeviceRecord, Doc, DocExpect, DocKind, DocWrite, JobCounts, JobExec,
    JobExecState, StreamId,
};

/// Provisioned devices, with an index per group so that a scoped listing reads only the
/// devices of its groups.
#[derive(Default)]
pub(super) struct Registry {
    pub(super) devices: BTreeMap<String, DeviceRecord>,
    groups: HashMap<String, BTreeSet<String>>,
}

impl Registry {
    pub(super) fn len(&self) -> usize {
        self.devices.len()
    }

    pub(super) fn get(&self, id: &str) -> Option<&DeviceRecord> {
        self.devices.get(id)
    }

    /// Inserts or replaces a record, keeping the group index in step.
    pub(super) fn put(&mut self, record: DeviceRecord) {
        self.remove(&record.id);
        for g in &record.groups {
            self.groups
                .entry(g.clone())
                .or_default()
                .insert(record.id.clone());
        }
        self.devices.insert(record.id.clone(), record);
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<DeviceRecord> {
        let old = self.devices.remove(id)?;
        for g in &old.groups {
            if let Some(ids) = self.groups.get_mut(g) {
                ids.remove(id);
                if ids.is_empty() {
                    self.groups.remove(g);
                }
            }
        }
        Some(old)
    }

    pub(super) fn query(&self, q: &DeviceQuery) -> Vec<DeviceRecord> {
        let prefix = q.prefix.as_deref().unwrap_or("");
        // Start at the later of the cursor and the prefix.
        let start = match q.after.as_deref() {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let range = (start, Bound::Unbounded);
        let ids: Vec<&String> = match &q.groups {
            None => self
                .devices
                .range::<str, _>(range)
                .map(|(id, _)| id)
                .take_while(|id| id.starts_with(prefix))
                .take(q.limit)
                .collect(),
            Some(groups) => {
                // Each group contributes at most `limit` candidates; their sorted union's first
                // `limit` are the page.
                let mut union = BTreeSet::new();
                for g in groups {
                    if let Some(ids) = self.groups.get(g) {
                        union.extend(
                            ids.range::<str, _>(range)
                                .take_while(|id| id.starts_with(prefix))
                                .take(q.limit),
                        );
                    }
                }
                union.into_iter().take(q.limit).collect()
            }
        };
        ids.into_iter()
            .filter_map(|id| self.devices.get(id).cloned())
            .collect()
    }
}

/// Admin documents by kind and ID.
#[derive(Default)]
pub(super) struct Docs {
    kinds: HashMap<DocKind, BTreeMap<String, Doc>>,
}

impl Docs {
    pub(super) fn put(
        &mut self,
        kind: DocKind,
        id: &str,
        body: &str,
        expect: DocExpect,
    ) -> DocWrite {
        let docs = self.kinds.entry(kind).or_default();
        let current = docs.get(id).map(|d| d.version);
        let ok = match expect {
            DocExpect::Absent => current.is_none(),
            DocExpect::Version(v) => current == Some(v),
            DocExpect::Any => true,
        };
        if !ok {
            return DocWrite::Conflict(current);
        }
        let version = current.unwrap_or(0) + 1;
        docs.insert(
            id.to_owned(),
            Doc {
                id: id.to_owned(),
                version,
                body: body.to_owned(),
            },
        );
        DocWrite::Written(version)
    }

    pub(super) fn get(&self, kind: DocKind, id: &str) -> Option<Doc> {
        self.kinds.get(&kind)?.get(id).cloned()
    }

    pub(super) fn list(&self, kind: DocKind, after: Option<&str>, limit: usize) -> Vec<Doc> {
        let Some(docs) = self.kinds.get(&kind) else {
            return Vec::new();
        };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        docs.range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(_, d)| d.clone())
            .collect()
    }

    pub(super) fn delete(&mut self, kind: DocKind, id: &str) -> bool {
        self.kinds
            .get_mut(&kind)
            .is_some_and(|docs| docs.remove(id).is_some())
    }
}

/// The audit log: entries in append order with Redis-style `<ms>-<seq>` positions.
#[derive(Default)]
pub(super) struct Audit {
    entries: Vec<((u64, u64), String)>,
    head: String,
}

impl Audit {
    pub(super) fn head(&self) -> String {
        self.head.clone()
    }

    pub(super) fn append(
        &mut self,
        wall_ms: u64,
        expected: &str,
        new_head: &str,
        entries: &[String],
    ) -> Option<Vec<StreamId>> {
        if self.head != expected {
            return None;
        }
        let mut ids = Vec::with_capacity(entries.len());
        for e in entries {
            let last = self.entries.last().map_or((0, 0), |(id, _)| *id);
            // Strictly increasing even when the clock stands still or steps back.
            let id = if wall_ms > last.0 {
                (wall_ms, 0)
            } else {
                (last.0, last.1 + 1)
            };
            self.entries.push((id, e.clone()));
            ids.push(super::format_stream_id(id));
        }
        new_head.clone_into(&mut self.head);
        Some(ids)
    }

    pub(super) fn read(&self, after: Option<(u64, u64)>, limit: usize) -> Vec<AuditRecord> {
        let from = after.map_or(0, |a| self.entries.partition_point(|(id, _)| *id <= a));
        self.entries[from..]
            .iter()
            .take(limit)
            .map(|(id, e)| AuditRecord {
                id: super::format_stream_id(*id),
                entry: e.clone(),
            })
            .collect()
    }
}

/// One job's executions.
struct JobData {
    execs: BTreeMap<String, JobExec>,
    /// Devices whose execution is `Queued` (what a cancel takes).
    queued: BTreeSet<String>,
    counts: JobCounts,
    touched: Instant,
}

/// Job executions by job ID. Jobs untouched for the retention period are forgotten: they
/// read as absent at once (as Redis keys expire) and are dropped on the next insert.
pub(super) struct Jobs {
    jobs: HashMap<String, JobData>,
    retention: std::time::Duration,
}

impl Jobs {
    pub(super) fn new(retention: std::time::Duration) -> Self {
        Self {
            jobs: HashMap::new(),
            retention,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// The job, unless its retention has ended.
    fn live(&self, job: &str) -> Option<&JobData> {
        let retention = self.retention;
        self.jobs
            .get(job)
            .filter(|j| j.touched.elapsed() < retention)
    }

    fn live_mut(&mut self, job: &str) -> Option<&mut JobData> {
        let retention = self.retention;
        self.jobs
            .get_mut(job)
            .filter(|j| j.touched.elapsed() < retention)
    }

    pub(super) fn has(&self, job: &str, device: &str) -> bool {
        self.live(job).is_some_and(|j| j.execs.contains_key(device))
    }

    /// Creates an execution (the caller checked that none exists).
    pub(super) fn insert(
        &mut self,
        job: &str,
        device: &str,
        msgid: &str,
        state: JobExecState,
        now_ms: i64,
    ) {
        let now = Instant::now();
        let retention = self.retention;
        // A job past its retention starts anew, like one whose Redis keys expired.
        self.jobs
            .retain(|_, j| now.duration_since(j.touched) < retention);
        let j = self.jobs.entry(job.to_owned()).or_insert_with(|| JobData {
            execs: BTreeMap::new(),
            queued: BTreeSet::new(),
            counts: JobCounts::default(),
            touched: now,
        });
        j.touched = now;
        j.execs.insert(
            device.to_owned(),
            JobExec {
                device: device.to_owned(),
                msgid: msgid.to_owned(),
                state,
                updated_ms: now_ms,
            },
        );
        if state == JobExecState::Queued {
            j.queued.insert(device.to_owned());
        }
        *j.counts.get_mut(state) += 1;
    }

    pub(super) fn record(
        &mut self,
        job: &str,
        device: &str,
        state: JobExecState,
        now_ms: i64,
    ) -> bool {
        let Some(j) = self.live_mut(job) else {
            return false;
        };
        let Some(exec) = j.execs.get_mut(device) else {
            return false;
        };
        if state.rank() <= exec.state.rank() {
            return false;
        }
        *j.counts.get_mut(exec.state) -= 1;
        *j.counts.get_mut(state) += 1;
        if exec.state == JobExecState::Queued {
            j.queued.remove(device);
        }
        exec.state = state;
        exec.updated_ms = now_ms;
        j.touched = Instant::now();
        true
    }

    pub(super) fn counts(&self, job: &str) -> JobCounts {
        self.live(job).map(|j| j.counts).unwrap_or_default()
    }

    pub(super) fn execs(&self, job: &str, after: Option<&str>, limit: usize) -> Vec<JobExec> {
        let Some(j) = self.live(job) else {
            return Vec::new();
        };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        j.execs
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Up to `limit` queued executions: `(device, msgid)`.
    pub(super) fn queued(&self, job: &str, limit: usize) -> Vec<(String, String)> {
        let Some(j) = self.live(job) else {
            return Vec::new();
        };
        j.queued
            .iter()
            .take(limit)
            .map(|d| (d.clone(), j.execs[d].msgid.clone()))
            .collect()
    }
}
