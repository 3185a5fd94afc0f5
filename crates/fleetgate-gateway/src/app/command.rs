//! `command` frames: the REST command call (`POST /v1/devices/{id}/commands`) over a
//! `/v1/app` socket. Same policy ([`Permission::CommandSend`], scopes), same send-and-wait
//! ([`fleetgate_bus::dispatch`]), same audit entries (a `request` entry before anything is
//! done, refused when it cannot be written; a `response` entry with the status the REST call
//! would have answered).

use std::sync::Arc;
use std::time::Duration;

use fleetgate_audit::{AuditLog, Draft, Stage};
use fleetgate_authz::{Permission, Principal, Scope};
use fleetgate_bus::dispatch::{CommandRequest, Dispatched, Waiters, dispatch};
use fleetgate_bus::{Bus, BusError, CommandOutcome};
use fleetgate_protocol::Qos;
use fleetgate_protocol::app::{AppErrorCode, AppReply};
use serde_json::Value;
use tracing::warn;

/// Command limits, the admin API's (`FLEETGATE_ADMIN_MAX_WAIT_MS` and the TTLs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandLimits {
    /// TTL when a command gives none.
    pub default_ttl: Duration,
    /// Longest TTL.
    pub max_ttl: Duration,
    /// Longest `waitMs`.
    pub max_wait: Duration,
}

/// What a node needs to take commands from app sessions.
pub struct AppCommands {
    audit: AuditLog,
    waiters: Waiters,
    reply_to: String,
    limits: CommandLimits,
}

impl AppCommands {
    /// Starts the result listener on node channel `reply_to` (this node's own, apart from
    /// the device sessions' channel); entries go to `audit`.
    ///
    /// # Errors
    /// When the bus refuses the subscription.
    pub async fn start(
        bus: Arc<dyn Bus>,
        audit: AuditLog,
        reply_to: String,
        limits: CommandLimits,
    ) -> Result<Self, BusError> {
        let waiters = Waiters::start(bus, &reply_to).await?;
        Ok(Self {
            audit,
            waiters,
            reply_to,
            limits,
        })
    }
}

/// One `command` frame's fields.
pub(crate) struct CommandFrame {
    pub(crate) id: Option<String>,
    pub(crate) device: String,
    pub(crate) payload: Value,
    pub(crate) qos: Option<u8>,
    pub(crate) ttl_ms: Option<u64>,
    pub(crate) wait_ms: Option<u64>,
}

/// A refusal: the status REST would answer, the audit reason, the app error.
struct Refused {
    status: u16,
    reason: &'static str,
    code: AppErrorCode,
    message: String,
    msgid: Option<String>,
}

impl Refused {
    fn new(
        status: u16,
        reason: &'static str,
        code: AppErrorCode,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            reason,
            code,
            message: message.into(),
            msgid: None,
        }
    }

    fn bus(error: &BusError) -> Self {
        match error {
            BusError::QueueFull { max } => Self::new(
                429,
                "queue_full",
                AppErrorCode::QueueFull,
                format!("the device's command queue holds {max} commands already"),
            ),
            other => {
                warn!(message = "bus call failed", error = %other);
                Self::new(
                    503,
                    "bus_unavailable",
                    AppErrorCode::Unavailable,
                    "the bus is unavailable; retry later",
                )
            }
        }
    }
}

/// Runs one command frame to its answer, auditing it.
pub(crate) async fn run(
    bus: &dyn Bus,
    commands: &AppCommands,
    principal: &Principal,
    frame: CommandFrame,
) -> AppReply {
    let id = frame.id.clone();
    let draft = Draft {
        actor: principal.actor.clone(),
        role: Some(principal.role.as_str().to_owned()),
        request_id: id.as_ref().map(|i| format!("app:{i}")),
        action: "command.send".to_owned(),
        target: Some(format!("device:{}", frame.device)),
        ..Draft::default()
    };
    if let Err(error) = commands
        .audit
        .append(Draft {
            stage: Some(Stage::Request),
            ..draft.clone()
        })
        .await
    {
        // Fail closed, as REST does: nothing happens that the log does not show.
        warn!(message = "audit log unavailable", %error);
        return AppReply::error(
            id,
            AppErrorCode::Unavailable,
            "the audit log cannot be written, so nothing was sent; retry later",
        );
    }
    let (status, reply) = match send(bus, commands, principal, frame).await {
        Ok((status, msgid, reply)) => (Ok((status, msgid)), reply),
        Err(refused) => {
            let reply = AppReply::Error {
                id: id.clone(),
                channel: None,
                msgid: refused.msgid.clone(),
                code: refused.code,
                message: refused.message.clone(),
            };
            (Err(refused), reply)
        }
    };
    let mut response = Draft {
        stage: Some(Stage::Response),
        ..draft
    };
    match status {
        Ok((status, msgid)) => {
            response.outcome = Some(status);
            response.msgid = Some(msgid);
        }
        Err(refused) => {
            response.outcome = Some(refused.status);
            response.msgid = refused.msgid;
            response.reason = Some(refused.reason.to_owned());
        }
    }
    if let Err(error) = commands.audit.append(response).await {
        warn!(message = "could not audit a command response", %error);
    }
    reply
}

async fn send(
    bus: &dyn Bus,
    commands: &AppCommands,
    principal: &Principal,
    frame: CommandFrame,
) -> Result<(u16, String, AppReply), Refused> {
    if !principal.role.allows(Permission::CommandSend) {
        return Err(Refused::new(
            403,
            "forbidden",
            AppErrorCode::Forbidden,
            format!("role {} may not send commands", principal.role.as_str()),
        ));
    }
    let record = bus
        .device_get(&frame.device)
        .await
        .map_err(|e| Refused::bus(&e))?;
    let visible = match (&record, &principal.scope) {
        (_, Scope::All) => true,
        (Some(r), scope) => scope.covers(r),
        (None, _) => false,
    };
    if !visible {
        let reason = if record.is_some() {
            "out_of_scope"
        } else {
            "not_found"
        };
        return Err(Refused::new(
            404,
            reason,
            AppErrorCode::NotFound,
            "no such device",
        ));
    }
    let limits = &commands.limits;
    let qos = Qos::from_u8(u64::from(frame.qos.unwrap_or(1))).map_err(|_| {
        Refused::new(
            400,
            "bad_request",
            AppErrorCode::BadRequest,
            "qos must be 0, 1 or 2",
        )
    })?;
    let ttl = frame
        .ttl_ms
        .map_or(limits.default_ttl, Duration::from_millis);
    let wait = Duration::from_millis(frame.wait_ms.unwrap_or(0));
    if ttl.is_zero() || ttl > limits.max_ttl || wait > limits.max_wait {
        return Err(Refused::new(
            400,
            "bad_request",
            AppErrorCode::BadRequest,
            format!(
                "ttlMs must be 1..={} and waitMs at most {}",
                limits.max_ttl.as_millis(),
                limits.max_wait.as_millis()
            ),
        ));
    }
    // As over REST: presence only where it decides something (QoS 0, or a device with no
    // record); a queued command's push tells the owning node itself.
    let presence = if qos == Qos::AtMostOnce || record.is_none() {
        bus.presence_get(&frame.device)
            .await
            .map_err(|e| Refused::bus(&e))?
    } else {
        None
    };
    if presence.is_none() && record.is_none() {
        return Err(Refused::new(
            404,
            "not_found",
            AppErrorCode::NotFound,
            "no such device",
        ));
    }
    let request = CommandRequest {
        device: frame.device,
        payload: frame.payload,
        qos,
        ttl,
        wait,
        traceparent: None,
    };
    let (msgid, dispatched) = match dispatch(
        bus,
        &commands.waiters,
        &commands.reply_to,
        presence.as_ref(),
        request,
    )
    .await
    {
        Ok(d) => d,
        Err((msgid, e)) => {
            let mut refused = Refused::bus(&e);
            refused.msgid = Some(msgid.into_string());
            return Err(refused);
        }
    };
    let m = msgid.into_string();
    let done = |status: u16, state: &str, result: Option<Value>, error: Option<Value>| {
        Ok((
            status,
            m.clone(),
            AppReply::CommandResult {
                id: frame.id.clone(),
                msgid: m.clone(),
                status: state.to_owned(),
                result,
                error,
            },
        ))
    };
    let fail = |status: u16, reason: &'static str, code: AppErrorCode, message: &str| {
        let mut refused = Refused::new(status, reason, code, message);
        refused.msgid = Some(m.clone());
        Err(refused)
    };
    match dispatched {
        Dispatched::Queued => done(202, "queued", None, None),
        Dispatched::Offline => fail(
            409,
            "device_offline",
            AppErrorCode::DeviceOffline,
            "QoS 0 commands are not queued; the device is offline",
        ),
        Dispatched::Outcome(CommandOutcome::Result(result)) => {
            done(200, "done", Some(result), None)
        }
        Dispatched::Outcome(CommandOutcome::Error(error)) => done(200, "done", None, Some(error)),
        Dispatched::Outcome(CommandOutcome::Done) => done(200, "done", Some(Value::Null), None),
        Dispatched::Outcome(CommandOutcome::Failed(reason)) => fail(
            504,
            reason.as_str(),
            AppErrorCode::Failed,
            "the device never acknowledged the command",
        ),
        Dispatched::Timeout => fail(
            504,
            "timeout",
            AppErrorCode::Timeout,
            "no result within waitMs; the command stays queued until its TTL",
        ),
    }
}
