//! Audit entries and their canonical text, which is what the chain hashes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where in a request's life an entry was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// A state-changing request was received; written before it runs (fail closed).
    Request,
    /// A request's outcome (for a refused or failed authentication, the only entry).
    Response,
    /// Something the system did by itself (a command that failed, a job that finished).
    Event,
    /// A signed statement of the chain's head.
    Checkpoint,
}

/// A signed checkpoint: the entry just before it had sequence `seq` and hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpoint {
    /// Sequence number of the entry it vouches for.
    pub seq: u64,
    /// Hex SHA-256 of that entry's text.
    pub hash: String,
    /// ID of the signing key (see [`crate::Signer::kid`]).
    pub kid: String,
    /// Base64 Ed25519 signature of [`crate::checkpoint_statement`].
    pub sig: String,
}

/// One entry of the audit log. Never holds a secret: actors are IDs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// 1 for the first entry, then one more for each.
    pub seq: u64,
    /// Hex SHA-256 of the previous entry's text ([`GENESIS`] for the first).
    pub prev: String,
    /// When it was appended, ms since the epoch.
    pub ts: i64,
    /// Its stage.
    pub stage: Stage,
    /// Who: `user:<name>`, `key:<id>`, `bootstrap`, `anonymous`, `node:<id>`, `admin:<id>`.
    pub actor: String,
    /// The actor's role, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The caller's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Ties a request's entries together (also sent back as `x-request-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// What was done: `device.create`, `command.send`, `auth.login`, ...
    pub action: String,
    /// What it was done to: `device:<id>`, `user:<name>`, `key:<id>`, `job:<id>`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// HTTP status of the outcome (response entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<u16>,
    /// The command's msgid, for commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msgid: Option<String>,
    /// A short machine-readable reason (`bad_credentials`, `forbidden`, `out_of_scope`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The job a request started (a scene's activation names its job here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Checkpoint entries: the signed statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

/// `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An entry before the writer gives it its place in the chain (`seq`, `prev`, `ts`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Draft {
    /// See [`Entry::stage`]; `None` means [`Stage::Response`].
    pub stage: Option<Stage>,
    /// See [`Entry::actor`].
    pub actor: String,
    /// See [`Entry::role`].
    pub role: Option<String>,
    /// See [`Entry::source`].
    pub source: Option<String>,
    /// See [`Entry::request_id`].
    pub request_id: Option<String>,
    /// See [`Entry::action`].
    pub action: String,
    /// See [`Entry::target`].
    pub target: Option<String>,
    /// See [`Entry::outcome`].
    pub outcome: Option<u16>,
    /// See [`Entry::msgid`].
    pub msgid: Option<String>,
    /// See [`Entry::reason`].
    pub reason: Option<String>,
    /// See [`Entry::job`].
    pub job: Option<String>,
}

impl Draft {
    pub(crate) fn into_entry(self, seq: u64, prev: String, ts: i64) -> Entry {
        Entry {
            seq,
            prev,
            ts,
            stage: self.stage.unwrap_or(Stage::Response),
            actor: self.actor,
            role: self.role,
            source: self.source,
            request_id: self.request_id,
            action: self.action,
            target: self.target,
            outcome: self.outcome,
            msgid: self.msgid,
            reason: self.reason,
            job: self.job,
            checkpoint: None,
        }
    }
}

impl Entry {
    /// The canonical text: JSON with keys sorted at every level and no white space, so the
    /// same entry always has the same bytes (and hash), whoever serialises it.
    pub fn canonical(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        let mut out = String::new();
        write_canonical(&value, &mut out);
        out
    }

    /// Parses an entry's text.
    ///
    /// # Errors
    /// When the text is not an entry.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// Sorted-key compact JSON. Written out here rather than relying on serde_json's map order,
/// which a feature enabled anywhere in the build (`preserve_order`) would change.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Draft {
            actor: "user:ann".into(),
            role: Some("operator".into()),
            action: "device.create".into(),
            target: Some("device:s-1".into()),
            outcome: Some(201),
            ..Draft::default()
        }
        .into_entry(1, GENESIS.into(), 1_700_000_000_000)
    }

    #[test]
    fn canonical_text_sorts_keys_and_skips_absent_fields() {
        let text = entry().canonical();
        assert_eq!(
            text,
            r#"{"action":"device.create","actor":"user:ann","outcome":201,"prev":"0000000000000000000000000000000000000000000000000000000000000000","role":"operator","seq":1,"stage":"response","target":"device:s-1","ts":1700000000000}"#
        );
        assert_eq!(Entry::parse(&text).unwrap(), entry());
        assert_eq!(Entry::parse(&text).unwrap().canonical(), text);
    }

    #[test]
    fn unknown_fields_are_not_an_entry() {
        let mut v: Value = serde_json::from_str(&entry().canonical()).unwrap();
        v["extra"] = 1.into();
        assert!(Entry::parse(&v.to_string()).is_err());
    }
}
