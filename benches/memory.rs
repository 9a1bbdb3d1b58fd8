//! `cargo bench --bench memory`: search latency at 10k / 100k / 1M memories,
//! next to a naive baseline measured in the same run (iterator dot product,
//! then sort every score), with and without query embedding (the real int8
//! MiniLM model), end to end through `search_memories` over a real
//! WebSocket, and the import rate. Needs `scripts/fetch-models.sh` first.

use std::path::PathBuf;
use std::time::Instant;

use secrets_agent::memory::embedder::Embedder;
use secrets_agent::memory::index::{DIM, VectorIndex};
use secrets_agent::memory::store::{self, Confidence, Entry};
use secrets_agent::storage::Db;

fn rng(seed: &mut u64) -> f32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed % 20_000) as f32 / 10_000.0 - 1.0
}

fn unit(seed: &mut u64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIM).map(|_| rng(seed)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn pct(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((xs.len() as f64 - 1.0) * p).round() as usize]
}

/// The naive baseline: iterator dot products, then a full sort.
fn naive(vecs: &[f32], q: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut all: Vec<(usize, f32)> = vecs
        .chunks_exact(DIM)
        .enumerate()
        .map(|(i, v)| (i, v.iter().zip(q).map(|(a, b)| a * b).sum()))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    all.truncate(k);
    all
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".deps/models/all-MiniLM-L6-v2")
}

const QUERIES: &[&str] = &[
    "API authentication patterns",
    "what do I like to eat",
    "garden chores this week",
    "passwords and vaults",
    "travel plans for spring",
];

fn main() {
    let sizes: Vec<usize> = std::env::var("MEMORY_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000]);
    let embedder = Embedder::start(model_dir());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let embed_one = |q: &str| {
        embedder
            .embed_blocking(vec![q.to_string()])
            .expect("model (run scripts/fetch-models.sh)")
            .pop()
            .unwrap()
    };
    let _ = embed_one("warm up");
    let mut embed_ms = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let _ = embed_one(QUERIES[i % QUERIES.len()]);
        embed_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "query embedding alone: p50 {:.2} ms, p99 {:.2} ms",
        pct(embed_ms.clone(), 0.5),
        pct(embed_ms, 0.99)
    );
    println!(
        "{:>9} | {:>22} | {:>22} | {:>8} | {:>22}",
        "memories",
        "index p50 / p99 (ms)",
        "naive p50 / p99 (ms)",
        "speedup",
        "with embedding p50/p99"
    );
    let mut seed = 0x9e3779b97f4a7c15u64;
    for &n in &sizes {
        let mut index = VectorIndex::default();
        let mut flat = Vec::with_capacity(n * DIM);
        for i in 0..n {
            let v = unit(&mut seed);
            flat.extend_from_slice(&v);
            index.insert(&format!("mem_{i:016x}"), &v);
        }
        let queries: Vec<Vec<f32>> = (0..40).map(|_| unit(&mut seed)).collect();
        let (mut fast, mut slow, mut full) = (Vec::new(), Vec::new(), Vec::new());
        for (i, q) in queries.iter().enumerate() {
            let t = Instant::now();
            let hits = index.search(q, 10);
            fast.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let base = naive(&flat, q, 10);
            slow.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(hits.len(), base.len());
            assert!((hits[0].1 - base[0].1).abs() < 1e-4, "same best score");
            let t = Instant::now();
            let qv = embed_one(QUERIES[i % QUERIES.len()]);
            let _ = index.search(&qv, 10);
            full.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "{n:>9} | {:>10.2} / {:>9.2} | {:>10.2} / {:>9.2} | {:>7.1}x | {:>10.2} / {:>9.2}",
            pct(fast.clone(), 0.5),
            pct(fast.clone(), 0.99),
            pct(slow.clone(), 0.5),
            pct(slow.clone(), 0.99),
            pct(slow, 0.5) / pct(fast, 0.5),
            pct(full.clone(), 0.5),
            pct(full, 0.99)
        );
    }

    // End to end: search_memories over a real WebSocket with 100k stored memories.
    let n = std::env::var("MEMORY_BENCH_E2E")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000usize);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[memory]\nmodel_dir = {:?}\n",
            model_dir().display().to_string()
        ),
    )
    .unwrap();
    {
        let db = Db::open(&dir.path().join("agent.db")).unwrap();
        let mut rows = Vec::with_capacity(1000);
        for i in 0..n {
            rows.push((
                Entry {
                    id: format!("mem_{i:016x}"),
                    content: format!("synthetic memory number {i}"),
                    category: "note".into(),
                    tags: vec![],
                    confidence: Confidence::Medium,
                    created_at: i as i64,
                    updated_at: i as i64,
                },
                unit(&mut seed),
            ));
            if rows.len() == 1000 {
                db.blocking(|c| store::insert_batch(c, &rows, "bench"))
                    .unwrap();
                rows.clear();
            }
        }
        db.blocking(|c| store::insert_batch(c, &rows, "bench"))
            .unwrap();
    }
    rt.block_on(async {
        let t = Instant::now();
        let server = secrets_agent::start(secrets_agent::Options { data_dir: dir.path().into(), listen: Some("127.0.0.1:0".into()), print_pairing_code: false }).await.unwrap();
        let start_ms = t.elapsed().as_secs_f64() * 1e3;
        let st = &server.state;
        let code = secrets_agent::auth::pairing::create_offer(&st.db, st.clock.now_ms(), 60, &st.key, server.url.clone()).unwrap().code;
        let mut id = mobile_client_sim::Identity::generate("bench", mobile_client_sim::ApprovalAlg::Ed25519);
        let (c, _) = mobile_client_sim::client::pair(&mobile_client_sim::client::Endpoint::new(server.url.clone()), &mut id, &code, None).await.unwrap();
        let _ = c.request("search_memories", serde_json::json!({"query": "warm up", "limit": 10})).await.unwrap();
        let mut e2e = Vec::new();
        for i in 0..60 {
            let t = Instant::now();
            let r = c.request("search_memories", serde_json::json!({"query": QUERIES[i % QUERIES.len()], "limit": 10})).await.unwrap();
            e2e.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(r["results"].as_array().unwrap().len(), 10);
        }
        println!("search_memories over a WebSocket, {n} memories (embedding + scan + SQLite fetch): p50 {:.2} ms, p99 {:.2} ms; server start with {n} memories: {start_ms:.0} ms", pct(e2e.clone(), 0.5), pct(e2e, 0.99));
        server.shutdown().await;
    });

    // Import rate with the real model: batches of 64, one transaction each.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("import.jsonl");
    let lines: Vec<String> = (0..2000).map(|i| serde_json::json!({"content": format!("Imported memory {i}: the owner prefers short answers about topic {}", i % 37)}).to_string()).collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let db = Db::open(&dir.path().join("agent.db")).unwrap();
    let t = Instant::now();
    let report = secrets_agent::memory::import::run(&db, &embedder, &file, 0, |_| {}).unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "import: {} memories in {secs:.1} s = {:.0} memories/s (batches of {})",
        report.imported,
        report.imported as f64 / secs,
        secrets_agent::memory::import::BATCH
    );
}
