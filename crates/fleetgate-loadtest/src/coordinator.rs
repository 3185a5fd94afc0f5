//! The coordinator: starts the worker processes, moves them through the phases together,
//! samples the servers' `/metrics`, runs the reconnect-storm trigger, and sums it all up.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::params::{Scenario, Spec};
use crate::scrape;
use crate::summary::{Moments, RunResult, summarize};
use crate::tally::{Tally, now_ms};
use crate::wire::{Init, Phase, Progress, Report};

/// How the results are kept.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// JSON results file.
    pub results: Option<PathBuf>,
    /// Folder for goose's HTML reports (one per worker).
    pub report_dir: Option<PathBuf>,
    /// A name for this run in the results.
    pub label: Option<String>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    progress: Progress,
    done: Option<Tally>,
}

struct Fleet {
    workers: Vec<Worker>,
    rx: mpsc::Receiver<(usize, Option<Report>)>,
}

impl Fleet {
    async fn start(spec: &Spec, out: &Output) -> anyhow::Result<(Fleet, Vec<String>)> {
        let exe = std::env::current_exe().context("locating this program")?;
        let (tx, rx) = mpsc::channel(1024);
        let mut workers = Vec::new();
        let mut reports = Vec::new();
        for index in 0..spec.workers {
            let goose_report = out.report_dir.as_ref().map(|d| {
                let name = format!(
                    "{}-{}worker{index}.html",
                    spec.scenario.name(),
                    out.label
                        .as_deref()
                        .map(|l| format!("{l}-"))
                        .unwrap_or_default()
                );
                d.join(name).display().to_string()
            });
            reports.extend(goose_report.clone());
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker process")?;
            let mut stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let init = Init {
                spec: spec.clone(),
                index,
                goose_report,
            };
            stdin
                .write_all(format!("{}\n", serde_json::to_string(&init)?).as_bytes())
                .await?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match Report::parse(&line) {
                        Some(Ok(r)) => {
                            if tx.send((index, Some(r))).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => eprintln!("worker {index}: bad report {e}: {line}"),
                        None => eprintln!("worker {index}: {line}"),
                    }
                }
                let _ = tx.send((index, None)).await;
            });
            workers.push(Worker {
                child,
                stdin,
                progress: Progress::default(),
                done: None,
            });
        }
        Ok((Fleet { workers, rx }, reports))
    }

    async fn phase(&mut self, p: Phase) -> anyhow::Result<()> {
        let line = format!("{}\n", serde_json::to_string(&p)?);
        for (i, w) in self.workers.iter_mut().enumerate() {
            w.stdin
                .write_all(line.as_bytes())
                .await
                .with_context(|| format!("worker {i} is gone"))?;
        }
        Ok(())
    }

    fn total(&self) -> Progress {
        let mut t = Progress::default();
        for w in &self.workers {
            t.add(&w.progress);
        }
        t
    }

    /// Takes reports until `done(total)` holds; `Ok(false)` when `within` passes first.
    async fn until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&Progress, usize) -> bool,
    ) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let finished = self.workers.iter().filter(|w| w.done.is_some()).count();
            if done(&self.total(), finished) {
                return Ok(true);
            }
            let next = tokio::time::timeout_at(deadline, self.rx.recv()).await;
            let Ok(Some((i, report))) = next else {
                return Ok(false);
            };
            match report {
                Some(Report::Progress(p)) => self.workers[i].progress = p,
                Some(Report::Done(t)) => self.workers[i].done = Some(*t),
                Some(Report::Failed(why)) => bail!("worker {i} failed: {why}"),
                None if self.workers[i].done.is_none() => {
                    let status = self.workers[i].child.wait().await?;
                    bail!("worker {i} ended without a report ({status})");
                }
                None => {}
            }
        }
    }

    /// Like [`Fleet::until`], but running out of time is an error saying what was awaited.
    async fn require(
        &mut self,
        what: &str,
        within: Duration,
        mut done: impl FnMut(&Progress) -> bool,
    ) -> anyhow::Result<()> {
        if !self.until(within, |p, _| done(p)).await? {
            bail!("{what}: not done within {within:?} ({:?})", self.total());
        }
        Ok(())
    }

    /// Takes reports until every worker has sent its final one.
    async fn collect(&mut self, within: Duration) -> anyhow::Result<()> {
        let n = self.workers.len();
        if !self.until(within, |_, finished| finished == n).await? {
            let missing: Vec<usize> = (0..n).filter(|i| self.workers[*i].done.is_none()).collect();
            bail!("workers {missing:?} sent no final report within {within:?}");
        }
        Ok(())
    }

    /// Lets time pass while keeping the progress current.
    async fn pass(&mut self, d: Duration) -> anyhow::Result<()> {
        self.until(d, |_, _| false).await.map(|_| ())
    }
}

/// Runs `spec` end to end and returns (and writes) its result.
///
/// # Errors
/// A worker that fails or a setup step (provisioning, connecting) that does not finish
/// within `setup_timeout`.
pub async fn run(spec: Spec, out: &Output) -> anyhow::Result<RunResult> {
    if let Some(dir) = &out.report_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let http = reqwest::Client::new();
    let setup = Duration::from_secs_f64(spec.setup_timeout);
    let devices = spec.devices as u64;
    // App subscribers (fanout) connect in the same phase and count as done the same way.
    let sockets = devices + spec.apps as u64;
    let mut m = Moments::default();
    let (mut fleet, goose_reports) = Fleet::start(&spec, out).await?;
    eprintln!(
        "{}: {} devices over {} worker(s)",
        spec.scenario.name(),
        spec.devices,
        spec.workers
    );

    fleet
        .require("provisioning", setup, |p| {
            p.provisioned + p.provision_failed >= devices
        })
        .await?;
    m.idle = Some(scrape::sample(&http, &spec.metrics_urls).await);
    let t_connect = Instant::now();
    fleet.phase(Phase::Connect).await?;
    fleet
        .require("connecting", setup, |p| p.connect_done >= sockets)
        .await?;
    eprintln!(
        "connected {} of {} in {:.1} s",
        fleet.total().online,
        devices,
        t_connect.elapsed().as_secs_f64()
    );
    m.connected = Some(scrape::sample(&http, &spec.metrics_urls).await);
    let online_before = fleet.total().online;

    // For `connect` the run phase is the hold: devices stay idle and the end sample is the
    // memory they cost.
    let run_for = Duration::from_secs_f64(spec.duration);
    let watcher = watch_nodes(http.clone(), spec.metrics_urls.clone());
    fleet.phase(Phase::Run).await?;
    m.run_start = Some((now_ms(), sample_run(&http, &spec).await));
    if let Some(trigger) = spec.trigger.clone() {
        fleet.pass(Duration::from_secs_f64(spec.warmup)).await?;
        m.trigger_ms = Some(now_ms());
        run_trigger(&trigger).await?;
    }
    fleet.pass(run_for).await?;
    let end = sample_run(&http, &spec).await;
    m.run_end = Some((now_ms(), end));
    if spec.scenario == Scenario::Connect {
        m.held = Some(end);
    }
    fleet.phase(Phase::Settle).await?;

    let settle = Duration::from_secs_f64(spec.settle_timeout);
    let workers = spec.workers as u64;
    let t_settle = Instant::now();
    if spec.sends_commands() {
        // Calls still in flight may yet be accepted; queued commands still reach devices that
        // are (back) online.
        fleet
            .until(settle, |p, _| {
                p.settling == workers
                    && p.commands_in_flight == 0
                    && p.commands_received >= p.commands_accepted
                    && p.online >= online_before
            })
            .await?;
    }
    m.settled_online = Some(fleet.total().online);
    m.settle_secs = t_settle.elapsed().as_secs_f64();

    watcher.abort();
    fleet.phase(Phase::Finish).await?;
    fleet.collect(Duration::from_secs(120)).await?;
    let mut tally = Tally::default();
    for w in &mut fleet.workers {
        if let Some(t) = &w.done {
            tally.merge(t);
        }
        let _ = w.child.wait().await;
    }
    let result = summarize(&spec, &tally, &m, out.label.clone(), goose_reports);
    if let Some(path) = &out.results {
        write_json(path, &result)?;
    }
    Ok(result)
}

/// Prints every node's open sessions every two seconds while the load runs, so an operator
/// sees where devices go during a storm (and which node stopped answering).
fn watch_nodes(http: reqwest::Client, urls: Vec<String>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if urls.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let nodes: Vec<String> = scrape::per_node(&http, &urls)
                .await
                .iter()
                .map(|s| s.map_or_else(|| "-".to_owned(), |s| format!("{:.0}", s.sessions)))
                .collect();
            eprintln!(
                "+{:>4.0}s sessions per node: {}",
                started.elapsed().as_secs_f64(),
                nodes.join(" ")
            );
        }
    })
}

async fn run_trigger(cmd: &str) -> anyhow::Result<()> {
    eprintln!("trigger: {cmd}");
    let status = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .await
        .with_context(|| format!("running trigger {cmd:?}"))?;
    if !status.success() {
        bail!("trigger {cmd:?} failed: {status}");
    }
    Ok(())
}

/// The nodes' figures and, with `--redis-url`, redis-server's CPU.
async fn sample_run(http: &reqwest::Client, spec: &Spec) -> scrape::Sample {
    let mut s = scrape::sample(http, &spec.metrics_urls).await;
    if let Some(url) = &spec.redis_url {
        s.redis_cpu = scrape::redis_cpu(url).await.unwrap_or(0.0);
    }
    s
}

/// Writes `value` as pretty JSON, creating the folder.
///
/// # Errors
/// I/O errors, with the path.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
