//! Whole numbers as JSON writes them: `5000` and `5000.0` are the same integer to JSON Schema
//! (and to JavaScript clients, which may send either), while serde accepts only the first.

use serde::{Deserialize, Deserializer};

fn whole(n: &serde_json::Number) -> Option<f64> {
    let f = n.as_f64()?;
    (f.fract() == 0.0).then_some(f)
}

/// An optional non-negative integer field that also takes `5000.0`.
pub(crate) fn opt_unsigned<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let value = n.as_u64().or_else(|| {
        whole(&n)
            // `u64::MAX as f64` rounds up to 2^64, which does not fit.
            .filter(|f| *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    });
    value
        .and_then(|v| T::try_from(v).ok())
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a whole number in range")))
}

/// An optional integer field that also takes `5000.0`.
pub(crate) fn opt_signed<'de, D>(d: D) -> Result<Option<i64>, D::Error>
where
    D: Deserializer<'de>,
{
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    n.as_i64()
        .or_else(|| {
            whole(&n)
                .filter(|f| *f >= i64::MIN as f64 && *f < i64::MAX as f64)
                .map(|f| f as i64)
        })
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a whole number in range")))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "super::opt_unsigned")]
        qos: Option<u8>,
        #[serde(default, deserialize_with = "super::opt_signed")]
        at: Option<i64>,
    }

    #[test]
    fn whole_floats_are_integers_and_fractions_or_overflow_are_not() {
        let t: T = serde_json::from_str(r#"{"qos": 2.0, "at": -5.0}"#).unwrap();
        assert_eq!((t.qos, t.at), (Some(2), Some(-5)));
        let t: T = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!((t.qos, t.at), (None, None));
        assert!(serde_json::from_str::<T>(r#"{"qos": 1.5}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"qos": 300}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"qos": -1}"#).is_err());
    }
}
