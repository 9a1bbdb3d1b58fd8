//! Issue 10 hardening of the approval gate (SPEC §8 v1.1), each attack made
//! over real sockets with real signatures: secret commitments, the phone's
//! own-request matching and commitment check, the revocation rules, and the
//! pending / replay caps.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, assert_error, audit_now, is_revoked};
use hmac::{Hmac, Mac};
use mobile_client_sim::{Client, ClientError, Origin, proto};
use serde_json::{Value, json};
use sha2::Sha256;

const T: Duration = Duration::from_secs(20);

const SECRET_1: &str = "sk-FIRST-c0mmitted-secret-4711";
const SECRET_2: &str = "sk-SECOND-c0mmitted-secret-0815";

// ---------------------------------------------------------------- helpers

async fn next_matching(c: &Client, pred: impl Fn(&Value) -> bool) -> Value {
    c.wait_event(T, pred).await.unwrap()
}

/// This session's `approval_pending` for request `rid` and the
/// `approval_request` it names (which the server sends first).
async fn requested(c: &Client, rid: &str) -> (Value, Value) {
    let mut requests = std::collections::HashMap::new();
    let mut pending: Option<Value> = None;
    loop {
        if let Some(p) = &pending
            && let Some(r) = requests.remove(&p["data"]["approval_id"].to_string())
        {
            return (p.clone(), r);
        }
        let f = tokio::time::timeout(T, c.next_event())
            .await
            .unwrap()
            .unwrap();
        if f["type"] == "approval_request" {
            requests.insert(f["approval_id"].to_string(), f);
        } else if f["event"] == "approval_pending" && f["data"]["request_id"] == rid {
            pending = Some(f);
        }
    }
}

/// The `approval_pending` event for request `rid` on this session.
async fn pending_event(c: &Client, rid: &str) -> Value {
    next_matching(c, |f| {
        f["type"] == "event" && f["event"] == "approval_pending" && f["data"]["request_id"] == rid
    })
    .await
}

async fn request_for(c: &Client, approval_id: &Value) -> Value {
    let id = approval_id.clone();
    next_matching(c, move |f| {
        f["type"] == "approval_request" && f["approval_id"] == id
    })
    .await
}

async fn result_for(c: &Client, approval_id: &Value) -> Value {
    let id = approval_id.clone();
    next_matching(c, move |f| {
        f["type"] == "approval_result" && f["approval_id"] == id
    })
    .await
}

/// Sends `action` with `rid` from a task; its final payload arrives later.
fn spawn_request_with_id(
    c: &Arc<Client>,
    rid: &str,
    action: &str,
    params: Value,
) -> tokio::task::JoinHandle<Result<Value, ClientError>> {
    let (c, rid, action) = (c.clone(), rid.to_string(), action.to_string());
    tokio::spawn(async move { c.request_with_id(&rid, &action, params).await })
}

fn llm_key(key: &str) -> Value {
    json!({"section": "llm", "value": {"api_key": key}})
}

fn interval(secs: u64) -> Value {
    json!({"section": "scheduler", "value": {"check_interval_secs": secs}})
}

/// TAG = first 16 lowercase hex chars of HMAC-SHA256(K, value), computed
/// here independently of both server and simulator.
fn tag(k: &[u8], value: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(k).unwrap();
    mac.update(value.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..8])
}

/// Every byte under `dir` in files whose name starts with `prefix`.
fn bytes_of(dir: &std::path::Path, prefix: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with(prefix) && e.path().is_file() {
            out.extend(std::fs::read(e.path()).unwrap());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn list_ids(c: &Client) -> Vec<Value> {
    let l = c.request("list_approvals", json!({})).await.unwrap();
    l["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["approval_id"].clone())
        .collect()
}

async fn interval_now(c: &Client) -> u64 {
    c.request("get_config", json!({})).await.unwrap()["scheduler_check_interval_secs"]
        .as_u64()
        .unwrap()
}

// ------------------------------------------------------ 1. commitments

#[tokio::test]
async fn secrets_are_committed_per_approval_and_k_reaches_only_the_requester() {
    let s = TestServer::start_with_config("[llm]\nprovider = \"anthropic\"\nmodel = \"m\"\n").await;
    let (a, aid) = s.phone("requester").await;
    let a = Arc::new(a);
    let (b, _bid) = s.phone("other-phone").await;

    let first = spawn_request_with_id(&a, "rid-1", "update_config", llm_key(SECRET_1));
    let (p1, r1) = requested(&a, "rid-1").await;
    let second = spawn_request_with_id(&a, "rid-2", "update_config", llm_key(SECRET_2));
    let (p2, r2) = requested(&a, "rid-2").await;

    // Different secrets, different digests; each digest is over params as sent.
    assert_ne!(r1["action_digest"], r2["action_digest"]);
    for r in [&r1, &r2] {
        assert_eq!(
            r["action_digest"],
            proto::action_digest("update_config", &r["params"])
        );
    }
    // The requester recomputes TAG from its commitment_key.
    for (p, r, secret) in [(&p1, &r1, SECRET_1), (&p2, &r2, SECRET_2)] {
        let k = proto::unb64(p["data"]["commitment_key"].as_str().unwrap()).unwrap();
        assert_eq!(k.len(), 32);
        assert_eq!(
            r["params"]["value"]["api_key"],
            format!("[redacted:{}]", tag(&k, secret))
        );
    }
    assert_ne!(
        p1["data"]["commitment_key"], p2["data"]["commitment_key"],
        "K is fresh per approval"
    );
    // A request without a secret carries no key; an empty secret is shown as "".
    let third = spawn_request_with_id(&a, "rid-3", "update_config", llm_key(""));
    let (p3, r3) = requested(&a, "rid-3").await;
    assert!(p3["data"].get("commitment_key").is_none(), "{p3}");
    assert_eq!(r3["params"]["value"]["api_key"], "");

    let keys: Vec<String> = [&p1, &p2]
        .iter()
        .map(|p| p["data"]["commitment_key"].as_str().unwrap().to_string())
        .collect();
    let challenges: Vec<String> = [&r1, &r2, &r3]
        .iter()
        .map(|r| r["challenge"].as_str().unwrap().to_string())
        .collect();

    // Decide all three; the simulator checks each commitment before approving.
    a.answer_approval(&aid, &r1, "approve").await.unwrap();
    assert_eq!(first.await.unwrap().unwrap()["result"], "success");
    a.answer_approval(&aid, &r2, "deny").await.unwrap();
    assert_error(&second.await.unwrap().unwrap(), "approval_denied");
    a.answer_approval(&aid, &r3, "deny").await.unwrap();
    assert_error(&third.await.unwrap().unwrap(), "approval_denied");
    let config = s.config_text();
    assert!(config.contains(SECRET_1), "the approved secret landed");

    // Everything the other phone received, up to the last result.
    let mut seen = Vec::new();
    loop {
        let f = tokio::time::timeout(T, b.next_event())
            .await
            .unwrap()
            .unwrap();
        let last = f["type"] == "approval_result" && f["approval_id"] == r3["approval_id"];
        seen.push(f);
        if last {
            break;
        }
    }
    seen.push(b.request("list_approvals", json!({})).await.unwrap());
    let requests = seen
        .iter()
        .filter(|f| f["type"] == "approval_request")
        .count();
    assert_eq!(requests, 3, "the other phone saw every request: {seen:?}");
    for f in &seen {
        let text = f.to_string();
        assert!(f["event"] != "approval_pending", "not the requester: {f}");
        assert!(!text.contains("commitment_key"), "{f}");
        for k in &keys {
            assert!(!text.contains(k.as_str()), "K reached another phone: {f}");
        }
        for secret in [SECRET_1, SECRET_2] {
            assert!(!text.contains(secret), "a secret reached another phone");
        }
    }

    // Nothing on disk or in the audit log holds a secret, a K or a challenge.
    audit_now(&s).await;
    let db = bytes_of(s.path(), "agent.db");
    let audit = bytes_of(&s.path().join("audit"), "");
    assert!(!db.is_empty() && !audit.is_empty());
    let approvals_rows: i64 = s
        .handle()
        .state
        .db
        .blocking(|c| {
            Ok(c.query_row(
                "SELECT count(*) FROM approvals WHERE request_json LIKE '%redacted:%'",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    assert_eq!(approvals_rows, 2, "request_json keeps the commitments");
    for (what, hay) in [("agent.db", &db), ("audit", &audit)] {
        for secret in [SECRET_1, SECRET_2] {
            assert!(!contains(hay, secret.as_bytes()), "a secret in {what}");
        }
        for k in &keys {
            assert!(!contains(hay, k.as_bytes()), "K in {what}");
            let raw = proto::unb64(k).unwrap();
            assert!(!contains(hay, &raw), "raw K in {what}");
        }
        for ch in &challenges {
            assert!(!contains(hay, ch.as_bytes()), "a challenge in {what}");
        }
    }
}

// ---------------------------------------------------- 2. the simulator

#[tokio::test]
async fn the_sim_refuses_to_approve_a_commitment_to_another_secret() {
    let s = TestServer::start().await;
    let (a, aid) = s.phone("requester").await;
    let a = Arc::new(a);
    let call = spawn_request_with_id(&a, "r-secret", "update_config", llm_key(SECRET_1));
    let (pending, genuine) = requested(&a, "r-secret").await;
    let k = proto::unb64(pending["data"]["commitment_key"].as_str().unwrap()).unwrap();
    assert_eq!(a.approval(&genuine).await.origin, Origin::ThisSession);

    // A relay (or a compromised server) shows a commitment to another
    // secret, or a made-up tag, and re-digests so the digest check passes.
    let forge = |shown: String| {
        let mut f = genuine.clone();
        f["params"]["value"]["api_key"] = json!(shown);
        f["action_digest"] = json!(proto::action_digest("update_config", &f["params"]));
        f
    };
    let forged = [
        forge(format!("[redacted:{}]", tag(&k, SECRET_2))),
        forge(format!("[redacted:{}]", tag(&[0u8; 32], SECRET_1))),
        forge("[redacted:0123456789abcdef]".into()),
        forge("[redacted]".into()),
        forge(SECRET_2.into()),
    ];
    assert_eq!(
        genuine["params"]["value"]["api_key"],
        format!("[redacted:{}]", tag(&k, SECRET_1))
    );
    for f in &forged {
        let e = a.answer_approval(&aid, f, "approve").await.unwrap_err();
        assert!(matches!(e, ClientError::Mismatch(_)), "{e}");
        assert!(
            !e.to_string().contains(SECRET_1),
            "the error shows no secret"
        );
    }
    // Nothing was sent: the approval is still pending, nothing decided.
    assert_eq!(list_ids(&a).await, vec![genuine["approval_id"].clone()]);
    assert!(!call.is_finished());
    // The genuine request verifies and is approved.
    a.answer_approval(&aid, &genuine, "approve").await.unwrap();
    assert_eq!(call.await.unwrap().unwrap()["result"], "success");
}

// A real clock: a paused one would auto-advance to the waits' timeouts
// while the runtime idles on sockets.
#[tokio::test]
async fn own_approvals_are_matched_by_approval_id_not_request_id() {
    let s = TestServer::start().await;
    let (one, id) = s.phone("owner").await;
    let one = Arc::new(one);
    let (two, _) = s.connect(&id).await;
    let two = Arc::new(two);
    let (other, _) = s.phone("other-device").await;

    // Session two asks first with request_id "same"; its approval_request
    // reaches session one's socket before session one asks anything.
    let two_call = spawn_request_with_id(&two, "same", "update_config", interval(9));
    let two_own = two.own_approval("same", T).await.unwrap();
    assert_eq!(two_own.origin, Origin::ThisSession);
    // Session one asks with the same request_id: it must pick its own.
    let one_call = spawn_request_with_id(&one, "same", "update_config", interval(7));
    let one_own = one.own_approval("same", T).await.unwrap();
    assert_ne!(one_own.approval_id, two_own.approval_id);
    assert_eq!(one_own.origin, Origin::ThisSession);
    assert_eq!(one_own.frame["params"], interval(7));
    // Marks: the same device's other session, and another device.
    let seen_by_one = one.approval(&two_own.frame).await;
    assert_eq!(seen_by_one.origin, Origin::OtherSession);
    assert!(seen_by_one.is_foreign());
    let seen_by_other = other.approval(&one_own.frame).await;
    assert_eq!(seen_by_other.origin, Origin::OtherDevice);

    one.answer_approval(&id, &one_own.frame, "approve")
        .await
        .unwrap();
    assert_eq!(one_call.await.unwrap().unwrap()["result"], "success");
    assert_eq!(interval_now(&one).await, 7);
    assert_eq!(
        list_ids(&one).await,
        vec![json!(two_own.approval_id)],
        "session two's request is untouched"
    );
    two.answer_approval(&id, &two_own.frame, "deny")
        .await
        .unwrap();
    assert_error(&two_call.await.unwrap().unwrap(), "approval_denied");
    assert_eq!(interval_now(&one).await, 7);
}

// ----------------------------------------------------- 3. revocation

#[tokio::test]
async fn the_revoked_device_cannot_stop_its_own_revocation() {
    let s = TestServer::start().await;
    let (owner, oid) = s.phone("owner").await;
    let owner = Arc::new(owner);
    let (victim, vid) = s.phone("victim").await;
    let call = spawn_request_with_id(
        &owner,
        "revoke",
        "revoke_device",
        json!({"device_id": vid.device_id()}),
    );
    let p = pending_event(&owner, "revoke").await;
    let req = request_for(&victim, &p["data"]["approval_id"]).await;
    for decision in ["deny", "approve"] {
        victim.answer_approval(&vid, &req, decision).await.unwrap();
        let e = next_matching(&victim, |f| f["type"] == "error").await;
        assert_eq!(
            (e["code"].as_str(), e["approval_id"].as_str()),
            (Some("forbidden"), req["approval_id"].as_str()),
            "{e}"
        );
    }
    assert_eq!(list_ids(&owner).await, vec![req["approval_id"].clone()]);
    assert!(!call.is_finished(), "the victim's answers decided nothing");
    owner.answer_approval(&oid, &req, "approve").await.unwrap();
    assert_eq!(call.await.unwrap().unwrap()["result"], "success");
    assert_eq!(victim.closed().await.unwrap().0, 4403);
    assert!(is_revoked(&owner, &vid.device_id()).await);
    let log = audit_now(&s).await;
    let forbidden = log
        .iter()
        .filter(|r| {
            r["action"] == "approval.response"
                && r["outcome"] == "forbidden"
                && r["device_id"] == vid.device_id()
        })
        .count();
    assert_eq!(forbidden, 2);
}

#[tokio::test]
async fn revoking_a_device_expires_its_pending_requests_and_they_never_run() {
    let s = TestServer::start().await;
    let (owner, oid) = s.phone("owner").await;
    let owner = Arc::new(owner);
    let (bystander, _) = s.phone("bystander").await;
    let (victim, vid) = s.phone("victim").await;
    let victim = Arc::new(victim);
    let before = interval_now(&owner).await;

    let victims = spawn_request_with_id(&victim, "v1", "update_config", interval(before + 11));
    let vp = pending_event(&victim, "v1").await;
    let vreq = request_for(&owner, &vp["data"]["approval_id"]).await;
    let call = spawn_request_with_id(
        &owner,
        "revoke",
        "revoke_device",
        json!({"device_id": vid.device_id()}),
    );
    let (_, rreq) = requested(&owner, "revoke").await;
    owner.answer_approval(&oid, &rreq, "approve").await.unwrap();
    assert_eq!(call.await.unwrap().unwrap()["result"], "success");

    // At once (not at the next revocation poll): no longer pending, and
    // approving it now changes nothing.
    assert!(list_ids(&owner).await.is_empty());
    owner.answer_approval(&oid, &vreq, "approve").await.unwrap();
    // Every session hears that the victim's request expired (for the owner,
    // in any order with the refusal of its late answer).
    let (mut refusal, mut result) = (None, None);
    while refusal.is_none() || result.is_none() {
        let f = tokio::time::timeout(T, owner.next_event())
            .await
            .unwrap()
            .unwrap();
        if f["type"] == "error" {
            refusal = Some(f);
        } else if f["type"] == "approval_result" && f["approval_id"] == vreq["approval_id"] {
            result = Some(f);
        }
    }
    assert_eq!(refusal.unwrap()["code"], "not_found");
    assert_eq!(result.unwrap()["status"], "expired");
    assert_eq!(
        result_for(&bystander, &vreq["approval_id"]).await["status"],
        "expired"
    );
    assert_eq!(interval_now(&owner).await, before, "it never ran");
    match victims.await.unwrap() {
        Ok(payload) => assert_error(&payload, "approval_expired"),
        Err(ClientError::Closed(_)) => {} // closed with 4403 before the answer
        Err(e) => panic!("{e}"),
    }
    assert!(
        audit_now(&s)
            .await
            .iter()
            .any(|r| r["action"] == "approval.expired" && r["approval_id"] == vreq["approval_id"])
    );
}

// A real clock: the server notices a CLI revocation by polling (every 2 s),
// and a paused clock would auto-advance past the approval's own expiry
// while the CLI runs, so the expiry checked could be the wrong one.
#[tokio::test]
async fn a_cli_revocation_expires_pending_requests_within_5_s() {
    let s = TestServer::start().await;
    let (owner, oid) = s.phone("owner").await;
    let (victim, vid) = s.phone("victim").await;
    let victim = Arc::new(victim);
    let before = interval_now(&owner).await;
    let _victims = spawn_request_with_id(&victim, "v1", "update_config", interval(before + 3));
    let vp = pending_event(&victim, "v1").await;
    let vreq = request_for(&owner, &vp["data"]["approval_id"]).await;
    // The victim's socket goes away too: the server must still notice.
    victim.close().await;
    victim.closed().await;

    let (dir, device) = (s.path().to_path_buf(), vid.device_id());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::bin())
            .args(["devices", "revoke", &device, "--data-dir"])
            .arg(&dir)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let revoked_at = std::time::Instant::now();
    assert_eq!(
        result_for(&owner, &vreq["approval_id"]).await["status"],
        "expired"
    );
    assert!(
        revoked_at.elapsed() < Duration::from_secs(5),
        "expired {:?} after the CLI revocation (the approval itself lasts 120 s)",
        revoked_at.elapsed()
    );
    owner.answer_approval(&oid, &vreq, "approve").await.unwrap();
    let e = next_matching(&owner, |f| f["type"] == "error").await;
    assert_eq!(e["code"], "not_found");
    assert_eq!(interval_now(&owner).await, before);
}

// --------------------------------------------------------- 4. caps

#[tokio::test]
async fn the_17th_pending_approval_of_a_device_is_busy_while_others_still_can_ask() {
    let s = TestServer::start().await;
    let (a, aid) = s.phone("busy-phone").await;
    let a = Arc::new(a);
    let (b, _) = s.phone("other-phone").await;
    let b = Arc::new(b);
    let mut calls = Vec::new();
    let mut ids = Vec::new();
    for i in 0..16u64 {
        let rid = format!("a{i}");
        calls.push(spawn_request_with_id(
            &a,
            &rid,
            "update_config",
            interval(100 + i),
        ));
        ids.push(requested(&a, &rid).await.1);
    }
    let busy = a
        .request_with_id("a16", "update_config", interval(200))
        .await
        .unwrap();
    assert_error(&busy, "busy");
    let retry = busy["retry_after_ms"].as_u64().unwrap();
    assert!((1..=120_000).contains(&retry), "{busy}");
    // Another device still can.
    let _b_call = spawn_request_with_id(&b, "b0", "update_config", interval(300));
    pending_event(&b, "b0").await;
    assert_eq!(list_ids(&a).await.len(), 17, "no approval for the 17th");
    let requested = audit_now(&s)
        .await
        .iter()
        .filter(|r| r["action"] == "approval.requested")
        .count();
    assert_eq!(requested, 17);
    // Once one is decided the device may ask again.
    a.answer_approval(&aid, &ids[0], "deny").await.unwrap();
    assert_error(&calls.remove(0).await.unwrap().unwrap(), "approval_denied");
    let _again = spawn_request_with_id(&a, "a17", "update_config", interval(201));
    pending_event(&a, "a17").await;
}

#[tokio::test]
async fn a_flood_of_approval_requests_does_not_keep_the_owner_out() {
    const DEVICES: usize = 10;
    const SESSIONS: usize = 2;
    const PER_SESSION: usize = 60; // under max_in_flight (64)
    let s = TestServer::start().await;
    let (owner_first, oid) = s.phone("owner").await;
    owner_first.close().await;

    let mut sessions = Vec::new();
    for d in 0..DEVICES {
        let (c, id) = s.phone(&format!("flood-{d}")).await;
        sessions.push(Arc::new(c));
        for _ in 1..SESSIONS {
            sessions.push(Arc::new(s.connect(&id).await.0));
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (n, c) in sessions.iter().enumerate() {
        for i in 0..PER_SESSION {
            let (c, tx) = (c.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let r = c
                    .request_with_id(
                        &format!("flood-{n}-{i}"),
                        "update_config",
                        interval(1000 + i as u64),
                    )
                    .await;
                let _ = tx.send(r);
            }));
        }
    }
    let attempts = DEVICES * SESSIONS * PER_SESSION;
    assert_eq!(attempts, 1200);
    // Every attempt beyond the caps is refused at once; 128 wait.
    for _ in 0..attempts - 128 {
        let r = tokio::time::timeout(T, rx.recv())
            .await
            .expect("every refused attempt is answered at once")
            .unwrap()
            .unwrap();
        assert_error(&r, "busy");
        assert!(r["retry_after_ms"].as_u64().is_some(), "{r}");
    }
    let listed = sessions[0]
        .request("list_approvals", json!({}))
        .await
        .unwrap();
    let listed: Vec<Value> = listed["approvals"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 128);
    let mut per_device = std::collections::HashMap::new();
    for a in &listed {
        *per_device
            .entry(a["origin_device_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert!(per_device.values().all(|n| *n <= 16), "{per_device:?}");
    assert!(rx.try_recv().is_err(), "the 128 are still pending");

    // Every one of them has been announced before the owner comes back.
    let mut announced = 0;
    while announced < 128 {
        let f = tokio::time::timeout(T, sessions[0].next_event())
            .await
            .unwrap()
            .unwrap();
        announced += usize::from(f["type"] == "approval_request");
    }

    // The owner's new session: authenticates, gets the 32 oldest, stays open.
    let (owner, _) = s.connect(&oid).await;
    let dash = owner.request("get_dashboard", json!({})).await.unwrap();
    assert_eq!(dash["result"], "dashboard");
    let mut replayed = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout(Duration::ZERO, owner.next_event()).await {
        if f["type"] == "approval_request" {
            replayed.push(f["approval_id"].clone());
        }
    }
    let oldest: Vec<Value> = listed[..32]
        .iter()
        .map(|a| a["approval_id"].clone())
        .collect();
    assert_eq!(replayed, oldest, "the 32 oldest, oldest first");
    assert_eq!(
        list_ids(&owner).await.len(),
        128,
        "list_approvals has them all"
    );
    // It can decide one of them, and its own gated request answers (busy).
    let one = listed[0].clone();
    owner.answer_approval(&oid, &one, "deny").await.unwrap();
    assert_eq!(
        result_for(&owner, &one["approval_id"]).await["status"],
        "denied"
    );
    assert_eq!(
        owner.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
    let _ = tokio::time::timeout(Duration::ZERO, owner.closed())
        .await
        .expect_err("still open");
    drop(tasks);
}

#[tokio::test]
async fn challenges_stored_before_v1_1_are_scrubbed_at_start() {
    let mut s = TestServer::start().await;
    let old = json!({"approval_id": "apr_old", "request_id": "r", "origin_device_id": "0".repeat(32),
                     "action": "delete_memory", "params": {"id": "mem_x"}, "summary": "s",
                     "action_digest": "0".repeat(64), "challenge": "OLD-CHALLENGE-kept-by-v1-0", "expires_at": 1});
    let text = old.to_string();
    s.handle()
        .state
        .db
        .blocking(move |c| {
            c.execute(
                "INSERT INTO approvals(approval_id, request_json, status, created_at, expires_at) VALUES ('apr_old', ?1, 'denied', 0, 1)",
                [text],
            )?;
            Ok(())
        })
        .unwrap();
    s.restart().await;
    let stored: String = s
        .handle()
        .state
        .db
        .blocking(|c| {
            Ok(c.query_row(
                "SELECT request_json FROM approvals WHERE approval_id = 'apr_old'",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    let stored: Value = serde_json::from_str(&stored).unwrap();
    let mut expected = old.clone();
    expected.as_object_mut().unwrap().remove("challenge");
    assert_eq!(stored, expected, "only the challenge is gone");
}
