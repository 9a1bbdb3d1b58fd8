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

/// The commitment TAG of SPEC §8 (v1.1): the first 16 lowercase hex
/// characters of HMAC-SHA256(key = K, message). A string secret is committed
/// over its UTF-8 bytes; this server commits any other JSON value over its
/// RFC 8785 (JCS) text.
pub fn commitment_tag(key: &[u8], message: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    hex::encode(&mac.finalize().into_bytes()[..8])
}

/// Checks that `shown` (an approval request's params) shows exactly the
/// params this phone `sent`: every value equal, except that a value shown as
/// `"[redacted:TAG]"` must be the commitment of the sent value under `key`
/// (the requester's `commitment_key`). Err names the first path that
/// differs (never a value).
pub fn check_own_params(sent: &Value, shown: &Value, key: Option<&[u8]>) -> Result<(), String> {
    check_at(sent, shown, key, "params")
}

fn check_at(sent: &Value, shown: &Value, key: Option<&[u8]>, path: &str) -> Result<(), String> {
    if sent == shown {
        return Ok(());
    }
    match (sent, shown) {
        (Value::Object(a), Value::Object(b)) => {
            if a.len() != b.len() || a.keys().any(|k| !b.contains_key(k)) {
                return Err(format!("{path}: other keys than the ones sent"));
            }
            for (k, v) in a {
                check_at(v, &b[k], key, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                check_at(x, y, key, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (sent, Value::String(s)) if s.starts_with("[redacted:") && s.ends_with(']') => {
            let tag = &s["[redacted:".len()..s.len() - 1];
            let Some(key) = key else {
                return Err(format!("{path}: committed, but no commitment_key arrived"));
            };
            let message = match sent {
                Value::String(v) => v.clone(),
                other => serde_jcs::to_string(other).unwrap_or_default(),
            };
            if commitment_tag(key, message.as_bytes()) == tag {
                Ok(())
            } else {
                Err(format!(
                    "{path}: the commitment is not the one of the value sent"
                ))
            }
        }
        _ => Err(format!("{path}: differs from what was sent")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_params_check_accepts_the_right_commitment_and_refuses_others() {
        let k = [9u8; 32];
        let sent = json!({"section": "llm", "value": {"api_key": "sk-1", "model": "m"}});
        let shown = |tag: &str| json!({"section": "llm", "value": {"api_key": format!("[redacted:{tag}]"), "model": "m"}});
        let good = commitment_tag(&k, b"sk-1");
        assert_eq!(good.len(), 16);
        assert!(check_own_params(&sent, &shown(&good), Some(&k)).is_ok());
        // A tag over another value, a forged tag, no key, another key.
        let other = commitment_tag(&k, b"sk-2");
        assert!(check_own_params(&sent, &shown(&other), Some(&k)).is_err());
        assert!(check_own_params(&sent, &shown("0000000000000000"), Some(&k)).is_err());
        assert!(check_own_params(&sent, &shown(&good), None).is_err());
        assert!(check_own_params(&sent, &shown(&good), Some(&[8u8; 32])).is_err());
        // Other params beside the secret.
        let mut changed = shown(&good);
        changed["value"]["model"] = json!("evil");
        assert!(check_own_params(&sent, &changed, Some(&k)).is_err());
        changed = shown(&good);
        changed["value"]["provider"] = json!("x");
        assert!(check_own_params(&sent, &changed, Some(&k)).is_err());
        // An empty secret is shown as "", not committed.
        let empty = json!({"value": {"api_key": ""}});
        assert!(check_own_params(&empty, &empty, None).is_ok());
        // Errors never carry the value.
        let e = check_own_params(&sent, &shown(&other), Some(&k)).unwrap_err();
        assert!(!e.contains("sk-1"), "{e}");
    }
}
