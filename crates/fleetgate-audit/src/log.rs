//! The writer: one task per process appends every entry, in batches (group commit), each
//! batch one conditional append on the bus. Processes that write concurrently lose a race
//! now and then; the loser re-reads the head and links its batch again.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetgate_bus::{AuditRecord, Bus, BusError, StreamId};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::chain::{Head, Item, link};
use crate::entry::Draft;
use crate::sign::Signer;
use crate::verify::{Report, Verifier};

/// Most entries linked into one append.
const BATCH: usize = 256;
/// Appends retried after losing the race to another process, before giving up.
const RETRIES: usize = 64;
/// Entries read per bus call while verifying.
const READ_PAGE: usize = 1000;

/// Why an entry was not appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The bus is unavailable: nothing was written.
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    /// Other writers kept winning.
    #[error("audit log busy: too many concurrent appends")]
    Contended,
    /// The writer task has stopped.
    #[error("audit writer stopped")]
    Stopped,
}

impl From<BusError> for AuditError {
    fn from(e: BusError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// Settings of the audit log.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// How often the head is signed (a checkpoint entry), when something was appended since.
    pub checkpoint_interval: Duration,
    /// Entries waiting for the writer; a full queue makes callers wait.
    pub queue: usize,
    /// Whether this process signs checkpoints. A process that only appends (a gateway
    /// auditing `/v1/app` commands) leaves them to the admin processes, whose checkpoints
    /// cover every entry of the chain, so it needs no signing key.
    pub checkpoints: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(60),
            queue: 4096,
            checkpoints: true,
        }
    }
}

type Reply = oneshot::Sender<Result<Option<StreamId>, AuditError>>;

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<(Item, Reply)>,
    bus: Arc<dyn Bus>,
    signer: Arc<Signer>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("signer", &self.signer)
            .finish()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl AuditLog {
    /// Starts the writer and the checkpoint timer. Both stop when every handle is dropped.
    pub fn start(bus: Arc<dyn Bus>, signer: Signer, config: &AuditConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let signer = Arc::new(signer);
        tokio::spawn(writer(bus.clone(), signer.clone(), rx));
        let log = Self { tx, bus, signer };
        if !config.checkpoints {
            return log;
        }
        let weak = log.tx.downgrade();
        let interval = config.checkpoint_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tx) = weak.upgrade() else { return };
                let (reply, rx) = oneshot::channel();
                if tx.send((Item::Checkpoint, reply)).await.is_err() {
                    return;
                }
                drop(tx);
                if let Ok(Err(error)) = rx.await {
                    warn!(message = "audit checkpoint failed", %error);
                }
            }
        });
        log
    }

    async fn submit(&self, item: Item) -> Result<Option<StreamId>, AuditError> {
        // Fail at once rather than after the bus's timeout: the caller refuses the request.
        if !self.bus.connected() {
            return Err(AuditError::Unavailable("bus disconnected".to_owned()));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Appends an entry; returns its position once it is in the log.
    ///
    /// # Errors
    /// [`AuditError`]: nothing was written.
    pub async fn append(&self, draft: Draft) -> Result<StreamId, AuditError> {
        self.submit(Item::Entry(Box::new(draft)))
            .await?
            .ok_or(AuditError::Stopped)
    }

    /// Signs the head now; `None` when nothing was appended since the last checkpoint.
    ///
    /// # Errors
    /// [`AuditError`]: nothing was written.
    pub async fn checkpoint(&self) -> Result<Option<StreamId>, AuditError> {
        self.submit(Item::Checkpoint).await
    }

    /// The signing key.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Verifies the live log from the start, or from position `from` (inclusive), trusting
    /// this process's signing key and `extra_keys` (keys used before a rotation).
    ///
    /// # Errors
    /// [`AuditError::Unavailable`] when the bus fails.
    pub async fn verify(
        &self,
        from: Option<&StreamId>,
        extra_keys: &[ed25519_dalek::VerifyingKey],
    ) -> Result<Report, AuditError> {
        let mut keys = vec![self.signer.verifying_key()];
        keys.extend_from_slice(extra_keys);
        // The head first: entries appended after this read only make the log longer.
        let head = self.bus.audit_head().await?;
        let mut verifier = Verifier::new(&keys, from.is_none());
        let mut after = match from {
            Some(id) => Some(just_before(id)?),
            None => None,
        };
        loop {
            let page = self.bus.audit_read(after.as_ref(), READ_PAGE).await?;
            for record in &page {
                verifier.push(record);
            }
            if page.len() < READ_PAGE || verifier.is_broken() {
                break;
            }
            after = page.last().map(|r| r.id.clone());
        }
        Ok(verifier.finish(Some(&head)))
    }

    /// Reads entries after `after`, for listing and export.
    ///
    /// # Errors
    /// [`AuditError::Unavailable`] when the bus fails.
    pub async fn read(
        &self,
        after: Option<&StreamId>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        Ok(self.bus.audit_read(after, limit).await?)
    }
}

/// The position just before `id`, so that an exclusive read starts at `id`.
fn just_before(id: &StreamId) -> Result<StreamId, AuditError> {
    let (ms, seq) = id
        .parts()
        .map_err(|e| AuditError::Unavailable(e.to_string()))?;
    Ok(match (ms, seq) {
        (0, 0) => StreamId("0-0".to_owned()),
        (ms, 0) => StreamId(format!("{}-{}", ms - 1, u64::MAX)),
        (ms, seq) => StreamId(format!("{ms}-{}", seq - 1)),
    })
}

async fn writer(bus: Arc<dyn Bus>, signer: Arc<Signer>, mut rx: mpsc::Receiver<(Item, Reply)>) {
    let mut head: Option<Head> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<Item>, Vec<Reply>) = batch.into_iter().unzip();
        let outcome = append_batch(&*bus, &signer, &mut head, items).await;
        match outcome {
            Ok(ids) => {
                for (reply, id) in replies.into_iter().zip(ids) {
                    let _ = reply.send(Ok(id));
                }
            }
            Err(error) => {
                head = None;
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Links and appends one batch, re-reading the head and linking again after losing a race.
async fn append_batch(
    bus: &dyn Bus,
    signer: &Signer,
    cached: &mut Option<Head>,
    items: Vec<Item>,
) -> Result<Vec<Option<StreamId>>, AuditError> {
    // Items are linked anew on every try, so keep them re-creatable.
    let items: Vec<Option<Box<Draft>>> = items
        .into_iter()
        .map(|i| match i {
            Item::Entry(d) => Some(d),
            Item::Checkpoint => None,
        })
        .collect();
    for attempt in 0..RETRIES {
        if attempt > 0 {
            // Two writers that both re-read the head at once race again at once: without a
            // pause the same one can win every round (seen: 64 lost rounds in a row on two
            // cores). Full jitter, 100 us doubling to 20 ms, lets the loser in.
            let cap_us = (100u64 << attempt.min(8)).min(20_000);
            let pause = rand::random_range(0..=cap_us);
            tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
        }
        let head = match cached.take() {
            Some(h) => h,
            None => {
                let token = bus.audit_head().await?;
                Head::parse(&token).ok_or_else(|| {
                    AuditError::Unavailable(format!("unreadable audit head {token:?}"))
                })?
            }
        };
        let fresh = items
            .iter()
            .map(|d| d.clone().map_or(Item::Checkpoint, Item::Entry))
            .collect();
        let (texts, new_head) = link(&head, fresh, now_ms(), signer);
        let appended: Vec<String> = texts.iter().flatten().cloned().collect();
        if appended.is_empty() {
            *cached = Some(head);
            return Ok(texts.iter().map(|_| None).collect());
        }
        // `None`: another process appended first; read its head and link again.
        if let Some(ids) = bus
            .audit_append(&head.token(), &new_head.token(), &appended)
            .await?
        {
            *cached = Some(new_head);
            let mut ids = ids.into_iter();
            return Ok(texts
                .iter()
                .map(|t| t.as_ref().and_then(|_| ids.next()))
                .collect());
        }
    }
    Err(AuditError::Contended)
}
