//! No secret reaches the logs: a node logging at debug level is driven through every
//! credential (device secrets, MAC keys, device JWTs and their refresh, the bootstrap key, API keys,
//! user passwords and tokens), each succeeding and failing, and its whole log is then searched for
//! every secret used.

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

use crate::support::{API_KEY, Node, Raw, now_ms, write_secret};

const JWT_SECRET: &str = "log-test-jwt-secret-0123456789abcdefgh";
const PASSWORD: &str = "correct horse battery staple";
const WRONG: &str = "wrong-secret-that-must-not-be-logged-7f3a";

#[tokio::test]
async fn no_secret_the_tests_used_appears_in_a_debug_log() {
    let dir = std::env::temp_dir().join(format!(
        "fleetgate-secrets-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("jwt.toml");
    write_secret(
        &keys,
        format!("[[keys]]\nkid = \"k1\"\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\n"),
    );
    let log_path = dir.join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let node = Node::start_logged(
        &[
            ("RUST_LOG", "debug"),
            ("FLEETGATE_JWT_KEYS", keys.to_str().unwrap()),
        ],
        Some(log),
    )
    .await;
    let url = node.device_url();
    let mut secrets = vec![
        API_KEY.to_owned(),
        JWT_SECRET.to_owned(),
        PASSWORD.to_owned(),
        WRONG.to_owned(),
    ];

    // Device secrets: header and auth frame, right and wrong.
    let secret = node.provision("log-dev").await;
    secrets.push(secret.clone());
    let bearer = format!("Bearer {secret}");
    let mut raw = Raw::connect(
        &url,
        &[("Device-ID", "log-dev"), ("Authorization", &bearer)],
    )
    .await;
    assert_eq!(raw.recv().await["status"], "success");
    drop(raw);
    let wrong_bearer = format!("Bearer {WRONG}");
    let refused = Raw::try_connect(
        &url,
        &[("Device-ID", "log-dev"), ("Authorization", &wrong_bearer)],
    )
    .await;
    assert_eq!(refused.err(), Some(401));
    let (mut raw, resp) = Raw::auth(&url, "log-dev", WRONG).await;
    assert_eq!(resp["status"], "error");
    raw.closed().await;
    let (_raw, resp) = Raw::auth(&url, "log-dev", &secret).await;
    assert_eq!(resp["status"], "success");

    // A MAC key: issued, then used by a signing SDK device whose messages are accepted.
    let (status, issued) = node
        .admin("POST", "/v1/devices/log-dev/mac-key", None)
        .await;
    assert_eq!(status, 200, "{issued}");
    let mac_hex = issued["macKey"].as_str().unwrap().to_owned();
    let mut mac_key = [0u8; 32];
    hex::decode_to_slice(&mac_hex, &mut mac_key).unwrap();
    secrets.push(mac_hex);
    let opts = fleetgate_device::DeviceOptions::new(&url, "log-dev", &secret).with_mac_key(mac_key);
    let (device, _events) = fleetgate_device::Device::connect(opts).unwrap();
    device.wait_connected().await.unwrap();
    device
        .send_status(json!({"t": 1}), fleetgate_protocol::Qos::AtLeastOnce)
        .await
        .expect("signed status accepted");
    device.disconnect().await;

    // Device JWTs: good, badly signed, and a refresh on the live session.
    let jwt = |secret: &str, exp_in: i64| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        encode(
            &header,
            &json!({"sub":"log-jwt","exp": now_ms() / 1000 + exp_in}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let good = jwt(JWT_SECRET, 300);
    let forged = jwt("not-the-key-0123456789abcdefghijklmnop", 300);
    let fresh = jwt(JWT_SECRET, 600);
    secrets.extend([good.clone(), forged.clone(), fresh.clone()]);
    let mut raw = Raw::authed(&url, "log-jwt", &good).await;
    raw.send(json!({"type":"auth","deviceId":"log-jwt","token":fresh}))
        .await;
    assert_eq!(raw.recv().await["status"], "success");
    let (mut bad, resp) = Raw::auth(&url, "log-jwt", &forged).await;
    assert_eq!(resp["status"], "error");
    bad.closed().await;

    // Admin: API keys, a user's password and token, right and wrong.
    let (status, key) = node
        .admin(
            "POST",
            "/v1/api-keys",
            Some(json!({"name":"log-key","role":"viewer","groups":["*"]})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let api_key = key["key"].as_str().unwrap().to_owned();
    secrets.push(api_key.clone());
    assert_eq!(
        node.admin_with_key("GET", "/v1/devices", None, Some(&api_key))
            .await
            .0,
        200
    );
    assert_eq!(
        node.admin_with_key("GET", "/v1/devices", None, Some(WRONG))
            .await
            .0,
        401
    );
    let user = json!({"username":"log-ann","password":PASSWORD,"role":"viewer","groups":["*"]});
    assert_eq!(node.admin("POST", "/v1/users", Some(user)).await.0, 201);
    let (status, login) = node
        .admin_with_key(
            "POST",
            "/v1/auth/login",
            Some(json!({"username":"log-ann","password":PASSWORD})),
            None,
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let token = login["token"].as_str().unwrap().to_owned();
    secrets.push(token.clone());
    assert_eq!(
        node.admin_with_key("GET", "/v1/auth/me", None, Some(&token))
            .await
            .0,
        200
    );
    let wrong_login = json!({"username":"log-ann","password":WRONG});
    assert_eq!(
        node.admin_with_key("POST", "/v1/auth/login", Some(wrong_login), None)
            .await
            .0,
        401
    );
    // A dashboard on /v1/app with the user token.
    let app = format!("ws://{}/v1/app", node.gateway);
    let bearer = format!("Bearer {token}");
    let mut raw = Raw::connect(&app, &[("Authorization", &bearer)]).await;
    raw.send(json!({"type":"subscribe","channel":"device:log-dev","id":"s1"}))
        .await;
    assert_eq!(raw.recv().await["type"], "subscribed");
    drop(raw);
    drop(node);

    let log = std::fs::read_to_string(&log_path).unwrap();
    // The log is the real thing: debug lines of the refusals above are in it.
    assert!(
        log.contains("authentication refused"),
        "debug logging was on:\n{log}"
    );
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret is in the log: {secret}"
        );
        // A token's signature alone is as good as the token for a replay: look for it too.
        if let Some(sig) = secret.rsplit('.').next().filter(|s| s.len() >= 20) {
            assert!(!log.contains(sig), "a token signature is in the log: {sig}");
        }
    }
}
