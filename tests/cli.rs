//! The `secrets-agent` binary: serve, pair, devices, signals (SPEC §2).

mod common;

use std::process::{Child, Command, Stdio};

use common::{bin, serve};
use mobile_client_sim::client::{self, Endpoint};
use mobile_client_sim::{ApprovalAlg, Identity};
use serde_json::{Value, json};

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn serve_pair_sigterm_with_requests_in_flight_then_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, code) = serve(dir.path());
    let code = code.expect("a pairing code is printed when no device is paired");
    let key = std::fs::read(dir.path().join("server.key")).unwrap();
    assert_eq!(key.len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(
        std::fs::read_to_string(dir.path().join("config.toml"))
            .unwrap()
            .contains("# secrets-agent configuration")
    );

    let mut id = Identity::generate("cli phone", ApprovalAlg::Ed25519);
    let ep = Endpoint::new(url);
    let (c, _) = client::pair(&ep, &mut id, &code, None).await.unwrap();
    let c = std::sync::Arc::new(c);
    // A gated request that will be pending at shutdown, and many quick ones.
    let gated = {
        let (c, dev) = (c.clone(), id.device_id());
        tokio::spawn(async move { c.request("revoke_device", json!({"device_id": dev})).await })
    };
    let _ = c
        .wait_event(std::time::Duration::from_secs(5), |f| {
            f["type"] == "approval_request"
        })
        .await
        .unwrap();
    let quick: Vec<_> = (0..50)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.request("get_dashboard", json!({})).await })
        })
        .collect();
    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    for q in quick {
        // Each quick request was answered, or the connection closed cleanly before it was read.
        match q.await.unwrap() {
            Ok(p) => assert!(
                p["result"] == "dashboard" || p["code"] == "unavailable",
                "{p}"
            ),
            Err(e) => assert!(
                matches!(e, mobile_client_sim::ClientError::Closed(_)),
                "{e}"
            ),
        }
    }
    match gated.await.unwrap() {
        Ok(p) => assert_eq!(p["code"], "unavailable", "{p}"),
        Err(e) => assert!(
            matches!(e, mobile_client_sim::ClientError::Closed(_)),
            "{e}"
        ),
    }

    // Nothing corrupted: the audit chain verifies and the next start works.
    common::assert_audit_verifies(dir.path());
    let (mut child, url, code) = serve(dir.path());
    assert!(code.is_none(), "a device is paired: no code printed");
    let (c, _) = client::auth(&Endpoint::new(url), &id).await.unwrap();
    let devs = c.request("list_devices", json!({})).await.unwrap();
    assert_eq!(
        devs["devices"][0]["revoked"], false,
        "the pending revocation never ran"
    );
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    common::assert_audit_verifies(dir.path());
    let log = std::fs::read_to_string(dir.path().join("audit/audit.jsonl")).unwrap();
    assert!(
        log.contains("expired_on_restart"),
        "the stale approval is recorded as expired"
    );
}

#[test]
fn pair_json_devices_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["pair", "--json", "--ttl-secs", "60", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line.lines().count(), 1);
    let v: Value = serde_json::from_str(line.trim()).unwrap();
    let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    // v1.1 adds `web_url` (and `tls_spki_sha256` with TLS, not here).
    assert_eq!(
        keys,
        ["code", "expires_at", "server_key", "url", "web_url"],
        "{v}"
    );
    assert_eq!(
        v["url"], "ws://127.0.0.1:7420/ws",
        "no server started yet: server.listen"
    );
    assert!(chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).is_ok());
    assert_eq!(
        mobile_client_sim::proto::unb64(v["server_key"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );
    let out = Command::new(bin())
        .args(["devices", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("No devices"));
    let out = Command::new(bin())
        .args(["devices", "revoke", "nope", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no paired device"));
    let out = Command::new(bin())
        .args(["pair", "--ttl-secs", "0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a zero TTL is refused");
}

#[test]
fn a_closed_stdout_does_not_stop_the_server() {
    // A service manager or a pipe reader that went away: the first-start
    // pairing code cannot be printed, and the server keeps serving.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    // Started and printed (or failed to) by the time the audit dir's
    // database exists and a second has passed.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server died on a closed stdout"
    );
    sigterm(&child);
    assert!(child.wait().unwrap().success());
}
