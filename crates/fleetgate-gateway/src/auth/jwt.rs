//! Device JWTs: verification keys from a TOML key file and a JWKS file (swapped whole on
//! reload, so `kid` rotation works with an overlap), the algorithm pinned per key, and the
//! time and audience rules.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// One verification key, as written in the TOML key file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeySpec {
    /// Key ID matched against the token header's `kid`.
    pub kid: String,
    /// `HS256`, `RS256` or `ES256`; tokens signed with anything else are refused.
    pub algorithm: String,
    /// Shared secret (HS256).
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM public key (RS256, ES256).
    #[serde(default)]
    pub public_key_pem: Option<String>,
}

/// Errors loading JWT keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The algorithm is not one we accept.
    #[error("key {kid}: unsupported algorithm {algorithm} (use HS256, RS256 or ES256)")]
    Algorithm {
        /// Key ID.
        kid: String,
        /// What was given.
        algorithm: String,
    },
    /// The key material is missing or unreadable.
    #[error("key {kid}: {message}")]
    Material {
        /// Key ID.
        kid: String,
        /// What is wrong.
        message: String,
    },
    /// The same `kid` twice.
    #[error("key {0} is defined twice")]
    Duplicate(String),
    /// The JWKS document does not parse.
    #[error("JWKS: {0}")]
    Jwks(String),
}

/// Why a token was refused. The messages are fixed: they go back to the peer, and a parser's
/// message would quote its input or list its internals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or a header or claims that do not parse (`alg: none` among them).
    #[error("malformed token")]
    Malformed,
    /// No configured key has the token's `kid` (or the token has none and several keys exist).
    #[error("unknown signing key")]
    UnknownKey,
    /// The header's algorithm is not the one pinned to the key.
    #[error("algorithm not allowed for this key")]
    Algorithm,
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is still ahead.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is ahead of now by more than the leeway.
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `aud` does not name this gateway.
    #[error("wrong audience")]
    Audience,
    /// `iss` is not a configured issuer.
    #[error("wrong issuer")]
    Issuer,
    /// A required claim (`exp`, `sub`) is missing or has the wrong type.
    #[error("missing or invalid claims")]
    Claims,
    /// More groups than a token may name.
    #[error("too many groups")]
    TooManyGroups,
}

/// What every token must satisfy besides its signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtPolicy {
    /// Clock tolerance for `exp`, `nbf` and `iat`, seconds.
    pub leeway_s: u64,
    /// Accepted `aud` values; empty = `aud` is not checked.
    pub audience: Vec<String>,
    /// Accepted `iss` values; empty = `iss` is not checked.
    pub issuer: Vec<String>,
}

struct JwtKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, JwtKey>,
}

/// JWT verification keys by `kid`, and the policy tokens are held to. Clones share the set,
/// so a [`JwtKeys::replace`] reaches every session's next verification.
#[derive(Default, Clone)]
pub struct JwtKeys {
    set: Arc<RwLock<Arc<KeySet>>>,
    policy: Arc<JwtPolicy>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.current();
        f.debug_struct("JwtKeys")
            .field("kids", &set.keys.keys().collect::<Vec<_>>())
            .field("policy", &self.policy)
            .finish()
    }
}

/// The claims of a device token, as the signature vouched for them.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    // Optional here so that a token without them is refused as such, not as unparsable.
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
}

/// The claims a device token carries.
pub(crate) struct DeviceClaims {
    pub(crate) sub: String,
    pub(crate) groups: Vec<String>,
    /// Seconds since the epoch.
    pub(crate) exp: i64,
}

/// Most groups a device token may name.
pub const MAX_GROUPS: usize = 64;

fn hs256(kid: &str, secret: &[u8]) -> Result<DecodingKey, KeyError> {
    if secret.len() < 32 {
        return Err(KeyError::Material {
            kid: kid.to_owned(),
            message: "HS256 secret must be at least 32 bytes".into(),
        });
    }
    Ok(DecodingKey::from_secret(secret))
}

fn spec_key(spec: &JwtKeySpec) -> Result<JwtKey, KeyError> {
    let material = |what: &str| KeyError::Material {
        kid: spec.kid.clone(),
        message: what.to_owned(),
    };
    let pem = |name: &str| {
        spec.public_key_pem
            .as_deref()
            .ok_or_else(|| material(&format!("{name} needs `public_key_pem`")))
    };
    let (algorithm, key) = match spec.algorithm.as_str() {
        "HS256" => {
            let secret = spec
                .secret
                .as_deref()
                .ok_or_else(|| material("HS256 needs `secret`"))?;
            (Algorithm::HS256, hs256(&spec.kid, secret.as_bytes())?)
        }
        "RS256" => (
            Algorithm::RS256,
            DecodingKey::from_rsa_pem(pem("RS256")?.as_bytes())
                .map_err(|e| material(&e.to_string()))?,
        ),
        "ES256" => (
            Algorithm::ES256,
            DecodingKey::from_ec_pem(pem("ES256")?.as_bytes())
                .map_err(|e| material(&e.to_string()))?,
        ),
        other => {
            return Err(KeyError::Algorithm {
                kid: spec.kid.clone(),
                algorithm: other.to_owned(),
            });
        }
    };
    Ok(JwtKey { algorithm, key })
}

/// The keys of a JWKS document. A key's algorithm comes from its `alg`, or for RSA and P-256
/// keys without one from its type; never from a token. Encryption keys are skipped.
fn jwks_keys(text: &str) -> Result<Vec<(String, JwtKey)>, KeyError> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| KeyError::Jwks(e.to_string()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| KeyError::Jwks("every key needs a `kid`".into()))?;
        let algorithm = match (jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(KeyAlgorithm::HS256), _) => Algorithm::HS256,
            (Some(KeyAlgorithm::RS256), _) => Algorithm::RS256,
            (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
            (Some(other), _) => {
                return Err(KeyError::Algorithm {
                    kid,
                    algorithm: format!("{other:?}"),
                });
            }
            (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            (None, _) => {
                return Err(KeyError::Material {
                    kid,
                    message: "a key of this type needs `alg`".into(),
                });
            }
        };
        let key = match &jwk.algorithm {
            AlgorithmParameters::OctetKey(oct) => {
                use base64::Engine as _;
                let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(oct.value.trim_end_matches('='))
                    .map_err(|e| KeyError::Material {
                        kid: kid.clone(),
                        message: e.to_string(),
                    })?;
                hs256(&kid, &secret)?
            }
            _ => DecodingKey::from_jwk(jwk).map_err(|e| KeyError::Material {
                kid: kid.clone(),
                message: e.to_string(),
            })?,
        };
        keys.push((kid, JwtKey { algorithm, key }));
    }
    Ok(keys)
}

impl JwtKeys {
    /// Builds the key set from TOML key specs and the text of a JWKS document.
    ///
    /// # Errors
    /// [`KeyError`] for an unsupported algorithm, missing or invalid key material, or a
    /// `kid` given twice.
    pub fn load(
        specs: &[JwtKeySpec],
        jwks: Option<&str>,
        policy: JwtPolicy,
    ) -> Result<Self, KeyError> {
        let keys = Self {
            set: Arc::default(),
            policy: Arc::new(policy),
        };
        keys.replace(specs, jwks)?;
        Ok(keys)
    }

    /// Builds the key set from TOML key specs with the default policy.
    ///
    /// # Errors
    /// As [`JwtKeys::load`].
    pub fn from_specs(specs: &[JwtKeySpec]) -> Result<Self, KeyError> {
        Self::load(specs, None, JwtPolicy::default())
    }

    /// Replaces the keys; verifications already under way finish with the old ones.
    ///
    /// # Errors
    /// As [`JwtKeys::load`]; the old keys then stay.
    pub fn replace(&self, specs: &[JwtKeySpec], jwks: Option<&str>) -> Result<(), KeyError> {
        let mut set = KeySet::default();
        let from_jwks = match jwks {
            Some(text) => jwks_keys(text)?,
            None => Vec::new(),
        };
        let from_specs = specs
            .iter()
            .map(|spec| Ok((spec.kid.clone(), spec_key(spec)?)))
            .collect::<Result<Vec<_>, KeyError>>()?;
        for (kid, key) in from_specs.into_iter().chain(from_jwks) {
            if set.keys.contains_key(&kid) {
                return Err(KeyError::Duplicate(kid));
            }
            set.keys.insert(kid, key);
        }
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(())
    }

    fn current(&self) -> Arc<KeySet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Number of configured keys.
    pub fn len(&self) -> usize {
        self.current().keys.len()
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verifies `token` as a device JWT at `now_s` (seconds since the epoch), exactly as a
    /// session does; the device ID it names. Public for tools and the fuzz target.
    ///
    /// # Errors
    /// The [`TokenError`] that refused it.
    pub fn verify_device(&self, token: &str, now_s: i64) -> Result<String, TokenError> {
        self.verify(token, now_s).map(|claims| claims.sub)
    }

    /// Verifies `token` at `now_s` (seconds since the epoch) and returns its claims.
    ///
    /// # Errors
    /// The [`TokenError`] that refused it.
    pub(crate) fn verify(&self, token: &str, now_s: i64) -> Result<DeviceClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let set = self.current();
        let key = match header.kid.as_deref() {
            Some(kid) => set.keys.get(kid),
            // Without a kid, a single configured key is unambiguous.
            None if set.keys.len() == 1 => set.keys.values().next(),
            None => None,
        }
        .ok_or(TokenError::UnknownKey)?;
        // The key's algorithm, never the header's: an RS256 public key used as an HS256
        // secret (alg confusion) fails here.
        if header.alg != key.algorithm {
            return Err(TokenError::Algorithm);
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Time is checked below against `now_s`, not by the library against the system clock:
        // one clock for every rule, and one a test can set.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = !self.policy.audience.is_empty();
        if validation.validate_aud {
            validation.set_audience(&self.policy.audience);
        }
        if !self.policy.issuer.is_empty() {
            validation.set_issuer(&self.policy.issuer);
        }
        let data = jsonwebtoken::decode::<RawClaims>(token, &key.key, &validation)
            .map_err(|e| token_error(e.kind()))?;
        let claims = data.claims;
        let (Some(sub), Some(exp)) = (claims.sub, claims.exp) else {
            return Err(TokenError::Claims);
        };
        let leeway = i64::try_from(self.policy.leeway_s).unwrap_or(i64::MAX);
        if exp.saturating_add(leeway) < now_s {
            return Err(TokenError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf.saturating_sub(leeway) > now_s)
        {
            return Err(TokenError::NotYetValid);
        }
        if claims
            .iat
            .is_some_and(|iat| iat.saturating_sub(leeway) > now_s)
        {
            return Err(TokenError::IssuedInFuture);
        }
        // Every accepted message is published once per group: bound the fan-out a token buys.
        if claims.groups.len() > MAX_GROUPS {
            return Err(TokenError::TooManyGroups);
        }
        Ok(DeviceClaims {
            sub,
            groups: claims.groups,
            exp,
        })
    }
}

fn token_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::Signature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::Algorithm,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => TokenError::Claims,
        _ => TokenError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "unit-test-secret-0123456789abcdefghijk";
    const NOW: i64 = 1_800_000_000;

    fn keys() -> JwtKeys {
        let spec = JwtKeySpec {
            kid: "k".into(),
            algorithm: "HS256".into(),
            secret: Some(SECRET.into()),
            public_key_pem: None,
        };
        let policy = JwtPolicy {
            leeway_s: 10,
            ..JwtPolicy::default()
        };
        JwtKeys::load(&[spec], None, policy).unwrap()
    }

    fn token(claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("k".into());
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    #[test]
    fn time_rules_use_the_given_clock_with_the_leeway() {
        let k = keys();
        let at = |claims| k.verify_device(&token(claims), NOW);
        use serde_json::json;
        assert_eq!(
            at(json!({"sub":"d","exp":NOW - 5})),
            Ok("d".into()),
            "within leeway"
        );
        assert_eq!(
            at(json!({"sub":"d","exp":NOW - 11})),
            Err(TokenError::Expired)
        );
        assert_eq!(
            at(json!({"sub":"d","exp":NOW + 60,"nbf":NOW + 11})),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            at(json!({"sub":"d","exp":NOW + 60,"iat":NOW + 11})),
            Err(TokenError::IssuedInFuture)
        );
        assert_eq!(at(json!({"sub":"d"})), Err(TokenError::Claims));
        assert_eq!(k.verify_device("a.b.c", NOW), Err(TokenError::Malformed));
    }
}
