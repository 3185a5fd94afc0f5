//! Files that hold secrets: refused when every local user may read them.

use std::path::Path;

use anyhow::{Context, bail};

/// A secret that every local user can read is a leaked secret: refuse to start with it.
/// Kubernetes mounts Secrets 0644 unless told otherwise; the chart sets `defaultMode`.
pub fn refuse_world_readable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.permissions().mode() & 0o004 != 0 {
        bail!(
            "{} holds a secret and is world-readable: chmod o-r it (mode 0600 or 0640)",
            path.display()
        );
    }
    Ok(())
}

/// Reads a file that holds a secret, refusing it when it is world-readable.
///
/// # Errors
/// The file is world-readable or unreadable.
pub fn read_secret(path: &Path) -> anyhow::Result<String> {
    refuse_world_readable(path)?;
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
