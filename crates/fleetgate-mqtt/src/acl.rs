//! Topic ACLs, in the manner of Mosquitto's `pattern` lines: per principal, one list of
//! patterns for subscribing and one for publishing. A pattern is a topic filter whose levels
//! may be `${principal}` (the principal's ID) or `${group}` (each group in its scope). A
//! pattern starting with `!` denies, and a deny wins over every allow.
//!
//! A publish topic is allowed when an allow pattern matches it and no deny does. A subscribe
//! filter is allowed only when one allow pattern covers *every* topic it can match (so
//! `farm/+` is not allowed by `farm/a/#`), and no deny pattern shares a topic with it.

use std::fmt;

use crate::MqttError;
use crate::topic::{Level, Topic, TopicFilter, parse_levels};

/// One level of a pattern as written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternLevel {
    Level(Level),
    Principal,
    Group,
}

/// One ACL line: a filter with placeholders, allowing or denying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclPattern {
    text: String,
    deny: bool,
    levels: Vec<PatternLevel>,
}

impl AclPattern {
    /// Parses `[!]filter`, where whole levels may be `${principal}` or `${group}`.
    ///
    /// # Errors
    /// [`MqttError::InvalidAcl`] for an invalid filter or a placeholder that is not a whole
    /// level.
    pub fn parse(text: &str) -> Result<Self, MqttError> {
        let original = text.trim();
        let (deny, body) = match original.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, original),
        };
        let bad = |why: &str| MqttError::InvalidAcl(format!("{original:?}: {why}"));
        if body.is_empty() || body.contains('\0') {
            return Err(bad("empty or holds NUL"));
        }
        let mut levels = Vec::new();
        let parsed = parse_levels(&body.replace("${principal}", "P").replace("${group}", "G"))
            .map_err(|e| bad(&e.to_string()))?;
        for (part, level) in body.split('/').zip(parsed) {
            levels.push(match part {
                "${principal}" => PatternLevel::Principal,
                "${group}" => PatternLevel::Group,
                p if p.contains("${") => return Err(bad("a placeholder must be a whole level")),
                _ => PatternLevel::Level(level),
            });
        }
        Ok(Self {
            text: original.to_owned(),
            deny,
            levels,
        })
    }

    /// Whether it denies.
    pub fn is_deny(&self) -> bool {
        self.deny
    }

    /// The filters this pattern stands for, for `subject`. A substituted value is always a
    /// literal level (a `+` in a name is not a wildcard), and a value holding `/` would
    /// span levels, so it yields nothing.
    fn expand(&self, subject: &AclSubject<'_>) -> Vec<TopicFilter> {
        let mut out: Vec<Vec<Level>> = vec![Vec::with_capacity(self.levels.len())];
        for level in &self.levels {
            let choices: Vec<Level> = match level {
                PatternLevel::Level(l) => vec![l.clone()],
                PatternLevel::Principal => vec![Level::Literal(subject.principal.to_owned())],
                PatternLevel::Group => match subject.groups {
                    Groups::All => vec![Level::Single],
                    Groups::Some(groups) => {
                        groups.iter().map(|g| Level::Literal(g.clone())).collect()
                    }
                },
            };
            let choices: Vec<Level> = choices
                .into_iter()
                .filter(|c| !matches!(c, Level::Literal(s) if s.contains('/') || s.contains('\0')))
                .collect();
            out = out
                .into_iter()
                .flat_map(|prefix| {
                    choices.iter().map(move |c| {
                        let mut p = prefix.clone();
                        p.push(c.clone());
                        p
                    })
                })
                .collect();
        }
        out.into_iter().map(TopicFilter::from_levels).collect()
    }
}

impl fmt::Display for AclPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The groups `${group}` stands for.
#[derive(Debug, Clone, Copy)]
pub enum Groups<'a> {
    /// Every group (a `*` scope): `${group}` matches any one level.
    All,
    /// These groups.
    Some(&'a [String]),
}

/// Who asks.
#[derive(Debug, Clone, Copy)]
pub struct AclSubject<'a> {
    /// The principal's ID (`${principal}`).
    pub principal: &'a str,
    /// Its scope's groups (`${group}`).
    pub groups: Groups<'a>,
}

/// Separate pattern lists for publishing and subscribing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicAcl {
    subscribe: Vec<AclPattern>,
    publish: Vec<AclPattern>,
}

/// The default subscribe patterns: the principal's own tree and its groups' trees.
pub const DEFAULT_SUBSCRIBE_ACL: &[&str] = &["apps/${principal}/#", "groups/${group}/#"];

/// The default publish patterns: only the principal's own tree (never `devices/#`).
pub const DEFAULT_PUBLISH_ACL: &[&str] = &["apps/${principal}/#"];

impl Default for TopicAcl {
    fn default() -> Self {
        Self::parse(DEFAULT_SUBSCRIBE_ACL, DEFAULT_PUBLISH_ACL)
            .expect("the default patterns are valid")
    }
}

impl TopicAcl {
    /// Parses both lists.
    ///
    /// # Errors
    /// [`MqttError::InvalidAcl`] naming the first bad pattern.
    pub fn parse<S: AsRef<str>>(subscribe: &[S], publish: &[S]) -> Result<Self, MqttError> {
        let parse = |list: &[S]| {
            list.iter()
                .map(|p| AclPattern::parse(p.as_ref()))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            subscribe: parse(subscribe)?,
            publish: parse(publish)?,
        })
    }

    /// Whether `subject` may publish on `topic`.
    pub fn may_publish(&self, subject: &AclSubject<'_>, topic: &Topic) -> bool {
        let (mut allowed, mut denied) = (false, false);
        for pattern in &self.publish {
            let hit = pattern.expand(subject).iter().any(|f| f.matches(topic));
            if hit && pattern.deny {
                denied = true;
            } else if hit {
                allowed = true;
            }
        }
        allowed && !denied
    }

    /// Whether `subject` may subscribe to `filter`: one allow pattern covers all it can
    /// match, and no deny pattern shares a topic with it.
    pub fn may_subscribe(&self, subject: &AclSubject<'_>, filter: &TopicFilter) -> bool {
        let (mut allowed, mut denied) = (false, false);
        for pattern in &self.subscribe {
            let expanded = pattern.expand(subject);
            if pattern.deny {
                denied |= expanded.iter().any(|p| p.intersects(filter));
            } else {
                allowed |= expanded.iter().any(|p| p.covers(filter));
            }
        }
        allowed && !denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(groups: &[String]) -> AclSubject<'_> {
        AclSubject {
            principal: "user:ann",
            groups: Groups::Some(groups),
        }
    }
    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }
    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    #[test]
    fn the_defaults_keep_web_clients_in_their_own_and_their_groups_trees() {
        let acl = TopicAcl::default();
        let groups = vec!["farm-a".to_owned()];
        let s = ann(&groups);
        assert!(acl.may_subscribe(&s, &f("apps/user:ann/#")));
        assert!(acl.may_subscribe(&s, &f("apps/user:ann/+/x")));
        assert!(acl.may_subscribe(&s, &f("groups/farm-a/+/temp")));
        assert!(!acl.may_subscribe(&s, &f("groups/farm-b/#")));
        assert!(
            !acl.may_subscribe(&s, &f("groups/+/temp")),
            "covers other groups"
        );
        assert!(!acl.may_subscribe(&s, &f("#")));
        assert!(!acl.may_subscribe(&s, &f("apps/user:bob/#")));
        assert!(acl.may_publish(&s, &t("apps/user:ann/x")));
        assert!(!acl.may_publish(&s, &t("groups/farm-a/x")));
        assert!(!acl.may_publish(&s, &t("devices/d1/commands")));
    }

    #[test]
    fn a_star_scope_makes_group_any_single_level() {
        let acl = TopicAcl::default();
        let s = AclSubject {
            principal: "bootstrap",
            groups: Groups::All,
        };
        assert!(acl.may_subscribe(&s, &f("groups/+/temp")));
        assert!(acl.may_subscribe(&s, &f("groups/anything/#")));
        assert!(
            !acl.may_subscribe(&s, &f("groups/#")),
            "# spans more than the group level"
        );
        assert!(!acl.may_subscribe(&s, &f("devices/+/status")));
    }

    #[test]
    fn substituted_values_are_literal_and_never_span_levels() {
        let acl = TopicAcl::parse(&["apps/${principal}/#"], &["apps/${principal}/#"]).unwrap();
        let sneaky = AclSubject {
            principal: "a/b",
            groups: Groups::All,
        };
        assert!(!acl.may_subscribe(&sneaky, &f("apps/a/b/#")));
        assert!(!acl.may_publish(&sneaky, &t("apps/a/b/x")));
        let plus = AclSubject {
            principal: "+",
            groups: Groups::All,
        };
        assert!(
            !acl.may_subscribe(&plus, &f("apps/+/#")),
            "a + name is no wildcard"
        );
        assert!(!acl.may_subscribe(&plus, &f("apps/x/#")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let acl = TopicAcl::parse(
            &["farm/#", "!farm/secret/#"],
            &["farm/#", "!farm/+/commands"],
        )
        .unwrap();
        let groups: Vec<String> = Vec::new();
        let s = ann(&groups);
        assert!(acl.may_subscribe(&s, &f("farm/a/temp")));
        assert!(!acl.may_subscribe(&s, &f("farm/secret/x")));
        assert!(
            !acl.may_subscribe(&s, &f("farm/+/x")),
            "could match farm/secret/x"
        );
        assert!(!acl.may_subscribe(&s, &f("farm/#")));
        assert!(acl.may_publish(&s, &t("farm/a/status")));
        assert!(!acl.may_publish(&s, &t("farm/a/commands")));
    }

    #[test]
    fn no_group_means_group_patterns_allow_nothing() {
        let acl = TopicAcl::default();
        let none: Vec<String> = Vec::new();
        assert!(!acl.may_subscribe(&ann(&none), &f("groups/x/#")));
    }

    #[test]
    fn bad_patterns_are_refused_with_their_text() {
        for bad in [
            "",
            "!",
            "a/${principal}x",
            "a/#/b",
            "a+",
            "${group}${principal}",
        ] {
            let e = AclPattern::parse(bad).unwrap_err().to_string();
            assert!(e.contains("ACL"), "{bad:?}: {e}");
        }
        assert!(AclPattern::parse("! a/b").unwrap().is_deny());
    }
}
