//! Resource hardening of memory (issue 10): a `search_memories` flood is
//! bounded (`busy` at once beyond it) and does not starve another device;
//! the ONNX Runtime library is loaded only from the path fixed at start,
//! never from a `memory.model_dir` set over the wire. Real server, real
//! sockets, real SQLite, the real model.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, approval_round_trip, assert_error};
use mobile_client_sim::{Client, Identity};
use secrets_agent::memory::MAX_ADMITTED;
use secrets_agent::memory::embedder::{MODEL_FILES, ORT_LIBRARY};
use serde_json::{Value, json};

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

/// A folder holding the test model's files (symlinks), and `lib` as
/// `libonnxruntime.so` when given.
fn model_copy(lib: Option<&[u8]>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in MODEL_FILES {
        std::os::unix::fs::symlink(common::model_dir().join(f), d.path().join(f)).unwrap();
    }
    if let Some(bytes) = lib {
        std::fs::write(d.path().join(ORT_LIBRARY), bytes).unwrap();
    }
    d
}

/// `update_config` section `memory`, approved on the phone.
async fn set_model_dir(c: Arc<Client>, id: &Identity, dir: &Path) {
    let params = json!({"section": "memory", "value": {"model_dir": dir.display().to_string()}});
    let (r, _) = approval_round_trip(&c, id, "update_config", params, "approve").await;
    assert_eq!(r["result"], "success");
}

fn start_library(s: &TestServer) -> PathBuf {
    s.handle().state.memory.embedder.library().to_path_buf()
}

#[tokio::test]
async fn the_onnx_library_is_never_loaded_from_a_folder_set_over_the_wire() {
    // At start, model_dir has the model files but no library: memory is
    // unavailable, and the library's path is fixed to that folder.
    let at_start = model_copy(None);
    let s = TestServer::start_with_config(&format!(
        "[memory]\nmodel_dir = {:?}\n",
        at_start.path().display().to_string()
    ))
    .await;
    let fixed = at_start.path().join(ORT_LIBRARY);
    assert_eq!(start_library(&s), fixed);
    let (c, id) = s.phone("p").await;
    let c = Arc::new(c);
    let r = c
        .request("create_memory", json!({"content": "x"}))
        .await
        .unwrap();
    assert_error(&r, "unavailable");

    // Over the wire, model_dir moves to a folder holding a real, loadable
    // ONNX Runtime: loading it would make memory work. It must not be loaded.
    let real = std::fs::read(common::model_dir().join(ORT_LIBRARY)).unwrap();
    let wired = model_copy(Some(&real));
    set_model_dir(c.clone(), &id, wired.path()).await;
    let r = c
        .request("create_memory", json!({"content": "x"}))
        .await
        .unwrap();
    assert_error(&r, "unavailable");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains(&fixed.display().to_string()),
        "names the library fixed at start: {msg}"
    );
    assert!(
        !msg.contains(&wired.path().join(ORT_LIBRARY).display().to_string()),
        "never the one in the new folder: {msg}"
    );
    assert_eq!(start_library(&s), fixed);
}

#[tokio::test]
async fn model_files_may_move_and_a_library_beside_them_is_ignored() {
    let s = TestServer::start_with_memory("").await;
    let fixed = common::model_dir().join(ORT_LIBRARY);
    assert_eq!(start_library(&s), fixed);
    let (c, id) = s.phone("p").await;
    let c = Arc::new(c);
    let r = c
        .request(
            "create_memory",
            json!({"content": "the cat sleeps on the sofa"}),
        )
        .await
        .unwrap();
    assert_eq!(r["result"], "memory", "{r}");

    // The new folder's "library" is junk: loading it would fail.
    let wired = model_copy(Some(b"not a shared library"));
    set_model_dir(c.clone(), &id, wired.path()).await;
    let r: Value = c
        .request(
            "search_memories",
            json!({"query": "where is the cat", "limit": 1}),
        )
        .await
        .unwrap();
    assert_eq!(
        r["result"], "memory_search",
        "the model reloaded from the new folder: {r}"
    );
    assert_eq!(r["results"].as_array().unwrap().len(), 1);
    assert_eq!(start_library(&s), fixed);
}
