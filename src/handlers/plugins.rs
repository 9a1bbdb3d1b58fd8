//! `list_plugins`, `toggle_plugin`, `reload_plugins`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::protocol::ApiError;
use crate::rpc::{ActionResult, Caller, NoParams};
use crate::state::AppState;

pub async fn list_plugins(state: Arc<AppState>, _c: Caller, _p: NoParams) -> ActionResult {
    Ok(json!({"result": "plugins", "plugins": state.plugins.list_json()}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toggle {
    pub name: String,
    pub enabled: bool,
}

pub async fn toggle_plugin(state: Arc<AppState>, _c: Caller, p: Toggle) -> ActionResult {
    if state.plugins.get(&p.name).is_none() {
        return Err(ApiError::not_found(format!("no plugin named {:?}", p.name)));
    }
    super::persist_toggle(state.plugins.toggles(), "Plugin", &p.name, p.enabled).await
}

pub async fn reload_plugins(state: Arc<AppState>, _c: Caller, _p: NoParams) -> ActionResult {
    let s = state.clone();
    let (loaded, failed) = tokio::task::spawn_blocking(move || s.plugins.reload())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(
        json!({"result": "plugins_reloaded", "loaded": loaded, "failed": failed.iter().map(|f| f.to_json()).collect::<Vec<_>>()}),
    )
}
