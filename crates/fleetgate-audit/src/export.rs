//! The export format: JSON lines `{"id":"<position>","entry":"<the entry's exact text>"}`.
//! The text travels as a string so that the bytes the chain hashed are the bytes verified.

use std::io::BufRead;

use ed25519_dalek::VerifyingKey;
use fleetgate_bus::{AuditRecord, StreamId};
use serde::{Deserialize, Serialize};

use crate::verify::{Report, Verifier};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    entry: String,
}

/// Errors reading an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The file could not be read.
    #[error("reading the export: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not an export line.
    #[error("line {line}: not an export line: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// One export line (without the newline).
pub fn export_line(record: &AuditRecord) -> String {
    serde_json::to_string(&Line {
        id: record.id.0.clone(),
        entry: record.entry.clone(),
    })
    .unwrap_or_default()
}

/// Verifies an exported copy from its first line on. `from_start`: the copy begins at the
/// log's first entry (otherwise its first entry is taken as given). An empty copy verifies.
///
/// # Errors
/// [`ExportError`] when the input cannot be read or a line is malformed.
pub fn verify_export(
    input: impl BufRead,
    keys: &[VerifyingKey],
    from_start: bool,
) -> Result<Report, ExportError> {
    let mut verifier = Verifier::new(keys, from_start);
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line).map_err(|e| ExportError::Line {
            line: i + 1,
            message: e.to_string(),
        })?;
        verifier.push(&AuditRecord {
            id: StreamId(parsed.id),
            entry: parsed.entry,
        });
    }
    Ok(verifier.finish(None))
}
