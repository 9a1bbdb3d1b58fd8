//! Secret commitments in approval params (SPEC §8, v1.1).
//!
//! An approval request never shows a secret, yet two requests with different
//! secrets must not share an `action_digest`. Each non-empty secret value is
//! shown as `"[redacted:" + TAG + "]"`, TAG = the first 16 lowercase hex
//! characters of HMAC-SHA256(K, value), K being 32 random bytes made for this
//! approval and sent only to the requesting session. Without K nobody can
//! test guesses against a TAG; with it the requester can check that the
//! approval commits to the value it sent.
//!
//! Values: a string is committed over its UTF-8 bytes; the empty string (a
//! secret being removed) is shown as `""`; `null` stays `null`; any other
//! JSON value (number, bool, array, object) is committed over its RFC 8785
//! (JCS) text, so it is never shown either.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::auth::keys::b64;
use crate::ids::random_bytes;
use crate::redact::SECRET_KEYS;

/// A per-approval commitment key. Never stored, logged or audited: it goes
/// once into the requester's `approval_pending` event and is then dropped.
pub(crate) struct CommitmentKey([u8; 32]);

impl std::fmt::Debug for CommitmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitmentKey([redacted])")
    }
}

impl CommitmentKey {
    pub(crate) fn generate() -> CommitmentKey {
        CommitmentKey(random_bytes::<32>())
    }

    /// base64url without padding, as sent in `commitment_key`.
    pub(crate) fn to_b64(&self) -> String {
        b64(&self.0)
    }

    /// The TAG for `message`: 16 lowercase hex characters.
    pub(crate) fn tag(&self, message: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(message);
        let out = mac.finalize().into_bytes();
        hex::encode(&out[..8])
    }
}

/// A copy of `params` with every secret value replaced by its commitment
/// under `key`, and whether any value was committed (then the requester
/// needs `key`).
pub(crate) fn commit_secrets(params: &Value, key: &CommitmentKey) -> (Value, bool) {
    let mut committed = false;
    let v = walk(params, key, &mut committed);
    (v, committed)
}

/// [`commit_secrets`] that also commits `action`'s own secret params
/// (`redact::action_secret_paths`, e.g. `set_secret`'s `value`).
pub(crate) fn commit_action_secrets(
    action: &str,
    params: &Value,
    key: &CommitmentKey,
) -> (Value, bool) {
    let mut committed = false;
    let masked = crate::redact::mask_action_secrets(action, params, &mut |v| {
        commit_one(v, key, &mut committed)
    });
    let (v, more) = commit_secrets(&masked, key);
    (v, committed || more)
}

fn walk(v: &Value, key: &CommitmentKey, committed: &mut bool) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = if SECRET_KEYS.contains(&k.as_str()) {
                        commit_one(v, key, committed)
                    } else {
                        walk(v, key, committed)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| walk(v, key, committed)).collect()),
        other => other.clone(),
    }
}

fn commit_one(v: &Value, key: &CommitmentKey, committed: &mut bool) -> Value {
    let tag = match v {
        Value::Null => return Value::Null,
        Value::String(s) if s.is_empty() => return Value::String(String::new()),
        Value::String(s) => key.tag(s.as_bytes()),
        other => key.tag(serde_jcs::to_string(other).unwrap_or_default().as_bytes()),
    };
    *committed = true;
    Value::String(format!("[redacted:{tag}]"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tags_are_hmac_sha256_truncated_and_keyed() {
        // RFC 4231 test case 2: key "Jefe", "what do ya want for nothing?".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert!(hex::encode(mac.finalize().into_bytes()).starts_with("5bdcc146bf60754e"));

        let k = CommitmentKey([7; 32]);
        let (v, committed) = commit_secrets(
            &json!({"section": "llm", "value": {"api_key": "sk-1", "model": "m"}}),
            &k,
        );
        assert!(committed);
        let shown = v["value"]["api_key"].as_str().unwrap();
        assert_eq!(shown, format!("[redacted:{}]", k.tag(b"sk-1")));
        assert_eq!(shown.len(), "[redacted:]".len() + 16);
        assert_eq!(v["value"]["model"], "m");
        let (other, _) = commit_secrets(&json!({"value": {"api_key": "sk-2"}}), &k);
        assert_ne!(other["value"]["api_key"], v["value"]["api_key"]);
        let (fresh, _) = commit_secrets(
            &json!({"value": {"api_key": "sk-1"}}),
            &CommitmentKey::generate(),
        );
        assert_ne!(
            fresh["value"]["api_key"], v["value"]["api_key"],
            "K is per approval"
        );
    }

    #[test]
    fn action_secrets_are_committed_only_where_they_are_secrets() {
        let k = CommitmentKey([3; 32]);
        let (v, c) =
            commit_action_secrets("set_secret", &json!({"name": "A", "value": "s3cr3t"}), &k);
        assert!(c);
        assert_eq!(v["value"], format!("[redacted:{}]", k.tag(b"s3cr3t")));
        assert_eq!(v["name"], "A");
        let cfg = json!({"section": "llm", "value": {"model": "m"}});
        assert_eq!(commit_action_secrets("update_config", &cfg, &k).0, cfg);
        let (v, _) = commit_action_secrets(
            "update_config",
            &json!({"section": "notify", "value": {"url": "https://ntfy.sh/x", "include_summary": true}}),
            &k,
        );
        assert!(
            v["value"]["url"]
                .as_str()
                .unwrap()
                .starts_with("[redacted:")
        );
        assert_eq!(v["value"]["include_summary"], true);
    }

    #[test]
    fn empty_null_and_non_string_values() {
        let k = CommitmentKey([1; 32]);
        let (v, committed) = commit_secrets(&json!({"api_key": "", "token": null}), &k);
        assert_eq!(v, json!({"api_key": "", "token": null}));
        assert!(!committed, "nothing to commit: no key is sent");
        let (v, committed) = commit_secrets(&json!({"password": {"b": 1, "a": [true]}}), &k);
        assert!(committed);
        assert_eq!(
            v["password"],
            format!("[redacted:{}]", k.tag(br#"{"a":[true],"b":1}"#))
        );
        assert!(!format!("{k:?}").contains("1"), "Debug never shows K");
    }
}
