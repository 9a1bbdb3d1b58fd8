//! `secrets-agent secret` over the real socket with a real server and a
//! simulated phone that signs (SPEC §10): set/get with approval, deny,
//! expiry, refusals at once, exec, and the exit codes.

mod common;
mod secrets_support;

use std::time::Duration;

use common::{
    TestServer, answer_next, assert_no_approval_request, audit_now, next_approval_request,
};
use secrets_support::*;
use serde_json::json;

/// A 64 KiB value of non-ASCII text (3-byte characters and a 4-byte one).
fn big_value() -> String {
    let mut v = String::from("𝄞");
    while v.len() + 3 <= 64 * 1024 {
        v.push('€');
    }
    v
}

#[tokio::test]
async fn set_then_get_with_an_approving_phone_returns_the_value_exactly() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    let value = big_value();
    assert!(value.len() > 64 * 1024 - 4 && value.len() <= 64 * 1024);

    // `set` while a device is paired asks the phone (action set_secret),
    // with the value shown as a commitment; one trailing newline is dropped.
    let set = spawn_cli(
        s.path(),
        &["set", "BIG", "--description", "big one"],
        format!("{value}\n").as_bytes(),
    );
    let req = answer_next(&phone, &pid, "approve").await;
    assert_eq!(req["action"], "set_secret");
    assert!(
        req["origin_device_id"].is_null() && req["request_id"].is_null(),
        "{req}"
    );
    assert!(
        req["params"]["value"]
            .as_str()
            .unwrap()
            .starts_with("[redacted:")
    );
    let out = set.await.unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let get = spawn_cli(
        s.path(),
        &["get", "BIG", "--reason", "push release notes"],
        b"",
    );
    let req = answer_next(&phone, &pid, "approve").await;
    assert_eq!(req["action"], "release_secret");
    assert!(
        req["origin_device_id"].is_null() && req["request_id"].is_null(),
        "{req}"
    );
    let p = &req["params"];
    assert_eq!(p["names"], json!(["BIG"]));
    assert_eq!(p["reason"], "push release notes");
    assert_eq!(p["lease_secs"], 0);
    assert_eq!(p["requester"]["kind"], "cli");
    // The requester is the CLI's parent: this test binary.
    let me = std::env::current_exe().unwrap().display().to_string();
    assert_eq!(p["requester"]["exe"], me.as_str());
    assert_eq!(p["requester"]["key"], me.as_str());
    assert_eq!(p["requester"]["pid"], std::process::id());
    let keys: Vec<_> = p.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["lease_secs", "names", "reason", "requester"]);
    assert!(
        req["summary"]
            .as_str()
            .unwrap()
            .starts_with("Release BIG to cli "),
        "{req}"
    );
    let out = get.await.unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout.clone()).unwrap(),
        value,
        "exactly the value, nothing else"
    );
    assert!(stderr(&out).contains("waiting for approval on your phone: Release BIG"));

    // `list` shows metadata and the release, never the value.
    let out = cli(s.path(), &["list"], b"").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BIG") && text.contains("released 1 time(s)") && text.contains("big one"),
        "{text}"
    );
    assert!(!text.contains('€'));

    let log = audit_now(&s).await;
    let released = log
        .iter()
        .find(|r| r["action"] == "secret.released")
        .unwrap();
    assert_eq!(released["names"], json!(["BIG"]));
    assert_eq!(released["requester"]["kind"], "cli");
    assert!(
        released["approval_id"]
            .as_str()
            .unwrap()
            .starts_with("apr_")
    );
    assert!(
        log.iter()
            .any(|r| r["action"] == "secret.set" && r["names"] == json!(["BIG"]))
    );
    common::assert_audit_verifies(s.path());
}

#[tokio::test]
async fn a_denied_release_exits_3_with_nothing_on_stdout() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    s.set_secret("TOK", "tok-value").await;
    let get = spawn_cli(s.path(), &["get", "TOK", "--reason", "r"], b"");
    let denied = answer_next(&phone, &pid, "deny").await;
    let out = get.await.unwrap();
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("approval_denied"));
    // exec: the command is not run.
    let marker = s.path().join("ran");
    let exec = spawn_cli(
        s.path(),
        &[
            "exec",
            "--reason",
            "r",
            "--env",
            "A=TOK",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ],
        b"",
    );
    answer_next(&phone, &pid, "deny").await;
    assert_eq!(code(&exec.await.unwrap()), 3);
    assert!(!marker.exists(), "nothing released, nothing run");
    let log = audit_now(&s).await;
    // SPEC §10: release records carry the approval they were decided by.
    assert!(
        log.iter().any(|r| r["action"] == "secret.release_refused"
            && r["outcome"] == "approval_denied"
            && r["approval_id"] == denied["approval_id"]),
        "{log:?}"
    );
}

#[tokio::test]
async fn an_unanswered_release_expires_with_exit_4() {
    let s = TestServer::start_with_config("[approvals]\ntimeout_secs = 30\n").await;
    let (phone, _pid) = s.phone("owner").await;
    s.set_secret("TOK", "tok-value").await;
    // Paused from here (the handshake above ran on a live clock).
    tokio::time::pause();
    let started = s.handle().state.clock.now_ms();
    // Paused clock: while the CLI waits and nothing else is to do, tokio's
    // clock moves to the approval's expiry (30 s) at once.
    let out = cli(s.path(), &["get", "TOK", "--reason", "r"], b"").await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("waiting for approval on your phone"));
    assert!(
        s.handle().state.clock.now_ms() - started >= 29_000,
        "it waited the full timeout: {} ms",
        s.handle().state.clock.now_ms() - started
    );
    let req = next_approval_request(&phone).await;
    assert_eq!(req["action"], "release_secret");
    let result = phone
        .wait_event(T, |f| f["type"] == "approval_result")
        .await
        .unwrap();
    assert_eq!(result["approval_id"], req["approval_id"]);
    assert_eq!(result["status"], "expired");
}

#[tokio::test]
async fn no_device_or_an_unknown_name_is_refused_at_once() {
    let s = TestServer::start().await;
    // No device: set works without approval (the owner's own user), get is refused (3).
    let out = cli(s.path(), &["set", "TOK"], b"v\r\n").await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = cli(s.path(), &["get", "TOK", "--reason", "r"], b"").await;
    assert_eq!(code(&out), 3);
    assert!(stderr(&out).contains("no device is paired"));
    // A device, and an unknown name: 5, with nothing asked.
    let (phone, _pid) = s.phone("owner").await;
    let out = cli(s.path(), &["get", "NOPE", "--reason", "r"], b"").await;
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let pending = phone.request("list_approvals", json!({})).await.unwrap();
    assert_eq!(pending["approvals"], json!([]));
    // Usage: a bad name, a lease above the cap, a task: requester, an empty value: 2, nothing asked.
    for args in [
        &["get", "9bad", "--reason", "r"][..],
        &["get", "TOK", "--reason", "r", "--lease-secs", "3601"][..],
        &["get", "TOK", "--reason", "r", "--requester", "task:nightly"][..],
        &["get", "TOK"][..],
    ] {
        let out = cli(s.path(), args, b"").await;
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
    }
    assert_eq!(code(&cli(s.path(), &["set", "EMPTY"], b"\n").await), 2);
    assert_eq!(code(&cli(s.path(), &["set", "BIN"], b"\xff\xfe").await), 2);
    let big = vec![b'a'; 64 * 1024 + 1];
    assert_eq!(code(&cli(s.path(), &["set", "BIG"], &big).await), 2);
    let pending = phone.request("list_approvals", json!({})).await.unwrap();
    assert_eq!(pending["approvals"], json!([]), "nothing was asked");
    // rm of an unknown name: 5.
    assert_eq!(code(&cli(s.path(), &["rm", "NOPE"], b"").await), 5);
    // No server on a dir: 6.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(code(&cli(empty.path(), &["list"], b"").await), 6);
}

#[tokio::test]
async fn exec_gets_two_variables_after_one_approval_and_passes_the_status_through() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    for (n, v) in [("ALPHA", "first value"), ("BETA", "zweiter Wert ü")] {
        s.set_secret(n, v).await;
    }
    let exec = spawn_cli(
        s.path(),
        &[
            "exec",
            "--reason",
            "deploy",
            "--env",
            "A=ALPHA",
            "--env",
            "B=BETA",
            "--",
            "sh",
            "-c",
            "echo \"$A $B\"; exit 7",
        ],
        b"",
    );
    let req = answer_next(&phone, &pid, "approve").await;
    assert_eq!(
        req["params"]["names"],
        json!(["ALPHA", "BETA"]),
        "one approval for both"
    );
    let out = exec.await.unwrap();
    assert_eq!(code(&out), 7, "the command's status: {}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "first value zweiter Wert ü\n"
    );
    // No second request came.
    assert_no_approval_request(&phone).await;
}

#[tokio::test]
async fn rm_asks_the_phone_and_ends_the_secret() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    s.set_secret("GONE", "x").await;
    let rm = spawn_cli(s.path(), &["rm", "GONE"], b"");
    let req = answer_next(&phone, &pid, "approve").await;
    assert_eq!(req["action"], "delete_secret");
    assert_eq!(req["params"], json!({"name": "GONE"}));
    assert_eq!(code(&rm.await.unwrap()), 0);
    assert!(!s.handle().state.secrets.exists("GONE").await.unwrap());
}

#[tokio::test]
async fn ctrl_c_withdraws_the_pending_release() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    s.set_secret("TOK", "tok").await;
    let mut child = tokio::process::Command::new(common::bin())
        .args(["secret", "get", "TOK", "--reason", "r", "--data-dir"])
        .arg(s.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let req = next_approval_request(&phone).await;
    let ok = std::process::Command::new("kill")
        .args(["-INT", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let _ = child.wait().await.unwrap();
    // The server expires it at once (long before the 120 s timeout).
    let result = phone
        .wait_event(Duration::from_secs(5), |f| f["type"] == "approval_result")
        .await
        .unwrap();
    assert_eq!(result["approval_id"], req["approval_id"]);
    assert_eq!(result["status"], "expired");
    // A late approval finds nothing.
    phone.answer_approval(&pid, &req, "approve").await.unwrap();
    let err = phone.wait_event(T, |f| f["type"] == "error").await.unwrap();
    assert_eq!(err["code"], "not_found");
}

#[tokio::test]
async fn exec_passes_signals_to_the_command() {
    use tokio::io::AsyncBufReadExt;
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    s.set_secret("TOK", "tok").await;
    let mut child = tokio::process::Command::new(common::bin())
        .args([
            "secret",
            "exec",
            "--reason",
            "r",
            "--env",
            "T=TOK",
            "--data-dir",
        ])
        .arg(s.path())
        .args([
            "--",
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    answer_next(&phone, &pid, "approve").await;
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(out.next_line().await.unwrap().as_deref(), Some("ready"));
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(42),
        "the command's own handler ran and its status came back"
    );
}
