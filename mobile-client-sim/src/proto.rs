//! The signed byte strings and encodings of SPEC §4 and §8, from the phone's side.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const AUTH: &str = "secrets-agent/v1/auth";
pub const AUTH_OK: &str = "secrets-agent/v1/auth-ok";
pub const PAIR: &str = "secrets-agent/v1/pair";
pub const APPROVAL: &str = "secrets-agent/v1/approval";

pub fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

pub fn unb64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

pub fn nonce32() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b64(&b)
}

pub fn lines(parts: &[&str]) -> String {
    parts.join("\n")
}

pub fn auth_string(
    server_key: &str,
    nonce: &str,
    device_id: &str,
    client_nonce: &str,
    ts: i64,
) -> String {
    lines(&[
        AUTH,
        server_key,
        nonce,
        device_id,
        client_nonce,
        &ts.to_string(),
    ])
}

pub fn auth_ok_string(
    server_key: &str,
    session_id: &str,
    device_id: &str,
    client_nonce: &str,
) -> String {
    lines(&[AUTH_OK, server_key, session_id, device_id, client_nonce])
}

pub fn pair_string(
    server_key: &str,
    nonce: &str,
    code: &str,
    device_pk: &str,
    approval_pk: &str,
    client_nonce: &str,
) -> String {
    lines(&[
        PAIR,
        server_key,
        nonce,
        code,
        device_pk,
        approval_pk,
        client_nonce,
    ])
}

pub fn approval_string(
    approval_id: &str,
    action_digest: &str,
    challenge: &str,
    decision: &str,
) -> String {
    lines(&[APPROVAL, approval_id, action_digest, challenge, decision])
}

/// hex SHA-256 of JCS({"action","params"}): what the phone recomputes before
/// it signs, so it never approves something other than what it shows.
pub fn action_digest(action: &str, params: &Value) -> String {
    let canon =
        serde_jcs::to_string(&json!({"action": action, "params": params})).unwrap_or_default();
    hex::encode(Sha256::digest(canon.as_bytes()))
}

/// `device_id` = lowercase hex of the first 16 bytes of SHA-256(public key).
pub fn device_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..16])
}
