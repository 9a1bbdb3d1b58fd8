//! What can go wrong in the scheduler, in its own words. The wire form of
//! each variant is chosen in one place, `crate::errors`.

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// No task of that name was loaded from `[[tasks]]`.
    #[error("no scheduled task named {0:?}")]
    UnknownTask(String),
    /// A task never runs twice at once.
    #[error("task '{0}' is already running")]
    AlreadyRunning(String),
    /// `list_task_executions`' `limit` outside 1..=100.
    #[error("`limit` must be in 1..=100")]
    BadLimit,
    /// `agent.db` refused a read or write (the text may hold paths or SQL:
    /// it goes to the log, not to the peer).
    #[error(transparent)]
    Storage(#[from] StorageError),
}
