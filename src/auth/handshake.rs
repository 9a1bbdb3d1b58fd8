//! The handshake (SPEC §4): a connection's first answer to its `challenge`
//! is either `auth` (a paired device) or `pair` (a new one, with a code).

use std::net::IpAddr;

use serde_json::Value;

use super::keys::{
    AUTH_LABEL, ApprovalAlg, PAIR_LABEL, b64, device_id_for, random_bytes, signed_string, unb64,
    verify_ed25519,
};
use super::pairing::code_hash;
use super::webauthn;
use crate::protocol::AuthErrorCode;
use crate::protocol::frames::{self, PROTOCOL};
use crate::protocol::handshake::{AuthFrame, HandshakeHead, PairFrame};
use crate::state::AppState;
use crate::storage::devices::{self, NewDevice, Paired};
use serde::Deserialize;

/// The challenge issued on this connection.
#[derive(Debug, Clone)]
pub struct Issued {
    pub nonce: String,
    pub ts: i64,
}

impl Issued {
    pub fn new(ts: i64) -> Issued {
        Issued {
            nonce: b64(&random_bytes::<32>()),
            ts,
        }
    }
}

/// A successful handshake: the connection is now this device's session.
#[derive(Debug)]
pub struct Authenticated {
    pub device_id: String,
    pub session_id: String,
    /// `auth_ok` or `pair_ok`, to send.
    pub reply: String,
}

/// A refused handshake: `auth_error` with this code, then close 4401.
#[derive(Debug)]
pub struct Refused {
    pub code: AuthErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl Refused {
    fn new(code: AuthErrorCode, message: impl Into<String>) -> Refused {
        Refused {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
    pub fn frame(&self) -> String {
        frames::auth_error(self.code, &self.message, self.retry_after_ms)
    }
}

use AuthErrorCode as E;

/// The bytes of base64url field `name` (holding `text`), of length `len` if given.
fn b64_field(name: &str, text: &str, len: Option<usize>) -> Result<Vec<u8>, Refused> {
    let bytes = unb64(text).ok_or_else(|| {
        Refused::new(
            E::InvalidRequest,
            format!("field `{name}` is not base64url"),
        )
    })?;
    match len {
        Some(n) if bytes.len() != n => Err(Refused::new(
            E::InvalidRequest,
            format!(
                "field `{name}` must decode to {n} bytes, got {}",
                bytes.len()
            ),
        )),
        _ => Ok(bytes),
    }
}

/// The typed frame of `kind` from the parsed first frame.
fn typed<T: serde::de::DeserializeOwned>(frame: Value, kind: &str) -> Result<T, Refused> {
    T::deserialize(frame)
        .map_err(|e| Refused::new(E::InvalidRequest, format!("invalid `{kind}` frame: {e}")))
}

fn new_session_id() -> String {
    crate::ids::session_id()
}

/// Handles the first frame of a connection. Failures are counted for rate
/// limiting (refusals are not) and audited.
pub async fn handle(
    state: &AppState,
    issued: &Issued,
    peer: IpAddr,
    text: &str,
) -> Result<Authenticated, Refused> {
    // A flooding address is refused whatever it sends (refusals are not counted).
    if let Err(ms) = state.limiter.check_peer(peer) {
        return Err(Refused {
            retry_after_ms: Some(ms),
            ..Refused::new(
                E::RateLimited,
                "too many failed handshakes from this address; retry later",
            )
        });
    }
    let frame: Value = match serde_json::from_str(text) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return fail(
                state,
                peer,
                false,
                None,
                Refused::new(E::InvalidRequest, "the frame is not a JSON object"),
            )
            .await;
        }
    };
    let head = HandshakeHead::deserialize(&frame).unwrap_or(HandshakeHead {
        kind: None,
        protocol: None,
    });
    let Some(kind) = head.kind() else {
        let msg = "authenticate first: answer the challenge with an `auth` or `pair` frame";
        return fail(
            state,
            peer,
            false,
            None,
            Refused::new(E::Unauthenticated, msg),
        )
        .await;
    };
    let pairing = kind == "pair";
    if pairing && let Err(ms) = state.limiter.check_pairing() {
        return Err(Refused {
            retry_after_ms: Some(ms),
            ..Refused::new(E::RateLimited, "too many failed pairings; retry later")
        });
    }
    match &head.protocol {
        Some(p) if p.as_u64() == Some(PROTOCOL) => {}
        Some(p) if p.is_number() => {
            let r = Refused::new(
                E::UnsupportedProtocol,
                format!("protocol {p} is not supported; this server speaks {PROTOCOL}"),
            );
            return fail(state, peer, pairing, None, r).await;
        }
        _ => {
            return fail(
                state,
                peer,
                pairing,
                None,
                Refused::new(E::InvalidRequest, "missing or non-numeric field `protocol`"),
            )
            .await;
        }
    }
    let result = if pairing {
        match typed(frame, kind) {
            Ok(f) => pair(state, issued, f).await,
            Err(r) => Err((None, r)),
        }
    } else {
        match typed(frame, kind) {
            Ok(f) => auth(state, issued, f).await,
            Err(r) => Err((None, r)),
        }
    };
    match result {
        Ok(ok) => {
            let action = if pairing {
                "handshake.pair"
            } else {
                "handshake.auth"
            };
            state
                .auditor
                .record(Some(&ok.device_id), action, None, "ok", None)
                .await;
            Ok(ok)
        }
        Err((device, r)) => fail(state, peer, pairing, device.as_deref(), r).await,
    }
}

async fn fail(
    state: &AppState,
    peer: IpAddr,
    pairing: bool,
    device: Option<&str>,
    r: Refused,
) -> Result<Authenticated, Refused> {
    // Counted for the rate limit and tallied for the aggregate audit record
    // (`report_failures`): a flood of failures writes one record per peer per
    // minute, not one record and one log line each.
    state.limiter.record_failure(peer, pairing, r.code.as_str());
    if pairing && matches!(r.code, E::InvalidCode | E::BadSignature) {
        let now = state.clock.now_ms();
        match state
            .db
            .call(move |c| devices::record_pair_failure(c, now))
            .await
        {
            Ok(burnt) if burnt > 0 => tracing::warn!(
                burnt,
                "pairing codes burnt after repeated failures; make a new one with `secrets-agent pair`"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot count a failed pairing"),
        }
    }
    tracing::debug!(%peer, code = r.code.as_str(), pairing, device, "handshake refused");
    Err(r)
}

/// Writes the failed handshakes tallied since the last call as audit
/// records, one per peer (`handshake.failures`, outcome
/// `"N failed from PEER: code:n,..."`), and one log line in all.
pub async fn report_failures(state: &AppState) {
    let report = state.limiter.take_report();
    if report.peers.is_empty() && report.other_failures == 0 {
        return;
    }
    let total: u64 = report.peers.iter().map(|(_, t)| t.count).sum::<u64>() + report.other_failures;
    tracing::warn!(
        peers = report.peers.len(),
        failures = total,
        "failed handshakes since the last report"
    );
    for (peer, t) in &report.peers {
        let outcome = format!("{} failed from {peer}: {}", t.count, t.codes_text());
        state
            .auditor
            .record(None, "handshake.failures", None, &outcome, None)
            .await;
    }
    if report.other_failures > 0 {
        let outcome = format!("{} failed from other peers", report.other_failures);
        state
            .auditor
            .record(None, "handshake.failures", None, &outcome, None)
            .await;
    }
}

/// Refused for a storage failure: the detail goes to the log, not the peer.
fn storage_refusal(e: crate::storage::StorageError) -> Refused {
    tracing::error!(error = %e, "storage error during a handshake");
    Refused::new(
        E::InvalidRequest,
        "the server could not complete the handshake; try again",
    )
}

/// Why a device name is refused (SPEC §4 v1.1), if it is: empty, over 64
/// characters, or holding a control character (Unicode Cc) or a
/// bidirectional override, embedding, isolate or mark character, any of
/// which can make a name display as something else in a list.
pub fn device_name_problem(name: &str) -> Option<&'static str> {
    const BIDI: &[char] = &[
        '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}',
        '\u{2068}', '\u{2069}', '\u{200E}', '\u{200F}', '\u{061C}',
    ];
    if name.is_empty() {
        return Some("`device_name` must not be empty");
    }
    if name.chars().count() > 64 {
        return Some("`device_name` must have at most 64 characters");
    }
    if name.chars().any(|c| c.is_control() || BIDI.contains(&c)) {
        return Some("`device_name` must not hold control or bidirectional-override characters");
    }
    None
}

type Failed = (Option<String>, Refused);

async fn auth(state: &AppState, issued: &Issued, f: AuthFrame) -> Result<Authenticated, Failed> {
    let no_dev = |r| (None, r);
    let AuthFrame {
        device_id,
        nonce,
        client_nonce,
        ts,
        signature,
    } = f;
    b64_field("client_nonce", &client_nonce, Some(32)).map_err(no_dev)?;
    let signature = b64_field("signature", &signature, None).map_err(no_dev)?;
    if nonce != issued.nonce || ts != issued.ts {
        return Err(no_dev(Refused::new(
            E::BadNonce,
            "nonce or ts is not the one issued on this connection",
        )));
    }
    let id = device_id.clone();
    let device = state
        .db
        .call(move |c| devices::get_device(c, &id))
        .await
        .map_err(|e| no_dev(storage_refusal(e)))?;
    let Some(device) = device else {
        return Err((
            None,
            Refused::new(E::UnknownDevice, "no device with this id is paired"),
        ));
    };
    if device.revoked {
        return Err((
            Some(device_id),
            Refused::new(E::Revoked, "this device was revoked; pair it again"),
        ));
    }
    let msg = signed_string(&[
        AUTH_LABEL,
        state.key.public_b64(),
        &nonce,
        &device_id,
        &client_nonce,
        &ts.to_string(),
    ]);
    if !verify_ed25519(&device.public_key, msg.as_bytes(), &signature) {
        return Err((
            Some(device_id),
            Refused::new(E::BadSignature, "the signature does not verify"),
        ));
    }
    let session_id = new_session_id();
    let sig = state
        .key
        .sign_auth_ok(&session_id, &device_id, &client_nonce);
    // Written in a batch within a second (`last_seen.rs`), not here.
    state.last_seen.note(&device_id, state.clock.now_ms());
    Ok(Authenticated {
        reply: frames::auth_ok(&session_id, &device_id, &sig),
        device_id,
        session_id,
    })
}

/// The `pair` frame's approval-key signature: bytes, or for a passkey the
/// WebAuthn assertion object and the credential id (SPEC §11).
enum PairApproval {
    Raw(Vec<u8>),
    Webauthn {
        assertion: webauthn::Assertion,
        credential_id: Vec<u8>,
    },
}

fn approval_signature(f: &PairFrame, alg: ApprovalAlg) -> Result<PairApproval, Refused> {
    if alg != ApprovalAlg::WebauthnEs256 {
        let Some(text) = f.approval_signature.as_str() else {
            return Err(Refused::new(
                E::InvalidRequest,
                "missing or non-string field `approval_signature`",
            ));
        };
        return b64_field("approval_signature", text, None).map(PairApproval::Raw);
    }
    let Some(id_text) = f.webauthn_credential_id.as_deref() else {
        return Err(Refused::new(
            E::InvalidRequest,
            "missing or non-string field `webauthn_credential_id`",
        ));
    };
    let credential_id = b64_field("webauthn_credential_id", id_text, None)?;
    if credential_id.is_empty() || credential_id.len() > webauthn::MAX_CREDENTIAL_ID {
        return Err(Refused::new(
            E::InvalidRequest,
            "`webauthn_credential_id` must decode to 1 to 1023 bytes",
        ));
    }
    let assertion = webauthn::Assertion::parse(&f.approval_signature)
        .map_err(|e| Refused::new(E::InvalidRequest, format!("`approval_signature`: {e}")))?;
    Ok(PairApproval::Webauthn {
        assertion,
        credential_id,
    })
}

async fn pair(state: &AppState, issued: &Issued, f: PairFrame) -> Result<Authenticated, Failed> {
    let no_dev = |r| (None, r);
    let code = f.code.clone();
    let device_name = f.device_name.trim().to_string();
    if let Some(problem) = device_name_problem(&device_name) {
        return Err(no_dev(Refused::new(E::InvalidRequest, problem)));
    }
    let device_pk_s = f.device_public_key.as_str();
    let device_pk = b64_field("device_public_key", device_pk_s, Some(32)).map_err(no_dev)?;
    if !ApprovalAlg::Ed25519.valid_public_key(&device_pk) {
        return Err(no_dev(Refused::new(
            E::InvalidRequest,
            "`device_public_key` is not an Ed25519 public key",
        )));
    }
    let alg_s = f.approval_key_alg.as_deref().unwrap_or("ed25519");
    let alg = ApprovalAlg::parse(alg_s).ok_or_else(|| {
        no_dev(Refused::new(
            E::InvalidRequest,
            "`approval_key_alg` must be \"ed25519\", \"es256\" or \"webauthn-es256\"",
        ))
    })?;
    let approval_pk_s = f.approval_public_key.as_str();
    let approval_pk = b64_field("approval_public_key", approval_pk_s, None).map_err(no_dev)?;
    if !alg.valid_public_key(&approval_pk) {
        let want = match alg {
            ApprovalAlg::Es256 => "a 65-byte uncompressed P-256 point",
            ApprovalAlg::WebauthnEs256 => "a P-256 SubjectPublicKeyInfo (DER)",
            ApprovalAlg::Ed25519 => "a 32-byte Ed25519 key",
        };
        return Err(no_dev(Refused::new(
            E::InvalidRequest,
            format!("`approval_public_key` must be {want}"),
        )));
    }
    if approval_pk == device_pk {
        return Err(no_dev(Refused::new(
            E::InvalidRequest,
            "the approval key must differ from the device key: the biometric gate would otherwise be the session key",
        )));
    }
    let client_nonce = f.client_nonce.as_str();
    b64_field("client_nonce", client_nonce, Some(32)).map_err(no_dev)?;
    let signature = b64_field("signature", &f.signature, None).map_err(no_dev)?;
    let approval_signature = approval_signature(&f, alg).map_err(no_dev)?;

    let now = state.clock.now_ms();
    let hash = code_hash(state.key.pairing_code_key(), &code);
    let h2 = hash.clone();
    let live = state
        .db
        .call(move |c| devices::code_is_live(c, &h2, now))
        .await
        .map_err(|e| no_dev(storage_refusal(e)))?;
    if !live {
        return Err(no_dev(Refused::new(
            E::InvalidCode,
            "the pairing code is unknown, used, expired or burnt; make a new one with `secrets-agent pair`",
        )));
    }
    let msg = signed_string(&[
        PAIR_LABEL,
        state.key.public_b64(),
        &issued.nonce,
        &code,
        device_pk_s,
        approval_pk_s,
        client_nonce,
    ]);
    let device_id = device_id_for(&device_pk);
    let mut webauthn_count = 0;
    let approval_ok = match &approval_signature {
        PairApproval::Raw(sig) => alg.verify(&approval_pk, msg.as_bytes(), sig),
        PairApproval::Webauthn { assertion, .. } => {
            match webauthn::verify(&approval_pk, assertion, &state.web_origin, msg.as_bytes()) {
                Ok(n) => {
                    webauthn_count = n;
                    true
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "pairing assertion refused");
                    false
                }
            }
        }
    };
    if !verify_ed25519(&device_pk, msg.as_bytes(), &signature) || !approval_ok {
        return Err((
            Some(device_id),
            Refused::new(E::BadSignature, "a pairing signature does not verify"),
        ));
    }
    let new = NewDevice {
        device_id: device_id.clone(),
        device_name,
        public_key: device_pk,
        approval_public_key: approval_pk,
        approval_key_alg: alg,
        webauthn: match approval_signature {
            PairApproval::Webauthn { credential_id, .. } => Some((credential_id, webauthn_count)),
            PairApproval::Raw(_) => None,
        },
    };
    // A new device is a state change: not while the audit log cannot record it.
    if state.require_audit().await.is_err() {
        return Err(no_dev(Refused::new(
            E::InvalidRequest,
            "the server cannot write its audit log; pairing is refused until it can",
        )));
    }
    let stored = state
        .db
        .call(move |c| devices::complete_pairing(c, &hash, now, &new))
        .await
        .map_err(|e| no_dev(storage_refusal(e)))?;
    match stored {
        Paired::Stored(_) => {}
        Paired::CodeGone => {
            return Err(no_dev(Refused::new(
                E::InvalidCode,
                "the pairing code was used meanwhile",
            )));
        }
        Paired::KeyMismatch => {
            tracing::warn!(device = %device_id, "pairing refused: a device with this id holds another public key");
            return Err(no_dev(Refused::new(
                E::InvalidRequest,
                "a device with this id is paired with another public key",
            )));
        }
    }
    tracing::info!(device = %device_id, alg = alg.as_str(), "device paired");
    let session_id = new_session_id();
    let sig = state
        .key
        .sign_auth_ok(&session_id, &device_id, client_nonce);
    Ok(Authenticated {
        reply: frames::pair_ok(&device_id, &session_id, state.key.public_b64(), &sig),
        device_id,
        session_id,
    })
}
