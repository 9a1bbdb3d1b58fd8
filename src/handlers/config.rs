//! `get_config` (sanitized, never a secret) and `update_config` (gated).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::approvals::{Approved, Prepared};
use crate::config::Config;
use crate::config_file::{merge_section, write_atomically};
use crate::protocol::{ApiError, ErrorCode};
use crate::redact::SECRET_KEYS;
use crate::rpc::{ActionResult, Caller, NoParams};
use crate::state::AppState;
use crate::storage::audit::Retention;

pub async fn get_config(state: Arc<AppState>, _caller: Caller, _p: NoParams) -> ActionResult {
    let mut v = state.config().public_view();
    v["result"] = "config".into();
    Ok(v)
}

/// Sections the phone may change (SPEC §7).
const UPDATABLE: &[&str] = &[
    "llm",
    "scheduler",
    "memory",
    "approvals",
    "audit",
    "secrets",
    "notify",
];

/// Whether `section.key` holds a secret.
fn is_secret(section: &str, key: &str) -> bool {
    SECRET_KEYS.contains(&key) || (section == "notify" && key == "url")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    pub section: String,
    pub value: Map<String, Value>,
}

/// `config` with `value` merged into `[section]`, validated. Every refusal is
/// `invalid_request` (or `forbidden` for `server`) and changes nothing.
pub fn merged(
    config: &Config,
    section: &str,
    value: &Map<String, Value>,
) -> Result<Config, ApiError> {
    if section == "server" {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "[server] (listen address, TLS, limits) is never changed remotely: edit config.toml on the machine",
        ));
    }
    if !UPDATABLE.contains(&section) {
        return Err(ApiError::invalid(format!(
            "unknown or non-updatable section {section:?}; updatable: {}",
            UPDATABLE.join(", ")
        )));
    }
    if value.is_empty() {
        return Err(ApiError::invalid("`value` must set at least one key"));
    }
    let whole = serde_json::to_value(config).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut current = whole
        .get(section)
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for (k, v) in value {
        let Some(slot) = current.get_mut(k) else {
            let known: Vec<_> = current.keys().cloned().collect();
            return Err(ApiError::invalid(format!(
                "unknown key `{k}` in [{section}]; known keys: {}",
                known.join(", ")
            )));
        };
        if v.is_null() && !SECRET_KEYS.contains(&k.as_str()) {
            return Err(ApiError::invalid(format!("`{section}.{k}` cannot be null")));
        }
        *slot = v.clone();
    }
    let bad =
        |e: serde_json::Error| ApiError::invalid(format!("invalid value in [{section}]: {e}"));
    let mut next = config.clone();
    let obj = Value::Object(current);
    match section {
        "llm" => next.llm = serde_json::from_value(obj).map_err(bad)?,
        "scheduler" => next.scheduler = serde_json::from_value(obj).map_err(bad)?,
        "memory" => next.memory = serde_json::from_value(obj).map_err(bad)?,
        "approvals" => next.approvals = serde_json::from_value(obj).map_err(bad)?,
        "audit" => next.audit = serde_json::from_value(obj).map_err(bad)?,
        "secrets" => next.secrets = serde_json::from_value(obj).map_err(bad)?,
        "notify" => next.notify = serde_json::from_value(obj).map_err(bad)?,
        _ => unreachable!("checked above"),
    }
    next.validate().map_err(ApiError::invalid)?;
    Ok(next)
}

fn describe(section: &str, value: &Map<String, Value>) -> String {
    let parts: Vec<String> = value
        .iter()
        .map(|(k, v)| {
            if section == "notify" && k == "url" && !v.is_null() {
                // The owner must see where every later approval would be
                // posted; the path and query (a capability) stay hidden.
                let to = v
                    .as_str()
                    .map_or("[redacted]".into(), crate::redact::url_origin);
                format!("{k} = {to}/[redacted]")
            } else if is_secret(section, k) && !v.is_null() {
                format!("{k} = [redacted]")
            } else {
                format!("{k} = {v}")
            }
        })
        .collect();
    format!("Change configuration [{section}]: {}", parts.join(", "))
}

/// Validates before any phone is asked: an invalid update never prompts.
pub async fn prepare_update(
    state: Arc<AppState>,
    p: UpdateConfig,
) -> Result<Prepared<UpdateConfig>, ApiError> {
    merged(&state.config(), &p.section, &p.value)?;
    let summary = describe(&p.section, &p.value);
    Ok(Prepared { params: p, summary })
}

/// After approval: merge into config.toml (comments kept), replace it
/// atomically, apply live.
pub async fn update_config(state: Arc<AppState>, approved: Approved<UpdateConfig>) -> ActionResult {
    let _guard = state.config_write.lock().await;
    let p = approved.params().clone();
    let path = state.dir.config();
    let (section, value) = (p.section.clone(), p.value.clone());
    let next = tokio::task::spawn_blocking(move || -> Result<Config, ApiError> {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(ApiError::internal(format!("cannot read config.toml: {e}"))),
        };
        let new_text = merge_section(&text, &section, &value).map_err(ApiError::invalid)?;
        let next = Config::parse(&new_text, &path).map_err(|e| ApiError::invalid(e.to_string()))?;
        write_atomically(&path, &new_text)
            .map_err(|e| ApiError::internal(format!("config.toml was not changed: {e}")))?;
        Ok(next)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    let old = state.config();
    let (new_audit, new_model) = (next.audit.dir.clone(), next.memory.model_dir.clone());
    state.set_config(next);
    // Applied before answering, so the next request sees the change.
    let retention = Retention::from(&state.config().audit);
    if Retention::from(&old.audit) != retention {
        state.audit.set_retention(retention).await;
    }
    if old.audit.dir != new_audit {
        state.audit.set_dir(state.dir.resolve(&new_audit)).await;
    }
    if old.memory.model_dir != new_model {
        tracing::info!(dir = %new_model.display(), library = %state.memory.embedder.library().display(), "memory.model_dir changed: reloading the model files (the ONNX Runtime library stays the one fixed at start)");
        state.memory.embedder.reload(state.dir.resolve(&new_model));
    }
    tracing::info!(section = %p.section, approval = approved.approval_id(), "configuration updated");
    Ok(
        json!({"result": "success", "message": format!("Configuration section [{}] updated", p.section)}),
    )
}
