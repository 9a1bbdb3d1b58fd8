//! The socket file's life (SPEC §10 Local interface): 0600 while the
//! server runs, removed on clean shutdown, a stale one replaced at start, a
//! live one (another server on the same dir) and a path too long for a
//! socket address refuse the start, saying so.

mod common;
mod secrets_support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use secrets_support::*;
use serde_json::json;

async fn start(
    dir: &std::path::Path,
) -> Result<secrets_agent::ServerHandle, secrets_agent::StartError> {
    secrets_agent::start(secrets_agent::Options {
        data_dir: dir.to_path_buf(),
        listen: Some("127.0.0.1:0".into()),
        print_pairing_code: false,
    })
    .await
}

#[tokio::test]
async fn stale_live_and_too_long_socket_paths() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    // A stale socket from a crash: bound, never closed by a server.
    std::fs::create_dir_all(dir.path()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let h = start(dir.path()).await.expect("a stale socket is replaced");
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let lines = sock_lines(dir.path()).await;
    assert_eq!(lines["type"], "ok", "the new server answers: {lines}");
    // A second server on the same dir is refused while the first runs, and
    // leaves the first one's recorded address alone.
    let url_before = h
        .state
        .db
        .get_meta(secrets_agent::auth::pairing::LISTEN_URL_KEY)
        .await
        .unwrap();
    let e = start(dir.path()).await.err().expect("refused");
    let url_after = h
        .state
        .db
        .get_meta(secrets_agent::auth::pairing::LISTEN_URL_KEY)
        .await
        .unwrap();
    assert_eq!(url_before, url_after);
    assert!(
        e.to_string().contains("another server is already serving"),
        "{e}"
    );
    assert!(sock.exists(), "the live socket is left alone");
    h.shutdown().await;
    assert!(!sock.exists(), "removed on clean shutdown");

    // Too long for sun_path: refused with the reason.
    let long = dir.path().join("d".repeat(120));
    let e = start(&long).await.err().expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("longer than a Unix socket address allows"),
        "{msg}"
    );
}

async fn sock_lines(dir: &std::path::Path) -> serde_json::Value {
    sock(dir, json!({"op": "list"})).await.pop().unwrap()
}
