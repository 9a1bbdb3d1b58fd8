//! `list_devices` and `revoke_device` (gated).

use std::sync::Arc;

use serde_json::{Value, json};

use crate::approvals::{Approved, GateRequest, Prepared};
use crate::clock::rfc3339_ms;
use crate::protocol::ApiError;
use crate::rpc::{ActionResult, Caller, NoParams};
use crate::state::AppState;
use crate::storage::devices::{Device, list_devices as db_list};

pub fn device_json(d: &Device) -> Value {
    json!({
        "device_id": d.device_id,
        "device_name": d.device_name,
        "approval_key_alg": d.approval_key_alg.as_str(),
        "paired_at": rfc3339_ms(d.paired_at),
        "last_seen": d.last_seen.map(rfc3339_ms),
        "revoked": d.revoked,
    })
}

pub async fn list_devices(state: Arc<AppState>, _caller: Caller, _p: NoParams) -> ActionResult {
    state.last_seen.flush(&state.db).await?;
    let devices = state.db.call(|c| db_list(c)).await?;
    Ok(json!({"result": "devices", "devices": devices.iter().map(device_json).collect::<Vec<_>>()}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeDevice {
    pub device_id: String,
}

/// Validates `revoke_device` before any phone is asked: the device must
/// exist. The target device cannot decide its own revocation (SPEC §8 Limits).
pub async fn prepare_revoke(
    state: Arc<AppState>,
    p: RevokeDevice,
) -> Result<GateRequest<RevokeDevice>, ApiError> {
    let id = p.device_id.clone();
    let device = state
        .db
        .call(move |c| crate::storage::devices::get_device(c, &id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {:?}", p.device_id)))?;
    let summary = format!(
        "Revoke device {} ({:?}): it will be disconnected and must pair again",
        device.device_id, device.device_name
    );
    let target = device.device_id.clone();
    Ok(Prepared { params: p, summary }.barring_decider(target))
}

/// `revoke_device`, after approval: marks it revoked, expires every approval
/// it originated (never run) and closes its sessions (4403).
pub async fn revoke_device(state: Arc<AppState>, approved: Approved<RevokeDevice>) -> ActionResult {
    let id = approved.params().device_id.clone();
    let id2 = id.clone();
    let found = state
        .db
        .call(move |c| crate::storage::devices::revoke_device(c, &id2))
        .await?;
    if !found {
        return Err(ApiError::not_found(format!("no device {id:?}")));
    }
    let expired = state.approvals.expire_originated_by(&id);
    let closed = state
        .sessions
        .close_device(&id, crate::protocol::close::REVOKED);
    tracing::info!(device = %id, sessions = closed, expired, approval = approved.approval_id(), "device revoked");
    Ok(json!({"result": "success", "message": format!("Device '{id}' revoked")}))
}
