//! Leases (SPEC §10): reuse by the same requester for a subset of names,
//! not by another; `revoke_secret_lease`; the cap; the end on replacement
//! and on deletion; survival across a restart and the end at its time
//! (paused clock), over the real socket with a signing phone.

mod common;
mod secrets_support;

use std::time::Duration;

use common::{TestServer, answer_next, assert_no_approval_request, audit_now};
use secrets_support::*;
use serde_json::json;

async fn seed(s: &TestServer, names: &[&str]) {
    for n in names {
        s.set_secret(n, &format!("value of {n}")).await;
    }
}

fn last(lines: &[serde_json::Value]) -> &serde_json::Value {
    lines.last().unwrap()
}

#[tokio::test]
async fn a_lease_serves_the_same_requester_and_not_another_until_revoked() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    seed(&s, &["A", "B"]).await;
    let first = spawn_sock(s.path(), release_req(&["B", "A"], "backup.sh", 60));
    let req = answer_next(&phone, &pid, "approve").await;
    assert_eq!(req["params"]["lease_secs"], 60);
    assert!(
        req["summary"].as_str().unwrap().contains("for 1 min"),
        "{req}"
    );
    let lines = first.await.unwrap();
    assert_eq!(lines[0]["type"], "pending", "a pending line first");
    let ok = last(&lines);
    assert_eq!(ok["type"], "ok");
    assert_eq!(ok["values"], json!({"A": "value of A", "B": "value of B"}));
    let lease_id = ok["lease_id"].as_str().unwrap().to_string();

    // Same requester, a subset: no prompt, and it is audited.
    let lines = sock(s.path(), release_req(&["A"], "backup.sh", 0)).await;
    assert_eq!(lines.len(), 1, "no pending line: nothing asked");
    assert_eq!(last(&lines)["values"], json!({"A": "value of A"}));
    assert_eq!(last(&lines)["lease_id"], lease_id.as_str());
    assert_no_approval_request(&phone).await;
    let log = audit_now(&s).await;
    assert!(log.iter().any(|r| r["action"] == "secret.released"
        && r["lease_id"] == lease_id.as_str()
        && r.get("approval_id").is_none()));

    // Another requester asks (denied here).
    let other = spawn_sock(s.path(), release_req(&["A"], "other.sh", 0));
    answer_next(&phone, &pid, "deny").await;
    assert_eq!(last(&other.await.unwrap())["code"], "approval_denied");

    // The lease is listed, then revoked at once; unknown/ended → not_found.
    let l = phone
        .request("list_secret_leases", json!({}))
        .await
        .unwrap();
    let leases = l["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0]["names"], json!(["A", "B"]));
    assert_eq!(leases[0]["requester"]["key"], "backup.sh");
    let r = phone
        .request("revoke_secret_lease", json!({"lease_id": lease_id}))
        .await
        .unwrap();
    assert_eq!(r["result"], "success");
    let r = phone
        .request("revoke_secret_lease", json!({"lease_id": lease_id}))
        .await
        .unwrap();
    common::assert_error(&r, "not_found");
    let again = spawn_sock(s.path(), release_req(&["A"], "backup.sh", 0));
    answer_next(&phone, &pid, "deny").await;
    assert_eq!(
        last(&again.await.unwrap())["code"],
        "approval_denied",
        "asked again after revocation"
    );
    let log = audit_now(&s).await;
    assert!(
        log.iter()
            .any(|r| r["action"] == "secret.lease_revoked" && r["lease_id"] == lease_id.as_str())
    );
}

#[tokio::test]
async fn the_lease_cap_and_replacing_a_secret_end_leases() {
    let s = TestServer::start_with_config("[secrets]\nmax_lease_secs = 120\n").await;
    let (phone, pid) = s.phone("owner").await;
    seed(&s, &["A"]).await;
    // Above the cap: invalid_request before anything is asked.
    let lines = sock(s.path(), release_req(&["A"], "x", 121)).await;
    assert_eq!(last(&lines)["code"], "invalid_request");
    let pending = phone.request("list_approvals", json!({})).await.unwrap();
    assert_eq!(pending["approvals"], json!([]));
    // A lease, then the secret is replaced: the lease ends.
    let first = spawn_sock(s.path(), release_req(&["A"], "x", 120));
    answer_next(&phone, &pid, "approve").await;
    let lease = last(&first.await.unwrap())["lease_id"]
        .as_str()
        .unwrap()
        .to_string();
    let set = spawn_sock(s.path(), json!({"op": "set", "name": "A", "value": "new"}));
    answer_next(&phone, &pid, "approve").await;
    assert_eq!(last(&set.await.unwrap())["replaced"], true);
    let l = phone
        .request("list_secret_leases", json!({}))
        .await
        .unwrap();
    assert_eq!(l["leases"], json!([]));
    let log = audit_now(&s).await;
    let set_rec = log
        .iter()
        .find(|r| r["action"] == "secret.set" && r["outcome"] == "replaced")
        .unwrap();
    assert_eq!(set_rec["leases_ended"], json!([lease]));
}

#[tokio::test]
async fn a_lease_survives_a_restart_and_ends_at_its_time() {
    let mut s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    seed(&s, &["A"]).await;
    let first = spawn_sock(s.path(), release_req(&["A"], "cron-job", 600));
    answer_next(&phone, &pid, "approve").await;
    assert_eq!(last(&first.await.unwrap())["type"], "ok");
    drop(phone);
    // From here tokio's clock is paused, and moved by hand (the server's
    // wall clock follows it).
    tokio::time::pause();
    s.restart().await;
    // After the restart the lease still serves, without a phone connected,
    // and is listed.
    assert_eq!(s.handle().state.secrets.leases().await.unwrap().len(), 1);
    let lines = sock(s.path(), release_req(&["A"], "cron-job", 0)).await;
    assert_eq!(last(&lines)["values"], json!({"A": "value of A"}));
    // 10 minutes later it has ended: the release asks again.
    tokio::time::advance(Duration::from_secs(601)).await;
    let l = s.handle().state.secrets.leases().await.unwrap();
    assert!(l.is_empty(), "ended at its time: {l:?}");
    // A live handshake needs the clock running again.
    tokio::time::resume();
    let (phone, _) = s.connect(&pid).await;
    let again = spawn_sock(s.path(), release_req(&["A"], "cron-job", 0));
    let req = answer_next(&phone, &pid, "deny").await;
    assert_eq!(req["action"], "release_secret");
    assert_eq!(last(&again.await.unwrap())["code"], "approval_denied");
}

#[tokio::test]
async fn revoking_the_approving_device_ends_its_leases_and_no_device_means_no_release() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    seed(&s, &["A"]).await;
    let first = spawn_sock(s.path(), release_req(&["A"], "job", 600));
    answer_next(&phone, &pid, "approve").await;
    assert_eq!(last(&first.await.unwrap())["type"], "ok");
    let out = std::process::Command::new(common::bin())
        .args(["devices", "revoke", &pid.device_id(), "--data-dir"])
        .arg(s.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    // Refused at once, lease or not: no device can approve.
    let lines = sock(s.path(), release_req(&["A"], "job", 0)).await;
    assert_eq!(last(&lines)["code"], "forbidden");
    assert!(
        last(&lines)["message"]
            .as_str()
            .unwrap()
            .contains("no device is paired")
    );
    assert!(
        s.handle().state.secrets.leases().await.unwrap().is_empty(),
        "the lease ended with its device"
    );
}
