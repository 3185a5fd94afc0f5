//! Scenario parameters: read from a TOML file under `loadtest/`, overridden by flags, then
//! resolved into the [`Spec`] every worker process receives. Pure logic, no I/O but the file.

use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::path::Path;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// Sockets one worker process holds at most: the per-process file limit (20,000 on the
/// machines we measure on) minus room for the HTTP client, logs and the runtime.
pub const MAX_DEVICES_PER_WORKER: usize = 18_000;

/// The scenarios, selectable by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Ramp up authenticated devices, hold them, report connect rate and server memory.
    Connect,
    /// Devices report status at a rate with QoS 0 or 1; messages/s and ack latency.
    Telemetry,
    /// Commands through the admin API to online devices, waiting for the result.
    Commands,
    /// Drain or kill a node under load; time until every device is back, commands lost.
    ReconnectStorm,
    /// Devices report at a fixed rate while app subscribers (`/v1/app`) watch their
    /// channels; delivered frames/s, delivery latency, server CPU per delivered frame.
    Fanout,
}

impl Scenario {
    /// The name used on the command line, in files and in results.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Telemetry => "telemetry",
            Scenario::Commands => "commands",
            Scenario::ReconnectStorm => "reconnect-storm",
            Scenario::Fanout => "fanout",
        }
    }
}

/// How devices get their credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthKind {
    /// `POST /v1/devices` on the admin API (needs `api_key`); the secret it returns.
    Provision,
    /// An HS256 JWT signed with `jwt_secret` (the gateway must hold the same key).
    Jwt,
    /// Any token: for the reference sink, which checks nothing.
    None,
}

/// Where devices present their credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// `Authorization: Bearer` on the upgrade request.
    #[default]
    Header,
    /// An `auth` frame after the upgrade.
    FirstFrame,
}

/// Every tunable of a run. All optional, so that a file and the flags can each give some;
/// [`Params::resolve`] fills in the defaults.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Params {
    /// Device endpoint(s), comma-separated; devices are spread over them by index.
    #[arg(long, value_delimiter = ',')]
    pub ws_url: Option<Vec<String>>,
    /// Fanout: app endpoint(s) (`/v1/app`), comma-separated; apps are spread over them by
    /// index. Default: each device endpoint with `/v1/app` for `/v1/device`.
    #[arg(long, value_delimiter = ',')]
    pub app_url: Option<Vec<String>>,
    /// Fanout: app subscribers; app `j` subscribes to the channels of devices
    /// `j * channels-per-app + i` (mod devices), `i` < channels-per-app.
    #[arg(long)]
    pub apps: Option<usize>,
    /// Fanout: device channels each app subscribes to (a dashboard watching many devices).
    #[arg(long)]
    pub channels_per_app: Option<usize>,
    /// Admin API base URL (provisioning, commands).
    #[arg(long)]
    pub admin_url: Option<String>,
    /// Admin API key.
    #[arg(long, env = "FLEETGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// `/metrics` URL(s) of the nodes under test: server memory, CPU and message counts.
    #[arg(long, value_delimiter = ',')]
    pub metrics_url: Option<Vec<String>>,
    /// redis-server behind the nodes (`redis://host:port`): its CPU is measured too.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// How devices get credentials.
    #[arg(long, value_enum)]
    pub auth: Option<AuthKind>,
    /// Where devices present their credentials (default: header).
    #[arg(long, value_enum)]
    pub auth_mode: Option<AuthMode>,
    /// HS256 secret for `--auth jwt`.
    #[arg(long, env = "FLEETGATE_LOADTEST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// `kid` header of the JWTs (omit when the gateway has a single key).
    #[arg(long)]
    pub jwt_kid: Option<String>,
    /// Device ID prefix; a random one per run by default, so runs never collide.
    #[arg(long)]
    pub device_prefix: Option<String>,
    /// Devices to connect.
    #[arg(long)]
    pub devices: Option<usize>,
    /// Connection attempts started per second over all workers; 0 = as fast as possible.
    #[arg(long)]
    pub connect_rate: Option<f64>,
    /// Connection attempts in flight per worker.
    #[arg(long)]
    pub connect_concurrency: Option<usize>,
    /// Seconds to hold the devices (connect) or to run the load (other scenarios).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Telemetry: messages/s per device (0 = as fast as acks allow). Commands and
    /// reconnect-storm: commands/s over the whole run.
    #[arg(long)]
    pub rate: Option<f64>,
    /// QoS of telemetry messages (0 or 1) or of commands (1 or 2).
    #[arg(long)]
    pub qos: Option<u8>,
    /// Telemetry: unacknowledged QoS 1 messages per device.
    #[arg(long)]
    pub window: Option<usize>,
    /// Telemetry: bytes of filler in each status payload.
    #[arg(long)]
    pub payload_bytes: Option<usize>,
    /// Commands: concurrent admin API callers.
    #[arg(long)]
    pub operators: Option<usize>,
    /// Commands: `waitMs` of each command (0 = do not wait for the result).
    #[arg(long)]
    pub wait_ms: Option<u64>,
    /// Reconnect-storm: shell command that drains or kills a node, e.g. `kill -TERM 1234`
    /// or `kubectl delete pod fleetgate-1`.
    #[arg(long)]
    pub trigger: Option<String>,
    /// Reconnect-storm: seconds of load before the trigger.
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Seconds to wait, after the load stops, for queued commands to arrive.
    #[arg(long)]
    pub settle_timeout: Option<f64>,
    /// Worker processes (at least devices / 18,000).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Local addresses to connect from, e.g. `127.0.0.1-127.0.0.8` or a comma list; spreads
    /// sockets past one address's ephemeral port range.
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Seconds allowed for provisioning and for connecting, each.
    #[arg(long)]
    pub setup_timeout: Option<f64>,
    /// PEM CA bundle the devices trust for `wss://` URLs (the system's roots otherwise).
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Bad parameters, said in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    /// The file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A value is out of range or missing.
    #[error("{0}")]
    Invalid(String),
}

impl Params {
    /// Reads a scenario file (TOML, the flag names as keys).
    ///
    /// # Errors
    /// [`ParamError::File`] when it is unreadable or has unknown keys.
    pub fn from_file(path: &Path) -> Result<Params, ParamError> {
        let err = |reason: String| ParamError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// `over` wins wherever it gives a value.
    pub fn overlay(self, over: Params) -> Params {
        let mut base = serde_json::to_value(self).expect("params serialise");
        let over = serde_json::to_value(over).expect("params serialise");
        if let (Some(base), Some(over)) = (base.as_object_mut(), over.as_object()) {
            for (k, v) in over {
                if !v.is_null() {
                    base.insert(k.clone(), v.clone());
                }
            }
        }
        serde_json::from_value(base).expect("merged params deserialise")
    }

    /// Fills in defaults and checks what `scenario` needs.
    ///
    /// # Errors
    /// [`ParamError::Invalid`] naming the offending setting.
    pub fn resolve(self, scenario: Scenario) -> Result<Spec, ParamError> {
        let bad = |s: String| Err(ParamError::Invalid(s));
        let devices = self.devices.unwrap_or(match scenario {
            Scenario::Connect => 1_000,
            Scenario::Telemetry => 50,
            Scenario::Commands => 200,
            Scenario::ReconnectStorm | Scenario::Fanout => 1_000,
        });
        if devices == 0 {
            return bad("devices must be at least 1".into());
        }
        let auth = self.auth.unwrap_or(if self.jwt_secret.is_some() {
            AuthKind::Jwt
        } else {
            AuthKind::Provision
        });
        let admin_url = self
            .admin_url
            .unwrap_or_else(|| "http://127.0.0.1:8081".into());
        let needs_admin = auth == AuthKind::Provision
            || matches!(
                scenario,
                Scenario::Commands | Scenario::ReconnectStorm | Scenario::Fanout
            );
        if needs_admin && self.api_key.is_none() {
            return bad(format!(
                "{} needs --api-key (or FLEETGATE_API_KEY) for the admin API",
                if auth == AuthKind::Provision {
                    "--auth provision".to_owned()
                } else {
                    scenario.name().to_owned()
                }
            ));
        }
        if auth == AuthKind::Jwt && self.jwt_secret.is_none() {
            return bad("--auth jwt needs --jwt-secret".into());
        }
        let ws_urls = self
            .ws_url
            .unwrap_or_else(|| vec!["ws://127.0.0.1:8080/v1/device".into()]);
        if ws_urls.is_empty() {
            return bad("ws-url needs at least one URL".into());
        }
        for u in &ws_urls {
            if !(u.starts_with("ws://") || u.starts_with("wss://")) {
                return bad(format!("ws-url {u:?} is not a ws:// or wss:// URL"));
            }
        }
        let apps = if scenario == Scenario::Fanout {
            self.apps.unwrap_or(18_000)
        } else {
            0
        };
        let app_urls = self.app_url.unwrap_or_else(|| {
            ws_urls
                .iter()
                .map(|u| u.replace("/v1/device", "/v1/app"))
                .collect()
        });
        let qos = self.qos.unwrap_or(1);
        match scenario {
            Scenario::Telemetry | Scenario::Fanout if qos > 1 => {
                return bad("telemetry qos must be 0 or 1".into());
            }
            Scenario::Commands | Scenario::ReconnectStorm if !(1..=2).contains(&qos) => {
                return bad("command qos must be 1 or 2 (QoS 0 commands are not queued)".into());
            }
            _ => {}
        }
        let rate = self.rate.unwrap_or(match scenario {
            Scenario::Connect | Scenario::Telemetry => 0.0,
            Scenario::Fanout => 5.0,
            Scenario::Commands => 1_000.0,
            Scenario::ReconnectStorm => 500.0,
        });
        let connect_rate = self.connect_rate.unwrap_or(0.0);
        for (name, v) in [("rate", rate), ("connect-rate", connect_rate)] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!("{name} must be a number >= 0"));
            }
        }
        if scenario == Scenario::ReconnectStorm && self.trigger.is_none() {
            return bad(
                "reconnect-storm needs --trigger, the command that drains or kills a node".into(),
            );
        }
        if scenario == Scenario::Fanout && rate <= 0.0 {
            return bad("fanout needs a fixed rate per device (rate > 0)".into());
        }
        let min_workers = (devices + apps).div_ceil(MAX_DEVICES_PER_WORKER);
        let workers = self.workers.unwrap_or(min_workers).max(1);
        if workers < min_workers {
            return bad(format!(
                "{devices} devices and {apps} apps need at least {min_workers} workers ({MAX_DEVICES_PER_WORKER} sockets per process)"
            ));
        }
        if workers > devices {
            return bad(format!(
                "{workers} workers for {devices} devices: at most one worker per device"
            ));
        }
        let source_ips = match self.source_ips.as_deref() {
            None => Vec::new(),
            Some(s) => parse_ips(s).map_err(ParamError::Invalid)?,
        };
        let secs = |v: Option<f64>, default: f64, name: &str| -> Result<f64, ParamError> {
            let v = v.unwrap_or(default);
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(ParamError::Invalid(format!("{name} must be seconds >= 0")))
            }
        };
        Ok(Spec {
            scenario,
            ws_urls,
            admin_url,
            api_key: self.api_key,
            metrics_urls: self.metrics_url.unwrap_or_default(),
            redis_url: self.redis_url,
            auth,
            auth_mode: self.auth_mode.unwrap_or_default(),
            jwt_secret: self.jwt_secret,
            jwt_kid: self.jwt_kid,
            device_prefix: self
                .device_prefix
                .unwrap_or_else(|| format!("lt-{:06x}", rand::random::<u32>() & 0xff_ffff)),
            devices,
            apps,
            channels_per_app: self.channels_per_app.unwrap_or(1).clamp(1, devices),
            app_urls,
            connect_rate,
            connect_concurrency: self.connect_concurrency.unwrap_or(256).max(1),
            duration: secs(self.duration, 10.0, "duration")?,
            rate,
            qos,
            window: self.window.unwrap_or(32).max(1),
            payload_bytes: self.payload_bytes.unwrap_or(0),
            operators: self.operators.unwrap_or(64).max(1),
            wait_ms: self.wait_ms.unwrap_or(10_000),
            trigger: self.trigger,
            warmup: secs(self.warmup, 3.0, "warmup")?,
            settle_timeout: secs(self.settle_timeout, 30.0, "settle-timeout")?,
            workers,
            source_ips,
            tls_ca: self.tls_ca,
            setup_timeout: secs(self.setup_timeout, 120.0, "setup-timeout")?,
        })
    }
}

/// A resolved run: what the coordinator plans with and every worker receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Spec {
    pub scenario: Scenario,
    pub ws_urls: Vec<String>,
    pub admin_url: String,
    pub api_key: Option<String>,
    pub metrics_urls: Vec<String>,
    pub redis_url: Option<String>,
    pub auth: AuthKind,
    pub auth_mode: AuthMode,
    pub jwt_secret: Option<String>,
    pub jwt_kid: Option<String>,
    pub device_prefix: String,
    pub devices: usize,
    pub apps: usize,
    pub channels_per_app: usize,
    pub app_urls: Vec<String>,
    pub connect_rate: f64,
    pub connect_concurrency: usize,
    pub duration: f64,
    pub rate: f64,
    pub qos: u8,
    pub window: usize,
    pub payload_bytes: usize,
    pub operators: usize,
    pub wait_ms: u64,
    pub trigger: Option<String>,
    pub warmup: f64,
    pub settle_timeout: f64,
    pub workers: usize,
    pub source_ips: Vec<IpAddr>,
    pub setup_timeout: f64,
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Spec {
    /// The device IDs worker `w` owns: an even split, earlier workers taking the remainder.
    pub fn share(&self, w: usize) -> Range<usize> {
        let base = self.devices / self.workers;
        let extra = self.devices % self.workers;
        let start = w * base + w.min(extra);
        start..start + base + usize::from(w < extra)
    }

    /// The app subscribers worker `w` runs: an even split like [`Spec::share`].
    pub fn share_apps(&self, w: usize) -> Range<usize> {
        let base = self.apps / self.workers;
        let extra = self.apps % self.workers;
        let start = w * base + w.min(extra);
        start..start + base + usize::from(w < extra)
    }

    /// The endpoint app `j` connects to.
    pub fn app_url(&self, j: usize) -> &str {
        &self.app_urls[j % self.app_urls.len()]
    }

    /// The ID of device `i`.
    pub fn device_id(&self, i: usize) -> String {
        format!("{}-{i:07}", self.device_prefix)
    }

    /// The endpoint device `i` connects to.
    pub fn ws_url(&self, i: usize) -> &str {
        &self.ws_urls[i % self.ws_urls.len()]
    }

    /// The local address device `i` connects from (`None`: the kernel chooses).
    pub fn source_ip(&self, i: usize) -> Option<IpAddr> {
        (!self.source_ips.is_empty()).then(|| self.source_ips[i % self.source_ips.len()])
    }

    /// Whether this run sends commands through the admin API.
    pub fn sends_commands(&self) -> bool {
        matches!(self.scenario, Scenario::Commands | Scenario::ReconnectStorm)
    }

    /// Operators (admin API callers) worker `w` runs: all of them in worker 0, so one
    /// pacer sets the command rate.
    pub fn operators_in(&self, w: usize) -> usize {
        if self.sends_commands() && w == 0 {
            self.operators
        } else {
            0
        }
    }
}

/// Parses `a.b.c.d-a.b.c.e` ranges (last octet only) and comma lists of addresses.
///
/// # Errors
/// A message naming the part that is not an address or range.
pub fn parse_ips(s: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((lo, hi)) = part.split_once('-') {
            let lo: Ipv4Addr = lo
                .trim()
                .parse()
                .map_err(|_| format!("bad address in {part:?}"))?;
            let hi: Ipv4Addr = hi
                .trim()
                .parse()
                .map_err(|_| format!("bad address in {part:?}"))?;
            let (l, h) = (lo.octets(), hi.octets());
            if l[..3] != h[..3] || l[3] > h[3] {
                return Err(format!(
                    "range {part:?} must vary only the last octet, low to high"
                ));
            }
            out.extend((l[3]..=h[3]).map(|o| IpAddr::V4(Ipv4Addr::new(l[0], l[1], l[2], o))));
        } else {
            out.push(
                part.parse()
                    .map_err(|_| format!("{part:?} is not an address"))?,
            );
        }
    }
    if out.is_empty() {
        return Err("source-ips names no address".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(devices: usize) -> Params {
        Params {
            devices: Some(devices),
            api_key: Some("k".into()),
            ..Params::default()
        }
    }

    #[test]
    fn shares_cover_every_device_once() {
        for (devices, workers) in [(10, 3), (19_000, 2), (7, 7), (100_001, 6)] {
            let spec = Params {
                workers: Some(workers),
                ..params(devices)
            }
            .resolve(Scenario::Connect)
            .unwrap();
            let mut next = 0;
            for w in 0..workers {
                let r = spec.share(w);
                assert_eq!(r.start, next, "contiguous");
                assert!(r.len().abs_diff(devices / workers) <= 1, "even");
                next = r.end;
            }
            assert_eq!(next, devices);
        }
    }

    #[test]
    fn workers_follow_the_file_limit() {
        let spec = params(50_000).resolve(Scenario::Connect).unwrap();
        assert_eq!(spec.workers, 3);
        assert!((0..3).all(|w| spec.share(w).len() <= MAX_DEVICES_PER_WORKER));
        let err = Params {
            workers: Some(2),
            ..params(50_000)
        }
        .resolve(Scenario::Connect)
        .unwrap_err();
        assert!(err.to_string().contains("at least 3 workers"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file: Params = toml::from_str(
            "devices = 500\nrate = 2.5\nws-url = [\"ws://a/v1/device\"]\napi-key = \"k\"",
        )
        .unwrap();
        let cli = Params {
            rate: Some(7.0),
            ..Params::default()
        };
        let spec = file.overlay(cli).resolve(Scenario::Telemetry).unwrap();
        assert_eq!(spec.devices, 500);
        assert_eq!(spec.rate, 7.0);
        assert_eq!(spec.ws_urls, vec!["ws://a/v1/device".to_owned()]);
        assert_eq!(spec.window, 32);
        assert_eq!(spec.auth, AuthKind::Provision);
    }

    #[test]
    fn the_shipped_scenario_files_resolve() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../loadtest/scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let scenario = Scenario::from_str(&name, false).unwrap();
            let file = Params::from_file(&path).unwrap();
            let spec = file
                .overlay(Params {
                    api_key: Some("k".into()),
                    trigger: Some("true".into()),
                    ..Params::default()
                })
                .resolve(scenario)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(spec.devices > 0);
            seen += 1;
        }
        assert_eq!(seen, 5, "one file per scenario");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<Params>("devicez = 3").is_err());
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases: [(Params, Scenario, &str); 6] = [
            (params(0), Scenario::Connect, "devices"),
            (
                Params {
                    api_key: None,
                    ..params(5)
                },
                Scenario::Connect,
                "--api-key",
            ),
            (
                Params {
                    auth: Some(AuthKind::Jwt),
                    ..params(5)
                },
                Scenario::Connect,
                "--jwt-secret",
            ),
            (
                Params {
                    qos: Some(2),
                    ..params(5)
                },
                Scenario::Telemetry,
                "qos",
            ),
            (params(5), Scenario::ReconnectStorm, "--trigger"),
            (
                Params {
                    ws_url: Some(vec!["http://x".into()]),
                    ..params(5)
                },
                Scenario::Connect,
                "ws-url",
            ),
        ];
        for (p, scenario, word) in cases {
            let err = p.resolve(scenario).unwrap_err().to_string();
            assert!(err.contains(word), "{err:?} should mention {word}");
        }
    }

    #[test]
    fn source_ips_parse_ranges_and_lists() {
        let ips = parse_ips("127.0.0.2-127.0.0.4, ::1").unwrap();
        let want: Vec<IpAddr> = vec![
            "127.0.0.2".parse().unwrap(),
            "127.0.0.3".parse().unwrap(),
            "127.0.0.4".parse().unwrap(),
            "::1".parse().unwrap(),
        ];
        assert_eq!(ips, want);
        assert!(parse_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_ips("127.0.0.1-127.0.1.2").is_err());
        assert!(parse_ips("nonsense").is_err());
        let spec = Params {
            source_ips: Some("127.0.0.2-127.0.0.3".into()),
            ..params(4)
        }
        .resolve(Scenario::Connect)
        .unwrap();
        assert_eq!(spec.source_ip(0), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(spec.source_ip(3), Some("127.0.0.3".parse().unwrap()));
    }
}
