//! The scheduler: tasks from `[[tasks]]`, a runner that starts due tasks,
//! manual triggers, and the execution history (SPEC §6, §7).
//!
//! [`Scheduler`] is a service that owns what it uses ([`Deps`]): it is built
//! once by `AppState::new` and knows nothing of the server's state. Wall
//! time comes from its [`Clock`] and waits from tokio's clock, so tests move
//! through schedules with a paused clock. A task never runs twice at once;
//! at most `MAX_CONCURRENT_RUNS` runs happen together.
//!
//! Task secrets are asked for through a [`Host`] handed to each run (by
//! [`Scheduler::start`] for the runner, by the caller of
//! [`Scheduler::trigger`]); the scheduler keeps none of its own, so it
//! depends on no other service for longer than a run.

pub mod error;
pub mod executions;
pub mod run;
pub mod task;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, rfc3339_ms};
use crate::config::Config;
use crate::plugins::Plugins;
use crate::secrets::Secrets;
use crate::secrets::release::Host;
use crate::sessions::Sessions;
use crate::storage::Db;
use crate::storage::audit::AuditLog;
use crate::storage::toggles::{Kind, Toggles};
pub use error::SchedulerError;
use executions::Execution;
use task::{TaskDef, next_after};

/// Runs that may happen at once, all tasks together.
pub const MAX_CONCURRENT_RUNS: usize = 4;
/// Executions shown on the dashboard.
const RECENT: usize = 10;

/// What the scheduler is built from: handles to the parts of the server it
/// uses, each cheap to clone.
pub struct Deps {
    pub db: Db,
    pub clock: Clock,
    /// The live configuration (`[scheduler]`, `[[tasks]]`, `audit.dir`).
    pub config: watch::Receiver<Arc<Config>>,
    /// Where `task_started` / `task_finished` events go.
    pub events: Arc<Sessions>,
    /// Cancelled when the server stops: runs end as interrupted.
    pub shutdown: CancellationToken,
    /// Runs and the runner are spawned here; shutdown waits for them.
    pub tracker: TaskTracker,
    /// For `plugin` tasks' commands.
    pub plugins: Arc<Plugins>,
    /// The vault that task secrets are released from.
    pub secrets: Secrets,
    /// Flushed before the `audit-verify` builtin reads the log.
    pub audit: Arc<AuditLog>,
    /// The data directory: `command` tasks run there; relative config paths
    /// resolve against it.
    pub root: PathBuf,
}

/// The scheduler service. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

struct Shared {
    deps: Deps,
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
            .field("tasks", &self.shared.tasks.len())
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
    /// Parses the tasks of the current config (reporting bad ones), loads
    /// toggles, last runs and recent executions, and closes runs a crash
    /// left open. Blocking (database reads); nothing runs until
    /// [`Scheduler::start`].
    pub fn load(deps: Deps) -> Scheduler {
        let config = deps.config.borrow().clone();
        let now_ms = deps.clock.now_ms();
        let (tasks, failed) = task::parse_all(&config.tasks);
        for (which, why) in &failed {
            tracing::warn!("{which} skipped: {why}");
        }
        let loaded = deps.db.blocking(|c| {
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
        let toggles = Toggles::load(&deps.db, Kind::Task);
        Scheduler {
            shared: Arc::new(Shared {
                deps,
                tasks,
                toggles,
                running: Mutex::default(),
                last_run: Mutex::new(last),
                recent: Mutex::new(recent.into_iter().collect()),
                permits: Arc::new(Semaphore::new(MAX_CONCURRENT_RUNS)),
            }),
        }
    }

    /// Spawns the runner (see [`Scheduler::run`]) on the scheduler's
    /// tracker. `host` asks for the secrets of scheduled runs.
    pub fn start(&self, host: Arc<dyn Host>) {
        self.shared.deps.tracker.spawn(self.clone().run(host));
    }

    fn deps(&self) -> &Deps {
        &self.shared.deps
    }

    fn config(&self) -> Arc<Config> {
        self.deps().config.borrow().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.tasks.len()
    }

    pub fn get(&self, name: &str) -> Option<&TaskDef> {
        self.shared.tasks.iter().find(|t| t.name == name)
    }

    /// The task named `name`, or [`SchedulerError::UnknownTask`].
    pub fn task(&self, name: &str) -> Result<&TaskDef, SchedulerError> {
        self.get(name)
            .ok_or_else(|| SchedulerError::UnknownTask(name.to_string()))
    }

    /// The task's toggle, else its `enabled` in config.toml.
    pub fn is_enabled(&self, t: &TaskDef) -> bool {
        self.shared.toggles.is_enabled(&t.name, t.enabled)
    }

    /// The persisted toggles (`toggle_task` sets them).
    pub fn toggles(&self) -> &Toggles {
        &self.shared.toggles
    }

    /// `list_scheduled_tasks` entries, now. `next_run` is null for a
    /// disabled task, and for every task while `scheduler.enabled` is false.
    pub fn list_json(&self) -> Vec<Value> {
        let config = self.config();
        let now_ms = self.deps().clock.now_ms();
        let zone = tz(&config);
        let last = lock(&self.shared.last_run).clone();
        self.shared
            .tasks
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
        lock(&self.shared.recent)
            .iter()
            .map(Execution::to_json_named)
            .collect()
    }

    /// The last `limit` (1..=100) executions of the task named `name`,
    /// newest first.
    pub async fn executions(
        &self,
        name: &str,
        limit: u32,
    ) -> Result<Vec<Execution>, SchedulerError> {
        self.task(name)?;
        if !(1..=100).contains(&limit) {
            return Err(SchedulerError::BadLimit);
        }
        let name = name.to_string();
        Ok(self
            .deps()
            .db
            .call(move |c| executions::list(c, &name, limit as i64))
            .await?)
    }

    fn remember(&self, e: &Execution) {
        let mut r = lock(&self.shared.recent);
        match r.iter_mut().find(|x| x.id == e.id) {
            Some(x) => *x = e.clone(),
            None => {
                r.push_front(e.clone());
                r.truncate(RECENT);
            }
        }
    }

    fn broadcast(&self, event: &str, e: &Execution) {
        self.deps()
            .events
            .broadcast(&crate::protocol::frames::event(event, e.to_json_named()));
    }

    /// Starts a run of the task named `name` now, whatever its schedule
    /// and toggle; answers once the execution is recorded. `host` asks for
    /// the task's secrets.
    pub async fn trigger(&self, name: &str, host: Arc<dyn Host>) -> Result<i64, SchedulerError> {
        let task = self.task(name)?.clone();
        self.start_run(&task, "manual", host).await
    }

    /// Starts a run of `task` now; answers once the execution is recorded.
    /// [`SchedulerError::AlreadyRunning`] if the task is running.
    async fn start_run(
        &self,
        task: &TaskDef,
        trigger: &'static str,
        host: Arc<dyn Host>,
    ) -> Result<i64, SchedulerError> {
        let shared = &self.shared;
        if !lock(&shared.running).insert(task.id.clone()) {
            return Err(SchedulerError::AlreadyRunning(task.name.clone()));
        }
        let now = self.deps().clock.now_ms();
        let (tid, tname) = (task.id.clone(), task.name.clone());
        let id = match self
            .deps()
            .db
            .call(move |c| executions::start(c, &tid, &tname, now))
            .await
        {
            Ok(id) => id,
            Err(e) => {
                lock(&shared.running).remove(&task.id);
                return Err(e.into());
            }
        };
        lock(&shared.last_run).insert(task.id.clone(), now);
        let mut exec = Execution {
            id,
            task_id: task.id.clone(),
            task_name: task.name.clone(),
            started_at: now,
            completed_at: None,
            success: None,
            error: None,
        };
        self.remember(&exec);
        self.broadcast("task_started", &exec);
        tracing::info!(task = %task.name, execution = id, trigger, "task started");
        let (this, task) = (self.clone(), task.clone());
        self.deps().tracker.spawn(async move {
            let deps = this.deps();
            let permit = this.shared.permits.clone().acquire_owned().await;
            let out = tokio::select! {
                r = run::run(&this, host.as_ref(), &task, id, now, trigger) => r,
                _ = deps.shutdown.cancelled() => Err("interrupted: the server stopped during the run".into()),
            };
            drop(permit);
            let end = deps.clock.now_ms();
            let err = out.as_ref().err().cloned();
            let e2 = err.clone();
            if let Err(e) = deps.db.call(move |c| executions::finish(c, id, end, e2.is_none(), e2.as_deref())).await {
                tracing::error!(error = %e, "cannot record a task's end");
            }
            exec.completed_at = Some(end);
            exec.success = Some(err.is_none());
            exec.error = err.clone();
            this.remember(&exec);
            lock(&this.shared.running).remove(&task.id);
            this.broadcast("task_finished", &exec);
            match err {
                None => tracing::info!(task = %task.name, execution = id, ms = end - now, "task succeeded"),
                Some(e) => tracing::warn!(task = %task.name, execution = id, error = %e, "task failed"),
            }
        });
        Ok(id)
    }

    /// The runner: starts due enabled tasks every
    /// `scheduler.check_interval_secs` while `scheduler.enabled`;
    /// `[scheduler]` changes apply at once. A task with `catch_up = true`
    /// whose slot passed while the server was down runs once at start;
    /// slots missed otherwise (down, disabled) are skipped. Returns at
    /// shutdown.
    pub async fn run(self, host: Arc<dyn Host>) {
        let deps = self.deps();
        let tasks = &self.shared.tasks;
        let start = deps.clock.now_ms();
        // Up to when each task's slots have been dealt with.
        let mut cursor: HashMap<String, i64> = HashMap::new();
        for t in tasks {
            let id = t.id.clone();
            let seen = deps
                .db
                .call(move |c| executions::state(c, &id))
                .await
                .ok()
                .and_then(|(_, slot)| slot);
            let config = self.config();
            if t.catch_up
                && self.is_enabled(t)
                && config.scheduler.enabled
                && let Some(seen) = seen
                && next_after(&t.cron, &tz(&config), utc(seen))
                    .is_some_and(|n| n.timestamp_millis() <= start)
            {
                tracing::info!(task = %t.name, "a slot passed while the server was down: catching up");
                let _ = self.start_run(t, "catch_up", host.clone()).await;
            }
            cursor.insert(t.id.clone(), start);
        }
        let mut config_rx = deps.config.clone();
        config_rx.mark_unchanged();
        loop {
            let config = self.config();
            let wait = Duration::from_secs(config.scheduler.check_interval_secs.max(1));
            tokio::select! {
                _ = deps.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                changed = config_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
            let config = self.config();
            let now = deps.clock.now_ms();
            if config.scheduler.enabled {
                let zone = tz(&config);
                for t in tasks {
                    let from = cursor.get(&t.id).copied().unwrap_or(now);
                    let due = next_after(&t.cron, &zone, utc(from))
                        .is_some_and(|n| n.timestamp_millis() <= now);
                    if due && self.is_enabled(t) {
                        match self.start_run(t, "schedule", host.clone()).await {
                            Ok(_) => {}
                            Err(SchedulerError::AlreadyRunning(_)) => {
                                tracing::info!(task = %t.name, "slot skipped: the previous run is still going")
                            }
                            Err(e) => {
                                tracing::error!(task = %t.name, error = %e, "cannot start a scheduled run")
                            }
                        }
                    }
                }
            }
            let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
            for id in &ids {
                cursor.insert(id.clone(), now);
            }
            if let Err(e) = deps
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ApiError, ErrorCode};
    use crate::secrets::release::{BoxFuture, Granted, NotGranted, PendingNotice, SecretAudit};
    use crate::storage::audit::Retention;
    use tokio::sync::oneshot;

    /// A host that refuses every release (no test task asks for one).
    struct Refuse;

    impl Host for Refuse {
        fn ask(
            &self,
            _action: &'static str,
            _params: Value,
            _summary: String,
            _gone: CancellationToken,
            _pending: Option<oneshot::Sender<PendingNotice>>,
        ) -> BoxFuture<'_, Result<Granted, NotGranted>> {
            Box::pin(async { Err(ApiError::new(ErrorCode::ApprovalDenied, "refused").into()) })
        }
        fn paired_devices(&self) -> BoxFuture<'_, Result<i64, ApiError>> {
            Box::pin(async { Ok(0) })
        }
        fn max_lease_secs(&self) -> u64 {
            0
        }
        fn audit(&self, _record: SecretAudit) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    /// A scheduler built from its own handles only (no server state), with
    /// the shutdown token, tracker and audit log the test drives.
    fn scheduler(
        dir: &std::path::Path,
        config: &str,
    ) -> (Scheduler, CancellationToken, TaskTracker, Arc<AuditLog>) {
        let config = Config::parse(config, &dir.join("config.toml")).unwrap();
        let db = Db::open(&dir.join("agent.db")).unwrap();
        let clock = Clock::new();
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let audit = Arc::new(AuditLog::start(
            dir.join("audit"),
            db.clone(),
            Retention::default(),
        ));
        let s = Scheduler::load(Deps {
            db: db.clone(),
            clock,
            config: watch::channel(Arc::new(config)).1,
            events: Arc::new(Sessions::default()),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            plugins: Arc::new(Plugins::load(dir, Toggles::load(&db, Kind::Plugin))),
            secrets: Secrets::new(db.clone(), clock, dir.to_path_buf()),
            audit: audit.clone(),
            root: dir.to_path_buf(),
        });
        (s, shutdown, tracker, audit)
    }

    #[tokio::test]
    async fn runs_report_scheduler_errors_and_keep_no_host() {
        let dir = tempfile::tempdir().unwrap();
        let (s, shutdown, tracker, audit) = scheduler(
            dir.path(),
            "[[tasks]]\nname = \"slow\"\ncron = \"0 0 1 1 *\"\nhandler = \"command\"\ncommand = [\"/bin/sleep\", \"30\"]\n",
        );
        assert_eq!(s.count(), 1);
        let host: Arc<dyn Host> = Arc::new(Refuse);
        assert!(matches!(
            s.trigger("ghost", host.clone()).await,
            Err(SchedulerError::UnknownTask(n)) if n == "ghost"
        ));
        let id = s.trigger("slow", host.clone()).await.unwrap();
        assert!(matches!(
            s.trigger("slow", host.clone()).await,
            Err(SchedulerError::AlreadyRunning(n)) if n == "slow"
        ));
        assert!(matches!(
            s.executions("slow", 0).await,
            Err(SchedulerError::BadLimit)
        ));
        // Shutdown ends the run as interrupted; then nothing holds the host.
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        let runs = s.executions("slow", 10).await.unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].id, id);
        assert_eq!(runs[0].success, Some(false));
        assert!(runs[0].error.as_deref().unwrap().starts_with("interrupted"));
        assert_eq!(Arc::strong_count(&host), 1, "the scheduler keeps no host");
        audit.close_async().await;
    }
}
