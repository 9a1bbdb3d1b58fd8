//! The biometric approval gate (SPEC §8), as a service.
//!
//! A gated action never runs on request: [`Approvals::gate`] takes its
//! validated params, creates a pending approval, sends `approval_request` to
//! every session, and waits. Only a signed `approval_response` from a
//! paired, non-revoked device's approval key lets it run, by handing back an
//! [`Approved`] value — which only this module can make, so a destructive
//! handler cannot be called without approval. (The registry glue that
//! calls the gate for an action is `handlers::gate`.)
//!
//! [`Approvals`] owns what it uses ([`Deps`]: database, clock, live config,
//! the sessions it announces to, the audit log, shutdown token and task
//! tracker, the web origin) and the pending map; it never sees the server
//! state. It is also the vault's [`crate::secrets::Host`] (`local`).
//!
//! Limits (SPEC §8, v1.1): at most [`MAX_PENDING_PER_DEVICE`] approvals pend
//! per originating device and [`MAX_PENDING`] in all (beyond: `busy`, before
//! anything is created); a session gets at most [`MAX_REPLAY`] pending
//! requests when it authenticates; the device a `revoke_device` targets
//! cannot decide it; revoking a device expires what it originated.

pub(crate) mod commitment;
pub(crate) mod error;
pub(crate) mod local;
pub(crate) mod notify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::keys::{APPROVAL_LABEL, ApprovalAlg, signed_string, unb64};
use crate::auth::webauthn;
use crate::clock::Clock;
use crate::config::Config;
use crate::protocol::ApiError;
use crate::protocol::frames;
use crate::protocol::inbound::{self, ApprovalDecision, ApprovalResponseFrame};
use crate::sessions::Caller;
use crate::sessions::{SessionHandle, Sessions};
use crate::storage::audit::{AuditLog, Auditor, jcs_digest};
use crate::storage::{self, Db, devices};

use commitment::{CommitmentKey, commit_action_secrets};
pub(crate) use error::ApprovalError;

/// Approvals pending at once per originating device (SPEC §8 Limits).
pub(crate) const MAX_PENDING_PER_DEVICE: usize = 16;
/// Approvals pending at once in all.
pub(crate) const MAX_PENDING: usize = 128;
/// Pending `approval_request`s replayed to a session that authenticates.
pub(crate) const MAX_REPLAY: usize = 32;

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
            requester_only: false,
        }
    }

    /// Only the session that asked may approve (any device may deny): for
    /// an action whose result is the secret itself (`reveal_secret`), so a
    /// copy of a device's session key cannot have the owner's phone approve
    /// a request whose answer goes to the copy.
    pub fn approved_only_by_requester(self) -> GateRequest<P> {
        GateRequest {
            prepared: self,
            barred_decider: None,
            requester_only: true,
        }
    }
}

/// Who may decide a pending approval, beyond "any paired, non-revoked
/// device with a valid signature".
#[derive(Debug, Default)]
struct DecisionRule {
    /// This device may not decide (the target of a `revoke_device`).
    barred_decider: Option<String>,
    /// Only this session may approve (see
    /// [`Prepared::approved_only_by_requester`]); anyone may deny.
    approver_session: Option<Arc<str>>,
}

/// A prepared action and who may not decide it: what `register_gated`
/// takes from `prepare` (a plain [`Prepared`] converts into it).
pub struct GateRequest<P> {
    prepared: Prepared<P>,
    barred_decider: Option<String>,
    requester_only: bool,
}

impl<P> From<Prepared<P>> for GateRequest<P> {
    fn from(prepared: Prepared<P>) -> Self {
        GateRequest {
            prepared,
            barred_decider: None,
            requester_only: false,
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
    /// Who may not decide, or approve, beyond any paired device.
    rule: DecisionRule,
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
        frames::approval_request(&self.request)
    }
}

/// What the approval gate is built from: handles to the parts of the
/// server it uses, each cheap to clone.
pub struct Deps {
    pub db: Db,
    pub clock: Clock,
    /// The live configuration (`approvals.timeout_secs`, `[notify]`,
    /// `secrets.max_lease_secs`).
    pub config: watch::Receiver<Arc<Config>>,
    /// Where `approval_request`, `approval_result` and the requester's
    /// `approval_pending` go.
    pub events: Arc<Sessions>,
    /// Every request, decision and refused answer is recorded here.
    pub audit: Arc<AuditLog>,
    /// Cancelled when the server stops: waiting approvals end undecided.
    pub shutdown: CancellationToken,
    /// Notifications are spawned here; shutdown waits for them.
    pub tracker: TaskTracker,
    /// The web origin a passkey assertion must come from (SPEC §11).
    pub web_origin: String,
}

/// The approval gate: pending approvals by id and what deciding them needs.
/// Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Approvals {
    shared: Arc<Shared>,
}

struct Shared {
    deps: Deps,
    pending: Mutex<HashMap<String, Arc<Pending>>>,
    next_seq: AtomicU64,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Approvals")
    }
}

/// A busy answer's `retry_after_ms`: until the earliest relevant expiry (at
/// least 1 ms), or 1 s when there is none.
fn wait_until(earliest: Option<i64>, now: i64) -> u64 {
    earliest.map_or(1000, |t| (t - now).max(1)) as u64
}

impl Approvals {
    /// An empty gate; nothing is read or spawned until it is used (see
    /// [`Approvals::expire_stale_on_start`]).
    pub fn new(deps: Deps) -> Approvals {
        Approvals {
            shared: Arc::new(Shared {
                deps,
                pending: Mutex::default(),
                next_seq: AtomicU64::new(0),
            }),
        }
    }

    fn deps(&self) -> &Deps {
        &self.shared.deps
    }

    fn config(&self) -> Arc<Config> {
        self.deps().config.borrow().clone()
    }

    fn now_ms(&self) -> i64 {
        self.deps().clock.now_ms()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Pending>>> {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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

    /// Asks every session to approve `action` with `raw` params (as the
    /// caller sent them; secret values are shown as commitments) and waits
    /// for the decision. The params `request` carries come back as
    /// [`Approved`] once approved and the approval's record is durable.
    pub async fn gate<P>(
        &self,
        caller: &Caller,
        action: &'static str,
        raw: &Value,
        request: GateRequest<P>,
    ) -> Result<Approved<P>, ApprovalError> {
        let GateRequest {
            prepared: Prepared { params, summary },
            barred_decider,
            requester_only,
        } = request;
        // Secret values are shown as commitments under a key only the
        // requester gets; the key is never stored, and its only copy moves
        // into that event.
        let (shown, commitment_key) = {
            let key = CommitmentKey::generate();
            let (shown, committed) = commit_action_secrets(action, raw, &key);
            (shown, committed.then(|| key.to_b64()))
        };
        let (pending, approval_request) = self.new_pending(
            action,
            shown,
            &summary,
            Some(&caller.request_id),
            &caller.device_id,
            DecisionRule {
                barred_decider,
                approver_session: requester_only.then(|| caller.session_id.clone()),
            },
        );
        // The caps are checked and the slot taken under one lock, before
        // anything is stored or sent.
        self.reserve(pending.clone(), self.now_ms())?;
        let origin_revoked = self
            .store_pending(&pending, approval_request, Some(&caller.device_id))
            .await?;
        let approval_id = pending.approval_id.clone();
        tracing::info!(approval = %approval_id, action, device = %caller.device_id, "approval requested");
        let events = &self.deps().events;
        if origin_revoked {
            // Never shown: it is expired (and announced so) at once.
            pending.decide(Decision::Expired, None);
        } else {
            events.broadcast(&pending.request_frame());
            self.notify_created(action, &approval_id, &summary);
        }
        if let Some(origin) = events.get(&caller.session_id).filter(|_| !origin_revoked) {
            let mut data = json!({"request_id": &*caller.request_id, "approval_id": approval_id, "expires_at": pending.expires_at});
            if let Some(k) = commitment_key {
                data["commitment_key"] = Value::String(k);
            }
            origin.push_event(frames::event("approval_pending", data));
        }
        self.decide_and_finish(&pending, None, "nothing was done")
            .await?;
        Ok(Approved {
            params,
            approval_id,
        })
    }

    /// A new pending approval and its `approval_request` object (challenge
    /// included; `store_pending` keeps it off disk). `origin` is the
    /// originating device, or the local origin for requests no session made.
    fn new_pending(
        &self,
        action: &str,
        params: Value,
        summary: &str,
        request_id: Option<&str>,
        origin: &str,
        rule: DecisionRule,
    ) -> (Arc<Pending>, Value) {
        let action_digest = jcs_digest(&json!({"action": action, "params": params}));
        let approval_id = crate::ids::approval_id();
        let challenge = crate::ids::challenge();
        let expires_at = self.now_ms() + (self.config().approvals.timeout_secs as i64) * 1000;
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
            seq: self.shared.next_seq.fetch_add(1, Ordering::Relaxed),
            origin_device_id: origin.to_string(),
            rule,
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
    /// challenge, nor K, which is in no request) and audits it. With an
    /// origin device: whether that device was revoked while the request was
    /// on its way (the revocation may have scanned the map before the
    /// insert). On a storage error the reservation is released.
    async fn store_pending(
        &self,
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
            self.now_ms(),
            pending.expires_at,
        );
        let origin = origin_device.map(String::from);
        let stored = self
            .deps()
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
                self.lock().remove(&pending.approval_id);
                return Err(e.into());
            }
        };
        self.auditor()
            .record(
                origin_device,
                "approval.requested",
                Some(pending.action_digest.clone()),
                "pending",
                Some(&pending.approval_id),
            )
            .await;
        Ok(origin_revoked)
    }

    /// Waits for the decision (or expiry, or `gone`: the requester went
    /// away), records and announces it. Ok(deciding device) once approved
    /// and the approval record is on disk; `nothing_done` ends the expiry
    /// message.
    async fn decide_and_finish(
        &self,
        pending: &Arc<Pending>,
        gone: Option<&CancellationToken>,
        nothing_done: &'static str,
    ) -> Result<Option<String>, ApprovalError> {
        let expiry = self.deps().clock.instant_at(pending.expires_at);
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
            _ = self.deps().shutdown.cancelled() => {
                self.lock().remove(&pending.approval_id);
                return Err(ApprovalError::ShuttingDown);
            }
        };
        let (decision, by) = decision.unwrap_or((Decision::Expired, None));
        let recorded = self.finish(pending, decision, by.as_deref()).await;
        match decision {
            // The record that lets the action run must be on disk first:
            // with the audit log failing, an approved action does not run.
            Decision::Approved => recorded.map(|()| by),
            Decision::Denied => Err(ApprovalError::Denied),
            Decision::Expired => Err(ApprovalError::Expired(nothing_done)),
        }
    }

    /// Persists and announces a decision. For an approval, Err
    /// (`AuditUnavailable`) if its audit record could not be written: the
    /// action must not run.
    async fn finish(
        &self,
        p: &Pending,
        d: Decision,
        by: Option<&str>,
    ) -> Result<(), ApprovalError> {
        self.lock().remove(&p.approval_id);
        let (id, status, by_owned, now) = (
            p.approval_id.clone(),
            d.status(),
            by.map(String::from),
            self.now_ms(),
        );
        let stored = self
            .deps()
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
            self.auditor()
                .record_durable(by, &action, digest, status, Some(&p.approval_id))
                .await
                .map_err(|_| ApprovalError::AuditUnavailable)
        } else {
            self.auditor()
                .record(by, &action, digest, status, Some(&p.approval_id))
                .await;
            Ok(())
        };
        tracing::info!(approval = %p.approval_id, status, "approval decided");
        self.deps()
            .events
            .broadcast(&frames::approval_result(&p.approval_id, status));
        recorded
    }

    /// The audit log, stamping records with this gate's clock.
    fn auditor(&self) -> Auditor {
        Auditor::new(self.deps().audit.clone(), self.deps().clock)
    }

    /// Handles an `approval_response` frame from `from`'s session; returns
    /// the error frame for its sender, or None when it decided the approval.
    pub async fn on_response(
        &self,
        from: &SessionHandle,
        f: ApprovalResponseFrame,
    ) -> Option<String> {
        let approval_id = f.approval_id.clone();
        let refused = self.respond(from, f).await.err()?;
        let e = ApiError::from(refused);
        Some(frames::approval_error(
            e.code,
            &e.message,
            Some(&approval_id),
        ))
    }

    /// Verifies an `approval_response` and decides its approval; Err
    /// (nothing changed) with why not.
    async fn respond(
        &self,
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
        let Some(pending) = self.get(approval_id) else {
            return Err(ApprovalError::NotPending);
        };
        if self.now_ms() >= pending.expires_at {
            if pending.decide(Decision::Expired, None) {
                // Its waiter finishes it; answer as the timer would have.
            }
            return Err(ApprovalError::TooLate);
        }
        let db = &self.deps().db;
        let id = device_id.to_string();
        let device = db
            .call(move |c| devices::get_device(c, &id))
            .await
            .ok()
            .flatten();
        let Some(device) = device.filter(|d| !d.revoked) else {
            self.auditor()
                .record(
                    Some(&from.device_id),
                    "approval.response",
                    None,
                    "forbidden",
                    Some(approval_id),
                )
                .await;
            return Err(ApprovalError::UnknownDevice);
        };
        if pending.rule.barred_decider.as_deref() == Some(device.device_id.as_str()) {
            self.auditor()
                .record(
                    Some(&device.device_id),
                    "approval.response",
                    None,
                    "forbidden",
                    Some(approval_id),
                )
                .await;
            return Err(ApprovalError::BarredDecider);
        }
        if wanted == Decision::Approved
            && pending
                .rule
                .approver_session
                .as_deref()
                .is_some_and(|s| s != &*from.session_id)
        {
            self.auditor()
                .record(
                    Some(&device.device_id),
                    "approval.response",
                    None,
                    "forbidden",
                    Some(approval_id),
                )
                .await;
            return Err(ApprovalError::OtherSession);
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
                    &self.deps().web_origin,
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
        // A passkey's signCount must advance (SPEC §11): checked and stored
        // with one compare-and-set, and put back if the decision is not
        // made, so the count moves exactly when a decision is recorded.
        // Ok(Some((stored, new))) once a passkey's count has moved.
        let counted: Result<Option<(u32, u32)>, ()> = match verified {
            Ok(Some(n)) => {
                let (id, key) = (device.device_id.clone(), device.approval_public_key.clone());
                match db
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
            self.auditor()
                .record(
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
                if let Err(e) = db
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

    /// Sends the oldest pending approval requests (at most [`MAX_REPLAY`])
    /// to a session that just authenticated. The replay never closes the
    /// session: if its outbox has no room it stops (`list_approvals` has
    /// them all).
    pub fn on_session_start(&self, session: &SessionHandle) {
        for p in self.live().take(MAX_REPLAY) {
            if !session.outbox.try_push(p.request_frame()) {
                break;
            }
        }
    }

    /// `list_approvals`: the pending requests as sent, without `type`.
    pub fn list_pending(&self) -> Vec<Value> {
        self.live().map(|p| p.request.clone()).collect()
    }

    /// Undecided, unexpired approvals, oldest first.
    fn live(&self) -> impl Iterator<Item = Arc<Pending>> {
        let now = self.now_ms();
        self.list()
            .into_iter()
            .filter(move |p| p.expires_at > now && p.decision().is_none())
    }

    /// After a restart, approvals that were pending are expired, never run.
    pub async fn expire_stale_on_start(&self) {
        let now = self.now_ms();
        let stale = self
            .deps()
            .db
            .call(move |c| storage::approvals::expire_pending_at_start(c, now))
            .await;
        let stale = match stale {
            Ok(stale) => stale,
            Err(e) => {
                tracing::error!(error = %e, "cannot expire stale approvals");
                return;
            }
        };
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
            self.auditor()
                .record(
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
}

/// An `approval_response` signature: bytes (Ed25519, ES256) or a passkey's
/// WebAuthn assertion object (SPEC §11).
enum ResponseSignature {
    Bytes(Vec<u8>),
    Webauthn(webauthn::Assertion),
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ed25519_dalek::{Signer, SigningKey};

    use super::*;
    use crate::auth::keys::{b64, device_id_for};
    use crate::protocol::inbound::ResponseSignature as Sent;
    use crate::sessions::{Outbound, Outbox, OutboxReceiver};
    use crate::storage::audit::Retention;
    use crate::storage::devices::{NewDevice, Paired};

    /// The next text frame a session's outbox got, as JSON.
    async fn next_frame(rx: &mut OutboxReceiver) -> Value {
        loop {
            let o = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a frame in time")
                .expect("the outbox is open");
            rx.release(&o);
            if let Outbound::Text(t) = o {
                return serde_json::from_str(&t).unwrap();
            }
        }
    }

    /// The gate built from its own handles only (no server state): a
    /// request is announced, a forged answer changes nothing, the signed
    /// approval decides it once, the action gets its params back, and the
    /// decision is stored, audited and announced.
    #[tokio::test]
    async fn a_gate_built_from_its_deps_alone_asks_and_is_approved() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("agent.db")).unwrap();
        let config = Config::parse("", &dir.path().join("config.toml")).unwrap();
        let clock = Clock::new();
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let audit = Arc::new(AuditLog::start(
            dir.path().join("audit"),
            db.clone(),
            Retention::default(),
        ));
        let events = Arc::new(Sessions::default());
        let approvals = Approvals::new(Deps {
            db: db.clone(),
            clock,
            config: watch::channel(Arc::new(config)).1,
            events: events.clone(),
            audit: audit.clone(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            web_origin: String::new(),
        });

        // A paired phone with an Ed25519 approval key, and its live session.
        let device_key = SigningKey::from_bytes(&[1; 32]);
        let approval_key = SigningKey::from_bytes(&[2; 32]);
        let device_id = device_id_for(device_key.verifying_key().as_bytes());
        let phone = NewDevice {
            device_id: device_id.clone(),
            device_name: "phone".into(),
            public_key: device_key.verifying_key().as_bytes().to_vec(),
            approval_public_key: approval_key.verifying_key().as_bytes().to_vec(),
            approval_key_alg: ApprovalAlg::Ed25519,
            webauthn: None,
        };
        let now = clock.now_ms();
        let paired = db
            .blocking(|c| {
                devices::insert_pairing_code(c, "code-hash", now, 60)?;
                devices::complete_pairing(c, "code-hash", now, &phone)
            })
            .unwrap();
        assert!(matches!(paired, Paired::Stored(_)));
        let (outbox, mut rx) = Outbox::new();
        let session = Arc::new(SessionHandle::new(
            "s1".into(),
            device_id.as_str().into(),
            outbox,
        ));
        events.insert(session.clone());

        let caller = Caller {
            session_id: "s1".into(),
            device_id: device_id.as_str().into(),
            peer: None,
            request_id: "r1".into(),
        };
        let waiting = {
            let (gate, caller) = (approvals.clone(), caller.clone());
            tokio::spawn(async move {
                let raw = json!({"device_id": "someone"});
                let request = Prepared {
                    params: 42u32,
                    summary: "Revoke someone".into(),
                };
                gate.gate(&caller, "revoke_device", &raw, request.into())
                    .await
            })
        };

        let req = next_frame(&mut rx).await;
        assert_eq!(req["type"], "approval_request");
        assert_eq!(
            (req["action"].as_str(), req["origin_device_id"].as_str()),
            (Some("revoke_device"), Some(device_id.as_str()))
        );
        let id = req["approval_id"].as_str().unwrap().to_string();
        let pending = next_frame(&mut rx).await;
        assert_eq!(
            (
                pending["event"].as_str(),
                pending["data"]["request_id"].as_str()
            ),
            (Some("approval_pending"), Some("r1"))
        );
        assert_eq!(pending["data"]["approval_id"], id.as_str());
        assert_eq!(approvals.list_pending().len(), 1);
        assert_eq!(approvals.origin_devices(), std::slice::from_ref(&device_id));

        let signed = |decision: &str| {
            let msg = signed_string(&[
                APPROVAL_LABEL,
                &id,
                req["action_digest"].as_str().unwrap(),
                req["challenge"].as_str().unwrap(),
                decision,
            ]);
            b64(&approval_key.sign(msg.as_bytes()).to_bytes())
        };
        let answer = |signature: String| ApprovalResponseFrame {
            approval_id: id.clone(),
            device_id: device_id.clone(),
            decision: ApprovalDecision::Approve,
            signature: Sent::Encoded(signature),
        };
        // A signature over "deny" does not approve: refused, still pending.
        let refused: Value = serde_json::from_str(
            &approvals
                .on_response(&session, answer(signed("deny")))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (refused["code"].as_str(), refused["approval_id"].as_str()),
            (Some("bad_signature"), Some(id.as_str()))
        );
        assert_eq!(approvals.list_pending().len(), 1);

        assert_eq!(
            approvals
                .on_response(&session, answer(signed("approve")))
                .await,
            None
        );
        let approved = waiting.await.unwrap().unwrap();
        assert_eq!(
            (approved.approval_id(), *approved.params()),
            (id.as_str(), 42)
        );
        let result = next_frame(&mut rx).await;
        assert_eq!(
            (result["type"].as_str(), result["status"].as_str()),
            (Some("approval_result"), Some("approved"))
        );
        assert!(approvals.list_pending().is_empty());
        // Decided once: the same answer again finds nothing pending.
        let again: Value = serde_json::from_str(
            &approvals
                .on_response(&session, answer(signed("approve")))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(again["code"], "not_found");

        let stored = db.blocking(|c| storage::approvals::status(c, &id)).unwrap();
        assert_eq!(stored, Some(("approved".into(), Some(device_id.clone()))));
        audit.flush().await;
        let log = std::fs::read_to_string(dir.path().join("audit/audit.jsonl")).unwrap();
        for action in [
            "approval.requested",
            "approval.response",
            "approval.approved",
        ] {
            assert!(log.contains(action), "{action} is audited");
        }
        assert!(
            !log.contains(req["challenge"].as_str().unwrap()),
            "no challenge in the audit log"
        );
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        audit.close_async().await;
    }
}
