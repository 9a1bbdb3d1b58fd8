//! Approvals that no session asked for (SPEC §10): releases and the CLI's
//! `set`/`rm` through the local socket, and task releases. They go through
//! the same pending map, decision and records as the gate, with
//! `origin_device_id` and `request_id` null, and count together against
//! [`MAX_PENDING_LOCAL`] within the 128 in all. A requester that goes away
//! expires its approval at once.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::commitment::{CommitmentKey, commit_action_secrets};
use super::{ApprovalError, decide_and_finish, new_pending, notify, store_pending, wait_until};
use crate::protocol::ApiError;
use crate::secrets::release::{BoxFuture, Granted, Host, PendingNotice, SecretAudit};
use crate::state::AppState;
use crate::storage::audit::AuditEntry;
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
) -> Result<Granted, ApprovalError> {
    // K goes to no one: the commitment only tells different values apart.
    let (params, _) = commit_action_secrets(action, &params, &CommitmentKey::generate());
    let (pending, request) = new_pending(state, action, params, &summary, None, LOCAL_ORIGIN, None);
    let now = state.clock.now_ms();
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
            return Err(ApprovalError::LocalBusy {
                retry_after_ms: wait_until(earliest, now),
            });
        }
    }
    // The per-origin cap (16) also holds LOCAL_ORIGIN under the lock.
    state.approvals.reserve(pending.clone(), now)?;
    store_pending(state, &pending, request, None).await?;
    let approval_id = pending.approval_id.clone();
    tracing::info!(approval = %approval_id, action, "local approval requested");
    state.sessions.broadcast(&pending.request_frame());
    notify::approval_created(state, action, &approval_id, &summary);
    if let Some(tx) = pending_tx {
        let _ = tx.send(PendingNotice {
            approval_id: approval_id.clone(),
            expires_at_ms: pending.expires_at,
            summary,
        });
    }
    let device_id = decide_and_finish(state, &pending, Some(&gone), "nothing was released").await?;
    Ok(Granted {
        approval_id,
        device_id,
    })
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
        Box::pin(async move {
            request(&self.0, action, params, summary, gone, pending)
                .await
                .map_err(ApiError::from)
        })
    }

    fn paired_devices(&self) -> BoxFuture<'_, Result<i64, ApiError>> {
        Box::pin(async move {
            self.0
                .db
                .call(|c| devices::count_active_devices(c))
                .await
                .map_err(|e| ApprovalError::from(e).into())
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
    actions.gated.insert(name);
    crate::rpc::register_raw::<P, _, _>(actions, name, move |state, caller, raw| {
        let (prepare, run) = (prepare.clone(), run.clone());
        async move {
            let raw = Value::Object(raw);
            let p: P = crate::rpc::params_from_ref(&raw)?;
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
    });
}
