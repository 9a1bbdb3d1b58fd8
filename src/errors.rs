//! The error boundary: every domain error becomes an `ApiError` here.
//!
//! Domains (the scheduler, the approval gate, …) report failures with
//! their own `thiserror` types and know nothing of the wire; handlers use
//! `?` and the conversions below choose the code and the message the peer
//! sees. An
//! internal failure (storage, I/O) goes through [`ApiError::internal`]: its
//! detail is logged and the peer gets a generic message.

use crate::approvals::ApprovalError;
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

impl From<ApprovalError> for ApiError {
    fn from(e: ApprovalError) -> ApiError {
        use ApprovalError as A;
        let code = match &e {
            A::DeviceBusy { retry_after_ms }
            | A::AllBusy { retry_after_ms }
            | A::LocalBusy { retry_after_ms } => {
                let wait = *retry_after_ms;
                return ApiError::new(ErrorCode::Busy, e.to_string()).with_retry_after(wait);
            }
            A::Denied => ErrorCode::ApprovalDenied,
            A::Expired(_) => ErrorCode::ApprovalExpired,
            A::ShuttingDown => ErrorCode::Unavailable,
            A::AuditUnavailable => return audit_unavailable(),
            A::Storage(inner) => return ApiError::internal(inner.to_string()),
            A::SignatureNotBase64
            | A::MalformedAssertion(_)
            | A::AssertionExpected
            | A::BytesExpected => ErrorCode::InvalidRequest,
            A::NotPending | A::TooLate | A::AlreadyDecided => ErrorCode::NotFound,
            A::UnknownDevice | A::BarredDecider | A::OtherSession => ErrorCode::Forbidden,
            A::BadSignature => ErrorCode::BadSignature,
        };
        ApiError::new(code, e.to_string())
    }
}

/// The error of an action refused because the audit log cannot be written.
pub(crate) fn audit_unavailable() -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        "the audit log cannot be written, so this action was refused and nothing was changed; \
         make audit.dir a writable directory with free space (see the server log), then retry",
    )
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

    fn approval_wire(e: ApprovalError) -> (&'static str, String, Option<u64>) {
        let a = ApiError::from(e);
        (a.code.as_str(), a.message, a.retry_after_ms)
    }

    #[test]
    fn approval_errors_keep_their_wire_codes_and_messages() {
        use ApprovalError as A;
        let cases: Vec<(ApprovalError, &str, &str, Option<u64>)> = vec![
            (
                A::DeviceBusy { retry_after_ms: 7 },
                "busy",
                "this device already has the most approvals pending (16); decide or wait for one",
                Some(7),
            ),
            (
                A::AllBusy { retry_after_ms: 1 },
                "busy",
                "too many approvals are pending (128); decide or wait for one",
                Some(1),
            ),
            (
                A::LocalBusy {
                    retry_after_ms: 1000,
                },
                "busy",
                "the local socket and tasks already have the most approvals pending (16); decide or wait for one",
                Some(1000),
            ),
            (
                A::Denied,
                "approval_denied",
                "the approval was denied on the phone",
                None,
            ),
            (
                A::Expired("nothing was released"),
                "approval_expired",
                "no approval arrived in time; nothing was released",
                None,
            ),
            (
                A::ShuttingDown,
                "unavailable",
                "the server is shutting down; the approval was not decided and will be expired",
                None,
            ),
            (
                A::SignatureNotBase64,
                "invalid_request",
                "signature is not base64url",
                None,
            ),
            (
                A::MalformedAssertion("clientDataJSON is not base64url"),
                "invalid_request",
                "clientDataJSON is not base64url",
                None,
            ),
            (
                A::NotPending,
                "not_found",
                "no pending approval with this id (unknown, expired or already decided)",
                None,
            ),
            (A::TooLate, "not_found", "this approval has expired", None),
            (
                A::UnknownDevice,
                "forbidden",
                "the signing device is unknown or revoked",
                None,
            ),
            (
                A::BarredDecider,
                "forbidden",
                "the device this approval would revoke cannot decide it",
                None,
            ),
            (
                A::OtherSession,
                "forbidden",
                "only the session that asked may approve this request (it returns a secret to that session); any device may deny it",
                None,
            ),
            (
                A::AssertionExpected,
                "invalid_request",
                "this device's approval key is a passkey: signature is a WebAuthn assertion object",
                None,
            ),
            (
                A::BytesExpected,
                "invalid_request",
                "this device's approval key is not a passkey: signature is base64url bytes",
                None,
            ),
            (
                A::BadSignature,
                "bad_signature",
                "the approval signature does not verify",
                None,
            ),
            (
                A::AlreadyDecided,
                "not_found",
                "this approval was already decided",
                None,
            ),
        ];
        for (e, code, message, retry) in cases {
            assert_eq!(approval_wire(e), (code, message.to_string(), retry));
        }
        let (code, message, _) = approval_wire(A::AuditUnavailable);
        assert_eq!(
            (code, message),
            ("unavailable", audit_unavailable().message)
        );
        let (code, message, _) = approval_wire(A::Storage(StorageError::Join(
            "disk I/O error at /secret/agent.db".into(),
        )));
        assert_eq!(code, "internal");
        assert!(!message.contains("/secret"), "{message}");
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
