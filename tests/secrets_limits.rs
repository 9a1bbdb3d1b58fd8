//! Local approvals (socket and tasks) count together against a cap of 16
//! pending (SPEC §10), within the 128 in all; beyond: `busy`, nothing asked.

mod common;
mod secrets_support;

use common::{TestServer, next_approval_request, spawn_request};
use secrets_support::*;
use serde_json::json;

#[tokio::test]
async fn at_most_16_local_approvals_pend() {
    let s = TestServer::start().await;
    let (phone, _pid) = s.phone("owner").await;
    s.set_secret("A", "a").await;
    let mut waiting = Vec::new();
    for i in 0..16 {
        waiting.push(spawn_sock(
            s.path(),
            release_req(&["A"], &format!("r{i}"), 0),
        ));
        next_approval_request(&phone).await;
    }
    let lines = sock(s.path(), release_req(&["A"], "r16", 0)).await;
    let last = lines.last().unwrap();
    assert_eq!(last["code"], "busy", "{last}");
    assert!(last["message"].as_str().unwrap().contains("(16)"));
    let pending = phone.request("list_approvals", json!({})).await.unwrap();
    assert_eq!(pending["approvals"].as_array().unwrap().len(), 16);
    // A phone's own gated request still has room (the 128 in all).
    let phone = std::sync::Arc::new(phone);
    let upd = spawn_request(
        &phone,
        "update_config",
        json!({"section": "approvals", "value": {"timeout_secs": 60}}),
    );
    let req = next_approval_request(&phone).await;
    assert_eq!(req["action"], "update_config");
    upd.abort();
    for w in waiting {
        w.abort();
    }
}
