//! Gives memory freed after a burst back to the system.
//!
//! glibc's malloc keeps freed memory inside its arenas when it is not at the top of the heap,
//! and a connect burst leaves exactly that: short-lived buffers (hyper's 8 KiB request-head
//! buffer of every handshake in flight, held while header auth asks the registry) freed
//! between the long-lived allocations of the sessions they created. The live heap per idle
//! device is the same in both auth modes (measured with heaptrack at 10,000 devices); the
//! resident set was not, by about the burst's peak. `malloc_trim` returns whole free pages
//! inside the arenas. It holds each arena's lock while it walks that arena's free chunks, and
//! pages it returns are faulted in again when reused, so it runs only once a burst is over:
//! when a check (`mallinfo2`, cheap next to the walk) shows a burst's worth of free bytes and
//! a live heap that stopped growing since the previous check (trimming in the middle of a
//! connect burst cost ~12% of the connect rate, measured).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the free bytes in the arenas are checked.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Free bytes held in the arenas above which they are trimmed.
const TRIM_ABOVE: usize = 8 << 20;
/// Growth of the live heap between two checks that still counts as settled.
const SETTLED: usize = 1 << 20;

/// Runs until `stop`: checks the arenas every [`CHECK_EVERY`] and trims them as
/// [`trim_if_settled`] decides.
pub async fn run(stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_live = usize::MAX;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Both calls take arena locks and walk memory: off the async workers.
        match tokio::task::spawn_blocking(move || trim_if_settled(last_live)).await {
            Ok(live) => last_live = live,
            Err(_) => return,
        }
    }
}

/// Trims when the arenas hold more than [`TRIM_ABOVE`] free bytes and the live heap grew by
/// at most [`SETTLED`] since `last_live`; returns the live heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_if_settled(last_live: usize) -> usize {
    // SAFETY: both are plain glibc calls without arguments that point anywhere.
    let info = unsafe { libc::mallinfo2() };
    if info.fordblks > TRIM_ABOVE && info.uordblks <= last_live.saturating_add(SETTLED) {
        // SAFETY: as above; 0 keeps no pad at the top of the heap.
        unsafe { libc::malloc_trim(0) };
    }
    info.uordblks
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_if_settled(_last_live: usize) -> usize {
    0
}
