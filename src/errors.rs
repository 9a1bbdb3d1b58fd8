//! The error boundary: every domain error becomes an `ApiError` here.
//!
//! Domains (the scheduler, …) report failures with their own `thiserror`
//! types and know nothing of the wire; handlers use `?` and the
//! conversions below choose the code and the message the peer sees. An
//! internal failure (storage, I/O) goes through [`ApiError::internal`]: its
//! detail is logged and the peer gets a generic message.

use crate::memory::MemoryError;
use crate::protocol::{ApiError, ErrorCode};
use crate::scheduler::SchedulerError;
use crate::storage::StorageError;

impl From<SchedulerError> for ApiError {
    fn from(e: SchedulerError) -> ApiError {
        match e {
            SchedulerError::UnknownTask(_) => ApiError::new(ErrorCode::NotFound, e.to_string()),
            SchedulerError::AlreadyRunning(_) => ApiError::new(ErrorCode::Conflict, e.to_string()),
            SchedulerError::BadLimit => ApiError::new(ErrorCode::InvalidRequest, e.to_string()),
            SchedulerError::Storage(inner) => ApiError::internal(inner.to_string()),
        }
    }
}

/// A database failure is the server's: logged in full, answered `internal`.
impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        ApiError::internal(e.to_string())
    }
}

impl From<MemoryError> for ApiError {
    fn from(e: MemoryError) -> ApiError {
        match e {
            MemoryError::Busy => ApiError::new(ErrorCode::Busy, e.to_string())
                .with_retry_after(crate::memory::BUSY_RETRY_MS),
            MemoryError::ModelUnavailable(m) => ApiError::new(ErrorCode::Unavailable, m),
            MemoryError::Storage(inner) => ApiError::internal(inner.to_string()),
            MemoryError::Internal(m) => ApiError::internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(e: SchedulerError) -> (&'static str, String) {
        let a = ApiError::from(e);
        (a.code.as_str(), a.message)
    }

    #[test]
    fn scheduler_errors_keep_their_wire_codes_and_messages() {
        assert_eq!(
            wire(SchedulerError::UnknownTask("ghost".into())),
            ("not_found", "no scheduled task named \"ghost\"".into())
        );
        assert_eq!(
            wire(SchedulerError::AlreadyRunning("slow".into())),
            ("conflict", "task 'slow' is already running".into())
        );
        assert_eq!(
            wire(SchedulerError::BadLimit),
            ("invalid_request", "`limit` must be in 1..=100".into())
        );
    }

    #[test]
    fn memory_errors_keep_their_wire_codes() {
        let busy = ApiError::from(MemoryError::Busy);
        assert_eq!(busy.code.as_str(), "busy");
        assert!(
            busy.message.starts_with("memory is busy"),
            "{}",
            busy.message
        );
        assert_eq!(busy.retry_after_ms, Some(crate::memory::BUSY_RETRY_MS));
        let down = ApiError::from(MemoryError::ModelUnavailable("run the fetch".into()));
        assert_eq!(
            (down.code.as_str(), down.message.as_str()),
            ("unavailable", "run the fetch")
        );
        let inner = ApiError::from(MemoryError::Internal("index update failed: x".into()));
        assert_eq!(inner.code.as_str(), "internal");
        assert!(!inner.message.contains("index update"));
    }

    #[test]
    fn a_storage_failure_is_internal_and_shows_no_detail() {
        let detail = "no such table: task_executions (/secret/path/agent.db)";
        let (code, message) = wire(SchedulerError::Storage(StorageError::Join(detail.into())));
        assert_eq!(code, "internal");
        assert!(!message.contains("task_executions") && !message.contains("/secret"));
        assert_eq!(message, "internal error: the server log has the details");
    }
}
