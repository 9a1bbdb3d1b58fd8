//! The frames a connection sends before it is authenticated (SPEC §4), as
//! typed structs. Pure: the shape of each frame is checked here (presence
//! and JSON types of fields); `auth::handshake` checks what they mean
//! (base64 and key lengths, signatures, the code, the device).

use serde::Deserialize;
use serde_json::Value;

/// What the answer to a `challenge` declares about itself: its `type`
/// (`auth` or `pair`) and `protocol`. Read first, so that the rate limits
/// of the right kind apply before anything else is looked at.
#[derive(Debug, Deserialize)]
pub struct HandshakeHead {
    #[serde(rename = "type", default)]
    pub kind: Option<Value>,
    #[serde(default)]
    pub protocol: Option<Value>,
}

impl HandshakeHead {
    /// `auth` or `pair`; None for anything else.
    pub fn kind(&self) -> Option<&str> {
        match self.kind.as_ref().and_then(Value::as_str) {
            Some(k @ ("auth" | "pair")) => Some(k),
            _ => None,
        }
    }
}

/// `{"type":"auth",...}`: a paired device answers the challenge.
#[derive(Debug, Deserialize)]
pub struct AuthFrame {
    pub device_id: String,
    pub nonce: String,
    /// Base64url of 32 random bytes chosen by the device.
    pub client_nonce: String,
    pub ts: i64,
    /// Base64url Ed25519 signature over the auth string (SPEC §4).
    pub signature: String,
}

/// `{"type":"pair",...}`: a new device pairs with a one-time code.
#[derive(Debug, Deserialize)]
pub struct PairFrame {
    pub code: String,
    pub device_name: String,
    /// Base64url of the 32-byte Ed25519 session key.
    pub device_public_key: String,
    /// `ed25519` (absent or null), `es256` or `webauthn-es256`.
    #[serde(default)]
    pub approval_key_alg: Option<String>,
    pub approval_public_key: String,
    pub client_nonce: String,
    pub signature: String,
    /// Base64url signature bytes, or for `webauthn-es256` the assertion
    /// object (SPEC §11).
    #[serde(default)]
    pub approval_signature: Value,
    /// For `webauthn-es256`: the passkey's credential id, base64url.
    #[serde(default)]
    pub webauthn_credential_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_parse_and_wrong_types_are_named() {
        let head: HandshakeHead =
            serde_json::from_value(json!({"type": "pair", "protocol": 1})).unwrap();
        assert_eq!(head.kind(), Some("pair"));
        let head: HandshakeHead = serde_json::from_value(json!({"type": 7})).unwrap();
        assert_eq!(head.kind(), None);
        let e = serde_json::from_value::<AuthFrame>(json!({"device_id": "d", "nonce": "n", "client_nonce": "c", "ts": "1", "signature": "s"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type"), "{e}");
        let e = serde_json::from_value::<AuthFrame>(json!({"nonce": "n"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field"), "{e}");
    }
}
