//! Where a client connects, and what can go wrong: shared by the protocol
//! client (`client.rs`) and the raw frame tool (`raw.rs`).

use std::path::PathBuf;
use tokio_tungstenite::tungstenite;

/// Where to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    /// CA certificate (PEM) for `wss://`.
    pub ca: Option<PathBuf>,
    /// Local address to connect from (tests of per-address limits).
    pub from: Option<std::net::IpAddr>,
    /// Pinned TLS key: hex SHA-256 of the certificate's SubjectPublicKeyInfo
    /// (`tls_spki_sha256` from `secrets-agent pair --json`).
    pub tls_pin: Option<String>,
}

impl Endpoint {
    pub fn new(url: impl Into<String>) -> Endpoint {
        Endpoint {
            url: url.into(),
            ca: None,
            from: None,
            tls_pin: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("WebSocket: {0}")]
    Ws(#[from] tungstenite::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the server refused the handshake: {code}: {message}")]
    Refused {
        code: String,
        message: String,
        close: Option<(u16, String)>,
    },
    #[error("the server's signature does not verify against the pinned server key")]
    ServerSignature,
    #[error("the server key {got} is not the pinned one {pinned}")]
    ServerKeyMismatch { got: String, pinned: String },
    #[error("connection closed: {0:?}")]
    Closed(Option<(u16, String)>),
    #[error("timed out")]
    Timeout,
    #[error("the approval does not match the request this phone sent ({0}); refusing to approve")]
    Mismatch(String),
}
