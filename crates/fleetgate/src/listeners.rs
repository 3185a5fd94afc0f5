//! The node's listening sockets: bound with a deep backlog, served plain or over TLS as the
//! settings say, with the TLS files watched for changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleetgate_tls::{Acceptor, ServerTls, TlsMetrics};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::settings::{Listener, Settings};

/// Binds with a deep accept backlog: a connect storm overflows tokio's default queue and
/// refused clients only retry after a second.
fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("listen address {addr}"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket.listen(8192)?)
}

/// The TLS state of every listener, for metrics and reloads.
#[derive(Default)]
pub struct Listeners {
    metrics: TlsMetrics,
    tls: Vec<Arc<ServerTls>>,
}

impl Listeners {
    /// Registers the TLS metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let listeners = Self::default();
        listeners.metrics.register(registry);
        listeners
    }

    /// Binds `which` at `addr`; returns the acceptor and the bound address.
    ///
    /// # Errors
    /// The address cannot be bound, or its TLS files are incomplete or unusable.
    pub fn bind(
        &mut self,
        settings: &Settings,
        which: Listener,
        addr: &str,
    ) -> anyhow::Result<(Acceptor, SocketAddr)> {
        let tcp = bind(addr)?;
        let local = tcp.local_addr()?;
        let acceptor = match settings.tls.files(which)? {
            Some(files) => {
                let tls = ServerTls::load(which.name(), files)
                    .with_context(|| format!("the {} listener's TLS files", which.name()))?;
                self.metrics.observe(&tls);
                tracing::info!(message = "TLS", listener = which.name(), %local, mtls = tls.files().client_ca.is_some(), not_after = tls.not_after());
                self.tls.push(tls.clone());
                Acceptor::tls(
                    tcp,
                    tls,
                    settings.tls.handshake_limits(),
                    self.metrics.clone(),
                )?
            }
            None => {
                // Behind a TLS-terminating ingress plain is right; anywhere else credentials
                // would cross the network in the clear.
                if which != Listener::Internal && !local.ip().is_loopback() {
                    tracing::warn!(
                        message = "listener is plain (no TLS) on a non-loopback address: terminate TLS in front of it or set its certificate and key",
                        listener = which.name(),
                        %local
                    );
                }
                Acceptor::plain(tcp)?
            }
        };
        Ok((acceptor, local))
    }

    /// Checks every TLS listener's files each `every` until `stop`, swapping in changed ones.
    pub fn watch(&self, every: Duration, stop: &CancellationToken) {
        for tls in &self.tls {
            let metrics = self.metrics.clone();
            let tls = tls.clone();
            crate::reload::every("TLS certificate", every, stop, move || {
                match tls.reload_if_changed() {
                    Ok(reloaded) => {
                        metrics.observe(&tls);
                        Ok(reloaded)
                    }
                    Err(error) => {
                        metrics.reload_failed(tls.name());
                        Err(error).with_context(|| format!("the {} listener", tls.name()))
                    }
                }
            });
        }
    }
}
