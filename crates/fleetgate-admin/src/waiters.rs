//! REST calls waiting for a command's result. One listener task per admin process reads the
//! process's node channel and completes the waiting call by msgid. When the bus says messages
//! may have been lost ([`NodeMessage::Resync`]), the listener reads every pending call's
//! stored result instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fleetgate_bus::{Bus, BusError, CommandOutcome, NodeMessage};
use tokio::sync::oneshot;
use tracing::warn;

/// Per msgid: the device (to read a stored result) and the waiting call.
type Pending = Arc<Mutex<HashMap<String, (String, oneshot::Sender<CommandOutcome>)>>>;

/// The calls waiting for results, by msgid.
pub(crate) struct Waiters {
    pending: Pending,
}

/// Removes its entry when the waiting call ends, however it ends.
pub(crate) struct Wait {
    pending: Pending,
    msgid: String,
    rx: Option<oneshot::Receiver<CommandOutcome>>,
}

impl Wait {
    /// The outcome, once the device answers (or the command fails).
    pub(crate) async fn outcome(&mut self) -> Option<CommandOutcome> {
        match self.rx.as_mut() {
            Some(rx) => rx.await.ok(),
            None => None,
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.msgid);
    }
}

fn lock(
    p: &Pending,
) -> std::sync::MutexGuard<'_, HashMap<String, (String, oneshot::Sender<CommandOutcome>)>> {
    // Every critical section is one map operation, so a poisoned map is still consistent.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Waiters {
    pub(crate) async fn start(bus: Arc<dyn Bus>, node_id: &str) -> Result<Self, BusError> {
        let mut rx = bus.node_subscribe(node_id).await?;
        let pending: Pending = Arc::default();
        let listener = pending.clone();
        let node_id = node_id.to_owned();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Some(NodeMessage::CommandResult { msgid, outcome, .. }) => {
                        complete(&listener, &msgid, outcome);
                    }
                    Some(NodeMessage::Resync) => {
                        tokio::spawn(read_back(bus.clone(), listener.clone()));
                    }
                    Some(_) => {}
                    None => {
                        // The bus dropped our subscription; take a new one so waits keep working.
                        match bus.node_subscribe(&node_id).await {
                            Ok(new) => rx = new,
                            Err(error) => {
                                warn!(message = "admin result listener lost its subscription", %error);
                                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            }
                        }
                    }
                }
                if Arc::strong_count(&listener) == 1 {
                    break;
                }
            }
        });
        Ok(Self { pending })
    }

    /// Registers interest in `msgid`'s outcome. Register before the command is queued, so
    /// a fast answer cannot be missed.
    pub(crate) fn wait(&self, device: &str, msgid: &str) -> Wait {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(msgid.to_owned(), (device.to_owned(), tx));
        Wait {
            pending: self.pending.clone(),
            msgid: msgid.to_owned(),
            rx: Some(rx),
        }
    }
}

fn complete(pending: &Pending, msgid: &str, outcome: CommandOutcome) {
    if let Some((_, tx)) = lock(pending).remove(msgid) {
        let _ = tx.send(outcome);
    }
}

/// Completes every pending call whose result is stored: its message may have been lost.
async fn read_back(bus: Arc<dyn Bus>, pending: Pending) {
    let waiting: Vec<(String, String)> = lock(&pending)
        .iter()
        .map(|(msgid, (device, _))| (device.clone(), msgid.clone()))
        .collect();
    for (device, msgid) in waiting {
        match bus.result_get(&device, &msgid).await {
            Ok(Some(outcome)) => complete(&pending, &msgid, outcome),
            Ok(None) => {}
            Err(error) => {
                // The calls still end by their deadline, which reads the result once more.
                warn!(message = "could not read back command results", %error);
                return;
            }
        }
    }
}
