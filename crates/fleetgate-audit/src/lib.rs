//! fleetgate's audit log: append-only, hash-chained, with signed checkpoints.
//!
//! Each entry holds the SHA-256 of the previous entry's canonical text ([`Entry::prev`]), so
//! editing, deleting, inserting or reordering entries breaks the chain where it happened.
//! Every [`AuditConfig::checkpoint_interval`] the writer appends a checkpoint: an Ed25519
//! signature of the last entry's sequence number and hash. A copy exported elsewhere can then
//! be verified offline with the public key ([`verify_export`]), and proves that the log was not
//! rewritten afterwards even by someone with write access to the store, who does not hold the
//! signing key. The log lives in the bus ([`fleetgate_bus::Bus::audit_append`] makes each append
//! conditional on the head, so writers in many processes form one chain).

mod chain;
mod entry;
mod export;
mod log;
mod sign;
mod verify;

pub use chain::{Head, hash_text};
/// The public key type checkpoints verify with.
pub use ed25519_dalek::VerifyingKey;
pub use entry::{Checkpoint, Draft, Entry, GENESIS, Stage};
pub use export::{ExportError, export_line, verify_export};
pub use log::{AuditConfig, AuditError, AuditLog};
pub use sign::{
    KeyError, Signer, checkpoint_statement, kid_of, public_key_from_pem, verify_signature,
};
pub use verify::{Break, Report, Verifier};
