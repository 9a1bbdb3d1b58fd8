//! Making pairing codes for the owner (`secrets-agent pair`, and `serve` when
//! no device is paired yet).

use serde_json::json;

use crate::clock::rfc3339_ms;
use crate::storage::devices::create_pairing_code;
use crate::storage::{Db, StorageError, get_meta};

/// What `pair --json` prints. `code` is the secret the owner gives the phone.
#[derive(Debug)]
pub struct PairingOffer {
    pub code: String,
    pub expires_at_ms: i64,
    pub server_key: String,
    pub url: String,
}

impl PairingOffer {
    pub fn to_json(&self) -> serde_json::Value {
        json!({"code": self.code, "expires_at": rfc3339_ms(self.expires_at_ms), "server_key": self.server_key, "url": self.url})
    }
}

/// Meta key holding the URL of the address the server last started on.
pub const LISTEN_URL_KEY: &str = "listen_url";

/// Creates a code valid for `ttl_secs`; `fallback_url` is used when no server
/// on this data dir has recorded its address yet.
pub fn create_offer(
    db: &Db,
    now_ms: i64,
    ttl_secs: u64,
    server_key: &str,
    fallback_url: String,
) -> Result<PairingOffer, StorageError> {
    db.blocking(|c| {
        let (code, expires_at_ms) = create_pairing_code(c, now_ms, ttl_secs)?;
        let url = get_meta(c, LISTEN_URL_KEY)?.unwrap_or(fallback_url);
        Ok(PairingOffer {
            code,
            expires_at_ms,
            server_key: server_key.to_string(),
            url,
        })
    })
}
