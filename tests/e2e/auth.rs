//! Both auth modes, every failure with its exact close code.

use serde_json::json;

use crate::support::{Node, Raw};

#[tokio::test]
async fn first_frame_auth_succeeds_with_provisioned_secret() {
    let node = Node::start(&[]).await;
    let secret = node.provision("sensor-001").await;
    let (_raw, resp) = Raw::auth(&node.device_url(), "sensor-001", &secret).await;
    assert_eq!(resp["type"], "auth_response");
    assert_eq!(resp["status"], "success");
    assert_eq!(resp["heartbeatMs"], 1000);
    assert!(resp["sessionId"].as_str().is_some_and(|s| !s.is_empty()));
    let (_, dev) = node.admin("GET", "/v1/devices/sensor-001", None).await;
    assert_eq!(dev["online"], true);
}

#[tokio::test]
async fn header_auth_succeeds_and_server_still_sends_auth_response() {
    let node = Node::start(&[]).await;
    let secret = node.provision("hdr-1").await;
    let bearer = format!("Bearer {secret}");
    let mut raw = Raw::connect(
        &node.device_url(),
        &[("Authorization", &bearer), ("Device-ID", "hdr-1")],
    )
    .await;
    let resp = raw.recv().await;
    assert_eq!(resp["status"], "success", "{resp}");
}

#[tokio::test]
async fn header_auth_with_bad_secret_is_refused_at_upgrade_with_401() {
    let node = Node::start(&[]).await;
    node.provision("hdr-2").await;
    let status = Raw::try_connect(
        &node.device_url(),
        &[("Authorization", "Bearer wrong"), ("Device-ID", "hdr-2")],
    )
    .await
    .err();
    assert_eq!(status, Some(401));
}

#[tokio::test]
async fn wrong_secret_gets_error_response_then_4403() {
    let node = Node::start(&[]).await;
    node.provision("sensor-002").await;
    let (mut raw, resp) = Raw::auth(&node.device_url(), "sensor-002", "not-the-secret").await;
    assert_eq!(resp["type"], "auth_response");
    assert_eq!(resp["status"], "error");
    assert!(resp["reason"].as_str().is_some());
    assert_eq!(raw.closed().await.code, 4403);
}

#[tokio::test]
async fn unknown_device_is_4403() {
    let node = Node::start(&[]).await;
    let (mut raw, resp) = Raw::auth(&node.device_url(), "nobody", "whatever").await;
    assert_eq!(resp["status"], "error");
    assert_eq!(raw.closed().await.code, 4403);
}

#[tokio::test]
async fn routed_id_must_match_the_authenticated_one() {
    let node = Node::start(&[]).await;
    let secret = node.provision("sensor-003").await;
    let url = format!("{}?device_id=someone-else", node.device_url());
    let (mut raw, resp) = Raw::auth(&url, "sensor-003", &secret).await;
    assert_eq!(resp["status"], "error");
    assert_eq!(raw.closed().await.code, 4403);
}

#[tokio::test]
async fn another_devices_secret_is_refused() {
    let node = Node::start(&[]).await;
    node.provision("a-dev").await;
    let b_secret = node.provision("b-dev").await;
    let (mut raw, _) = Raw::auth(&node.device_url(), "a-dev", &b_secret).await;
    assert_eq!(raw.closed().await.code, 4403);
}

#[tokio::test]
async fn no_auth_frame_within_auth_timeout_is_4408() {
    let node = Node::start(&[("FLEETGATE_AUTH_TIMEOUT_MS", "300")]).await;
    let mut raw = Raw::connect(&node.device_url(), &[]).await;
    let closed = raw.closed().await;
    assert_eq!(closed.code, 4408, "{closed:?}");
}

#[tokio::test]
async fn non_auth_first_frame_is_4400() {
    let node = Node::start(&[]).await;
    node.provision("sensor-004").await;
    let mut raw = Raw::connect(&node.device_url(), &[]).await;
    raw.send(json!({"type":"status","deviceId":"sensor-004","data":{"t":1}}))
        .await;
    assert_eq!(raw.closed().await.code, 4400);
}

#[tokio::test]
async fn revoked_device_is_closed_with_4410_and_cannot_return() {
    let node = Node::start(&[]).await;
    let secret = node.provision("rev-1").await;
    let mut raw = Raw::authed(&node.device_url(), "rev-1", &secret).await;
    let (status, _) = node.admin("POST", "/v1/devices/rev-1/revoke", None).await;
    assert_eq!(status, 204);
    assert_eq!(raw.closed().await.code, 4410);
    let (mut again, resp) = Raw::auth(&node.device_url(), "rev-1", &secret).await;
    assert_eq!(resp["status"], "error");
    assert_eq!(again.closed().await.code, 4403);
}

mod jwt {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    use serde_json::json;

    use crate::support::{Node, Raw, now_ms};

    const SECRET_A: &str = "kid-a-secret-0123456789abcdefghijklmnop";
    const SECRET_B: &str = "kid-b-secret-0123456789abcdefghijklmnop";

    async fn node_with_keys() -> Node {
        let path = std::env::temp_dir().join(format!(
            "fleetgate-jwt-{}-{}.toml",
            std::process::id(),
            now_ms()
        ));
        let keys = format!(
            "[[keys]]\nkid = \"a\"\nalgorithm = \"HS256\"\nsecret = \"{SECRET_A}\"\n\n[[keys]]\nkid = \"b\"\nalgorithm = \"HS256\"\nsecret = \"{SECRET_B}\"\n"
        );
        crate::support::write_secret(&path, keys);
        Node::start(&[("FLEETGATE_JWT_KEYS", path.to_str().unwrap())]).await
    }

    fn token(
        kid: Option<&str>,
        alg: Algorithm,
        secret: &str,
        sub: &str,
        exp_offset_s: i64,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        let claims =
            json!({"sub": sub, "exp": now_ms() / 1000 + exp_offset_s, "groups": ["line-1"]});
        encode(
            &header,
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_jwt_signed_with_a_configured_key_authenticates_an_unprovisioned_device() {
        let node = node_with_keys().await;
        for kid in ["a", "b"] {
            let secret = if kid == "a" { SECRET_A } else { SECRET_B };
            let t = token(Some(kid), Algorithm::HS256, secret, "jwt-dev", 300);
            let (_raw, resp) = Raw::auth(&node.device_url(), "jwt-dev", &t).await;
            assert_eq!(resp["status"], "success", "kid {kid}: {resp}");
        }
        let t = token(Some("a"), Algorithm::HS256, SECRET_A, "jwt-hdr", 300);
        let bearer = format!("Bearer {t}");
        let mut raw = Raw::connect(&node.device_url(), &[("Authorization", &bearer)]).await;
        assert_eq!(
            raw.recv().await["status"],
            "success",
            "header JWT without a routed ID"
        );
    }

    #[tokio::test]
    async fn bad_jwts_are_refused_with_4403() {
        let node = node_with_keys().await;
        let cases = [
            (
                "expired",
                token(Some("a"), Algorithm::HS256, SECRET_A, "jwt-x", -300),
            ),
            (
                "wrong key for kid",
                token(Some("a"), Algorithm::HS256, SECRET_B, "jwt-x", 300),
            ),
            (
                "unknown kid",
                token(Some("zzz"), Algorithm::HS256, SECRET_A, "jwt-x", 300),
            ),
            (
                "algorithm not the key's",
                token(Some("a"), Algorithm::HS384, SECRET_A, "jwt-x", 300),
            ),
            (
                "sub is another device",
                token(Some("a"), Algorithm::HS256, SECRET_A, "someone-else", 300),
            ),
        ];
        for (what, t) in cases {
            let (mut raw, resp) = Raw::auth(&node.device_url(), "jwt-x", &t).await;
            assert_eq!(resp["status"], "error", "{what}: {resp}");
            assert_eq!(raw.closed().await.code, 4403, "{what}");
        }
    }
}

#[tokio::test]
async fn frames_pipelined_after_the_auth_frame_are_processed_once_authenticated() {
    let node = Node::start(&[]).await;
    let secret = node.provision("pipe").await;
    let mut raw = Raw::connect(&node.device_url(), &[]).await;
    raw.send(json!({"type":"auth","deviceId":"pipe","token":secret}))
        .await;
    raw.send(crate::support::status("pipe", "early", 1, json!({"t": 1})))
        .await;
    assert_eq!(raw.recv().await["status"], "success");
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"early"}));
}

#[tokio::test]
async fn a_capacity_close_carries_a_retry_hint() {
    let node = Node::start(&[("FLEETGATE_MAX_CONNECTIONS", "1")]).await;
    let a = node.provision("hint-a").await;
    let b = node.provision("hint-b").await;
    let mut first = Raw::connect(&node.device_url(), &[]).await;
    let mut second = Raw::connect(&node.device_url(), &[]).await;
    first
        .send(json!({"type":"auth","deviceId":"hint-a","token":a}))
        .await;
    assert_eq!(first.recv().await["status"], "success");
    second
        .send(json!({"type":"auth","deviceId":"hint-b","token":b}))
        .await;
    let closed = second.closed().await;
    assert_eq!(closed.code, 1013);
    let retry =
        fleetgate_protocol::parse_retry_after(&closed.reason).expect("retry-after in the reason");
    assert!((500..5000).contains(&retry), "{retry}");
}
