//! A simulated phone for secrets-agent: keys, pairing, authentication with
//! mutual verification, multiplexed admin requests, events and biometric
//! approvals. Written from SPEC.md alone (it shares no code with the server),
//! so the integration tests that use it check the server against the
//! contract, not against itself.

pub mod bench;
pub mod client;
pub mod endpoint;
pub mod identity;
pub mod passkey;
pub mod proto;
pub mod raw;

pub use client::{Approval, Client, ClientError, Connected, Origin};
pub use identity::{ApprovalAlg, Identity, Pinned};
pub use raw::{Incoming, RawConn};
