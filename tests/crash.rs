//! Crash safety (issue 7): the server process is killed with SIGKILL in the
//! middle of config updates and device revocations (each through an
//! approval); after a restart the database passes `integrity_check`, the
//! config parses, the audit chain verifies, and no half-applied change is
//! visible.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{bin, pair_json, serve};
use mobile_client_sim::client::{self, Endpoint};
use mobile_client_sim::{ApprovalAlg, Client, Identity};
use serde_json::{Value, json};

/// Timezones paired with intervals: a consistent config has both of one pair.
const PAIRS: &[(u64, &str)] = &[
    (11, "Europe/Berlin"),
    (22, "Asia/Tokyo"),
    (33, "America/New_York"),
    (44, "UTC"),
];

/// Keeps sending approved changes until the connection dies.
async fn churn(c: Arc<Client>, id: Identity, victims: Vec<String>) {
    let approver = {
        let (c, id) = (c.clone(), id.clone());
        tokio::spawn(async move {
            while let Some(ev) = c.next_event().await {
                if ev["type"] == "approval_request"
                    && c.answer_approval(&id, &ev, "approve").await.is_err()
                {
                    return;
                }
            }
        })
    };
    let mut i = 0usize;
    loop {
        let (n, tz) = PAIRS[i % PAIRS.len()];
        let r = c.request("update_config", json!({"section": "scheduler", "value": {"check_interval_secs": n, "timezone": tz}})).await;
        if r.is_err() {
            break;
        }
        if let Some(v) = victims.get(i)
            && c.request("revoke_device", json!({"device_id": v}))
                .await
                .is_err()
        {
            break;
        }
        i += 1;
    }
    approver.abort();
}

fn check_consistent(dir: &std::path::Path) -> Value {
    // 1. The database is whole.
    let conn = rusqlite::Connection::open(dir.join("agent.db")).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    // 2. The config parses, and its scheduler section is one whole update.
    let cfg = secrets_agent::config::Config::load(&dir.join("config.toml")).expect("config parses");
    let n = cfg.scheduler.check_interval_secs;
    if n != 30 {
        let tz = PAIRS.iter().find(|p| p.0 == n).expect("a value we wrote").1;
        assert_eq!(
            cfg.scheduler.timezone, tz,
            "interval and timezone come from the same update"
        );
    }
    assert!(
        std::fs::read_to_string(dir.join("config.toml"))
            .unwrap()
            .contains("# secrets-agent configuration."),
        "comments kept"
    );
    // 3. The audit chain verifies.
    common::assert_audit_verifies(dir);
    json!({"interval": n})
}

/// The server on `dir`, started for the first time, with a phone paired.
async fn serve_with_owner(dir: &std::path::Path) -> (std::process::Child, Endpoint, Identity) {
    let (child, url, code) = serve(dir);
    let ep = Endpoint::new(url);
    let mut owner = Identity::generate("owner", ApprovalAlg::Ed25519);
    let (c, _) = client::pair(&ep, &mut owner, &code.unwrap(), None)
        .await
        .unwrap();
    drop(c);
    (child, ep, owner)
}

/// After a restart, no temp file of an interrupted write is left.
fn no_temp_files(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.ends_with(".tmp"), "temp file left: {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_operations_leaves_a_consistent_state() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, ep, owner) = serve_with_owner(dir.path()).await;
    let mut victims = Vec::new();
    for i in 0..40 {
        let v = pair_json(dir.path());
        let mut id = Identity::generate(&format!("victim {i}"), ApprovalAlg::Ed25519);
        let (c, _) = client::pair(&ep, &mut id, v["code"].as_str().unwrap(), None)
            .await
            .unwrap();
        c.close().await;
        victims.push(id.device_id());
    }
    let mut url = ep.url.clone();
    for round in 0..4u64 {
        let (c, _) = client::auth(&Endpoint::new(url.clone()), &owner)
            .await
            .unwrap();
        let c = Arc::new(c);
        let work = tokio::spawn(churn(
            c.clone(),
            owner.clone(),
            victims[(round as usize * 10)..].to_vec(),
        ));
        // Let some changes land, then kill at an arbitrary point.
        let wait = 150 + round * 70;
        let _ = tokio::time::timeout(Duration::from_millis(wait), c.closed()).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let _ = work.await;
        check_consistent(dir.path());
        let (c2, u2, code) = serve(dir.path());
        assert!(code.is_none());
        no_temp_files(dir.path());
        child = c2;
        url = u2;
    }
    // The restarted server serves, and every revocation is whole: a device
    // is either fully revoked (refused) or fully active.
    let (c, _) = client::auth(&Endpoint::new(url.clone()), &owner)
        .await
        .unwrap();
    let devs = c.request("list_devices", json!({})).await.unwrap();
    let revoked = devs["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["revoked"] == true)
        .count();
    assert!(revoked > 0, "some revocations landed before the kills");
    let cfg = c.request("get_config", json!({})).await.unwrap();
    assert_eq!(cfg["result"], "config");
    child.kill().unwrap();
    child.wait().unwrap();
    check_consistent(dir.path());
}

#[test]
fn sigkill_mid_import_leaves_whole_batches_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), common::model_config()).unwrap();
    let file = dir.path().join("many.jsonl");
    let lines: Vec<String> = (0..3000)
        .map(|i| json!({"content": format!("memory line {i} about topic {}", i % 13)}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let mut child = Command::new(bin())
        .args(["memory", "import"])
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.path())
        .env("SECRETS_AGENT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some batches are committed, before it is done.
    let db = dir.path().join("agent.db");
    let count = |db: &std::path::Path| -> i64 {
        rusqlite::Connection::open(db)
            .ok()
            .and_then(|c| {
                c.query_row("SELECT COUNT(*) FROM memories", [], |r| r.get(0))
                    .ok()
            })
            .unwrap_or(0)
    };
    let started = std::time::Instant::now();
    while count(&db) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the import never committed a batch"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let n = count(&db);
    assert!(n > 0 && n < 3000, "killed mid-import: {n}");
    assert_eq!(
        n % secrets_agent::memory::import::BATCH as i64,
        0,
        "only whole batches: {n}"
    );
    let no_vector: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM memories WHERE length(embedding) != 384 * 4",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(no_vector, 0, "every memory has its embedding");
}

/// Group commit (issue 15): the audit writer syncs records in batches, at
/// most `GROUP_COMMIT_DELAY` after the first. A state-changing action runs
/// only after every record queued before it is synced (`check_writable`),
/// so once its response arrives, the record of the action before it is on
/// disk. SIGKILL mid-traffic, five times: every such record is there, and
/// the chain verifies, before and after the restarted server adds to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_every_synced_audit_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, ep, owner) = serve_with_owner(dir.path()).await;
    let mut url = ep.url.clone();
    let count = |dir: &std::path::Path| {
        common::audit_records(&dir.join("audit"))
            .iter()
            .filter(|r| r["action"] == "reload_plugins" && r["outcome"] == "ok")
            .count()
    };
    let mut expected = 0usize;
    for round in 0..5u64 {
        let ep = Endpoint::new(url.clone());
        let (writer, _) = client::auth(&ep, &owner).await.unwrap();
        let (reader, _) = client::auth(&ep, &owner).await.unwrap();
        // Read-only traffic keeps batches of plain records in the writer.
        let flood = tokio::spawn(async move {
            while reader.request("get_dashboard", json!({})).await.is_ok() {}
        });
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let work = {
            let answered = answered.clone();
            tokio::spawn(async move {
                while writer.request("reload_plugins", json!({})).await.is_ok() {
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(200 + round * 60)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = answered.load(std::sync::atomic::Ordering::SeqCst);
        let _ = work.await;
        let _ = flood.await;
        assert!(n >= 2, "round {round}: too few actions answered ({n})");
        // Every action answered before the kill has its predecessor's
        // record synced; only the last one's may be missing.
        expected += n - 1;
        let found = count(dir.path());
        assert!(
            found >= expected,
            "round {round}: {found} reload_plugins records, at least {expected} were synced"
        );
        expected = found;
        common::assert_audit_verifies(dir.path());
        let (c2, u2, code) = serve(dir.path());
        assert!(code.is_none());
        child = c2;
        url = u2;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(count(dir.path()) >= expected);
    common::assert_audit_verifies(dir.path());
}
