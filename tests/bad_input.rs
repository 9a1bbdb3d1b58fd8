//! The bad-input catalogue (issue 7): one test per row. Each asserts the
//! clear error and that the session and the data survive.

mod common;

use std::time::Duration;

use common::TestServer;
use mobile_client_sim::{Incoming, RawConn};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An authenticated raw session and the device's id.
async fn session(s: &TestServer) -> (RawConn, String) {
    let (r, id) = s.raw_session("catalogue").await;
    (r, id.device_id())
}

/// The session still answers, and the paired device is still there.
async fn survives(r: &mut RawConn, device: &str) {
    r.send_json(
        &json!({"type": "admin", "request_id": "alive", "payload": {"action": "list_devices"}}),
    )
    .await
    .unwrap();
    loop {
        let f = r.recv_frame().await.expect("the session survives");
        if f["request_id"] == "alive" {
            let devices = f["payload"]["devices"].as_array().unwrap();
            assert!(
                devices.iter().any(|x| x["device_id"] == device),
                "data intact: {f}"
            );
            return;
        }
    }
}

async fn expect_error_frame(r: &mut RawConn, text: &str, code: &str) {
    r.send_text(text.to_string()).await.unwrap();
    let f = r.recv_frame().await.unwrap();
    assert_eq!(f["type"], "error", "{text:.80} -> {f}");
    assert_eq!(f["code"], code, "{text:.80} -> {f}");
    assert!(!f["message"].as_str().unwrap().is_empty());
}

async fn expect_admin_error(r: &mut RawConn, payload: Value, code: &str) {
    r.send_json(&json!({"type": "admin", "request_id": "row", "payload": payload}))
        .await
        .unwrap();
    let f = r.recv_frame().await.unwrap();
    assert_eq!(f["request_id"], "row", "{f}");
    assert_eq!(f["payload"]["result"], "error", "{f}");
    assert_eq!(f["payload"]["code"], code, "{f}");
}

#[tokio::test]
async fn non_json() {
    let s = TestServer::start().await;
    let (mut r, d) = session(&s).await;
    expect_error_frame(&mut r, "hello", "invalid_json").await;
    expect_error_frame(&mut r, "{\"type\":", "invalid_json").await;
    expect_error_frame(&mut r, "\u{feff}{}", "invalid_json").await;
    survives(&mut r, &d).await;
}

#[tokio::test]
async fn json_that_is_not_an_object() {
    let s = TestServer::start().await;
    let (mut r, d) = session(&s).await;
    for t in ["42", "\"admin\"", "null", "true"] {
        expect_error_frame(&mut r, t, "invalid_request").await;
    }
    survives(&mut r, &d).await;
}

#[tokio::test]
async fn binary_frame() {
    let s = TestServer::start().await;
    let (mut r, d) = session(&s).await;
    r.send_binary(
        br#"{"type":"admin","request_id":"b","payload":{"action":"get_dashboard"}}"#.to_vec(),
    )
    .await
    .unwrap();
    let f = r.recv_frame().await.unwrap();
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str()),
        (Some("error"), Some("invalid_request"))
    );
    survives(&mut r, &d).await;
}

#[tokio::test]
async fn missing_empty_or_huge_request_id() {
    let s = TestServer::start().await;
    let (mut r, d) = session(&s).await;
    let huge = "r".repeat(100_000);
    for rid in [
        None,
        Some(json!("")),
        Some(json!(huge)),
        Some(json!(12)),
        Some(json!(null)),
        Some(json!(["a"])),
    ] {
        let mut f = json!({"type": "admin", "payload": {"action": "get_dashboard"}});
        if let Some(rid) = rid {
            f["request_id"] = rid;
        }
        expect_error_frame(&mut r, &f.to_string(), "invalid_request").await;
    }
    survives(&mut r, &d).await;
}

#[tokio::test]
async fn unknown_type() {
    let s = TestServer::start().await;
    let (mut r, d) = session(&s).await;
    expect_error_frame(
        &mut r,
        r#"{"type":"subscribe","request_id":"1"}"#,
        "invalid_request",
    )
    .await;
    expect_error_frame(&mut r, r#"{"type":7}"#, "invalid_request").await;
    survives(&mut r, &d).await;
}

#[tokio::test]
async fn unknown_action() {
    let s = TestServer::start().await;
    let (mut r, d) = session(&s).await;
    expect_admin_error(&mut r, json!({"action": "drop_database"}), "unknown_action").await;
    expect_admin_error(&mut r, json!({"action": 5}), "invalid_request").await;
    expect_admin_error(&mut r, json!({}), "invalid_request").await;
    survives(&mut r, &d).await;
}

#[tokio::test]
async fn missing_mistyped_and_extra_params() {
    let s = TestServer::start().await;
    let (mut r, d) = session(&s).await;
    expect_admin_error(
        &mut r,
        json!({"action": "toggle_plugin", "enabled": true}),
        "invalid_request",
    )
    .await;
    expect_admin_error(
        &mut r,
        json!({"action": "toggle_plugin", "name": 1, "enabled": true}),
        "invalid_request",
    )
    .await;
    expect_admin_error(
        &mut r,
        json!({"action": "toggle_plugin", "name": "x", "enabled": "yes"}),
        "invalid_request",
    )
    .await;
    expect_admin_error(
        &mut r,
        json!({"action": "get_dashboard", "verbose": true}),
        "invalid_request",
    )
    .await;
    expect_admin_error(
        &mut r,
        json!({"action": "revoke_device", "device_id": d, "force": true}),
        "invalid_request",
    )
    .await;
    survives(&mut r, &d).await;
}

#[tokio::test]
async fn huge_strings_within_the_frame_limit() {
    let s = TestServer::start().await;
    let (mut r, d) = session(&s).await;
    let big = "x".repeat(900_000);
    expect_admin_error(
        &mut r,
        json!({"action": "toggle_plugin", "name": big, "enabled": true}),
        "not_found",
    )
    .await;
    expect_admin_error(&mut r, json!({"action": big}), "unknown_action").await;
    survives(&mut r, &d).await;
    // The audit log keeps a bounded action name, not the 900 KB.
    let log = common::audit_now(&s).await;
    assert!(log.iter().all(|l| l.to_string().len() < 4096));
}

#[tokio::test]
async fn deeply_nested_json() {
    let s = TestServer::start().await;
    let (mut r, d) = session(&s).await;
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    expect_error_frame(&mut r, &deep, "invalid_json").await;
    let deep_params = format!(
        r#"{{"type":"admin","request_id":"n","payload":{{"action":"get_dashboard","x":{}1{}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    expect_error_frame(&mut r, &deep_params, "invalid_json").await;
    survives(&mut r, &d).await;
}

#[tokio::test]
async fn oversized_frame() {
    let s = TestServer::start_with_config("[server]\nmax_frame_bytes = 65536\n").await;
    let (mut r, d) = session(&s).await;
    r.send_text("x".repeat(70_000)).await.unwrap();
    assert_eq!(r.closed().await.map(|c| c.0), Some(1009));
    // The server and the data are fine: a new session works, and the first
    // device is still paired.
    let (mut r, d2) = session(&s).await;
    survives(&mut r, &d2).await;
    r.send_json(
        &json!({"type": "admin", "request_id": "l", "payload": {"action": "list_devices"}}),
    )
    .await
    .unwrap();
    let f = r.recv_frame().await.unwrap();
    assert!(
        f["payload"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["device_id"] == d.as_str())
    );
}

#[tokio::test]
async fn ten_thousand_requests_without_reading_responses() {
    // The device budget (2,000 burst) is off: this row is about the outbox
    // and in-flight limits; tests/device_budget.rs covers the budget.
    let s = TestServer::start_with_config("[server]\ndevice_request_burst = 0\n").await;
    let (r, d) = session(&s).await;
    let (mut tx, mut rx) = futures_util::StreamExt::split(r.ws);
    let sender = tokio::spawn(async move {
        use futures_util::SinkExt;
        for i in 0..10_000 {
            let f = json!({"type": "admin", "request_id": format!("f{i}"), "payload": {"action": "get_dashboard"}});
            tx.send(tokio_tungstenite::tungstenite::Message::text(f.to_string()))
                .await
                .unwrap();
        }
        tx
    });
    // Only now start reading: every request is answered exactly once, with
    // its result or `busy` (bounded in-flight work, bounded outbox).
    let mut seen = std::collections::HashSet::new();
    let (mut ok, mut busy) = (0, 0);
    while seen.len() < 10_000 {
        let m = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::StreamExt::next(&mut rx),
        )
        .await
        .unwrap()
        .unwrap()
        .unwrap();
        let tokio_tungstenite::tungstenite::Message::Text(t) = m else {
            continue;
        };
        let f: Value = serde_json::from_str(t.as_str()).unwrap();
        assert!(
            seen.insert(f["request_id"].as_str().unwrap().to_string()),
            "answered twice: {f}"
        );
        match f["payload"]["result"].as_str() {
            Some("dashboard") => ok += 1,
            Some("error") if f["payload"]["code"] == "busy" => busy += 1,
            _ => panic!("{f}"),
        }
    }
    assert_eq!(ok + busy, 10_000);
    assert!(ok > 0);
    let tx = sender.await.unwrap();
    let mut r = RawConn {
        ws: tx.reunite(rx).unwrap(),
    };
    survives(&mut r, &d).await;
}

#[tokio::test]
async fn flood_beyond_the_rate_limit() {
    let s = TestServer::start_with_config("[server]\nauth_failures_per_minute = 5\n").await;
    let (c, id) = s.phone("owner").await;
    let from: std::net::IpAddr = "127.0.0.5".parse().unwrap();
    let mut limited = None;
    for _ in 0..20 {
        let mut r = s.raw_from(from).await;
        let _ = r.recv_frame().await.unwrap();
        r.send_text("flood").await.unwrap();
        let f = r.recv_frame().await.unwrap();
        if f["code"] == "rate_limited" {
            limited = Some(f);
            break;
        }
        assert_eq!(f["code"], "invalid_request");
    }
    let f = limited.expect("the flood is rate limited");
    assert!(f["retry_after_ms"].as_u64().unwrap() > 0);
    // The owner's session and data are untouched.
    let devs = c.request("list_devices", json!({})).await.unwrap();
    assert_eq!(devs["devices"][0]["device_id"], id.device_id());
}

#[tokio::test]
async fn handshake_garbage() {
    let s = TestServer::start().await;
    let (c, id) = s.phone("owner").await;
    // Not HTTP at all.
    let mut t = tokio::net::TcpStream::connect(s.handle().addr)
        .await
        .unwrap();
    t.write_all(&[0x16, 0x03, 0x01, 0xff, 0x00, b'\r', b'\n', b'\r', b'\n'])
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = t.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    assert!(
        text.ends_with("\r\n\r\nmalformed HTTP request\n"),
        "the 400 says what it is: {text:?}"
    );
    // A WebSocket whose first frame is garbage of every kind.
    for junk in [
        "{",
        "[]",
        "{\"type\":\"auth\"}",
        "{\"type\":\"pair\",\"protocol\":1}",
        "{\"type\":\"auth\",\"protocol\":\"1\"}",
    ] {
        let mut r = s.raw().await;
        let _ = r.recv_frame().await.unwrap();
        r.send_text(junk).await.unwrap();
        let f = r.recv_frame().await.unwrap();
        assert_eq!(f["type"], "auth_error", "{junk}");
        assert_eq!(f["code"], "invalid_request", "{junk} -> {f}");
        assert_eq!(r.closed().await.map(|c| c.0), Some(4401));
    }
    assert_eq!(
        c.request("list_devices", json!({})).await.unwrap()["devices"][0]["device_id"],
        id.device_id()
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_tcp_before_and_after_authentication() {
    let s = TestServer::start().await;
    // Connected, never speaks HTTP: dropped at the auth deadline.
    let mut t = tokio::net::TcpStream::connect(s.handle().addr)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(t.read(&mut buf).await.unwrap(), 0, "closed by the server");
    // Authenticated, then silent: this socket is not read for 60.5 s
    // (virtual time), so it answers no ping; the server drops it with 1008
    // at 60 s. (Read before the server's 2 s close drain ends: after it, the
    // socket is gone and the client's automatic pongs to the unread pings
    // would meet a reset that discards the close frame.) Everything else
    // that could move the paused clock happens first.
    let (c, id) = s.phone("watcher").await;
    drop(c);
    let (mut r, _) = session(&s).await;
    tokio::time::sleep(Duration::from_millis(60_500)).await;
    match r.recv().await {
        Incoming::Closed(Some((code, _))) => assert_eq!(code, 1008),
        other => panic!("expected close 1008, got {other:?}"),
    }
    let (c, _) = s.connect(&id).await;
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
}
