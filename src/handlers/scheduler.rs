//! `list_scheduled_tasks`, `toggle_task`, `trigger_task`, `list_task_executions`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::rpc::{ActionResult, Caller, NoParams};
use crate::state::AppState;

pub async fn list_scheduled_tasks(state: Arc<AppState>, _c: Caller, _p: NoParams) -> ActionResult {
    let tasks = state.scheduler.list_json();
    Ok(json!({"result": "scheduled_tasks", "tasks": tasks}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToggleTask {
    name: String,
    enabled: bool,
}

pub async fn toggle_task(state: Arc<AppState>, _c: Caller, p: ToggleTask) -> ActionResult {
    state.scheduler.task(&p.name)?;
    super::persist_toggle(state.scheduler.toggles(), "Task", &p.name, p.enabled).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerTask {
    name: String,
}

/// Starts a run now, whatever the schedule and enabled state; answers once
/// it has started. `execution_id` is an addition to SPEC §6.
pub async fn trigger_task(state: Arc<AppState>, _c: Caller, p: TriggerTask) -> ActionResult {
    let host = state.approvals.host();
    let id = state.scheduler.trigger(&p.name, host).await?;
    Ok(
        json!({"result": "success", "message": format!("Task '{}' started", p.name), "execution_id": id}),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListExecutions {
    task_name: String,
    limit: Option<u32>,
}

pub async fn list_task_executions(
    state: Arc<AppState>,
    _c: Caller,
    p: ListExecutions,
) -> ActionResult {
    let rows = state
        .scheduler
        .executions(&p.task_name, p.limit.unwrap_or(20))
        .await?;
    Ok(
        json!({"result": "task_executions", "executions": rows.iter().map(|e| e.to_json()).collect::<Vec<_>>()}),
    )
}
