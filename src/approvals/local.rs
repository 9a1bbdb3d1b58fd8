//! Approvals that no session asked for (SPEC §10): releases and the CLI's
//! `set`/`rm` through the local socket, and task releases. They go through
//! the same pending map, decision and records as the gate, with
//! `origin_device_id` and `request_id` null, and count together against
//! [`MAX_PENDING_LOCAL`] within the 128 in all. A requester that goes away
//! expires its approval at once.
//!
//! [`Approvals`] is also the vault's [`Host`]: it has everything a release
//! needs from the server (the gate, the paired devices, the lease cap, the
//! audit log) and holds no server state, so the scheduler and the socket
//! can hold it without a cycle.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::commitment::{CommitmentKey, commit_action_secrets};
use super::{ApprovalError, Approvals, DecisionRule, wait_until};
use crate::protocol::ApiError;
use crate::secrets::release::{BoxFuture, Granted, Host, NotGranted, PendingNotice, SecretAudit};
use crate::storage::audit::AuditEntry;
use crate::storage::devices;

/// Approvals pending at once from the local socket and tasks together.
pub(crate) const MAX_PENDING_LOCAL: usize = 16;
/// The internal origin of local approvals (shown as null).
const LOCAL_ORIGIN: &str = "";

/// Whether an internal origin is the local one (no device originated it:
/// revocation watching must not take it for an unknown device).
pub(super) fn is_local(origin: &str) -> bool {
    origin == LOCAL_ORIGIN
}

impl Approvals {
    /// Creates an approval for `action` with `params` and waits for its
    /// decision. `gone` (the requester disconnected) expires it at once.
    pub async fn request_local(
        &self,
        action: &'static str,
        params: Value,
        summary: String,
        gone: CancellationToken,
        pending_tx: Option<oneshot::Sender<PendingNotice>>,
    ) -> Result<Granted, NotGranted> {
        // K goes to no one: the commitment only tells different values apart.
        let (params, _) = commit_action_secrets(action, &params, &CommitmentKey::generate());
        let (pending, request) = self.new_pending(
            action,
            params,
            &summary,
            None,
            LOCAL_ORIGIN,
            DecisionRule::default(),
        );
        let now = self.now_ms();
        {
            let g = self.lock();
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
                return Err(ApiError::from(ApprovalError::LocalBusy {
                    retry_after_ms: wait_until(earliest, now),
                })
                .into());
            }
        }
        // The per-origin cap (16) also holds LOCAL_ORIGIN under the lock.
        self.reserve(pending.clone(), now).map_err(ApiError::from)?;
        self.store_pending(&pending, request, None)
            .await
            .map_err(ApiError::from)?;
        let approval_id = pending.approval_id.clone();
        tracing::info!(approval = %approval_id, action, "local approval requested");
        self.deps().events.broadcast(&pending.request_frame());
        self.notify_created(action, &approval_id, &summary);
        if let Some(tx) = pending_tx {
            let _ = tx.send(PendingNotice {
                approval_id: approval_id.clone(),
                expires_at_ms: pending.expires_at,
                summary,
            });
        }
        let device_id = self
            .decide_and_finish(&pending, Some(&gone), "nothing was released")
            .await
            .map_err(|e| NotGranted {
                error: e.into(),
                approval_id: Some(approval_id.clone()),
            })?;
        Ok(Granted {
            approval_id,
            device_id,
        })
    }

    /// The gate as the vault's [`Host`], for the socket, the scheduler and
    /// the phone's secrets actions.
    pub fn host(&self) -> Arc<dyn Host> {
        Arc::new(self.clone())
    }
}

impl Host for Approvals {
    fn ask(
        &self,
        action: &'static str,
        params: Value,
        summary: String,
        gone: CancellationToken,
        pending: Option<oneshot::Sender<PendingNotice>>,
    ) -> BoxFuture<'_, Result<Granted, NotGranted>> {
        Box::pin(self.request_local(action, params, summary, gone, pending))
    }

    fn paired_devices(&self) -> BoxFuture<'_, Result<i64, ApiError>> {
        Box::pin(async move {
            self.deps()
                .db
                .call(|c| devices::count_active_devices(c))
                .await
                .map_err(|e| ApprovalError::from(e).into())
        })
    }

    fn max_lease_secs(&self) -> u64 {
        self.config().secrets.max_lease_secs
    }

    fn audit(&self, r: SecretAudit) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.deps()
                .audit
                .record(AuditEntry {
                    ts_ms: self.now_ms(),
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
