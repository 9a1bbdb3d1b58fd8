//! Keys and signatures: the server's Ed25519 identity, the signed strings of
//! SPEC §4, base64url, device ids, and approval-key verification (Ed25519 or
//! ES256).

use std::fs;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

pub const AUTH_LABEL: &str = "secrets-agent/v1/auth";
pub const AUTH_OK_LABEL: &str = "secrets-agent/v1/auth-ok";
pub const PAIR_LABEL: &str = "secrets-agent/v1/pair";
pub const APPROVAL_LABEL: &str = "secrets-agent/v1/approval";

/// base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url; trailing `=` padding is tolerated.
pub fn unb64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// Randomness lives in [`crate::ids`]; re-exported for the callers here.
pub use crate::ids::random_bytes;

/// Lines joined by `\n`, no trailing newline (SPEC §4).
pub fn signed_string(lines: &[&str]) -> String {
    lines.join("\n")
}

/// `device_id` = lowercase hex of the first 16 bytes of SHA-256(public key).
pub fn device_id_for(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..16])
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The server's long-lived Ed25519 identity (`DIR/server.key`, 32-byte seed, mode 0600).
pub struct ServerKey {
    signing: SigningKey,
    public_b64: String,
    pairing_code_key: PairingCodeKey,
}

/// The key of the pairing codes' keyed hash (HMAC-SHA256), derived from the
/// server's seed: it lives in `server.key`, never in `agent.db`, so a copy of
/// the database does not let anyone test guesses against a live code.
#[derive(Clone)]
pub struct PairingCodeKey([u8; 32]);

impl std::fmt::Debug for PairingCodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairingCodeKey([redacted])")
    }
}

impl PairingCodeKey {
    /// hex HMAC-SHA256(key, message).
    pub fn mac_hex(&self, message: &[u8]) -> String {
        hmac_sha256_hex(&self.0, message)
    }
}

/// Lowercase hex HMAC-SHA256.
pub fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKey")
            .field("public", &self.public_b64)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a 32-byte Ed25519 seed (it has {len} bytes); restore it from backup or remove it to make a new identity (every device must then pair again)"
    )]
    Malformed { path: String, len: usize },
}

impl ServerKey {
    /// Loads `path`, creating it (0600) on first use.
    pub fn load_or_create(path: &Path) -> Result<ServerKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match fs::read(path) {
            Ok(bytes) => {
                let seed: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| KeyError::Malformed {
                            path: path.display().to_string(),
                            len: bytes.len(),
                        })?;
                Ok(Self::from_seed(seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let seed = random_bytes::<32>();
                let mut opts = fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                let mut f = opts.open(path).map_err(io)?;
                f.write_all(&seed).map_err(io)?;
                f.sync_all().map_err(io)?;
                Ok(Self::from_seed(seed))
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn from_seed(seed: [u8; 32]) -> ServerKey {
        let signing = SigningKey::from_bytes(&seed);
        let public_b64 = b64(signing.verifying_key().as_bytes());
        let derived = hmac_sha256_hex(&seed, b"secrets-agent/v1/pairing-code-key");
        let mut pairing_code_key = [0u8; 32];
        hex::decode_to_slice(derived, &mut pairing_code_key).expect("64 hex chars");
        ServerKey {
            signing,
            public_b64,
            pairing_code_key: PairingCodeKey(pairing_code_key),
        }
    }

    /// The public key as it appears in frames (`server_key`).
    pub fn public_b64(&self) -> &str {
        &self.public_b64
    }

    /// The key pairing codes are hashed with.
    pub fn pairing_code_key(&self) -> &PairingCodeKey {
        &self.pairing_code_key
    }

    /// Signs the AUTH_OK string for a session (SPEC §4).
    pub fn sign_auth_ok(&self, session_id: &str, device_id: &str, client_nonce: &str) -> String {
        let msg = signed_string(&[
            AUTH_OK_LABEL,
            &self.public_b64,
            session_id,
            device_id,
            client_nonce,
        ]);
        b64(&self.signing.sign(msg.as_bytes()).to_bytes())
    }
}

/// Verifies an Ed25519 signature by a 32-byte public key.
pub fn verify_ed25519(public_key: &[u8], msg: &[u8], signature: &[u8]) -> bool {
    let Ok(pk) = <[u8; 32]>::try_from(public_key) else {
        return false;
    };
    let Ok(vk) = VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    vk.verify_strict(msg, &sig).is_ok()
}

/// The approval key algorithms a phone may pair with (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalAlg {
    Ed25519,
    Es256,
    /// A WebAuthn passkey (SPEC §11): the key is a P-256 SubjectPublicKeyInfo
    /// and its signatures are assertion objects, checked by `auth::webauthn`.
    WebauthnEs256,
}

impl ApprovalAlg {
    pub fn parse(s: &str) -> Option<ApprovalAlg> {
        match s {
            "ed25519" => Some(ApprovalAlg::Ed25519),
            "es256" => Some(ApprovalAlg::Es256),
            "webauthn-es256" => Some(ApprovalAlg::WebauthnEs256),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalAlg::Ed25519 => "ed25519",
            ApprovalAlg::Es256 => "es256",
            ApprovalAlg::WebauthnEs256 => "webauthn-es256",
        }
    }
    /// Whether `public_key` is well-formed for this algorithm.
    pub fn valid_public_key(self, public_key: &[u8]) -> bool {
        match self {
            ApprovalAlg::Ed25519 => <[u8; 32]>::try_from(public_key)
                .ok()
                .and_then(|k| VerifyingKey::from_bytes(&k).ok())
                .is_some(),
            ApprovalAlg::Es256 => {
                public_key.len() == 65
                    && public_key[0] == 4
                    && p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key).is_ok()
            }
            ApprovalAlg::WebauthnEs256 => super::webauthn::valid_public_key(public_key),
        }
    }
    /// Verifies `signature` over `msg` with this algorithm. ES256 is ECDSA
    /// P-256 over SHA-256(msg), DER-encoded. A WebAuthn key never verifies
    /// plain bytes: its signatures are assertion objects (`auth::webauthn`).
    pub fn verify(self, public_key: &[u8], msg: &[u8], signature: &[u8]) -> bool {
        match self {
            ApprovalAlg::WebauthnEs256 => false,
            ApprovalAlg::Ed25519 => verify_ed25519(public_key, msg, signature),
            ApprovalAlg::Es256 => {
                use p256::ecdsa::signature::Verifier as _;
                if public_key.len() != 65 {
                    return false;
                }
                let Ok(vk) = p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key) else {
                    return false;
                };
                let Ok(sig) = p256::ecdsa::DerSignature::from_bytes(signature) else {
                    return false;
                };
                let Ok(sig) = p256::ecdsa::Signature::try_from(sig) else {
                    return false;
                };
                vk.verify(msg, &sig).is_ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_is_32_hex_chars_of_sha256_prefix() {
        let id = device_id_for(&[7u8; 32]);
        assert_eq!(id.len(), 32);
        assert_eq!(id, hex::encode(&Sha256::digest([7u8; 32])[..16]));
    }

    #[test]
    fn es256_and_ed25519_do_not_cross_verify() {
        use p256::ecdsa::signature::Signer as _;
        let msg = b"secrets-agent/v1/approval\nx";
        let p = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let pk = p
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec();
        let sig: p256::ecdsa::Signature = p.sign(msg);
        let der = sig.to_der().as_bytes().to_vec();
        assert!(ApprovalAlg::Es256.verify(&pk, msg, &der));
        assert!(!ApprovalAlg::Ed25519.verify(&pk, msg, &der));
        let e = SigningKey::from_bytes(&[3u8; 32]);
        let esig = e.sign(msg).to_bytes();
        assert!(ApprovalAlg::Ed25519.verify(e.verifying_key().as_bytes(), msg, &esig));
        assert!(!ApprovalAlg::Es256.verify(e.verifying_key().as_bytes(), msg, &esig));
        assert!(!ApprovalAlg::Es256.verify(&pk, b"other", &der));
    }

    #[test]
    fn b64_tolerates_padding() {
        assert_eq!(unb64("AQ==").unwrap(), vec![1]);
        assert_eq!(unb64("AQ").unwrap(), vec![1]);
        assert!(unb64("+/").is_none());
    }
}
