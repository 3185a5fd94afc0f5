//! `fleetgate audit verify`: checks an exported copy of the audit log offline, with the
//! checkpoint signing key's public half, and without any access to the cluster.

use std::io::{BufReader, Write};
use std::path::PathBuf;

use anyhow::Context;

/// `fleetgate audit ...`.
#[derive(clap::Subcommand)]
pub enum AuditCommand {
    /// Verify an export (`GET /v1/audit/export`): the hash chain, and every checkpoint's
    /// signature. Prints a JSON report; exits 1 when the copy does not verify.
    Verify(VerifyArgs),
}

/// `fleetgate audit verify` arguments.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The exported JSON-lines file.
    #[arg(long)]
    export: PathBuf,
    /// SPKI PEM public key of the checkpoint signing key (repeat for keys rotated out).
    #[arg(long = "public-key", required = true)]
    public_keys: Vec<PathBuf>,
    /// The export starts after the log's first entry (exported with a cursor, or the log
    /// was trimmed): its first entry is taken as given.
    #[arg(long)]
    partial: bool,
}

/// Runs the command; `Ok(false)` when the copy does not verify.
pub fn run(command: &AuditCommand) -> anyhow::Result<bool> {
    let AuditCommand::Verify(args) = command;
    let keys = args
        .public_keys
        .iter()
        .map(|path| {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            fleetgate_audit::public_key_from_pem(&pem)
                .with_context(|| format!("parsing {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let file = std::fs::File::open(&args.export)
        .with_context(|| format!("opening {}", args.export.display()))?;
    let report = fleetgate_audit::verify_export(BufReader::new(file), &keys, !args.partial)?;
    let mut answer = serde_json::json!({
        "ok": report.ok(),
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "lastCheckpointSeq": report.last_checkpoint_seq,
    });
    if let Some(b) = &report.broken {
        answer["firstBad"] = serde_json::json!(b.first_bad.as_ref().map(|id| &id.0));
        answer["firstBadSeq"] = serde_json::json!(b.seq);
        answer["reason"] = serde_json::json!(b.reason);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{answer}")?;
    Ok(report.ok())
}
