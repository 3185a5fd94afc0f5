//! `[mqtt]`: the MQTT bridge's settings.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

/// `[mqtt]`: the MQTT bridge for web clients (`/v1/mqtt`) and its topic ACLs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Broker URL, `mqtt://host:port`; unset = `/v1/mqtt` answers 503.
    pub url: Option<String>,
    /// Username for the broker.
    pub username: Option<String>,
    /// File holding the broker password (with `username`).
    pub password_file: Option<PathBuf>,
    /// The node's MQTT client ID is this followed by the node ID.
    pub client_id_prefix: String,
    /// Filters `/v1/mqtt` clients may subscribe to (`${principal}`, `${group}`; `!` denies).
    pub subscribe_acl: Vec<String>,
    /// Topics `/v1/mqtt` clients may publish on (same syntax).
    pub publish_acl: Vec<String>,
    /// How long a node holds an MQTT device that publishes nothing; it then reads as offline.
    pub device_idle_ms: u64,
}

impl Default for MqttSettings {
    fn default() -> Self {
        let owned = |list: &[&str]| list.iter().map(|p| (*p).to_owned()).collect();
        Self {
            url: None,
            username: None,
            password_file: None,
            client_id_prefix: "fleetgate-".into(),
            subscribe_acl: owned(fleetgate_mqtt::DEFAULT_SUBSCRIBE_ACL),
            publish_acl: owned(fleetgate_mqtt::DEFAULT_PUBLISH_ACL),
            device_idle_ms: 300_000,
        }
    }
}

/// The `[mqtt]` options as environment variables and flags.
#[derive(Debug, Clone, Args)]
pub struct MqttOverrides {
    /// MQTT broker for /v1/mqtt (`mqtt://host:port`); empty or unset = /v1/mqtt answers 503.
    #[arg(long, env = "FLEETGATE_MQTT_URL")]
    pub mqtt_url: Option<String>,
    /// Username for the MQTT broker.
    #[arg(long, env = "FLEETGATE_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// File holding the MQTT broker password.
    #[arg(long, env = "FLEETGATE_MQTT_PASSWORD_FILE")]
    pub mqtt_password_file: Option<PathBuf>,
    /// MQTT client ID prefix (the node ID follows).
    #[arg(long, env = "FLEETGATE_MQTT_CLIENT_ID_PREFIX")]
    pub mqtt_client_id_prefix: Option<String>,
    /// Comma-separated filters /v1/mqtt clients may subscribe to.
    #[arg(long, env = "FLEETGATE_MQTT_SUBSCRIBE_ACL", value_delimiter = ',')]
    pub mqtt_subscribe_acl: Option<Vec<String>>,
    /// Comma-separated topics /v1/mqtt clients may publish on.
    #[arg(long, env = "FLEETGATE_MQTT_PUBLISH_ACL", value_delimiter = ',')]
    pub mqtt_publish_acl: Option<Vec<String>>,
    /// Milliseconds an MQTT device may publish nothing before it reads as offline.
    #[arg(long, env = "FLEETGATE_MQTT_DEVICE_IDLE_MS")]
    pub mqtt_device_idle_ms: Option<u64>,
}

impl MqttSettings {
    /// Layers the env and flags on top: an empty URL unsets it, empty ACL items are skipped.
    pub(super) fn apply(&mut self, o: &MqttOverrides) {
        if let Some(url) = &o.mqtt_url {
            self.url = Some(url.trim().to_owned()).filter(|u| !u.is_empty());
        }
        if o.mqtt_username.is_some() {
            self.username = o.mqtt_username.clone();
        }
        if o.mqtt_password_file.is_some() {
            self.password_file = o.mqtt_password_file.clone();
        }
        if let Some(prefix) = &o.mqtt_client_id_prefix {
            self.client_id_prefix = prefix.clone();
        }
        if let Some(v) = &o.mqtt_subscribe_acl {
            self.subscribe_acl = super::trimmed(v);
        }
        if let Some(v) = &o.mqtt_publish_acl {
            self.publish_acl = super::trimmed(v);
        }
        if let Some(ms) = o.mqtt_device_idle_ms {
            self.device_idle_ms = ms;
        }
    }

    fn acl(&self) -> anyhow::Result<fleetgate_mqtt::TopicAcl> {
        fleetgate_mqtt::TopicAcl::parse(&self.subscribe_acl, &self.publish_acl)
            .context("mqtt subscribe_acl / publish_acl")
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        self.acl()?;
        if let Some(url) = &self.url {
            fleetgate_mqtt::BrokerAddr::parse(url).context("mqtt url")?;
        }
        if self.password_file.is_some() && self.username.is_none() {
            bail!("mqtt password_file needs mqtt username");
        }
        if self.device_idle_ms == 0 {
            bail!("mqtt device_idle_ms must be > 0");
        }
        Ok(())
    }

    /// The bridge's config and the ACLs, with the password file read; `None` when no broker
    /// is configured.
    ///
    /// # Errors
    /// A bad URL or ACL pattern, or an unreadable password file.
    pub fn bridge(
        &self,
        node_id: &str,
        max_frame_bytes: usize,
    ) -> anyhow::Result<Option<(fleetgate_mqtt::BridgeConfig, fleetgate_mqtt::TopicAcl)>> {
        let acl = self.acl()?;
        let Some(url) = &self.url else {
            return Ok(None);
        };
        let broker = fleetgate_mqtt::BrokerAddr::parse(url).context("mqtt url")?;
        let client_id = format!("{}{node_id}", self.client_id_prefix);
        let mut config = fleetgate_mqtt::BridgeConfig::new(broker, client_id);
        config.username = self.username.clone();
        if let Some(path) = &self.password_file {
            let text = crate::secret_files::read_secret(path)?;
            config.password = Some(text.trim_end_matches(['\r', '\n']).to_owned());
        }
        config.max_packet_bytes = max_frame_bytes;
        Ok(Some((config, acl)))
    }
}
