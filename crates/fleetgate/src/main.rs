//! `fleetgate`: one binary, three roles. `gateway` serves devices, `admin` serves the REST
//! API, `all` runs both on one node (on the memory bus unless Redis is configured).

mod audit_cli;
mod bus_metrics;
mod heap_trim;
mod listeners;
mod process_metrics;
mod reload;
mod secret_files;
mod settings;
mod telemetry;

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fleetgate_admin::Admin;
use fleetgate_bus::Bus;
use fleetgate_bus::memory::MemoryBus;
use fleetgate_bus::redis::RedisBus;
use fleetgate_gateway::Gateway;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::info;

use bus_metrics::BusMetrics;
use listeners::Listeners;
use process_metrics::ProcessMetrics;
use settings::{Listener, Overrides, Settings};

#[derive(Parser)]
#[command(
    name = "fleetgate",
    version,
    about = "WebSocket gateway for IoT fleets"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Serve devices on `/v1/device`.
    Gateway(Overrides),
    /// Serve the admin REST API.
    Admin(Overrides),
    /// Gateway and admin API in one process.
    All(Overrides),
    /// Print the effective configuration as TOML and exit.
    Config(Overrides),
    /// Audit log tools (offline verification of an exported copy).
    #[command(subcommand)]
    Audit(audit_cli::AuditCommand),
    /// Move Redis keys to the shards a new shard list gives them (stop every node first).
    /// Prints what it moved (or, without --apply, what it would move) as JSON.
    Reshard(ReshardArgs),
}

#[derive(clap::Args)]
struct ReshardArgs {
    /// The shard list the nodes ran with, comma-separated, in their order.
    #[arg(long, value_delimiter = ',', required = true)]
    from: Vec<String>,
    /// The new shard list, comma-separated, in the order nodes will use.
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// Move the keys; without it, only report what would move.
    #[arg(long)]
    apply: bool,
    /// Key prefix the nodes use.
    #[arg(long, default_value = "fleetgate:")]
    key_prefix: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (overrides, gateway, admin) = match &cli.role {
        Role::Gateway(o) => (o, true, false),
        Role::Admin(o) => (o, false, true),
        Role::All(o) => (o, true, true),
        Role::Reshard(args) => {
            let report = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(fleetgate_bus::redis::reshard(
                    &args.from,
                    &args.to,
                    &args.key_prefix,
                    args.apply,
                ))
                .context("reshard")?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            return Ok(());
        }
        Role::Audit(command) => {
            if audit_cli::run(command)? {
                return Ok(());
            }
            std::process::exit(1);
        }
        Role::Config(o) => {
            let s = Settings::load(o)?;
            let mut shown = s.clone();
            if !shown.api_key.is_empty() {
                shown.api_key = "<set>".into();
            }
            let text = toml::to_string(&shown)?;
            std::io::stdout().write_all(text.as_bytes())?;
            return Ok(());
        }
    };
    let settings = Settings::load(overrides)?;
    let _telemetry = telemetry::init(
        &settings.log_format,
        settings.otlp_endpoint.as_deref(),
        &settings.node_id,
    )?;
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(serve(settings, gateway, admin));
    // Socket tasks still parked on the runtime go before the trace flush, which blocks.
    drop(runtime);
    served
}

/// Raises the soft open-file limit to the hard one. Container runtimes (containerd 2 among
/// them) start processes with a soft limit of 1024 under a far higher hard limit, and every
/// device holds a descriptor; Go's runtime does the same at start.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(message = "open-file limit", limit),
        Err(error) => tracing::warn!(message = "could not raise the open-file limit", %error),
    }
}

/// `fleetgate_ready`: 1 while `/readyz` answers 200, so flapping readiness shows in metrics
/// (kubelet's probe results are not scraped by most setups).
struct ReadyMetric(Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for ReadyMetric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadyMetric")
    }
}

impl prometheus_client::collector::Collector for ReadyMetric {
    fn encode(&self, mut e: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        let g = prometheus_client::metrics::gauge::ConstGauge::new(i64::from((self.0)()));
        g.encode(e.encode_descriptor(
            "fleetgate_ready",
            "1 while this process answers /readyz with 200.",
            None,
            g.metric_type(),
        )?)
    }
}

async fn shutdown_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!(message = "SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!(message = "SIGINT: draining"),
    }
    token.cancel();
}

async fn serve(settings: Settings, run_gateway: bool, run_admin: bool) -> anyhow::Result<()> {
    let (bus, bus_metrics): (Arc<dyn Bus>, BusMetrics) = if settings.redis_urls.is_empty() {
        if !(run_gateway && run_admin) {
            // Two processes cannot share a memory bus.
            bail!(
                "`fleetgate gateway` and `fleetgate admin` as separate processes need FLEETGATE_REDIS_URLS; use `fleetgate all` for one node"
            );
        }
        info!(message = "memory bus: single node, state is kept in this process only");
        let memory = MemoryBus::new(settings.memory_bus_config());
        (Arc::new(memory.clone()), BusMetrics::Memory(memory))
    } else {
        let redis = RedisBus::connect(settings.redis_bus_config())
            .await
            .with_context(|| format!("connecting to Redis {:?}", settings.redis_urls))?;
        info!(message = "redis bus", shards = settings.redis_urls.len());
        let redis = Arc::new(redis);
        (redis.clone(), BusMetrics::Redis(redis))
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(bus_metrics));
    registry.register_collector(Box::new(ProcessMetrics::new()));
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_signal(shutdown.clone()));
    tokio::spawn(heap_trim::run(shutdown.clone()));
    // Stops the MQTT bridge once the gateway has drained its sessions.
    let mqtt_stop = CancellationToken::new();

    let mut addrs = serde_json::Map::new();
    let mut listeners = Listeners::new(&mut registry);
    let admin = if run_admin {
        let (listener, local) =
            listeners.bind(&settings, Listener::Admin, &settings.admin_listen)?;
        addrs.insert("admin".into(), local.to_string().into());
        let admin = Admin::start(settings.admin_config()?, bus.clone()).await?;
        registry.register_collector(Box::new(bus_metrics::AdminMetrics(admin.clone())));
        Some((admin, listener))
    } else {
        None
    };
    let (jwt_files, jwt_keys) = reload::JwtFiles::load(&settings)?;
    let gateway = if run_gateway {
        let (listener, local) = listeners.bind(&settings, Listener::Public, &settings.listen)?;
        addrs.insert("gateway".into(), local.to_string().into());
        // `/v1/app` accepts the admin API's principals and audits its commands on the same
        // chain: in one process with the admin API's own authenticator (its token key may be
        // ephemeral) and writer; alone with one holding the same keys, and an appending-only
        // writer (the admin processes sign the checkpoints).
        let (principals, audit) = match &admin {
            Some((admin, _)) => (admin.authenticator(), admin.audit_log()),
            None => (
                Arc::new(fleetgate_authz::Authenticator::new(
                    settings.api_key.clone(),
                    &settings.token_keys()?,
                    i64::try_from(settings.admin.token_ttl_ms).unwrap_or(i64::MAX),
                )),
                fleetgate_audit::AuditLog::start(
                    bus.clone(),
                    fleetgate_audit::Signer::generate(),
                    &fleetgate_audit::AuditConfig {
                        checkpoints: false,
                        ..fleetgate_audit::AuditConfig::default()
                    },
                ),
            ),
        };
        let a = &settings.admin;
        let limits = fleetgate_gateway::CommandLimits {
            default_ttl: std::time::Duration::from_millis(a.default_ttl_ms),
            max_ttl: std::time::Duration::from_millis(a.max_ttl_ms),
            max_wait: std::time::Duration::from_millis(a.max_wait_ms),
        };
        let commands = fleetgate_gateway::AppCommands::start(
            bus.clone(),
            audit,
            format!("{}-app", settings.node_id),
            limits,
        )
        .await
        .context("subscribing to the app command results")?;
        let app = fleetgate_gateway::AppAccess {
            principals,
            commands: Some(commands),
        };
        let gw = Gateway::new(
            settings.gateway_config(),
            bus.clone(),
            jwt_keys.clone(),
            app,
            &mut registry,
        );
        let gw = match settings
            .mqtt
            .bridge(&settings.node_id, settings.gateway.max_frame_bytes)?
        {
            Some((config, acl)) => {
                info!(message = "MQTT bridge", broker = %config.broker.host, port = config.broker.port);
                let bridge = fleetgate_mqtt::Bridge::start(config, mqtt_stop.clone());
                let device_idle = std::time::Duration::from_millis(settings.mqtt.device_idle_ms);
                let access = fleetgate_gateway::MqttAccess {
                    bridge,
                    acl,
                    device_idle,
                };
                gw.with_mqtt(access, &mut registry)
            }
            None => gw,
        };
        Some((gw, listener))
    } else {
        None
    };
    let (internal, local) =
        listeners.bind(&settings, Listener::Internal, &settings.internal_listen)?;
    addrs.insert("internal".into(), local.to_string().into());
    let reload_every = std::time::Duration::from_millis(settings.tls.reload_interval_ms);
    listeners.watch(reload_every, &shutdown);
    if run_gateway && jwt_files.any() {
        reload::every("device JWT keys", reload_every, &shutdown, move || {
            jwt_files.reload_if_changed(&jwt_keys)
        });
    }

    let ready_gw = gateway.as_ref().map(|(g, _)| g.clone());
    // Ready while the gateway (if any) accepts devices and the bus's links, pub/sub included,
    // are up.
    let ready_bus = bus.clone();
    let ready = move || ready_gw.as_ref().is_none_or(Gateway::is_ready) && ready_bus.connected();
    let ready: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(ready);
    registry.register_collector(Box::new(ReadyMetric(ready.clone())));
    let internal_app =
        fleetgate_gateway::internal_router(Arc::new(registry), move || ready(), shutdown.clone());
    let internal_task = tokio::spawn(async move { axum::serve(internal, internal_app).await });

    let admin_task = admin.map(|(admin, listener)| {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            // The peer address is the audit log's `source`.
            let app = admin
                .router()
                .into_make_service_with_connect_info::<fleetgate_tls::Peer>();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    });

    // Scripts and tests find the bound ports here (port 0 binds a free one).
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::Value::Object(addrs))?;
    out.flush()?;
    drop(out);
    info!(message = "fleetgate started", node_id = %settings.node_id);

    if let Some((gw, listener)) = gateway {
        let served = gw.run(listener, shutdown.clone()).await;
        mqtt_stop.cancel();
        served?;
    } else {
        shutdown.cancelled().await;
    }
    if let Some(task) = admin_task {
        task.await??;
    }
    internal_task.abort();
    info!(message = "fleetgate stopped");
    Ok(())
}
