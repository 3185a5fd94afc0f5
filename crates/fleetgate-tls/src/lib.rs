//! TLS for fleetgate's listeners: rustls server configs built from PEM files (TLS 1.2 and
//! 1.3 only, ALPN `http/1.1`), reloaded when the files change without touching established
//! sessions; handshakes run off the accept loop with a timeout and a cap; client
//! certificates are verified against a CA bundle (and CRLs) and handed to handlers as a
//! [`Peer`] with the [`ClientCert`] a device is identified by.

mod cert;
mod config;
mod listener;
mod metrics;
mod stream;

pub use cert::{ClientCert, IdentitySource};
pub use config::{ClientAuth, ServerTls, TlsError, TlsFiles};
pub use listener::{Acceptor, Gate, HandshakeLimits, Io, Peer};
pub use metrics::TlsMetrics;
pub use stream::TlsStream;
