//! The hash-chained audit log (SPEC §8a) and `secrets-agent audit verify`.

mod common;

use std::process::Command;

use common::{TestServer, audit_now, bin};
use serde_json::json;

fn verify(dir: &std::path::Path) -> (bool, String) {
    common::audit_verify(dir)
}

async fn server_with_history() -> TestServer {
    let s = TestServer::start_with_config("[llm]\napi_key = \"sk-audit-secret-999\"\n").await;
    let (c, _) = s.phone("auditor").await;
    c.request("get_dashboard", json!({})).await.unwrap();
    c.request("list_devices", json!({})).await.unwrap();
    c.request("no_such_action", json!({})).await.unwrap();
    c.jsonrpc(json!(1), "get_config", json!({})).await.unwrap();
    s
}

#[tokio::test]
async fn every_request_is_recorded_and_the_chain_verifies() {
    let s = server_with_history().await;
    let log = audit_now(&s).await;
    let actions: Vec<_> = log
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_string())
        .collect();
    for a in [
        "handshake.pair",
        "get_dashboard",
        "list_devices",
        "unknown_action",
        "get_config",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
    // An unknown name is recorded under one fixed action; the name itself
    // only inside the digest.
    let unknown = log
        .iter()
        .find(|r| r["action"] == "unknown_action")
        .unwrap();
    assert_eq!(unknown["outcome"], "unknown_action");
    assert!(log.iter().all(|r| r["action"] != "no_such_action"));
    for (i, r) in log.iter().enumerate() {
        assert_eq!(r["seq"], (i + 1) as u64);
        assert_eq!(r["params_digest"].as_str().map(str::len).unwrap_or(64), 64);
        assert!(r["ts"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(log[0]["prev_hash"], "0".repeat(64));
    assert_eq!(log[1]["prev_hash"], log[0]["hash"]);
    let raw = std::fs::read_to_string(s.path().join("audit/audit.jsonl")).unwrap();
    assert!(
        !raw.contains("sk-audit-secret"),
        "no secret in the audit log"
    );
    let (ok, out) = verify(s.path());
    assert!(ok, "{out}");
}

#[tokio::test]
async fn editing_one_byte_breaks_verification() {
    let mut s = server_with_history().await;
    s.stop().await;
    let p = s.path().join("audit/audit.jsonl");
    let text = std::fs::read_to_string(&p).unwrap();
    // Flip one byte inside the third record's action name.
    let lines: Vec<&str> = text.lines().collect();
    let third = lines[2];
    let at = third.find("\"action\":\"").unwrap() + 10;
    let mut bytes = text.clone().into_bytes();
    let offset = text.find(third).unwrap() + at;
    bytes[offset] ^= 0x01;
    std::fs::write(&p, bytes).unwrap();
    let (ok, out) = verify(s.path());
    assert!(!ok);
    assert!(out.contains("seq 3"), "names the first bad record: {out}");
}

#[tokio::test]
async fn removing_reordering_or_cutting_records_is_detected() {
    let mut s = server_with_history().await;
    s.stop().await;
    let p = s.path().join("audit/audit.jsonl");
    let original = std::fs::read_to_string(&p).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert!(lines.len() >= 5);

    let mut removed = lines.clone();
    removed.remove(2);
    std::fs::write(&p, removed.join("\n") + "\n").unwrap();
    let (ok, out) = verify(s.path());
    assert!(!ok && out.contains("seq 3"), "{out}");

    let mut swapped = lines.clone();
    swapped.swap(1, 2);
    std::fs::write(&p, swapped.join("\n") + "\n").unwrap();
    let (ok, out) = verify(s.path());
    assert!(!ok && out.contains("seq 2"), "{out}");

    let cut = &lines[..lines.len() - 1];
    std::fs::write(&p, cut.join("\n") + "\n").unwrap();
    let (ok, out) = verify(s.path());
    assert!(!ok && out.contains("tail cut off"), "{out}");

    std::fs::write(&p, &original).unwrap();
    let (ok, out) = verify(s.path());
    assert!(ok, "{out}");
}

#[tokio::test]
async fn cli_and_server_appends_share_one_chain() {
    let s = server_with_history().await;
    let out = Command::new(bin())
        .args(["pair", "--json", "--data-dir"])
        .arg(s.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let (c, _) = s.phone("second").await;
    c.request("get_dashboard", json!({})).await.unwrap();
    let log = audit_now(&s).await;
    assert!(log.iter().any(|r| r["action"] == "cli.pair_code_created"));
    let (ok, out) = verify(s.path());
    assert!(ok, "{out}");
}
