//! Audit segments, rotation and retention (SPEC §8a v1.1): a small
//! `audit.segment_bytes` cuts the chain into segments that verify as one;
//! pruning by size and by age (tokio's paused clock) leaves an
//! `audit.pruned` record and an anchor from which `audit verify` accepts
//! the rest; tampering with what is retained, or removing a segment, is
//! still detected; the CLI and the server share the chain while segments
//! rotate; an older single-file log is carried on.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{
    TestServer, approval_round_trip, assert_audit_verifies, audit_now, audit_records,
    audit_segments, pair_json,
};
use secrets_agent::storage::audit::{PRUNED_ACTION, parse_segment_name, pruned_names};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn audit_dir(s: &TestServer) -> PathBuf {
    s.path().join("audit")
}

fn total_bytes(dir: &Path) -> u64 {
    audit_segments(dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

fn closed_segments(dir: &Path) -> Vec<PathBuf> {
    audit_segments(dir)
        .into_iter()
        .filter(|p| p.file_name().unwrap() != "audit.jsonl")
        .collect()
}

/// Asserts the retained records are one run of consecutive seqs, each
/// linked to the one before, and returns the first seq.
#[track_caller]
fn assert_contiguous(records: &[Value]) -> u64 {
    let first = records[0]["seq"].as_u64().unwrap();
    for (i, w) in records.windows(2).enumerate() {
        assert_eq!(w[1]["seq"].as_u64().unwrap(), first + i as u64 + 1, "{w:?}");
        assert_eq!(w[1]["prev_hash"], w[0]["hash"], "{w:?}");
    }
    first
}

/// (seq, prev_hash, pruned_segments) of the anchor in agent.db.
fn anchor(s: &TestServer) -> Option<(u64, String, u64)> {
    let key = audit_dir(s).display().to_string();
    s.handle()
        .state
        .db
        .blocking(move |c| {
            use rusqlite::OptionalExtension;
            Ok(c.query_row(
                "SELECT seq, prev_hash, pruned_segments FROM audit_anchors WHERE dir = ?1",
                [key],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get(1)?,
                        r.get::<_, i64>(2)? as u64,
                    ))
                },
            )
            .optional()?)
        })
        .unwrap()
}

async fn requests(c: &mobile_client_sim::Client, n: usize) {
    for _ in 0..n {
        let r = c.request("get_dashboard", json!({})).await.unwrap();
        assert_eq!(r["result"], "dashboard", "{r}");
    }
}

/// Requests, each record written before the next (so the writer's batches
/// are one or two records and segment sizes are exact).
async fn written_one_by_one(s: &TestServer, c: &mobile_client_sim::Client, n: usize) {
    for _ in 0..n {
        requests(c, 1).await;
        s.handle().state.audit.flush().await;
    }
}

#[tokio::test]
async fn a_small_segment_size_cuts_the_chain_into_segments_that_verify_as_one() {
    let s = TestServer::start_with_config("[audit]\nsegment_bytes = 2048\nmax_bytes = 0\n").await;
    let (c, _) = s.phone("p").await;
    written_one_by_one(&s, &c, 60).await;
    let log = audit_now(&s).await;
    assert_eq!(
        assert_contiguous(&log),
        1,
        "nothing pruned with max_bytes = 0"
    );
    assert!(log.len() > 60);

    let closed = closed_segments(&audit_dir(&s));
    assert!(
        closed.len() >= 5,
        "60 records of ~330 bytes in 2 KiB segments: {closed:?}"
    );
    let mut next = 1;
    for p in &closed {
        let name = p.file_name().unwrap().to_str().unwrap();
        let first = parse_segment_name(name).unwrap();
        assert_eq!(name.len(), "audit-.jsonl".len() + 20, "{name}");
        let text = std::fs::read_to_string(p).unwrap();
        let recs: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            recs[0]["seq"], first,
            "{name} is named after its first record"
        );
        assert_eq!(first, next, "segments follow each other");
        assert!(text.len() >= 2048, "closed only past segment_bytes: {name}");
        // Closed at the first append that passed the limit: a batch of one
        // or two records over.
        assert!(text.len() < 2048 + 2 * 400, "{name}: {}", text.len());
        next = first + recs.len() as u64;
    }
    // Names sort in seq order, and the active segment after them.
    let mut names: Vec<_> = audit_segments(&audit_dir(&s))
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    let in_chain_order = names.clone();
    names.sort();
    assert_eq!(names, in_chain_order);
    assert_eq!(names.last().unwrap(), "audit.jsonl");
    let (ok, out) = common::audit_verify(s.path());
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{} records", log.len())), "{out}");
    assert!(out.contains("pruned: nothing"), "{out}");
}

#[tokio::test]
async fn pruning_by_size_keeps_the_volume_bounded_and_verify_accepts_the_rest_from_the_anchor() {
    let mut s =
        TestServer::start_with_config("[audit]\nsegment_bytes = 2048\nmax_bytes = 8192\n").await;
    let (c, _) = s.phone("p").await;
    for _ in 0..150 {
        written_one_by_one(&s, &c, 1).await;
        // Pruning makes room before each append: never over the limit.
        let total = total_bytes(&audit_dir(&s));
        assert!(total <= 8192, "audit volume {total} over the limit");
    }
    let log = audit_now(&s).await;
    let first = assert_contiguous(&log);
    assert!(first > 1, "the oldest records were pruned");
    assert!(log.len() < 150, "{} records retained", log.len());
    // The latest audit.pruned record names the first retained record,
    // and agent.db holds that anchor.
    let pruned: Vec<&Value> = log
        .iter()
        .filter(|r| r["action"] == PRUNED_ACTION)
        .collect();
    assert!(!pruned.is_empty());
    let named = pruned_names(pruned.last().unwrap()["outcome"].as_str().unwrap()).unwrap();
    assert!(
        pruned.last().unwrap()["outcome"]
            .as_str()
            .unwrap()
            .ends_with("reason=size")
    );
    assert_eq!(named.0, first);
    assert_eq!(named.1, log[0]["prev_hash"].as_str().unwrap());
    let (a_seq, a_prev, a_segments) = anchor(&s).unwrap();
    assert_eq!((a_seq, a_prev.as_str()), (named.0, named.1.as_str()));
    assert!(a_segments >= 2);

    let (ok, out) = common::audit_verify(s.path());
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "pruned: {} records (seq 1..={})",
            first - 1,
            first - 1
        )),
        "says how much was pruned: {out}"
    );
    assert!(out.contains(&format!("anchor at seq {first}")), "{out}");
    // A restart carries on the same chain.
    s.restart().await;
    let (c, _) = s.phone("q").await;
    requests(&c, 3).await;
    let log = audit_now(&s).await;
    assert_contiguous(&log);
    assert_audit_verifies(s.path());
}

#[tokio::test(start_paused = true)]
async fn pruning_by_age_follows_the_servers_clock() {
    let s = TestServer::start_with_config(
        "[audit]\nsegment_bytes = 2048\nmax_bytes = 0\nkeep_days = 2\n",
    )
    .await;
    let (c, id) = s.phone("p").await;
    written_one_by_one(&s, &c, 30).await;
    let old = audit_now(&s).await;
    let closed_before = closed_segments(&audit_dir(&s));
    assert!(closed_before.len() >= 3);
    let last_old_seq = old.last().unwrap()["seq"].as_u64().unwrap();

    // One day later nothing is old enough. (A session silent that long is
    // gone: the phone connects again.)
    tokio::time::advance(Duration::from_secs(86_400)).await;
    let (c, _) = s.connect(&id).await;
    requests(&c, 1).await;
    audit_now(&s).await;
    assert_eq!(
        closed_segments(&audit_dir(&s))[..closed_before.len()],
        closed_before[..]
    );
    assert_eq!(anchor(&s), None);

    // Two more days: every segment closed before is past keep_days.
    tokio::time::advance(Duration::from_secs(2 * 86_400)).await;
    let (c, _) = s.connect(&id).await;
    requests(&c, 1).await;
    let log = audit_now(&s).await;
    for p in &closed_before {
        assert!(!p.exists(), "{} should be pruned", p.display());
    }
    let first = assert_contiguous(&log);
    assert!(
        first > 1 && first <= last_old_seq + 2,
        "first retained {first}"
    );
    let pruned = log.iter().rfind(|r| r["action"] == PRUNED_ACTION).unwrap();
    assert!(
        pruned["outcome"].as_str().unwrap().ends_with("reason=age"),
        "{pruned}"
    );
    assert_eq!(anchor(&s).unwrap().0, first);
    assert_audit_verifies(s.path());
}

#[tokio::test]
async fn tampering_with_retained_records_or_removing_a_segment_is_still_detected() {
    let mut s =
        TestServer::start_with_config("[audit]\nsegment_bytes = 2048\nmax_bytes = 12288\n").await;
    let (c, _) = s.phone("p").await;
    written_one_by_one(&s, &c, 120).await;
    s.stop().await;
    let dir = s.path().join("audit");
    let (ok, out) = common::audit_verify(s.path());
    assert!(ok && out.contains("pruned: "), "{out}");
    let closed = closed_segments(&dir);
    assert!(closed.len() >= 3, "{closed:?}");

    // 1. One byte of a retained record, in a middle segment.
    let middle = &closed[1];
    let original = std::fs::read_to_string(middle).unwrap();
    let second: Value = serde_json::from_str(original.lines().nth(1).unwrap()).unwrap();
    let edited = original.replacen("\"outcome\":\"ok\"", "\"outcome\":\"ko\"", 2);
    assert_ne!(edited, original);
    std::fs::write(middle, &edited).unwrap();
    let (ok, out) = common::audit_verify(s.path());
    assert!(!ok, "{out}");
    let first_in_middle =
        parse_segment_name(middle.file_name().unwrap().to_str().unwrap()).unwrap();
    assert!(
        out.contains(&format!("seq {first_in_middle} "))
            || out.contains(&format!("seq {} ", second["seq"])),
        "names the edited record: {out}"
    );
    assert!(out.contains("edited"), "{out}");
    std::fs::write(middle, &original).unwrap();
    assert_audit_verifies(s.path());

    // 2. A whole middle segment removed.
    let hidden = s.path().join("hidden.segment");
    std::fs::rename(middle, &hidden).unwrap();
    let (ok, out) = common::audit_verify(s.path());
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("seq {first_in_middle} ")) && out.contains("missing"),
        "{out}"
    );
    std::fs::rename(&hidden, middle).unwrap();
    assert_audit_verifies(s.path());

    // 3. The oldest retained segment removed: more pruned than the anchor says.
    let oldest = &closed[0];
    let first = parse_segment_name(oldest.file_name().unwrap().to_str().unwrap()).unwrap();
    std::fs::rename(oldest, &hidden).unwrap();
    let (ok, out) = common::audit_verify(s.path());
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("seq {first}: missing")), "{out}");
    std::fs::rename(&hidden, oldest).unwrap();

    // 4. A renamed segment (its name no longer says its first seq).
    let wrong = dir.join(secrets_agent::storage::audit::segment_file_name(first + 1));
    std::fs::rename(oldest, &wrong).unwrap();
    let (ok, out) = common::audit_verify(s.path());
    assert!(!ok && out.contains("named for seq"), "{out}");
    std::fs::rename(&wrong, oldest).unwrap();

    // 5. The anchor moved in agent.db (hiding a removal) is not stated in the log.
    let db = secrets_agent::storage::Db::open(&s.path().join("agent.db")).unwrap();
    let next = parse_segment_name(closed[1].file_name().unwrap().to_str().unwrap()).unwrap();
    let prev = audit_records(&dir)
        .into_iter()
        .find(|r| r["seq"] == next)
        .unwrap()["prev_hash"]
        .as_str()
        .unwrap()
        .to_string();
    db.blocking(move |c| {
        c.execute(
            "UPDATE audit_anchors SET seq = ?1, prev_hash = ?2",
            rusqlite::params![next as i64, prev],
        )?;
        Ok(())
    })
    .unwrap();
    std::fs::remove_file(oldest).unwrap();
    let (ok, out) = common::audit_verify(s.path());
    assert!(
        !ok && out.contains("not stated by any audit.pruned record"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_writing_while_the_server_rotates_loses_nothing() {
    let s = TestServer::start_with_config("[audit]\nsegment_bytes = 1024\nmax_bytes = 0\n").await;
    let (c, _) = s.phone("p").await;
    let c = Arc::new(c);
    const CLI_RUNS: usize = 24;
    const REQUESTS: usize = 300;
    let dir = s.path().to_path_buf();
    let cli = tokio::task::spawn_blocking(move || {
        let mut handles = Vec::new();
        for _ in 0..4 {
            let dir = dir.clone();
            handles.push(std::thread::spawn(move || {
                for _ in 0..CLI_RUNS / 4 {
                    pair_json(&dir);
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
    });
    let mut flood = tokio::task::JoinSet::new();
    for w in 0..6 {
        let c = c.clone();
        flood.spawn(async move {
            for i in 0..REQUESTS / 6 {
                let r = c
                    .request_with_id(&format!("w{w}-{i}"), "get_dashboard", json!({}))
                    .await
                    .unwrap();
                assert_eq!(r["result"], "dashboard", "{r}");
            }
        });
    }
    while let Some(r) = flood.join_next().await {
        r.unwrap();
    }
    tokio::time::timeout(T, cli).await.unwrap().unwrap();
    let log = audit_now(&s).await;
    assert_eq!(assert_contiguous(&log), 1);
    let count = |a: &str| log.iter().filter(|r| r["action"] == a).count();
    assert_eq!(
        count("cli.pair_code_created"),
        CLI_RUNS,
        "every CLI record kept"
    );
    assert_eq!(count("get_dashboard"), REQUESTS, "every server record kept");
    assert!(
        closed_segments(&s.path().join("audit")).len() >= 5,
        "segments rotated meanwhile"
    );
    assert_audit_verifies(s.path());
}

#[tokio::test]
async fn a_single_file_log_from_an_older_version_is_carried_on_as_the_first_segment() {
    // An older server wrote one audit.jsonl (here: default segment size).
    let mut s = TestServer::start().await;
    let (c, id) = s.phone("p").await;
    requests(&c, 10).await;
    s.stop().await;
    let dir = s.path().join("audit");
    let legacy = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(legacy.len() > 1024);
    assert_eq!(audit_segments(&dir).len(), 1);
    assert_audit_verifies(s.path());

    // The new settings: the old file is the active segment, closed (and
    // named after its first seq) at the next append.
    let cfg = s.path().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("segment_bytes = 67108864", "segment_bytes = 1024"),
    )
    .unwrap();
    s.restart().await;
    let (c, _) = s.connect(&id).await;
    requests(&c, 1).await;
    let log = audit_now(&s).await;
    let first = dir.join("audit-00000000000000000001.jsonl");
    let kept = std::fs::read_to_string(&first).unwrap();
    assert!(
        kept.starts_with(&legacy),
        "the old records are kept as they were"
    );
    assert_eq!(assert_contiguous(&log), 1);
    assert_audit_verifies(s.path());
}

#[tokio::test]
async fn update_config_changes_rotation_and_retention_live() {
    let s = TestServer::start().await;
    let (c, id) = s.phone("owner").await;
    let c = Arc::new(c);
    // Refused before any approval: out of range, or max below 2 segments.
    for bad in [
        json!({"segment_bytes": 10}),
        json!({"segment_bytes": 4096, "max_bytes": 4096}),
        json!({"keep_days": -1}),
        json!({"keep_days": "forever"}),
    ] {
        let r = c
            .request("update_config", json!({"section": "audit", "value": bad}))
            .await
            .unwrap();
        common::assert_error(&r, "invalid_request");
    }
    let value = json!({"segment_bytes": 1024, "max_bytes": 4096, "keep_days": 30});
    let params = json!({"section": "audit", "value": value});
    let (r, _) = approval_round_trip(&c, &id, "update_config", params, "approve").await;
    assert_eq!(r["result"], "success", "{r}");
    let text = s.config_text();
    assert!(text.contains("segment_bytes = 1024"), "{text}");
    assert!(
        text.contains("# A segment (audit.jsonl) is closed"),
        "comments kept"
    );
    let a = &s.handle().state.config().audit;
    assert_eq!(
        (a.segment_bytes, a.max_bytes, a.keep_days),
        (1024, 4096, 30)
    );
    // Applied live: segments now rotate at 1 KiB and stay under 4 KiB + a batch.
    written_one_by_one(&s, &c, 40).await;
    let log = audit_now(&s).await;
    assert!(assert_contiguous(&log) > 1, "pruned under the new limit");
    assert!(total_bytes(&s.path().join("audit")) <= 4096);
    assert_audit_verifies(s.path());
}

#[tokio::test]
async fn the_dashboard_warns_when_the_audit_volume_cannot_hold_audit_max_bytes() {
    // 1 EiB: no disk holds that much, so the check at start warns.
    let s = TestServer::start_with_config("[audit]\nmax_bytes = 1152921504606846976\n").await;
    let (c, _) = s.phone("p").await;
    let d = c.request("get_dashboard", json!({})).await.unwrap();
    let warnings = d["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| {
            let w = w.as_str().unwrap();
            w.contains("may grow by") && w.contains("audit.max_bytes")
        }),
        "{d}"
    );
    // With the default limit on this machine's disk, that warning is gone.
    let s2 = TestServer::start().await;
    let (c2, _) = s2.phone("p").await;
    let d2 = c2.request("get_dashboard", json!({})).await.unwrap();
    assert!(
        d2["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| !w.as_str().unwrap().contains("may grow by")),
        "{d2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_while_the_server_rotates_and_prunes_sees_a_consistent_chain() {
    // The scheduler's daily audit-verify runs inside a live server.
    let s = TestServer::start_with_config(
        "[server]\ndevice_request_burst = 0\n[audit]\nsegment_bytes = 1024\nmax_bytes = 4096\n",
    )
    .await;
    let (c, _) = s.phone("p").await;
    let c = Arc::new(c);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (c, stop) = (c.clone(), stop.clone());
        writers.spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                requests(&c, 1).await;
                n += 1;
            }
            n
        });
    }
    let (dir, db) = (audit_dir(&s), s.handle().state.db.clone());
    // Verify over and over until the server has pruned (moved the first
    // retained seq) at least 30 times meanwhile.
    let checks = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut firsts = std::collections::BTreeSet::new();
        let mut runs = 0;
        while firsts.len() < 30 {
            assert!(started.elapsed() < T, "only {} prunings seen", firsts.len());
            let r = secrets_agent::storage::audit::verify(&dir, &db)
                .unwrap_or_else(|e| panic!("verify during writes: {e}"));
            firsts.insert(r.first_seq);
            runs += 1;
        }
        runs
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    while let Some(n) = writers.join_next().await {
        sent += n.unwrap();
    }
    let runs = checks.unwrap();
    assert!(runs >= 30 && sent > 0, "{runs} checks, {sent} requests");
    audit_now(&s).await;
    assert_audit_verifies(s.path());
}
