//! Alert rules as the REST API accepts them, their validation and targeting.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest `forMs` or offline duration: 30 days. Bounding it keeps `since + duration`
/// far from overflow and catches unit mistakes (seconds typed into a millisecond field).
pub const MAX_DURATION_MS: i64 = 30 * 24 * 3600 * 1000;
/// Longest rule name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest tag name, in bytes.
pub const MAX_TAG_BYTES: usize = 128;

/// One alert rule: what to watch, on which devices, and how loud to be.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Stable identifier, 1-64 characters of `[A-Za-z0-9_.-]`; part of every alert id.
    pub id: String,
    /// Human-readable name, used in alert messages (the id stands in when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The devices the rule watches.
    pub target: Target,
    /// What must hold for the alert to fire, and what resolves it.
    pub condition: Condition,
    /// How long the condition must hold before firing, in ms (0: fire at once).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub for_ms: i64,
    /// How serious a fired alert is.
    #[serde(default)]
    pub severity: Severity,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The devices a rule applies to.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Target {
    /// Every device of a group (`{"group":"farm-a"}`).
    Group(String),
    /// One device (`{"device":"sensor-001"}`).
    Device(String),
}

/// What a rule watches. Each kind defines its fire and its clear condition.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Condition {
    /// A reported tag compared with a fixed value.
    Threshold(Threshold),
    /// A reported tag outside `[low, high]`.
    Band(Band),
    /// A reported tag changing faster than a limit between consecutive samples.
    Rate(Rate),
    /// The device being offline for at least a number of seconds.
    Offline(Offline),
}

/// `tag <op> value`; resolves once the tag is at or past `clear`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Threshold {
    /// The tag compared.
    pub tag: String,
    /// The comparison.
    pub op: Op,
    /// The threshold.
    pub value: f64,
    /// Hysteresis level: for `>` resolve when `tag <= clear`, for `<` when `tag >= clear`.
    /// Defaults to `value`; not allowed with `==`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear: Option<f64>,
}

/// Fires when `tag < low` or `tag > high`; resolves once back inside by `margin`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Band {
    /// The tag watched.
    pub tag: String,
    /// Lowest normal value.
    pub low: f64,
    /// Highest normal value.
    pub high: f64,
    /// Hysteresis: resolve only when `low + margin <= tag <= high - margin` (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
}

/// Fires when `|Δtag| / Δt` between consecutive samples exceeds `per_second`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rate {
    /// The tag watched.
    pub tag: String,
    /// Largest normal absolute change per second.
    pub per_second: f64,
    /// Hysteresis: resolve when the rate is at or below this (default `per_second`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear: Option<f64>,
}

/// Fires when the device has been offline for at least `seconds`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Offline {
    /// Seconds offline before the alert fires (0: as soon as it goes offline).
    pub seconds: i64,
}

/// Threshold comparison operators.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Strictly greater than.
    #[serde(rename = ">")]
    Gt,
    /// Strictly less than.
    #[serde(rename = "<")]
    Lt,
    /// Exactly equal (meant for integral codes such as states or error numbers).
    #[serde(rename = "==")]
    Eq,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Gt => ">",
            Self::Lt => "<",
            Self::Eq => "==",
        })
    }
}

/// How serious an alert is; ordered `Info < Warning < Critical`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Needs attention (the default).
    #[default]
    Warning,
    /// Needs attention now.
    Critical,
}

/// Why a rule was refused; the message is short enough for an HTTP 400 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The id is not 1-64 characters of `[A-Za-z0-9_.-]`.
    #[error("rule id must be 1-64 characters of [A-Za-z0-9_.-]")]
    BadId,
    /// The name is too long or has control characters.
    #[error("rule name must be at most 200 characters, without control characters")]
    BadName,
    /// The target group or device is not a valid name.
    #[error("target must be 1-128 characters of [A-Za-z0-9._:-]")]
    BadTarget,
    /// The tag is empty or too long.
    #[error("tag must be 1-128 bytes")]
    BadTag,
    /// A number is NaN or infinite (JSON cannot carry these, but rules built in code can).
    #[error("{0} must be a finite number")]
    NotFinite(&'static str),
    /// `clear` would resolve an alert while its condition still holds.
    #[error("clear must not be past the threshold (at or below it for >, at or above for <)")]
    ClearWrongSide,
    /// `clear` with `==`: equality has no side to clear on.
    #[error("clear is not supported with ==")]
    ClearWithEq,
    /// A band with `low >= high`.
    #[error("low must be below high")]
    BandOrder,
    /// A negative margin, or one that leaves no value that resolves.
    #[error("margin must be >= 0 and at most half of high - low")]
    BadMargin,
    /// `perSecond` not above 0.
    #[error("perSecond must be above 0")]
    BadRate,
    /// Rate `clear` outside `[0, perSecond]`.
    #[error("rate clear must be between 0 and perSecond")]
    BadRateClear,
    /// A negative duration.
    #[error("{0} must not be negative")]
    Negative(&'static str),
    /// A duration above [`MAX_DURATION_MS`].
    #[error("{0} must be at most 30 days")]
    TooLong(&'static str),
    /// `forMs` on an offline rule, whose `seconds` already is the duration.
    #[error("forMs does not apply to offline rules; use seconds")]
    ForWithOffline,
}

impl Rule {
    /// Checks everything serde cannot: names, numbers and their relations.
    pub fn validate(&self) -> Result<(), RuleError> {
        let id_ok = (1..=64).contains(&self.id.len())
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !id_ok {
            return Err(RuleError::BadId);
        }
        if self.name.chars().count() > MAX_NAME_CHARS || self.name.chars().any(char::is_control) {
            return Err(RuleError::BadName);
        }
        let (Target::Group(t) | Target::Device(t)) = &self.target;
        if !safe_name(t) {
            return Err(RuleError::BadTarget);
        }
        check_duration("forMs", self.for_ms)?;
        match &self.condition {
            Condition::Threshold(c) => {
                check_tag(&c.tag)?;
                finite("value", c.value)?;
                if let Some(clear) = c.clear {
                    finite("clear", clear)?;
                    let ok = match c.op {
                        Op::Gt => clear <= c.value,
                        Op::Lt => clear >= c.value,
                        Op::Eq => return Err(RuleError::ClearWithEq),
                    };
                    if !ok {
                        return Err(RuleError::ClearWrongSide);
                    }
                }
            }
            Condition::Band(c) => {
                check_tag(&c.tag)?;
                finite("low", c.low)?;
                finite("high", c.high)?;
                if c.low >= c.high {
                    return Err(RuleError::BandOrder);
                }
                if let Some(m) = c.margin {
                    finite("margin", m)?;
                    // The clear band [low + m, high - m] must be non-empty, or nothing resolves.
                    if m < 0.0 || 2.0 * m > c.high - c.low {
                        return Err(RuleError::BadMargin);
                    }
                }
            }
            Condition::Rate(c) => {
                check_tag(&c.tag)?;
                finite("perSecond", c.per_second)?;
                if c.per_second <= 0.0 {
                    return Err(RuleError::BadRate);
                }
                if let Some(clear) = c.clear {
                    finite("clear", clear)?;
                    if !(0.0..=c.per_second).contains(&clear) {
                        return Err(RuleError::BadRateClear);
                    }
                }
            }
            Condition::Offline(c) => {
                if self.for_ms != 0 {
                    return Err(RuleError::ForWithOffline);
                }
                if c.seconds < 0 {
                    return Err(RuleError::Negative("seconds"));
                }
                if c.seconds > MAX_DURATION_MS / 1000 {
                    return Err(RuleError::TooLong("seconds"));
                }
            }
        }
        Ok(())
    }

    /// The name alert messages use: `name`, or the id when the name is empty.
    pub fn display_name(&self) -> &str {
        if self.name.is_empty() {
            &self.id
        } else {
            &self.name
        }
    }
}

impl Condition {
    /// The tag the condition reads, `None` for offline rules.
    pub fn tag(&self) -> Option<&str> {
        match self {
            Self::Threshold(c) => Some(&c.tag),
            Self::Band(c) => Some(&c.tag),
            Self::Rate(c) => Some(&c.tag),
            Self::Offline(_) => None,
        }
    }
}

/// Whether `rule` watches the device `device_id` belonging to `device_groups`.
pub fn applies_to<S: AsRef<str>>(rule: &Rule, device_id: &str, device_groups: &[S]) -> bool {
    match &rule.target {
        Target::Device(d) => d == device_id,
        Target::Group(g) => device_groups.iter().any(|x| x.as_ref() == g),
    }
}

/// The device id and group alphabet of the rest of fleetgate (names travel in bus keys).
fn safe_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn check_tag(tag: &str) -> Result<(), RuleError> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
        Err(RuleError::BadTag)
    } else {
        Ok(())
    }
}

fn finite(field: &'static str, v: f64) -> Result<(), RuleError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(RuleError::NotFinite(field))
    }
}

fn check_duration(field: &'static str, ms: i64) -> Result<(), RuleError> {
    if ms < 0 {
        Err(RuleError::Negative(field))
    } else if ms > MAX_DURATION_MS {
        Err(RuleError::TooLong(field))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
