//! The wire format: error codes, close codes and the frames the server sends.
//!
//! Only this module (and `rpc`, which turns registry output into envelopes)
//! knows how frames are spelled. Names here are fixed by SPEC §4–§8.

pub mod codes;
pub mod frames;
pub mod handshake;
pub mod inbound;

pub use codes::{ApiError, AuthErrorCode, ErrorCode, close};
