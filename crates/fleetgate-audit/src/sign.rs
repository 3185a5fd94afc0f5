//! Ed25519 checkpoint signatures. Keys are PKCS#8 / SPKI PEM, as `openssl genpkey -algorithm
//! ed25519` writes them, so operators can make and keep them with standard tools.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

/// Errors reading keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not an Ed25519 private key in PKCS#8 PEM.
    #[error("not an Ed25519 private key (PKCS#8 PEM): {0}")]
    Private(String),
    /// Not an Ed25519 public key in SPKI PEM.
    #[error("not an Ed25519 public key (SPKI PEM): {0}")]
    Public(String),
}

/// What a checkpoint signs: the sequence number and hash of the entry it vouches for.
pub fn checkpoint_statement(seq: u64, hash: &str) -> String {
    format!("fleetgate-audit-checkpoint:v1:{seq}:{hash}")
}

/// Key ID: the first 16 hex digits of the SHA-256 of the raw public key.
pub fn kid_of(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Signs checkpoints.
pub struct Signer {
    key: SigningKey,
    kid: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("kid", &self.kid).finish()
    }
}

impl Signer {
    /// From a PKCS#8 PEM private key.
    ///
    /// # Errors
    /// [`KeyError::Private`] when the PEM is not an Ed25519 private key.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let key = SigningKey::from_pkcs8_pem(pem).map_err(|e| KeyError::Private(e.to_string()))?;
        Ok(Self::from_key(key))
    }

    /// A fresh random key (for a development setup without a configured key).
    pub fn generate() -> Self {
        Self::from_key(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    fn from_key(key: SigningKey) -> Self {
        let kid = kid_of(&key.verifying_key());
        Self { key, kid }
    }

    /// The key ID checkpoints name.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as SPKI PEM, to give to whoever verifies exported copies.
    pub fn public_key_pem(&self) -> String {
        self.key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap_or_default()
    }

    /// The public key, for verification in this process.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Base64 signature of `statement`.
    pub fn sign(&self, statement: &str) -> String {
        STANDARD.encode(self.key.sign(statement.as_bytes()).to_bytes())
    }
}

/// Reads an SPKI PEM public key.
///
/// # Errors
/// [`KeyError::Public`] when the PEM is not an Ed25519 public key.
pub fn public_key_from_pem(pem: &str) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_public_key_pem(pem).map_err(|e| KeyError::Public(e.to_string()))
}

/// Whether `sig` (base64) is `key`'s signature of `statement`.
pub fn verify_signature(key: &VerifyingKey, statement: &str, sig: &str) -> bool {
    let Ok(bytes) = STANDARD.decode(sig) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(&bytes) else {
        return false;
    };
    key.verify(statement.as_bytes(), &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_with_the_right_key_and_statement() {
        let a = Signer::generate();
        let b = Signer::generate();
        let s = checkpoint_statement(7, "ab");
        let sig = a.sign(&s);
        assert!(verify_signature(&a.verifying_key(), &s, &sig));
        assert!(!verify_signature(&b.verifying_key(), &s, &sig));
        assert!(!verify_signature(
            &a.verifying_key(),
            &checkpoint_statement(8, "ab"),
            &sig
        ));
        assert!(!verify_signature(&a.verifying_key(), &s, "not base64!"));
        let public = public_key_from_pem(&a.public_key_pem()).unwrap();
        assert_eq!(kid_of(&public), a.kid());
    }

    #[test]
    fn bad_pem_is_an_error() {
        assert!(Signer::from_pem("nope").is_err());
        assert!(public_key_from_pem("nope").is_err());
    }
}
