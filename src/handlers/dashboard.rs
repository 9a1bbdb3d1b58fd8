//! `get_dashboard`: the agent at a glance (SPEC §6). Served from memory, no I/O.
//! `warnings` (v1.1): what the owner should act on before something fails,
//! e.g. low disk space on the data or audit volume (`disk.rs`).

use std::sync::Arc;

use serde_json::json;

use crate::rpc::{ActionResult, Caller, NoParams};
use crate::state::AppState;

pub async fn get_dashboard(state: Arc<AppState>, _caller: Caller, _p: NoParams) -> ActionResult {
    Ok(json!({
        "result": "dashboard",
        "connected": true,
        "connected_devices": state.sessions.connected_devices(),
        "memory_count": state.memory.count(),
        "plugin_count": state.plugins.count(),
        "skill_count": state.skills.count(),
        "scheduled_task_count": state.scheduler.count(),
        "recent_executions": state.scheduler.recent_json(),
        "warnings": *state.disk.warnings(),
        "secret_count": state.secrets.stored(),
    }))
}
