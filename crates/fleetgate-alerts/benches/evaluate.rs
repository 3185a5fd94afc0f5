//! CPU cost of alert-rule evaluation per accepted status, as a node pays it at ingest:
//! `DeviceState::evaluate` over the rules that apply to the device (the gateway filters the
//! fleet's rules by target once per rule-set change, so only applicable rules are looped
//! over per status), plus the state's JSON encoding, paid only when a state changes.
//!
//! ```text
//! cargo bench -p fleetgate-alerts --bench evaluate -- [--samples 1000000] [--runs 5] [--out PATH]
//! ```
//! Prints a Markdown table of medians and writes the runs as JSON (`--out`).
#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::Instant;

use fleetgate_alerts::{DeviceState, Rule, Sample};
use serde_json::{Value, json};

/// An IIoT status of five tags, like the example device's and the load test's.
fn status(i: u64) -> Value {
    let wobble = (i % 7) as f64 * 0.1;
    json!({"values": [
        {"tag": "temperature", "value": 21.0 + wobble, "unit": "C"},
        {"tag": "humidity", "value": 40.0 + wobble, "unit": "%"},
        {"tag": "pressure", "value": 101.3, "unit": "kPa"},
        {"tag": "vibration", "value": 0.02 + wobble / 100.0, "unit": "g"},
        {"tag": "state", "value": 1}
    ], "quality": "good"})
}

/// `n` rules on group `farm-a`, cycling through the kinds and tags; none fires on
/// [`status`] values (the steady state: most statuses raise nothing).
fn rules(n: usize) -> Vec<Rule> {
    let tags = ["temperature", "humidity", "pressure", "vibration"];
    (0..n)
        .map(|i| {
            let tag = tags[i % tags.len()];
            let condition = match i % 3 {
                0 => json!({"threshold": {"tag": tag, "op": ">", "value": 1000, "clear": 900}}),
                1 => json!({"band": {"tag": tag, "low": -1000, "high": 1000, "margin": 1}}),
                _ => json!({"rate": {"tag": tag, "perSecond": 1000}}),
            };
            serde_json::from_value(json!({"id": format!("r{i}"), "name": "bench",
                "target": {"group": "farm-a"}, "condition": condition, "forMs": 30000}))
            .expect("a valid rule")
        })
        .collect()
}

struct Case {
    name: &'static str,
    rules: usize,
    /// Values crossing the first rule's threshold every other status (hysteresis at work).
    hovering: bool,
}

fn ns_per_status(case: &Case, samples: u64) -> f64 {
    let mut rules = rules(case.rules);
    if case.hovering {
        rules[0] = serde_json::from_value(json!({"id": "hover", "target": {"group": "farm-a"},
            "condition": {"threshold": {"tag": "temperature", "op": ">", "value": 21.3, "clear": 20}}}))
        .expect("a valid rule");
    }
    let groups = ["farm-a".to_owned()];
    let payloads: Vec<Value> = (0..64).map(status).collect();
    let mut state = DeviceState::default();
    let mut out = Vec::new();
    let start = Instant::now();
    for i in 0..samples {
        let payload = &payloads[(i % 64) as usize];
        let sample = Sample::new("sensor-001", 1_000 * i as i64, payload);
        black_box(state.evaluate(&rules, &groups, &sample, &mut out));
        out.clear();
    }
    start.elapsed().as_nanos() as f64 / samples as f64
}

/// Encoding a device's states (what storing them costs in CPU), for `n` rules with state.
fn ns_per_encode(n: usize, iterations: u64) -> (f64, usize) {
    let rules = rules(n);
    let groups = ["farm-a".to_owned()];
    let mut state = DeviceState::default();
    let mut out = Vec::new();
    // Two samples give every rate rule its last value and start nothing else.
    for i in 0..2 {
        let p = status(i);
        state.evaluate(
            &rules,
            &groups,
            &Sample::new("d", 1000 * i as i64, &p),
            &mut out,
        );
    }
    let len = serde_json::to_string(&state).expect("encodes").len();
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(serde_json::to_string(black_box(&state)).expect("encodes"));
    }
    (start.elapsed().as_nanos() as f64 / iterations as f64, len)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut samples, mut runs, mut out) = (1_000_000u64, 5usize, None::<String>);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--samples" => {
                samples = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--samples N")
            }
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--out" => out = args.next(),
            // `cargo bench` passes `--bench`.
            _ => {}
        }
    }
    let cases = [
        Case {
            name: "no rule applies",
            rules: 0,
            hovering: false,
        },
        Case {
            name: "1 rule",
            rules: 1,
            hovering: false,
        },
        Case {
            name: "10 rules",
            rules: 10,
            hovering: false,
        },
        Case {
            name: "100 rules",
            rules: 100,
            hovering: false,
        },
        Case {
            name: "10 rules, one hovering at its threshold",
            rules: 10,
            hovering: true,
        },
    ];
    println!("| per accepted status | ns (median of {runs}) | runs |\n|---|---|---|");
    let mut results = Vec::new();
    for case in &cases {
        let all: Vec<f64> = (0..runs).map(|_| ns_per_status(case, samples)).collect();
        let m = median(all.clone());
        println!("| {} | {m:.0} | {all:.0?} |", case.name);
        results
            .push(json!({"case": case.name, "rules": case.rules, "median_ns": m, "runs_ns": all}));
    }
    for n in [1usize, 10] {
        let all: Vec<(f64, usize)> = (0..runs).map(|_| ns_per_encode(n, samples / 10)).collect();
        let m = median(all.iter().map(|r| r.0).collect());
        let bytes = all[0].1;
        println!(
            "| encoding the states of {n} rules ({bytes} B), when they change | {m:.0} | {:.0?} |",
            all.iter().map(|r| r.0).collect::<Vec<_>>()
        );
        results.push(json!({"case": format!("encode {n} rules"), "bytes": bytes, "median_ns": m}));
    }
    if let Some(path) = out {
        let doc = json!({"samples": samples, "runs": runs, "results": results});
        std::fs::write(&path, serde_json::to_string_pretty(&doc).expect("json"))
            .expect("write --out");
    }
}
