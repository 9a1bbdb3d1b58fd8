//! Pairing codes: making them for the owner (`secrets-agent pair`, and
//! `serve` when no device is paired yet) and the keyed hash they are stored
//! and looked up by.
//!
//! A code is `XXXX-XXXX` from Crockford's base32 (40 bits). `agent.db` holds
//! only HMAC-SHA256(key, normalised code) with the key derived from
//! `server.key` (see [`PairingCodeKey`]): a copy of the database alone
//! reveals no live code, not even by testing all 2^40 guesses.

use serde_json::json;

use super::keys::{PairingCodeKey, ServerKey};
use crate::clock::rfc3339_ms;
use crate::storage::devices::insert_pairing_code;
use crate::storage::{Db, StorageError, get_meta};

/// What `pair --json` prints. `code` is the secret the owner gives the phone.
#[derive(Debug)]
pub struct PairingOffer {
    pub code: String,
    pub expires_at_ms: i64,
    pub server_key: String,
    pub url: String,
    /// Lowercase hex SHA-256 of the TLS certificate's SubjectPublicKeyInfo,
    /// when TLS is configured (the phone pins it, SPEC §2).
    pub tls_spki_sha256: Option<String>,
}

impl PairingOffer {
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({"code": self.code, "expires_at": rfc3339_ms(self.expires_at_ms), "server_key": self.server_key, "url": self.url});
        if let Some(pin) = &self.tls_spki_sha256 {
            v["tls_spki_sha256"] = json!(pin);
        }
        v
    }
}

/// Meta key holding the URL of the address the server last started on.
pub const LISTEN_URL_KEY: &str = "listen_url";

const CODE_ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A fresh code `XXXX-XXXX` (40 random bits).
fn new_code() -> String {
    let raw = crate::ids::random_bytes::<8>();
    let chars: String = raw
        .iter()
        .map(|b| CODE_ALPHABET[(*b as usize) % 32] as char)
        .collect();
    format!("{}-{}", &chars[..4], &chars[4..])
}

/// The stored form of a code: the keyed hash of its normalised form (upper
/// case, no dashes or spaces), so lookup ignores case, dashes and spaces.
pub fn code_hash(key: &PairingCodeKey, code: &str) -> String {
    let normalised: String = code
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    key.mac_hex(normalised.as_bytes())
}

/// Creates a code valid for `ttl_secs`; `fallback_url` is used when no server
/// on this data dir has recorded its address yet.
pub fn create_offer(
    db: &Db,
    now_ms: i64,
    ttl_secs: u64,
    key: &ServerKey,
    fallback_url: String,
) -> Result<PairingOffer, StorageError> {
    let code = new_code();
    let hash = code_hash(key.pairing_code_key(), &code);
    db.blocking(|c| {
        let expires_at_ms = insert_pairing_code(c, &hash, now_ms, ttl_secs)?;
        let url = get_meta(c, LISTEN_URL_KEY)?.unwrap_or(fallback_url);
        Ok(PairingOffer {
            code,
            expires_at_ms,
            server_key: key.public_b64().to_string(),
            url,
            tls_spki_sha256: None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::devices::code_is_live;

    #[test]
    fn only_the_keyed_hash_is_stored_and_lookup_is_normalised() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        let key = ServerKey::from_seed([9u8; 32]);
        let offer = create_offer(&db, 1000, 300, &key, "ws://x/ws".into()).unwrap();
        let code = offer.code.clone();
        let plain = crate::auth::keys::sha256_hex(code.replace('-', "").as_bytes());
        db.blocking(|c| {
            let stored: String =
                c.query_row("SELECT code_hash FROM pairing_codes", [], |r| r.get(0))?;
            assert_ne!(stored, plain, "not the plain SHA-256");
            assert!(!stored.contains(&code[..4]));
            let k = key.pairing_code_key();
            assert!(code_is_live(c, &code_hash(k, &code), 2000)?);
            let sloppy = code.to_lowercase().replace('-', " ");
            assert!(code_is_live(c, &code_hash(k, &sloppy), 2000)?);
            assert!(
                !code_is_live(c, &code_hash(k, &code), 1000 + 300_000)?,
                "expired"
            );
            let other = ServerKey::from_seed([8u8; 32]);
            assert!(
                !code_is_live(c, &code_hash(other.pairing_code_key(), &code), 2000)?,
                "another server's key does not find it"
            );
            Ok(())
        })
        .unwrap();
    }
}
