//! One worker process: a goose attack whose users are devices (WebSocket sessions from the
//! device SDK) and, in worker 0 of the command scenarios, operators calling the admin API.
//! Goose launches the users and keeps the report; pacing, phases and counting are ours, so
//! that several processes act as one load generator.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fleetgate_device::{Device, DeviceClient, DeviceEvent, DeviceOptions, Qos};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use goose::config::GooseConfiguration;
use goose::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, oneshot, watch};

mod fanout;

use crate::pace::Pacer;
use crate::params::Scenario as Kind;
use crate::params::{AuthKind, AuthMode, Spec};
use crate::tally::{Tally, now_ms};
use crate::wire::{Init, Phase, Progress, Report};

/// Provisioning calls in flight per worker.
const PROVISION_CONCURRENCY: usize = 32;

/// Everything the users of one worker share.
struct Ctx {
    spec: Spec,
    first: usize,
    len: usize,
    /// This worker's app subscribers (fanout): global indices.
    apps: std::ops::Range<usize>,
    next_app: AtomicUsize,
    phase: watch::Receiver<Phase>,
    next_device: AtomicUsize,
    live: Live,
    tally: Mutex<Tally>,
    connect_slots: Semaphore,
    /// Bounds concurrent provisioning calls, and so the idle keep-alive connections the
    /// shared HTTP client leaves open on the admin API (which would count as server files).
    provision_slots: Semaphore,
    connect_pacer: Pacer,
    command_pacer: Pacer,
    /// For `wss://`: the roots of `--tls-ca`, one config shared by every device.
    tls: Option<Arc<fleetgate_device::rustls::ClientConfig>>,
}

/// Counters read by the progress ticker.
#[derive(Default)]
struct Live {
    provisioned: AtomicU64,
    provision_failed: AtomicU64,
    connect_done: AtomicU64,
    online: AtomicU64,
    messages_sent: AtomicU64,
    commands_accepted: AtomicU64,
    commands_received: AtomicU64,
    commands_in_flight: AtomicU64,
}

impl Live {
    fn snapshot(&self, phase: Phase) -> Progress {
        let r = |a: &AtomicU64| a.load(Ordering::SeqCst);
        // In flight first: a call that finished after this read has already been counted
        // as accepted by the time that counter is read below.
        let commands_in_flight = r(&self.commands_in_flight);
        Progress {
            provisioned: r(&self.provisioned),
            provision_failed: r(&self.provision_failed),
            connect_done: r(&self.connect_done),
            online: r(&self.online),
            messages_sent: r(&self.messages_sent),
            commands_accepted: r(&self.commands_accepted),
            commands_received: r(&self.commands_received),
            commands_in_flight,
            settling: u64::from(phase >= Phase::Settle),
        }
    }
}

impl Ctx {
    fn tally(&self, f: impl FnOnce(&mut Tally)) {
        f(&mut self.tally.lock().unwrap_or_else(|e| e.into_inner()));
    }

    async fn reached(&self, p: Phase) {
        let mut rx = self.phase.clone();
        // The sender lives until the process ends; a closed channel means we are ending.
        let _ = rx.wait_for(|now| *now >= p).await;
    }

    fn at_least(&self, p: Phase) -> bool {
        *self.phase.borrow() >= p
    }
}

/// A device user's session data.
#[derive(Clone)]
struct Slot {
    index: usize,
    token: String,
    client: Option<DeviceClient>,
}

/// Runs a worker: reads [`Init`] and phases from stdin, prints [`Report`]s on stdout.
///
/// # Errors
/// A bad init line or a goose failure; both are also reported as [`Report::Failed`].
pub async fn run() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let init: Init = serde_json::from_str(
        &lines
            .next_line()
            .await?
            .context("stdin closed before the init line")?,
    )
    .context("init line")?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Provision);
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Phase>(&line) {
                Ok(p) => {
                    phase_tx.send_replace(p);
                }
                Err(e) => eprintln!("worker: ignoring {line:?}: {e}"),
            }
        }
        // The coordinator is gone: finish rather than hold sockets forever.
        phase_tx.send_replace(Phase::Finish);
    });
    let result = attack(init, phase_rx).await;
    let report = match &result {
        Ok(tally) => Report::Done(Box::new(tally.clone())),
        Err(e) => Report::Failed(format!("{e:?}")),
    };
    emit(&report).await;
    result.map(|_| ())
}

async fn emit(r: &Report) {
    let mut out = tokio::io::stdout();
    let _ = out.write_all(format!("{}\n", r.line()).as_bytes()).await;
    let _ = out.flush().await;
}

async fn attack(init: Init, phase: watch::Receiver<Phase>) -> anyhow::Result<Tally> {
    let spec = init.spec;
    let share = spec.share(init.index);
    let operators = spec.operators_in(init.index);
    let apps = spec.share_apps(init.index);
    let workers = spec.workers as f64;
    let tls = match &spec.tls_ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            Some(fleetgate_device::tls_client_config(&pem, None)?)
        }
        None => None,
    };
    let ctx = Arc::new(Ctx {
        tls,
        first: share.start,
        len: share.len(),
        apps,
        next_app: AtomicUsize::new(0),
        phase,
        next_device: AtomicUsize::new(0),
        live: Live::default(),
        tally: Mutex::new(Tally::default()),
        connect_slots: Semaphore::new(spec.connect_concurrency),
        provision_slots: Semaphore::new(PROVISION_CONCURRENCY),
        connect_pacer: Pacer::new(spec.connect_rate / workers),
        command_pacer: Pacer::new(spec.rate),
        spec,
    });

    let ticker = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                // The phase is read before the counts, so a count marked as settling was
                // taken after every call started before the phase changed was counted.
                let phase = *ctx.phase.borrow();
                emit(&Report::Progress(ctx.live.snapshot(phase))).await;
            }
        })
    };

    let mut config = GooseConfiguration::default();
    config.host = Some(ctx.spec.admin_url.clone());
    config.users = Some(ctx.len + operators + ctx.apps.len());
    // Every user starts at once; connection pacing is ours (`connect_rate`).
    config.increase_rate = Some("1000000".into());
    config.iterations = Some(1);
    config.quiet = 1;
    config.no_print_metrics = true;
    config.no_error_summary = true;
    config.no_telnet = true;
    config.timeout = Some("60".into());
    config.report_file = init.goose_report.into_iter().collect();

    let mut attack = GooseAttack::initialize_with_config(config)
        .and_then(|a| {
            a.set_client_builder_without_cookies(
                goose::client::GooseClientBuilder::new().without_cookies(),
            )
        })
        .map_err(goose_error)?
        .register_scenario(device_scenario(&ctx, ctx.len)?);
    if operators > 0 {
        attack = attack.register_scenario(operator_scenario(&ctx, operators)?);
    }
    if !ctx.apps.is_empty() {
        attack = attack.register_scenario(app_scenario(&ctx, ctx.apps.len())?);
    }
    attack.execute().await.map_err(goose_error)?;
    ticker.abort();
    emit(&Report::Progress(ctx.live.snapshot(*ctx.phase.borrow()))).await;
    let tally = ctx.tally.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(tally)
}

/// goose's errors with their details (its `Display` leaves out which option was wrong).
fn goose_error(e: GooseError) -> anyhow::Error {
    match e {
        GooseError::InvalidOption {
            option,
            value,
            detail,
        } => anyhow::anyhow!("goose option {option} = {value:?}: {detail}"),
        other => anyhow::anyhow!("{other}"),
    }
}

/// Builds a goose transaction from an async step that borrows the user and shares `ctx`.
macro_rules! step {
    ($ctx:expr, $name:literal, $f:path) => {{
        let ctx = $ctx.clone();
        let f: TransactionFunction = Arc::new(move |user| Box::pin($f(ctx.clone(), user)));
        Transaction::new(f).set_name($name)
    }};
}

fn device_scenario(ctx: &Arc<Ctx>, weight: usize) -> anyhow::Result<Scenario> {
    Ok(scenario!("devices")
        .set_weight(weight.max(1))?
        .register_transaction(step!(ctx, "provision", provision).set_on_start())
        .register_transaction(step!(ctx, "connect", connect).set_sequence(1))
        .register_transaction(step!(ctx, "load", device_load).set_sequence(2))
        .register_transaction(step!(ctx, "disconnect", disconnect).set_on_stop()))
}

fn operator_scenario(ctx: &Arc<Ctx>, weight: usize) -> anyhow::Result<Scenario> {
    Ok(scenario!("operators")
        .set_weight(weight)?
        .register_transaction(step!(ctx, "commands", operate)))
}

fn app_scenario(ctx: &Arc<Ctx>, weight: usize) -> anyhow::Result<Scenario> {
    Ok(scenario!("apps")
        .set_weight(weight)?
        .register_transaction(step!(ctx, "watch", fanout::watch)))
}

fn custom_error(msg: String) -> Box<TransactionError> {
    Box::new(TransactionError::Custom(msg))
}

async fn provision(ctx: Arc<Ctx>, user: &mut GooseUser) -> TransactionResult {
    let n = ctx.next_device.fetch_add(1, Ordering::Relaxed);
    if n >= ctx.len {
        return Err(custom_error(format!(
            "device user {n} beyond this worker's {}",
            ctx.len
        )));
    }
    let index = ctx.first + n;
    let id = ctx.spec.device_id(index);
    let token = match ctx.spec.auth {
        AuthKind::None => Some("sink".to_owned()),
        AuthKind::Jwt => Some(jwt(&ctx.spec, &id)),
        AuthKind::Provision => {
            let _slot = ctx.provision_slots.acquire().await.expect("never closed");
            provision_secret(&ctx, user, &id).await
        }
    };
    match token {
        Some(token) => {
            ctx.live.provisioned.fetch_add(1, Ordering::Relaxed);
            user.set_session_data(Slot {
                index,
                token,
                client: None,
            });
        }
        None => {
            ctx.live.provision_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// `POST /v1/devices` through goose (so it lands in its report); the secret, or `None`
/// after counting why not.
async fn provision_secret(ctx: &Ctx, user: &mut GooseUser, id: &str) -> Option<String> {
    let key = ctx.spec.api_key.as_deref().unwrap_or_default();
    let builder = match user.get_request_builder(&GooseMethod::Post, "/v1/devices") {
        Ok(b) => b.bearer_auth(key).json(&json!({ "id": id })),
        Err(e) => {
            ctx.tally(|t| t.add(&format!("provision_failed:{e}"), 1));
            return None;
        }
    };
    let req = GooseRequest::builder()
        .set_request_builder(builder)
        .name("provision")
        .expect_status_code(201)
        .build();
    let outcome = match user.request(req).await {
        Ok(resp) => match resp.response {
            Ok(r) if r.status().as_u16() == 201 => match r.json::<Value>().await {
                Ok(body) => body["secret"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or("no secret".into()),
                Err(e) => Err(format!("body: {e}")),
            },
            Ok(r) => Err(r.status().as_u16().to_string()),
            Err(e) => Err(reason_of(&e.to_string())),
        },
        Err(e) => Err(reason_of(&e.to_string())),
    };
    outcome
        .map_err(|why| ctx.tally(|t| t.add(&format!("provision_failed:{why}"), 1)))
        .ok()
}

fn jwt(spec: &Spec, id: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = spec.jwt_kid.clone();
    let exp = now_ms() / 1000 + 24 * 3600;
    let key = jsonwebtoken::EncodingKey::from_secret(
        spec.jwt_secret.as_deref().unwrap_or_default().as_bytes(),
    );
    jsonwebtoken::encode(&header, &json!({ "sub": id, "exp": exp }), &key)
        .expect("HS256 signing with a byte key cannot fail")
}

/// The first outcome of a device's connection.
enum First {
    Online,
    Failed(String),
}

async fn connect(ctx: Arc<Ctx>, user: &mut GooseUser) -> TransactionResult {
    ctx.reached(Phase::Connect).await;
    let Some(slot) = user.get_session_data_mut::<Slot>() else {
        // Provisioning failed and was counted; this device sits the run out.
        ctx.live.connect_done.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    };
    let index = slot.index;
    let spec = &ctx.spec;
    let mut opts = DeviceOptions::new(spec.ws_url(index), spec.device_id(index), &slot.token);
    opts.bind_addr = spec.source_ip(index);
    opts.tls = ctx.tls.clone();
    opts.auth = match spec.auth_mode {
        AuthMode::Header => fleetgate_device::AuthMode::Header,
        AuthMode::FirstFrame => fleetgate_device::AuthMode::FirstFrame,
    };
    opts.connect_timeout = Duration::from_secs(30);
    opts.read_buffer_bytes = 1024;
    opts.max_inflight = spec.window.max(1);
    opts.request_capacity = spec.window.max(16);
    opts.reconnect_backoff_max = Duration::from_secs(5);
    // Commands may arrive faster than one answer at a time; room for a burst.
    opts.event_capacity = 64;

    let permit = ctx.connect_slots.acquire().await.expect("never closed");
    ctx.connect_pacer.wait().await;
    let started = Instant::now();
    ctx.tally(|t| t.mark("connect_started", now_ms()));
    let (first_tx, first_rx) = oneshot::channel();
    let outcome = match Device::connect(opts) {
        Ok((client, events)) => {
            tokio::spawn(watch_device(ctx.clone(), events, first_tx));
            let first = first_rx
                .await
                .unwrap_or(First::Failed("event loop ended".into()));
            slot.client = Some(client);
            first
        }
        Err(e) => First::Failed(reason_of(&e.to_string())),
    };
    drop(permit);
    let elapsed = started.elapsed();
    ctx.live.connect_done.fetch_add(1, Ordering::Relaxed);
    match outcome {
        First::Online => {
            ctx.tally(|t| {
                t.add("connected", 1);
                t.latency("connect", elapsed);
                t.mark("connected", now_ms());
            });
            user.record_custom_request_duration("WS", "connect", elapsed, true, None, None)
                .await?;
        }
        First::Failed(why) => {
            // Failure is the figure: stop the device rather than let it retry into the hold.
            if let Some(client) = slot.client.take() {
                client.disconnect().await;
            }
            ctx.tally(|t| t.add(&format!("connect_failed:{why}"), 1));
            user.record_custom_request_duration("WS", "connect", elapsed, false, None, Some(&why))
                .await?;
        }
    }
    Ok(())
}

/// Consumes one device's events for its whole life: online bookkeeping, disconnect codes,
/// reconnect times, and answering commands.
async fn watch_device(
    ctx: Arc<Ctx>,
    mut events: tokio::sync::mpsc::Receiver<DeviceEvent>,
    first: oneshot::Sender<First>,
) {
    let mut first = Some(first);
    let mut online = false;
    let mut down_since: Option<Instant> = None;
    while let Some(ev) = events.recv().await {
        match ev {
            DeviceEvent::Connected { .. } => {
                if !online {
                    online = true;
                    ctx.live.online.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(tx) = first.take() {
                    let _ = tx.send(First::Online);
                }
                if let Some(since) = down_since.take() {
                    ctx.tally(|t| {
                        t.add("reconnected", 1);
                        t.latency("down", since.elapsed());
                        t.mark("reconnected", now_ms());
                    });
                }
            }
            DeviceEvent::Disconnected { code, reason, .. } => {
                if online {
                    online = false;
                    ctx.live.online.fetch_sub(1, Ordering::Relaxed);
                }
                // Our own disconnect at the end is not an event of the run.
                if !ctx.at_least(Phase::Finish) {
                    let code = code.map_or_else(|| reason_of(&reason), |c| c.to_string());
                    ctx.tally(|t| {
                        t.add(&format!("disconnected:{code}"), 1);
                        t.mark("disconnected", now_ms());
                    });
                    down_since = Some(Instant::now());
                }
            }
            DeviceEvent::ConnectFailed { reason, .. } => match first.take() {
                Some(tx) => {
                    let _ = tx.send(First::Failed(reason_of(&reason)));
                }
                None => {
                    ctx.tally(|t| t.add(&format!("reconnect_failed:{}", reason_of(&reason)), 1))
                }
            },
            DeviceEvent::AuthFailed { reason } => match first.take() {
                Some(tx) => {
                    let _ = tx.send(First::Failed(format!("4403 {}", reason_of(&reason))));
                }
                None => ctx.tally(|t| t.add("reconnect_failed:4403", 1)),
            },
            DeviceEvent::Command(cmd) => {
                ctx.live.commands_received.fetch_add(1, Ordering::Relaxed);
                let age = now_ms().saturating_sub(u64::try_from(cmd.timestamp).unwrap_or(0));
                ctx.tally(|t| {
                    t.add("commands_received", 1);
                    if cmd.dup {
                        t.add("commands_received_dup", 1);
                    }
                    t.latency("command_delivery", Duration::from_millis(age));
                });
                if let Err(e) = cmd.respond(Some(json!({ "ok": true }))).await {
                    ctx.tally(|t| {
                        t.add(&format!("answer_failed:{}", reason_of(&e.to_string())), 1)
                    });
                }
            }
            DeviceEvent::Error(e) => {
                ctx.tally(|t| t.add(&format!("error_frame:{:?}", e.code), 1));
            }
            DeviceEvent::Delta { .. } => ctx.tally(|t| t.add("deltas_received", 1)),
        }
    }
    if online {
        ctx.live.online.fetch_sub(1, Ordering::Relaxed);
    }
    if let Some(tx) = first {
        let _ = tx.send(First::Failed("event loop ended".into()));
    }
}

async fn device_load(ctx: Arc<Ctx>, user: &mut GooseUser) -> TransactionResult {
    ctx.reached(Phase::Run).await;
    let client = user
        .get_session_data::<Slot>()
        .and_then(|s| s.client.clone());
    if let (Some(client), Kind::Telemetry | Kind::Fanout) = (client, ctx.spec.scenario) {
        let sent = telemetry(&ctx, &client).await;
        user.record_custom_request_duration("WS", "telemetry", sent.1, sent.0 > 0, None, None)
            .await?;
    }
    ctx.reached(Phase::Finish).await;
    Ok(())
}

/// Sends status until the run phase ends; returns (messages, time spent).
async fn telemetry(ctx: &Ctx, client: &DeviceClient) -> (u64, Duration) {
    let spec = &ctx.spec;
    let qos = if spec.qos == 0 {
        Qos::AtMostOnce
    } else {
        Qos::AtLeastOnce
    };
    let pad = "x".repeat(spec.payload_bytes);
    let pacer = Pacer::with_random_phase(spec.rate);
    let window = if qos == Qos::AtMostOnce {
        1
    } else {
        spec.window
    };
    let mut local = Tally::default();
    let mut inflight = FuturesUnordered::new();
    let started = Instant::now();
    local.mark("load", now_ms());
    let mut seq = 0u64;
    let mut stopping = ctx.phase.clone();
    let mut tick = Box::pin(pacer.wait());
    loop {
        let room = inflight.len() < window && !ctx.at_least(Phase::Settle);
        if !room && inflight.is_empty() {
            break;
        }
        // One select over answers, the pacer and the end of the run: a send future is
        // written when first polled, and `FuturesUnordered` polls a new one only after
        // handing out the answers ready before it. Taking answers as they come keeps that
        // queue empty, so each message goes out when it is made, not a window of answers
        // later (which added (window - 1) / rate to every latency measured from it).
        tokio::select! {
            biased;
            Some((res, rtt)) = inflight.next(), if !inflight.is_empty() => match res {
                Ok(_) => {
                    local.add("messages_acked", 1);
                    if qos != Qos::AtMostOnce {
                        local.latency("ack", rtt);
                    }
                }
                Err(e) => {
                    let e: fleetgate_device::DeviceError = e;
                    local.add(&format!("send_failed:{}", reason_of(&e.to_string())), 1);
                }
            },
            () = &mut tick, if room => {
                // Every slot that is due goes out now (unpaced, or behind schedule): sends
                // made together are written together, as a device with a backlog does.
                loop {
                    seq += 1;
                    // Fanout subscribers measure delivery latency from the send time.
                    let payload = if spec.scenario == Kind::Fanout {
                        json!({ "seq": seq, "temp": 21.5, "sentUs": fanout::now_us(), "pad": pad })
                    } else {
                        json!({ "seq": seq, "temp": 21.5, "pad": pad })
                    };
                    let t0 = Instant::now();
                    let send = client.send_status(payload, qos);
                    inflight.push(async move { (send.await, t0.elapsed()) });
                    ctx.live.messages_sent.fetch_add(1, Ordering::Relaxed);
                    if inflight.len() >= window || ctx.at_least(Phase::Settle) || !pacer.take_due() {
                        break;
                    }
                }
                // The next slot is taken now: a window that stays full delays sends, and the
                // pacer's schedule (open loop) catches up when it frees.
                tick = Box::pin(pacer.wait());
            }
            _ = stopping.wait_for(|p| *p >= Phase::Settle), if !ctx.at_least(Phase::Settle) => {}
        }
    }
    local.add("messages_sent", seq);
    local.mark("load", now_ms());
    ctx.tally(|t| t.merge(&local));
    (seq, started.elapsed())
}

async fn operate(ctx: Arc<Ctx>, user: &mut GooseUser) -> TransactionResult {
    ctx.reached(Phase::Run).await;
    let spec = &ctx.spec;
    let key = spec.api_key.clone().unwrap_or_default();
    let mut local = Tally::default();
    while !ctx.at_least(Phase::Settle) {
        ctx.command_pacer.wait().await;
        // In flight before looking at the phase: a count taken after the phase changed
        // then includes this call if it goes ahead.
        ctx.live.commands_in_flight.fetch_add(1, Ordering::SeqCst);
        if ctx.at_least(Phase::Settle) {
            ctx.live.commands_in_flight.fetch_sub(1, Ordering::SeqCst);
            break;
        }
        let device = spec.device_id(rand::random_range(0..spec.devices));
        let path = format!("/v1/devices/{device}/commands");
        let body = json!({ "payload": { "action": "ping", "at": now_ms() }, "qos": spec.qos, "waitMs": spec.wait_ms });
        let builder = user
            .get_request_builder(&GooseMethod::Post, &path)?
            .bearer_auth(&key)
            .json(&body);
        let expect = if spec.wait_ms > 0 { 200 } else { 202 };
        let req = GooseRequest::builder()
            .set_request_builder(builder)
            .name("command")
            .expect_status_code(expect)
            .build();
        let t0 = Instant::now();
        // The send times bound the load window; answers may come much later.
        local.mark("commands", now_ms());
        let status = match user.request(req).await {
            Ok(resp) => match resp.response {
                Ok(r) => r.status().as_u16().to_string(),
                Err(e) => reason_of(&e.to_string()),
            },
            Err(e) => reason_of(&e.to_string()),
        };
        let rtt = t0.elapsed();
        local.add(&format!("command_status:{status}"), 1);
        // 200: answered; 202 or 504: queued and owed to the device.
        if matches!(status.as_str(), "200" | "202" | "504") {
            ctx.live.commands_accepted.fetch_add(1, Ordering::SeqCst);
            local.add("commands_accepted", 1);
        }
        if status == "200" {
            local.latency("command_rtt", rtt);
        }
        // Counted as answered only after `commands_accepted`, so the coordinator never sees
        // an accepted command missing from both counts.
        ctx.live.commands_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
    ctx.tally(|t| t.merge(&local));
    Ok(())
}

async fn disconnect(ctx: Arc<Ctx>, user: &mut GooseUser) -> TransactionResult {
    ctx.reached(Phase::Finish).await;
    if let Some(client) = user
        .get_session_data::<Slot>()
        .and_then(|s| s.client.clone())
    {
        client.disconnect().await;
    }
    Ok(())
}

/// A short, countable label for a failure: a close code or HTTP status when one is named,
/// else a kind of transport error.
pub fn reason_of(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    if let Some(code) = text
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 4 && (w.starts_with("10") || w.starts_with('4')))
    {
        return code.to_owned();
    }
    if let Some(status) = text
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 3 && matches!(w.as_bytes()[0], b'4' | b'5'))
    {
        return format!("http {status}");
    }
    for (needle, label) in [
        ("timed out", "timeout"),
        ("timeout", "timeout"),
        ("refused", "refused"),
        ("reset", "reset"),
        ("address not available", "no local port"),
        ("too many open files", "file limit"),
        ("broken pipe", "broken pipe"),
        ("closed", "closed"),
    ] {
        if lower.contains(needle) {
            return label.to_owned();
        }
    }
    "other".to_owned()
}

#[cfg(test)]
mod tests {
    use super::reason_of;

    #[test]
    fn failures_are_labelled_by_code_status_or_kind() {
        assert_eq!(reason_of("closed with 1013: at capacity"), "1013");
        assert_eq!(reason_of("gateway closed 4403 bad token"), "4403");
        assert_eq!(reason_of("upgrade refused: HTTP 503"), "http 503");
        assert_eq!(reason_of("Connection refused (os error 111)"), "refused");
        assert_eq!(reason_of("connect timed out"), "timeout");
        assert_eq!(reason_of("Too many open files (os error 24)"), "file limit");
        assert_eq!(
            reason_of("Cannot assign requested address: address not available"),
            "no local port"
        );
        assert_eq!(reason_of("weird"), "other");
    }
}
