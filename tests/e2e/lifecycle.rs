//! Session lifecycle: replacement, heartbeat timeout, drain, operator disconnect, health.

use serde_json::json;

use crate::support::{Node, Raw, eventually, status};

#[tokio::test]
async fn a_newer_connection_replaces_the_older_with_4409() {
    let node = Node::start(&[]).await;
    let secret = node.provision("twin").await;
    let mut old = Raw::authed(&node.device_url(), "twin", &secret).await;
    let mut new = Raw::authed(&node.device_url(), "twin", &secret).await;
    assert_eq!(old.closed().await.code, 4409);
    new.send(status("twin", "n1", 1, json!({}))).await;
    assert_eq!(
        new.recv().await["type"],
        "ack",
        "the newer connection keeps working"
    );
    let (_, dev) = node.admin("GET", "/v1/devices/twin", None).await;
    assert_eq!(
        dev["online"], true,
        "presence belongs to the newer connection"
    );
}

#[tokio::test]
async fn a_silent_device_is_closed_with_4001() {
    let node = Node::start(&[
        ("FLEETGATE_HEARTBEAT_MS", "100"),
        ("FLEETGATE_IDLE_TIMEOUT_MS", "400"),
    ])
    .await;
    let secret = node.provision("mute").await;
    // Reading nothing means answering no ping: the server sees silence.
    let mut raw = Raw::authed(&node.device_url(), "mute", &secret).await;
    let (_, dev) = node.admin("GET", "/v1/devices/mute", None).await;
    assert_eq!(dev["online"], true);
    eventually("idle timeout", || async {
        let (_, dev) = node.admin("GET", "/v1/devices/mute", None).await;
        (dev["online"] == false).then_some(())
    })
    .await;
    assert_eq!(raw.closed().await.code, 4001);
}

#[tokio::test]
async fn pongs_keep_a_quiet_device_alive() {
    let node = Node::start(&[
        ("FLEETGATE_HEARTBEAT_MS", "100"),
        ("FLEETGATE_IDLE_TIMEOUT_MS", "400"),
    ])
    .await;
    let secret = node.provision("pong").await;
    let mut raw = Raw::authed(&node.device_url(), "pong", &secret).await;
    // Reading for 1.2 s answers the server's pings (tungstenite replies to each one).
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(1200), raw.next()).await;
    assert!(
        quiet.is_err(),
        "no frame and no close while pongs flow: {quiet:?}"
    );
    raw.send(status("pong", "alive", 1, json!({}))).await;
    assert_eq!(raw.recv().await["type"], "ack");
}

#[tokio::test]
async fn sigterm_drains_with_1012_and_retry_after_then_exits_cleanly() {
    drains_with_1012(Trigger::Sigterm).await;
}

/// Kubernetes' preStop hook: `GET /drain` on the internal listener drains as SIGTERM does.
#[tokio::test]
async fn get_drain_on_the_internal_listener_drains_as_sigterm_does() {
    drains_with_1012(Trigger::DrainEndpoint).await;
}

enum Trigger {
    Sigterm,
    DrainEndpoint,
}

async fn drains_with_1012(trigger: Trigger) {
    let mut node = Node::start(&[("FLEETGATE_DRAIN_PERIOD_MS", "1500")]).await;
    let mut sockets = Vec::new();
    for i in 0..3 {
        let id = format!("drain-{i}");
        let secret = node.provision(&id).await;
        sockets.push(Raw::authed(&node.device_url(), &id, &secret).await);
    }
    let (code, _) = node.internal_get("/readyz").await;
    assert_eq!(code, 200);
    match trigger {
        Trigger::Sigterm => node.signal("TERM"),
        Trigger::DrainEndpoint => {
            let (code, body) = node.internal_get("/drain").await;
            assert_eq!((code, body.as_str()), (202, "draining"));
        }
    }
    eventually("readiness off", || async {
        (node.internal_get("/readyz").await.0 == 503).then_some(())
    })
    .await;
    let (_, metrics) = node.internal_get("/metrics").await;
    assert!(
        metrics.lines().any(|l| l == "fleetgate_ready 0"),
        "{metrics}"
    );
    let refused = Raw::try_connect(&node.device_url(), &[]).await.err();
    assert_eq!(refused, Some(503), "no new upgrades while draining");
    for mut s in sockets {
        let closed = s.closed().await;
        assert_eq!(closed.code, 1012, "{closed:?}");
        assert!(closed.reason.contains("retry-after="), "{closed:?}");
    }
    let exit = node.wait_exit().await;
    assert!(exit.success(), "clean exit after drain: {exit:?}");
}

#[tokio::test]
async fn operator_disconnect_closes_with_1000() {
    let node = Node::start(&[]).await;
    let secret = node.provision("kick").await;
    let mut raw = Raw::authed(&node.device_url(), "kick", &secret).await;
    let (status, _) = node
        .admin("POST", "/v1/devices/kick/disconnect", None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(raw.closed().await.code, 1000);
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served_on_the_internal_listener() {
    let node = Node::start(&[("FLEETGATE_MAX_CONNECTIONS", "50")]).await;
    let secret = node.provision("m1").await;
    let mut raw = Raw::authed(&node.device_url(), "m1", &secret).await;
    for i in 0..3 {
        raw.send(status("m1", &format!("q{i}"), 1, json!({"t": i})))
            .await;
        assert_eq!(raw.recv().await["type"], "ack");
    }
    assert_eq!(node.internal_get("/healthz").await.0, 200);
    assert_eq!(node.internal_get("/readyz").await.0, 200);
    let (code, text) = node.internal_get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        text.lines().any(|l| l == "fleetgate_connections_active 1"),
        "{text}"
    );
    assert!(text.contains("fleetgate_auth_success_total 1"), "{text}");
    // What the chart's alerts divide and compare.
    assert_eq!(sample(&text, "fleetgate_ready"), 1.0, "{text}");
    assert_eq!(sample(&text, "fleetgate_connections_max"), 50.0, "{text}");
    assert_eq!(
        sample(&text, "fleetgate_ack_latency_seconds_count"),
        3.0,
        "one observation per acked QoS 1 message: {text}"
    );
    let rss = sample(&text, "process_resident_memory_bytes");
    assert!(rss > 1024.0 * 1024.0, "resident memory {rss}: {text}");
    let fds = sample(&text, "process_open_fds");
    assert!(fds > 0.0, "open fds {fds}: {text}");
}

/// The value of the unlabelled sample `name` in a `/metrics` text; panics when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name}: {text}"))
}
