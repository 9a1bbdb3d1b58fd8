//! `get_config` / `update_config` (SPEC §6, §7): validation before any
//! prompt, comment-preserving atomic writes, live apply, secrets never shown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    TestServer, approval_round_trip, assert_error, audit_now, capture_logs, logged,
    next_approval_request, spawn_request,
};
use mobile_client_sim::{Client, Identity};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "sk-live-TOPSECRET-4242";

/// Sends a gated update and answers its approval with `decision`; returns
/// the final payload and the approval request.
async fn update(
    c: &Arc<Client>,
    id: &Identity,
    section: &str,
    value: Value,
    decision: &str,
) -> (Value, Value) {
    let params = json!({"section": section, "value": value});
    approval_round_trip(c, id, "update_config", params, decision).await
}

#[tokio::test]
async fn approved_update_is_visible_persisted_commented_and_live() {
    let mut s = TestServer::start().await; // writes the commented default config.toml
    let (c, id) = s.phone("owner").await;
    let c = Arc::new(c);
    let (resp, req) = update(&c, &id, "approvals", json!({"timeout_secs": 45}), "approve").await;
    assert_eq!(resp["result"], "success", "{resp}");
    assert!(
        req["summary"]
            .as_str()
            .unwrap()
            .contains("timeout_secs = 45")
    );
    let text = s.config_text();
    assert!(text.contains("timeout_secs = 45"), "{text}");
    assert!(
        text.contains("# Seconds a biometric approval request waits"),
        "comments kept"
    );
    assert!(
        text.contains("# secrets-agent configuration."),
        "header kept"
    );

    let (resp, _) = update(
        &c,
        &id,
        "scheduler",
        json!({"check_interval_secs": 5, "enabled": false}),
        "approve",
    )
    .await;
    assert_eq!(resp["result"], "success");
    let cfg = c.request("get_config", json!({})).await.unwrap();
    assert_eq!(cfg["scheduler_check_interval_secs"], 5);
    assert_eq!(cfg["scheduler_enabled"], false);

    // Behaviour: the next approval uses the new 45 s timeout.
    let h = spawn_request(
        &c,
        "update_config",
        json!({"section": "llm", "value": {"model": "m2"}}),
    );
    let req = next_approval_request(&c).await;
    let ev = c.wait_event(T, |f| f["type"] == "event").await.unwrap();
    let now = ev["data"]["expires_at"].as_i64().unwrap();
    assert_eq!(req["expires_at"].as_i64().unwrap(), now);
    let started = chrono::Utc::now().timestamp_millis();
    let left = now - started;
    assert!(
        left > 40_000 && left <= 45_000,
        "expires in ~45 s, got {left} ms"
    );
    c.answer_approval(&id, &req, "deny").await.unwrap();
    assert_error(&h.await.unwrap(), "approval_denied");
    assert!(
        !s.config_text().contains("m2"),
        "a denied update changes nothing"
    );

    s.restart().await;
    let (c, _) = s.phone("again").await;
    let cfg = c.request("get_config", json!({})).await.unwrap();
    assert_eq!(
        cfg["scheduler_check_interval_secs"], 5,
        "persisted across restart"
    );
}

#[tokio::test]
async fn invalid_updates_are_refused_before_any_prompt() {
    let s = TestServer::start().await;
    let (c, id) = s.phone("owner").await;
    let c = Arc::new(c);
    let before = s.config_text();
    let cases = [
        (
            json!({"section": "server", "value": {"listen": "0.0.0.0:1"}}),
            "forbidden",
        ),
        (
            json!({"section": "tasks", "value": {"x": 1}}),
            "invalid_request",
        ),
        (
            json!({"section": "nope", "value": {"x": 1}}),
            "invalid_request",
        ),
        (
            json!({"section": "llm", "value": {"modle": "typo"}}),
            "invalid_request",
        ),
        (json!({"section": "llm", "value": {}}), "invalid_request"),
        (
            json!({"section": "llm", "value": {"model": 5}}),
            "invalid_request",
        ),
        (
            json!({"section": "llm", "value": {"provider": ""}}),
            "invalid_request",
        ),
        (
            json!({"section": "scheduler", "value": {"check_interval_secs": 0}}),
            "invalid_request",
        ),
        (
            json!({"section": "scheduler", "value": {"check_interval_secs": 86401}}),
            "invalid_request",
        ),
        (
            json!({"section": "scheduler", "value": {"check_interval_secs": "5"}}),
            "invalid_request",
        ),
        (
            json!({"section": "scheduler", "value": {"timezone": "Nowhere/Land"}}),
            "invalid_request",
        ),
        (
            json!({"section": "scheduler", "value": {"enabled": null}}),
            "invalid_request",
        ),
        (
            json!({"section": "approvals", "value": {"timeout_secs": 0}}),
            "invalid_request",
        ),
        (
            json!({"section": "approvals", "value": {"timeout_secs": 1.5}}),
            "invalid_request",
        ),
        (
            json!({"section": "audit", "value": {"dir": ""}}),
            "invalid_request",
        ),
        (
            json!({"section": "llm", "value": "model=x"}),
            "invalid_request",
        ),
        (json!({"section": "llm"}), "invalid_request"),
        (
            json!({"section": "llm", "value": {"model": "x"}, "extra": true}),
            "invalid_request",
        ),
    ];
    for (params, code) in cases {
        let p = c.request("update_config", params.clone()).await.unwrap();
        assert_error(&p, code);
        let _ = &params;
    }
    // No approval_request was sent for any of them: the next one is for a valid update.
    let (resp, req) = update(&c, &id, "llm", json!({"model": "valid"}), "approve").await;
    assert_eq!(
        req["params"]["value"]["model"], "valid",
        "the first prompt is the valid update"
    );
    assert_eq!(resp["result"], "success");
    let after = s.config_text();
    assert_eq!(
        after.replace("model = \"valid\"", "model = \"claude-sonnet-4-5\""),
        before,
        "only the valid change landed"
    );
}

#[tokio::test]
async fn secrets_never_leave_the_server() {
    capture_logs();
    let s = TestServer::start_with_config(&format!(
        "[llm]\nprovider = \"anthropic\"\nmodel = \"m\"\napi_key = \"{SECRET}-old\"\n"
    ))
    .await;
    let (c, id) = s.phone("owner").await;
    let c = Arc::new(c);
    let mut frames = Vec::new();
    frames.push(c.request("get_config", json!({})).await.unwrap());
    let (resp, req) = update(
        &c,
        &id,
        "llm",
        json!({"api_key": SECRET, "model": "m3"}),
        "approve",
    )
    .await;
    assert_eq!(resp["result"], "success");
    // v1.1: a per-approval commitment, never the value (SPEC §8).
    let shown = req["params"]["value"]["api_key"].as_str().unwrap();
    assert!(
        shown.starts_with("[redacted:") && shown.len() == "[redacted:]".len() + 16,
        "{shown}"
    );
    assert!(req["summary"].as_str().unwrap().contains("[redacted]"));
    frames.push(req);
    frames.push(resp);
    frames.push(c.request("get_config", json!({})).await.unwrap());
    frames.push(c.jsonrpc(json!(1), "get_config", json!({})).await.unwrap());
    frames.push(c.request("list_approvals", json!({})).await.unwrap());
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), c.next_event()).await
    {
        frames.push(ev);
    }
    assert!(
        s.config_text().contains(SECRET),
        "the secret is stored where it belongs"
    );
    for f in &frames {
        assert!(
            !f.to_string().contains("TOPSECRET"),
            "secret in a frame: {f}"
        );
    }
    let audit = audit_now(&s).await;
    assert!(!audit.is_empty());
    assert!(
        !serde_json::to_string(&audit).unwrap().contains("TOPSECRET"),
        "secret in the audit log"
    );
    let logged = logged();
    assert!(
        logged.contains("configuration updated"),
        "the log was captured"
    );
    let leak: Vec<&str> = logged.lines().filter(|l| l.contains("TOPSECRET")).collect();
    assert!(leak.is_empty(), "secret in the server log: {leak:?}");
    let dbg = format!("{:?}", s.handle().state.config());
    assert!(!dbg.contains("TOPSECRET"), "secret in Debug output");
}

#[tokio::test]
async fn a_crash_at_rename_leaves_the_old_file() {
    let s = TestServer::start().await;
    let (c, id) = s.phone("owner").await;
    let c = Arc::new(c);
    let before = s.config_text();
    secrets_agent::config_file::fail_next_rename_for_tests(&s.path().join("config.toml"));
    let (resp, _) = update(&c, &id, "approvals", json!({"timeout_secs": 99}), "approve").await;
    assert_error(&resp, "internal");
    assert_eq!(s.config_text(), before, "old file intact");
    let leftovers: Vec<_> = std::fs::read_dir(s.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let live = &s.handle().state.config();
    assert_eq!(live.approvals.timeout_secs, 120, "nothing half-applied");
}

#[tokio::test]
async fn changing_the_audit_dir_starts_a_new_chain_there() {
    let s = TestServer::start().await;
    let (c, id) = s.phone("owner").await;
    let c = Arc::new(c);
    let (resp, _) = update(&c, &id, "audit", json!({"dir": "audit2"}), "approve").await;
    assert_eq!(resp["result"], "success");
    c.request("get_dashboard", json!({})).await.unwrap();
    s.handle().state.audit.flush().await;
    let new_log = std::fs::read_to_string(s.path().join("audit2/audit.jsonl")).unwrap();
    let first: Value = serde_json::from_str(new_log.lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 1);
    assert_eq!(first["prev_hash"], "0".repeat(64));
    common::assert_audit_verifies(s.path());
}
