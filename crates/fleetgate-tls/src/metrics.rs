//! TLS metrics: handshakes, refusals, and when each served certificate expires.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::ServerTls;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabel {
    listener: String,
    /// `refused` (bad certificate, no shared version or suite, not TLS), `timeout`, `busy`.
    reason: &'static str,
}

#[derive(Default, Debug)]
struct Inner {
    handshakes: Family<ListenerLabel, Counter>,
    failures: Family<FailureLabel, Counter>,
    expiry: Family<ListenerLabel, Gauge>,
    reload_errors: Family<ListenerLabel, Counter>,
}

/// The TLS metrics of every listener of a process; cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct TlsMetrics(Arc<Inner>);

impl TlsMetrics {
    /// Registers the metrics under `fleetgate_tls_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fleetgate_tls_handshakes",
            "Completed TLS handshakes",
            self.0.handshakes.clone(),
        );
        registry.register(
            "fleetgate_tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            self.0.failures.clone(),
        );
        registry.register(
            "fleetgate_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate each listener serves, Unix seconds",
            self.0.expiry.clone(),
        );
        registry.register(
            "fleetgate_tls_reload_errors",
            "Reloads of changed TLS files that failed (the previous material stays in use)",
            self.0.reload_errors.clone(),
        );
    }

    fn label(listener: &str) -> ListenerLabel {
        ListenerLabel {
            listener: listener.to_owned(),
        }
    }

    pub(crate) fn handshake_done(&self, listener: &str) {
        self.0
            .handshakes
            .get_or_create(&Self::label(listener))
            .inc();
    }

    pub(crate) fn handshake_failed(&self, listener: &str, reason: &'static str) {
        self.0
            .failures
            .get_or_create(&FailureLabel {
                listener: listener.to_owned(),
                reason,
            })
            .inc();
    }

    /// Records `tls`'s certificate expiry (call after a load or reload).
    pub fn observe(&self, tls: &ServerTls) {
        self.0
            .expiry
            .get_or_create(&Self::label(tls.name()))
            .set(tls.not_after());
    }

    /// Counts a failed reload of `listener`'s files.
    pub fn reload_failed(&self, listener: &str) {
        self.0
            .reload_errors
            .get_or_create(&Self::label(listener))
            .inc();
    }
}
