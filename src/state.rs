//! `AppState`: everything the server shares, behind one `Arc`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::approvals::Approvals;
use crate::auth::keys::ServerKey;
use crate::auth::ratelimit::HandshakeLimiter;
use crate::clock::Clock;
use crate::config::Config;
use crate::memory::Memory;
use crate::plugins::Plugins;
use crate::protocol::{ApiError, ErrorCode};
use crate::sessions::Sessions;
use crate::skills::Skills;
use crate::storage::Db;
use crate::storage::audit::{AuditEntry, AuditLog};

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
    pub sessions: Sessions,
    pub limiter: HandshakeLimiter,
    pub audit: AuditLog,
    pub approvals: Approvals,
    pub plugins: Plugins,
    pub memory: Memory,
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
    pub fn new(dir: DataDir, config: Config, db: Db, key: ServerKey) -> AppState {
        use crate::storage::toggles::{self, Kind};
        let plugin_toggles = db
            .blocking(|c| toggles::all(c, Kind::Plugin))
            .unwrap_or_default();
        let skill_toggles = db
            .blocking(|c| toggles::all(c, Kind::Skill))
            .unwrap_or_default();
        let plugins = Plugins::load(&dir.root, plugin_toggles);
        let clock = Clock::new();
        let scheduler = crate::scheduler::Scheduler::load(&config, &db, clock.now_ms());
        let memory = Memory::open(&db, dir.resolve(&config.memory.model_dir))
            .expect("memory index loads from agent.db");
        let skills = Skills::load(&dir.root, skill_toggles);
        let secrets = crate::secrets::Secrets::new(db.clone(), clock, dir.root.clone());
        let audit = AuditLog::start(dir.resolve(&config.audit.dir), db.clone());
        let limiter = HandshakeLimiter::new(
            config.server.auth_failures_per_minute,
            config.server.pair_failures_per_minute,
        );
        AppState {
            dir,
            config: watch::Sender::new(Arc::new(config)),
            db,
            key,
            clock,
            sessions: Sessions::default(),
            limiter,
            audit,
            approvals: Approvals::default(),
            plugins,
            memory,
            scheduler,
            secrets,
            config_write: tokio::sync::Mutex::new(()),
            skills,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            web_origin: String::new(),
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
            .map_err(|_| audit_unavailable())
    }

    /// Like [`AppState::audit`], but waits until the record is on disk:
    /// Err (`unavailable`) if it could not be written. Gated actions use it
    /// for the record that lets them run, so nothing runs unrecorded.
    pub async fn audit_durable(
        &self,
        device_id: Option<&str>,
        action: &str,
        params_digest: Option<String>,
        outcome: &str,
        approval_id: Option<&str>,
    ) -> Result<(), ApiError> {
        self.audit
            .record_durable(AuditEntry {
                ts_ms: self.clock.now_ms(),
                device_id: device_id.map(String::from),
                action: action.to_string(),
                params_digest,
                outcome: outcome.to_string(),
                approval_id: approval_id.map(String::from),
                ..Default::default()
            })
            .await
            .map_err(|_| audit_unavailable())
    }

    /// Appends an audit record stamped now.
    pub async fn audit(
        &self,
        device_id: Option<&str>,
        action: &str,
        params_digest: Option<String>,
        outcome: &str,
        approval_id: Option<&str>,
    ) {
        self.audit
            .record(AuditEntry {
                ts_ms: self.clock.now_ms(),
                device_id: device_id.map(String::from),
                action: action.to_string(),
                params_digest,
                outcome: outcome.to_string(),
                approval_id: approval_id.map(String::from),
                ..Default::default()
            })
            .await;
    }
}

/// The error of an action refused because the audit log cannot be written.
pub fn audit_unavailable() -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        "the audit log cannot be written, so this action was refused and nothing was changed; \
         make audit.dir a writable directory with free space (see the server log), then retry",
    )
}
