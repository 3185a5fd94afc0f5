//! Rule parsing, validation and targeting.

use serde_json::json;

use super::*;

fn parse(v: serde_json::Value) -> Rule {
    serde_json::from_value(v).expect("rule parses")
}

fn base() -> serde_json::Value {
    json!({"id":"hot","name":"Too hot","target":{"group":"farm-a"},
           "condition":{"threshold":{"tag":"temperature","op":">","value":80,"clear":78}},
           "forMs":30000,"severity":"warning"})
}

fn with(path: &str, v: serde_json::Value) -> Result<(), RuleError> {
    let mut r = base();
    *r.pointer_mut(path).expect("path exists") = v;
    parse(r).validate()
}

fn with_condition(c: serde_json::Value) -> Result<(), RuleError> {
    with("/condition", c)
}

#[test]
fn example_rules_parse_validate_and_round_trip() {
    let examples = [
        base(),
        json!({"id":"cold.1","target":{"device":"sensor-001"},
               "condition":{"threshold":{"tag":"t","op":"<","value":-5}},"severity":"critical"}),
        json!({"id":"band","target":{"group":"g"},
               "condition":{"band":{"tag":"h","low":10,"high":30,"margin":1}}}),
        json!({"id":"jump","target":{"group":"g"},
               "condition":{"rate":{"tag":"p","perSecond":5,"clear":4}}}),
        json!({"id":"gone","target":{"group":"g"},"condition":{"offline":{"seconds":60}},
               "severity":"info"}),
        json!({"id":"code","target":{"group":"g"},
               "condition":{"threshold":{"tag":"state","op":"==","value":3}}}),
    ];
    for e in examples {
        let rule = parse(e.clone());
        assert_eq!(rule.validate(), Ok(()), "{e}");
        let again: Rule = serde_json::from_value(serde_json::to_value(&rule).unwrap()).unwrap();
        assert_eq!(again, rule);
    }
    let r = parse(base());
    assert_eq!(r.severity, Severity::Warning);
    assert_eq!(r.for_ms, 30_000);
    assert!(matches!(&r.condition, Condition::Threshold(t)
        if t.op == Op::Gt && t.value == 80.0 && t.clear == Some(78.0)));
    // Defaults: no name, no forMs, warning.
    let r = parse(json!({"id":"x","target":{"device":"d"},"condition":{"offline":{"seconds":1}}}));
    assert_eq!(
        (r.display_name(), r.for_ms, r.severity),
        ("x", 0, Severity::Warning)
    );
}

#[test]
fn serde_rejects_unknown_fields_operators_and_severities() {
    let bad = [
        json!({"id":"x","target":{"device":"d"},"condition":{"offline":{"seconds":1}},"extra":1}),
        json!({"id":"x","target":{"device":"d"},"condition":{"offline":{"seconds":1,"x":1}}}),
        json!({"id":"x","target":{"node":"d"},"condition":{"offline":{"seconds":1}}}),
        json!({"id":"x","target":{"device":"d"},"condition":{"flood":{}}}),
        json!({"id":"x","target":{"device":"d"},
               "condition":{"threshold":{"tag":"t","op":">=","value":1}}}),
        json!({"id":"x","target":{"device":"d"},"condition":{"offline":{"seconds":1}},
               "severity":"fatal"}),
    ];
    for b in bad {
        assert!(serde_json::from_value::<Rule>(b.clone()).is_err(), "{b}");
    }
}

#[test]
fn validation_errors() {
    use RuleError::*;
    let long_id = "a".repeat(65);
    assert_eq!(with("/id", json!("")), Err(BadId));
    assert_eq!(with("/id", json!(long_id)), Err(BadId));
    assert_eq!(with("/id", json!("has space")), Err(BadId));
    assert_eq!(with("/id", json!("a:b")), Err(BadId));
    assert_eq!(with("/id", json!("A-z_0.9")), Ok(()));
    assert_eq!(with("/name", json!("x".repeat(201))), Err(BadName));
    assert_eq!(with("/name", json!("bad\nname")), Err(BadName));
    assert_eq!(with("/target", json!({"group":""})), Err(BadTarget));
    assert_eq!(with("/target", json!({"device":"a/b"})), Err(BadTarget));
    assert_eq!(with("/forMs", json!(-1)), Err(Negative("forMs")));
    assert_eq!(
        with("/forMs", json!(MAX_DURATION_MS + 1)),
        Err(TooLong("forMs"))
    );

    let th = |tag: &str, op: &str, value: f64, clear: f64| {
        with_condition(json!({"threshold":{"tag":tag,"op":op,"value":value,"clear":clear}}))
    };
    assert_eq!(th("", ">", 80.0, 78.0), Err(BadTag));
    assert_eq!(th(&"t".repeat(129), ">", 80.0, 78.0), Err(BadTag));
    assert_eq!(th("t", ">", 80.0, 81.0), Err(ClearWrongSide));
    assert_eq!(th("t", "<", 10.0, 9.0), Err(ClearWrongSide));
    assert_eq!(th("t", "<", 10.0, 10.0), Ok(()));
    assert_eq!(th("t", "==", 3.0, 3.0), Err(ClearWithEq));

    let band = |low: f64, high: f64, margin: f64| {
        with_condition(json!({"band":{"tag":"h","low":low,"high":high,"margin":margin}}))
    };
    assert_eq!(band(30.0, 10.0, 0.0), Err(BandOrder));
    assert_eq!(band(10.0, 10.0, 0.0), Err(BandOrder));
    assert_eq!(band(10.0, 30.0, -1.0), Err(BadMargin));
    assert_eq!(band(10.0, 30.0, 10.5), Err(BadMargin));
    assert_eq!(band(10.0, 30.0, 10.0), Ok(()));

    let rate = |per: f64, clear: f64| {
        with_condition(json!({"rate":{"tag":"p","perSecond":per,"clear":clear}}))
    };
    assert_eq!(rate(0.0, 0.0), Err(BadRate));
    assert_eq!(rate(-1.0, 0.0), Err(BadRate));
    assert_eq!(rate(5.0, 6.0), Err(BadRateClear));
    assert_eq!(rate(5.0, -1.0), Err(BadRateClear));

    assert_eq!(
        with_condition(json!({"offline":{"seconds":60}})),
        Err(ForWithOffline)
    );
    let offline = |s: i64| {
        parse(json!({"id":"o","target":{"device":"d"},"condition":{"offline":{"seconds":s}}}))
            .validate()
    };
    assert_eq!(offline(-5), Err(Negative("seconds")));
    assert_eq!(offline(31 * 24 * 3600), Err(TooLong("seconds")));
    assert_eq!(offline(0), Ok(()));

    // Rules built in code can carry NaN; JSON cannot.
    let mut r = parse(base());
    if let Condition::Threshold(t) = &mut r.condition {
        t.value = f64::NAN;
    }
    assert_eq!(r.validate(), Err(NotFinite("value")));
    assert!(ClearWrongSide.to_string().len() < 100);
}

#[test]
fn targeting() {
    let group = parse(base());
    assert!(applies_to(&group, "sensor-001", &["farm-b", "farm-a"]));
    assert!(!applies_to(&group, "sensor-001", &["farm-b"]));
    assert!(!applies_to::<String>(&group, "farm-a", &[]));
    let mut one = group.clone();
    one.target = Target::Device("sensor-001".into());
    assert!(applies_to(&one, "sensor-001", &[String::from("x")]));
    assert!(!applies_to(&one, "sensor-002", &["farm-a"]));
}
