//! Sends jobs. Every admin process runs one runner; a job is sent by the process holding its
//! lease (a field of the job document, taken and renewed by compare-and-set), so a job whose
//! process died is taken over once the lease runs out. A process sends up to eight jobs at a
//! time, each in a task of its own, so a slowly paced rollout does not hold up the others.
//!
//! Sending is in batches of at most `job_batch_size` devices: read the next targets, queue
//! their commands with one `Bus::job_push` (one script per Redis shard), then save the
//! cursor and renew the lease in one write. A batch queued but not saved (the process died
//! in between) is queued again by the next holder, which is harmless: the bus answers
//! `Exists` for devices that already have the step's execution, so nobody gets a command
//! twice and nobody is skipped. Nothing holds more than one batch in memory.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fleetgate_audit::{Draft, Stage};
use fleetgate_bus::{BusError, Command, DeviceQuery, DocKind, JobExecState, JobPush};
use fleetgate_protocol::{MsgId, Qos};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::AdminState;
use crate::jobs::{JobDoc, JobState, Lease, load, save};
use crate::now_ms;
use crate::rbac::Scope;

/// Executions cancelled per bus call.
const CANCEL_BATCH: usize = 1000;
/// After its last command's TTL, a job waits this long for outcomes still on their way.
const OUTCOME_GRACE_MS: i64 = 30_000;
/// Jobs one process sends at the same time (each its own task, so a slow-paced job does not
/// hold up the others); more wait for a free slot.
const CONCURRENT_JOBS: usize = 8;

/// The jobs this process is sending now.
type Sending = Arc<Mutex<HashSet<String>>>;

/// Starts the runner; it stops when the admin state is dropped.
pub(crate) fn start(state: Weak<AdminState>, poll: Duration) {
    tokio::spawn(async move {
        let sending = Sending::default();
        loop {
            let Some(s) = state.upgrade() else { return };
            let wake = s.jobs_wake.clone();
            if let Err(error) = pass(&s, &sending).await {
                warn!(message = "job runner pass failed", %error);
            }
            drop(s);
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(poll) => {}
            }
        }
    });
}

/// One look at every active job.
async fn pass(state: &Arc<AdminState>, sending: &Sending) -> Result<(), BusError> {
    let mut after: Option<String> = None;
    loop {
        let page = state
            .bus
            .doc_list(DocKind::ActiveJob, after.as_deref(), 100)
            .await?;
        for entry in &page {
            if let Err(error) = step_job(state, sending, &entry.id).await {
                warn!(message = "job step failed", job = %entry.id, %error);
            }
        }
        if page.len() < 100 {
            return Ok(());
        }
        after = page.last().map(|d| d.id.clone());
    }
}

async fn step_job(state: &Arc<AdminState>, sending: &Sending, id: &str) -> Result<(), BusError> {
    let Some((job, version)) = load(&*state.bus, id).await? else {
        state.bus.doc_delete(DocKind::ActiveJob, id).await?;
        return Ok(());
    };
    match job.state {
        JobState::Running => {
            {
                let mut set = sending.lock().unwrap_or_else(|e| e.into_inner());
                if set.contains(id) || set.len() >= CONCURRENT_JOBS {
                    return Ok(());
                }
                set.insert(id.to_owned());
            }
            let (state, sending, id) = (state.clone(), sending.clone(), id.to_owned());
            tokio::spawn(async move {
                if let Err(error) = dispatch(&state, job, version).await {
                    warn!(message = "job dispatch failed", job = %id, %error);
                }
                sending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                // Whatever comes next for it (settling, another slot) need not wait a poll.
                state.jobs_wake.notify_one();
            });
            Ok(())
        }
        JobState::Dispatched => settle(state, job, version).await,
        JobState::Cancelled | JobState::Aborted => withdraw(state, job).await,
        JobState::Completed => state.bus.doc_delete(DocKind::ActiveJob, id).await.map(drop),
    }
}

/// Takes or renews the lease; the new version, or `None` when another process holds it.
async fn claim(
    state: &AdminState,
    job: &mut JobDoc,
    version: u64,
) -> Result<Option<u64>, BusError> {
    let me = &state.config.node_id;
    let now = now_ms();
    if job
        .lease
        .as_ref()
        .is_some_and(|l| &l.owner != me && l.until_ms > now)
    {
        return Ok(None);
    }
    job.lease = Some(Lease {
        owner: me.clone(),
        until_ms: now + lease_ms(state),
    });
    save(&*state.bus, job, version).await
}

fn lease_ms(state: &AdminState) -> i64 {
    i64::try_from(state.config.job_lease.as_millis()).unwrap_or(i64::MAX)
}

/// Sends batches while this process holds the lease.
async fn dispatch(state: &AdminState, mut job: JobDoc, version: u64) -> Result<(), BusError> {
    let Some(mut version) = claim(state, &mut job, version).await? else {
        return Ok(());
    };
    let scope = Scope::from_groups(&job.scope);
    loop {
        let started = Instant::now();
        if should_abort(state, &job).await? {
            job.state = JobState::Aborted;
            info!(message = "job aborted by its failure threshold", job = %job.id);
            if save(&*state.bus, &job, version).await?.is_some() {
                audit_event(state, &job, "job.abort").await;
            }
            return Ok(());
        }
        let step_index = job.progress.step;
        let Some(step) = job.steps.get(step_index).cloned() else {
            job.state = JobState::Dispatched;
            job.dispatched_ms = Some(now_ms());
            job.lease = None;
            save(&*state.bus, &job, version).await?;
            return Ok(());
        };
        let batch = batch_size(state, &job);
        // Explicit devices first, then the group.
        let mut targets: Vec<String> = Vec::new();
        let explicit_left = step.devices.len() - job.progress.explicit_done.min(step.devices.len());
        if explicit_left > 0 {
            let take = explicit_left.min(batch);
            let start = job.progress.explicit_done;
            let ids = step.devices[start..start + take].to_vec();
            let records = state.bus.device_get_many(&ids).await?;
            for (id, record) in ids.into_iter().zip(records) {
                if record.is_some_and(|r| scope.covers(&r)) {
                    targets.push(id);
                } else {
                    job.skipped += 1;
                }
            }
            job.progress.explicit_done = start + take;
        } else if let Some(group) = &step.group {
            let page = state
                .bus
                .device_query(&DeviceQuery {
                    groups: Some(vec![group.clone()]),
                    prefix: None,
                    after: job.progress.group_after.clone(),
                    limit: batch,
                })
                .await?;
            if page.len() < batch {
                next_step(&mut job);
            } else {
                job.progress.group_after = page.last().map(|r| r.id.clone());
            }
            targets.extend(page.into_iter().map(|r| r.id));
        } else {
            next_step(&mut job);
        }
        if !targets.is_empty() {
            let commands = commands_for(state, &job, step_index, &targets);
            let answers = state
                .bus
                .job_push(&job.bus_id(step_index), &commands)
                .await?;
            job.pushed += answers
                .iter()
                .filter(|a| matches!(a, JobPush::Queued | JobPush::QueueFull))
                .count() as u64;
        }
        job.lease = Some(Lease {
            owner: state.config.node_id.clone(),
            until_ms: now_ms() + lease_ms(state),
        });
        match save(&*state.bus, &job, version).await? {
            Some(v) => version = v,
            // Cancelled meanwhile, or taken over after our lease ran out: stop; whoever
            // goes on sends this batch again, harmlessly.
            None => return Ok(()),
        }
        if let Some(rate) = job.rate_per_sec {
            let spend = Duration::from_secs_f64(targets.len() as f64 / f64::from(rate));
            tokio::time::sleep_until(started + spend).await;
        }
    }
}

fn next_step(job: &mut JobDoc) {
    job.progress.step += 1;
    job.progress.explicit_done = 0;
    job.progress.group_after = None;
}

/// Devices per batch: the configured size, less when a rate asks for smaller steps (about
/// four batches a second).
fn batch_size(state: &AdminState, job: &JobDoc) -> usize {
    let max = state.config.job_batch_size.max(1);
    match job.rate_per_sec {
        Some(rate) => (rate as usize / 4).clamp(1, max),
        None => max,
    }
}

fn commands_for(state: &AdminState, job: &JobDoc, step: usize, targets: &[String]) -> Vec<Command> {
    let s = &job.steps[step];
    let qos = Qos::from_u8(u64::from(s.qos.unwrap_or(1))).unwrap_or(Qos::AtLeastOnce);
    let ttl = s
        .ttl_ms
        .map_or(state.config.default_ttl.as_millis() as i64, |t| t as i64);
    let now = now_ms();
    let msgid =
        MsgId::new(format!("job-{}-{step}", job.id)).expect("hex job IDs make valid msgids");
    targets
        .iter()
        .map(|device| Command {
            msgid: msgid.clone(),
            device: device.clone(),
            payload: s.payload.clone(),
            qos,
            created_ms: now,
            expires_ms: now.saturating_add(ttl),
            reply_to: None,
            traceparent: None,
            job: Some(job.bus_id(step)),
        })
        .collect()
}

async fn should_abort(state: &AdminState, job: &JobDoc) -> Result<bool, BusError> {
    let Some(percent) = job.abort_failed_percent else {
        return Ok(false);
    };
    let counts = job.counts(&*state.bus).await?;
    let finished = counts.finished();
    let failed = counts.failed + counts.timed_out;
    Ok(finished >= job.abort_min_finished && failed * 100 > u64::from(percent) * finished)
}

/// A dispatched job: completes once every execution has finished (or, past the last TTL and
/// a grace period, records what never reported as timed out).
async fn settle(state: &AdminState, mut job: JobDoc, version: u64) -> Result<(), BusError> {
    let counts = job.counts(&*state.bus).await?;
    let done = counts.finished() == counts.total();
    let max_ttl = job
        .steps
        .iter()
        .map(|s| {
            s.ttl_ms
                .map_or(state.config.default_ttl.as_millis() as i64, |t| t as i64)
        })
        .max()
        .unwrap_or(0);
    let overdue = job
        .dispatched_ms
        .is_some_and(|d| now_ms() > d + max_ttl + OUTCOME_GRACE_MS);
    if !done && !overdue {
        return Ok(());
    }
    if !done {
        // Executions whose command vanished (a device deleted meanwhile) never report.
        for i in 0..job.steps.len() {
            let bus_id = job.bus_id(i);
            let mut after: Option<String> = None;
            loop {
                let page = state.bus.job_execs(&bus_id, after.as_deref(), 1000).await?;
                for e in page.iter().filter(|e| !e.state.is_terminal()) {
                    state
                        .bus
                        .job_record(&bus_id, &e.device, JobExecState::TimedOut)
                        .await?;
                }
                if page.len() < 1000 {
                    break;
                }
                after = page.last().map(|e| e.device.clone());
            }
        }
    }
    job.state = JobState::Completed;
    job.finished_ms = Some(now_ms());
    if save(&*state.bus, &job, version).await?.is_some() {
        audit_event(state, &job, "job.complete").await;
        state.bus.doc_delete(DocKind::ActiveJob, &job.id).await?;
    }
    Ok(())
}

/// A cancelled or aborted job: removes what was never sent, then leaves the index.
async fn withdraw(state: &AdminState, job: JobDoc) -> Result<(), BusError> {
    for i in 0..job.steps.len() {
        let bus_id = job.bus_id(i);
        while state.bus.job_cancel(&bus_id, CANCEL_BATCH).await? > 0 {}
    }
    state.bus.doc_delete(DocKind::ActiveJob, &job.id).await?;
    Ok(())
}

/// Records something the system did about a job (who asked for it is in the request's entry).
async fn audit_event(state: &AdminState, job: &JobDoc, action: &str) {
    let draft = Draft {
        stage: Some(Stage::Event),
        actor: format!("admin:{}", state.config.node_id),
        action: action.to_owned(),
        target: Some(format!("job:{}", job.id)),
        ..Draft::default()
    };
    if let Err(error) = state.audit.append(draft).await {
        warn!(message = "could not audit a job event", %error);
    }
}
