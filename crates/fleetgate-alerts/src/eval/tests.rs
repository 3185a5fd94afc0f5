//! Scripted sequences with exact expected transitions.

use serde_json::json;

use super::*;

/// One scripted input to a (device, rule) pair.
#[derive(Debug, Clone, Copy)]
enum In {
    /// A sample of the rule's tag (named `x`) at a time.
    S(i64, f64),
    /// A presence event.
    Off(i64),
    On(i64),
    Tick(i64),
}
use In::*;

/// A transition reduced to what the scripts check: kind, time, value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Out {
    F(i64, f64),
    R(i64, f64),
}

fn rule(condition: Value, for_ms: i64) -> Rule {
    let r: Rule = serde_json::from_value(json!({"id":"r1","name":"Rule","target":{"device":"d1"},
        "condition":condition,"forMs":for_ms,"severity":"critical"}))
    .expect("rule parses");
    r.validate().expect("rule is valid");
    r
}

fn threshold(op: &str, value: f64, clear: Option<f64>) -> Rule {
    let mut c = json!({"tag":"x","op":op,"value":value});
    if let Some(clear) = clear {
        c["clear"] = json!(clear);
    }
    rule(json!({ "threshold": c }), 0)
}

fn step_one(rule: &Rule, state: &mut RuleState, input: In) -> Option<Transition> {
    match input {
        S(at, v) => {
            let p = json!({ "x": v });
            evaluate(rule, state, &Sample::new("d1", at, &p))
        }
        Off(at) => device_offline(rule, state, "d1", at),
        On(at) => device_online(rule, state, "d1", at),
        Tick(at) => tick(rule, state, "d1", at),
    }
}

fn reduce(t: &Transition) -> Out {
    match *t {
        Transition::Fired { value, at_ms, .. } => Out::F(at_ms, value),
        Transition::Resolved { value, at_ms, .. } => Out::R(at_ms, value),
    }
}

/// Runs a script from a fresh state.
fn run(rule: &Rule, inputs: &[In]) -> Vec<Out> {
    let mut state = RuleState::default();
    inputs
        .iter()
        .filter_map(|i| step_one(rule, &mut state, *i))
        .map(|t| reduce(&t))
        .collect()
}

/// Samples at one per second starting at 0.
fn per_second(values: &[f64]) -> Vec<In> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| S(i as i64 * 1000, *v))
        .collect()
}

#[test]
fn hysteresis_fires_twice_and_resolves_once() {
    let r = threshold(">", 80.0, Some(78.0));
    let out = run(&r, &per_second(&[79.0, 81.0, 80.5, 81.0, 77.0, 81.0]));
    assert_eq!(
        out,
        [Out::F(1000, 81.0), Out::R(4000, 77.0), Out::F(5000, 81.0)]
    );
    // Hovering inside the hysteresis zone never resolves.
    let out = run(&r, &per_second(&[81.0, 79.0, 78.5, 80.9, 81.5, 79.0, 78.0]));
    assert_eq!(out, [Out::F(0, 81.0), Out::R(6000, 78.0)]);
}

#[test]
fn without_clear_each_crossing_fires_once() {
    let r = threshold(">", 80.0, None);
    let out = run(
        &r,
        &per_second(&[79.0, 81.0, 82.0, 79.0, 81.0, 80.0, 80.5, 80.0, 80.0]),
    );
    assert_eq!(
        out,
        [
            Out::F(1000, 81.0),
            Out::R(3000, 79.0),
            Out::F(4000, 81.0),
            // Exactly at the threshold is not above it: resolves, and does not fire.
            Out::R(5000, 80.0),
            Out::F(6000, 80.5),
            Out::R(7000, 80.0),
        ]
    );
}

#[test]
fn below_and_equal_operators() {
    let r = threshold("<", 20.0, Some(25.0));
    let out = run(&r, &per_second(&[30.0, 19.0, 22.0, 24.9, 25.0, 18.0]));
    assert_eq!(
        out,
        [Out::F(1000, 19.0), Out::R(4000, 25.0), Out::F(5000, 18.0)]
    );

    let r = threshold("==", 3.0, None);
    let out = run(&r, &per_second(&[1.0, 3.0, 3.0, 4.0, 3.0]));
    assert_eq!(
        out,
        [Out::F(1000, 3.0), Out::R(3000, 4.0), Out::F(4000, 3.0)]
    );
}

#[test]
fn for_duration_needs_continuous_truth_on_sample_times() {
    let r = rule(json!({"threshold":{"tag":"x","op":">","value":80}}), 30_000);
    let script = [
        S(0, 81.0),
        S(10_000, 81.0),
        S(20_000, 81.0),
        S(25_000, 79.0), // resets the clock
        S(30_000, 81.0),
        S(59_999, 81.0),
        S(60_000, 81.0),
        S(70_000, 85.0),
    ];
    assert_eq!(run(&r, &script), [Out::F(60_000, 81.0)]);
    // Resolution is immediate; a new episode needs the full duration again.
    let script = [
        S(0, 81.0),
        S(30_000, 82.0),
        S(31_000, 80.0),
        S(32_000, 81.0),
        S(62_000, 81.0),
    ];
    assert_eq!(
        run(&r, &script),
        [
            Out::F(30_000, 82.0),
            Out::R(31_000, 80.0),
            Out::F(62_000, 81.0)
        ]
    );
}

#[test]
fn for_duration_completes_on_tick() {
    let r = rule(json!({"threshold":{"tag":"x","op":">","value":80}}), 30_000);
    let mut state = RuleState::default();
    assert_eq!(step_one(&r, &mut state, S(5_000, 81.0)), None);
    assert_eq!(state.deadline(&r), Some(35_000));
    let script = [Tick(34_999), Tick(35_000), Tick(40_000), S(41_000, 79.0)];
    let out: Vec<_> = script
        .iter()
        .filter_map(|i| step_one(&r, &mut state, *i))
        .map(|t| reduce(&t))
        .collect();
    assert_eq!(out, [Out::F(35_000, 81.0), Out::R(41_000, 79.0)]);
    // A false sample before the deadline cancels it.
    assert_eq!(
        run(
            &r,
            &[S(0, 81.0), S(10_000, 70.0), Tick(30_000), Tick(99_000)]
        ),
        []
    );
    // Without forMs there is nothing for a tick to do.
    let plain = threshold(">", 80.0, None);
    assert_eq!(run(&plain, &[Tick(0), S(0, 70.0), Tick(1_000_000)]), []);
}

#[test]
fn band_with_margin() {
    let r = rule(json!({"band":{"tag":"x","low":10,"high":30,"margin":1}}), 0);
    let out = run(
        &r,
        &per_second(&[20.0, 10.0, 30.0, 9.5, 10.5, 11.0, 31.0, 29.5, 29.0, 5.0]),
    );
    assert_eq!(
        out,
        [
            Out::F(3000, 9.5),
            Out::R(5000, 11.0),
            Out::F(6000, 31.0),
            Out::R(8000, 29.0),
            Out::F(9000, 5.0),
        ]
    );
    // Without a margin, back inside the band (bounds included) resolves.
    let r = rule(json!({"band":{"tag":"x","low":10,"high":30}}), 0);
    let out = run(&r, &per_second(&[30.0, 30.1, 30.0, 9.9, 9.8, 10.0]));
    assert_eq!(
        out,
        [
            Out::F(1000, 30.1),
            Out::R(2000, 30.0),
            Out::F(3000, 9.9),
            Out::R(5000, 10.0)
        ]
    );
}

#[test]
fn rate_of_change() {
    let r = rule(json!({"rate":{"tag":"x","perSecond":5}}), 0);
    let script = [
        S(0, 10.0),     // baseline only
        S(1_000, 14.0), // 4/s
        S(2_000, 24.0), // 10/s: fires
        S(3_000, 30.0), // 6/s: still open
        S(4_000, 27.0), // 3/s (falling counts too): resolves
        S(6_000, 37.0), // 5/s over 2 s: not above the limit
        S(6_500, 34.0), // 6/s
    ];
    assert_eq!(
        run(&r, &script),
        [Out::F(2_000, 10.0), Out::R(4_000, 3.0), Out::F(6_500, 6.0)]
    );

    // With clear, the rate must drop to it before resolving.
    let r = rule(json!({"rate":{"tag":"x","perSecond":5,"clear":2}}), 0);
    let script = [S(0, 0.0), S(1_000, 10.0), S(2_000, 13.0), S(3_000, 15.0)];
    assert_eq!(run(&r, &script), [Out::F(1_000, 10.0), Out::R(3_000, 2.0)]);

    // A same-time sample replaces the baseline; an older one is ignored.
    let r = rule(json!({"rate":{"tag":"x","perSecond":5}}), 0);
    let script = [
        S(1_000, 0.0),
        S(1_000, 100.0), // the new baseline
        S(500, 0.0),     // older: ignored
        S(2_000, 101.0), // 1/s from 100 (it would be 101/s from 0)
        S(3_000, 0.0),   // 101/s
    ];
    assert_eq!(run(&r, &script), [Out::F(3_000, 101.0)]);
    // Rates never fire on a tick: no sample, no measurement.
    let r = rule(json!({"rate":{"tag":"x","perSecond":5}}), 10_000);
    let script = [S(0, 0.0), S(1_000, 100.0), Tick(60_000), S(11_000, 200.0)];
    assert_eq!(run(&r, &script), [Out::F(11_000, 10.0)]);
}

#[test]
fn offline_via_events_and_tick() {
    let r = rule(json!({"offline":{"seconds":60}}), 0);
    let script = [
        Tick(0),     // never offline: nothing
        Off(10_000), // clock starts
        Tick(69_999),
        Off(5_000),    // older than the last event: ignored, the clock keeps 10 s
        Tick(70_000),  // 60 s: fires
        Tick(80_000),  // already open
        Off(85_000),   // still offline: no new alert
        On(100_000),   // resolves, value = seconds offline
        Tick(150_000), // online: nothing to fire
        Off(200_000),
        On(250_000), // back before 60 s: nothing
        Off(300_000),
        Off(360_000), // a repeated event past the deadline fires too
    ];
    assert_eq!(
        run(&r, &script),
        [
            Out::F(70_000, 60.0),
            Out::R(100_000, 90.0),
            Out::F(360_000, 60.0)
        ]
    );
    // seconds = 0 fires on the event itself.
    let r = rule(json!({"offline":{"seconds":0}}), 0);
    assert_eq!(
        run(&r, &[Off(5), On(2_005)]),
        [Out::F(5, 0.0), Out::R(2_005, 2.0)]
    );
}

#[test]
fn inputs_that_do_not_concern_a_rule_are_ignored() {
    let th = threshold(">", 80.0, None);
    let mut state = RuleState::default();
    assert_eq!(step_one(&th, &mut state, Off(0)), None);
    assert_eq!(step_one(&th, &mut state, On(0)), None);
    assert_eq!(state, RuleState::default());
    let other = json!({"y": 100, "x": "hot"});
    assert_eq!(
        evaluate(&th, &mut state, &Sample::new("d1", 0, &other)),
        None
    );
    assert_eq!(state, RuleState::default());
    // An older sample after a newer one does not rewind the state.
    assert_eq!(step_one(&th, &mut state, S(10_000, 70.0)), None);
    assert_eq!(step_one(&th, &mut state, S(9_000, 90.0)), None);
    assert!(!state.is_open());

    let off = rule(json!({"offline":{"seconds":1}}), 0);
    let mut state = RuleState::default();
    assert_eq!(step_one(&off, &mut state, S(0, 1.0)), None);
    assert_eq!(state, RuleState::default());
}

#[test]
fn iiot_payloads_and_transition_contents() {
    let r = rule(
        json!({"threshold":{"tag":"temperature","op":">","value":80}}),
        0,
    );
    let mut state = RuleState::default();
    let p = json!({"values":[{"tag":"temperature","value":81.2,"unit":"C"}],"quality":"good"});
    let t = evaluate(
        &r,
        &mut state,
        &Sample::new("sensor-001", 1_700_000_000_000, &p),
    );
    assert_eq!(
        t,
        Some(Transition::Fired {
            rule_id: "r1".into(),
            device: "sensor-001".into(),
            value: 81.2,
            at_ms: 1_700_000_000_000,
            severity: crate::Severity::Critical,
            message: "Rule on sensor-001: temperature 81.2 > 80".into(),
        })
    );
    assert_eq!(t.unwrap().alert_id(), "r1:sensor-001:1700000000000");
    assert_eq!(state.fired_at_ms(), Some(1_700_000_000_000));
    let p = json!({"values":[{"tag":"temperature","value":70}]});
    let t = evaluate(
        &r,
        &mut state,
        &Sample::new("sensor-001", 1_700_000_001_000, &p),
    );
    assert!(matches!(
        t,
        Some(Transition::Resolved {
            fired_at_ms: 1_700_000_000_000,
            ..
        })
    ));
}

/// Runs a script, moving the state through JSON (another node) after `split` inputs.
fn run_with_move(rule: &Rule, inputs: &[In], split: usize) -> Vec<Out> {
    let mut state = RuleState::default();
    let mut out = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        if i == split {
            let stored = serde_json::to_string(&state).unwrap();
            assert!(stored.len() <= 64, "{stored}");
            state = serde_json::from_str(&stored).unwrap();
        }
        out.extend(step_one(rule, &mut state, *input).map(|t| reduce(&t)));
    }
    out
}

#[test]
fn state_survives_a_node_move_at_any_point() {
    let t0 = 1_700_000_000_000;
    let cases = [
        (
            rule(
                json!({"threshold":{"tag":"x","op":">","value":80,"clear":78}}),
                30_000,
            ),
            vec![
                S(t0, 81.0),
                S(t0 + 10_000, 81.5),
                S(t0 + 20_000, 79.0),
                S(t0 + 25_000, 82.0),
                Tick(t0 + 55_000),
                S(t0 + 56_000, 79.0),
                S(t0 + 57_000, 77.5),
                S(t0 + 58_000, 90.0),
                S(t0 + 88_000, 90.0),
            ],
        ),
        (
            rule(json!({"band":{"tag":"x","low":10,"high":30,"margin":1}}), 0),
            per_second(&[20.0, 9.0, 10.5, 12.0, 35.0, 29.5, 20.0]),
        ),
        (
            rule(json!({"rate":{"tag":"x","perSecond":5,"clear":1}}), 0),
            per_second(&[0.0, 3.0, 10.0, 13.0, 13.5, 30.0]),
        ),
        (
            rule(json!({"offline":{"seconds":60}}), 0),
            vec![
                Off(t0),
                Tick(t0 + 30_000),
                Tick(t0 + 61_000),
                On(t0 + 70_000),
                Off(t0 + 80_000),
            ],
        ),
    ];
    for (rule, script) in cases {
        let expected = run(&rule, &script);
        assert!(!expected.is_empty(), "the script exercises the rule");
        for split in 0..=script.len() {
            assert_eq!(
                run_with_move(&rule, &script, split),
                expected,
                "split at {split}"
            );
        }
    }
}

#[test]
fn state_is_small() {
    assert!(std::mem::size_of::<RuleState>() <= 64);
    assert_eq!(serde_json::to_string(&RuleState::default()).unwrap(), "{}");
    // Unknown keys from a newer version are tolerated.
    let s: RuleState = serde_json::from_str(r#"{"f":5,"z":1}"#).unwrap();
    assert_eq!(s.fired_at_ms(), Some(5));
}
