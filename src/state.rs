//! `AppState`: everything the server shares, behind one `Arc`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::approvals::Approvals;
use crate::auth::keys::ServerKey;
use crate::auth::ratelimit::HandshakeLimiter;
use crate::budget::{DeviceBudget, RATE_LIMITED_ACTION};
use crate::clock::Clock;
use crate::config::Config;
use crate::disk::DiskWatch;
use crate::memory::Memory;
use crate::plugins::Plugins;
use crate::protocol::ApiError;
use crate::sessions::Sessions;
use crate::skills::Skills;
use crate::storage::Db;
use crate::storage::audit::{AuditEntry, AuditLog, AuditSender, Auditor, Retention};

/// The files of a data directory (SPEC §3).
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("agent.db")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    pub fn plugins(&self) -> PathBuf {
        self.root.join("plugins")
    }
    pub fn skills(&self) -> PathBuf {
        self.root.join("skills")
    }
    /// A path from the config, relative to the data dir unless absolute.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        Config::resolve(&self.root, p)
    }
}

pub struct AppState {
    pub dir: DataDir,
    /// The live configuration; subscribers (scheduler, memory) see changes at once.
    config: watch::Sender<Arc<Config>>,
    pub db: Db,
    pub key: ServerKey,
    pub clock: Clock,
    pub sessions: Arc<Sessions>,
    pub limiter: HandshakeLimiter,
    /// Devices' `last_seen`, noted by the handshake and written in batches.
    pub last_seen: Arc<crate::auth::last_seen::LastSeen>,
    pub audit: Arc<AuditLog>,
    /// The audit log with the clock: `auditor.record(...)` appends a record
    /// stamped now.
    pub auditor: Auditor,
    /// The approval gate; it owns its own handles (see `approvals::Deps`).
    pub approvals: Approvals,
    pub plugins: Arc<Plugins>,
    pub memory: Arc<Memory>,
    /// The scheduler service; it owns its own handles (see `scheduler::Deps`).
    pub scheduler: crate::scheduler::Scheduler,
    /// The secrets vault (SPEC §10).
    pub secrets: crate::secrets::Secrets,
    /// Serialises writers of config.toml.
    pub config_write: tokio::sync::Mutex<()>,
    pub skills: Skills,
    /// Cancelled once when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Every task the server spawns; shutdown waits for them.
    pub tasks: TaskTracker,
    /// The request budget per device (SPEC §7 v1.1), fixed at start.
    pub budget: Arc<DeviceBudget>,
    /// Free space on the data and audit volumes, as last checked.
    pub disk: Arc<DiskWatch>,
    /// The web companion's origin (SPEC §11): `server.web_origin`, else
    /// `http(s)://localhost:PORT` on loopback, else empty (no page may open
    /// `/ws` but `server.allowed_origins`). Set at start, once bound.
    pub web_origin: String,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Builds the state; loads plugins and skills with their persisted toggles.
    /// `web_origin`: see [`AppState::web_origin`].
    pub fn new(
        dir: DataDir,
        config: Config,
        db: Db,
        key: ServerKey,
        web_origin: String,
    ) -> AppState {
        use crate::storage::toggles::{Kind, Toggles};
        let plugins = Arc::new(Plugins::load(&dir.root, Toggles::load(&db, Kind::Plugin)));
        let clock = Clock::new();
        let memory = Memory::open(&db, dir.resolve(&config.memory.model_dir))
            .expect("memory index loads from agent.db");
        let skills = Skills::load(&dir.root, Toggles::load(&db, Kind::Skill));
        let secrets = crate::secrets::Secrets::new(db.clone(), clock, dir.root.clone());
        let audit = Arc::new(AuditLog::start(
            dir.resolve(&config.audit.dir),
            db.clone(),
            Retention::from(&config.audit),
        ));
        let limiter = HandshakeLimiter::new(
            config.server.auth_failures_per_minute,
            config.server.pair_failures_per_minute,
        );
        let budget = Arc::new(DeviceBudget::new(
            config.server.device_requests_per_sec,
            config.server.device_request_burst,
        ));
        let disk = Arc::new(DiskWatch::default());
        let (data_path, audit_path) = crate::disk::paths(&dir.root, &config.audit);
        disk.check(&data_path, &audit_path, &config.audit);
        let config = watch::Sender::new(Arc::new(config));
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let sessions = Arc::new(Sessions::default());
        let scheduler = crate::scheduler::Scheduler::load(crate::scheduler::Deps {
            db: db.clone(),
            clock,
            config: config.subscribe(),
            events: sessions.clone(),
            shutdown: shutdown.clone(),
            tracker: tasks.clone(),
            plugins: plugins.clone(),
            secrets: secrets.clone(),
            audit: audit.clone(),
            root: dir.root.clone(),
        });
        let approvals = Approvals::new(crate::approvals::Deps {
            db: db.clone(),
            clock,
            config: config.subscribe(),
            events: sessions.clone(),
            audit: audit.clone(),
            shutdown: shutdown.clone(),
            tracker: tasks.clone(),
            web_origin: web_origin.clone(),
        });
        tasks.spawn(housekeeping(Housekeeping {
            root: dir.root.clone(),
            config: config.subscribe(),
            clock,
            disk: disk.clone(),
            budget: budget.clone(),
            audit: audit.sender(),
            shutdown: shutdown.clone(),
        }));
        AppState {
            dir,
            config,
            db,
            key,
            clock,
            sessions,
            limiter,
            last_seen: Arc::default(),
            auditor: Auditor::new(audit.clone(), clock),
            audit,
            approvals,
            plugins,
            memory: Arc::new(memory),
            scheduler,
            secrets,
            config_write: tokio::sync::Mutex::new(()),
            skills,
            shutdown,
            tasks,
            budget,
            disk,
            web_origin,
        }
    }

    /// The current configuration (cheap: an `Arc` clone).
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Replaces the live configuration and wakes every subscriber.
    pub fn set_config(&self, c: Config) {
        self.config.send_replace(Arc::new(c));
    }

    /// A receiver that sees every configuration change.
    pub fn subscribe_config(&self) -> watch::Receiver<Arc<Config>> {
        self.config.subscribe()
    }

    /// Ok if the audit log can be written now; else the `unavailable` error
    /// that a state-changing action answers instead of running (fail
    /// closed). See [`AuditLog::check_writable`].
    pub async fn require_audit(&self) -> Result<(), ApiError> {
        self.audit
            .check_writable(self.clock.now_ms())
            .await
            .map_err(|_| crate::errors::audit_unavailable())
    }
}

/// What the periodic housekeeping task owns.
struct Housekeeping {
    root: PathBuf,
    config: watch::Receiver<Arc<Config>>,
    clock: Clock,
    disk: Arc<DiskWatch>,
    budget: Arc<DeviceBudget>,
    audit: AuditSender,
    shutdown: CancellationToken,
}

/// Every [`crate::disk::CHECK_EVERY`]: checks free disk space, writes the
/// budget's refusals in aggregate (one record per device), forgets idle
/// budgets, and lets the audit writer prune by age even when idle. Writes
/// the last refusals at shutdown.
async fn housekeeping(h: Housekeeping) {
    let mut tick = tokio::time::interval(crate::disk::CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await; // the first check ran at start
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = h.shutdown.cancelled() => break,
        }
        let cfg = h.config.borrow().clone();
        let (data, audit_dir) = crate::disk::paths(&h.root, &cfg.audit);
        let disk = h.disk.clone();
        let _ =
            tokio::task::spawn_blocking(move || disk.check(&data, &audit_dir, &cfg.audit)).await;
        report_refusals(&h).await;
        h.budget.forget_idle();
        h.audit.maintain(h.clock.now_ms()).await;
    }
    report_refusals(&h).await;
}

async fn report_refusals(h: &Housekeeping) {
    for (device, n) in h.budget.take_refusals() {
        tracing::warn!(device = %device, refused = n, "a device went over its request budget");
        h.audit
            .record(AuditEntry {
                ts_ms: h.clock.now_ms(),
                device_id: Some(device.to_string()),
                action: RATE_LIMITED_ACTION.into(),
                params_digest: None,
                outcome: format!("refused:{n}"),
                approval_id: None,
                ..Default::default()
            })
            .await;
    }
}
