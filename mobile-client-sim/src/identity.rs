//! The phone's keys: an Ed25519 device key and a biometric-bound approval key
//! (Ed25519, or P-256 as in a Secure Enclave / StrongBox), persisted in a
//! state directory together with the pinned server key.

use std::path::{Path, PathBuf};

use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};

use crate::proto::{b64, device_id, unb64};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalAlg {
    Ed25519,
    Es256,
}

impl ApprovalAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalAlg::Ed25519 => "ed25519",
            ApprovalAlg::Es256 => "es256",
        }
    }
}

impl std::str::FromStr for ApprovalAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ed25519" => Ok(ApprovalAlg::Ed25519),
            "es256" => Ok(ApprovalAlg::Es256),
            _ => Err(format!(
                "unknown approval algorithm {s:?} (ed25519 | es256)"
            )),
        }
    }
}

#[derive(Clone)]
enum ApprovalKey {
    Ed25519(ed25519_dalek::SigningKey),
    Es256(p256::ecdsa::SigningKey),
}

/// The server this phone paired with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pinned {
    pub url: String,
    pub server_key: String,
    pub device_id: String,
    /// The TLS key pinned at pairing (`wss://`), if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_spki_sha256: Option<String>,
}

#[derive(Clone)]
pub struct Identity {
    pub device_name: String,
    device_key: ed25519_dalek::SigningKey,
    approval_key: ApprovalKey,
    pub pinned: Option<Pinned>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device_id", &self.device_id())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    device_name: String,
    device_seed: String,
    approval_key_alg: ApprovalAlg,
    approval_secret: String,
    pinned: Option<Pinned>,
}

const FILE: &str = "identity.json";

impl Identity {
    pub fn generate(device_name: &str, alg: ApprovalAlg) -> Identity {
        let mut rng = rand::rngs::OsRng;
        let approval_key = match alg {
            ApprovalAlg::Ed25519 => {
                ApprovalKey::Ed25519(ed25519_dalek::SigningKey::generate(&mut rng))
            }
            ApprovalAlg::Es256 => ApprovalKey::Es256(p256::ecdsa::SigningKey::random(&mut rng)),
        };
        Identity {
            device_name: device_name.to_string(),
            device_key: ed25519_dalek::SigningKey::generate(&mut rng),
            approval_key,
            pinned: None,
        }
    }

    pub fn approval_alg(&self) -> ApprovalAlg {
        match self.approval_key {
            ApprovalKey::Ed25519(_) => ApprovalAlg::Ed25519,
            ApprovalKey::Es256(_) => ApprovalAlg::Es256,
        }
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.device_key.verifying_key().to_bytes().to_vec()
    }

    pub fn public_key_b64(&self) -> String {
        b64(&self.public_key())
    }

    pub fn device_id(&self) -> String {
        device_id(&self.public_key())
    }

    pub fn approval_public_key(&self) -> Vec<u8> {
        match &self.approval_key {
            ApprovalKey::Ed25519(k) => k.verifying_key().to_bytes().to_vec(),
            ApprovalKey::Es256(k) => k
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec(),
        }
    }

    pub fn approval_public_key_b64(&self) -> String {
        b64(&self.approval_public_key())
    }

    /// Ed25519 signature by the device key, base64url.
    pub fn sign_device(&self, msg: &str) -> String {
        b64(&self.device_key.sign(msg.as_bytes()).to_bytes())
    }

    /// Signature by the approval key (after the biometric check on a real
    /// phone): Ed25519, or ECDSA P-256 over SHA-256, DER-encoded.
    pub fn sign_approval(&self, msg: &str) -> String {
        match &self.approval_key {
            ApprovalKey::Ed25519(k) => b64(&k.sign(msg.as_bytes()).to_bytes()),
            ApprovalKey::Es256(k) => {
                let sig: p256::ecdsa::Signature =
                    p256::ecdsa::signature::Signer::sign(k, msg.as_bytes());
                b64(sig.to_der().as_bytes())
            }
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    /// Saves to `state_dir/identity.json` (mode 0600).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let approval_secret = match &self.approval_key {
            ApprovalKey::Ed25519(k) => b64(&k.to_bytes()),
            ApprovalKey::Es256(k) => b64(&k.to_bytes()),
        };
        let stored = Stored {
            device_name: self.device_name.clone(),
            device_seed: b64(&self.device_key.to_bytes()),
            approval_key_alg: self.approval_alg(),
            approval_secret,
            pinned: self.pinned.clone(),
        };
        let text = serde_json::to_string_pretty(&stored).map_err(std::io::Error::other)?;
        let path = Self::path(state_dir);
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(tmp, path)
    }

    pub fn load(state_dir: &Path) -> std::io::Result<Identity> {
        let text = std::fs::read_to_string(Self::path(state_dir))?;
        let s: Stored = serde_json::from_str(&text).map_err(std::io::Error::other)?;
        let bad = || std::io::Error::other("identity.json holds a malformed key");
        let seed: [u8; 32] = unb64(&s.device_seed)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        let secret = unb64(&s.approval_secret).ok_or_else(bad)?;
        let approval_key = match s.approval_key_alg {
            ApprovalAlg::Ed25519 => ApprovalKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(
                &secret.try_into().map_err(|_| bad())?,
            )),
            ApprovalAlg::Es256 => {
                ApprovalKey::Es256(p256::ecdsa::SigningKey::from_slice(&secret).map_err(|_| bad())?)
            }
        };
        Ok(Identity {
            device_name: s.device_name,
            device_key: ed25519_dalek::SigningKey::from_bytes(&seed),
            approval_key,
            pinned: s.pinned,
        })
    }
}
