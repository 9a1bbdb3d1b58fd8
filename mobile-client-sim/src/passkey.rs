//! A software passkey: a WebAuthn ES256 authenticator that makes the
//! assertions a browser makes (SPEC §11), for simulating the web
//! companion's approval key (`approval_key_alg` `webauthn-es256`) without
//! a browser. Every knob is open (client data, rp id, flags, count), so
//! tests can make the assertions a browser never would.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer as _;
use p256::pkcs8::EncodePublicKey as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Authenticator-data flag: the user was present.
pub const FLAG_UP: u8 = 0x01;
/// Authenticator-data flag: the user was verified (biometric or PIN).
pub const FLAG_UV: u8 = 0x04;

/// A P-256 key with a signature counter and a credential id.
pub struct SoftPasskey {
    pub key: SigningKey,
    /// The counter of the last assertion made by [`SoftPasskey::assert`].
    pub count: u32,
    pub credential_id: Vec<u8>,
}

impl Default for SoftPasskey {
    fn default() -> Self {
        Self::new()
    }
}

impl SoftPasskey {
    pub fn new() -> SoftPasskey {
        SoftPasskey {
            key: SigningKey::random(&mut rand::rngs::OsRng),
            count: 0,
            credential_id: b"credential-1".to_vec(),
        }
    }

    /// The public key as a SubjectPublicKeyInfo (DER): the pairing's
    /// `approval_public_key`.
    pub fn spki(&self) -> Vec<u8> {
        self.key
            .verifying_key()
            .to_public_key_der()
            .expect("a P-256 key encodes")
            .as_bytes()
            .to_vec()
    }

    /// [`SoftPasskey::spki`], base64url.
    pub fn spki_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.spki())
    }

    /// An assertion with every knob: client data, rp id, flags, count.
    pub fn assert_with(&self, client_data: &Value, rp: &str, flags: u8, count: u32) -> Value {
        let mut ad = Sha256::digest(rp.as_bytes()).to_vec();
        ad.push(flags);
        ad.extend_from_slice(&count.to_be_bytes());
        let cdj = serde_json::to_vec(client_data).expect("JSON serialises");
        let mut msg = ad.clone();
        msg.extend_from_slice(&Sha256::digest(&cdj));
        let sig: p256::ecdsa::Signature = self.key.sign(&msg);
        json!({
            "authenticator_data": URL_SAFE_NO_PAD.encode(&ad),
            "client_data_json": URL_SAFE_NO_PAD.encode(&cdj),
            "signature": URL_SAFE_NO_PAD.encode(sig.to_der().as_bytes()),
        })
    }

    /// What a browser on `origin` sends for `signed`: the next count, user
    /// present and verified, the rp id the origin's host.
    pub fn assert(&mut self, origin: &str, signed: &[u8]) -> Value {
        self.count += 1;
        let cd = client_data("webauthn.get", signed, origin);
        self.assert_with(&cd, rp_id(origin), FLAG_UP | FLAG_UV, self.count)
    }
}

/// The client data a browser signs for `signed` on `origin`: its
/// challenge is base64url SHA-256 of the signed bytes (SPEC §11).
pub fn client_data(ty: &str, signed: &[u8], origin: &str) -> Value {
    json!({"type": ty, "challenge": URL_SAFE_NO_PAD.encode(Sha256::digest(signed)),
           "origin": origin, "crossOrigin": false})
}

/// The rp id of `origin`: its host.
pub fn rp_id(origin: &str) -> &str {
    let rest = origin.split_once("://").map_or(origin, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or(rest);
    match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host_port.split(':').next().unwrap_or(host_port),
    }
}
