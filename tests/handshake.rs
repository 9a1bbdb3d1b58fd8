//! Pairing, authentication and their failures (SPEC §4), over real sockets.

mod common;

use std::time::Duration;

use common::{
    TestServer, assert_error, auth_frame, challenge, expect_refused, pair_frame, pairing_code,
    write_tls_setup,
};
use mobile_client_sim::client::{self, ClientError, Endpoint};
use mobile_client_sim::{ApprovalAlg, Identity, Incoming, RawConn, proto};
use serde_json::{Value, json};

/// A raw connection that has sent a `pair` frame for `id` with `code`.
async fn pair_raw(s: &TestServer, id: &Identity, code: &str) -> RawConn {
    let mut c = s.raw().await;
    let (key, nonce, _) = challenge(&mut c).await;
    c.send_json(&pair_frame(id, &key, &nonce, code))
        .await
        .unwrap();
    c
}

#[tokio::test]
async fn pair_then_auth_with_mutual_verification() {
    let s = TestServer::start().await;
    let mut id = Identity::generate("Pixel", ApprovalAlg::Ed25519);
    let (c, conn) = client::pair(&s.endpoint(), &mut id, &s.code(), Some(&s.server_key()))
        .await
        .unwrap();
    assert_eq!(conn.device_id, id.device_id());
    assert_eq!(conn.device_id.len(), 32);
    assert_eq!(id.pinned.as_ref().unwrap().server_key, s.server_key());
    // The paired connection is authenticated at once.
    let d = c.request("get_dashboard", json!({})).await.unwrap();
    assert_eq!(d["result"], "dashboard");
    assert_eq!(d["connected_devices"], 1);

    let (c2, conn2) = client::auth(&s.endpoint(), &id).await.unwrap();
    assert_ne!(
        conn2.session_id, conn.session_id,
        "a device may hold several sessions"
    );
    let devs = c2.request("list_devices", json!({})).await.unwrap();
    assert_eq!(devs["devices"][0]["device_name"], "Pixel");
    assert_eq!(devs["devices"][0]["approval_key_alg"], "ed25519");
    assert_eq!(devs["devices"][0]["revoked"], false);
}

#[tokio::test]
async fn client_refuses_a_server_whose_key_is_not_the_pinned_one() {
    let s = TestServer::start().await;
    let mut id = Identity::generate("p", ApprovalAlg::Ed25519);
    let other_key = proto::b64(&[9u8; 32]);
    let err = client::pair(&s.endpoint(), &mut id, &s.code(), Some(&other_key))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ClientError::ServerKeyMismatch { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn the_code_is_single_use() {
    let s = TestServer::start().await;
    let code = s.code();
    let mut c = pair_raw(&s, &Identity::generate("a", ApprovalAlg::Ed25519), &code).await;
    assert_eq!(c.recv_frame().await.unwrap()["type"], "pair_ok");
    let mut c = pair_raw(&s, &Identity::generate("b", ApprovalAlg::Ed25519), &code).await;
    expect_refused(&mut c, "invalid_code").await;
}

#[tokio::test]
async fn five_wrong_codes_burn_the_live_code() {
    let s = TestServer::start().await;
    let code = s.code();
    for _ in 0..5 {
        let mut c = pair_raw(
            &s,
            &Identity::generate("x", ApprovalAlg::Ed25519),
            "ZZZZ-ZZZZ",
        )
        .await;
        expect_refused(&mut c, "invalid_code").await;
    }
    let mut c = pair_raw(
        &s,
        &Identity::generate("owner", ApprovalAlg::Ed25519),
        &code,
    )
    .await;
    expect_refused(&mut c, "invalid_code").await;
    // A new code made afterwards works.
    let mut c = pair_raw(
        &s,
        &Identity::generate("owner", ApprovalAlg::Ed25519),
        &s.code(),
    )
    .await;
    assert_eq!(c.recv_frame().await.unwrap()["type"], "pair_ok");
}

#[tokio::test]
async fn right_code_with_a_bad_signature_counts_as_a_failure() {
    let s = TestServer::start().await;
    let code = s.code();
    for _ in 0..5 {
        let mut c = s.raw().await;
        let (key, nonce, _) = challenge(&mut c).await;
        let mut f = pair_frame(
            &Identity::generate("x", ApprovalAlg::Ed25519),
            &key,
            &nonce,
            &code,
        );
        f["approval_signature"] = f["signature"].clone(); // signed by the wrong key
        c.send_json(&f).await.unwrap();
        expect_refused(&mut c, "bad_signature").await;
    }
    let mut c = pair_raw(
        &s,
        &Identity::generate("owner", ApprovalAlg::Ed25519),
        &code,
    )
    .await;
    expect_refused(&mut c, "invalid_code").await;
}

#[tokio::test(start_paused = true)]
async fn an_expired_code_fails() {
    let s = TestServer::start().await;
    let code = s.code_with_ttl(300);
    tokio::time::advance(Duration::from_secs(301)).await;
    let mut c = pair_raw(&s, &Identity::generate("late", ApprovalAlg::Ed25519), &code).await;
    expect_refused(&mut c, "invalid_code").await;
}

#[tokio::test]
async fn auth_failures_each_get_their_code_and_4401() {
    let s = TestServer::start().await;
    let (_c, id) = s.phone("phone").await;

    // Bad signature: signed by another key.
    let mut c = s.raw().await;
    let (key, nonce, ts) = challenge(&mut c).await;
    let mut f = auth_frame(&id, &key, &nonce, ts);
    let other = Identity::generate("o", ApprovalAlg::Ed25519);
    f["signature"] = json!(other.sign_device("whatever"));
    c.send_json(&f).await.unwrap();
    expect_refused(&mut c, "bad_signature").await;

    // A nonce issued on another connection.
    let mut a = s.raw().await;
    let (_, nonce_a, ts_a) = challenge(&mut a).await;
    let mut b = s.raw().await;
    let _ = challenge(&mut b).await;
    b.send_json(&auth_frame(&id, &key, &nonce_a, ts_a))
        .await
        .unwrap();
    expect_refused(&mut b, "bad_nonce").await;

    // The right nonce with another ts.
    let mut c = s.raw().await;
    let (_, nonce, ts) = challenge(&mut c).await;
    c.send_json(&auth_frame(&id, &key, &nonce, ts + 1))
        .await
        .unwrap();
    expect_refused(&mut c, "bad_nonce").await;

    // Unknown device.
    let mut c = s.raw().await;
    let (_, nonce, ts) = challenge(&mut c).await;
    c.send_json(&auth_frame(&other, &key, &nonce, ts))
        .await
        .unwrap();
    expect_refused(&mut c, "unknown_device").await;

    // An admin frame before authentication.
    let mut c = s.raw().await;
    let _ = challenge(&mut c).await;
    c.send_json(
        &json!({"type": "admin", "request_id": "1", "payload": {"action": "get_dashboard"}}),
    )
    .await
    .unwrap();
    expect_refused(&mut c, "unauthenticated").await;

    // Unsupported protocol version.
    let mut c = s.raw().await;
    let (_, nonce, ts) = challenge(&mut c).await;
    let mut f = auth_frame(&id, &key, &nonce, ts);
    f["protocol"] = json!(2);
    c.send_json(&f).await.unwrap();
    expect_refused(&mut c, "unsupported_protocol").await;

    // Garbage.
    let mut c = s.raw().await;
    let _ = challenge(&mut c).await;
    c.send_text("{not json").await.unwrap();
    expect_refused(&mut c, "invalid_request").await;

    // And the device still authenticates.
    let (c, _) = s.connect(&id).await;
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
}

#[tokio::test]
async fn a_revoked_device_is_refused_and_can_pair_again() {
    let s = TestServer::start().await;
    let (c, mut id) = s.phone("old phone").await;
    let dev = id.device_id();
    s.handle()
        .state
        .db
        .blocking(|c| secrets_agent::storage::devices::revoke_device(c, &dev))
        .unwrap();
    // The CLI path: the watcher closes live sessions with 4403 within 5 s.
    let closed = tokio::time::timeout(Duration::from_secs(5), c.closed())
        .await
        .expect("closed within 5 s");
    assert_eq!(closed.unwrap().0, 4403);

    let mut r = s.raw().await;
    let (key, nonce, ts) = challenge(&mut r).await;
    r.send_json(&auth_frame(&id, &key, &nonce, ts))
        .await
        .unwrap();
    expect_refused(&mut r, "revoked").await;

    // Pairing the same key again with a valid code re-activates it, with the new name.
    id.device_name = "same phone, new name".into();
    let (c, conn) = client::pair(&s.endpoint(), &mut id, &s.code(), None)
        .await
        .unwrap();
    assert_eq!(conn.device_id, dev);
    let devs = c.request("list_devices", json!({})).await.unwrap();
    assert_eq!(devs["devices"].as_array().unwrap().len(), 1);
    assert_eq!(devs["devices"][0]["device_name"], "same phone, new name");
    assert_eq!(devs["devices"][0]["revoked"], false);
}

#[tokio::test(start_paused = true)]
async fn silence_closes_with_4408() {
    let s = TestServer::start().await;
    let mut c = s.raw().await;
    let _ = challenge(&mut c).await;
    match c.recv().await {
        Incoming::Closed(Some((code, _))) => assert_eq!(code, 4408),
        other => panic!("expected close 4408, got {other:?}"),
    }
}

#[tokio::test]
async fn es256_approval_key_pairs() {
    let s = TestServer::start().await;
    let (c, _) = s.phone_with("iPhone", ApprovalAlg::Es256).await;
    let devs = c.request("list_devices", json!({})).await.unwrap();
    assert_eq!(devs["devices"][0]["approval_key_alg"], "es256");
}

#[tokio::test]
async fn malformed_pair_fields_are_invalid_request() {
    let s = TestServer::start().await;
    let id = Identity::generate("x", ApprovalAlg::Ed25519);
    for mutate in [
        |f: &mut Value| f["approval_key_alg"] = json!("rsa"),
        |f: &mut Value| f["device_public_key"] = json!("!!"),
        |f: &mut Value| f["client_nonce"] = json!("AAAA"),
        |f: &mut Value| f["device_name"] = json!(""),
    ] {
        let mut c = s.raw().await;
        let (key, nonce, _) = challenge(&mut c).await;
        let mut f = pair_frame(&id, &key, &nonce, &s.code());
        mutate(&mut f);
        c.send_json(&f).await.unwrap();
        expect_refused(&mut c, "invalid_request").await;
    }
}

#[tokio::test]
async fn failed_handshakes_are_rate_limited_per_address() {
    let s = TestServer::start_with_config("[server]\nauth_failures_per_minute = 3\n").await;
    let (_c, id) = s.phone("owner").await;
    let bad: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    for _ in 0..4 {
        let mut c = s.raw_from(bad).await;
        let _ = challenge(&mut c).await;
        c.send_text("garbage").await.unwrap();
        expect_refused(&mut c, "invalid_request").await;
    }
    let mut c = s.raw_from(bad).await;
    let (key, nonce, ts) = challenge(&mut c).await;
    c.send_json(&auth_frame(&id, &key, &nonce, ts))
        .await
        .unwrap();
    let f = c.recv_frame().await.unwrap();
    assert_eq!(f["code"], "rate_limited", "{f}");
    let retry = f["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry > 0 && retry <= 60_000, "{retry}");
    assert_eq!(c.closed().await.unwrap().0, 4401);

    // A clean address is not affected.
    let mut ep = Endpoint::new(s.url.clone());
    ep.from = Some("127.0.0.3".parse().unwrap());
    let (c, _) = client::auth(&ep, &id).await.unwrap();
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
}

#[tokio::test]
async fn failed_pairings_from_everyone_close_pairing_but_not_auth() {
    let s = TestServer::start_with_config("[server]\npair_failures_per_minute = 3\n").await;
    let (_c, id) = s.phone("owner").await;
    for i in 2..5 {
        let mut c = s.raw_from(format!("127.0.0.{i}").parse().unwrap()).await;
        let (key, nonce, _) = challenge(&mut c).await;
        c.send_json(&pair_frame(
            &Identity::generate("x", ApprovalAlg::Ed25519),
            &key,
            &nonce,
            "WRNG-CODE",
        ))
        .await
        .unwrap();
        expect_refused(&mut c, "invalid_code").await;
    }
    let code = s.code();
    let mut c = s.raw_from("127.0.0.9".parse().unwrap()).await;
    let (key, nonce, _) = challenge(&mut c).await;
    c.send_json(&pair_frame(
        &Identity::generate("new", ApprovalAlg::Ed25519),
        &key,
        &nonce,
        &code,
    ))
    .await
    .unwrap();
    let f = c.recv_frame().await.unwrap();
    assert_eq!(f["code"], "rate_limited", "{f}");
    assert!(f["retry_after_ms"].as_u64().is_some());
    let (c, _) = s.connect(&id).await;
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
}

#[tokio::test]
async fn other_http_paths_answer_404() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let addr = s.handle().addr;
    let mut t = tokio::net::TcpStream::connect(addr).await.unwrap();
    t.write_all(b"GET /other HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    t.read_to_string(&mut buf).await.unwrap();
    assert!(buf.starts_with("HTTP/1.1 404"), "{buf}");
    let mut t = tokio::net::TcpStream::connect(addr).await.unwrap();
    t.write_all(b"GET /ws HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    t.read_to_string(&mut buf).await.unwrap();
    assert!(
        buf.starts_with("HTTP/1.1 426"),
        "a plain GET on /ws is told to upgrade: {buf}"
    );
}

#[tokio::test]
async fn non_loopback_without_tls_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = secrets_agent::start(secrets_agent::Options {
        data_dir: dir.path().into(),
        listen: Some("0.0.0.0:0".into()),
        print_pairing_code: false,
    })
    .await
    .err()
    .unwrap();
    assert!(err.to_string().contains("without TLS"), "{err}");
}

#[tokio::test]
async fn wss_with_a_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    write_tls_setup(dir.path());
    let h = common::start_in(dir.path()).await;
    assert!(h.url.starts_with("wss://"), "{}", h.url);
    let code = pairing_code(&h, 60, &h.url);
    let url = format!("wss://localhost:{}/ws", h.addr.port());
    let mut ep = Endpoint::new(url);
    ep.ca = Some(dir.path().join("cert.pem"));
    let mut id = Identity::generate("tls phone", ApprovalAlg::Ed25519);
    let (c, _) = client::pair(&ep, &mut id, &code, None).await.unwrap();
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
    assert_error(
        &c.request("nope", json!({})).await.unwrap(),
        "unknown_action",
    );
    h.shutdown().await;
}

/// `last_seen` is written off the handshake path (in batches, within a
/// second) but `list_devices` shows it at once, and it is on disk after a
/// clean stop: nothing noted is lost.
#[tokio::test]
async fn last_seen_is_shown_at_once_and_kept_across_a_restart() {
    let mut s = TestServer::start().await;
    let (_c, id) = s.phone("seen").await;
    let device = id.device_id();
    let (c1, _) = s.connect(&id).await;
    let before = c1.request("list_devices", json!({})).await.unwrap();
    let seen = |v: &Value| -> String {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == device.as_str())
            .unwrap()["last_seen"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = seen(&before);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // A new handshake moves it, and the very next list shows the new time.
    let (c2, _) = s.connect(&id).await;
    let second = seen(&c2.request("list_devices", json!({})).await.unwrap());
    assert!(second > first, "{second} after {first}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (_c3, _) = s.connect(&id).await;
    // A clean stop writes what was noted, without any list first.
    s.stop().await;
    let db = rusqlite::Connection::open(s.path().join("agent.db")).unwrap();
    let stored: i64 = db
        .query_row(
            "SELECT last_seen FROM devices WHERE device_id = ?1",
            [device.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    let second_ms = chrono::DateTime::parse_from_rfc3339(&second)
        .unwrap()
        .timestamp_millis();
    assert!(stored > second_ms, "{stored} after {second_ms}");
}
