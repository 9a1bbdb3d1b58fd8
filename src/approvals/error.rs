//! What can go wrong in the approval gate, in its own words. The wire form
//! of each variant (code, message, `retry_after_ms`) is chosen in one
//! place, `crate::errors`.

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    // What a gated action, a local approval or a release is answered.
    /// The originating device has [`super::MAX_PENDING_PER_DEVICE`] pending.
    #[error("this device already has the most approvals pending (16); decide or wait for one")]
    DeviceBusy {
        /// Until the earliest of its approvals expires.
        retry_after_ms: u64,
    },
    /// [`super::MAX_PENDING`] are pending in all.
    #[error("too many approvals are pending (128); decide or wait for one")]
    AllBusy { retry_after_ms: u64 },
    /// The local socket and tasks have [`super::local::MAX_PENDING_LOCAL`] pending.
    #[error(
        "the local socket and tasks already have the most approvals pending (16); decide or wait for one"
    )]
    LocalBusy { retry_after_ms: u64 },
    #[error("the approval was denied on the phone")]
    Denied,
    /// No decision in time (or the requester went away, or its device was
    /// revoked); the text says what was not done.
    #[error("no approval arrived in time; {0}")]
    Expired(&'static str),
    #[error("the server is shutting down; the approval was not decided and will be expired")]
    ShuttingDown,
    /// The approval's record could not be made durable: the action must not run.
    #[error("the audit log cannot be written")]
    AuditUnavailable,
    /// `agent.db` refused a read or write (the text may hold paths or SQL:
    /// it goes to the log, not to the peer).
    #[error(transparent)]
    Storage(#[from] StorageError),

    // What an `approval_response` that changed nothing is answered.
    #[error("signature is not base64url")]
    SignatureNotBase64,
    /// A passkey assertion object of the wrong shape (the text says which).
    #[error("{0}")]
    MalformedAssertion(&'static str),
    #[error("no pending approval with this id (unknown, expired or already decided)")]
    NotPending,
    #[error("this approval has expired")]
    TooLate,
    #[error("the signing device is unknown or revoked")]
    UnknownDevice,
    /// The target of a `revoke_device` answered it.
    #[error("the device this approval would revoke cannot decide it")]
    BarredDecider,
    /// Another session approved what only its requester may approve.
    #[error(
        "only the session that asked may approve this request (it returns a secret to that session); any device may deny it"
    )]
    OtherSession,
    #[error("this device's approval key is a passkey: signature is a WebAuthn assertion object")]
    AssertionExpected,
    #[error("this device's approval key is not a passkey: signature is base64url bytes")]
    BytesExpected,
    #[error("the approval signature does not verify")]
    BadSignature,
    #[error("this approval was already decided")]
    AlreadyDecided,
}
