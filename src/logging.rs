//! The log filter. Whatever level the owner asks for, the WebSocket and
//! JSON-RPC libraries stay at `warn`: at `trace` they would print whole
//! frames — keys, signatures, nonces, pairing codes, config secrets — and
//! the HTTP client stays there too (it would print webhook URLs).

use tracing_subscriber::EnvFilter;

/// Targets that log raw frames or request bodies below `warn`.
const FRAME_LOGGERS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "jsonrpsee_core",
    "jsonrpsee_types",
    "rustls",
    "tokio_rustls",
    // HTTP clients log request URLs, and a webhook or notify URL is a bearer secret.
    "ureq",
    "ureq_proto",
];

/// `user` is an `EnvFilter` directive string such as `info` or `secrets_agent=debug`.
pub fn filter(user: &str) -> EnvFilter {
    let mut spec = if user.trim().is_empty() {
        "info".to_string()
    } else {
        user.to_string()
    };
    for t in FRAME_LOGGERS {
        spec.push_str(&format!(",{t}=warn"));
    }
    EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"))
}
