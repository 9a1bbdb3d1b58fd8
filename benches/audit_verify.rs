//! `secrets-agent audit verify` over a large chain: time and peak memory.
//!
//! Writes a valid chain of `AUDIT_VERIFY_RECORDS` records (default 10
//! million, about 3.6 GB) into a temp data dir with `ChainWriter` (batches
//! of 10,000, default 64 MiB segments, no pruning), then runs the release
//! binary's `audit verify` on it and reports its wall time and peak RSS
//! (`getrusage(RUSAGE_CHILDREN)`), which must not grow with the log.
//!
//! ```text
//! cargo bench --bench audit_verify                          # 10 M records
//! AUDIT_VERIFY_RECORDS=1000000 cargo bench --bench audit_verify
//! AUDIT_VERIFY_DIR=/big/disk/dir cargo bench --bench audit_verify
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use secrets_agent::storage::Db;
use secrets_agent::storage::audit::{AuditEntry, ChainWriter, Retention};

const ACTIONS: &[&str] = &[
    "get_dashboard",
    "list_devices",
    "list_plugins",
    "create_memory",
    "search_memories",
    "toggle_task",
];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn generate(dir: &Path, records: u64) -> f64 {
    std::fs::write(dir.join("config.toml"), "[audit]\nmax_bytes = 0\n").unwrap();
    let db = Db::open(&dir.join("agent.db")).unwrap();
    let mut w = ChainWriter::new(dir.join("audit"), db).with_retention(Retention {
        segment_bytes: 64 << 20,
        max_bytes: 0,
        keep_days: 0,
    });
    let started = Instant::now();
    let t0 = 1_764_000_000_000i64;
    let device = "3f2a9c4e5b6d7e8f90a1b2c3d4e5f607".to_string();
    let mut written = 0u64;
    while written < records {
        let n = (records - written).min(10_000);
        let batch: Vec<AuditEntry> = (written..written + n)
            .map(|i| AuditEntry {
                ts_ms: t0 + i as i64,
                device_id: Some(device.clone()),
                action: ACTIONS[i as usize % ACTIONS.len()].into(),
                params_digest: Some(format!("{:064x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15))),
                outcome: "ok".into(),
                approval_id: None,
                ..Default::default()
            })
            .collect();
        w.append(&batch).unwrap();
        written += n;
    }
    started.elapsed().as_secs_f64()
}

fn dir_bytes(dir: &Path) -> (u64, usize) {
    let mut total = 0;
    let mut files = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let m = e.unwrap().metadata().unwrap();
        total += m.len();
        files += 1;
    }
    (total, files)
}

/// Peak RSS of waited-for children, in KiB (Linux reports ru_maxrss in KiB).
fn children_max_rss_kib() -> i64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("audit_verify: bench");
        return;
    }
    let records = env_u64("AUDIT_VERIFY_RECORDS", 10_000_000);
    let (base, _guard): (PathBuf, Option<tempfile::TempDir>) =
        match std::env::var_os("AUDIT_VERIFY_DIR") {
            Some(d) => {
                let d = PathBuf::from(d);
                std::fs::create_dir_all(&d).unwrap();
                (d, None)
            }
            None => {
                let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
                (t.path().to_path_buf(), Some(t))
            }
        };
    println!(
        "writing a chain of {records} records under {}",
        base.display()
    );
    let gen_secs = generate(&base, records);
    let (bytes, files) = dir_bytes(&base.join("audit"));
    println!(
        "  written in {gen_secs:.1} s: {:.2} GB in {files} files",
        bytes as f64 / 1e9
    );

    let bin = env!("CARGO_BIN_EXE_secrets-agent");
    let started = Instant::now();
    let out = Command::new(bin)
        .args(["audit", "verify", "--data-dir"])
        .arg(&base)
        .env("SECRETS_AGENT_LOG", "error")
        .output()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let rss_kib = children_max_rss_kib();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "audit verify failed");
    println!(
        "audit verify: {records} records in {secs:.2} s ({:.2} M records/s, {:.0} MB/s), peak RSS {:.1} MiB",
        records as f64 / secs / 1e6,
        bytes as f64 / secs / 1e6,
        rss_kib as f64 / 1024.0
    );
    println!(
        "{}",
        serde_json::json!({"bench": "audit_verify", "records": records, "bytes": bytes, "files": files,
                           "verify_secs": secs, "peak_rss_kib": rss_kib, "generate_secs": gen_secs})
    );
}
