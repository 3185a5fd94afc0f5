//! Checking the chain: the same code verifies the live log (`GET /v1/audit/verify`) and an
//! exported copy offline (`fleetgate audit verify --export`).
//!
//! Rules, for each entry in log order:
//! - its text parses as an entry;
//! - its `seq` is one more than the previous entry's (from the start: the first is 1 and its
//!   `prev` is [`GENESIS`]); a gap means entries were deleted, a repeat or step back that
//!   entries were inserted or reordered: the entry is named;
//! - its `prev` is the hash of the previous entry's text; when it is not (and `seq` is right),
//!   the *previous* entry's text changed after it was chained: that entry is named;
//! - a checkpoint vouches for the entry before it (`seq`, `hash`) with a valid signature by a
//!   known key;
//! - at the end, the last entry is what the head token names (from the start only): a shorter
//!   log was truncated, a different hash means the last entry was edited.
//!
//! An attacker with write access to the store but not the signing key can rewrite the chain
//! consistently only after the last checkpoint; everything before it is pinned by a signature.

use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;
use fleetgate_bus::{AuditRecord, StreamId};

use crate::chain::{Head, hash_text};
use crate::entry::{Entry, GENESIS, Stage};
use crate::sign::{checkpoint_statement, kid_of, verify_signature};

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// Position of the first entry that does not verify (`None`: entries are missing at the
    /// end, so no entry can be named).
    pub first_bad: Option<StreamId>,
    /// Its sequence number, when it has a readable one.
    pub seq: Option<u64>,
    /// What is wrong, for people.
    pub reason: String,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Entries read.
    pub entries: u64,
    /// Checkpoints whose signatures verified.
    pub checkpoints: u64,
    /// Sequence number of the last entry a verified checkpoint vouches for.
    pub last_checkpoint_seq: Option<u64>,
    /// `None` when everything verified.
    pub broken: Option<Break>,
}

impl Report {
    /// Whether everything verified.
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }
}

struct Prev {
    id: StreamId,
    seq: u64,
    hash: String,
}

/// Verifies entries fed in log order.
pub struct Verifier {
    keys: HashMap<String, VerifyingKey>,
    from_start: bool,
    prev: Option<Prev>,
    report: Report,
}

impl Verifier {
    /// A verifier trusting `keys`. `from_start`: the first entry fed is the log's first
    /// (otherwise the first entry fed is taken as given, its `prev` unchecked).
    pub fn new(keys: &[VerifyingKey], from_start: bool) -> Self {
        Self {
            keys: keys.iter().map(|k| (kid_of(k), *k)).collect(),
            from_start,
            prev: None,
            report: Report {
                entries: 0,
                checkpoints: 0,
                last_checkpoint_seq: None,
                broken: None,
            },
        }
    }

    /// Whether a break was found (feeding more changes nothing).
    pub fn is_broken(&self) -> bool {
        self.report.broken.is_some()
    }

    fn fail(&mut self, id: &StreamId, seq: Option<u64>, reason: String) {
        self.report.broken = Some(Break {
            first_bad: Some(id.clone()),
            seq,
            reason,
        });
    }

    /// Checks the next entry.
    pub fn push(&mut self, record: &AuditRecord) {
        if self.is_broken() {
            return;
        }
        self.report.entries += 1;
        let entry = match Entry::parse(&record.entry) {
            Ok(e) => e,
            Err(e) => return self.fail(&record.id, None, format!("not an audit entry: {e}")),
        };
        let hash = hash_text(&record.entry);
        let (expected_seq, expected_prev) = match &self.prev {
            Some(p) => (Some(p.seq + 1), Some(p.hash.clone())),
            None if self.from_start => (Some(1), Some(GENESIS.to_owned())),
            None => (None, None),
        };
        if let Some(want) = expected_seq {
            if entry.seq > want {
                let reason = format!("entries {want}..{} are missing", entry.seq - 1);
                return self.fail(&record.id, Some(entry.seq), reason);
            }
            if entry.seq < want {
                let reason = format!(
                    "sequence {} where {want} belongs (inserted or reordered)",
                    entry.seq
                );
                return self.fail(&record.id, Some(entry.seq), reason);
            }
        }
        if let Some(want) = expected_prev
            && entry.prev != want
        {
            return match self.prev.take() {
                // The link to the previous entry broke: that entry's text changed.
                Some(p) => {
                    let reason = format!(
                        "entry {} was changed after entry {} chained it",
                        p.seq, entry.seq
                    );
                    self.fail(&p.id, Some(p.seq), reason)
                }
                None => self.fail(
                    &record.id,
                    Some(entry.seq),
                    "the first entry does not start the chain".to_owned(),
                ),
            };
        }
        if entry.stage == Stage::Checkpoint {
            let Some(c) = &entry.checkpoint else {
                return self.fail(
                    &record.id,
                    Some(entry.seq),
                    "checkpoint without a signature".to_owned(),
                );
            };
            let vouches = self
                .prev
                .as_ref()
                .is_some_and(|p| p.seq == c.seq && p.hash == c.hash);
            if !vouches && (self.prev.is_some() || self.from_start) {
                return self.fail(
                    &record.id,
                    Some(entry.seq),
                    "checkpoint names another entry than the one before it".to_owned(),
                );
            }
            let Some(key) = self.keys.get(&c.kid) else {
                let reason = format!("checkpoint signed by unknown key {}", c.kid);
                return self.fail(&record.id, Some(entry.seq), reason);
            };
            if !verify_signature(key, &checkpoint_statement(c.seq, &c.hash), &c.sig) {
                return self.fail(
                    &record.id,
                    Some(entry.seq),
                    "checkpoint signature does not verify".to_owned(),
                );
            }
            self.report.checkpoints += 1;
            self.report.last_checkpoint_seq = Some(c.seq);
        } else if entry.checkpoint.is_some() {
            return self.fail(
                &record.id,
                Some(entry.seq),
                "signature on an entry that is not a checkpoint".to_owned(),
            );
        }
        self.prev = Some(Prev {
            id: record.id.clone(),
            seq: entry.seq,
            hash,
        });
    }

    /// The report, checking the end of the log against `head` (the bus's head token) when
    /// given and verifying from the start.
    pub fn finish(mut self, head: Option<&str>) -> Report {
        if self.is_broken() || !self.from_start {
            return self.report;
        }
        let Some(token) = head else {
            return self.report;
        };
        let Some(head) = Head::parse(token) else {
            self.report.broken = Some(Break {
                first_bad: None,
                seq: None,
                reason: "the log's head token is unreadable".to_owned(),
            });
            return self.report;
        };
        let (last_seq, last_hash) = self
            .prev
            .as_ref()
            .map_or((0, GENESIS.to_owned()), |p| (p.seq, p.hash.clone()));
        if head.seq > last_seq {
            self.report.broken = Some(Break {
                first_bad: None,
                seq: Some(last_seq + 1),
                reason: format!(
                    "the log ends at entry {last_seq} but its head names entry {}: entries were removed from the end",
                    head.seq
                ),
            });
        } else if head.seq == last_seq && head.hash != last_hash {
            let p = self.prev.as_ref();
            self.report.broken = Some(Break {
                first_bad: p.map(|p| p.id.clone()),
                seq: Some(last_seq),
                reason: format!("entry {last_seq} was changed after it was appended"),
            });
        }
        // A head behind the log is a writer between its append and our read of the head:
        // the entries themselves verified.
        self.report
    }
}
