//! The local socket serves only the server's own user (SPEC §10): a client
//! of another uid is refused (SO_PEERCRED) and audited. CI runs as root,
//! so the client runs as `nobody` through `setpriv`.

mod common;
mod secrets_support;

use std::os::unix::fs::PermissionsExt;

use common::{TestServer, audit_now};
use serde_json::json;

const NOBODY: &str = "65534";

fn as_nobody(dir: &std::path::Path) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(common::bin())
        .args(["secret", "get", "TOK", "--reason", "steal", "--data-dir"])
        .arg(dir)
        .env("SECRETS_AGENT_LOG", "off")
        .output()
        .expect("setpriv (util-linux) runs")
}

#[tokio::test]
async fn a_peer_of_another_uid_is_refused_and_audited() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root to switch uid (as CI runs)"
    );
    let s = TestServer::start().await;
    let (phone, _pid) = s.phone("owner").await;
    s.set_secret("TOK", "tok-value").await;
    let sock = s.path().join("agent.sock");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // As shipped, the private dir and the 0600 socket keep it out.
    let out = tokio::task::spawn_blocking({
        let d = s.path().to_path_buf();
        move || as_nobody(&d)
    })
    .await
    .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());

    // Even with the file modes loosened, the server checks the peer's uid.
    std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = tokio::task::spawn_blocking({
        let d = s.path().to_path_buf();
        move || as_nobody(&d)
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("only the user the server runs as"), "{err}");
    assert!(out.stdout.is_empty());
    let pending = phone.request("list_approvals", json!({})).await.unwrap();
    assert_eq!(pending["approvals"], json!([]), "nothing was asked");
    let log = audit_now(&s).await;
    assert!(
        log.iter().any(|r| r["action"] == "secret.peer_refused"
            && r["outcome"] == format!("forbidden:uid={NOBODY}")),
        "audited"
    );
}
