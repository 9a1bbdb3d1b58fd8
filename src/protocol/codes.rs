//! Error codes (SPEC §5), handshake error codes (SPEC §4) and close codes.

use jsonrpsee_types::ErrorObjectOwned;
use serde_json::json;

/// WebSocket close codes used by the server.
pub mod close {
    /// A handshake failed (`auth_error` was sent first).
    pub const AUTH_FAILED: u16 = 4401;
    /// The device's sessions are closed because it was revoked.
    pub const REVOKED: u16 = 4403;
    /// No handshake answer within `server.auth_timeout_secs`.
    pub const AUTH_TIMEOUT: u16 = 4408;
    /// A frame over `server.max_frame_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer did not read its frames fast enough (bounded outbox full).
    pub const SLOW_CONSUMER: u16 = 1013;
    /// A protocol violation by the peer (e.g. silent for 60 s).
    pub const POLICY: u16 = 1008;
}

/// Admin error codes (SPEC §5). The string form is the wire form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidRequest,
    UnknownAction,
    NotFound,
    Conflict,
    Busy,
    DuplicateRequestId,
    RateLimited,
    Unauthenticated,
    Forbidden,
    ApprovalDenied,
    ApprovalExpired,
    Unavailable,
    Internal,
    /// Only for answers to `approval_response` frames (SPEC §8).
    BadSignature,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownAction => "unknown_action",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Busy => "busy",
            ErrorCode::DuplicateRequestId => "duplicate_request_id",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ApprovalDenied => "approval_denied",
            ErrorCode::ApprovalExpired => "approval_expired",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::BadSignature => "bad_signature",
        }
    }

    /// The JSON-RPC 2.0 error code for this admin code (SPEC §5).
    pub fn jsonrpc_code(self) -> i32 {
        match self {
            ErrorCode::UnknownAction => -32601,
            ErrorCode::InvalidRequest => -32602,
            _ => -32000,
        }
    }

    pub fn from_wire(s: &str) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match s {
            "invalid_json" => InvalidJson,
            "invalid_request" => InvalidRequest,
            "unknown_action" => UnknownAction,
            "not_found" => NotFound,
            "conflict" => Conflict,
            "busy" => Busy,
            "duplicate_request_id" => DuplicateRequestId,
            "rate_limited" => RateLimited,
            "unauthenticated" => Unauthenticated,
            "forbidden" => Forbidden,
            "approval_denied" => ApprovalDenied,
            "approval_expired" => ApprovalExpired,
            "unavailable" => Unavailable,
            "internal" => Internal,
            "bad_signature" => BadSignature,
            _ => return None,
        })
    }
}

/// An error an action answers with: `{"result":"error","code":..,"message":..}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    /// An internal failure: `detail` (which may hold database text or a
    /// path) goes to the log; the peer gets a generic message. This is the
    /// one place internal errors cross to the wire.
    pub fn internal(detail: impl Into<String>) -> Self {
        let detail = detail.into();
        tracing::error!(%detail, "internal error");
        Self::new(
            ErrorCode::Internal,
            "internal error: the server log has the details",
        )
    }
    pub fn with_retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    /// The admin error payload object.
    pub fn to_payload(&self) -> serde_json::Value {
        let mut v = json!({"result": "error", "code": self.code.as_str(), "message": self.message});
        if let Some(ms) = self.retry_after_ms {
            v["retry_after_ms"] = json!(ms);
        }
        v
    }

    /// Reads back an error object produced by `From<ApiError> for ErrorObjectOwned`.
    pub fn from_error_object(e: &ErrorObjectOwned) -> ApiError {
        let data: Option<serde_json::Value> =
            e.data().and_then(|d| serde_json::from_str(d.get()).ok());
        let code = data
            .as_ref()
            .and_then(|d| d.get("code"))
            .and_then(|c| c.as_str())
            .and_then(ErrorCode::from_wire)
            .unwrap_or(match e.code() {
                -32601 => ErrorCode::UnknownAction,
                -32602 => ErrorCode::InvalidRequest,
                _ => ErrorCode::Internal,
            });
        let retry_after_ms = data
            .as_ref()
            .and_then(|d| d.get("retry_after_ms"))
            .and_then(|v| v.as_u64());
        ApiError {
            code,
            message: e.message().to_string(),
            retry_after_ms,
        }
    }
}

impl From<ApiError> for ErrorObjectOwned {
    fn from(e: ApiError) -> Self {
        let mut data = json!({"code": e.code.as_str()});
        if let Some(ms) = e.retry_after_ms {
            data["retry_after_ms"] = json!(ms);
        }
        ErrorObjectOwned::owned(e.code.jsonrpc_code(), e.message, Some(data))
    }
}

/// Handshake failure codes (SPEC §4), sent in `auth_error` before close 4401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthErrorCode {
    Unauthenticated,
    UnknownDevice,
    Revoked,
    BadSignature,
    BadNonce,
    InvalidCode,
    UnsupportedProtocol,
    InvalidRequest,
    RateLimited,
}

impl AuthErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthErrorCode::Unauthenticated => "unauthenticated",
            AuthErrorCode::UnknownDevice => "unknown_device",
            AuthErrorCode::Revoked => "revoked",
            AuthErrorCode::BadSignature => "bad_signature",
            AuthErrorCode::BadNonce => "bad_nonce",
            AuthErrorCode::InvalidCode => "invalid_code",
            AuthErrorCode::UnsupportedProtocol => "unsupported_protocol",
            AuthErrorCode::InvalidRequest => "invalid_request",
            AuthErrorCode::RateLimited => "rate_limited",
        }
    }
}
