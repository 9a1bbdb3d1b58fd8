//! Persisted on/off toggles of plugins, skills and tasks (SPEC §7). A toggle
//! overrides the file's default until toggled again, across restarts.
//!
//! [`Toggles`] is the one in-memory copy per kind: loaded from `agent.db`
//! at start, read without touching the database, and changed only through
//! [`Toggles::set`], which writes the database first and memory second.

use std::collections::HashMap;
use std::sync::RwLock;

use rusqlite::{Connection, params};

use super::{Db, StorageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plugin,
    Skill,
    Task,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Plugin => "plugin",
            Kind::Skill => "skill",
            Kind::Task => "task",
        }
    }
}

fn set(c: &Connection, kind: Kind, name: &str, enabled: bool) -> Result<(), StorageError> {
    c.execute(
        "INSERT INTO toggles(kind, name, enabled) VALUES (?1, ?2, ?3)
         ON CONFLICT(kind, name) DO UPDATE SET enabled = excluded.enabled",
        params![kind.as_str(), name, enabled as i64],
    )?;
    Ok(())
}

/// Every toggle of `kind`: name → enabled.
fn all(c: &Connection, kind: Kind) -> Result<HashMap<String, bool>, StorageError> {
    let mut st = c.prepare_cached("SELECT name, enabled FROM toggles WHERE kind = ?1")?;
    let rows = st.query_map([kind.as_str()], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? != 0))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The toggles of one kind: the persisted overrides of the files' defaults.
#[derive(Debug)]
pub struct Toggles {
    kind: Kind,
    db: Db,
    map: RwLock<HashMap<String, bool>>,
    /// Serialises `set`, so memory ends as the database does.
    write: tokio::sync::Mutex<()>,
}

impl Toggles {
    /// Loads the toggles of `kind` (blocking). A database that cannot be
    /// read is logged and leaves every name at its file's default.
    pub fn load(db: &Db, kind: Kind) -> Toggles {
        let map = db.blocking(|c| all(c, kind)).unwrap_or_else(|e| {
            tracing::error!(error = %e, kind = kind.as_str(), "cannot load toggles");
            HashMap::new()
        });
        Toggles {
            kind,
            db: db.clone(),
            map: RwLock::new(map),
            write: tokio::sync::Mutex::new(()),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The toggle of `name` if it was ever set, else `file_default`.
    pub fn is_enabled(&self, name: &str, file_default: bool) -> bool {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
            .unwrap_or(file_default)
    }

    /// Persists the toggle, then applies it in memory. On Err nothing
    /// changed (in memory; the database refused the write).
    pub async fn set(&self, name: &str, enabled: bool) -> Result<(), StorageError> {
        let _serial = self.write.lock().await;
        let (kind, n) = (self.kind, name.to_string());
        self.db.call(move |c| set(c, kind, &n, enabled)).await?;
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), enabled);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::temp_db as db;

    #[tokio::test]
    async fn unset_names_follow_the_file_default() {
        let (_d, db) = db();
        let t = Toggles::load(&db, Kind::Task);
        assert!(t.is_enabled("nightly", true));
        assert!(!t.is_enabled("nightly", false));
    }

    #[tokio::test]
    async fn a_toggle_overrides_the_default_and_survives_a_reload() {
        let (_d, db) = db();
        let t = Toggles::load(&db, Kind::Plugin);
        t.set("hello", false).await.unwrap();
        t.set("off-in-file", true).await.unwrap();
        assert!(!t.is_enabled("hello", true), "memory is updated");
        assert!(t.is_enabled("off-in-file", false));
        // A restart: a fresh load from the same database.
        let again = Toggles::load(&db, Kind::Plugin);
        assert!(!again.is_enabled("hello", true));
        assert!(again.is_enabled("off-in-file", false));
        // Toggled back: the last write wins, in memory and on disk.
        again.set("hello", true).await.unwrap();
        assert!(again.is_enabled("hello", false));
        assert!(Toggles::load(&db, Kind::Plugin).is_enabled("hello", false));
    }

    #[tokio::test]
    async fn kinds_do_not_share_names() {
        let (_d, db) = db();
        let skills = Toggles::load(&db, Kind::Skill);
        skills.set("x", false).await.unwrap();
        assert_eq!(skills.kind(), Kind::Skill);
        for kind in [Kind::Plugin, Kind::Task] {
            let other = Toggles::load(&db, kind);
            assert!(other.is_enabled("x", true), "{kind:?} sees no skill toggle");
        }
        assert!(!Toggles::load(&db, Kind::Skill).is_enabled("x", true));
    }

    #[tokio::test]
    async fn a_failed_write_changes_nothing_in_memory() {
        let (_d, db) = db();
        let t = Toggles::load(&db, Kind::Task);
        db.blocking(|c| {
            c.execute_batch("DROP TABLE toggles")?;
            Ok(())
        })
        .unwrap();
        assert!(t.set("nightly", false).await.is_err());
        assert!(t.is_enabled("nightly", true));
    }
}
