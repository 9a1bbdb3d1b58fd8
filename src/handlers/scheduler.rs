//! `list_scheduled_tasks`, `toggle_task`, `trigger_task`, `list_task_executions`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::protocol::ApiError;
use crate::rpc::{ActionResult, Caller, NoParams};
use crate::scheduler::{executions, start_run};
use crate::state::AppState;

pub async fn list_scheduled_tasks(state: Arc<AppState>, _c: Caller, _p: NoParams) -> ActionResult {
    let tasks = state
        .scheduler
        .list_json(&state.config(), state.clock.now_ms());
    Ok(json!({"result": "scheduled_tasks", "tasks": tasks}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToggleTask {
    name: String,
    enabled: bool,
}

fn unknown(name: &str) -> ApiError {
    ApiError::not_found(format!("no scheduled task named {name:?}"))
}

pub async fn toggle_task(state: Arc<AppState>, _c: Caller, p: ToggleTask) -> ActionResult {
    if state.scheduler.get(&p.name).is_none() {
        return Err(unknown(&p.name));
    }
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
    let task = state
        .scheduler
        .get(&p.name)
        .cloned()
        .ok_or_else(|| unknown(&p.name))?;
    let id = start_run(&state, &task, "manual").await?;
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
    if state.scheduler.get(&p.task_name).is_none() {
        return Err(unknown(&p.task_name));
    }
    let limit = p.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("`limit` must be in 1..=100"));
    }
    let name = p.task_name.clone();
    let rows = state
        .db
        .call(move |c| executions::list(c, &name, limit as i64))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(
        json!({"result": "task_executions", "executions": rows.iter().map(|e| e.to_json()).collect::<Vec<_>>()}),
    )
}
