//! Material the node re-reads while it runs: TLS certificates and device JWT keys. Files are
//! polled, not watched: Kubernetes updates a mounted Secret by swapping a symlink, which
//! change notifications on the file itself miss, and reading a few KiB every few seconds
//! cannot miss it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fleetgate_gateway::{JwtKeySpec, JwtKeys};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::secret_files::read_secret;
use crate::settings::Settings;

/// Runs `check` on a blocking thread every `every` until `stop`; `check` answers whether it
/// reloaded anything. A failure is logged and the material in use stays.
pub fn every(
    what: &'static str,
    every: Duration,
    stop: &CancellationToken,
    check: impl Fn() -> anyhow::Result<bool> + Send + Sync + 'static,
) {
    let stop = stop.clone();
    let check = Arc::new(check);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let check = check.clone();
            match tokio::task::spawn_blocking(move || check()).await {
                Ok(Ok(true)) => tracing::info!(message = "reloaded", what),
                Ok(Ok(false)) => {}
                Ok(Err(error)) => tracing::error!(
                    message = "reload failed; the previous material stays in use",
                    what,
                    error = format!("{error:#}")
                ),
                Err(error) => tracing::error!(message = "reload task failed", what, %error),
            }
        }
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<JwtKeySpec>,
}

/// The device JWT key files (`jwt_keys` TOML, `jwt.jwks`) and the digest of what was last
/// loaded from them.
pub struct JwtFiles {
    toml: Option<PathBuf>,
    jwks: Option<PathBuf>,
    loaded: Mutex<[u8; 32]>,
}

impl JwtFiles {
    /// Loads the keys the settings name (none configured = an empty set).
    ///
    /// # Errors
    /// An unreadable, world-readable or invalid key file.
    pub fn load(settings: &Settings) -> anyhow::Result<(Arc<Self>, JwtKeys)> {
        let files = Self {
            toml: settings.jwt_keys.clone(),
            jwks: settings.jwt.jwks.clone(),
            loaded: Mutex::new([0; 32]),
        };
        let (digest, specs, jwks) = files.read()?;
        let keys = JwtKeys::load(&specs, jwks.as_deref(), settings.jwt.policy())?;
        *files.loaded.lock().unwrap_or_else(|p| p.into_inner()) = digest;
        Ok((Arc::new(files), keys))
    }

    /// Whether any key file is configured.
    pub fn any(&self) -> bool {
        self.toml.is_some() || self.jwks.is_some()
    }

    #[allow(clippy::type_complexity)]
    fn read(&self) -> anyhow::Result<([u8; 32], Vec<JwtKeySpec>, Option<String>)> {
        let mut hash = Sha256::new();
        let toml_text = self.toml.as_deref().map(read_secret).transpose()?;
        let jwks_text = self.jwks.as_deref().map(read_secret).transpose()?;
        for text in [&toml_text, &jwks_text] {
            let text = text.as_deref().unwrap_or_default();
            hash.update((text.len() as u64).to_le_bytes());
            hash.update(text.as_bytes());
        }
        let specs = match (&self.toml, &toml_text) {
            (Some(path), Some(text)) => {
                let file: KeyFile =
                    toml::from_str(text).with_context(|| format!("parsing {}", path.display()))?;
                file.keys
            }
            _ => Vec::new(),
        };
        Ok((hash.finalize().into(), specs, jwks_text))
    }

    /// Replaces `keys` when a file changed; `Ok(false)` = nothing changed.
    ///
    /// # Errors
    /// The new files' error; the old keys then stay.
    pub fn reload_if_changed(&self, keys: &JwtKeys) -> anyhow::Result<bool> {
        let (digest, specs, jwks) = self.read()?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if *loaded == digest {
            return Ok(false);
        }
        keys.replace(&specs, jwks.as_deref())?;
        *loaded = digest;
        Ok(true)
    }
}
