//! Abuse limits: failed authentications throttled per source address and per device ID (from
//! a source), sockets waiting for their auth frame capped per source, admin logins throttled,
//! and the client certificate header believed only from trusted proxies.

use std::net::SocketAddr;

use serde_json::json;
use tokio::net::TcpSocket;

use crate::support::{Node, Raw};

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.x).
async fn tcp_from(from: &str, addr: &str) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from}:0").parse::<SocketAddr>().unwrap())
        .unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// The upgrade's status from `from` with `headers`: 101 or the refusal.
async fn upgrade_from(node: &Node, from: &str, headers: &[(&str, &str)]) -> (u16, Option<Raw>) {
    let tcp = tcp_from(from, &node.gateway).await;
    match Raw::try_connect_over(Box::new(tcp), &node.device_url(), headers).await {
        Ok(raw) => (101, Some(raw)),
        Err(status) => (status, None),
    }
}

#[tokio::test]
async fn a_failing_source_is_refused_unexamined_and_other_sources_are_not() {
    let node = Node::start(&[
        ("FLEETGATE_AUTH_FAILURE_BURST_PER_SOURCE", "5"),
        ("FLEETGATE_AUTH_FAILURE_REFILL_PER_SOURCE_MS", "60000"),
    ])
    .await;
    let secret = node.provision("abuse-good").await;
    let good = format!("Bearer {secret}");
    for i in 0..5 {
        let id = format!("abuse-{i}");
        let (status, _) = upgrade_from(
            &node,
            "127.0.0.3",
            &[("Device-ID", &id), ("Authorization", "Bearer wrong-secret")],
        )
        .await;
        assert_eq!(status, 401, "failure {i}");
    }
    // The sixth attempt is refused before its (good) credentials are looked at: the
    // connection is closed right after accept, with no HTTP answer (status 0 here).
    let (status, _) = upgrade_from(
        &node,
        "127.0.0.3",
        &[("Device-ID", "abuse-good"), ("Authorization", &good)],
    )
    .await;
    assert_eq!(status, 0);
    let (status, raw) = upgrade_from(
        &node,
        "127.0.0.4",
        &[("Device-ID", "abuse-good"), ("Authorization", &good)],
    )
    .await;
    assert_eq!(status, 101, "another source is not affected");
    assert_eq!(raw.unwrap().recv().await["status"], "success");
    let (_, metrics) = node.internal_get("/metrics").await;
    assert!(
        metrics.contains("fleetgate_auth_throttled_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_device_id_retried_with_bad_credentials_is_closed_with_4429_without_locking_it_out() {
    let node = Node::start(&[
        ("FLEETGATE_AUTH_FAILURE_BURST_PER_DEVICE", "3"),
        ("FLEETGATE_AUTH_FAILURE_REFILL_PER_DEVICE_MS", "60000"),
    ])
    .await;
    let secret = node.provision("abuse-dev").await;
    let attempt = |from: &'static str, token: String| {
        let node = &node;
        async move {
            let (_, raw) = upgrade_from(node, from, &[]).await;
            let mut raw = raw.expect("upgrade");
            raw.send(json!({"type":"auth","deviceId":"abuse-dev","token":token}))
                .await;
            match raw.next().await {
                Ok(resp) => (Some(resp), raw.closed().await),
                Err(closed) => (None, closed),
            }
        }
    };
    for _ in 0..3 {
        let (resp, closed) = attempt("127.0.0.5", "wrong".into()).await;
        assert_eq!(resp.unwrap()["status"], "error");
        assert_eq!(closed.code, 4403);
    }
    let (resp, closed) = attempt("127.0.0.5", secret.clone()).await;
    assert!(resp.is_none(), "no auth_response when throttled: {resp:?}");
    assert_eq!(closed.code, 4429);
    assert!(
        fleetgate_protocol::parse_retry_after(&closed.reason).is_some(),
        "{}",
        closed.reason
    );
    // The device itself, from its own address, is not locked out by the failures above.
    let (_, raw) = upgrade_from(&node, "127.0.0.6", &[]).await;
    let mut raw = raw.unwrap();
    raw.send(json!({"type":"auth","deviceId":"abuse-dev","token":secret}))
        .await;
    assert_eq!(raw.recv().await["status"], "success");
}

#[tokio::test]
async fn sockets_waiting_for_auth_are_capped_per_source() {
    let node = Node::start(&[("FLEETGATE_MAX_PENDING_AUTH_PER_SOURCE", "2")]).await;
    let (a, first) = upgrade_from(&node, "127.0.0.7", &[]).await;
    let (b, _second) = upgrade_from(&node, "127.0.0.7", &[]).await;
    assert_eq!((a, b), (101, 101));
    let (third, _) = upgrade_from(&node, "127.0.0.7", &[]).await;
    assert_eq!(third, 429);
    let (other, _) = upgrade_from(&node, "127.0.0.8", &[]).await;
    assert_eq!(other, 101, "another source has its own budget");
    // Authenticating frees the slot.
    let secret = node.provision("pend-1").await;
    let mut first = first.unwrap();
    first
        .send(json!({"type":"auth","deviceId":"pend-1","token":secret}))
        .await;
    assert_eq!(first.recv().await["status"], "success");
    let (again, _) = upgrade_from(&node, "127.0.0.7", &[]).await;
    assert_eq!(again, 101);
}

#[tokio::test]
async fn admin_logins_are_throttled_per_user_and_address() {
    let node = Node::start(&[
        ("FLEETGATE_LOGIN_FAILURE_BURST", "3"),
        ("FLEETGATE_LOGIN_FAILURE_REFILL_MS", "60000"),
    ])
    .await;
    let login = |user: &str| {
        let body = json!({"username": user, "password": "not-the-password"});
        node.admin_with_key("POST", "/v1/auth/login", Some(body), None)
    };
    for _ in 0..3 {
        assert_eq!(login("mallory").await.0, 401);
    }
    let (status, body) = login("mallory").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_failures");
    // The address is spent too: another username from it waits as well.
    assert_eq!(login("trent").await.0, 429);
}

#[tokio::test]
async fn a_client_certificate_header_is_believed_only_from_a_trusted_proxy() {
    let cert = {
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fwd-dev");
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    };
    // nginx's $ssl_client_escaped_cert: the PEM, URL-encoded.
    let escaped: String = cert
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    let node = Node::start(&[
        ("FLEETGATE_TRUSTED_PROXIES", "127.0.0.9"),
        ("FLEETGATE_CLIENT_CERT_HEADER", "X-Client-Cert"),
    ])
    .await;
    let headers = [
        ("Device-ID", "fwd-dev"),
        ("X-Client-Cert", escaped.as_str()),
    ];
    let (status, _) = upgrade_from(&node, "127.0.0.10", &headers).await;
    assert_eq!(
        status, 403,
        "the header from a peer that is not a trusted proxy"
    );
    let (status, raw) = upgrade_from(&node, "127.0.0.9", &headers).await;
    assert_eq!(status, 101);
    assert_eq!(raw.unwrap().recv().await["status"], "success");
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_throttled_with_429() {
    let node = Node::start(&[
        ("FLEETGATE_TRUSTED_PROXIES", "127.0.0.11"),
        ("FLEETGATE_AUTH_FAILURE_BURST_PER_SOURCE", "3"),
        ("FLEETGATE_AUTH_FAILURE_REFILL_PER_SOURCE_MS", "60000"),
    ])
    .await;
    let attempt = |client: &'static str| {
        let node = &node;
        async move {
            let headers = [
                ("X-Forwarded-For", client),
                ("Device-ID", "proxied"),
                ("Authorization", "Bearer wrong"),
            ];
            upgrade_from(node, "127.0.0.11", &headers).await.0
        }
    };
    for _ in 0..3 {
        assert_eq!(attempt("198.51.100.1").await, 401);
    }
    assert_eq!(
        attempt("198.51.100.1").await,
        429,
        "the client behind the proxy"
    );
    assert_eq!(
        attempt("198.51.100.2").await,
        401,
        "another client of the same proxy"
    );
}
