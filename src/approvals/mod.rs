//! The biometric approval gate (SPEC §8).
//!
//! A gated action never runs on request: `register_gated` validates its
//! params, creates a pending approval, sends `approval_request` to every
//! session, and waits. Only a signed `approval_response` from a paired,
//! non-revoked device's approval key lets it run, by handing the action an
//! [`Approved`] value — which only this module can make, so a destructive
//! handler cannot be called without approval.
//!
//! Limits (SPEC §8, v1.1): at most [`MAX_PENDING_PER_DEVICE`] approvals pend
//! per originating device and [`MAX_PENDING`] in all (beyond: `busy`, before
//! anything is created); a session gets at most [`MAX_REPLAY`] pending
//! requests when it authenticates; the device a `revoke_device` targets
//! cannot decide it; revoking a device expires what it originated.

pub mod commitment;
pub mod error;
pub mod local;
pub mod notify;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::keys::{APPROVAL_LABEL, ApprovalAlg, signed_string, unb64};
use crate::auth::webauthn;
use crate::protocol::ApiError;
use crate::protocol::frames;
use crate::protocol::inbound::{self, ApprovalDecision, ApprovalResponseFrame};
use crate::rpc::{ActionResult, Caller, params_from_ref};
use crate::sessions::SessionHandle;
use crate::state::AppState;
use crate::storage::audit::jcs_digest;
use crate::storage::{self, devices};

use commitment::{CommitmentKey, commit_action_secrets};
pub use error::ApprovalError;

/// Approvals pending at once per originating device (SPEC §8 Limits).
pub const MAX_PENDING_PER_DEVICE: usize = 16;
/// Approvals pending at once in all.
pub const MAX_PENDING: usize = 128;
/// Pending `approval_request`s replayed to a session that authenticates.
pub const MAX_REPLAY: usize = 32;

/// Proof that an approval for exactly these params was granted. Its fields
/// are private and it has no public constructor.
#[derive(Debug)]
pub struct Approved<P> {
    params: P,
    approval_id: String,
}

impl<P> Approved<P> {
    pub fn params(&self) -> &P {
        &self.params
    }
    pub fn into_params(self) -> P {
        self.params
    }
    pub fn approval_id(&self) -> &str {
        &self.approval_id
    }
}

/// What a gated action's `prepare` step returns: validated params and the
/// human-readable summary the phone shows.
pub struct Prepared<P> {
    pub params: P,
    pub summary: String,
}

impl<P> Prepared<P> {
    /// Bars `device_id` from deciding this approval (the device a
    /// `revoke_device` targets cannot decide its own revocation).
    pub fn barring_decider(self, device_id: impl Into<String>) -> GateRequest<P> {
        GateRequest {
            prepared: self,
            barred_decider: Some(device_id.into()),
        }
    }
}

/// A prepared action and who may not decide it: what `register_gated`
/// takes from `prepare` (a plain [`Prepared`] converts into it).
pub struct GateRequest<P> {
    prepared: Prepared<P>,
    barred_decider: Option<String>,
}

impl<P> From<Prepared<P>> for GateRequest<P> {
    fn from(prepared: Prepared<P>) -> Self {
        GateRequest {
            prepared,
            barred_decider: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Approved,
    Denied,
    Expired,
}

impl Decision {
    fn status(self) -> &'static str {
        match self {
            Decision::Approved => "approved",
            Decision::Denied => "denied",
            Decision::Expired => "expired",
        }
    }
}

struct Pending {
    approval_id: String,
    /// Creation order, for "oldest first".
    seq: u64,
    origin_device_id: String,
    /// A device whose answer is `forbidden` (the target of `revoke_device`).
    barred_decider: Option<String>,
    action_digest: String,
    challenge: String,
    expires_at: i64,
    /// The `approval_request` object without `type`, as listed by `list_approvals`.
    request: Value,
    decision: Mutex<Option<(Decision, Option<String>)>>,
    decided: Notify,
}

impl Pending {
    /// Records the first decision; false if one was already made.
    fn decide(&self, d: Decision, by: Option<String>) -> bool {
        let mut g = self.decision.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_some() {
            return false;
        }
        *g = Some((d, by));
        self.decided.notify_one();
        true
    }

    fn decision(&self) -> Option<(Decision, Option<String>)> {
        self.decision
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn request_frame(&self) -> String {
        let mut v = self.request.clone();
        v["type"] = json!("approval_request");
        v.to_string()
    }
}

/// Pending approvals, by id.
#[derive(Default)]
pub struct Approvals {
    pending: Mutex<HashMap<String, Arc<Pending>>>,
    next_seq: AtomicU64,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Approvals")
    }
}

impl Approvals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Pending>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn get(&self, id: &str) -> Option<Arc<Pending>> {
        self.lock().get(id).cloned()
    }
    /// Pending requests, oldest first.
    fn list(&self) -> Vec<Arc<Pending>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|p| p.seq);
        v
    }

    /// Inserts `p` unless that would pass a cap; on refusal, the `busy`
    /// error with the time until the earliest relevant expiry.
    fn reserve(&self, p: Arc<Pending>, now: i64) -> Result<(), ApprovalError> {
        let mut g = self.lock();
        let mine = || {
            g.values()
                .filter(|q| q.origin_device_id == p.origin_device_id)
        };
        if mine().count() >= MAX_PENDING_PER_DEVICE {
            Err(ApprovalError::DeviceBusy {
                retry_after_ms: wait_until(mine().map(|q| q.expires_at).min(), now),
            })
        } else if g.len() >= MAX_PENDING {
            Err(ApprovalError::AllBusy {
                retry_after_ms: wait_until(g.values().map(|q| q.expires_at).min(), now),
            })
        } else {
            g.insert(p.approval_id.clone(), p);
            Ok(())
        }
    }

    /// Devices that originated a pending approval (not the local socket's
    /// and tasks' approvals, which no device originated).
    pub fn origin_devices(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .values()
            .filter(|p| !local::is_local(&p.origin_device_id))
            .map(|p| p.origin_device_id.clone())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Expires (never runs) every undecided approval `device_id` originated;
    /// their waiters announce `approval_result` `expired`. Returns how many.
    pub fn expire_originated_by(&self, device_id: &str) -> usize {
        let mine: Vec<_> = self
            .lock()
            .values()
            .filter(|p| p.origin_device_id == device_id)
            .cloned()
            .collect();
        mine.iter()
            .filter(|p| p.decide(Decision::Expired, None))
            .count()
    }
}

/// A busy answer's `retry_after_ms`: until the earliest relevant expiry (at
/// least 1 ms), or 1 s when there is none.
fn wait_until(earliest: Option<i64>, now: i64) -> u64 {
    earliest.map_or(1000, |t| (t - now).max(1)) as u64
}

/// Registers a gated action. `prepare` validates (and may refuse) before
/// any phone is asked; `run` executes after approval.
pub fn register_gated<P, G, Prep, PrepFut, Run, RunFut>(
    actions: &mut crate::rpc::Actions,
    name: &'static str,
    prepare: Prep,
    run: Run,
) where
    P: DeserializeOwned + Send + 'static,
    Prep: Fn(Arc<AppState>, P) -> PrepFut + Clone + Send + Sync + 'static,
    PrepFut: Future<Output = Result<G, ApiError>> + Send + 'static,
    G: Into<GateRequest<P>>,
    Run: Fn(Arc<AppState>, Approved<P>) -> RunFut + Clone + Send + Sync + 'static,
    RunFut: Future<Output = ActionResult> + Send + 'static,
{
    actions.gated.insert(name);
    crate::rpc::register_raw::<P, _, _>(actions, name, move |state, caller, raw| {
        let (prepare, run) = (prepare.clone(), run.clone());
        async move {
            let raw = Value::Object(raw);
            let p: P = params_from_ref(&raw)?;
            let request: GateRequest<P> = prepare(state.clone(), p).await?.into();
            let approval_id = gate(
                &state,
                &caller,
                name,
                &raw,
                &request.prepared.summary,
                request.barred_decider,
            )
            .await?;
            run(
                state,
                Approved {
                    params: request.prepared.params,
                    approval_id,
                },
            )
            .await
        }
    });
}

/// Asks every session for an approval and waits for the decision.
/// Ok(approval_id) once approved.
async fn gate(
    state: &Arc<AppState>,
    caller: &Caller,
    action: &str,
    raw: &Value,
    summary: &str,
    barred_decider: Option<String>,
) -> Result<String, ApprovalError> {
    // Secret values are shown as commitments under a key only the requester
    // gets; the key is never stored, and its only copy moves into that event.
    let (params, commitment_key) = {
        let key = CommitmentKey::generate();
        let (params, committed) = commit_action_secrets(action, raw, &key);
        (params, committed.then(|| key.to_b64()))
    };
    let (pending, request) = new_pending(
        state,
        action,
        params,
        summary,
        Some(&caller.request_id),
        &caller.device_id,
        barred_decider,
    );
    // The caps are checked and the slot taken under one lock, before
    // anything is stored or sent.
    let now = state.clock.now_ms();
    state.approvals.reserve(pending.clone(), now)?;
    let origin_revoked = store_pending(state, &pending, request, Some(&caller.device_id)).await?;
    let approval_id = pending.approval_id.clone();
    tracing::info!(approval = %approval_id, action, device = %caller.device_id, "approval requested");
    if origin_revoked {
        // Never shown: it is expired (and announced so) at once.
        pending.decide(Decision::Expired, None);
    } else {
        state.sessions.broadcast(&pending.request_frame());
        notify::approval_created(state, action, &approval_id, summary);
    }
    if let Some(origin) = state
        .sessions
        .get(&caller.session_id)
        .filter(|_| !origin_revoked)
    {
        let mut data = json!({"request_id": &*caller.request_id, "approval_id": approval_id, "expires_at": pending.expires_at});
        if let Some(k) = commitment_key {
            data["commitment_key"] = Value::String(k);
        }
        origin.push_event(frames::event("approval_pending", data));
    }
    decide_and_finish(state, &pending, None, "nothing was done")
        .await
        .map(|_| approval_id)
}

/// A new pending approval and its `approval_request` object (challenge
/// included; `store_pending` keeps it off disk). `origin` is the
/// originating device, or the local origin for requests no session made.
fn new_pending(
    state: &AppState,
    action: &str,
    params: Value,
    summary: &str,
    request_id: Option<&str>,
    origin: &str,
    barred_decider: Option<String>,
) -> (Arc<Pending>, Value) {
    let action_digest = jcs_digest(&json!({"action": action, "params": params}));
    let approval_id = crate::ids::approval_id();
    let challenge = crate::ids::challenge();
    let expires_at = state.clock.now_ms() + (state.config().approvals.timeout_secs as i64) * 1000;
    let shown_origin = (!local::is_local(origin)).then_some(origin);
    let request = json!({
        "approval_id": approval_id,
        "request_id": request_id,
        "origin_device_id": shown_origin,
        "action": action,
        "params": params,
        "summary": summary,
        "action_digest": action_digest,
        "challenge": challenge,
        "expires_at": expires_at,
    });
    let pending = Arc::new(Pending {
        approval_id,
        seq: state.approvals.next_seq.fetch_add(1, Ordering::Relaxed),
        origin_device_id: origin.to_string(),
        barred_decider,
        action_digest,
        challenge,
        expires_at,
        request: request.clone(),
        decision: Mutex::new(None),
        decided: Notify::new(),
    });
    (pending, request)
}

/// Stores a reserved approval (what restart-expiry needs, never the
/// challenge, nor K, which is in no request) and audits it. With an origin
/// device: whether that device was revoked while the request was on its
/// way (the revocation may have scanned the map before the insert). On a
/// storage error the reservation is released.
async fn store_pending(
    state: &AppState,
    pending: &Arc<Pending>,
    mut request: Value,
    origin_device: Option<&str>,
) -> Result<bool, ApprovalError> {
    if let Some(m) = request.as_object_mut() {
        m.remove("challenge");
    }
    let (id, req_text, now, expires_at) = (
        pending.approval_id.clone(),
        request.to_string(),
        state.clock.now_ms(),
        pending.expires_at,
    );
    let origin = origin_device.map(String::from);
    let stored = state
        .db
        .call(move |c| {
            storage::approvals::insert_pending(c, &id, &req_text, now, expires_at)?;
            Ok(match origin {
                Some(o) => devices::get_device(c, &o)?.is_none_or(|d| d.revoked),
                None => false,
            })
        })
        .await;
    let origin_revoked = match stored {
        Ok(revoked) => revoked,
        Err(e) => {
            state.approvals.lock().remove(&pending.approval_id);
            return Err(e.into());
        }
    };
    state
        .audit(
            origin_device,
            "approval.requested",
            Some(pending.action_digest.clone()),
            "pending",
            Some(&pending.approval_id),
        )
        .await;
    Ok(origin_revoked)
}

/// Waits for the decision (or expiry, or `gone`: the requester went away),
/// records and announces it. Ok(deciding device) once approved and the
/// approval record is on disk; `nothing_done` ends the expiry message.
async fn decide_and_finish(
    state: &AppState,
    pending: &Arc<Pending>,
    gone: Option<&CancellationToken>,
    nothing_done: &'static str,
) -> Result<Option<String>, ApprovalError> {
    let expiry = state.clock.instant_at(pending.expires_at);
    let requester_gone = async {
        match gone {
            Some(g) => g.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let decision = tokio::select! {
        _ = pending.decided.notified() => pending.decision(),
        _ = tokio::time::sleep_until(expiry) => {
            pending.decide(Decision::Expired, None);
            pending.decision()
        }
        _ = requester_gone => {
            tracing::info!(approval = %pending.approval_id, "the requester went away: approval expired");
            pending.decide(Decision::Expired, None);
            pending.decision()
        }
        _ = state.shutdown.cancelled() => {
            state.approvals.lock().remove(&pending.approval_id);
            return Err(ApprovalError::ShuttingDown);
        }
    };
    let (decision, by) = decision.unwrap_or((Decision::Expired, None));
    let recorded = finish(state, pending, decision, by.as_deref()).await;
    match decision {
        // The record that lets the action run must be on disk first: with
        // the audit log failing, an approved action does not run.
        Decision::Approved => recorded.map(|()| by),
        Decision::Denied => Err(ApprovalError::Denied),
        Decision::Expired => Err(ApprovalError::Expired(nothing_done)),
    }
}

/// Persists and announces a decision. For an approval, Err (`unavailable`)
/// if its audit record could not be written: the action must not run.
async fn finish(
    state: &AppState,
    p: &Pending,
    d: Decision,
    by: Option<&str>,
) -> Result<(), ApprovalError> {
    state.approvals.lock().remove(&p.approval_id);
    let (id, status, by_owned, now) = (
        p.approval_id.clone(),
        d.status(),
        by.map(String::from),
        state.clock.now_ms(),
    );
    let stored = state
        .db
        .call(move |c| {
            storage::approvals::record_decision(c, &id, status, now, by_owned.as_deref())
        })
        .await;
    if let Err(e) = stored {
        tracing::error!(error = %e, "cannot store an approval decision");
    }
    let action = format!("approval.{status}");
    let digest = Some(p.action_digest.clone());
    let recorded = if d == Decision::Approved {
        state
            .audit_durable(by, &action, digest, status, Some(&p.approval_id))
            .await
            .map_err(|_| ApprovalError::AuditUnavailable)
    } else {
        state
            .audit(by, &action, digest, status, Some(&p.approval_id))
            .await;
        Ok(())
    };
    tracing::info!(approval = %p.approval_id, status, "approval decided");
    state.sessions.broadcast(
        &json!({"type": "approval_result", "approval_id": p.approval_id, "status": status})
            .to_string(),
    );
    recorded
}

/// Handles an `approval_response` frame; returns the error frame for its
/// sender, or None when it decided the approval.
pub async fn on_response(
    state: &AppState,
    from: &SessionHandle,
    f: ApprovalResponseFrame,
) -> Option<String> {
    let approval_id = f.approval_id.clone();
    let refused = respond(state, from, f).await.err()?;
    let e = ApiError::from(refused);
    Some(frames::approval_error(
        e.code,
        &e.message,
        Some(&approval_id),
    ))
}

/// Verifies an `approval_response` and decides its approval; Err (nothing
/// changed) with why not.
async fn respond(
    state: &AppState,
    from: &SessionHandle,
    f: ApprovalResponseFrame,
) -> Result<(), ApprovalError> {
    let approval_id = f.approval_id.as_str();
    let (device_id, decision) = (f.device_id.as_str(), f.decision.as_str());
    let wanted = match f.decision {
        ApprovalDecision::Approve => Decision::Approved,
        ApprovalDecision::Deny => Decision::Denied,
    };
    let sig = match f.signature {
        inbound::ResponseSignature::Encoded(s) => match unb64(&s) {
            Some(b) => ResponseSignature::Bytes(b),
            None => return Err(ApprovalError::SignatureNotBase64),
        },
        inbound::ResponseSignature::Assertion(obj) => {
            match webauthn::Assertion::parse(&Value::Object(obj)) {
                Ok(a) => ResponseSignature::Webauthn(a),
                Err(e) => return Err(ApprovalError::MalformedAssertion(e.0)),
            }
        }
    };
    let Some(pending) = state.approvals.get(approval_id) else {
        return Err(ApprovalError::NotPending);
    };
    if state.clock.now_ms() >= pending.expires_at {
        if pending.decide(Decision::Expired, None) {
            // Its waiter finishes it; answer as the timer would have.
        }
        return Err(ApprovalError::TooLate);
    }
    let id = device_id.to_string();
    let device = state
        .db
        .call(move |c| devices::get_device(c, &id))
        .await
        .ok()
        .flatten();
    let Some(device) = device.filter(|d| !d.revoked) else {
        state
            .audit(
                Some(&from.device_id),
                "approval.response",
                None,
                "forbidden",
                Some(approval_id),
            )
            .await;
        return Err(ApprovalError::UnknownDevice);
    };
    if pending.barred_decider.as_deref() == Some(device.device_id.as_str()) {
        state
            .audit(
                Some(&device.device_id),
                "approval.response",
                None,
                "forbidden",
                Some(approval_id),
            )
            .await;
        return Err(ApprovalError::BarredDecider);
    }
    let msg = signed_string(&[
        APPROVAL_LABEL,
        approval_id,
        &pending.action_digest,
        &pending.challenge,
        decision,
    ]);
    // Ok(Some(signCount)) for a passkey, Ok(None) for a plain signature,
    // Err(()) when it does not verify.
    let verified: Result<Option<u32>, ()> = match (device.approval_key_alg, &sig) {
        (ApprovalAlg::WebauthnEs256, ResponseSignature::Webauthn(a)) => {
            match webauthn::verify(
                &device.approval_public_key,
                a,
                &state.web_origin,
                msg.as_bytes(),
            ) {
                Ok(n) => Ok(Some(n)),
                Err(e) => {
                    tracing::debug!(approval = %approval_id, reason = %e, "approval assertion refused");
                    Err(())
                }
            }
        }
        (ApprovalAlg::WebauthnEs256, ResponseSignature::Bytes(_)) => {
            return Err(ApprovalError::AssertionExpected);
        }
        (_, ResponseSignature::Webauthn(_)) => {
            return Err(ApprovalError::BytesExpected);
        }
        (alg, ResponseSignature::Bytes(b)) => {
            if alg.verify(&device.approval_public_key, msg.as_bytes(), b) {
                Ok(None)
            } else {
                Err(())
            }
        }
    };
    // A passkey's signCount must advance (SPEC §11): checked and stored with
    // one compare-and-set, and put back if the decision is not made, so the
    // count moves exactly when a decision is recorded.
    // Ok(Some((stored, new))) once a passkey's count has moved.
    let counted: Result<Option<(u32, u32)>, ()> = match verified {
        Ok(Some(n)) => {
            let (id, key) = (device.device_id.clone(), device.approval_public_key.clone());
            match state
                .db
                .call(move |c| devices::advance_sign_count(c, &id, &key, n))
                .await
            {
                Ok(Some(before)) => Ok(Some((before, n))),
                Ok(None) => {
                    tracing::debug!(approval = %approval_id, "approval assertion refused: signCount did not advance");
                    Err(())
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot check a passkey's signCount");
                    Err(())
                }
            }
        }
        Ok(None) => Ok(None),
        Err(()) => Err(()),
    };
    let Ok(counted) = counted else {
        state
            .audit(
                Some(&device.device_id),
                "approval.response",
                None,
                "bad_signature",
                Some(approval_id),
            )
            .await;
        return Err(ApprovalError::BadSignature);
    };
    if !pending.decide(wanted, Some(device.device_id.clone())) {
        if let Some((before, after)) = counted {
            let id = device.device_id.clone();
            if let Err(e) = state
                .db
                .call(move |c| devices::restore_sign_count(c, &id, after, before))
                .await
            {
                tracing::error!(error = %e, "cannot restore a passkey's signCount");
            }
        }
        return Err(ApprovalError::AlreadyDecided);
    }
    Ok(())
}

/// An `approval_response` signature: bytes (Ed25519, ES256) or a passkey's
/// WebAuthn assertion object (SPEC §11).
enum ResponseSignature {
    Bytes(Vec<u8>),
    Webauthn(webauthn::Assertion),
}

/// Sends the oldest pending approval requests (at most [`MAX_REPLAY`]) to a
/// session that just authenticated. The replay never closes the session: if
/// its outbox has no room it stops (`list_approvals` has them all).
pub async fn on_session_start(state: &AppState, session: &SessionHandle) {
    let now = state.clock.now_ms();
    let live = state
        .approvals
        .list()
        .into_iter()
        .filter(|p| p.expires_at > now && p.decision().is_none());
    for p in live.take(MAX_REPLAY) {
        if !session.outbox.try_push(p.request_frame()) {
            break;
        }
    }
}

/// `list_approvals`: the pending requests as sent, without `type`.
pub fn list_pending(state: &AppState) -> Vec<Value> {
    let now = state.clock.now_ms();
    state
        .approvals
        .list()
        .into_iter()
        .filter(|p| p.expires_at > now && p.decision().is_none())
        .map(|p| p.request.clone())
        .collect()
}

/// After a restart, approvals that were pending are expired, never run.
pub async fn expire_stale_on_start(state: &AppState) {
    let now = state.clock.now_ms();
    let stale = state
        .db
        .call(move |c| storage::approvals::expire_pending_at_start(c, now))
        .await;
    match stale {
        Ok(stale) => {
            for storage::approvals::StaleApproval {
                approval_id: id,
                request_json: req,
            } in stale
            {
                let v: Value = serde_json::from_str(&req).unwrap_or_default();
                let device = v.get("origin_device_id").and_then(Value::as_str);
                let digest = v
                    .get("action_digest")
                    .and_then(Value::as_str)
                    .map(String::from);
                state
                    .audit(
                        device,
                        "approval.expired",
                        digest,
                        "expired_on_restart",
                        Some(&id),
                    )
                    .await;
                tracing::info!(approval = %id, "approval pending at shutdown expired");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot expire stale approvals"),
    }
}
