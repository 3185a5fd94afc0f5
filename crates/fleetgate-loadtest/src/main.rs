//! `fleetgate-loadtest`: load scenarios against any fleetgate deployment (loopback or remote),
//! a reference WebSocket sink, and the BENCHMARKS.md table generator.
//!
//! ```text
//! fleetgate-loadtest connect --config loadtest/scenarios/connect.toml --devices 19000
//! fleetgate-loadtest telemetry --ws-url wss://gw.example/v1/device --qos 1 --rate 1
//! fleetgate-loadtest sink --listen 127.0.0.1:0
//! fleetgate-loadtest report --results loadtest/results --benchmarks BENCHMARKS.md
//! ```
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use fleetgate_loadtest::params::{Params, Scenario};
use fleetgate_loadtest::{coordinator, report, sink, worker};

#[derive(Parser)]
#[command(
    version,
    about = "Load tests for fleetgate: device swarms and admin API traffic, driven by goose"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ramp up authenticated devices and hold them: connect rate, failures, server memory.
    Connect(RunArgs),
    /// Devices report status at a rate, QoS 0 or 1: messages/s and ack latency.
    Telemetry(RunArgs),
    /// Commands through the admin API to online devices, waiting for the result.
    Commands(RunArgs),
    /// Drain or kill a node under load (`--trigger`): time until all are back, commands lost.
    ReconnectStorm(RunArgs),
    /// Devices report at a fixed rate while app subscribers watch them over `/v1/app`:
    /// delivered frames/s, delivery latency, server CPU per delivered frame.
    Fanout(RunArgs),
    /// The reference sink: accepts WebSockets, reads and discards.
    Sink {
        /// WebSocket listener.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// `/metrics` listener.
        #[arg(long, default_value = "127.0.0.1:9190")]
        metrics_listen: SocketAddr,
    },
    /// Regenerates the load-test table of BENCHMARKS.md from a results folder.
    Report {
        /// Folder of run results (JSON).
        #[arg(long, default_value = "loadtest/results")]
        results: PathBuf,
        /// The file whose marked section is replaced.
        #[arg(long, default_value = "BENCHMARKS.md")]
        benchmarks: PathBuf,
        /// The command that produced the results, quoted in the table's heading.
        #[arg(long, default_value = "make bench")]
        command: String,
    },
    /// Internal: one worker process of a run (spawned by the coordinator).
    #[command(hide = true)]
    Worker,
}

#[derive(Args)]
struct RunArgs {
    /// Scenario file (TOML; keys are the flag names); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    params: Params,
    /// Write the results (JSON) here.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Keep goose's HTML report of each worker in this folder.
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// A name for this run in the results.
    #[arg(long)]
    label: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (scenario, args) = match cli.command {
        Cmd::Connect(a) => (Scenario::Connect, a),
        Cmd::Telemetry(a) => (Scenario::Telemetry, a),
        Cmd::Commands(a) => (Scenario::Commands, a),
        Cmd::ReconnectStorm(a) => (Scenario::ReconnectStorm, a),
        Cmd::Fanout(a) => (Scenario::Fanout, a),
        Cmd::Sink {
            listen,
            metrics_listen,
        } => {
            let ws = sink::bind(listen).with_context(|| format!("binding {listen}"))?;
            let metrics =
                sink::bind(metrics_listen).with_context(|| format!("binding {metrics_listen}"))?;
            println!(
                "{}",
                serde_json::json!({
                    "sink": ws.local_addr()?.to_string(),
                    "metrics": metrics.local_addr()?.to_string(),
                })
            );
            return sink::serve(ws, metrics).await;
        }
        Cmd::Report {
            results,
            benchmarks,
            command,
        } => return report::regenerate(&results, &benchmarks, &command),
        Cmd::Worker => {
            let result = worker::run().await;
            // The stdin reader sits in a blocking read that would hold up the runtime's
            // shutdown until the coordinator closes the pipe: leave now.
            std::process::exit(i32::from(result.is_err()));
        }
    };
    let file = match &args.config {
        Some(path) => Params::from_file(path)?,
        None => Params::default(),
    };
    let spec = file.overlay(args.params).resolve(scenario)?;
    let out = coordinator::Output {
        results: args.results,
        report_dir: args.report_dir,
        label: args.label,
    };
    let result = coordinator::run(spec, &out).await?;
    print!("{}", result.text());
    Ok(())
}
