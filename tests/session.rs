//! Admin envelopes and JSON-RPC over one authenticated session (SPEC §5).

mod common;

use std::collections::HashSet;

use common::{TestServer, assert_error, recv_until};
use mobile_client_sim::Incoming;
use serde_json::{Value, json};

fn admin(rid: &str, action: &str) -> Value {
    json!({"type": "admin", "request_id": rid, "payload": {"action": action}})
}

#[tokio::test]
async fn a_hundred_concurrent_requests_each_answered_once() {
    let s = TestServer::start_with_config("[server]\nmax_in_flight = 128\n").await;
    let (mut r, _) = s.raw_session("raw").await;
    for i in 0..100 {
        let action = if i % 2 == 0 {
            "get_dashboard"
        } else {
            "list_devices"
        };
        r.send_json(&admin(&format!("q{i}"), action)).await.unwrap();
    }
    let mut seen = HashSet::new();
    while seen.len() < 100 {
        let f = r.recv_frame().await.unwrap();
        assert_eq!(f["type"], "admin_response", "{f}");
        let rid = f["request_id"].as_str().unwrap().to_string();
        let i: usize = rid[1..].parse().unwrap();
        let want = if i.is_multiple_of(2) {
            "dashboard"
        } else {
            "devices"
        };
        assert_eq!(
            f["payload"]["result"], want,
            "response matches its request: {f}"
        );
        assert!(seen.insert(rid), "answered twice: {f}");
    }
    // Nothing more arrives: the next frame answers a new request.
    r.send_json(&admin("last", "get_dashboard")).await.unwrap();
    assert_eq!(r.recv_frame().await.unwrap()["request_id"], "last");
}

#[tokio::test]
async fn in_flight_cap_and_duplicate_ids() {
    let s = TestServer::start_with_config("[server]\nmax_in_flight = 2\n").await;
    let (mut r, id) = s.raw_session("raw").await;
    // Another device to revoke: the target of a revocation cannot decide it
    // (SPEC §8 Limits, v1.1), and this session decides below.
    let dev = s.phone("target").await.1.device_id();
    // Gated requests stay in flight until decided.
    let revoke = |rid: &str| json!({"type": "admin", "request_id": rid, "payload": {"action": "revoke_device", "device_id": dev}});
    r.send_json(&revoke("g1")).await.unwrap();
    let req1 = recv_until(&mut r, |f| f["type"] == "approval_request").await;
    r.send_json(&revoke("g1")).await.unwrap();
    let dup = recv_until(&mut r, |f| f["type"] == "admin_response").await;
    assert_eq!(dup["request_id"], "g1");
    assert_error(&dup["payload"], "duplicate_request_id");
    r.send_json(&revoke("g2")).await.unwrap();
    let _ = recv_until(&mut r, |f| {
        f["type"] == "approval_request" && f["request_id"] == "g2"
    })
    .await;
    r.send_json(&admin("x", "get_dashboard")).await.unwrap();
    let busy = recv_until(&mut r, |f| f["type"] == "admin_response").await;
    assert_eq!(busy["request_id"], "x");
    assert_error(&busy["payload"], "busy");
    assert!(busy["payload"]["retry_after_ms"].as_u64().is_some());
    // The first g1 goes on: deny it and it gets its one answer.
    r.send_json(&mobile_client_sim::client::approval_response(
        &id, &req1, "deny",
    ))
    .await
    .unwrap();
    let done = recv_until(&mut r, |f| f["type"] == "admin_response").await;
    assert_eq!(done["request_id"], "g1");
    assert_error(&done["payload"], "approval_denied");
    // Room again.
    r.send_json(&admin("y", "get_dashboard")).await.unwrap();
    let ok = recv_until(&mut r, |f| f["type"] == "admin_response").await;
    assert_eq!(ok["payload"]["result"], "dashboard");
}

#[tokio::test]
async fn malformed_frames_are_answered_and_the_session_goes_on() {
    let s = TestServer::start().await;
    let (mut r, _) = s.raw_session("raw").await;
    let cases: Vec<(String, &str)> = vec![
        ("{oops".into(), "invalid_json"),
        ("[1,2".into(), "invalid_json"),
        ("42".into(), "invalid_request"),
        (r#"{"type":"admin","payload":{"action":"get_dashboard"}}"#.into(), "invalid_request"),
        (r#"{"type":"admin","request_id":"","payload":{"action":"get_dashboard"}}"#.into(), "invalid_request"),
        (r#"{"type":"admin","request_id":7,"payload":{"action":"get_dashboard"}}"#.into(), "invalid_request"),
        (json!({"type": "admin", "request_id": "x".repeat(129), "payload": {"action": "get_dashboard"}}).to_string(), "invalid_request"),
        (r#"{"type":"teleport","request_id":"1"}"#.into(), "invalid_request"),
        (r#"{"request_id":"1"}"#.into(), "invalid_request"),
    ];
    for (frame, code) in cases {
        r.send_text(frame.clone()).await.unwrap();
        let f = r.recv_frame().await.unwrap();
        assert_eq!(f["type"], "error", "{frame} -> {f}");
        assert_eq!(f["code"], code, "{frame} -> {f}");
    }
    r.send_binary(vec![1, 2, 3]).await.unwrap();
    let f = r.recv_frame().await.unwrap();
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str()),
        (Some("error"), Some("invalid_request"))
    );
    // 128 characters is allowed.
    let long = "é".repeat(128);
    r.send_json(&admin(&long, "get_dashboard")).await.unwrap();
    assert_eq!(r.recv_frame().await.unwrap()["request_id"], long.as_str());
}

#[tokio::test]
async fn envelope_level_errors() {
    let s = TestServer::start().await;
    let (c, _) = s.phone("p").await;
    assert_error(
        &c.request("no_such_action", json!({})).await.unwrap(),
        "unknown_action",
    );
    assert_error(
        &c.request("get_dashboard", json!({"surprise": 1}))
            .await
            .unwrap(),
        "invalid_request",
    );
    assert_error(
        &c.request("revoke_device", json!({})).await.unwrap(),
        "invalid_request",
    );
    assert_error(
        &c.request("revoke_device", json!({"device_id": 5}))
            .await
            .unwrap(),
        "invalid_request",
    );
    assert_error(
        &c.request("revoke_device", json!({"device_id": "nope"}))
            .await
            .unwrap(),
        "not_found",
    );
    c.send_raw(r#"{"type":"admin","request_id":"p","payload":"get_dashboard"}"#)
        .await
        .unwrap();
    let f = c
        .wait_event(std::time::Duration::from_secs(5), |_| true)
        .await
        .unwrap();
    assert_error(&f["payload"], "invalid_request");
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let s = TestServer::start_with_config("[server]\nmax_frame_bytes = 4096\n").await;
    let (mut r, _) = s.raw_session("raw").await;
    r.send_json(&json!({"type": "admin", "request_id": "big", "payload": {"action": "get_dashboard", "pad": "x".repeat(5000)}}))
        .await
        .unwrap();
    match r.recv().await {
        Incoming::Closed(Some((code, _))) => assert_eq!(code, 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test]
async fn json_rpc_and_envelope_share_the_registry() {
    let s = TestServer::start().await;
    let (c, _) = s.phone("p").await;
    let env = c.request("get_config", json!({})).await.unwrap();
    let rpc = c.jsonrpc(json!(1), "get_config", json!({})).await.unwrap();
    assert_eq!(rpc["jsonrpc"], "2.0");
    assert_eq!(rpc["id"], 1);
    assert_eq!(rpc["result"], env, "same payload through both codecs");
    let env = c.request("get_dashboard", json!({})).await.unwrap();
    let rpc = c
        .jsonrpc(json!("s-1"), "get_dashboard", json!({}))
        .await
        .unwrap();
    assert_eq!(rpc["result"], env);

    let e = c
        .jsonrpc(json!(2), "no_such_action", json!({}))
        .await
        .unwrap();
    assert_eq!(e["error"]["code"], -32601);
    assert_eq!(e["error"]["data"]["code"], "unknown_action");
    let e = c
        .jsonrpc(json!(3), "get_dashboard", json!({"x": 1}))
        .await
        .unwrap();
    assert_eq!(e["error"]["code"], -32602);
    assert_eq!(e["error"]["data"]["code"], "invalid_request");
    let e = c
        .jsonrpc(json!(4), "revoke_device", json!({"device_id": "nope"}))
        .await
        .unwrap();
    assert_eq!(e["error"]["code"], -32000);
    assert_eq!(e["error"]["data"]["code"], "not_found");

    // A batch and a malformed object: -32600 with data.code invalid_request.
    c.send_raw(r#"[{"jsonrpc":"2.0","id":9,"method":"get_dashboard"}]"#)
        .await
        .unwrap();
    let f = c
        .wait_event(std::time::Duration::from_secs(5), |_| true)
        .await
        .unwrap();
    assert_eq!(f["error"]["code"], -32600, "{f}");
    assert_eq!(f["error"]["data"]["code"], "invalid_request");
    assert_eq!(f["id"], Value::Null);
    c.send_raw(r#"{"jsonrpc":"1.0","id":10,"method":"get_dashboard"}"#)
        .await
        .unwrap();
    let f = c
        .wait_event(std::time::Duration::from_secs(5), |_| true)
        .await
        .unwrap();
    assert_eq!(f["error"]["code"], -32600, "{f}");

    // A notification runs nothing and gets no reply: the next frame answers id 11.
    c.send_raw(r#"{"jsonrpc":"2.0","method":"get_dashboard"}"#)
        .await
        .unwrap();
    let r = c
        .jsonrpc(json!(11), "list_devices", json!({}))
        .await
        .unwrap();
    assert_eq!(r["result"]["result"], "devices");
    let audit = common::audit_now(&s).await;
    let dashboards = audit
        .iter()
        .filter(|r| r["action"] == "get_dashboard" && r["outcome"] == "ok")
        .count();
    assert_eq!(dashboards, 2, "the notification was not executed");
}

#[tokio::test]
async fn get_config_shows_the_sanitized_fields_only() {
    let s = TestServer::start_with_config(
        "[llm]\nprovider = \"openai\"\nmodel = \"gpt-x\"\napi_key = \"sk-very-secret-123\"\n",
    )
    .await;
    let (c, _) = s.phone("p").await;
    let cfg = c.request("get_config", json!({})).await.unwrap();
    let keys: HashSet<_> = cfg.as_object().unwrap().keys().cloned().collect();
    let want: HashSet<_> = [
        "result",
        "llm_provider",
        "llm_model",
        "scheduler_enabled",
        "scheduler_check_interval_secs",
        "audit_dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(keys, want);
    assert_eq!(cfg["result"], "config");
    assert_eq!(cfg["llm_provider"], "openai");
    assert!(!cfg.to_string().contains("sk-very-secret"));
}
