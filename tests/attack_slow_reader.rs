//! A paired device (or a holder of its session key) asks for 1,000 large
//! `list_memories` pages and never reads (issue 10). The server's memory
//! stays bounded (RSS under 300 MB) and the session is dropped as a slow
//! consumer. Its own test binary, so no other test's memory is counted.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::TestServer;
use secrets_agent::memory::index::DIM;
use secrets_agent::memory::store::{Confidence, Entry, insert_batch};
use secrets_agent::storage::Db;
use serde_json::json;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_reads_cannot_grow_the_server() {
    // 100 memories of 32 KiB: each page of 100 is a 3.3 MB frame.
    let dir = tempfile::tempdir().unwrap();
    {
        secrets_agent::server::prepare_data_dir(&secrets_agent::state::DataDir::new(dir.path()))
            .unwrap();
        let db = Db::open(&dir.path().join("agent.db")).unwrap();
        let rows: Vec<_> = (0..100)
            .map(|i| {
                let e = Entry {
                    id: format!("mem_{i:016x}"),
                    content: format!("{i} {}", "a".repeat(32 * 1024 - 8)),
                    category: "note".into(),
                    tags: vec![],
                    confidence: Confidence::Medium,
                    created_at: 1_000 + i,
                    updated_at: 1_000 + i,
                };
                (e, vec![0.05f32; DIM])
            })
            .collect();
        db.blocking(|c| insert_batch(c, &rows, "test")).unwrap();
    }
    let s = TestServer::start_in_dir(dir).await;
    let (_phone, id) = s.phone("owner").await;
    let mut raw = s.raw_authed(&id).await;
    let baseline = rss_kib();

    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut sent = 0;
    for i in 0..1000 {
        let f = json!({"type": "admin", "request_id": format!("r{i}"),
                       "payload": {"action": "list_memories", "page": 1, "per_page": 100}});
        if raw.send_json(&f).await.is_err() {
            break; // the server dropped us
        }
        sent += 1;
    }
    // The server gives up on the session within the stall limits.
    let st = s.handle().state.clone();
    let mut closed = false;
    for _ in 0..400 {
        if st.sessions.len() <= 1 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let peak_mb = peak.load(Ordering::SeqCst) / 1024;
    eprintln!(
        "sent {sent} requests; RSS baseline {} MB, peak {peak_mb} MB; session closed: {closed}",
        baseline / 1024
    );
    assert!(closed, "the non-reading session was closed");
    assert!(peak_mb < 300, "peak RSS {peak_mb} MB");
    drop(raw);
}
