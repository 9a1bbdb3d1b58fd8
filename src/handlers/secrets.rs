//! The phone's secrets actions (SPEC §10): `list_secrets`, `set_secret`,
//! `delete_secret`, `reveal_secret` (gated), `list_secret_leases`,
//! `revoke_secret_lease`. Values are never in a response but
//! `reveal_secret`'s.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::approvals::{Approved, GateRequest, Prepared};
use crate::protocol::{ApiError, ErrorCode};
use crate::rpc::{ActionResult, Caller, NoParams};
use crate::secrets::release::{Granted, Host, SecretAudit};
use crate::secrets::socket::{apply_delete, apply_set};
use crate::secrets::{SecretValue, check_description, check_name, check_value};
use crate::state::AppState;

pub async fn list_secrets(state: Arc<AppState>, _c: Caller, _p: NoParams) -> ActionResult {
    let list = state.secrets.list().await?;
    Ok(json!({"result": "secrets", "secrets": list}))
}

/// `Debug` shows no value ([`SecretValue`] is redacted).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    name: String,
    value: SecretValue,
    #[serde(default)]
    description: Option<String>,
}

pub async fn prepare_set(
    state: Arc<AppState>,
    p: SetSecret,
) -> Result<Prepared<SetSecret>, ApiError> {
    check_name(&p.name)?;
    check_value(p.value.expose())?;
    if let Some(d) = &p.description {
        check_description(d)?;
    }
    // Refused before the phone is asked when the value could not be sealed.
    state.secrets.check_key().await?;
    let verb = if state.secrets.exists(&p.name).await? {
        "Replace"
    } else {
        "Create"
    };
    let summary = format!("{verb} secret {}", p.name);
    Ok(Prepared { params: p, summary })
}

fn granted<P>(a: &Approved<P>) -> Granted {
    Granted {
        approval_id: a.approval_id().to_string(),
        device_id: None,
    }
}

pub async fn set_secret(state: Arc<AppState>, approved: Approved<SetSecret>) -> ActionResult {
    let g = granted(&approved);
    let p = approved.into_params();
    let replaced = apply_set(
        &state.secrets,
        &state.approvals,
        &p.name,
        p.value,
        p.description,
        Some(g),
    )
    .await?;
    let word = if replaced { "replaced" } else { "created" };
    Ok(json!({"result": "success", "message": format!("Secret '{}' {word}", p.name)}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretName {
    name: String,
}

async fn existing(state: &AppState, name: &str) -> Result<(), ApiError> {
    check_name(name)?;
    if state.secrets.exists(name).await? {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no secret named {name:?}")))
    }
}

pub async fn prepare_delete(
    state: Arc<AppState>,
    p: SecretName,
) -> Result<Prepared<SecretName>, ApiError> {
    existing(&state, &p.name).await?;
    let summary = format!("Delete secret {} (its leases end)", p.name);
    Ok(Prepared { params: p, summary })
}

pub async fn delete_secret(state: Arc<AppState>, approved: Approved<SecretName>) -> ActionResult {
    let g = granted(&approved);
    let p = approved.into_params();
    apply_delete(&state.secrets, &state.approvals, &p.name, Some(g)).await?;
    Ok(json!({"result": "success", "message": format!("Secret '{}' deleted", p.name)}))
}

/// Refused before anything is asked unless the session is over TLS (the
/// server has TLS configured, so every session is) or from loopback.
pub async fn prepare_reveal(
    state: Arc<AppState>,
    caller: Caller,
    p: SecretName,
) -> Result<GateRequest<SecretName>, ApiError> {
    let tls = state.config().server.tls_cert.is_some();
    let loopback = caller.peer.is_some_and(|a| a.ip().is_loopback());
    if !tls && !loopback {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "reveal_secret needs a TLS session or one from this machine (loopback)",
        ));
    }
    existing(&state, &p.name).await?;
    let summary = format!(
        "Reveal secret {} to the session that asked (only it can approve)",
        p.name
    );
    Ok(Prepared { params: p, summary }.approved_only_by_requester())
}

pub async fn reveal_secret(state: Arc<AppState>, approved: Approved<SecretName>) -> ActionResult {
    let approval_id = approved.approval_id().to_string();
    let name = approved.into_params().name;
    let values = state
        .secrets
        .open_values(std::slice::from_ref(&name), false)
        .await?;
    state
        .approvals
        .audit(SecretAudit {
            action: "secret.revealed",
            outcome: "ok".into(),
            names: vec![name.clone()],
            approval_id: Some(approval_id),
            ..Default::default()
        })
        .await;
    let value = values
        .into_iter()
        .next()
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::not_found(format!("no secret named {name:?}")))?;
    Ok(json!({"result": "secret", "name": name, "value": value.expose()}))
}

pub async fn list_secret_leases(state: Arc<AppState>, _c: Caller, _p: NoParams) -> ActionResult {
    let leases = state.secrets.leases().await?;
    Ok(json!({"result": "secret_leases", "leases": leases}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeLease {
    lease_id: String,
}

/// No approval: it only takes access away.
pub async fn revoke_secret_lease(state: Arc<AppState>, c: Caller, p: RevokeLease) -> ActionResult {
    let Some(names) = state.secrets.revoke_lease(&p.lease_id).await? else {
        return Err(ApiError::not_found(
            "no live lease with this id (unknown or ended)",
        ));
    };
    state
        .approvals
        .audit(SecretAudit {
            action: "secret.lease_revoked",
            outcome: "ok".into(),
            device_id: Some(c.device_id.to_string()),
            names,
            lease_id: Some(p.lease_id.clone()),
            ..Default::default()
        })
        .await;
    Ok(json!({"result": "success", "message": format!("Lease {} revoked", p.lease_id)}))
}
