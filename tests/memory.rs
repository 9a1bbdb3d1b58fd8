//! Memory with real semantic search (SPEC §6): the real int8 MiniLM model,
//! real SQLite, over real sockets.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{TestServer, approval_round_trip, assert_error, next_approval_request, spawn_request};
use mobile_client_sim::Client;
use serde_json::{Value, json};

const FACTS: &[&str] = &[
    "OAuth2 with PKCE is preferred for public clients",
    "Rotate API keys every 90 days and keep them in a secrets vault",
    "Use short-lived bearer tokens and refresh tokens for the mobile app",
    "My favourite pizza topping is fresh basil",
    "The tomatoes in the garden need watering every morning",
];

async fn create(c: &Client, content: &str) -> Value {
    let r = c
        .request("create_memory", json!({"content": content}))
        .await
        .unwrap();
    assert_eq!(r["result"], "memory", "{r}");
    r["entry"].clone()
}

async fn search(c: &Client, q: &str, limit: u64) -> Vec<(String, f64)> {
    let r = c
        .request("search_memories", json!({"query": q, "limit": limit}))
        .await
        .unwrap();
    assert_eq!(r["result"], "memory_search", "{r}");
    r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["entry"]["content"].as_str().unwrap().to_string(),
                x["similarity"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn semantic_search_ranks_by_meaning() {
    let s = TestServer::start_with_memory("").await;
    let (c, _) = s.phone("p").await;
    for f in FACTS {
        let e = create(&c, f).await;
        assert!(e["id"].as_str().unwrap().starts_with("mem_"));
        assert_eq!(
            (e["category"].as_str(), e["confidence"].as_str()),
            (Some("note"), Some("medium"))
        );
        assert_eq!(e["tags"], json!([]));
    }
    let hits = search(&c, "API authentication patterns", 5).await;
    assert_eq!(hits.len(), 5);
    let top3: HashSet<&str> = hits[..3].iter().map(|h| h.0.as_str()).collect();
    let auth: HashSet<&str> = FACTS[..3].iter().copied().collect();
    assert_eq!(top3, auth, "auth memories first: {hits:?}");
    for w in hits.windows(2) {
        assert!(w[0].1 >= w[1].1, "sorted: {hits:?}");
    }
    assert!(hits.iter().all(|h| (-1.0..=1.0).contains(&h.1)));
    let garden = search(&c, "vegetable gardening", 1).await;
    assert!(garden[0].0.contains("tomatoes"), "{garden:?}");
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["memory_count"],
        5
    );
}

#[tokio::test]
async fn pagination_covers_every_memory_once() {
    let s = TestServer::start_with_memory("").await;
    let (c, _) = s.phone("p").await;
    let mut created = Vec::new();
    for i in 0..23 {
        created.push(
            create(&c, &format!("fact number {i}")).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut seen = Vec::new();
    for page in 1..=3 {
        let r = c
            .request("list_memories", json!({"page": page, "per_page": 10}))
            .await
            .unwrap();
        assert_eq!(
            (
                r["page"].as_u64(),
                r["per_page"].as_u64(),
                r["total"].as_u64()
            ),
            (Some(page), Some(10), Some(23))
        );
        seen.extend(
            r["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string()),
        );
    }
    assert_eq!(seen.len(), 23);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        23,
        "no duplicates"
    );
    created.reverse();
    assert_eq!(seen, created, "newest first");
    let r = c
        .request("list_memories", json!({"page": 9}))
        .await
        .unwrap();
    assert_eq!(r["entries"], json!([]));
    let d = c.request("list_memories", json!({})).await.unwrap();
    assert_eq!(
        (d["page"].as_u64(), d["per_page"].as_u64()),
        (Some(1), Some(20))
    );
    for bad in [
        json!({"per_page": 0}),
        json!({"per_page": 101}),
        json!({"page": 0}),
        json!({"page": -1}),
        json!({"page": "2"}),
        json!({"sort": "asc"}),
    ] {
        assert_error(
            &c.request("list_memories", bad).await.unwrap(),
            "invalid_request",
        );
    }
}

#[tokio::test]
async fn bad_memory_params_are_refused_and_nothing_is_stored() {
    let s = TestServer::start_with_memory("").await;
    let (c, _) = s.phone("p").await;
    for bad in [
        json!({}),
        json!({"content": ""}),
        json!({"content": "   "}),
        json!({"content": 5}),
        json!({"content": "x", "tags": "a"}),
        json!({"content": "x", "tags": [1]}),
        json!({"content": "x", "confidence": "certain"}),
        json!({"content": "x", "id": "mine"}),
        json!({"content": "x".repeat(33 * 1024)}),
    ] {
        assert_error(
            &c.request("create_memory", bad).await.unwrap(),
            "invalid_request",
        );
    }
    for bad in [
        json!({}),
        json!({"query": ""}),
        json!({"query": "x", "limit": 0}),
        json!({"query": "x", "limit": 101}),
    ] {
        assert_error(
            &c.request("search_memories", bad).await.unwrap(),
            "invalid_request",
        );
    }
    assert_eq!(
        c.request("list_memories", json!({})).await.unwrap()["total"],
        0
    );
    let e = create(&c, "kept").await;
    assert_eq!(
        c.request("list_memories", json!({})).await.unwrap()["entries"][0]["id"],
        e["id"]
    );
}

#[tokio::test]
async fn delete_goes_through_the_approval_gate() {
    let s = TestServer::start_with_memory("").await;
    let (c, id) = s.phone("p").await;
    let c = Arc::new(c);
    let keep = create(&c, "OAuth2 with PKCE is preferred for public clients").await;
    let gone = create(&c, "Rotate API keys every 90 days").await;
    assert_error(
        &c.request("delete_memory", json!({"id": "mem_nope"}))
            .await
            .unwrap(),
        "not_found",
    );

    for (target, decision) in [(&keep, "deny"), (&gone, "approve")] {
        let h = spawn_request(&c, "delete_memory", json!({"id": target["id"]}));
        let req = next_approval_request(&c).await;
        assert_eq!(
            req["params"],
            json!({"id": target["id"]}),
            "the first prompt is this one (not_found never prompted)"
        );
        assert!(req["summary"].as_str().unwrap().starts_with(&format!(
            "Delete memory {}: \"",
            target["id"].as_str().unwrap()
        )));
        c.answer_approval(&id, &req, decision).await.unwrap();
        let r = h.await.unwrap();
        if decision == "deny" {
            assert_error(&r, "approval_denied");
        } else {
            assert_eq!(r["result"], "success");
        }
    }
    let listed: Vec<Value> = c.request("list_memories", json!({})).await.unwrap()["entries"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0]["id"], keep["id"],
        "denied: still there; approved: gone"
    );
    let hits = search(&c, "API keys", 10).await;
    assert_eq!(hits.len(), 1, "gone from search too: {hits:?}");
}

#[tokio::test]
async fn memories_and_search_results_survive_a_restart() {
    let mut s = TestServer::start_with_memory("").await;
    let (c, id) = s.phone("p").await;
    for f in FACTS {
        create(&c, f).await;
    }
    let before = search(&c, "API authentication patterns", 5).await;
    let list_before = c.request("list_memories", json!({})).await.unwrap()["entries"].clone();
    s.restart().await;
    let (c, _) = s.connect(&id).await;
    let after = search(&c, "API authentication patterns", 5).await;
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.0, a.0);
        assert!((b.1 - a.1).abs() < 1e-5);
    }
    assert_eq!(
        c.request("list_memories", json!({})).await.unwrap()["entries"],
        list_before
    );
}

#[tokio::test]
async fn a_missing_model_is_a_clear_error_and_the_server_still_serves() {
    let s = TestServer::start_with_config("[memory]\nmodel_dir = \"models/not-here\"\n").await;
    let (c, _) = s.phone("p").await;
    for (action, params) in [
        ("search_memories", json!({"query": "anything"})),
        ("create_memory", json!({"content": "x"})),
    ] {
        let r = c.request(action, params).await.unwrap();
        assert_error(&r, "unavailable");
        let m = r["message"].as_str().unwrap();
        assert!(
            m.contains("model.onnx") && m.contains("fetch-models.sh"),
            "says what is missing and what to do: {m}"
        );
    }
    assert_eq!(
        c.request("list_memories", json!({})).await.unwrap()["total"],
        0
    );
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["memory_count"],
        0
    );
}

#[tokio::test]
async fn import_reports_bad_lines_and_the_running_server_picks_up_the_rest() {
    let s = TestServer::start_with_memory("").await;
    let (c, _) = s.phone("p").await;
    create(&c, "already here").await;
    let file = s.path().join("import.jsonl");
    let mut lines = vec![
        json!({"content": "OAuth2 with PKCE is preferred for public clients", "category": "security", "tags": ["auth", "oauth"], "confidence": "high"}).to_string(),
        "this is not json".to_string(),
        json!({"content": ""}).to_string(),
        json!({"content": "imported with an id", "id": "mem_custom", "created_at": "2025-01-02T03:04:05Z"}).to_string(),
        json!({"content": "dup", "id": "mem_custom"}).to_string(),
        json!({"content": "bad time", "created_at": "yesterday"}).to_string(),
        json!({"content": "extra field", "colour": "red"}).to_string(),
        String::new(),
    ];
    for i in 0..100 {
        lines.push(json!({"content": format!("bulk fact {i}")}).to_string());
    }
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["memory", "import"])
        .arg(&file)
        .arg("--data-dir")
        .arg(s.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "some lines failed: {stdout}{stderr}"
    );
    for (n, why) in [
        (2, "not a memory object"),
        (3, "content"),
        (5, "appears twice"),
        (6, "created_at"),
        (7, "colour"),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("line {n}:")) && l.contains(why)),
            "line {n} ({why}) reported: {stderr}"
        );
    }
    assert!(stdout.contains("imported 102 memories"), "{stdout}");
    // The running server picks the rows up (its watcher does this every 2 s).
    s.handle().state.memory.catch_up().await.unwrap();
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["memory_count"],
        103
    );
    let r = c
        .request("list_memories", json!({"per_page": 100, "page": 2}))
        .await
        .unwrap();
    assert_eq!(r["total"], 103);
    let hits = c
        .request(
            "search_memories",
            json!({"query": "OAuth PKCE", "limit": 1}),
        )
        .await
        .unwrap();
    let top = &hits["results"][0]["entry"];
    assert_eq!(top["tags"], json!(["auth", "oauth"]));
    assert_eq!(top["confidence"], "high");
    let custom = c
        .request(
            "search_memories",
            json!({"query": "imported with an id", "limit": 1}),
        )
        .await
        .unwrap();
    assert_eq!(custom["results"][0]["entry"]["id"], "mem_custom");
    assert_eq!(
        custom["results"][0]["entry"]["created_at"],
        "2025-01-02T03:04:05.000Z"
    );
}

#[tokio::test]
async fn a_live_model_dir_change_loads_the_model() {
    // The ONNX Runtime library's path is fixed at start (the start
    // model_dir); only the model files come from the new folder.
    let start = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        common::model_dir().join("libonnxruntime.so"),
        start.path().join("libonnxruntime.so"),
    )
    .unwrap();
    let s = TestServer::start_with_config(&format!(
        "[memory]\nmodel_dir = {:?}\n",
        start.path().display().to_string()
    ))
    .await;
    let (c, id) = s.phone("p").await;
    assert_error(
        &c.request("create_memory", json!({"content": "x"}))
            .await
            .unwrap(),
        "unavailable",
    );
    let c = Arc::new(c);
    let dir = common::model_dir().display().to_string();
    let params = json!({"section": "memory", "value": {"model_dir": dir}});
    let (r, _) = approval_round_trip(&c, &id, "update_config", params, "approve").await;
    assert_eq!(r["result"], "success");
    // The change reloads the model before the update is answered; the next
    // request waits behind the load on the embedder thread.
    let r = c
        .request("create_memory", json!({"content": "now it works"}))
        .await
        .unwrap();
    assert_eq!(
        r["result"], "memory",
        "the model loaded after the change: {r}"
    );
}

#[tokio::test]
async fn corrupt_model_files_are_a_clear_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("broken-model");
    std::fs::create_dir_all(&model).unwrap();
    for f in [
        "model.onnx",
        "tokenizer.json",
        "config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "libonnxruntime.so",
    ] {
        std::fs::write(model.join(f), b"this is not what it claims to be").unwrap();
    }
    std::fs::write(
        dir.path().join("config.toml"),
        "[memory]\nmodel_dir = \"broken-model\"\n",
    )
    .unwrap();
    let s = TestServer::start_in_dir(dir).await;
    let (c, _) = s.phone("p").await;
    let r = c
        .request("search_memories", json!({"query": "anything"}))
        .await
        .unwrap();
    assert_error(&r, "unavailable");
    assert!(
        r["message"].as_str().unwrap().contains("broken-model"),
        "names the folder: {r}"
    );
    // The server is fine.
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
}
