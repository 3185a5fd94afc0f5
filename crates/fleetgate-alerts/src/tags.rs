//! Numeric tags of a status payload, borrowed from the payload without copying.
//!
//! Two shapes exist: a plain object (`{"temperature": 81.2}`) and IIoT values
//! (`{"values":[{"tag":"temperature","value":81.2,"unit":"C"}],"quality":"good"}`). Like the
//! gateway's shadow merge, an object whose `values` is an array is read as IIoT values only.

use serde_json::{Map, Value, map};

/// The IIoT `values` array of a payload, if it has that shape.
fn iiot_values(obj: &Map<String, Value>) -> Option<&[Value]> {
    obj.get("values")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
}

/// A JSON number as a finite `f64`; everything else (strings, bools, nested objects) is not
/// a tag value.
fn number(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

/// One IIoT entry as `(tag, value)`, if it has a string tag and a numeric value.
fn iiot_entry(v: &Value) -> Option<(&str, f64)> {
    let o = v.as_object()?;
    Some((o.get("tag")?.as_str()?, number(o.get("value")?)?))
}

/// The numeric tags of a status payload in either shape; non-numbers are skipped.
///
/// Borrows from `payload` and allocates nothing.
pub fn tags(payload: &Value) -> Tags<'_> {
    let inner = match payload.as_object() {
        Some(obj) => match iiot_values(obj) {
            Some(values) => Inner::Values(values.iter()),
            None => Inner::Plain(obj.iter()),
        },
        None => Inner::Empty,
    };
    Tags(inner)
}

/// The value of one tag in a status payload in either shape, if it is a finite number.
///
/// For IIoT values listing a tag twice the last entry wins, as in the shadow merge.
/// Allocates nothing: a map lookup for plain objects, a scan of `values` for IIoT.
pub fn tag_value(payload: &Value, tag: &str) -> Option<f64> {
    let obj = payload.as_object()?;
    match iiot_values(obj) {
        Some(values) => values
            .iter()
            .rev()
            .filter_map(iiot_entry)
            .find_map(|(t, v)| (t == tag).then_some(v)),
        None => obj.get(tag).and_then(number),
    }
}

/// Iterator over `(tag, value)` pairs of a payload; see [`tags`].
#[derive(Debug, Clone)]
pub struct Tags<'a>(Inner<'a>);

#[derive(Debug, Clone)]
enum Inner<'a> {
    Plain(map::Iter<'a>),
    Values(std::slice::Iter<'a, Value>),
    Empty,
}

impl<'a> Iterator for Tags<'a> {
    type Item = (&'a str, f64);

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            Inner::Plain(it) => it.find_map(|(k, v)| Some((k.as_str(), number(v)?))),
            Inner::Values(it) => it.find_map(iiot_entry),
            Inner::Empty => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn collect(v: &Value) -> Vec<(&str, f64)> {
        let mut t: Vec<_> = tags(v).collect();
        t.sort_by(|a, b| a.0.cmp(b.0));
        t
    }

    #[test]
    fn plain_object() {
        let p = json!({"temperature": 81.2, "battery": 40, "status": "ok", "on": true,
                       "gps": {"lat": 1.0}, "n": null, "neg": -3});
        assert_eq!(
            collect(&p),
            [("battery", 40.0), ("neg", -3.0), ("temperature", 81.2)]
        );
        assert_eq!(tag_value(&p, "temperature"), Some(81.2));
        assert_eq!(tag_value(&p, "battery"), Some(40.0));
        assert_eq!(tag_value(&p, "status"), None);
        assert_eq!(tag_value(&p, "gps"), None);
        assert_eq!(tag_value(&p, "missing"), None);
    }

    #[test]
    fn iiot_values() {
        let p = json!({"values":[
            {"tag":"temperature","value":81.2,"unit":"C"},
            {"tag":"pressure","value":101},
            {"tag":"label","value":"x"},
            {"value":5},
            {"tag":7,"value":5},
            "junk",
            {"tag":"pressure","value":102.5}
        ],"quality":"good"});
        assert_eq!(
            tags(&p).collect::<Vec<_>>(),
            [
                ("temperature", 81.2),
                ("pressure", 101.0),
                ("pressure", 102.5)
            ]
        );
        assert_eq!(tag_value(&p, "temperature"), Some(81.2));
        // Last entry wins, as in the shadow merge.
        assert_eq!(tag_value(&p, "pressure"), Some(102.5));
        assert_eq!(tag_value(&p, "label"), None);
        // In the IIoT shape, top-level keys are not tags.
        assert_eq!(tag_value(&p, "quality"), None);
        assert_eq!(tag_value(&p, "values"), None);
    }

    #[test]
    fn non_objects_and_odd_values_have_no_tags() {
        for p in [json!(null), json!(5), json!("x"), json!([1, 2])] {
            assert_eq!(tags(&p).count(), 0);
            assert_eq!(tag_value(&p, "x"), None);
        }
        // `values` that is not an array is an ordinary (non-numeric) key.
        let p = json!({"values": 3, "t": 1});
        assert_eq!(collect(&p), [("t", 1.0), ("values", 3.0)]);
        assert_eq!(tag_value(&json!({"values": []}), "values"), None);
    }
}
