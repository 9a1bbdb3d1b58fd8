//! Resource hardening of memory (issue 10): a `search_memories` flood is
//! bounded (`busy` at once beyond it) and does not starve another device.
//! Real server, real sockets, real SQLite, the real model.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, assert_error};
use secrets_agent::memory::MAX_ADMITTED;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_flood_is_bounded_and_another_device_is_served_promptly() {
    let s = TestServer::start_with_memory("").await;
    let (a, a_id) = s.phone("flooder").await;
    for i in 0..20 {
        let r = a
            .request(
                "create_memory",
                json!({"content": format!("fact {i} about the garden and the tomatoes")}),
            )
            .await
            .unwrap();
        assert_eq!(r["result"], "memory", "{r}");
    }
    let mut sessions = vec![Arc::new(a)];
    for _ in 0..3 {
        sessions.push(Arc::new(s.connect(&a_id).await.0));
    }
    // The other device is paired now; it reconnects (a full handshake)
    // while the flood runs.
    let (b, b_id) = s.phone("bystander").await;
    b.close().await;

    const FLOOD: usize = 200;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        let c = sessions[i % sessions.len()].clone();
        flood.spawn(async move {
            c.request(
                "search_memories",
                json!({"query": format!("what grows in the garden, question {i}"), "limit": 10}),
            )
            .await
            .unwrap()
        });
    }

    let started = Instant::now();
    let bystander = tokio::time::timeout(Duration::from_secs(2), async {
        let (b, _) = s.connect(&b_id).await;
        b.request("get_dashboard", json!({})).await.unwrap()
    })
    .await
    .expect("the other device's handshake and get_dashboard finish within 2 s during the flood");
    assert_eq!(bystander["result"], "dashboard", "{bystander}");
    let waited = started.elapsed();

    let (mut ok, mut busy) = (0, 0);
    while let Some(r) = flood.join_next().await {
        let r = r.unwrap();
        match r["result"].as_str() {
            Some("memory_search") => ok += 1,
            _ => {
                assert_error(&r, "busy");
                assert!(
                    r["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
                    "busy says when to retry: {r}"
                );
                busy += 1;
            }
        }
    }
    eprintln!("flood: {ok} answered, {busy} busy; the other device waited {waited:?}");
    assert_eq!(ok + busy, FLOOD);
    assert!(ok >= 1, "the flood is served up to the bound");
    assert!(
        busy >= 1,
        "{FLOOD} concurrent searches exceed the bound of {MAX_ADMITTED}: the rest are refused at once (ok {ok}, waited {waited:?})"
    );
    // The bound is released: the service answers normally afterwards.
    let r = sessions[0]
        .request("search_memories", json!({"query": "tomatoes", "limit": 3}))
        .await
        .unwrap();
    assert_eq!(r["result"], "memory_search", "{r}");
    assert_eq!(r["results"].as_array().unwrap().len(), 3);
}
