//! Device JWTs beyond the basics in `auth`: keys from a JWKS file and their rotation without
//! a restart, algorithm confusion, `alg: none`, the time and audience claims, and sessions
//! that outlive their token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::support::{DEADLINE, Node, Raw, eventually, now_ms, status, write_secret};

const HS_SECRET: &str = "tokens-hs-secret-0123456789abcdefghijkl";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fleetgate-tokens-{}-{}-{name}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An RSA key pair made by `openssl`: the private PEM (to sign) and the JWK of its public half.
struct RsaKey {
    private_pem: Vec<u8>,
    public_pem: Vec<u8>,
    modulus: Vec<u8>,
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn rsa_key(dir: &Path) -> RsaKey {
    let key = dir.join("rsa.pem");
    let key = key.to_str().unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key,
    ]);
    let public_pem = openssl(&["pkey", "-in", key, "-pubout"]);
    let modulus = String::from_utf8(openssl(&["rsa", "-in", key, "-noout", "-modulus"])).unwrap();
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let modulus = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    RsaKey {
        private_pem: std::fs::read(key).unwrap(),
        public_pem,
        modulus,
    }
}

impl RsaKey {
    fn jwk(&self, kid: &str) -> Value {
        json!({"kty":"RSA","kid":kid,"alg":"RS256","use":"sig","n":URL_SAFE_NO_PAD.encode(&self.modulus),"e":"AQAB"})
    }

    fn sign(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        encode(
            &header,
            claims,
            &EncodingKey::from_rsa_pem(&self.private_pem).unwrap(),
        )
        .unwrap()
    }
}

fn hs_jwk(kid: &str) -> Value {
    json!({"kty":"oct","kid":kid,"alg":"HS256","k":URL_SAFE_NO_PAD.encode(HS_SECRET)})
}

fn hs_token(kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    encode(
        &header,
        claims,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap()
}

fn write_jwks(path: &Path, keys: &[Value]) {
    // Written next to the file and renamed over it, as a Secret update swaps the file whole.
    let tmp = path.with_extension("tmp");
    write_secret(&tmp, json!({ "keys": keys }).to_string());
    std::fs::rename(&tmp, path).unwrap();
}

fn now_s() -> i64 {
    now_ms() / 1000
}

fn claims(sub: &str, exp_in_s: i64) -> Value {
    json!({"sub": sub, "exp": now_s() + exp_in_s})
}

async fn node_with_jwks(jwks: &Path, extra: &[(&str, &str)]) -> Node {
    let mut env = vec![
        ("FLEETGATE_JWT_JWKS", jwks.to_str().unwrap()),
        ("FLEETGATE_TLS_RELOAD_INTERVAL_MS", "100"),
    ];
    env.extend_from_slice(extra);
    Node::start(&env).await
}

/// Authenticates `device` with `token` by an auth frame and returns the response and close.
async fn refused(node: &Node, device: &str, token: &str) -> (Value, crate::support::Closed) {
    let (mut raw, resp) = Raw::auth(&node.device_url(), device, token).await;
    (resp, raw.closed().await)
}

#[tokio::test]
async fn alg_none_and_garbage_tokens_close_with_4403_and_a_short_fixed_reason() {
    let dir = scratch("none");
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[hs_jwk("h1")]);
    let node = node_with_jwks(&jwks, &[]).await;
    let b64 = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(json!({"alg":"none","kid":"h1","typ":"JWT"})),
        b64(claims("tok-none", 300))
    );
    let long_garbage = format!(
        "{}.{}.{}",
        "x".repeat(600),
        "y".repeat(600),
        "z".repeat(600)
    );
    for (what, token) in [("alg none", none), ("garbage", long_garbage)] {
        let (resp, closed) = refused(&node, "tok-none", &token).await;
        assert_eq!(resp["status"], "error", "{what}: {resp}");
        assert_eq!(resp["reason"], "invalid token: malformed token", "{what}");
        assert_eq!(closed.code, 4403, "{what}: {closed:?}");
        assert_eq!(closed.reason, "invalid token: malformed token", "{what}");
    }
}

#[tokio::test]
async fn jwks_rs256_keys_verify_and_an_hs256_token_keyed_with_the_public_key_is_refused() {
    let dir = scratch("confusion");
    let rsa = rsa_key(&dir);
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[rsa.jwk("r1")]);
    let node = node_with_jwks(&jwks, &[]).await;
    let good = rsa.sign("r1", &claims("tok-rsa", 300));
    let (_raw, resp) = Raw::auth(&node.device_url(), "tok-rsa", &good).await;
    assert_eq!(resp["status"], "success", "{resp}");
    // The classic confusion: the public key's PEM used as an HMAC secret, alg HS256.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("r1".into());
    let forged = encode(
        &header,
        &claims("tok-rsa", 300),
        &EncodingKey::from_secret(&rsa.public_pem),
    )
    .unwrap();
    let (resp, closed) = refused(&node, "tok-rsa", &forged).await;
    assert_eq!(
        resp["reason"], "invalid token: algorithm not allowed for this key",
        "{resp}"
    );
    assert_eq!(closed.code, 4403);
}

#[tokio::test]
async fn nbf_iat_exp_aud_and_iss_are_enforced() {
    let dir = scratch("claims");
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[hs_jwk("h1")]);
    let node = node_with_jwks(
        &jwks,
        &[
            ("FLEETGATE_JWT_AUDIENCE", "fleet-a"),
            ("FLEETGATE_JWT_ISSUER", "issuer-1"),
            ("FLEETGATE_JWT_LEEWAY_MS", "1000"),
        ],
    )
    .await;
    let base = |extra: Value| {
        let mut c =
            json!({"sub":"tok-claims","exp":now_s() + 300,"aud":"fleet-a","iss":"issuer-1"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let (_raw, resp) = Raw::auth(
        &node.device_url(),
        "tok-claims",
        &hs_token("h1", &base(json!({}))),
    )
    .await;
    assert_eq!(resp["status"], "success", "valid claims: {resp}");
    let no_exp = {
        let mut c = base(json!({}));
        c.as_object_mut().unwrap().remove("exp");
        c
    };
    let cases = [
        (
            "expired",
            base(json!({"exp": now_s() - 60})),
            "token expired",
        ),
        (
            "nbf ahead",
            base(json!({"nbf": now_s() + 300})),
            "token not yet valid",
        ),
        (
            "iat ahead",
            base(json!({"iat": now_s() + 300})),
            "token issued in the future",
        ),
        (
            "wrong aud",
            base(json!({"aud": "fleet-b"})),
            "wrong audience",
        ),
        (
            "wrong iss",
            base(json!({"iss": "issuer-2"})),
            "wrong issuer",
        ),
        ("no exp", no_exp, "missing or invalid claims"),
    ];
    for (what, c, reason) in cases {
        let (resp, closed) = refused(&node, "tok-claims", &hs_token("h1", &c)).await;
        assert_eq!(
            resp["reason"],
            format!("invalid token: {reason}"),
            "{what}: {resp}"
        );
        assert_eq!(closed.code, 4403, "{what}");
    }
}

#[tokio::test]
async fn rotated_jwks_keys_take_effect_without_a_restart() {
    let dir = scratch("rotate");
    let rsa = rsa_key(&dir);
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[hs_jwk("old")]);
    let node = node_with_jwks(&jwks, &[]).await;
    let old = hs_token("old", &claims("tok-rot", 300));
    let new = rsa.sign("new", &claims("tok-rot", 300));
    let status_of = |token: String| {
        let url = node.device_url();
        async move { Raw::auth(&url, "tok-rot", &token).await.1["status"].clone() }
    };
    assert_eq!(status_of(old.clone()).await, "success");
    assert_eq!(
        status_of(new.clone()).await,
        "error",
        "new kid before rotation"
    );
    // Overlap: both keys.
    write_jwks(&jwks, &[hs_jwk("old"), rsa.jwk("new")]);
    eventually("the new kid is accepted", || {
        let s = status_of(new.clone());
        async move { (s.await == "success").then_some(()) }
    })
    .await;
    assert_eq!(
        status_of(old.clone()).await,
        "success",
        "old kid during the overlap"
    );
    // The old key retired.
    write_jwks(&jwks, &[rsa.jwk("new")]);
    eventually("the old kid is refused", || {
        let s = status_of(old.clone());
        async move { (s.await == "error").then_some(()) }
    })
    .await;
    assert_eq!(status_of(new).await, "success");
}

#[tokio::test]
async fn a_session_outliving_its_token_is_closed_with_4403_unless_refreshed() {
    let dir = scratch("expiry");
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[hs_jwk("h1")]);
    let node = node_with_jwks(&jwks, &[("FLEETGATE_JWT_LEEWAY_MS", "0")]).await;
    let short = |sub: &str| hs_token("h1", &claims(sub, 2));
    let mut lapsing = Raw::authed(&node.device_url(), "tok-lapse", &short("tok-lapse")).await;
    let mut refreshed = Raw::authed(&node.device_url(), "tok-fresh", &short("tok-fresh")).await;
    refreshed
        .send(json!({"type":"auth","deviceId":"tok-fresh","token":hs_token("h1", &claims("tok-fresh", 300))}))
        .await;
    assert_eq!(
        refreshed.recv().await["status"],
        "success",
        "refresh answered"
    );
    // A refresh naming another device is refused and changes nothing.
    refreshed
        .send(json!({"type":"auth","deviceId":"someone-else","token":hs_token("h1", &claims("someone-else", 300))}))
        .await;
    let answer = refreshed.recv().await;
    assert_eq!(answer["status"], "error", "{answer}");

    let closed = tokio::time::timeout(DEADLINE, lapsing.closed())
        .await
        .expect("the lapsed session closes");
    assert_eq!(closed.code, 4403);
    assert_eq!(closed.reason, "credentials expired");
    // The refreshed session is past the old expiry and still serves: its message is acked.
    refreshed
        .send(status("tok-fresh", "after-expiry", 1, json!({"t": 1})))
        .await;
    let ack = tokio::time::timeout(Duration::from_secs(5), refreshed.recv())
        .await
        .expect("ack in time");
    assert_eq!(ack, json!({"type":"ack","msgid":"after-expiry"}));
}

#[tokio::test]
async fn close_reasons_never_echo_input_and_always_carry_their_code() {
    let node = Node::start(&[]).await;
    let secret = node.provision("tok-reason").await;
    let long_type = "t".repeat(2_000);
    let frames = [
        (
            "unknown type",
            json!({"ver":"1.0","msgid":"m1","timestamp":now_ms(),"from":"tok-reason","to":"server","type":long_type,"payload":{},"qos":0}).to_string(),
        ),
        ("not JSON", format!("{{\"type\": {}", "9".repeat(3_000))),
    ];
    for (what, text) in frames {
        let mut raw = Raw::authed(&node.device_url(), "tok-reason", &secret).await;
        raw.send_text(text).await;
        let closed = raw.closed().await;
        assert_eq!(closed.code, 4400, "{what}: {closed:?}");
        assert!(closed.reason.len() <= 123, "{what}");
        assert!(
            !closed.reason.contains("ttt") && !closed.reason.contains("999"),
            "{what}: {}",
            closed.reason
        );
    }
}

#[tokio::test]
async fn the_sdk_refreshes_short_lived_tokens_and_its_session_outlives_them() {
    use fleetgate_device::{Device, DeviceEvent, DeviceOptions, Qos, TokenSource};
    let dir = scratch("sdk");
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[hs_jwk("h1")]);
    let node = node_with_jwks(&jwks, &[("FLEETGATE_JWT_LEEWAY_MS", "0")]).await;
    // Every token lives 3 s: without refreshes the session would end within 3 s.
    let source = TokenSource::new(|| hs_token("h1", &claims("tok-sdk", 3)));
    let opts = DeviceOptions::new(node.device_url(), "tok-sdk", "").with_token_source(source);
    let (client, mut events) = Device::connect(opts).unwrap();
    assert_eq!(crate::sdk::connected(&mut events).await, 0);
    let started = std::time::Instant::now();
    eventually("three refreshes accepted", || async {
        let (_, m) = node.internal_get("/metrics").await;
        m.lines()
            .find_map(|l| l.strip_prefix("fleetgate_auth_refreshes_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n >= 3)
            .map(|_| ())
    })
    .await;
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "outlived the first token"
    );
    client
        .send_status(json!({"t": 1}), Qos::AtLeastOnce)
        .await
        .expect("acked on the same session");
    // One session all along: no disconnect, no reconnect.
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(
                event,
                DeviceEvent::Disconnected { .. } | DeviceEvent::Connected { .. }
            ),
            "{event:?}"
        );
    }
}

/// `/v1/app` and `/v1/mqtt` sessions end at their credential's expiry too: here an API key's
/// `expiresAt`, 1.5 s ahead (a user token's `exp` takes the same path).
#[tokio::test]
async fn app_and_mqtt_sessions_end_when_their_api_key_expires() {
    let broker = fleetgate_test_support::MosquittoServer::start();
    let node = crate::mqtt::bridged(&broker, &[]).await;
    let expires = now_ms() + 1500;
    let (code, key) = node
        .admin(
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "short", "role": "viewer", "groups": ["*"], "expiresAt": expires})),
        )
        .await;
    assert_eq!(code, 201, "{key}");
    let bearer = format!("Bearer {}", key["key"].as_str().unwrap());
    let headers = [("Authorization", bearer.as_str())];
    let mut app = Raw::connect(&format!("ws://{}/v1/app", node.gateway), &headers).await;
    let mut web = Raw::connect(&format!("ws://{}/v1/mqtt", node.gateway), &headers).await;
    for (what, socket) in [("app", &mut app), ("mqtt", &mut web)] {
        let closed = socket.closed().await;
        assert_eq!(
            (closed.code, closed.reason.as_str()),
            (4403, "credentials expired"),
            "{what}"
        );
        assert!(now_ms() >= expires, "{what} closed before the key expired");
    }
    // The expired key opens nothing any more.
    let refused = Raw::try_connect(&format!("ws://{}/v1/app", node.gateway), &headers).await;
    assert_eq!(refused.err(), Some(401));
}
