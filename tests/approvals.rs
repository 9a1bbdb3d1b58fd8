//! The biometric approval gate (SPEC §8), tested with `revoke_device`.

mod common;

use std::time::Duration;

use common::{
    TestServer, assert_error, audit_now, is_revoked, next_approval_request, spawn_request,
};
use mobile_client_sim::client::approval_response;
use mobile_client_sim::{ApprovalAlg, Client, Identity, proto};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

async fn error_frame(c: &Client) -> Value {
    c.wait_event(T, |f| f["type"] == "error").await.unwrap()
}

async fn result_frame(c: &Client) -> Value {
    c.wait_event(T, |f| f["type"] == "approval_result")
        .await
        .unwrap()
}

/// Owner (requester + approver), and a victim device to revoke.
async fn setup(s: &TestServer) -> (std::sync::Arc<Client>, Identity, Client, Identity) {
    let (owner, oid) = s.phone("owner").await;
    let (victim, vid) = s.phone("victim").await;
    (std::sync::Arc::new(owner), oid, victim, vid)
}

/// `revoke_device` of `device` from a task; it waits for its approval.
fn spawn_revoke(c: &std::sync::Arc<Client>, device: &str) -> tokio::task::JoinHandle<Value> {
    spawn_request(c, "revoke_device", json!({"device_id": device}))
}

#[tokio::test]
async fn approve_runs_the_action_once() {
    let s = TestServer::start().await;
    let (owner, oid, victim, vid) = setup(&s).await;
    let pending = spawn_revoke(&owner, &vid.device_id());
    let req = next_approval_request(&owner).await;
    let ev = owner.wait_event(T, |f| f["type"] == "event").await.unwrap();
    assert_eq!(ev["event"], "approval_pending");
    assert_eq!(ev["data"]["approval_id"], req["approval_id"]);
    assert_eq!(ev["data"]["expires_at"], req["expires_at"]);
    // Every session got it, including the victim's.
    let vreq = next_approval_request(&victim).await;
    assert_eq!(vreq["approval_id"], req["approval_id"]);
    assert_eq!(req["action"], "revoke_device");
    assert_eq!(req["origin_device_id"], oid.device_id());
    assert_eq!(req["params"], json!({"device_id": vid.device_id()}));
    assert_eq!(
        req["action_digest"],
        proto::action_digest("revoke_device", &req["params"])
    );
    assert!(req["summary"].as_str().unwrap().contains("victim"));
    assert!(req["expires_at"].as_i64().unwrap() > req["expires_at"].as_i64().unwrap() - 1);
    // The requester keeps getting answers while its request waits.
    assert_eq!(
        owner.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
    let listed = owner.request("list_approvals", json!({})).await.unwrap();
    let mut expected = req.clone();
    expected.as_object_mut().unwrap().remove("type");
    assert_eq!(listed["approvals"], json!([expected]));
    assert!(
        !is_revoked(&owner, &vid.device_id()).await,
        "nothing ran before approval"
    );

    owner.answer_approval(&oid, &req, "approve").await.unwrap();
    let resp = pending.await.unwrap();
    assert_eq!(resp["result"], "success", "{resp}");
    assert_eq!(result_frame(&owner).await["status"], "approved");
    assert_eq!(
        victim.closed().await.unwrap().0,
        4403,
        "revoked sessions are closed at once"
    );
    assert!(is_revoked(&owner, &vid.device_id()).await);

    // Replaying the used response changes nothing.
    owner
        .send_raw(approval_response(&oid, &req, "approve").to_string())
        .await
        .unwrap();
    let e = error_frame(&owner).await;
    assert_eq!(
        (e["code"].as_str(), e["approval_id"].as_str()),
        (Some("not_found"), req["approval_id"].as_str())
    );
    let log = audit_now(&s).await;
    let runs = log
        .iter()
        .filter(|r| r["action"] == "revoke_device" && r["outcome"] == "ok")
        .count();
    assert_eq!(runs, 1);
    for a in ["approval.requested", "approval.approved"] {
        let r = log
            .iter()
            .find(|r| r["action"] == a)
            .unwrap_or_else(|| panic!("{a} audited"));
        assert_eq!(r["approval_id"], req["approval_id"]);
    }
    assert!(
        owner.request("list_approvals", json!({})).await.unwrap()["approvals"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn deny_changes_nothing() {
    let s = TestServer::start().await;
    let (owner, oid, _victim, vid) = setup(&s).await;
    let pending = spawn_revoke(&owner, &vid.device_id());
    let req = next_approval_request(&owner).await;
    owner.answer_approval(&oid, &req, "deny").await.unwrap();
    assert_error(&pending.await.unwrap(), "approval_denied");
    assert_eq!(result_frame(&owner).await["status"], "denied");
    assert!(!is_revoked(&owner, &vid.device_id()).await);
    let log = audit_now(&s).await;
    assert!(
        log.iter()
            .any(|r| r["action"] == "approval.denied" && r["approval_id"] == req["approval_id"])
    );
    assert!(
        log.iter()
            .any(|r| r["action"] == "revoke_device" && r["outcome"] == "approval_denied")
    );
}

#[tokio::test(start_paused = true)]
async fn expiry_denies_and_a_late_answer_is_not_found() {
    let s = TestServer::start_with_config("[approvals]\ntimeout_secs = 30\n").await;
    let (owner, oid, _victim, vid) = setup(&s).await;
    let pending = spawn_revoke(&owner, &vid.device_id());
    let req = next_approval_request(&owner).await;
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_error(&pending.await.unwrap(), "approval_expired");
    assert_eq!(result_frame(&owner).await["status"], "expired");
    owner.answer_approval(&oid, &req, "approve").await.unwrap();
    assert_eq!(error_frame(&owner).await["code"], "not_found");
    assert!(!is_revoked(&owner, &vid.device_id()).await);
    assert!(
        audit_now(&s)
            .await
            .iter()
            .any(|r| r["action"] == "approval.expired")
    );
}

#[tokio::test]
async fn substituted_signatures_are_refused_and_the_request_stays_pending() {
    let s = TestServer::start().await;
    let (owner, oid, victim, vid) = setup(&s).await;
    let (third, tid) = s.phone("third").await;
    let first = spawn_revoke(&owner, &vid.device_id());
    let r1 = next_approval_request(&owner).await;
    let second = spawn_revoke(&owner, &tid.device_id());
    let r2 = owner
        .wait_event(T, |f| {
            f["type"] == "approval_request" && f["approval_id"] != r1["approval_id"]
        })
        .await
        .unwrap();

    // Each frame says "approve r1" but its signature covers something else.
    let sign = |approval_id: &Value, digest: &Value, challenge: &Value, signed_decision: &str| {
        let msg = proto::approval_string(
            approval_id.as_str().unwrap(),
            digest.as_str().unwrap(),
            challenge.as_str().unwrap(),
            signed_decision,
        );
        json!({"type": "approval_response", "approval_id": r1["approval_id"], "device_id": oid.device_id(),
               "decision": "approve", "signature": oid.sign_approval(&msg)})
    };
    for forged in [
        sign(
            &r1["approval_id"],
            &r2["action_digest"],
            &r1["challenge"],
            "approve",
        ), // other digest
        sign(
            &r1["approval_id"],
            &r1["action_digest"],
            &r2["challenge"],
            "approve",
        ), // other challenge
        sign(
            &r2["approval_id"],
            &r1["action_digest"],
            &r1["challenge"],
            "approve",
        ), // other id
        sign(
            &r1["approval_id"],
            &r1["action_digest"],
            &r1["challenge"],
            "deny",
        ), // other decision
    ] {
        owner.send_raw(forged.to_string()).await.unwrap();
        let e = error_frame(&owner).await;
        assert_eq!(e["code"], "bad_signature", "{e}");
        assert_eq!(e["approval_id"], r1["approval_id"]);
    }
    // Replay of r1's valid answer against r2: refused, r2 untouched.
    let mut replay = approval_response(&oid, &r1, "approve");
    replay["approval_id"] = r2["approval_id"].clone();
    owner.send_raw(replay.to_string()).await.unwrap();
    assert_eq!(error_frame(&owner).await["code"], "bad_signature");
    let listed = owner.request("list_approvals", json!({})).await.unwrap();
    assert_eq!(
        listed["approvals"].as_array().unwrap().len(),
        2,
        "both still pending"
    );
    // Now decide properly: deny r1, approve r2.
    owner.answer_approval(&oid, &r1, "deny").await.unwrap();
    assert_error(&first.await.unwrap(), "approval_denied");
    owner.answer_approval(&oid, &r2, "approve").await.unwrap();
    assert_eq!(second.await.unwrap()["result"], "success");
    assert!(!is_revoked(&owner, &vid.device_id()).await);
    assert!(is_revoked(&owner, &tid.device_id()).await);
    drop((victim, third));
    assert!(
        audit_now(&s)
            .await
            .iter()
            .any(|r| r["action"] == "approval.response" && r["outcome"] == "bad_signature")
    );
}

#[tokio::test]
async fn foreign_revoked_and_malformed_answers_change_nothing() {
    let s = TestServer::start().await;
    let (owner, oid, victim, vid) = setup(&s).await;
    let (gone, gid) = s.phone("gone").await;
    drop(gone);
    s.handle()
        .state
        .db
        .blocking(|c| secrets_agent::storage::devices::revoke_device(c, &gid.device_id()))
        .unwrap();
    let pending = spawn_revoke(&owner, &vid.device_id());
    let req = next_approval_request(&owner).await;

    let stranger = Identity::generate("stranger", ApprovalAlg::Ed25519);
    owner
        .send_raw(approval_response(&stranger, &req, "approve").to_string())
        .await
        .unwrap();
    assert_eq!(
        error_frame(&owner).await["code"],
        "forbidden",
        "an unpaired key"
    );
    owner
        .send_raw(approval_response(&gid, &req, "approve").to_string())
        .await
        .unwrap();
    assert_eq!(
        error_frame(&owner).await["code"],
        "forbidden",
        "a revoked device's key"
    );
    let mut bad = approval_response(&oid, &req, "approve");
    bad["signature"] = json!("%%%not-base64%%%");
    owner.send_raw(bad.to_string()).await.unwrap();
    assert_eq!(error_frame(&owner).await["code"], "invalid_request");
    let mut bad = approval_response(&oid, &req, "approve");
    bad["signature"] = json!(proto::b64(&[1, 2, 3]));
    owner.send_raw(bad.to_string()).await.unwrap();
    assert_eq!(error_frame(&owner).await["code"], "bad_signature");
    let mut bad = approval_response(&oid, &req, "approve");
    bad["decision"] = json!("maybe");
    owner.send_raw(bad.to_string()).await.unwrap();
    assert_eq!(error_frame(&owner).await["code"], "invalid_request");
    owner
        .send_raw(json!({"type": "approval_response"}).to_string())
        .await
        .unwrap();
    assert_eq!(error_frame(&owner).await["code"], "invalid_request");
    let mut unknown = approval_response(&oid, &req, "approve");
    unknown["approval_id"] = json!("apr_nope");
    owner.send_raw(unknown.to_string()).await.unwrap();
    assert_eq!(error_frame(&owner).await["code"], "not_found");

    // The session is up, the approval is still pending, nothing changed.
    assert_eq!(
        owner.request("list_approvals", json!({})).await.unwrap()["approvals"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(!is_revoked(&owner, &vid.device_id()).await);
    // The device to be revoked cannot decide its own revocation (SPEC §8
    // Limits, v1.1): its answer is forbidden and changes nothing.
    victim.answer_approval(&vid, &req, "deny").await.unwrap();
    let e = error_frame(&victim).await;
    assert_eq!(
        (e["code"].as_str(), e["approval_id"].as_str()),
        (Some("forbidden"), req["approval_id"].as_str())
    );
    owner.answer_approval(&oid, &req, "deny").await.unwrap();
    assert_error(&pending.await.unwrap(), "approval_denied");
}

#[tokio::test]
async fn two_phones_answering_at_once_make_one_decision() {
    let s = TestServer::start().await;
    let (owner, oid, _victim, vid) = setup(&s).await;
    let (other, other_id) = s.phone("tablet").await;
    let pending = spawn_revoke(&owner, &vid.device_id());
    let req = next_approval_request(&owner).await;
    let a = approval_response(&oid, &req, "approve").to_string();
    let b = approval_response(&other_id, &req, "deny").to_string();
    let (ra, rb) = tokio::join!(owner.send_raw(a), other.send_raw(b));
    ra.unwrap();
    rb.unwrap();
    let resp = pending.await.unwrap();
    // When the tablet wins, the owner's `not_found` and the result race:
    // take whichever comes first, and keep it.
    let first = owner
        .wait_event(T, |f| {
            f["type"] == "approval_result" || f["type"] == "error"
        })
        .await
        .unwrap();
    let (result, owner_error) = if first["type"] == "error" {
        (result_frame(&owner).await, Some(first))
    } else {
        (first, None)
    };
    let status = result["status"].as_str().unwrap().to_string();
    match status.as_str() {
        "approved" => {
            assert_eq!(resp["result"], "success");
            assert!(owner_error.is_none(), "the winner gets no error");
            assert_eq!(
                error_frame(&other).await["code"],
                "not_found",
                "the loser is told"
            );
        }
        "denied" => {
            assert_error(&resp, "approval_denied");
            let e = match owner_error {
                Some(e) => e,
                None => error_frame(&owner).await,
            };
            assert_eq!(e["code"], "not_found", "the loser is told");
        }
        s => panic!("{s}"),
    }
    let log = audit_now(&s).await;
    let decisions = log
        .iter()
        .filter(|r| r["action"] == "approval.approved" || r["action"] == "approval.denied")
        .count();
    assert_eq!(decisions, 1);
}

#[tokio::test]
async fn a_device_connecting_later_receives_the_request_and_approves_it() {
    let s = TestServer::start().await;
    let (owner, _oid, _victim, vid) = setup(&s).await;
    let (phone, pid) = s.phone("phone-in-pocket").await;
    phone.close().await;
    let pending = spawn_revoke(&owner, &vid.device_id());
    let req = next_approval_request(&owner).await;
    let (phone, _) = s.connect(&pid).await;
    let got = next_approval_request(&phone).await;
    assert_eq!(got, req);
    phone.answer_approval(&pid, &got, "approve").await.unwrap();
    assert_eq!(pending.await.unwrap()["result"], "success");
}

#[tokio::test]
async fn the_approval_outlives_the_requesters_connection() {
    let s = TestServer::start().await;
    let (owner, _oid, _victim, vid) = setup(&s).await;
    let (approver, aid) = s.phone("approver").await;
    let _pending = spawn_revoke(&owner, &vid.device_id());
    let req = next_approval_request(&approver).await;
    owner.close().await;
    owner.closed().await;
    approver
        .answer_approval(&aid, &req, "approve")
        .await
        .unwrap();
    assert_eq!(result_frame(&approver).await["status"], "approved");
    assert!(
        is_revoked(&approver, &vid.device_id()).await,
        "the action ran after the requester left"
    );
}

#[tokio::test]
async fn es256_end_to_end_and_no_algorithm_confusion() {
    let s = TestServer::start().await;
    let (owner, oid) = s.phone_with("iphone", ApprovalAlg::Es256).await;
    let owner = std::sync::Arc::new(owner);
    let (_victim, vid) = s.phone_with("pixel", ApprovalAlg::Ed25519).await;
    let (_v2, v2id) = s.phone("spare").await;

    // An Ed25519 signature where ES256 is expected.
    let pending = spawn_revoke(&owner, &v2id.device_id());
    let req = next_approval_request(&owner).await;
    let ed = Identity::generate("ed", ApprovalAlg::Ed25519);
    let mut forged = approval_response(&ed, &req, "approve");
    forged["device_id"] = json!(oid.device_id());
    owner.send_raw(forged.to_string()).await.unwrap();
    assert_eq!(error_frame(&owner).await["code"], "bad_signature");
    // A DER ECDSA signature where Ed25519 is expected.
    let ec = Identity::generate("ec", ApprovalAlg::Es256);
    let mut forged = approval_response(&ec, &req, "approve");
    forged["device_id"] = json!(vid.device_id());
    owner.send_raw(forged.to_string()).await.unwrap();
    assert_eq!(error_frame(&owner).await["code"], "bad_signature");
    // The real ES256 approval works.
    owner.answer_approval(&oid, &req, "approve").await.unwrap();
    assert_eq!(pending.await.unwrap()["result"], "success");
    assert!(is_revoked(&owner, &v2id.device_id()).await);
}

#[tokio::test]
async fn pending_approvals_expire_across_a_restart_and_never_run() {
    let mut s = TestServer::start().await;
    let (owner, _oid, _victim, vid) = setup(&s).await;
    let pending = spawn_revoke(&owner, &vid.device_id());
    let req = next_approval_request(&owner).await;
    s.restart().await;
    let resp = pending.await.unwrap();
    assert_error(&resp, "unavailable");
    let (c, _) = s.phone("after").await;
    assert!(
        c.request("list_approvals", json!({})).await.unwrap()["approvals"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(!is_revoked(&c, &vid.device_id()).await);
    let log = audit_now(&s).await;
    assert!(log.iter().any(|r| r["outcome"] == "expired_on_restart" && r["approval_id"] == req["approval_id"]));
}
