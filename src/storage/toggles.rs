//! Persisted on/off toggles of plugins, skills and tasks (SPEC §7). A toggle
//! overrides the file's default until toggled again.

use std::collections::HashMap;

use rusqlite::{Connection, params};

use super::StorageError;

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

pub fn set(c: &Connection, kind: Kind, name: &str, enabled: bool) -> Result<(), StorageError> {
    c.execute(
        "INSERT INTO toggles(kind, name, enabled) VALUES (?1, ?2, ?3)
         ON CONFLICT(kind, name) DO UPDATE SET enabled = excluded.enabled",
        params![kind.as_str(), name, enabled as i64],
    )?;
    Ok(())
}

/// Every toggle of `kind`: name → enabled.
pub fn all(c: &Connection, kind: Kind) -> Result<HashMap<String, bool>, StorageError> {
    let mut st = c.prepare_cached("SELECT name, enabled FROM toggles WHERE kind = ?1")?;
    let rows = st.query_map([kind.as_str()], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? != 0))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
