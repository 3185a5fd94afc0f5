//! Device JWTs as a session verifies them: the header (`alg`, `kid`, `none` and unknown
//! algorithms), the signature, the claims. The input is the token text; a valid token signed
//! with the configured key is in the corpus, so mutations reach the claims checks.
#![no_main]

use std::sync::OnceLock;

use fleetgate_gateway::{JwtKeySpec, JwtKeys, JwtPolicy};
use libfuzzer_sys::fuzz_target;

/// The HS256 secret of kid `k1` (the corpus's tokens are signed with it).
pub const SECRET: &str = "fuzz-jwt-secret-0123456789abcdefghijkl";
/// The clock the corpus's tokens are valid at.
const NOW_S: i64 = 1_800_000_000;

fn keys() -> &'static JwtKeys {
    static KEYS: OnceLock<JwtKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let spec = JwtKeySpec {
            kid: "k1".into(),
            algorithm: "HS256".into(),
            secret: Some(SECRET.into()),
            public_key_pem: None,
        };
        let policy = JwtPolicy {
            leeway_s: 30,
            audience: vec!["fleet".into()],
            issuer: Vec::new(),
        };
        JwtKeys::load(&[spec], None, policy).expect("key")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(sub) = keys().verify_device(token, NOW_S) else {
        return;
    };
    // Whatever was accepted must satisfy the rules when read independently: not expired,
    // not before its nbf, addressed to this audience, and naming the device returned.
    use base64::Engine as _;
    let claims = token.split('.').nth(1).expect("three parts");
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .expect("claims decode");
    let claims: serde_json::Value = serde_json::from_slice(&claims).expect("claims are JSON");
    let exp = claims["exp"].as_i64().expect("exp");
    assert!(exp + 30 >= NOW_S, "accepted an expired token: {claims}");
    if let Some(nbf) = claims["nbf"].as_i64() {
        assert!(
            nbf - 30 <= NOW_S,
            "accepted a token before its nbf: {claims}"
        );
    }
    let aud = &claims["aud"];
    assert!(
        aud == "fleet"
            || aud
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == "fleet")),
        "accepted another audience: {claims}"
    );
    assert_eq!(claims["sub"], sub.as_str());
});
