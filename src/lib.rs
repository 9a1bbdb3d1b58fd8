//! secrets-agent: the control plane of a personal AI agent. A paired phone
//! connects over a WebSocket, authenticates with Ed25519 and administers the
//! agent; destructive actions wait for a biometric approval.
//!
//! See ARCHITECTURE.md for the map. The entry point is [`server::start`].

// Crate-private modules keep their items `pub(crate)` (see below).
#![warn(unreachable_pub)]

// Crate-private: the server's inner parts, used by nothing outside it.
pub(crate) mod approvals;
pub(crate) mod connection;
pub(crate) mod disk;
pub(crate) mod errors;
pub(crate) mod plugins;
pub(crate) mod private_fs;
pub(crate) mod sessions;
pub(crate) mod skills;

// The public surface, kept for these users only (ARCHITECTURE.md):
// - the `secrets-agent` binary (`main.rs`, `secret_cli.rs`): `auth` (keys,
//   pairing offers), `clock`, `config`, `logging`, `memory::import`,
//   `server`, `state::DataDir`, `storage` (devices, `audit::verify`), `tls`,
//   `web`, `secrets`;
// - the integration tests and benches: constants and parsers they assert
//   on (`admission::PER_PEER`, `budget::RATE_LIMITED_ACTION`,
//   `scheduler::task`, `scheduler::run::ERROR_TAIL`, `config_file`'s
//   failure injection, `handlers::secrets`' param types, `memory::index`);
// - the fuzz targets: `protocol::inbound::decode`, `rpc::Registry`,
//   `handlers::registry`, `server::test_state`.
// Inside the crate-private modules every item is `pub(crate)` (the
// `unreachable_pub` lint at the top of this file keeps it so).
pub mod admission;
pub mod auth;
pub mod budget;
pub mod clock;
pub mod config;
pub mod config_file;
pub mod handlers;
pub mod ids;
pub mod logging;
pub mod memory;
pub mod protocol;
pub mod redact;
pub mod rpc;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod state;
pub mod storage;
pub mod tls;
pub mod web;

pub use server::{Options, ServerHandle, StartError, start};
