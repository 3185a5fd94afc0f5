//! A node's message receiver as the backends hold it: sends never wait, and a receiver
//! that lost messages is told so with [`NodeMessage::Resync`] before anything else.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::NodeMessage;

/// The receiver is gone.
pub(crate) struct Closed;

/// The sending half of one node's channel.
pub(crate) struct NodeTx {
    tx: mpsc::Sender<NodeMessage>,
    /// Messages were lost since the receiver last heard: it is owed a `Resync`.
    gap: bool,
}

impl NodeTx {
    pub(crate) fn new(tx: mpsc::Sender<NodeMessage>) -> Self {
        Self { tx, gap: false }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Delivers `message` (after an owed `Resync`) without waiting. A full receiver loses it
    /// (counted in `dropped`) and is owed a `Resync`.
    pub(crate) fn send(&mut self, message: NodeMessage, dropped: &AtomicU64) -> Result<(), Closed> {
        if !self.flush()? {
            dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        match self.tx.try_send(message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                self.gap = true;
                Ok(())
            }
            Err(TrySendError::Closed(_)) => Err(Closed),
        }
    }

    /// Messages may have been lost upstream: owe a `Resync`, sent now if there is room.
    pub(crate) fn resync(&mut self) -> Result<(), Closed> {
        self.gap = true;
        self.flush().map(|_| ())
    }

    /// Sends an owed `Resync`; `Ok(false)` if the receiver is still full.
    fn flush(&mut self) -> Result<bool, Closed> {
        if !self.gap {
            return Ok(true);
        }
        match self.tx.try_send(NodeMessage::Resync) {
            Ok(()) => {
                self.gap = false;
                Ok(true)
            }
            Err(TrySendError::Full(_)) => Ok(false),
            Err(TrySendError::Closed(_)) => Err(Closed),
        }
    }
}
