//! Token refresh on a live session: a device given a [`TokenSource`] asks it for a fresh JWT
//! before the current one expires and sends it in an `auth` frame, so the gateway does not
//! close the session at `exp` (4403 `credentials expired`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::time::Instant;

/// Where fresh device tokens come from: called at each connect and before the current
/// token expires. It must not block (hand out a token fetched elsewhere).
#[derive(Clone)]
pub struct TokenSource(Arc<dyn Fn() -> String + Send + Sync>);

impl TokenSource {
    /// A source calling `f` for each token.
    pub fn new(f: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// The current token.
    pub fn token(&self) -> String {
        (self.0)()
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource")
    }
}

/// A JWT's `exp`, seconds since the epoch, read without verifying (the gateway verifies);
/// `None` for a provisioned secret or a token without one.
pub(crate) fn jwt_exp(token: &str) -> Option<i64> {
    let mut parts = token.split('.');
    let (_, claims, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_i64()
}

/// Refreshes before `exp`: a minute early, or at half the remaining lifetime for tokens with
/// two minutes or less left, and never sooner than a second from now (a source handing out the same token again
/// is asked again later, not in a loop).
pub(crate) fn refresh_at(token: &str, now: Instant) -> Option<Instant> {
    let exp = jwt_exp(token)?;
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let left = (exp as f64 - now_s).max(0.0);
    let early = if left > 120.0 {
        left - 60.0
    } else {
        left / 2.0
    }
    .max(1.0);
    Some(now + Duration::from_secs_f64(early))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims))
    }

    #[test]
    fn exp_is_read_from_jwts_only() {
        assert_eq!(
            jwt_exp(&jwt(r#"{"sub":"d","exp":1700000000}"#)),
            Some(1_700_000_000)
        );
        assert_eq!(jwt_exp("provisioned-secret-without-dots"), None);
        assert_eq!(jwt_exp(&jwt(r#"{"sub":"d"}"#)), None);
        assert_eq!(jwt_exp("a.!!!.c"), None);
    }

    #[test]
    fn refresh_comes_before_expiry() {
        let now = Instant::now();
        let in_s = |s: i64| {
            let exp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
                + s;
            refresh_at(&jwt(&format!(r#"{{"exp":{exp}}}"#)), now).unwrap() - now
        };
        let hour = in_s(3600);
        assert!(
            hour > Duration::from_secs(3500) && hour < Duration::from_secs(3545),
            "{hour:?}"
        );
        let short = in_s(20);
        assert!(
            short > Duration::from_secs(8) && short < Duration::from_secs(11),
            "{short:?}"
        );
        assert_eq!(in_s(-5), Duration::from_secs(1), "expired: try again soon");
    }
}
