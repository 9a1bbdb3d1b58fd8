//! The audit log fails closed (issue 10): while records cannot be written,
//! state-changing actions answer `unavailable` and do not run; the first
//! record after recovery states how many were lost; unknown action names
//! never reach the log verbatim. Real server, real sockets, real model.

mod common;

use common::{
    TestServer, assert_audit_verifies, assert_error, audit_now, next_approval_request,
    spawn_request, write_file,
};
use secrets_agent::storage::audit::jcs_digest;
use serde_json::{Value, json};

async fn server_with_plugin_and_model() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "plugins/hello/plugin.toml",
        "name = \"hello-plugin\"\nversion = \"1.0\"\nplugin_type = \"tool\"\ncapabilities = [\"greet\"]\n",
    );
    write_file(dir.path(), "config.toml", &common::model_config());
    TestServer::start_in_dir(dir).await
}

fn plugin_enabled(list: &Value) -> bool {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "hello-plugin")
        .unwrap()["enabled"]
        .as_bool()
        .unwrap()
}

#[tokio::test]
async fn an_unwritable_audit_log_refuses_changes_and_the_loss_is_recorded() {
    let s = server_with_plugin_and_model().await;
    let (c, _) = s.phone("p").await;
    let r = c
        .request(
            "create_memory",
            json!({"content": "written while the log works"}),
        )
        .await
        .unwrap();
    assert_eq!(r["result"], "memory", "{r}");
    let before = audit_now(&s).await;

    // Break the log: the audit dir becomes a regular file (works as root,
    // unlike chmod).
    let audit = s.path().join("audit");
    let moved = s.path().join("audit.moved");
    std::fs::rename(&audit, &moved).unwrap();
    std::fs::write(&audit, "not a directory").unwrap();

    for (action, params) in [
        ("create_memory", json!({"content": "must never be stored"})),
        (
            "toggle_plugin",
            json!({"name": "hello-plugin", "enabled": false}),
        ),
        (
            "update_config",
            json!({"section": "scheduler", "value": {"check_interval_secs": 7}}),
        ),
    ] {
        let r = c.request(action, params).await.unwrap();
        assert_error(&r, "unavailable");
        assert!(
            r["message"].as_str().unwrap().contains("audit log"),
            "{action}: the message says why: {r}"
        );
    }

    // Read-only actions still answer, and show that nothing changed.
    let list = c
        .request("list_memories", json!({"per_page": 100}))
        .await
        .unwrap();
    assert_eq!(list["total"], 1, "no memory was added: {list}");
    let plugins = c.request("list_plugins", json!({})).await.unwrap();
    assert!(
        plugin_enabled(&plugins),
        "the toggle did not run: {plugins}"
    );
    let approvals = c.request("list_approvals", json!({})).await.unwrap();
    assert_eq!(
        approvals["approvals"],
        json!([]),
        "no phone was asked to approve a change that could not be recorded: {approvals}"
    );
    let st = &s.handle().state;
    st.audit.flush().await;
    assert!(st.audit.health().is_failing());
    // 3 refusals + 3 reads, all recorded while the log was broken.
    assert_eq!(st.audit.health().lost(), 6);
    assert_eq!(st.config().scheduler.check_interval_secs, 30);

    // Repair: the next change runs, and the first record says what was lost.
    std::fs::remove_file(&audit).unwrap();
    std::fs::rename(&moved, &audit).unwrap();
    let r = c
        .request(
            "toggle_plugin",
            json!({"name": "hello-plugin", "enabled": false}),
        )
        .await
        .unwrap();
    assert_eq!(r["result"], "success", "{r}");
    assert!(!plugin_enabled(
        &c.request("list_plugins", json!({})).await.unwrap()
    ));
    let log = audit_now(&s).await;
    let gap = &log[before.len()];
    assert_eq!(gap["action"], "audit.lost", "{gap}");
    assert_eq!(gap["outcome"], "lost:6", "{gap}");
    assert_eq!(gap["prev_hash"], before.last().unwrap()["hash"]);
    assert_eq!(log[before.len() + 1]["action"], "toggle_plugin");
    assert_eq!(log[before.len() + 1]["outcome"], "ok");
    for (i, r) in log.iter().enumerate() {
        assert_eq!(r["seq"], (i + 1) as u64, "the chain has no hole");
    }
    assert!(!st.audit.health().is_failing());
    assert_audit_verifies(s.path());
}

#[tokio::test]
async fn unknown_action_names_never_reach_the_audit_log() {
    let s = TestServer::start().await;
    let (c, _) = s.phone("p").await;
    let name = "\u{1b}[31mHACK";
    assert_error(
        &c.request(name, json!({"x": 1})).await.unwrap(),
        "unknown_action",
    );
    let rpc = c.jsonrpc(json!(7), name, json!({})).await.unwrap();
    assert_eq!(rpc["error"]["data"]["code"], "unknown_action", "{rpc}");

    let log = audit_now(&s).await;
    let unknown: Vec<&Value> = log
        .iter()
        .filter(|r| r["action"] == "unknown_action")
        .collect();
    assert_eq!(unknown.len(), 2, "{log:?}");
    assert_eq!(unknown[0]["outcome"], "unknown_action");
    assert_eq!(
        unknown[0]["params_digest"],
        jcs_digest(&json!({"action": name, "params": {"x": 1}})),
        "the name is kept only as a digest"
    );
    for f in std::fs::read_dir(s.path().join("audit")).unwrap() {
        let raw = std::fs::read(f.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&raw);
        for needle in ["HACK", "\u{1b}", "\\u001b", "[31m"] {
            assert!(!text.contains(needle), "{needle:?} in the audit log");
        }
    }
    assert_audit_verifies(s.path());
}

#[tokio::test]
async fn an_action_approved_while_the_log_breaks_does_not_run() {
    let s = TestServer::start().await;
    let (c, id) = s.phone("p").await;
    let c = std::sync::Arc::new(c);
    let before = s.config_text();
    let h = spawn_request(
        &c,
        "update_config",
        json!({"section": "approvals", "value": {"timeout_secs": 61}}),
    );
    let req = next_approval_request(&c).await;
    // The log breaks while the phone decides.
    audit_now(&s).await;
    let audit = s.path().join("audit");
    std::fs::rename(&audit, s.path().join("audit.moved")).unwrap();
    std::fs::write(&audit, "not a directory").unwrap();
    c.answer_approval(&id, &req, "approve").await.unwrap();
    let r = h.await.unwrap();
    assert_eq!(r["code"], "unavailable", "{r}");
    assert_eq!(
        s.config_text(),
        before,
        "the approved change did not run unrecorded"
    );
}
