//! A session's bounded outbox. tokio's mpsc would allocate its channel and a 32-slot block up
//! front (about 1 KiB per idle session, measured); this one is a mutex-guarded `VecDeque`
//! that allocates only while messages wait, plus a `Notify`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The outbox holds `capacity` messages already.
    Full,
    /// The session is gone (or was dropped as a slow consumer).
    Closed,
}

/// A bounded multi-producer, single-consumer queue.
pub(crate) struct Outbox<T> {
    queue: Mutex<VecDeque<T>>,
    notify: Notify,
    closed: AtomicBool,
    capacity: usize,
}

impl<T> Outbox<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        // Each critical section is one push or pop: a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` without waiting.
    pub(crate) fn try_push(&self, item: T) -> Result<(), PushError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        {
            let mut q = self.lock();
            if q.len() >= self.capacity {
                return Err(PushError::Full);
            }
            q.push_back(item);
        }
        // A permit is stored when the consumer is not waiting yet, so no wake-up is lost.
        self.notify.notify_one();
        Ok(())
    }

    /// What is still queued, once closed: a session that ends hands on what it will not read.
    pub(crate) fn take_rest(&self) -> Vec<T> {
        self.lock().drain(..).collect()
    }

    /// Closes the outbox: pushes fail and `recv` returns `None` at once (a closed session has
    /// no use for what is left).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// The next message; `None` once closed. Cancel-safe: a message is taken only when this
    /// returns it.
    pub(crate) async fn recv(&self) -> Option<T> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(item) = self.lock().pop_front() {
                return Some(item);
            }
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn bounded_fifo_then_closed() {
        let o = Outbox::new(2);
        assert_eq!(o.try_push(1), Ok(()));
        assert_eq!(o.try_push(2), Ok(()));
        assert_eq!(o.try_push(3), Err(PushError::Full));
        assert_eq!(o.recv().await, Some(1));
        assert_eq!(o.try_push(3), Ok(()));
        assert_eq!(o.recv().await, Some(2));
        assert_eq!(o.recv().await, Some(3));
        o.close();
        assert_eq!(o.try_push(4), Err(PushError::Closed));
        assert_eq!(o.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_by_push_and_by_close() {
        let o = Arc::new(Outbox::new(4));
        let consumer = tokio::spawn({
            let o = o.clone();
            async move { (o.recv().await, o.recv().await) }
        });
        tokio::task::yield_now().await;
        o.try_push(7).unwrap();
        tokio::task::yield_now().await;
        o.close();
        let (first, second) = tokio::time::timeout(std::time::Duration::from_secs(5), consumer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((first, second), (Some(7), None));
    }

    #[tokio::test]
    async fn no_wake_up_is_lost_between_check_and_wait() {
        let o = Arc::new(Outbox::new(100_000));
        let producer = tokio::spawn({
            let o = o.clone();
            async move {
                for i in 0..10_000u32 {
                    while o.try_push(i).is_err() {
                        tokio::task::yield_now().await;
                    }
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        });
        for want in 0..10_000u32 {
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), o.recv())
                .await
                .expect("no lost wake-up");
            assert_eq!(got, Some(want));
        }
        producer.await.unwrap();
    }
}
