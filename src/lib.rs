//! secrets-agent: the control plane of a personal AI agent. A paired phone
//! connects over a WebSocket, authenticates with Ed25519 and administers the
//! agent; destructive actions wait for a biometric approval.
//!
//! See ARCHITECTURE.md for the map. The entry point is [`server::start`].

pub mod admission;
pub mod approvals;
pub mod auth;
pub mod budget;
pub mod clock;
pub mod config;
pub mod config_file;
pub mod connection;
pub mod disk;
pub mod errors;
pub mod handlers;
pub mod ids;
pub mod logging;
pub mod memory;
pub mod plugins;
pub mod private_fs;
pub mod protocol;
pub mod rpc;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod sessions;
pub mod skills;
pub mod state;
pub mod storage;
pub mod tls;
pub mod web;

pub use server::{Options, ServerHandle, StartError, start};
