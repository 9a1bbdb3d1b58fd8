//! Task executions and per-task run state in `agent.db`.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};

use crate::clock::rfc3339_ms;
use crate::storage::StorageError;

/// Executions kept per task by the `prune-executions` builtin.
pub const KEEP_PER_TASK: i64 = 1000;

#[derive(Debug, Clone)]
pub struct Execution {
    pub id: i64,
    pub task_id: String,
    pub task_name: String,
    pub started_at: i64,
    pub completed_at: Option<i64>,
    pub success: Option<bool>,
    pub error: Option<String>,
}

impl Execution {
    /// The SPEC §6 object: `{task_id, started_at, completed_at, success, error}`.
    pub fn to_json(&self) -> Value {
        json!({
            "task_id": self.task_id, "started_at": rfc3339_ms(self.started_at),
            "completed_at": self.completed_at.map(rfc3339_ms), "success": self.success, "error": self.error,
        })
    }
    /// With `task_name` added (dashboard).
    pub fn to_json_named(&self) -> Value {
        let mut v = self.to_json();
        v["task_name"] = json!(self.task_name);
        v
    }
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Execution> {
        Ok(Execution {
            id: r.get(0)?,
            task_id: r.get(1)?,
            task_name: r.get(2)?,
            started_at: r.get(3)?,
            completed_at: r.get(4)?,
            success: r.get::<_, Option<i64>>(5)?.map(|s| s != 0),
            error: r.get(6)?,
        })
    }
}

const COLS: &str = "id, task_id, task_name, started_at, completed_at, success, error";

pub fn start(
    c: &Connection,
    task_id: &str,
    task_name: &str,
    now: i64,
) -> Result<i64, StorageError> {
    c.execute(
        "INSERT INTO task_executions(task_id, task_name, started_at) VALUES (?1, ?2, ?3)",
        params![task_id, task_name, now],
    )?;
    let id = c.last_insert_rowid();
    c.execute(
        "INSERT INTO task_state(task_id, last_run) VALUES (?1, ?2) ON CONFLICT(task_id) DO UPDATE SET last_run = excluded.last_run",
        params![task_id, now],
    )?;
    Ok(id)
}

pub fn finish(
    c: &Connection,
    id: i64,
    now: i64,
    success: bool,
    error: Option<&str>,
) -> Result<(), StorageError> {
    c.execute(
        "UPDATE task_executions SET completed_at = ?2, success = ?3, error = ?4 WHERE id = ?1",
        params![id, now, success as i64, error],
    )?;
    Ok(())
}

pub fn get(c: &Connection, id: i64) -> Result<Option<Execution>, StorageError> {
    Ok(c.query_row(
        &format!("SELECT {COLS} FROM task_executions WHERE id = ?1"),
        [id],
        Execution::from_row,
    )
    .optional()?)
}

/// Newest first.
pub fn list(c: &Connection, task_name: &str, limit: i64) -> Result<Vec<Execution>, StorageError> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLS} FROM task_executions WHERE task_name = ?1 ORDER BY id DESC LIMIT ?2"
    ))?;
    let rows = st.query_map(params![task_name, limit], Execution::from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn recent(c: &Connection, limit: i64) -> Result<Vec<Execution>, StorageError> {
    let mut st = c.prepare(&format!(
        "SELECT {COLS} FROM task_executions ORDER BY id DESC LIMIT ?1"
    ))?;
    let rows = st.query_map([limit], Execution::from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// (last_run, last_slot) of a task.
pub fn state(c: &Connection, task_id: &str) -> Result<(Option<i64>, Option<i64>), StorageError> {
    Ok(c.query_row(
        "SELECT last_run, last_slot FROM task_state WHERE task_id = ?1",
        [task_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?
    .unwrap_or((None, None)))
}

pub fn set_last_slot(c: &Connection, task_id: &str, slot: i64) -> Result<(), StorageError> {
    c.execute(
        "INSERT INTO task_state(task_id, last_slot) VALUES (?1, ?2) ON CONFLICT(task_id) DO UPDATE SET last_slot = excluded.last_slot",
        params![task_id, slot],
    )?;
    Ok(())
}

/// Runs left unfinished by a crash or shutdown are marked failed.
pub fn close_interrupted(c: &Connection, now: i64) -> Result<usize, StorageError> {
    Ok(c.execute(
        "UPDATE task_executions SET completed_at = ?1, success = 0, error = 'interrupted: the server stopped during the run' WHERE completed_at IS NULL",
        [now],
    )?)
}

/// Keeps the newest `KEEP_PER_TASK` executions of each task; returns how many were deleted.
pub fn prune(c: &Connection) -> Result<usize, StorageError> {
    Ok(c.execute(
        "DELETE FROM task_executions WHERE id IN (
           SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY task_name ORDER BY id DESC) AS n FROM task_executions) WHERE n > ?1)",
        [KEEP_PER_TASK],
    )?)
}
