//! `list_skills`, `toggle_skill`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::protocol::ApiError;
use crate::rpc::{ActionResult, Caller, NoParams};
use crate::state::AppState;

/// Rescans the skills folder, then lists. `failed` (an addition to SPEC §6)
/// reports SKILL.md files that were skipped, with the reason.
pub async fn list_skills(state: Arc<AppState>, _c: Caller, _p: NoParams) -> ActionResult {
    let s = state.clone();
    tokio::task::spawn_blocking(move || s.skills.rescan())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (skills, failed) = state.skills.list_json();
    Ok(json!({"result": "skills", "skills": skills, "failed": failed}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToggleSkill {
    pub id: String,
    pub enabled: bool,
}

pub async fn toggle_skill(state: Arc<AppState>, _c: Caller, p: ToggleSkill) -> ActionResult {
    if !state.skills.exists(&p.id) {
        return Err(ApiError::not_found(format!("no skill {:?}", p.id)));
    }
    super::persist_toggle(state.skills.toggles(), "Skill", &p.id, p.enabled).await
}
