//! MQTT topic names and topic filters (MQTT 3.1.1 section 4.7, unchanged in 5.0): validation
//! and matching, kept in one place so the router, the ACLs and the gateway agree.
//!
//! A topic name is what a PUBLISH carries: no wildcards. A filter is what a SUBSCRIBE asks
//! for: `+` stands for exactly one whole level, `#` for any number of levels (zero included)
//! and only as the last level. Topics starting with `$` (`$SYS/...`) are the broker's: a
//! filter whose first level is a wildcard does not match them (4.7.2).

use std::fmt;

use crate::MqttError;

/// Longest topic name or filter: the MQTT length prefix is 16 bits.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// One level of a filter (or of an ACL pattern after substitution).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Level {
    /// A literal level (may be empty: `a//b` has an empty middle level).
    Literal(String),
    /// `+`: exactly one level.
    Single,
    /// `#`: the rest, zero or more levels; only last.
    Multi,
}

impl Level {
    fn parse(text: &str) -> Self {
        match text {
            "+" => Self::Single,
            "#" => Self::Multi,
            other => Self::Literal(other.to_owned()),
        }
    }

    fn is_wildcard(&self) -> bool {
        !matches!(self, Self::Literal(_))
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Literal(s) => f.write_str(s),
            Self::Single => f.write_str("+"),
            Self::Multi => f.write_str("#"),
        }
    }
}

fn check_common(text: &str) -> Result<(), MqttError> {
    if text.is_empty() {
        return Err(MqttError::InvalidTopic("empty"));
    }
    if text.len() > MAX_TOPIC_BYTES {
        return Err(MqttError::InvalidTopic("longer than 65535 bytes"));
    }
    if text.contains('\0') {
        return Err(MqttError::InvalidTopic("contains NUL"));
    }
    Ok(())
}

/// A valid topic name: what messages are published on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    /// Validates a topic name.
    ///
    /// # Errors
    /// [`MqttError::InvalidTopic`] when it is empty, too long, holds NUL or a wildcard.
    pub fn new(text: impl Into<String>) -> Result<Self, MqttError> {
        let text = text.into();
        check_common(&text)?;
        if text.contains(['+', '#']) {
            return Err(MqttError::InvalidTopic(
                "wildcards are not allowed in topic names",
            ));
        }
        Ok(Self(text))
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its levels, split on `/`.
    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether it is one of the broker's `$` topics.
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid topic filter: what is subscribed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter {
    text: String,
    levels: Vec<Level>,
}

impl TopicFilter {
    /// Validates a filter.
    ///
    /// # Errors
    /// [`MqttError::InvalidTopic`] when it is empty, too long, holds NUL, a wildcard that is
    /// not a whole level, or a `#` that is not last.
    pub fn new(text: impl Into<String>) -> Result<Self, MqttError> {
        let text = text.into();
        check_common(&text)?;
        let levels = parse_levels(&text)?;
        Ok(Self { text, levels })
    }

    /// Builds a filter from levels already checked (ACL patterns after substitution).
    pub(crate) fn from_levels(levels: Vec<Level>) -> Self {
        let text = levels
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("/");
        Self { text, levels }
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its levels.
    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// Whether it has a wildcard.
    pub fn has_wildcards(&self) -> bool {
        self.levels.iter().any(Level::is_wildcard)
    }

    /// The levels topics are matched against: a shared subscription
    /// (`$share/<group>/<filter>`, MQTT 5 and Mosquitto) delivers topics of its inner filter.
    fn matched_levels(&self) -> &[Level] {
        match self.levels.as_slice() {
            [Level::Literal(share), Level::Literal(_), rest @ ..]
                if share == "$share" && !rest.is_empty() =>
            {
                rest
            }
            all => all,
        }
    }

    /// Whether `topic` matches this filter.
    pub fn matches(&self, topic: &Topic) -> bool {
        let levels = self.matched_levels();
        if topic.is_system() && levels.first().is_some_and(Level::is_wildcard) {
            return false;
        }
        let mut names = topic.levels();
        for level in levels {
            match level {
                Level::Multi => return true,
                Level::Single => {
                    if names.next().is_none() {
                        return false;
                    }
                }
                Level::Literal(l) => match names.next() {
                    Some(n) if n == l => {}
                    _ => return false,
                },
            }
        }
        names.next().is_none()
    }

    /// Whether every topic `other` can match is also matched by this filter (subsumption,
    /// level by level: `+` is covered only by `+` or `#`, `#` only by `#`).
    pub fn covers(&self, other: &TopicFilter) -> bool {
        // A `$` topic is matched only by a filter naming its first level literally, so this
        // filter covers a `$`-filter only with the same literal first level.
        if let (Some(mine), Some(Level::Literal(theirs))) =
            (self.levels.first(), other.levels.first())
            && theirs.starts_with('$')
            && mine.is_wildcard()
        {
            return false;
        }
        let mut theirs = other.levels.iter();
        for mine in &self.levels {
            let next = theirs.next();
            match (mine, next) {
                (Level::Multi, _) => return true,
                // `a/#` also matches `a`, which only a `#` here could cover.
                (_, None) => return false,
                (Level::Single, Some(Level::Single | Level::Literal(_))) => {}
                (Level::Literal(a), Some(Level::Literal(b))) if a == b => {}
                _ => return false,
            }
        }
        theirs.next().is_none()
    }

    /// Whether some topic matches both filters.
    pub fn intersects(&self, other: &TopicFilter) -> bool {
        let system_literal = |f: &TopicFilter| matches!(f.levels.first(), Some(Level::Literal(l)) if l.starts_with('$'));
        let wild_first = |f: &TopicFilter| f.levels.first().is_some_and(Level::is_wildcard);
        if (system_literal(self) && wild_first(other))
            || (system_literal(other) && wild_first(self))
        {
            return false;
        }
        let (mut a, mut b) = (self.levels.iter(), other.levels.iter());
        loop {
            match (a.next(), b.next()) {
                (Some(Level::Multi), _) | (_, Some(Level::Multi)) => return true,
                (None, None) => return true,
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(Level::Literal(x)), Some(Level::Literal(y))) if x != y => return false,
                _ => {}
            }
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Splits a filter into levels, checking wildcard placement.
pub(crate) fn parse_levels(text: &str) -> Result<Vec<Level>, MqttError> {
    let parts: Vec<&str> = text.split('/').collect();
    let last = parts.len() - 1;
    let mut levels = Vec::with_capacity(parts.len());
    for (i, part) in parts.into_iter().enumerate() {
        if part.len() > 1 && part.contains(['+', '#']) {
            return Err(MqttError::InvalidTopic("a wildcard must be a whole level"));
        }
        let level = Level::parse(part);
        if level == Level::Multi && i != last {
            return Err(MqttError::InvalidTopic("`#` must be the last level"));
        }
        levels.push(level);
    }
    Ok(levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }
    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    #[test]
    fn topic_names_refuse_wildcards_nul_empty_and_overlong() {
        for bad in ["", "a/+", "a/#", "a+", "#", "a\0b"] {
            assert!(Topic::new(bad).is_err(), "{bad:?}");
        }
        assert!(Topic::new("x".repeat(MAX_TOPIC_BYTES + 1)).is_err());
        assert!(Topic::new("x".repeat(MAX_TOPIC_BYTES)).is_ok());
        for good in ["a", "/", "a//b", "/a/", "$SYS/x", "farm/é/temp", " "] {
            assert!(Topic::new(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn filters_need_whole_level_wildcards_and_hash_last() {
        for bad in ["", "a+", "a/b#", "#/a", "a/#/b", "++", "a/+x", "a\0"] {
            assert!(TopicFilter::new(bad).is_err(), "{bad:?}");
        }
        for good in ["#", "+", "+/+", "a/#", "/#", "a//+", "+/#", "$SYS/#"] {
            assert!(TopicFilter::new(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        assert!(f("sport/tennis/player1/#").matches(&t("sport/tennis/player1")));
        assert!(f("sport/tennis/player1/#").matches(&t("sport/tennis/player1/ranking")));
        assert!(f("sport/#").matches(&t("sport")));
        assert!(f("sport/tennis/+").matches(&t("sport/tennis/player1")));
        assert!(!f("sport/tennis/+").matches(&t("sport/tennis/player1/ranking")));
        assert!(!f("sport/+").matches(&t("sport")));
        assert!(f("sport/+").matches(&t("sport/")));
        assert!(f("+/+").matches(&t("/finance")));
        assert!(f("/+").matches(&t("/finance")));
        assert!(!f("+").matches(&t("/finance")));
        assert!(f("#").matches(&t("a/b/c")));
        assert!(!f("a/b").matches(&t("a/b/c")));
        assert!(!f("a/b/c").matches(&t("a/b")));
    }

    #[test]
    fn leading_wildcards_do_not_match_dollar_topics() {
        assert!(!f("#").matches(&t("$SYS/broker/uptime")));
        assert!(!f("+/monitor/Clients").matches(&t("$SYS/monitor/Clients")));
        assert!(f("$SYS/#").matches(&t("$SYS/monitor/Clients")));
        assert!(f("$SYS/monitor/+").matches(&t("$SYS/monitor/Clients")));
        assert!(
            f("a/#").matches(&t("a/$x")),
            "only the first level is special"
        );
    }

    #[test]
    fn shared_subscriptions_match_their_inner_filter() {
        let shared = f("$share/fleetgate/devices/+/status");
        assert!(shared.matches(&t("devices/d1/status")));
        assert!(!shared.matches(&t("devices/d1/events")));
        assert!(
            !f("$share/g").matches(&t("g")),
            "no inner filter: a plain literal filter"
        );
    }

    #[test]
    fn covers_is_subsumption_level_by_level() {
        assert!(f("a/#").covers(&f("a/#")));
        assert!(f("a/#").covers(&f("a")));
        assert!(f("a/#").covers(&f("a/+/c")));
        assert!(f("a/+").covers(&f("a/b")));
        assert!(f("a/+").covers(&f("a/+")));
        assert!(!f("a/+").covers(&f("a/#")), "# is more than one level");
        assert!(!f("a/b").covers(&f("a/+")), "+ is more than one name");
        assert!(!f("a/+").covers(&f("a")));
        assert!(!f("a/+/c").covers(&f("a/+/#")));
        assert!(!f("a").covers(&f("a/#")), "a/# also matches a/x");
        assert!(f("#").covers(&f("x/y")));
        assert!(!f("#").covers(&f("$SYS/x")));
        assert!(!f("+/x").covers(&f("$SYS/x")));
        assert!(f("$SYS/#").covers(&f("$SYS/x")));
        assert!(!f("a/b").covers(&f("b/a")));
    }

    #[test]
    fn intersects_finds_a_common_topic() {
        assert!(f("a/+").intersects(&f("+/b")));
        assert!(f("a/#").intersects(&f("a")));
        assert!(f("#").intersects(&f("x")));
        assert!(!f("a/+").intersects(&f("a")));
        assert!(!f("a/b").intersects(&f("a/c")));
        assert!(!f("a/b").intersects(&f("a/b/c")));
        assert!(!f("#").intersects(&f("$SYS/x")));
        assert!(f("$SYS/#").intersects(&f("$SYS/+")));
    }
}
