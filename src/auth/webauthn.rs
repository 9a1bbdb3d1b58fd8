//! WebAuthn assertions as approval-key signatures (SPEC §11,
//! `approval_key_alg: "webauthn-es256"`): the web companion's passkey signs
//! through `navigator.credentials.get` with `challenge` = SHA-256(the signed
//! bytes), and sends `{"authenticator_data","client_data_json","signature"}`.
//!
//! [`Assertion::parse`] checks the object's shape (a malformed object is
//! `invalid_request`); [`verify`] checks everything the assertion claims
//! (any failure is `bad_signature`) and returns its signCount, which the
//! caller compares with the stored one ([`sign_count_advances`]) in the same
//! step that records the decision. Nothing here has a side effect.
//!
//! What user verification proves: the authenticator *reports* (flag UV)
//! that it verified the user — biometric, PIN or device passcode — before
//! signing. With no attestation requested, the server cannot tell a real
//! platform authenticator from software that sets the flag; it verifies the
//! claim, not that a biometric check took place.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::DecodePublicKey as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// authenticatorData flag: user present.
const FLAG_UP: u8 = 0x01;
/// authenticatorData flag: user verified.
const FLAG_UV: u8 = 0x04;
/// rpIdHash (32) + flags (1) + signCount (4).
const AUTH_DATA_MIN: usize = 37;
/// Bounds on each decoded field: an assertion is a few hundred bytes.
const MAX_AUTH_DATA: usize = 1024;
const MAX_CLIENT_DATA: usize = 2048;
const MAX_SIGNATURE: usize = 80;
/// Bounds on a credential id (WebAuthn allows up to 1023 bytes).
pub const MAX_CREDENTIAL_ID: usize = 1023;

/// A WebAuthn assertion, decoded but not yet checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Assertion {
    authenticator_data: Vec<u8>,
    client_data_json: Vec<u8>,
    signature: Vec<u8>,
}

impl std::fmt::Debug for Assertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Assertion([redacted])")
    }
}

/// Why an assertion object is malformed (`invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// Why an assertion does not verify (`bad_signature`). The reason goes to
/// the log at debug level, never to the peer beyond this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Failed(pub &'static str);

fn field(
    obj: &serde_json::Map<String, Value>,
    name: &str,
    max: usize,
) -> Result<Vec<u8>, Malformed> {
    let s = obj.get(name).and_then(Value::as_str).ok_or(Malformed(
        "the WebAuthn signature object needs base64url string fields authenticator_data, client_data_json, signature",
    ))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| Malformed("a field of the WebAuthn signature object is not base64url"))?;
    if bytes.is_empty() || bytes.len() > max {
        return Err(Malformed(
            "a field of the WebAuthn signature object is empty or too long",
        ));
    }
    Ok(bytes)
}

impl Assertion {
    /// Parses `{"authenticator_data":b64,"client_data_json":b64,"signature":b64}`;
    /// any other shape is [`Malformed`].
    pub fn parse(v: &Value) -> Result<Assertion, Malformed> {
        let obj = v.as_object().ok_or(Malformed(
            "a webauthn-es256 signature is an object {authenticator_data, client_data_json, signature}",
        ))?;
        if obj.len() != 3 {
            return Err(Malformed(
                "the WebAuthn signature object has exactly the fields authenticator_data, client_data_json, signature",
            ));
        }
        Ok(Assertion {
            authenticator_data: field(obj, "authenticator_data", MAX_AUTH_DATA)?,
            client_data_json: field(obj, "client_data_json", MAX_CLIENT_DATA)?,
            signature: field(obj, "signature", MAX_SIGNATURE)?,
        })
    }
}

/// The host of a web origin (`scheme://host[:port]`): the WebAuthn rp id.
pub fn rp_id(web_origin: &str) -> Option<&str> {
    let rest = web_origin.split_once("://")?.1;
    let host = match rest.strip_prefix('[') {
        // An IPv6 literal: never a valid rp id, but parse it honestly.
        Some(v6) => &rest[..v6.find(']')? + 2],
        None => rest.split([':', '/']).next()?,
    };
    (!host.is_empty()).then_some(host)
}

/// Whether `spki` is a P-256 SubjectPublicKeyInfo (DER), as
/// `AuthenticatorAttestationResponse.getPublicKey()` returns it.
pub fn valid_public_key(spki: &[u8]) -> bool {
    p256::ecdsa::VerifyingKey::from_public_key_der(spki).is_ok()
}

/// WebAuthn's signCount rule: if the stored or the new count is non-zero,
/// the new one must be greater (an authenticator without a counter sends 0
/// every time).
pub fn sign_count_advances(stored: u32, new: u32) -> bool {
    (stored == 0 && new == 0) || new > stored
}

/// Checks an assertion made over `signed` (the bytes an Ed25519 key would
/// have signed) on `web_origin` by the key `spki`. Ok(signCount).
pub fn verify(spki: &[u8], a: &Assertion, web_origin: &str, signed: &[u8]) -> Result<u32, Failed> {
    let cd: Value = serde_json::from_slice(&a.client_data_json)
        .map_err(|_| Failed("clientDataJSON is not JSON"))?;
    if cd.get("type").and_then(Value::as_str) != Some("webauthn.get") {
        return Err(Failed("clientDataJSON type is not webauthn.get"));
    }
    let want_challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(signed));
    if cd.get("challenge").and_then(Value::as_str) != Some(want_challenge.as_str()) {
        return Err(Failed("the challenge is not SHA-256 of the signed bytes"));
    }
    // Whole strings, port included: another port of localhost shares the rp id.
    if web_origin.is_empty() || cd.get("origin").and_then(Value::as_str) != Some(web_origin) {
        return Err(Failed("the assertion was not made on the web origin"));
    }
    match cd.get("crossOrigin") {
        None | Some(Value::Bool(false)) => {}
        Some(_) => return Err(Failed("the assertion was made in a cross-origin frame")),
    }
    let ad = &a.authenticator_data;
    if ad.len() < AUTH_DATA_MIN {
        return Err(Failed("authenticatorData is too short"));
    }
    let rp = rp_id(web_origin).ok_or(Failed("the web origin has no host"))?;
    if ad[..32] != Sha256::digest(rp.as_bytes())[..] {
        return Err(Failed("rpIdHash is not SHA-256 of the web origin's host"));
    }
    let flags = ad[32];
    if flags & FLAG_UP == 0 {
        return Err(Failed("the authenticator did not report user presence"));
    }
    if flags & FLAG_UV == 0 {
        return Err(Failed("the authenticator did not report user verification"));
    }
    let sign_count = u32::from_be_bytes([ad[33], ad[34], ad[35], ad[36]]);
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(spki)
        .map_err(|_| Failed("the stored key is not a P-256 SubjectPublicKeyInfo"))?;
    let sig = p256::ecdsa::Signature::from_der(&a.signature)
        .map_err(|_| Failed("the signature is not DER ECDSA"))?;
    let mut msg = Vec::with_capacity(ad.len() + 32);
    msg.extend_from_slice(ad);
    msg.extend_from_slice(&Sha256::digest(&a.client_data_json));
    key.verify(&msg, &sig)
        .map_err(|_| Failed("the ECDSA signature does not verify"))?;
    Ok(sign_count)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) const ORIGIN: &str = "http://localhost:7420";

    /// The simulator's software passkey (`mobile_client_sim::passkey`).
    use mobile_client_sim::passkey::{SoftPasskey as Soft, client_data};

    fn check(soft: &Soft, v: &Value, signed: &[u8]) -> Result<u32, Failed> {
        verify(&soft.spki(), &Assertion::parse(v).unwrap(), ORIGIN, signed)
    }

    #[test]
    fn a_browser_shaped_assertion_verifies_and_reports_its_count() {
        let mut s = Soft::new();
        let v = s.assert(ORIGIN, b"secrets-agent/v1/approval\nx");
        assert_eq!(check(&s, &v, b"secrets-agent/v1/approval\nx"), Ok(1));
        assert!(valid_public_key(&s.spki()));
        assert!(!valid_public_key(&[4u8; 65]));
    }

    #[test]
    fn every_claim_is_checked() {
        let signed = b"the signed bytes";
        let s = Soft::new();
        let good = client_data("webauthn.get", signed, ORIGIN);
        let uv = FLAG_UP | FLAG_UV;
        let cases: Vec<(&str, Value)> = vec![
            (
                "create, not get",
                s.assert_with(
                    &client_data("webauthn.create", signed, ORIGIN),
                    "localhost",
                    uv,
                    1,
                ),
            ),
            (
                "other challenge",
                s.assert_with(
                    &client_data("webauthn.get", b"other", ORIGIN),
                    "localhost",
                    uv,
                    1,
                ),
            ),
            (
                "another port of localhost",
                s.assert_with(
                    &client_data("webauthn.get", signed, "http://localhost:7421"),
                    "localhost",
                    uv,
                    1,
                ),
            ),
            (
                "https instead of http",
                s.assert_with(
                    &client_data("webauthn.get", signed, "https://localhost:7420"),
                    "localhost",
                    uv,
                    1,
                ),
            ),
            (
                "cross-origin frame",
                s.assert_with(
                    &{
                        let mut c = good.clone();
                        c["crossOrigin"] = json!(true);
                        c
                    },
                    "localhost",
                    uv,
                    1,
                ),
            ),
            (
                "crossOrigin not a bool",
                s.assert_with(
                    &{
                        let mut c = good.clone();
                        c["crossOrigin"] = json!("false");
                        c
                    },
                    "localhost",
                    uv,
                    1,
                ),
            ),
            ("other rp id", s.assert_with(&good, "example.com", uv, 1)),
            ("no UV", s.assert_with(&good, "localhost", FLAG_UP, 1)),
            ("no UP", s.assert_with(&good, "localhost", FLAG_UV, 1)),
        ];
        for (what, v) in cases {
            assert!(check(&s, &v, signed).is_err(), "{what} must not verify");
        }
        // Another key, and a tampered authenticatorData.
        let v = s.assert_with(&good, "localhost", uv, 1);
        assert!(check(&Soft::new(), &v, signed).is_err(), "another key");
        let mut t = v.clone();
        let mut ad = URL_SAFE_NO_PAD
            .decode(v["authenticator_data"].as_str().unwrap())
            .unwrap();
        ad[36] ^= 1;
        t["authenticator_data"] = json!(URL_SAFE_NO_PAD.encode(&ad));
        assert!(
            check(&s, &t, signed).is_err(),
            "a changed signCount breaks the signature"
        );
        assert!(check(&s, &v, signed).is_ok());
        // No web origin configured: nothing verifies.
        assert!(verify(&s.spki(), &Assertion::parse(&v).unwrap(), "", signed).is_err());
    }

    #[test]
    fn the_shape_is_checked_before_anything_else() {
        let mut s = Soft::new();
        let v = s.assert(ORIGIN, b"m");
        assert!(Assertion::parse(&v).is_ok());
        for bad in [
            json!("a string"),
            json!({}),
            json!({"authenticator_data": v["authenticator_data"], "client_data_json": v["client_data_json"]}),
            json!({"authenticator_data": v["authenticator_data"], "client_data_json": v["client_data_json"], "signature": 5}),
            json!({"authenticator_data": "+/+/", "client_data_json": v["client_data_json"], "signature": v["signature"]}),
            json!({"authenticator_data": v["authenticator_data"], "client_data_json": v["client_data_json"], "signature": v["signature"], "extra": 1}),
            json!({"authenticator_data": "", "client_data_json": v["client_data_json"], "signature": v["signature"]}),
        ] {
            assert!(Assertion::parse(&bad).is_err(), "{bad} is malformed");
        }
        assert_eq!(
            format!("{:?}", Assertion::parse(&v).unwrap()),
            "Assertion([redacted])"
        );
    }

    #[test]
    fn sign_count_rule() {
        assert!(sign_count_advances(0, 0), "no counter at all");
        assert!(sign_count_advances(0, 1));
        assert!(sign_count_advances(4, 5));
        assert!(
            !sign_count_advances(5, 5),
            "a repeated count is a clone or a replay"
        );
        assert!(!sign_count_advances(5, 4));
        assert!(!sign_count_advances(5, 0), "a counter that went back to 0");
    }

    #[test]
    fn rp_id_is_the_origin_host() {
        assert_eq!(rp_id("http://localhost:7420"), Some("localhost"));
        assert_eq!(
            rp_id("https://agent.example.net"),
            Some("agent.example.net")
        );
        assert_eq!(
            rp_id("https://agent.example.net:8443/"),
            Some("agent.example.net")
        );
        assert_eq!(rp_id("https://[::1]:7420"), Some("[::1]"));
        assert_eq!(rp_id("localhost"), None);
        assert_eq!(rp_id(""), None);
    }
}
