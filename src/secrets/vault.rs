//! The vault's cryptography: `vault.key` and XChaCha20-Poly1305 sealing of
//! values with the secret's name as associated data (SPEC §10 Store).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, Zeroizing};

use super::SecretError;

/// Associated data prefix; the secret's name follows.
const AD_LABEL: &str = "secrets-agent/v1/secret\n";
/// The name under which the key-check value is sealed (not a valid secret
/// name, so no secret can collide with it).
pub const KEY_CHECK_NAME: &str = "\u{0}key-check";
const KEY_CHECK_TEXT: &[u8] = b"secrets-agent vault key check";
const NONCE_LEN: usize = 24;

/// A secret's value in memory: zeroized on drop, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    pub fn new(s: String) -> SecretValue {
        SecretValue(Zeroizing::new(s))
    }
    /// The value, for the one place that hands it on.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for SecretValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretValue::new)
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue([redacted])")
    }
}

/// The 256-bit vault key. Never logged; zeroized on drop.
pub struct VaultKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaultKey([redacted])")
    }
}

impl VaultKey {
    /// Reads `path` (exactly 32 bytes).
    pub fn load(path: &Path) -> Result<Option<VaultKey>, SecretError> {
        match std::fs::read(path) {
            Ok(mut bytes) => {
                if bytes.len() != 32 {
                    bytes.zeroize();
                    return Err(SecretError::BadKeyFile(format!(
                        "{} is not a vault key (it must be exactly 32 bytes); restore the right file from your backup",
                        path.display()
                    )));
                }
                let mut k = Zeroizing::new([0u8; 32]);
                k.copy_from_slice(&bytes);
                bytes.zeroize();
                Ok(Some(VaultKey(k)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SecretError::BadKeyFile(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Makes a new random key at `path` (mode 0600); never replaces a file.
    pub fn create(path: &Path) -> Result<VaultKey, SecretError> {
        let k = Zeroizing::new(crate::ids::random_bytes::<32>());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                SecretError::BadKeyFile(format!("cannot create {}: {e}", path.display()))
            })?;
        f.write_all(&k[..])
            .and_then(|()| f.sync_all())
            .map_err(|e| {
                SecretError::BadKeyFile(format!("cannot write {}: {e}", path.display()))
            })?;
        Ok(VaultKey(k))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.0).into())
    }

    /// nonce ‖ ciphertext of `plain`, bound to `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let nonce = crate::ids::random_bytes::<NONCE_LEN>();
        let ad = format!("{AD_LABEL}{name}");
        let ct = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: ad.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for these sizes");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// The plaintext sealed under `name`, or None if it does not verify
    /// (another key, another name, or altered bytes).
    pub fn open(&self, name: &str, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let ad = format!("{AD_LABEL}{name}");
        self.cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: ad.as_bytes(),
                },
            )
            .ok()
            .map(Zeroizing::new)
    }

    /// The key-check value stored beside the secrets.
    pub fn make_check(&self) -> Vec<u8> {
        self.seal(KEY_CHECK_NAME, KEY_CHECK_TEXT)
    }

    /// Whether `check` was made with this key.
    pub fn verifies_check(&self, check: &[u8]) -> bool {
        self.open(KEY_CHECK_NAME, check)
            .is_some_and(|p| p.as_slice() == KEY_CHECK_TEXT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_opens_only_under_its_name_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = VaultKey::create(&dir.path().join("k")).unwrap();
        let sealed = k.seal("A", b"hello");
        assert_eq!(k.open("A", &sealed).unwrap().as_slice(), b"hello");
        assert!(k.open("B", &sealed).is_none());
        let other = VaultKey::create(&dir.path().join("k2")).unwrap();
        assert!(other.open("A", &sealed).is_none());
        assert!(!other.verifies_check(&k.make_check()));
        assert!(k.verifies_check(&k.make_check()));
        assert!(
            VaultKey::create(&dir.path().join("k")).is_err(),
            "never replaced"
        );
        assert_eq!(
            format!("{:?}", SecretValue::new("xyz".into())),
            "SecretValue([redacted])"
        );
    }
}
