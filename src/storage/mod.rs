//! `agent.db`: the SQLite handle, its migrations, and typed queries per domain.
//!
//! rusqlite never runs on the async runtime's threads: `Db::call` moves the
//! work to the blocking pool, and no lock is held across an `.await`.

pub mod approvals;
pub mod audit;
pub mod devices;
pub mod toggles;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "{path} was written by a newer secrets-agent (schema {found}, this build knows {known}); upgrade secrets-agent"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("the database task failed: {0}")]
    Join(String),
}

/// Schema upgrades, in order; `PRAGMA user_version` counts the applied ones.
/// Each runs in its own transaction.
const MIGRATIONS: &[&str] = &[
    // 1: devices, pairing codes, audit chain heads, settings.
    r#"
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        device_name TEXT NOT NULL,
        public_key BLOB NOT NULL UNIQUE,
        approval_public_key BLOB NOT NULL,
        approval_key_alg TEXT NOT NULL,
        paired_at INTEGER NOT NULL,
        last_seen INTEGER,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE pairing_codes (
        code_hash TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'live'  -- live | used | burnt
    );
    CREATE TABLE audit_heads (
        dir TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
    // 2: pending and decided approvals.
    r#"
    CREATE TABLE approvals (
        approval_id TEXT PRIMARY KEY,
        request_json TEXT NOT NULL,
        status TEXT NOT NULL,        -- pending | approved | denied | expired
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        decided_at INTEGER,
        decided_by TEXT
    );
    CREATE INDEX approvals_pending ON approvals(status) WHERE status = 'pending';
    "#,
    // 3: memories with their embeddings (a memory never exists without one).
    r#"
    CREATE TABLE memories (
        -- AUTOINCREMENT: rowids are never reused, so "rows after the highest
        -- rowid seen" (how the server picks up CLI imports) misses none.
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        content TEXT NOT NULL,
        category TEXT NOT NULL,
        tags TEXT NOT NULL,            -- JSON array of strings
        confidence TEXT NOT NULL,      -- low | medium | high
        created_at INTEGER NOT NULL,   -- Unix ms
        updated_at INTEGER NOT NULL,
        embedding BLOB NOT NULL,       -- little-endian f32 x dim
        model_id TEXT NOT NULL
    );
    CREATE INDEX memories_newest ON memories(created_at DESC, id DESC);
    "#,
    // 4: scheduler: executions and per-task run state.
    r#"
    CREATE TABLE task_executions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL,
        task_name TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        completed_at INTEGER,
        success INTEGER,
        error TEXT
    );
    CREATE INDEX task_executions_task ON task_executions(task_name, id DESC);
    CREATE TABLE task_state (
        task_id TEXT PRIMARY KEY,
        last_run INTEGER,              -- Unix ms of the last start
        last_slot INTEGER              -- Unix ms of the last scheduled slot run
    );
    "#,
    // 5: toggles of plugins, skills and tasks, overriding the files' defaults.
    r#"
    CREATE TABLE toggles (
        kind TEXT NOT NULL,            -- plugin | skill | task
        name TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        PRIMARY KEY (kind, name)
    );
    "#,
    // 6: pairing codes are stored as a keyed hash (HMAC, key derived from
    // server.key); codes hashed the old way (plain SHA-256) are dropped.
    r#"
    DELETE FROM pairing_codes;
    "#,
    // 7 (v1.1, web companion): a WebAuthn passkey's credential id and the
    // last signCount it reported (SPEC §11).
    r#"
    ALTER TABLE devices ADD COLUMN webauthn_credential_id BLOB;
    ALTER TABLE devices ADD COLUMN sign_count INTEGER NOT NULL DEFAULT 0;
    "#,
    // 8: the audit chain's retention anchor (SPEC §8a v1.1): the first
    // retained record's seq and prev_hash once oldest segments were pruned,
    // and how much was pruned in all.
    r#"
    CREATE TABLE audit_anchors (
        dir TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,             -- first retained seq
        prev_hash TEXT NOT NULL,          -- its prev_hash
        pruned_segments INTEGER NOT NULL, -- segments deleted, in all
        pruned_bytes INTEGER NOT NULL,    -- bytes deleted, in all
        pruned_at INTEGER NOT NULL        -- Unix ms of the last pruning
    );
    "#,
    // 9: the secrets vault (SPEC §10): values sealed with vault.key (never
    // stored here), and release leases.
    r#"
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        ciphertext BLOB NOT NULL,      -- 24-byte nonce || XChaCha20-Poly1305(value), AD = name
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_released_at INTEGER,
        release_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE secret_leases (
        lease_id TEXT PRIMARY KEY,
        names TEXT NOT NULL,           -- JSON array, sorted
        requester_kind TEXT NOT NULL,
        requester_key TEXT NOT NULL,
        requester_json TEXT NOT NULL,
        reason TEXT NOT NULL,
        approval_id TEXT NOT NULL,
        device_id TEXT,                -- the approving device
        granted_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        ended_at INTEGER,
        end_reason TEXT
    );
    CREATE INDEX secret_leases_live ON secret_leases(requester_kind, requester_key) WHERE ended_at IS NULL;
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// A cheap, cloneable handle to `agent.db`.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Db")
    }
}

impl Db {
    /// Opens (creating) the database and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Db, StorageError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn, path)?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the blocking pool with the connection.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StorageError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StorageError> + Send + 'static,
    {
        let conn = self.conn.clone();
        // The caller's span (its request) follows the work onto the pool.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let started = std::time::Instant::now();
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            let out = f(&mut guard);
            tracing::trace!(
                us = started.elapsed().as_micros() as u64,
                ok = out.is_ok(),
                "sqlite"
            );
            out
        })
        .await
        .map_err(|e| StorageError::Join(e.to_string()))?
    }

    /// Runs `f` on the current thread (CLI commands and blocking contexts).
    pub fn blocking<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StorageError>,
    ) -> Result<R, StorageError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub async fn get_meta(&self, key: &'static str) -> Result<Option<String>, StorageError> {
        self.call(move |c| get_meta(c, key)).await
    }

    pub async fn set_meta(&self, key: &'static str, value: String) -> Result<(), StorageError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )?;
            Ok(())
        })
        .await
    }
}

pub fn get_meta(c: &Connection, key: &str) -> Result<Option<String>, StorageError> {
    use rusqlite::OptionalExtension;
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?,
    )
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StorageError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StorageError::TooNew {
            path: path.display().to_string(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database schema upgraded");
    }
    Ok(())
}

/// A fresh database in a temp dir, for unit tests (keep the dir alive).
#[cfg(test)]
pub(crate) fn temp_db() -> (tempfile::TempDir, Db) {
    let d = tempfile::tempdir().unwrap();
    let db = Db::open(&d.path().join("agent.db")).unwrap();
    (d, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_in_order_and_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.db");
        let db = Db::open(&p).unwrap();
        let v: i64 = db
            .blocking(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        drop(db);
        Db::open(&p).unwrap();
    }

    #[test]
    fn each_upgrade_from_every_older_version() {
        for start in 0..SCHEMA_VERSION {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("agent.db");
            {
                let mut c = Connection::open(&p).unwrap();
                for sql in &MIGRATIONS[..start as usize] {
                    c.execute_batch(sql).unwrap();
                }
                c.pragma_update(None, "user_version", start).unwrap();
                let _ = &mut c;
            }
            let db = Db::open(&p).unwrap();
            let v: i64 = db
                .blocking(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
                .unwrap();
            assert_eq!(v, SCHEMA_VERSION, "upgrade from {start}");
        }
    }

    #[test]
    fn refuses_a_newer_database() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.db");
        Connection::open(&p)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = Db::open(&p).unwrap_err();
        assert!(matches!(err, StorageError::TooNew { .. }), "{err}");
    }
}
