//! Waking the phone (SPEC §10): `notify.url` gets one text/plain POST per
//! new approval (`ACTION APPROVAL_ID`, the summary only with
//! `include_summary`); an unreachable URL does not delay the approval; the
//! URL is a secret in `update_config`.

mod common;
mod secrets_support;

use std::time::{Duration, Instant};

use common::{TestServer, answer_next, audit_now, next_approval_request, spawn_request};
use secrets_support::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// A local HTTP server: each request's (head, body) goes to the channel.
async fn http_sink() -> (String, mpsc::UnboundedReceiver<(String, String)>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = c.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            let _ = tx.send((head.to_string(), body.to_string()));
                            let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (format!("http://{addr}/topic-s3cr3t?auth=tok3n"), rx)
}

#[tokio::test]
async fn every_new_approval_posts_one_notification() {
    let (url, mut posts) = http_sink().await;
    let s = TestServer::start_with_config(&format!("[notify]\nurl = {url:?}\n")).await;
    let (phone, pid) = s.phone("owner").await;
    s.set_secret("A", "a").await;
    let get = spawn_sock(s.path(), release_req(&["A"], "job", 0));
    let req = next_approval_request(&phone).await;
    let (head, body) = tokio::time::timeout(T, posts.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        head.starts_with("POST /topic-s3cr3t?auth=tok3n HTTP/1.1"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    assert_eq!(
        body,
        format!("release_secret {}", req["approval_id"].as_str().unwrap()),
        "no summary by default"
    );
    phone.answer_approval(&pid, &req, "approve").await.unwrap();
    get.await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), posts.recv())
            .await
            .is_err(),
        "one POST per approval"
    );

    // include_summary through update_config (itself an approval: notified too).
    let phone = std::sync::Arc::new(phone);
    let upd = spawn_request(
        &phone,
        "update_config",
        json!({"section": "notify", "value": {"include_summary": true}}),
    );
    let req = answer_next(&phone, &pid, "approve").await;
    let (_, body) = tokio::time::timeout(T, posts.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        body,
        format!("update_config {}", req["approval_id"].as_str().unwrap())
    );
    assert_eq!(upd.await.unwrap()["result"], "success");
    let get = spawn_sock(s.path(), release_req(&["A"], "job", 0));
    let req = answer_next(&phone, &pid, "deny").await;
    let (_, body) = tokio::time::timeout(T, posts.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        body,
        format!(
            "release_secret {}\n{}",
            req["approval_id"].as_str().unwrap(),
            req["summary"].as_str().unwrap()
        )
    );
    get.await.unwrap();
}

#[tokio::test]
async fn an_unreachable_url_does_not_delay_the_approval() {
    // Accepts and never answers: each attempt would hang until its timeout.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/t", hole.local_addr().unwrap());
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (c, _) = hole.accept().await.unwrap();
            held.push(c);
        }
    });
    let s = TestServer::start_with_config(&format!("[notify]\nurl = {url:?}\n")).await;
    let (phone, pid) = s.phone("owner").await;
    s.set_secret("A", "a-value").await;
    let started = Instant::now();
    let get = spawn_sock(s.path(), release_req(&["A"], "job", 0));
    answer_next(&phone, &pid, "approve").await;
    let lines = get.await.unwrap();
    assert_eq!(lines.last().unwrap()["values"]["A"], "a-value");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_notify_url_is_a_secret_in_update_config() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    let phone = std::sync::Arc::new(phone);
    let url = "https://me:s3cret@ntfy.example.net:8443/very-s3cret-topic?auth=s3cret";
    let upd = spawn_request(
        &phone,
        "update_config",
        json!({"section": "notify", "value": {"url": url}}),
    );
    let req = answer_next(&phone, &pid, "approve").await;
    assert!(
        req["params"]["value"]["url"]
            .as_str()
            .unwrap()
            .starts_with("[redacted:"),
        "{req}"
    );
    // The owner sees where later approvals would be posted, and only that.
    assert!(
        req["summary"]
            .as_str()
            .unwrap()
            .contains("url = https://ntfy.example.net:8443/[redacted]"),
        "{req}"
    );
    assert!(!req.to_string().contains("s3cret"));
    let r = upd.await.unwrap();
    assert_eq!(r["result"], "success");
    assert!(!r.to_string().contains("s3cret"));
    assert_eq!(s.handle().state.config().notify.url.expose(), url);
    let cfg = phone.request("get_config", json!({})).await.unwrap();
    assert!(!cfg.to_string().contains("s3cret"));
    // Bad values are refused before asking, without quoting the URL.
    for v in [json!({"url": "ftp://x/s3cret"}), json!({"nope": 1})] {
        let r = phone
            .request("update_config", json!({"section": "notify", "value": v}))
            .await
            .unwrap();
        common::assert_error(&r, "invalid_request");
        assert!(!r.to_string().contains("s3cret"));
    }
    let r = phone
        .request(
            "update_config",
            json!({"section": "secrets", "value": {"max_lease_secs": 86401}}),
        )
        .await
        .unwrap();
    common::assert_error(&r, "invalid_request");
    let audit = std::fs::read_to_string(s.path().join("audit/audit.jsonl")).unwrap();
    let _ = audit_now(&s).await;
    let audit = audit + &std::fs::read_to_string(s.path().join("audit/audit.jsonl")).unwrap();
    assert!(!audit.contains("s3cret"));
}

#[tokio::test]
async fn a_failing_endpoint_gets_at_most_4_attempts() {
    // Answers every POST with 500 and counts them.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/t", l.local_addr().unwrap());
    let (tx, mut hits) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
                    let n = c.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let _ = tx.send(());
                let _ = c
                    .write_all(
                        b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    let s = TestServer::start_with_config(&format!("[notify]\nurl = {url:?}\n")).await;
    let (phone, _pid) = s.phone("owner").await;
    s.set_secret("A", "a").await;
    // The backoff (1 s, 2 s, 4 s) runs on tokio's clock: paused from here on.
    tokio::time::pause();
    let get = spawn_sock(s.path(), release_req(&["A"], "job", 0));
    next_approval_request(&phone).await;
    for _ in 0..4 {
        hits.recv().await.unwrap();
    }
    // An absence: move the clock well past any further backoff, letting
    // each POST in flight (a real connection) finish between the steps.
    for _ in 0..20 {
        tokio::time::advance(Duration::from_secs(5)).await;
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(50)))
            .await
            .unwrap();
    }
    assert!(hits.try_recv().is_err(), "no fifth attempt");
    get.abort();
}
