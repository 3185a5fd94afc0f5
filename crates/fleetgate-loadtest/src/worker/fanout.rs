//! Fanout app subscribers: each connects to `/v1/app` with the API key, subscribes to
//! `channels_per_app` device channels and counts what arrives until the run ends, timing each frame from the
//! device's send (`sentUs` in the payload; load generator and node share the clock).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetgate_device::AppClient;
use goose::prelude::*;

use super::{Ctx, reason_of};
use crate::tally::{Tally, now_ms};
use crate::wire::Phase;

/// Microseconds since the Unix epoch.
pub(super) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One app subscriber's whole life.
pub(super) async fn watch(ctx: Arc<Ctx>, user: &mut GooseUser) -> TransactionResult {
    let n = ctx.next_app.fetch_add(1, Ordering::Relaxed);
    if n >= ctx.apps.len() {
        return Ok(());
    }
    let j = ctx.apps.start + n;
    ctx.reached(Phase::Connect).await;
    let spec = &ctx.spec;
    let k = spec.channels_per_app;
    let channels: Vec<String> = (0..k)
        .map(|i| format!("device:{}", spec.device_id((j * k + i) % spec.devices)))
        .collect();
    let permit = ctx.connect_slots.acquire().await.expect("never closed");
    ctx.connect_pacer.wait().await;
    let started = Instant::now();
    let key = spec.api_key.clone().unwrap_or_default();
    let connected = async {
        let mut app = AppClient::connect(spec.app_url(j), &key).await?;
        for channel in &channels {
            app.subscribe(channel).await?;
        }
        Ok::<_, fleetgate_device::AppError>(app)
    }
    .await;
    drop(permit);
    ctx.live.connect_done.fetch_add(1, Ordering::Relaxed);
    let mut app = match connected {
        Ok(app) => {
            ctx.tally(|t| t.add("apps_connected", 1));
            user.record_custom_request_duration("WS", "app", started.elapsed(), true, None, None)
                .await?;
            app
        }
        Err(e) => {
            let why = reason_of(&e.to_string());
            ctx.tally(|t| t.add(&format!("app_failed:{why}"), 1));
            user.record_custom_request_duration(
                "WS",
                "app",
                started.elapsed(),
                false,
                None,
                Some(&why),
            )
            .await?;
            return Ok(());
        }
    };
    ctx.reached(Phase::Run).await;
    let mut local = Tally::default();
    let mut frames = 0u64;
    loop {
        tokio::select! {
            // Only the send time is decoded: parsing every frame whole would make the load
            // generator, not the node, the bottleneck.
            text = app.next_text() => match text {
                Ok(text) => match number_after(&text, "\"sentUs\":") {
                    Some(sent) => {
                        frames += 1;
                        local.latency("delivery", Duration::from_micros(now_us().saturating_sub(sent)));
                        if frames == 1 {
                            local.mark("delivered", now_ms());
                        }
                    }
                    None if text.contains("\"gap_too_old\"") => local.add("app_gaps", 1),
                    None => {}
                },
                Err(e) => {
                    local.add(&format!("app_closed:{}", reason_of(&e.to_string())), 1);
                    break;
                }
            },
            // Frames sent before the settle phase may still be on their way: read until
            // the socket has been quiet for a second (at most ten).
            () = ctx.reached(Phase::Settle) => {
                let until = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let quiet = tokio::time::sleep(Duration::from_secs(1));
                    tokio::select! {
                        text = app.next_text() => match text {
                            Ok(text) if text.contains("\"sentUs\":") => frames += 1,
                            Ok(_) => {}
                            Err(_) => break,
                        },
                        () = quiet => break,
                    }
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                }
                break;
            }
        }
    }
    local.mark("delivered", now_ms());
    local.add("app_frames", frames);
    ctx.tally(|t| t.merge(&local));
    ctx.reached(Phase::Finish).await;
    Ok(())
}

/// The unsigned integer right after `key` in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_send_time_is_read_without_parsing_the_frame() {
        let frame = r#"{"type":"message","channel":"device:d","offset":3,"data":{"payload":{"seq":1,"sentUs":1764673200123456,"pad":""}}}"#;
        assert_eq!(
            super::number_after(frame, "\"sentUs\":"),
            Some(1_764_673_200_123_456)
        );
        assert_eq!(super::number_after(frame, "\"nope\":"), None);
    }
}
