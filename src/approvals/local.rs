//! Approvals that no session asked for (SPEC §10): releases and the CLI's
//! `set`/`rm` through the local socket, and task releases. They go through
//! the same pending map, decision and records as the gate, with
//! `origin_device_id` and `request_id` null, and count together against
//! [`MAX_PENDING_LOCAL`] within the 128 in all. A requester that goes away
//! expires its approval at once.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::commitment::{CommitmentKey, commit_action_secrets};
use super::{Decision, Pending, finish, notify};
use crate::auth::keys::{b64, random_bytes};
use crate::protocol::{ApiError, ErrorCode};
use crate::secrets::release::{BoxFuture, Granted, Host, PendingNotice, SecretAudit};
use crate::state::AppState;
use crate::storage::audit::{AuditEntry, jcs_digest};
use crate::storage::devices;

/// Approvals pending at once from the local socket and tasks together.
pub const MAX_PENDING_LOCAL: usize = 16;
/// The internal origin of local approvals (shown as null).
const LOCAL_ORIGIN: &str = "";

/// Whether an internal origin is the local one (no device originated it:
/// revocation watching must not take it for an unknown device).
pub(super) fn is_local(origin: &str) -> bool {
    origin == LOCAL_ORIGIN
}

/// Creates an approval for `action` with `params` and waits for its
/// decision. `gone` (the requester disconnected) expires it at once.
pub async fn request(
    state: &Arc<AppState>,
    action: &'static str,
    params: Value,
    summary: String,
    gone: CancellationToken,
    pending_tx: Option<oneshot::Sender<PendingNotice>>,
) -> Result<Granted, ApiError> {
    // K goes to no one: the commitment only tells different values apart.
    let (params, _) = commit_action_secrets(action, &params, &CommitmentKey::generate());
    let action_digest = jcs_digest(&json!({"action": action, "params": params}));
    let approval_id = format!("apr_{}", hex::encode(random_bytes::<12>()));
    let challenge = b64(&random_bytes::<32>());
    let now = state.clock.now_ms();
    let expires_at = now + (state.config().approvals.timeout_secs as i64) * 1000;
    let mut request = json!({
        "approval_id": approval_id,
        "request_id": null,
        "origin_device_id": null,
        "action": action,
        "params": params,
        "summary": summary,
        "action_digest": action_digest,
        "challenge": challenge,
        "expires_at": expires_at,
    });
    let pending = Arc::new(Pending {
        approval_id: approval_id.clone(),
        seq: state.approvals.next_seq.fetch_add(1, Ordering::Relaxed),
        origin_device_id: LOCAL_ORIGIN.into(),
        barred_decider: None,
        action_digest,
        challenge,
        expires_at,
        request: request.clone(),
        decision: Mutex::new(None),
        decided: Notify::new(),
    });
    {
        let g = state.approvals.lock();
        let local = g
            .values()
            .filter(|p| p.origin_device_id == LOCAL_ORIGIN)
            .count();
        if local >= MAX_PENDING_LOCAL {
            let earliest = g
                .values()
                .filter(|p| p.origin_device_id == LOCAL_ORIGIN)
                .map(|p| p.expires_at)
                .min();
            let wait = earliest.map_or(1000, |t| (t - now).max(1)) as u64;
            return Err(ApiError::new(
                ErrorCode::Busy,
                "the local socket and tasks already have the most approvals pending (16); decide or wait for one",
            )
            .with_retry_after(wait));
        }
    }
    // The per-origin cap (16) also holds LOCAL_ORIGIN under the lock.
    state.approvals.reserve(pending.clone(), now)?;
    if let Some(m) = request.as_object_mut() {
        m.remove("challenge");
    }
    let (id, req_text) = (approval_id.clone(), request.to_string());
    let stored = state
        .db
        .call(move |c| {
            c.execute(
                "INSERT INTO approvals(approval_id, request_json, status, created_at, expires_at) VALUES (?1, ?2, 'pending', ?3, ?4)",
                rusqlite::params![id, req_text, now, expires_at],
            )?;
            Ok(())
        })
        .await;
    if let Err(e) = stored {
        state.approvals.lock().remove(&approval_id);
        return Err(ApiError::internal(e.to_string()));
    }
    state
        .audit(
            None,
            "approval.requested",
            Some(pending.action_digest.clone()),
            "pending",
            Some(&approval_id),
        )
        .await;
    tracing::info!(approval = %approval_id, action, "local approval requested");
    state.sessions.broadcast(&pending.request_frame());
    notify::approval_created(state, action, &approval_id, &summary);
    if let Some(tx) = pending_tx {
        let _ = tx.send(PendingNotice {
            approval_id: approval_id.clone(),
            expires_at_ms: expires_at,
            summary,
        });
    }
    let expiry = state.clock.instant_at(expires_at);
    let decision = tokio::select! {
        _ = pending.decided.notified() => pending.decision(),
        _ = tokio::time::sleep_until(expiry) => {
            pending.decide(Decision::Expired, None);
            pending.decision()
        }
        _ = gone.cancelled() => {
            tracing::info!(approval = %approval_id, "the requester went away: approval expired");
            pending.decide(Decision::Expired, None);
            pending.decision()
        }
        _ = state.shutdown.cancelled() => {
            state.approvals.lock().remove(&approval_id);
            return Err(ApiError::new(ErrorCode::Unavailable, "the server is shutting down; the approval was not decided and will be expired"));
        }
    };
    let (decision, by) = decision.unwrap_or((Decision::Expired, None));
    let recorded = finish(state, &pending, decision, by.as_deref()).await;
    match decision {
        Decision::Approved => recorded.map(|()| Granted {
            approval_id,
            device_id: by,
        }),
        Decision::Denied => Err(ApiError::new(
            ErrorCode::ApprovalDenied,
            "the approval was denied on the phone",
        )),
        Decision::Expired => Err(ApiError::new(
            ErrorCode::ApprovalExpired,
            "no approval arrived in time; nothing was released",
        )),
    }
}

/// The server as the vault's [`Host`].
pub struct StateHost(pub Arc<AppState>);

impl Host for StateHost {
    fn ask(
        &self,
        action: &'static str,
        params: Value,
        summary: String,
        gone: CancellationToken,
        pending: Option<oneshot::Sender<PendingNotice>>,
    ) -> BoxFuture<'_, Result<Granted, ApiError>> {
        Box::pin(request(&self.0, action, params, summary, gone, pending))
    }

    fn paired_devices(&self) -> BoxFuture<'_, Result<i64, ApiError>> {
        Box::pin(async move {
            self.0
                .db
                .call(|c| devices::count_active_devices(c))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))
        })
    }

    fn max_lease_secs(&self) -> u64 {
        self.0.config().secrets.max_lease_secs
    }

    fn audit(&self, r: SecretAudit) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.0
                .audit
                .record(AuditEntry {
                    ts_ms: self.0.clock.now_ms(),
                    device_id: r.device_id,
                    action: r.action.to_string(),
                    params_digest: None,
                    outcome: r.outcome,
                    approval_id: r.approval_id,
                    names: Some(r.names),
                    requester: r.requester,
                    lease_id: r.lease_id,
                    leases_ended: (!r.leases_ended.is_empty()).then_some(r.leases_ended),
                })
                .await;
        })
    }
}

/// Like [`super::register_gated`], for an action whose `prepare` must see
/// the caller (e.g. `reveal_secret`, refused before asking unless the
/// session is over TLS or loopback).
pub fn register_gated_for_caller<P, Prep, PrepFut, Run, RunFut>(
    actions: &mut crate::rpc::Actions,
    name: &'static str,
    prepare: Prep,
    run: Run,
) where
    P: serde::de::DeserializeOwned + Send + 'static,
    Prep: Fn(Arc<AppState>, crate::rpc::Caller, P) -> PrepFut + Clone + Send + Sync + 'static,
    PrepFut: std::future::Future<Output = Result<super::Prepared<P>, ApiError>> + Send + 'static,
    Run: Fn(Arc<AppState>, super::Approved<P>) -> RunFut + Clone + Send + Sync + 'static,
    RunFut: std::future::Future<Output = crate::rpc::ActionResult> + Send + 'static,
{
    use crate::rpc::{Caller, parse_params};
    actions.add_check::<P>(name);
    actions
        .module
        .register_async_method(
            name,
            move |params: jsonrpsee_types::Params<'static>,
                  state: Arc<AppState>,
                  ext: jsonrpsee_core::server::Extensions| {
                let (prepare, run) = (prepare.clone(), run.clone());
                async move {
                    let caller = ext
                        .get::<Caller>()
                        .cloned()
                        .ok_or_else(|| ApiError::internal("no caller"))?;
                    let raw: serde_json::Map<String, Value> = parse_params(params.as_str())?;
                    let p: P = parse_params(params.as_str())?;
                    let prepared = prepare(state.clone(), caller.clone(), p).await?;
                    let approval_id =
                        super::gate(&state, &caller, name, &raw, &prepared.summary, None).await?;
                    run(
                        state,
                        super::Approved {
                            params: prepared.params,
                            approval_id,
                        },
                    )
                    .await
                }
            },
        )
        .unwrap_or_else(|e| panic!("action {name} registered twice: {e}"));
}
