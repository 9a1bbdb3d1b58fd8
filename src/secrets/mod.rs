//! The secrets vault (SPEC §10): encrypted values in `agent.db`, leases,
//! and the release flow shared by the local socket and tasks.
//!
//! [`Secrets`] owns what it uses — the database handle, the clock and the
//! vault key — and never reaches the whole server state: what it needs from
//! the server (the approval gate, the audit log, the paired devices) comes
//! through the [`Host`] trait, implemented by the approval gate
//! (`approvals::Approvals`, in `approvals/local.rs`).

pub mod release;
pub mod socket;
pub mod vault;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;

use crate::clock::{Clock, rfc3339_ms};
use crate::protocol::{ApiError, ErrorCode};
use crate::storage::{Db, StorageError};

pub use release::{Host, ReleaseRequest, Requester};
pub use vault::{SecretValue, VaultKey};

/// Largest value, in bytes (64 KiB).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Largest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("invalid secret name {0:?}: names match ^[A-Za-z_][A-Za-z0-9_.-]{{0,63}}$")]
    InvalidName(String),
    #[error("invalid secret value: {0}")]
    InvalidValue(&'static str),
    #[error("invalid description: at most 500 characters, no control characters")]
    InvalidDescription,
    #[error("no secret named {0:?}")]
    NotFound(String),
    #[error(
        "vault.key is missing from {0} while secrets exist: restore it from your backup (mode 0600); nothing was overwritten"
    )]
    KeyMissing(String),
    #[error(
        "vault.key in {0} is not the key these secrets were encrypted with: restore the right file from your backup; nothing was changed"
    )]
    WrongKey(String),
    #[error("{0}")]
    BadKeyFile(String),
    #[error(
        "the stored secret {0:?} does not decrypt under its name: its row was altered or moved; it was not released"
    )]
    Tampered(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<rusqlite::Error> for SecretError {
    fn from(e: rusqlite::Error) -> Self {
        SecretError::Storage(e.into())
    }
}

impl From<SecretError> for ApiError {
    fn from(e: SecretError) -> ApiError {
        let code = match &e {
            SecretError::InvalidName(_)
            | SecretError::InvalidValue(_)
            | SecretError::InvalidDescription => ErrorCode::InvalidRequest,
            SecretError::NotFound(_) => ErrorCode::NotFound,
            SecretError::KeyMissing(_) | SecretError::WrongKey(_) | SecretError::BadKeyFile(_) => {
                ErrorCode::Unavailable
            }
            SecretError::Tampered(_) | SecretError::Storage(_) => ErrorCode::Internal,
        };
        ApiError::new(code, e.to_string())
    }
}

/// Whether `name` is a valid secret name (the whole string).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

pub fn check_name(name: &str) -> Result<(), SecretError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(SecretError::InvalidName(name.chars().take(80).collect()))
    }
}

pub fn check_value(value: &str) -> Result<(), SecretError> {
    if value.is_empty() {
        Err(SecretError::InvalidValue("it must hold at least 1 byte"))
    } else if value.len() > MAX_VALUE_BYTES {
        Err(SecretError::InvalidValue("it may hold at most 64 KiB"))
    } else {
        Ok(())
    }
}

pub fn check_description(d: &str) -> Result<(), SecretError> {
    if d.chars().count() > MAX_DESCRIPTION_CHARS || d.chars().any(char::is_control) {
        Err(SecretError::InvalidDescription)
    } else {
        Ok(())
    }
}

/// A secret's metadata (`list_secrets`, `secret list`): never its value.
#[derive(Debug, Clone, Serialize)]
pub struct SecretMeta {
    pub name: String,
    pub description: String,
    pub created_at: String,
    pub updated_at: String,
    pub last_released_at: Option<String>,
    pub release_count: i64,
}

/// A live lease (`list_secret_leases`).
#[derive(Debug, Clone, Serialize)]
pub struct Lease {
    pub lease_id: String,
    pub names: Vec<String>,
    pub requester: Value,
    pub reason: String,
    pub granted_at: String,
    pub expires_at: String,
}

/// What creating or replacing a secret did.
#[derive(Debug)]
pub struct SetOutcome {
    pub replaced: bool,
    pub ended_leases: Vec<String>,
}

/// The vault service: cheap to clone.
#[derive(Clone)]
pub struct Secrets {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    clock: Clock,
    dir: PathBuf,
    key: Mutex<Option<Arc<VaultKey>>>,
    /// Secrets stored (for the dashboard, which does no I/O).
    stored: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets")
    }
}

const KEY_CHECK_META: &str = "vault_key_check";

impl Secrets {
    /// The vault of the data dir `dir` (whose `vault.key` is read when a
    /// value is first needed).
    pub fn new(db: Db, clock: Clock, dir: PathBuf) -> Secrets {
        let stored = db
            .blocking(|c| Ok(c.query_row("SELECT count(*) FROM secrets", [], |r| r.get(0))?))
            .unwrap_or(0);
        Secrets {
            inner: Arc::new(Inner {
                db,
                clock,
                dir,
                key: Mutex::new(None),
                stored: stored.into(),
            }),
        }
    }

    /// Secrets stored, as this process counted them (no I/O).
    pub fn stored(&self) -> i64 {
        self.inner.stored.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn adjust_stored(&self, by: i64) {
        self.inner
            .stored
            .fetch_add(by, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    fn key_path(&self) -> PathBuf {
        self.inner.dir.join("vault.key")
    }

    /// The vault key: loaded once; made only while no secret exists.
    fn key(&self, c: &Connection) -> Result<Arc<VaultKey>, SecretError> {
        let mut g = self.inner.key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = &*g {
            return Ok(k.clone());
        }
        let path = self.key_path();
        let dir = self.inner.dir.display().to_string();
        let check: Option<Vec<u8>> =
            crate::storage::get_meta(c, KEY_CHECK_META)?.and_then(|h| hex::decode(h).ok());
        let count: i64 = c.query_row("SELECT count(*) FROM secrets", [], |r| r.get(0))?;
        let key = match VaultKey::load(&path)? {
            Some(k) => {
                if let Some(check) = &check
                    && !k.verifies_check(check)
                {
                    return Err(SecretError::WrongKey(dir));
                }
                k
            }
            None if count > 0 || check.is_some() => return Err(SecretError::KeyMissing(dir)),
            None => VaultKey::create(&path)?,
        };
        if check.is_none() {
            c.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![KEY_CHECK_META, hex::encode(key.make_check())],
            )?;
        }
        let key = Arc::new(key);
        *g = Some(key.clone());
        Ok(key)
    }

    /// Ok if values can be opened now (vault.key present and right): what a
    /// release checks before anyone is asked.
    pub async fn check_key(&self) -> Result<(), SecretError> {
        let this = self.clone();
        self.inner
            .db
            .call(move |c| Ok(this.key(c).map(|_| ())))
            .await?
    }

    /// How many secrets are stored.
    pub async fn count(&self) -> Result<i64, SecretError> {
        Ok(self
            .inner
            .db
            .call(|c| Ok(c.query_row("SELECT count(*) FROM secrets", [], |r| r.get(0))?))
            .await?)
    }

    pub async fn list(&self) -> Result<Vec<SecretMeta>, SecretError> {
        Ok(self
            .inner
            .db
            .call(|c| {
                let mut st = c.prepare(
                    "SELECT name, description, created_at, updated_at, last_released_at, release_count FROM secrets ORDER BY name",
                )?;
                let rows = st
                    .query_map([], |r| {
                        Ok(SecretMeta {
                            name: r.get(0)?,
                            description: r.get(1)?,
                            created_at: rfc3339_ms(r.get(2)?),
                            updated_at: rfc3339_ms(r.get(3)?),
                            last_released_at: r.get::<_, Option<i64>>(4)?.map(rfc3339_ms),
                            release_count: r.get(5)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// The first of `names` that is not stored, if any.
    pub async fn first_missing(&self, names: &[String]) -> Result<Option<String>, SecretError> {
        let names = names.to_vec();
        Ok(self
            .inner
            .db
            .call(move |c| {
                for n in names {
                    let found: Option<i64> = c
                        .query_row("SELECT 1 FROM secrets WHERE name = ?1", [&n], |r| r.get(0))
                        .optional()?;
                    if found.is_none() {
                        return Ok(Some(n));
                    }
                }
                Ok(None)
            })
            .await?)
    }

    pub async fn exists(&self, name: &str) -> Result<bool, SecretError> {
        Ok(self.first_missing(&[name.to_string()]).await?.is_none())
    }

    /// Creates or replaces `name`; a replacement ends the leases covering it.
    pub async fn set(
        &self,
        name: &str,
        value: SecretValue,
        description: Option<String>,
    ) -> Result<SetOutcome, SecretError> {
        check_name(name)?;
        check_value(value.expose())?;
        if let Some(d) = &description {
            check_description(d)?;
        }
        let (this, name, now) = (self.clone(), name.to_string(), self.now_ms());
        self.inner
            .db
            .call(move |c| Ok(this.set_blocking(c, &name, &value, description.as_deref(), now)))
            .await?
            .inspect(|o| {
                if !o.replaced {
                    self.adjust_stored(1);
                }
            })
    }

    fn set_blocking(
        &self,
        c: &mut Connection,
        name: &str,
        value: &SecretValue,
        description: Option<&str>,
        now: i64,
    ) -> Result<SetOutcome, SecretError> {
        let key = self.key(c)?;
        let sealed = key.seal(name, value.expose().as_bytes());
        let tx = c.transaction()?;
        let replaced: bool = tx
            .query_row("SELECT 1 FROM secrets WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some();
        if replaced {
            tx.execute(
                "UPDATE secrets SET ciphertext = ?2, updated_at = ?3, description = coalesce(?4, description) WHERE name = ?1",
                params![name, sealed, now, description],
            )?;
        } else {
            tx.execute(
                "INSERT INTO secrets(name, description, ciphertext, created_at, updated_at, release_count) VALUES (?1, ?2, ?3, ?4, ?4, 0)",
                params![name, description.unwrap_or(""), sealed, now],
            )?;
        }
        let ended = end_leases_covering(&tx, name, now, "secret replaced")?;
        tx.commit()?;
        Ok(SetOutcome {
            replaced,
            ended_leases: ended,
        })
    }

    /// Deletes `name` and ends its leases; the ended lease ids.
    pub async fn delete(&self, name: &str) -> Result<Vec<String>, SecretError> {
        let (name, now) = (name.to_string(), self.now_ms());
        let missing = SecretError::NotFound(name.clone());
        let r = self
            .inner
            .db
            .call(move |c| {
                let tx = c.transaction()?;
                let n = tx.execute("DELETE FROM secrets WHERE name = ?1", [&name])?;
                if n == 0 {
                    return Ok(None);
                }
                let ended = end_leases_covering(&tx, &name, now, "secret deleted")?;
                tx.commit()?;
                Ok(Some(ended))
            })
            .await?;
        self.adjust_stored(-i64::from(r.is_some()));
        r.ok_or(missing)
    }

    /// Decrypts `names` (all of them or an error), counting a release when
    /// `count_release`.
    pub async fn open_values(
        &self,
        names: &[String],
        count_release: bool,
    ) -> Result<Vec<(String, SecretValue)>, SecretError> {
        let (this, names, now) = (self.clone(), names.to_vec(), self.now_ms());
        self.inner
            .db
            .call(move |c| Ok(this.open_blocking(c, &names, count_release, now)))
            .await?
    }

    fn open_blocking(
        &self,
        c: &mut Connection,
        names: &[String],
        count_release: bool,
        now: i64,
    ) -> Result<Vec<(String, SecretValue)>, SecretError> {
        let key = self.key(c)?;
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            let sealed: Option<Vec<u8>> = c
                .query_row("SELECT ciphertext FROM secrets WHERE name = ?1", [n], |r| {
                    r.get(0)
                })
                .optional()?;
            let sealed = sealed.ok_or_else(|| SecretError::NotFound(n.clone()))?;
            let Some(plain) = key.open(n, &sealed) else {
                tracing::error!(secret = %n, "a stored secret does not decrypt under its name: altered or moved row");
                return Err(SecretError::Tampered(n.clone()));
            };
            let text = String::from_utf8(plain.to_vec()).map_err(|e| {
                let mut b = e.into_bytes();
                zeroize::Zeroize::zeroize(&mut b);
                SecretError::Tampered(n.clone())
            })?;
            out.push((n.clone(), SecretValue::new(text)));
        }
        if count_release {
            for n in names {
                c.execute(
                    "UPDATE secrets SET release_count = release_count + 1, last_released_at = ?2 WHERE name = ?1",
                    params![n, now],
                )?;
            }
        }
        Ok(out)
    }

    /// A live lease of `requester` (kind + key) covering all of `names`.
    /// Leases approved by a device since revoked are ended here.
    pub async fn find_lease(
        &self,
        kind: &str,
        key: &str,
        names: &[String],
    ) -> Result<Option<String>, SecretError> {
        let (kind, key, names, now) = (
            kind.to_string(),
            key.to_string(),
            names.to_vec(),
            self.now_ms(),
        );
        Ok(self
            .inner
            .db
            .call(move |c| {
                end_leases_of_revoked_devices(c, now)?;
                let mut st = c.prepare(
                    "SELECT lease_id, names FROM secret_leases WHERE ended_at IS NULL AND expires_at > ?1 AND requester_kind = ?2 AND requester_key = ?3 ORDER BY expires_at DESC",
                )?;
                let rows: Vec<(String, String)> = st
                    .query_map(params![now, kind, key], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                for (id, json) in rows {
                    let covered: Vec<String> = serde_json::from_str(&json).unwrap_or_default();
                    if names.iter().all(|n| covered.contains(n)) {
                        return Ok(Some(id));
                    }
                }
                Ok(None)
            })
            .await?)
    }

    /// Opens a lease after an approved release.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_lease(
        &self,
        names: &[String],
        requester: &Requester,
        reason: &str,
        lease_secs: u64,
        approval_id: &str,
        device_id: Option<&str>,
    ) -> Result<String, SecretError> {
        let lease_id = crate::ids::lease_id();
        let now = self.now_ms();
        let expires = now + (lease_secs as i64) * 1000;
        let (id, names, req, reason, approval, device, kind, key) = (
            lease_id.clone(),
            serde_json::to_string(names).unwrap_or_default(),
            serde_json::to_string(&requester.to_json()).unwrap_or_default(),
            reason.to_string(),
            approval_id.to_string(),
            device_id.map(String::from),
            requester.kind.clone(),
            requester.key.clone(),
        );
        self.inner
            .db
            .call(move |c| {
                c.execute(
                    "INSERT INTO secret_leases(lease_id, names, requester_kind, requester_key, requester_json, reason, approval_id, device_id, granted_at, expires_at) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
                    params![id, names, kind, key, req, reason, approval, device, now, expires],
                )?;
                Ok(())
            })
            .await?;
        Ok(lease_id)
    }

    /// Live leases, soonest ending first.
    pub async fn leases(&self) -> Result<Vec<Lease>, SecretError> {
        let now = self.now_ms();
        Ok(self
            .inner
            .db
            .call(move |c| {
                end_leases_of_revoked_devices(c, now)?;
                let mut st = c.prepare(
                    "SELECT lease_id, names, requester_json, reason, granted_at, expires_at FROM secret_leases WHERE ended_at IS NULL AND expires_at > ?1 ORDER BY expires_at, lease_id",
                )?;
                let rows = st
                    .query_map([now], |r| {
                        Ok(Lease {
                            lease_id: r.get(0)?,
                            names: serde_json::from_str(&r.get::<_, String>(1)?)
                                .unwrap_or_default(),
                            requester: serde_json::from_str(&r.get::<_, String>(2)?)
                                .unwrap_or_default(),
                            reason: r.get(3)?,
                            granted_at: rfc3339_ms(r.get(4)?),
                            expires_at: rfc3339_ms(r.get(5)?),
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// Ends a live lease; Ok(Some(names)) if it was live.
    pub async fn revoke_lease(&self, lease_id: &str) -> Result<Option<Vec<String>>, SecretError> {
        let (id, now) = (lease_id.to_string(), self.now_ms());
        Ok(self
            .inner
            .db
            .call(move |c| {
                let names: Option<String> = c
                    .query_row(
                        "SELECT names FROM secret_leases WHERE lease_id = ?1 AND ended_at IS NULL AND expires_at > ?2",
                        params![id, now],
                        |r| r.get(0),
                    )
                    .optional()?;
                let Some(names) = names else { return Ok(None) };
                c.execute(
                    "UPDATE secret_leases SET ended_at = ?2, end_reason = 'revoked' WHERE lease_id = ?1",
                    params![id, now],
                )?;
                Ok(Some(serde_json::from_str(&names).unwrap_or_default()))
            })
            .await?)
    }
}

fn end_leases_covering(
    c: &Connection,
    name: &str,
    now: i64,
    why: &str,
) -> Result<Vec<String>, StorageError> {
    let mut st = c.prepare(
        "SELECT lease_id FROM secret_leases, json_each(secret_leases.names) WHERE ended_at IS NULL AND expires_at > ?1 AND json_each.value = ?2",
    )?;
    let ids: Vec<String> = st
        .query_map(params![now, name], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &ids {
        c.execute(
            "UPDATE secret_leases SET ended_at = ?2, end_reason = ?3 WHERE lease_id = ?1",
            params![id, now, why],
        )?;
    }
    Ok(ids)
}

fn end_leases_of_revoked_devices(c: &Connection, now: i64) -> Result<(), StorageError> {
    c.execute(
        "UPDATE secret_leases SET ended_at = ?1, end_reason = 'device revoked' WHERE ended_at IS NULL AND device_id IS NOT NULL AND device_id IN (SELECT device_id FROM devices WHERE revoked != 0)",
        [now],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_whole_pattern() {
        for ok in ["A", "_x", "GITHUB_TOKEN", "a.b-c_9", &"a".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "9a", "-a", "a b", "a\n", "é", &"a".repeat(65), "a/b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
