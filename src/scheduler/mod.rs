//! The scheduler: tasks from `[[tasks]]`, a runner that starts due tasks,
//! manual triggers, and the execution history (SPEC §6, §7).
//!
//! Wall time comes from `AppState::clock` and waits from tokio's clock, so
//! tests move through schedules with a paused clock. A task never runs
//! twice at once; at most `MAX_CONCURRENT_RUNS` runs happen together.

pub mod executions;
pub mod run;
pub mod task;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::clock::rfc3339_ms;
use crate::config::Config;
use crate::protocol::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::storage::Db;
use crate::storage::toggles::{Kind, Toggles};
use executions::Execution;
use task::{TaskDef, next_after};

/// Runs that may happen at once, all tasks together.
pub const MAX_CONCURRENT_RUNS: usize = 4;
/// Executions shown on the dashboard.
const RECENT: usize = 10;

pub struct Scheduler {
    tasks: Vec<TaskDef>,
    toggles: Toggles,
    running: Mutex<HashSet<String>>,
    last_run: Mutex<HashMap<String, i64>>,
    recent: Mutex<VecDeque<Execution>>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tz(config: &Config) -> chrono_tz::Tz {
    config.scheduler.timezone.parse().unwrap_or(chrono_tz::UTC)
}

fn utc(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}

impl Scheduler {
    /// Parses the tasks (reporting bad ones), loads toggles, last runs and
    /// recent executions, and closes runs a crash left open.
    pub fn load(config: &Config, db: &Db, now_ms: i64) -> Scheduler {
        let (tasks, failed) = task::parse_all(&config.tasks);
        for (which, why) in &failed {
            tracing::warn!("{which} skipped: {why}");
        }
        let loaded = db.blocking(|c| {
            let interrupted = executions::close_interrupted(c, now_ms)?;
            let mut last = HashMap::new();
            for t in &tasks {
                if let (Some(run), _) = executions::state(c, &t.id)? {
                    last.insert(t.id.clone(), run);
                }
            }
            Ok((interrupted, last, executions::recent(c, RECENT as i64)?))
        });
        let (interrupted, last, recent) = loaded.unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot load scheduler state");
            (0, HashMap::new(), Vec::new())
        });
        if interrupted > 0 {
            tracing::warn!(
                runs = interrupted,
                "task runs interrupted by the last stop were recorded as failed"
            );
        }
        tracing::info!(
            tasks = tasks.len(),
            skipped = failed.len(),
            "scheduled tasks loaded"
        );
        Scheduler {
            tasks,
            toggles: Toggles::load(db, Kind::Task),
            running: Mutex::default(),
            last_run: Mutex::new(last),
            recent: Mutex::new(recent.into_iter().collect()),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_RUNS)),
        }
    }

    pub fn count(&self) -> usize {
        self.tasks.len()
    }

    pub fn get(&self, name: &str) -> Option<&TaskDef> {
        self.tasks.iter().find(|t| t.name == name)
    }

    /// The task's toggle, else its `enabled` in config.toml.
    pub fn is_enabled(&self, t: &TaskDef) -> bool {
        self.toggles.is_enabled(&t.name, t.enabled)
    }

    /// The persisted toggles (`toggle_task` sets them).
    pub fn toggles(&self) -> &Toggles {
        &self.toggles
    }

    /// `list_scheduled_tasks` entries. `next_run` is null for a disabled
    /// task, and for every task while `scheduler.enabled` is false.
    pub fn list_json(&self, config: &Config, now_ms: i64) -> Vec<Value> {
        let zone = tz(config);
        let last = lock(&self.last_run).clone();
        self.tasks
            .iter()
            .map(|t| {
                let enabled = self.is_enabled(t);
                let next = (enabled && config.scheduler.enabled)
                    .then(|| next_after(&t.cron, &zone, utc(now_ms)))
                    .flatten()
                    .map(|d| rfc3339_ms(d.timestamp_millis()));
                json!({"id": t.id, "name": t.name, "cron_expression": t.cron_expression, "handler_type": t.handler.kind(),
                       "enabled": enabled, "last_run": last.get(&t.id).map(|ms| rfc3339_ms(*ms)), "next_run": next})
            })
            .collect()
    }

    /// Newest first, with `task_name`.
    pub fn recent_json(&self) -> Vec<Value> {
        lock(&self.recent)
            .iter()
            .map(Execution::to_json_named)
            .collect()
    }

    fn remember(&self, e: &Execution) {
        let mut r = lock(&self.recent);
        match r.iter_mut().find(|x| x.id == e.id) {
            Some(x) => *x = e.clone(),
            None => {
                r.push_front(e.clone());
                r.truncate(RECENT);
            }
        }
    }
}

/// Starts a run of `task` now; answers once the execution is recorded.
/// `conflict` if the task is already running.
pub async fn start_run(
    state: &Arc<AppState>,
    task: &TaskDef,
    trigger: &'static str,
) -> Result<i64, ApiError> {
    let sched = &state.scheduler;
    if !lock(&sched.running).insert(task.id.clone()) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("task '{}' is already running", task.name),
        ));
    }
    let now = state.clock.now_ms();
    let (tid, tname) = (task.id.clone(), task.name.clone());
    let id = match state
        .db
        .call(move |c| executions::start(c, &tid, &tname, now))
        .await
    {
        Ok(id) => id,
        Err(e) => {
            lock(&sched.running).remove(&task.id);
            return Err(ApiError::internal(e.to_string()));
        }
    };
    lock(&sched.last_run).insert(task.id.clone(), now);
    let mut exec = Execution {
        id,
        task_id: task.id.clone(),
        task_name: task.name.clone(),
        started_at: now,
        completed_at: None,
        success: None,
        error: None,
    };
    sched.remember(&exec);
    state.sessions.broadcast(&crate::protocol::frames::event(
        "task_started",
        exec.to_json_named(),
    ));
    tracing::info!(task = %task.name, execution = id, trigger, "task started");
    let (state2, task) = (state.clone(), task.clone());
    state.tasks.spawn(async move {
        let sched = &state2.scheduler;
        let permit = sched.permits.clone().acquire_owned().await;
        let out = tokio::select! {
            r = run::run(&state2, &task, id, now, trigger) => r,
            _ = state2.shutdown.cancelled() => Err("interrupted: the server stopped during the run".into()),
        };
        drop(permit);
        let end = state2.clock.now_ms();
        let err = out.as_ref().err().cloned();
        let e2 = err.clone();
        if let Err(e) = state2.db.call(move |c| executions::finish(c, id, end, e2.is_none(), e2.as_deref())).await {
            tracing::error!(error = %e, "cannot record a task's end");
        }
        exec.completed_at = Some(end);
        exec.success = Some(err.is_none());
        exec.error = err.clone();
        sched.remember(&exec);
        lock(&sched.running).remove(&task.id);
        state2.sessions.broadcast(&crate::protocol::frames::event("task_finished", exec.to_json_named()));
        match err {
            None => tracing::info!(task = %task.name, execution = id, ms = end - now, "task succeeded"),
            Some(e) => tracing::warn!(task = %task.name, execution = id, error = %e, "task failed"),
        }
    });
    Ok(id)
}

/// Starts due enabled tasks every `scheduler.check_interval_secs` while
/// `scheduler.enabled`; `[scheduler]` changes apply at once. A task with
/// `catch_up = true` whose slot passed while the server was down runs once
/// at start; slots missed otherwise (down, disabled) are skipped.
pub async fn runner(state: Arc<AppState>) {
    let sched = &state.scheduler;
    let start = state.clock.now_ms();
    // Up to when each task's slots have been dealt with.
    let mut cursor: HashMap<String, i64> = HashMap::new();
    for t in &sched.tasks {
        let id = t.id.clone();
        let seen = state
            .db
            .call(move |c| executions::state(c, &id))
            .await
            .ok()
            .and_then(|(_, slot)| slot);
        let config = state.config();
        if t.catch_up
            && sched.is_enabled(t)
            && config.scheduler.enabled
            && let Some(seen) = seen
            && next_after(&t.cron, &tz(&config), utc(seen))
                .is_some_and(|n| n.timestamp_millis() <= start)
        {
            tracing::info!(task = %t.name, "a slot passed while the server was down: catching up");
            let _ = start_run(&state, t, "catch_up").await;
        }
        cursor.insert(t.id.clone(), start);
    }
    let mut config_rx = state.subscribe_config();
    loop {
        let config = state.config();
        let wait = Duration::from_secs(config.scheduler.check_interval_secs.max(1));
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            changed = config_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }
        let config = state.config();
        let now = state.clock.now_ms();
        if config.scheduler.enabled {
            let zone = tz(&config);
            for t in &sched.tasks {
                let from = cursor.get(&t.id).copied().unwrap_or(now);
                let due = next_after(&t.cron, &zone, utc(from))
                    .is_some_and(|n| n.timestamp_millis() <= now);
                if due && sched.is_enabled(t) {
                    match start_run(&state, t, "schedule").await {
                        Ok(_) => {}
                        Err(e) if e.code == ErrorCode::Conflict => {
                            tracing::info!(task = %t.name, "slot skipped: the previous run is still going")
                        }
                        Err(e) => {
                            tracing::error!(task = %t.name, error = %e.message, "cannot start a scheduled run")
                        }
                    }
                }
            }
        }
        let ids: Vec<String> = sched.tasks.iter().map(|t| t.id.clone()).collect();
        for id in &ids {
            cursor.insert(id.clone(), now);
        }
        if let Err(e) = state
            .db
            .call(move |c| {
                for id in &ids {
                    executions::set_last_slot(c, id, now)?;
                }
                Ok(())
            })
            .await
        {
            tracing::error!(error = %e, "cannot record the scheduler's progress");
        }
    }
}
