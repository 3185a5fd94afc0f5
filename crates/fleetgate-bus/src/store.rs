//! State the admin API keeps in the bus: versioned documents (users, API keys, scenes, jobs),
//! the audit log, and per-device job executions. The bus stores documents and audit entries
//! as opaque text: their schemas belong to the admin API, which also computes the audit
//! log's hash chain (the bus only makes each append conditional on the chain's head).

use crate::StreamId;

/// Kinds of admin documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocKind {
    /// A user, by username.
    User,
    /// A service API key, by key ID.
    ApiKey,
    /// A scene, by name.
    Scene,
    /// A fleet job, by job ID.
    Job,
    /// The index of jobs still being processed, by job ID (small bodies).
    ActiveJob,
    /// An alert rule, by rule ID.
    AlertRule,
    /// One device's alert-rule states, by device ID (kept so they survive a node move).
    AlertState,
}

impl DocKind {
    /// Every kind, for tests and tools.
    pub const ALL: [DocKind; 7] = [
        DocKind::User,
        DocKind::ApiKey,
        DocKind::Scene,
        DocKind::Job,
        DocKind::ActiveJob,
        DocKind::AlertRule,
        DocKind::AlertState,
    ];

    /// Stable name, part of storage keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ApiKey => "apikey",
            Self::Scene => "scene",
            Self::Job => "job",
            Self::ActiveJob => "active-job",
            Self::AlertRule => "alert-rule",
            Self::AlertState => "alert-state",
        }
    }
}

/// A stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Its ID within its kind.
    pub id: String,
    /// Starts at 1 and grows by one with every write (optimistic concurrency).
    pub version: u64,
    /// The document, opaque to the bus.
    pub body: String,
}

/// What a document write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocExpect {
    /// No document with this ID (create).
    Absent,
    /// The document at exactly this version (compare-and-set).
    Version(u64),
    /// Anything: create or overwrite.
    Any,
}

/// The result of a document write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocWrite {
    /// Written; the document's new version.
    Written(u64),
    /// Nothing written: the document was not as expected. Its current version, if it exists.
    Conflict(Option<u64>),
}

/// A page of the device registry: devices in ID order matching every given filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceQuery {
    /// Only devices in at least one of these groups (`None`: every device). Each device is
    /// returned once, however many of the groups it is in.
    pub groups: Option<Vec<String>>,
    /// Only IDs starting with this.
    pub prefix: Option<String>,
    /// Only IDs after this one (the cursor: the last ID of the previous page).
    pub after: Option<String>,
    /// At most this many.
    pub limit: usize,
}

/// One entry of the audit log as stored: its position and its canonical text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the log; increasing in append order.
    pub id: StreamId,
    /// The entry, exactly the text that was appended.
    pub entry: String,
}

/// One record of the alerts stream: an alert as it fired or resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRecord {
    /// Position in the stream; increasing in append order.
    pub id: StreamId,
    /// The alert (JSON), exactly as recorded.
    pub alert: String,
}

/// Where one device's execution of a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobExecState {
    /// In the device's queue, not sent yet.
    Queued,
    /// Sent at least once, not answered yet.
    Delivered,
    /// Acknowledged without an error.
    Succeeded,
    /// Acknowledged with an error, out of attempts, or refused (queue full, unknown device).
    Failed,
    /// Its TTL ended unacknowledged.
    TimedOut,
    /// Removed from the queue before it was sent (the job was cancelled or aborted).
    Cancelled,
}

impl JobExecState {
    /// Every state, in rank order.
    pub const ALL: [JobExecState; 6] = [
        JobExecState::Queued,
        JobExecState::Delivered,
        JobExecState::Succeeded,
        JobExecState::Failed,
        JobExecState::TimedOut,
        JobExecState::Cancelled,
    ];

    /// Stable name (API and storage).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timedOut",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses [`JobExecState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// States only move up in rank: queued (0), delivered (1), then one terminal state (2)
    /// that never changes again.
    pub fn rank(self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Delivered => 1,
            _ => 2,
        }
    }

    /// Whether the execution has finished.
    pub fn is_terminal(self) -> bool {
        self.rank() == 2
    }
}

/// What [`crate::Bus::job_push`] did with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPush {
    /// Queued (and the device's node told, if it is online); the execution is `Queued`.
    Queued,
    /// The device already has an execution of this job: nothing was queued again. This is
    /// what makes re-processing a batch after a crash safe.
    Exists,
    /// The device's queue was full: the execution is recorded as `Failed`.
    QueueFull,
}

/// One device's execution of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobExec {
    /// The device.
    pub device: String,
    /// The command's msgid.
    pub msgid: String,
    /// Where it stands.
    pub state: JobExecState,
    /// When it last changed, ms since the epoch.
    pub updated_ms: i64,
}

/// Executions of a job per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    /// Queued, not sent.
    pub queued: u64,
    /// Sent, not answered.
    pub delivered: u64,
    /// Acknowledged.
    pub succeeded: u64,
    /// Failed.
    pub failed: u64,
    /// TTL ended.
    pub timed_out: u64,
    /// Removed before sending.
    pub cancelled: u64,
}

impl JobCounts {
    /// The count of one state.
    pub fn get(&self, state: JobExecState) -> u64 {
        match state {
            JobExecState::Queued => self.queued,
            JobExecState::Delivered => self.delivered,
            JobExecState::Succeeded => self.succeeded,
            JobExecState::Failed => self.failed,
            JobExecState::TimedOut => self.timed_out,
            JobExecState::Cancelled => self.cancelled,
        }
    }

    /// Mutable count of one state.
    pub fn get_mut(&mut self, state: JobExecState) -> &mut u64 {
        match state {
            JobExecState::Queued => &mut self.queued,
            JobExecState::Delivered => &mut self.delivered,
            JobExecState::Succeeded => &mut self.succeeded,
            JobExecState::Failed => &mut self.failed,
            JobExecState::TimedOut => &mut self.timed_out,
            JobExecState::Cancelled => &mut self.cancelled,
        }
    }

    /// Adds another count (per-shard counts summed).
    pub fn add(&mut self, other: &JobCounts) {
        for state in JobExecState::ALL {
            *self.get_mut(state) += other.get(state);
        }
    }

    /// All executions.
    pub fn total(&self) -> u64 {
        JobExecState::ALL.iter().map(|s| self.get(*s)).sum()
    }

    /// Executions that have finished.
    pub fn finished(&self) -> u64 {
        JobExecState::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| self.get(*s))
            .sum()
    }
}
