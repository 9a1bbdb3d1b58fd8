//! The phone's secrets actions (SPEC §10): `set_secret` (gated, `value`
//! committed), `list_secrets`, `reveal_secret` (gated; loopback or TLS
//! only), `delete_secret` (gated), refusals before asking, and
//! `get_dashboard`'s `secret_count`.

mod common;

use std::sync::Arc;

use common::{
    TestServer, answer_next, assert_error, audit_now, next_approval_request, spawn_request,
};
use mobile_client_sim::client::{self, Endpoint};
use mobile_client_sim::{ApprovalAlg, Identity};
use serde_json::json;

#[tokio::test]
async fn set_list_reveal_delete_from_the_phone() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    let phone = Arc::new(phone);
    let value = "p4ss wörd \"quoted\"";
    let set = spawn_request(
        &phone,
        "set_secret",
        json!({"name": "DB_PASS", "value": value, "description": "prod db"}),
    );
    let req = next_approval_request(&phone).await;
    assert_eq!(req["summary"], "Create secret DB_PASS");
    let shown = req["params"]["value"].as_str().unwrap();
    assert!(
        shown.starts_with("[redacted:") && shown.len() == "[redacted:]".len() + 16,
        "{req}"
    );
    // The phone checks the commitment against what it sent, with its K.
    phone.answer_approval(&pid, &req, "approve").await.unwrap();
    assert_eq!(set.await.unwrap()["message"], "Secret 'DB_PASS' created");

    let list = phone.request("list_secrets", json!({})).await.unwrap();
    assert_eq!(list["result"], "secrets");
    let meta = &list["secrets"][0];
    assert_eq!(
        (meta["name"].as_str(), meta["description"].as_str()),
        (Some("DB_PASS"), Some("prod db"))
    );
    assert_eq!(meta["release_count"], 0);
    assert!(meta["last_released_at"].is_null());
    assert!(!list.to_string().contains("wörd"));
    let dash = phone.request("get_dashboard", json!({})).await.unwrap();
    assert_eq!(dash["secret_count"], 1);

    let reveal = spawn_request(&phone, "reveal_secret", json!({"name": "DB_PASS"}));
    answer_next(&phone, &pid, "approve").await;
    assert_eq!(
        reveal.await.unwrap(),
        json!({"result": "secret", "name": "DB_PASS", "value": value})
    );

    // Refused before anything is asked.
    for (a, p, code) in [
        (
            "set_secret",
            json!({"name": "9bad", "value": "x"}),
            "invalid_request",
        ),
        (
            "set_secret",
            json!({"name": "OK", "value": ""}),
            "invalid_request",
        ),
        (
            "set_secret",
            json!({"name": "OK", "value": "a".repeat(64 * 1024 + 1)}),
            "invalid_request",
        ),
        ("set_secret", json!({"name": "OK"}), "invalid_request"),
        ("delete_secret", json!({"name": "NOPE"}), "not_found"),
        ("reveal_secret", json!({"name": "NOPE"}), "not_found"),
    ] {
        assert_error(&phone.request(a, p).await.unwrap(), code);
    }
    assert_eq!(
        phone.request("list_approvals", json!({})).await.unwrap()["approvals"],
        json!([])
    );

    let del = spawn_request(&phone, "delete_secret", json!({"name": "DB_PASS"}));
    answer_next(&phone, &pid, "approve").await;
    assert_eq!(del.await.unwrap()["result"], "success");
    assert_eq!(
        phone.request("list_secrets", json!({})).await.unwrap()["secrets"],
        json!([])
    );
    assert_eq!(
        phone.request("get_dashboard", json!({})).await.unwrap()["secret_count"],
        0
    );

    let log = audit_now(&s).await;
    for a in ["secret.set", "secret.revealed", "secret.deleted"] {
        let r = log
            .iter()
            .find(|r| r["action"] == a)
            .unwrap_or_else(|| panic!("{a}"));
        assert_eq!(r["names"], json!(["DB_PASS"]));
        assert!(r["approval_id"].as_str().unwrap().starts_with("apr_"));
    }
    assert!(!serde_json::to_string(&log).unwrap().contains("wörd"));
    common::assert_audit_verifies(s.path());
}

/// This machine's address on its default route (not loopback).
fn lan_ip() -> std::net::IpAddr {
    let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    u.connect("10.255.255.1:9").expect("a default route");
    let ip = u.local_addr().unwrap().ip();
    assert!(!ip.is_loopback(), "needs a non-loopback interface");
    ip
}

#[tokio::test]
async fn reveal_is_forbidden_off_loopback_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[server]\nallow_insecure = true\n",
    )
    .unwrap();
    let h = secrets_agent::start(secrets_agent::Options {
        data_dir: dir.path().to_path_buf(),
        listen: Some("0.0.0.0:0".into()),
        print_pairing_code: false,
    })
    .await
    .unwrap();
    let url = format!("ws://{}:{}/ws", lan_ip(), h.addr.port());
    let st = &h.state;
    let code = secrets_agent::auth::pairing::create_offer(
        &st.db,
        st.clock.now_ms(),
        300,
        &st.key,
        url.clone(),
    )
    .unwrap()
    .code;
    let mut id = Identity::generate("far phone", ApprovalAlg::Ed25519);
    let (phone, _) = client::pair(
        &Endpoint::new(url),
        &mut id,
        &code,
        Some(st.key.public_b64()),
    )
    .await
    .unwrap();
    st.secrets
        .set(
            "A",
            secrets_agent::secrets::SecretValue::new("a".into()),
            None,
        )
        .await
        .unwrap();
    let r = phone
        .request("reveal_secret", json!({"name": "A"}))
        .await
        .unwrap();
    assert_error(&r, "forbidden");
    assert_eq!(
        phone.request("list_approvals", json!({})).await.unwrap()["approvals"],
        json!([]),
        "nothing asked"
    );
    h.shutdown().await;
}

/// A copy of a device's session key (not its approval key) asks for
/// `reveal_secret` from another connection as the same device: the owner's
/// phone sees a request from its own device id, but its approval is
/// refused (`forbidden`), because the value would go to the session that
/// asked. The request stays pending; the phone's deny ends it, and the
/// copy never receives the value. The value leaves only to the session
/// that both asked and approved.
#[tokio::test]
async fn a_copied_session_cannot_have_the_phone_approve_a_reveal_for_it() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    s.set_secret("GITHUB_TOKEN", "ghp_not_for_the_copy").await;
    let (copy, _) = s.connect(&pid).await;
    let copy = Arc::new(copy);
    let reveal = spawn_request(&copy, "reveal_secret", json!({"name": "GITHUB_TOKEN"}));
    let req = next_approval_request(&phone).await;
    assert_eq!(req["origin_device_id"], pid.device_id().as_str());
    phone.answer_approval(&pid, &req, "approve").await.unwrap();
    let err = phone
        .wait_event(std::time::Duration::from_secs(10), |f| f["type"] == "error")
        .await
        .unwrap();
    assert_eq!(
        (err["code"].as_str(), err["approval_id"].as_str()),
        (Some("forbidden"), req["approval_id"].as_str())
    );
    // Still pending; the phone may deny it.
    let listed = phone.request("list_approvals", json!({})).await.unwrap();
    assert_eq!(listed["approvals"].as_array().unwrap().len(), 1, "{listed}");
    phone.answer_approval(&pid, &req, "deny").await.unwrap();
    let answer = reveal.await.unwrap();
    assert_error(&answer, "approval_denied");
    assert!(!answer.to_string().contains("ghp_not_for_the_copy"));
    let log = audit_now(&s).await;
    assert!(!log.iter().any(|r| r["action"] == "secret.revealed"));
    assert!(
        log.iter()
            .any(|r| r["action"] == "approval.response" && r["outcome"] == "forbidden")
    );
    // The session that asks and approves gets it.
    let phone = Arc::new(phone);
    let mine = spawn_request(&phone, "reveal_secret", json!({"name": "GITHUB_TOKEN"}));
    answer_next(&phone, &pid, "approve").await;
    assert_eq!(mine.await.unwrap()["value"], "ghp_not_for_the_copy");
}
