//! The request budget per device (SPEC §7 v1.1): a device over its token
//! bucket (all its sessions together) gets `rate_limited` with
//! `retry_after_ms`, another device is unaffected, gated actions and
//! approval answers go through during the device's own flood, and the
//! refusals reach the audit log in aggregate, not one record each.
//! Real server, real sockets; the budget runs on real time here, with a
//! rate of 1/s so the test's own duration barely refills it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TestServer, assert_error, audit_records, spawn_request};
use secrets_agent::budget::RATE_LIMITED_ACTION;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// Asserts a `rate_limited` error with a usable `retry_after_ms`; returns it.
#[track_caller]
fn assert_rate_limited(r: &Value) -> u64 {
    assert_error(r, "rate_limited");
    let ms = r["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!((1..=1000).contains(&ms), "one token a second: {r}");
    ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_budget_is_rate_limited_and_another_device_is_not() {
    let mut s = TestServer::start_with_config(
        "[server]\ndevice_requests_per_sec = 1\ndevice_request_burst = 30\n",
    )
    .await;
    let (a1, a_id) = s.phone("flooder").await;
    let (a2, _) = s.connect(&a_id).await;
    let (b, b_id) = s.phone("bystander").await;
    let (a1, a2) = (Arc::new(a1), Arc::new(a2));

    // 100 requests at once over the device's two sessions: one budget.
    let started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..100 {
        let c = if i % 2 == 0 { a1.clone() } else { a2.clone() };
        flood.spawn(async move { c.request("list_devices", json!({})).await.unwrap() });
    }
    let (mut ok, mut limited) = (0u64, 0u64);
    while let Some(r) = flood.join_next().await {
        let r = r.unwrap();
        if r["result"] == "devices" {
            ok += 1;
        } else {
            assert_rate_limited(&r);
            limited += 1;
        }
    }
    let refill = started.elapsed().as_secs() + 1;
    assert!(
        (30..=30 + refill).contains(&ok),
        "the burst of 30 (+1/s) was served: {ok}"
    );
    assert_eq!(ok + limited, 100);

    // The other device is not affected by A's flood: its own burst is whole.
    for _ in 0..30 {
        let r = b.request("get_dashboard", json!({})).await.unwrap();
        assert_eq!(r["result"], "dashboard", "{r}");
    }
    // A is still over budget, through either codec; after retry_after_ms
    // it is served again.
    let r = a1.request("get_dashboard", json!({})).await.unwrap();
    let wait = assert_rate_limited(&r);
    let rpc = a2
        .jsonrpc(json!(9), "get_dashboard", json!({}))
        .await
        .unwrap();
    assert_eq!(rpc["error"]["data"]["code"], "rate_limited", "{rpc}");
    let limited = limited + 2;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let r = a1.request("get_dashboard", json!({})).await.unwrap();
    assert_eq!(r["result"], "dashboard", "served after retry_after_ms: {r}");

    // Refusals are audited in aggregate (at the latest at shutdown), not
    // one record each; the requests served each have their record.
    let a = a_id.device_id();
    s.stop().await;
    let log = audit_records(&s.path().join("audit"));
    let mine = |action: &str| {
        log.iter()
            .filter(|r| r["action"] == action && r["device_id"] == a.as_str())
            .collect::<Vec<_>>()
    };
    let refused: u64 = mine(RATE_LIMITED_ACTION)
        .iter()
        .map(|r| {
            r["outcome"].as_str().unwrap()["refused:".len()..]
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(refused, limited, "every refusal counted once");
    assert_eq!(mine("list_devices").len() as u64, ok);
    assert!(
        log.iter()
            .all(|r| r["action"] != RATE_LIMITED_ACTION
                || r["device_id"] != b_id.device_id().as_str()),
        "the other device was never refused"
    );
    common::assert_audit_verifies(s.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gated_actions_and_approval_answers_go_through_during_the_devices_own_flood() {
    let s = TestServer::start_with_memory(
        "[server]\ndevice_requests_per_sec = 1\ndevice_request_burst = 10\n",
    )
    .await;
    let (a, a_id) = s.phone("owner").await;
    let (flooded, _) = s.connect(&a_id).await;
    let (a, flooded) = (Arc::new(a), Arc::new(flooded));
    let (_other, other_id) = s.phone("other").await;
    let memory = a
        .request(
            "create_memory",
            json!({"content": "keep the garden watered"}),
        )
        .await
        .unwrap();
    let memory_id = memory["entry"]["id"].as_str().unwrap().to_string();

    // The device floods its own budget from one session until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let limited = Arc::new(AtomicU64::new(0));
    let first_refusal = Arc::new(tokio::sync::Notify::new());
    let flood = {
        let (c, stop, limited, first) = (
            flooded.clone(),
            stop.clone(),
            limited.clone(),
            first_refusal.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = c.request("get_dashboard", json!({})).await.unwrap();
                if r["result"] == "error" {
                    assert_rate_limited(&r);
                    limited.fetch_add(1, Ordering::Relaxed);
                    first.notify_one();
                }
            }
        })
    };
    tokio::time::timeout(T, first_refusal.notified())
        .await
        .expect("the flood goes over the budget");

    // Every gated action still reaches the phone, and the answer (sent
    // over the flooded session itself) decides it.
    let gated = [
        ("delete_memory", json!({"id": memory_id}), "deny", "error"),
        (
            "revoke_device",
            json!({"device_id": other_id.device_id()}),
            "deny",
            "error",
        ),
        (
            "update_config",
            json!({"section": "approvals", "value": {"timeout_secs": 45}}),
            "approve",
            "success",
        ),
    ];
    // The budget asks the registry, so every gated action has its own bucket,
    // the secrets ones included (a hand-kept copy once missed them).
    let server_gated = &s.handle().gated;
    for g in &gated {
        assert!(server_gated.contains(&g.0), "{} is gated", g.0);
    }
    for g in ["set_secret", "delete_secret", "reveal_secret"] {
        assert!(server_gated.contains(&g), "{g} is gated: {server_gated:?}");
    }
    for (action, params, decision, result) in gated {
        let before = limited.load(Ordering::Relaxed);
        let req = spawn_request(&a, action, params);
        let ask = flooded
            .wait_event(T, |f| {
                f["type"] == "approval_request" && f["action"] == action
            })
            .await
            .unwrap();
        flooded
            .answer_approval(&a_id, &ask, decision)
            .await
            .unwrap();
        let r = tokio::time::timeout(T, req).await.unwrap().unwrap();
        assert_eq!(r["result"], result, "{action}: {r}");
        if decision == "deny" {
            assert_error(&r, "approval_denied");
        }
        // The flood went on being refused meanwhile.
        let deadline = Instant::now() + T;
        while limited.load(Ordering::Relaxed) == before {
            assert!(Instant::now() < deadline, "the flood stopped");
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(s.handle().state.config().approvals.timeout_secs, 45);
    stop.store(true, Ordering::Relaxed);
    flood.await.unwrap();
}

#[tokio::test]
async fn burst_zero_turns_the_budget_off() {
    let s = TestServer::start_with_config(
        "[server]\ndevice_requests_per_sec = 1\ndevice_request_burst = 0\n",
    )
    .await;
    let (c, _) = s.phone("p").await;
    let c = Arc::new(c);
    // Far beyond 1/s, in rounds below max_in_flight (64).
    for _ in 0..5 {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..60 {
            let c = c.clone();
            set.spawn(async move { c.request("get_dashboard", json!({})).await.unwrap() });
        }
        while let Some(r) = set.join_next().await {
            let r = r.unwrap();
            assert_eq!(r["result"], "dashboard", "{r}");
        }
    }
}
