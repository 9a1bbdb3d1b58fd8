//! The audit log: hash-chained JSON Lines under `audit.dir` (SPEC §8a).
//!
//! Each record's `hash` is hex SHA-256 of `prev_hash + "\n" + JCS(record
//! without hash)`. The chain head (last `seq`, `hash`) is mirrored in
//! `agent.db` so that a cut-off tail is detected. Appends from the server and
//! the CLI are serialised with an exclusive lock on `audit.dir/.lock`.
//!
//! The server fails closed: while records cannot be written, the writer
//! thread marks the log unhealthy ([`AuditHealth`]) and counts the records
//! it had to drop; the request path asks [`AuditLog::check_writable`] before
//! running anything that changes state and refuses it with `unavailable`.
//! The first record written after recovery is `audit.lost` with outcome
//! `lost:N` (N records dropped), so the gap is stated in the chain itself
//! while the chain stays continuous (dropped records never got a `seq`).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rusqlite::{OptionalExtension, params};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::{Db, StorageError};
use crate::clock::rfc3339_ms;

pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const LOG_FILE: &str = "audit.jsonl";
const LOCK_FILE: &str = ".lock";
/// The action of the record that states how many records were dropped
/// while the log could not be written; its outcome is `lost:N`.
pub const LOST_ACTION: &str = "audit.lost";

/// One event to record. Never holds a secret: params are reduced to a digest.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub ts_ms: i64,
    pub device_id: Option<String>,
    pub action: String,
    pub params_digest: Option<String>,
    pub outcome: String,
    pub approval_id: Option<String>,
    /// Secrets records (SPEC §10): the secret names (never values).
    pub names: Option<Vec<String>>,
    /// Secrets records: who a release was for (`{kind, key, pid, exe}`).
    pub requester: Option<Value>,
    /// Secrets records: the lease a release used or opened.
    pub lease_id: Option<String>,
    /// Secrets records: the leases the action ended.
    pub leases_ended: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// hex SHA-256 of the JCS form of `v` (used for `params_digest` and approvals).
pub fn jcs_digest(v: &Value) -> String {
    let canon = serde_jcs::to_string(v).unwrap_or_default();
    hex::encode(Sha256::digest(canon.as_bytes()))
}

/// RFC 8785 text of an optional field's value.
fn jcs_text<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_jcs::to_string(v).unwrap_or_else(|_| "null".into())
}

fn record_hash(prev_hash: &str, record_without_hash: &Value) -> String {
    let canon = serde_jcs::to_string(record_without_hash).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(canon.as_bytes());
    hex::encode(h.finalize())
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The JCS (RFC 8785) form of a record without `hash`, and its hash, built
/// directly: the keys are fixed ASCII names (so sorted order is plain
/// lexicographic), values are strings, null or an integer, and serde_json's
/// string escaping is JCS's. `tests::canonical_record_is_jcs` checks this
/// against `serde_jcs` on hostile inputs; `verify` uses `serde_jcs` itself.
fn canonical_record(e: &AuditEntry, seq: u64, prev: &str) -> (String, String) {
    let opt = |v: &Option<String>| v.as_deref().map(json_str).unwrap_or_else(|| "null".into());
    let mut s = String::with_capacity(320);
    s.push_str("{\"action\":");
    s.push_str(&json_str(&e.action));
    if let Some(a) = &e.approval_id {
        s.push_str(",\"approval_id\":");
        s.push_str(&json_str(a));
    }
    s.push_str(",\"device_id\":");
    s.push_str(&opt(&e.device_id));
    // Optional fields of secrets records, in JCS key order.
    if let Some(l) = &e.lease_id {
        s.push_str(",\"lease_id\":");
        s.push_str(&json_str(l));
    }
    if let Some(l) = &e.leases_ended {
        s.push_str(",\"leases_ended\":");
        s.push_str(&jcs_text(l));
    }
    if let Some(n) = &e.names {
        s.push_str(",\"names\":");
        s.push_str(&jcs_text(n));
    }
    s.push_str(",\"outcome\":");
    s.push_str(&json_str(&e.outcome));
    s.push_str(",\"params_digest\":");
    s.push_str(&opt(&e.params_digest));
    s.push_str(",\"prev_hash\":");
    s.push_str(&json_str(prev));
    if let Some(r) = &e.requester {
        s.push_str(",\"requester\":");
        s.push_str(&jcs_text(r));
    }
    s.push_str(",\"seq\":");
    s.push_str(&seq.to_string());
    s.push_str(",\"ts\":");
    s.push_str(&json_str(&rfc3339_ms(e.ts_ms)));
    s.push('}');
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(s.as_bytes());
    (s, hex::encode(h.finalize()))
}

/// Appends records to the chain in one directory.
pub struct ChainWriter {
    dir: PathBuf,
    db: Db,
    /// (file length, seq, hash) after our last append.
    cached: Option<(u64, u64, String)>,
}

impl ChainWriter {
    pub fn new(dir: PathBuf, db: Db) -> ChainWriter {
        ChainWriter {
            dir,
            db,
            cached: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn dir_key(&self) -> String {
        self.dir.display().to_string()
    }

    /// Appends `entries` under the lock, fsyncs, then moves the DB head.
    pub fn append(&mut self, entries: &[AuditEntry]) -> Result<(), AuditError> {
        if entries.is_empty() {
            return Ok(());
        }
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        let result = self.append_locked(entries);
        let _ = lock.unlock();
        result
    }

    fn append_locked(&mut self, entries: &[AuditEntry]) -> Result<(), AuditError> {
        let path = self.dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        let (mut seq, mut prev) = match &self.cached {
            Some((l, s, h)) if *l == len => (*s, h.clone()),
            _ => self.recover_head(&mut file, &path)?,
        };
        let mut buf = String::new();
        for e in entries {
            seq += 1;
            let (without_hash, hash) = canonical_record(e, seq, &prev);
            // The line is the canonical record with `hash` in its sorted place.
            let at = without_hash
                .find(",\"outcome\":")
                .expect("outcome is always present");
            buf.push_str(&without_hash[..at]);
            buf.push_str(",\"hash\":\"");
            buf.push_str(&hash);
            buf.push('"');
            buf.push_str(&without_hash[at..]);
            buf.push('\n');
            prev = hash;
        }
        let written = file
            .write_all(buf.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            // A partial line (disk full) would break the chain: cut it off,
            // so the file ends at the last whole record again.
            let _ = file.set_len(len);
            let _ = file.sync_data();
            self.cached = None;
            return Err(io_err(&path)(e));
        }
        // The records are on disk: from here on they count as written. A DB
        // head that lags behind the file is harmless (`verify` accepts it).
        let key = self.dir_key();
        let head_hash = prev.clone();
        let moved = self.db.blocking(|c| {
            c.execute(
                "INSERT INTO audit_heads(dir, seq, hash) VALUES (?1, ?2, ?3)
                 ON CONFLICT(dir) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                params![key, seq as i64, head_hash],
            )?;
            Ok(())
        });
        if let Err(e) = moved {
            tracing::error!(error = %e, "cannot mirror the audit chain head in agent.db");
        }
        self.cached = Some((len + buf.len() as u64, seq, prev));
        Ok(())
    }

    /// Whether an append could start: the directory exists (or can be made)
    /// and the log file opens for appending. Writes nothing.
    pub fn probe(&self) -> Result<(), AuditError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.dir.join(LOG_FILE);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(())
    }

    /// The chain's head: the file's last record, or the DB head if the file
    /// lost records (so the gap stays visible to `audit verify`).
    fn recover_head(&self, file: &mut File, path: &Path) -> Result<(u64, String), AuditError> {
        let from_file = last_record(file).map_err(io_err(path))?;
        let key = self.dir_key();
        let from_db: Option<(i64, String)> = self.db.blocking(move |c| {
            Ok(c.query_row(
                "SELECT seq, hash FROM audit_heads WHERE dir = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })?;
        let file_head = from_file.and_then(|v| {
            Some((
                v.get("seq")?.as_u64()?,
                v.get("hash")?.as_str()?.to_string(),
            ))
        });
        Ok(match (file_head, from_db) {
            (Some(f), Some((s, h))) if (s as u64) > f.0 => (s as u64, h),
            (Some(f), _) => f,
            (None, Some((s, h))) => (s as u64, h),
            (None, None) => (0, ZERO_HASH.to_string()),
        })
    }
}

/// Reads the last non-empty line of the file as JSON.
fn last_record(file: &mut File) -> std::io::Result<Option<Value>> {
    let len = file.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = String::new();
    file.take(64 * 1024).read_to_string(&mut tail)?;
    Ok(tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok()))
}

enum Msg {
    Entry(AuditEntry),
    SetDir(PathBuf),
    Flush(std::sync::mpsc::SyncSender<()>),
    /// Writes what is queued, then answers whether the log is writable
    /// (probing the directory when there was nothing to write). `ts_ms`
    /// stamps an `audit.lost` record if one is due.
    Check {
        ts_ms: i64,
        ack: oneshot::Sender<bool>,
    },
    /// Appends one record and everything queued before it; answers once it
    /// is on disk (true) or could not be written (false).
    Durable {
        entry: AuditEntry,
        ack: oneshot::Sender<bool>,
    },
    Close,
}

/// The writer's health, shared with the request path. Only the writer
/// thread changes it.
#[derive(Debug, Default)]
pub struct AuditHealth {
    failing: AtomicBool,
    lost: AtomicU64,
}

impl AuditHealth {
    /// True from a failed write (or probe) until the next successful one.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Records dropped since the last successful write.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Acquire)
    }
}

/// The log cannot be written now: the action was refused (fail closed).
#[derive(Debug, thiserror::Error)]
#[error("the audit log cannot be written")]
pub struct AuditUnavailable;

/// The writer thread's side: the chain writer, the batch and the health.
struct Writer {
    w: ChainWriter,
    batch: Vec<AuditEntry>,
    health: Arc<AuditHealth>,
}

impl Writer {
    /// Appends the batch, preceded by an `audit.lost` record when records
    /// were dropped before (stamped with the batch's first time, else
    /// `ts_ms`). Returns whether it was written; on failure the batch's
    /// records are counted as lost. With nothing to write, changes nothing.
    fn write(&mut self, ts_ms: Option<i64>) -> bool {
        let lost = self.health.lost();
        let ts = self.batch.first().map(|e| e.ts_ms).or(ts_ms);
        let Some(ts) = ts.filter(|_| lost > 0 || !self.batch.is_empty()) else {
            return !self.health.is_failing();
        };
        if lost > 0 {
            self.batch.insert(
                0,
                AuditEntry {
                    ts_ms: ts,
                    device_id: None,
                    action: LOST_ACTION.into(),
                    params_digest: None,
                    outcome: format!("lost:{lost}"),
                    approval_id: None,
                    ..Default::default()
                },
            );
        }
        let result = self.w.append(&self.batch);
        let dropped = self.batch.len() as u64 - u64::from(lost > 0);
        self.batch.clear();
        match result {
            Ok(()) => {
                if self.health.is_failing() || lost > 0 {
                    tracing::warn!(lost, dir = %self.w.dir().display(), "the audit log is writable again; the records lost meanwhile are counted in an audit.lost record");
                }
                self.health.lost.store(0, Ordering::Release);
                self.health.failing.store(false, Ordering::Release);
                true
            }
            Err(e) => {
                if !self.health.is_failing() {
                    tracing::error!(error = %e, dir = %self.w.dir().display(), "audit append failed: refusing state-changing actions until the audit log can be written");
                } else {
                    tracing::debug!(error = %e, records = dropped, "audit append failed again");
                }
                self.health.lost.store(lost + dropped, Ordering::Release);
                self.health.failing.store(true, Ordering::Release);
                false
            }
        }
    }

    /// `write`, and when there was nothing to write, a probe of the directory.
    fn check(&mut self, ts_ms: i64) -> bool {
        if !self.batch.is_empty() || self.health.lost() > 0 {
            return self.write(Some(ts_ms));
        }
        match self.w.probe() {
            Ok(()) => {
                self.health.failing.store(false, Ordering::Release);
                true
            }
            Err(e) => {
                if !self.health.is_failing() {
                    tracing::error!(error = %e, "the audit log cannot be written: refusing state-changing actions");
                }
                self.health.failing.store(true, Ordering::Release);
                false
            }
        }
    }
}

/// The server's audit writer: a dedicated thread fed by a bounded queue,
/// writing batches (one fsync per batch).
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    health: Arc<AuditHealth>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl AuditLog {
    pub fn start(dir: PathBuf, db: Db) -> AuditLog {
        let (tx, mut rx) = mpsc::channel::<Msg>(4096);
        let health = Arc::new(AuditHealth::default());
        let mut st = Writer {
            w: ChainWriter::new(dir, db),
            batch: Vec::new(),
            health: health.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut next = Some(first);
                    while let Some(msg) = next.take() {
                        match msg {
                            Msg::Entry(e) => st.batch.push(e),
                            Msg::SetDir(d) => {
                                st.write(None);
                                st.w = ChainWriter::new(d, st.w.db.clone());
                            }
                            Msg::Flush(ack) => {
                                st.write(None);
                                let _ = ack.send(());
                            }
                            Msg::Check { ts_ms, ack } => {
                                let _ = ack.send(st.check(ts_ms));
                            }
                            Msg::Durable { entry, ack } => {
                                st.batch.push(entry);
                                let _ = ack.send(st.write(None));
                            }
                            Msg::Close => {
                                st.write(None);
                                return;
                            }
                        }
                        if st.batch.len() < 1024 {
                            next = rx.try_recv().ok();
                        }
                    }
                    st.write(None);
                }
            })
            .expect("spawn audit writer thread");
        AuditLog {
            tx,
            health,
            thread: std::sync::Mutex::new(Some(thread)),
        }
    }

    /// The writer's health as last seen (no I/O).
    pub fn health(&self) -> &AuditHealth {
        &self.health
    }

    /// Queues a record; waits only if the queue is full. While the log
    /// cannot be written the record is dropped and counted (`audit.lost`).
    pub async fn record(&self, entry: AuditEntry) {
        let _ = self.tx.send(Msg::Entry(entry)).await;
    }

    /// Writes everything queued so far and answers whether the log can be
    /// written now. Call before running anything that changes state: Err
    /// means refuse it. After an outage, this writes the `audit.lost`
    /// record (stamped `now_ms`) first.
    pub async fn check_writable(&self, now_ms: i64) -> Result<(), AuditUnavailable> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Check { ts_ms: now_ms, ack })
            .await
            .map_err(|_| AuditUnavailable)?;
        match done.await {
            Ok(true) => Ok(()),
            _ => Err(AuditUnavailable),
        }
    }

    /// Appends `entry` and waits until it is on disk: Err if it could not
    /// be written (it is then counted as lost). For records that must
    /// exist before an action runs (e.g. an approval's decision).
    pub async fn record_durable(&self, entry: AuditEntry) -> Result<(), AuditUnavailable> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Durable { entry, ack })
            .await
            .map_err(|_| AuditUnavailable)?;
        match done.await {
            Ok(true) => Ok(()),
            _ => Err(AuditUnavailable),
        }
    }

    /// Switches to a new directory: a new chain starts there (SPEC §8a).
    pub async fn set_dir(&self, dir: PathBuf) {
        let _ = self.tx.send(Msg::SetDir(dir)).await;
    }

    /// Waits until everything queued before this call is on disk (or was
    /// found unwritable and counted as lost).
    pub async fn flush(&self) {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = tokio::task::spawn_blocking(move || done.recv()).await;
        }
    }

    /// Writes everything queued so far, then stops the writer thread.
    /// Records queued after this are dropped (call it once all sessions are gone).
    pub fn close(&self) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = self.tx.blocking_send(Msg::Close);
            let _ = h.join();
        }
    }

    /// Async form of [`AuditLog::close`].
    pub async fn close_async(&self) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = self.tx.send(Msg::Close).await;
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

/// The result of a successful `audit verify`.
#[derive(Debug)]
pub struct VerifyReport {
    pub records: u64,
    pub files: usize,
}

/// Checks every `*.jsonl` under `dir` (sorted by name) as one chain, and the
/// DB head against it. Errors name the first bad record.
pub fn verify(dir: &Path, db: &Db) -> Result<VerifyReport, String> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    files.sort();
    let mut seq = 0u64;
    let mut prev = ZERO_HASH.to_string();
    let mut hashes: Vec<String> = Vec::new();
    for f in &files {
        let file = File::open(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let at = format!("{}:{}", f.display(), i + 1);
            let line = line.map_err(|e| format!("{at}: unreadable: {e}"))?;
            if line.trim().is_empty() {
                continue;
            }
            let expected_seq = seq + 1;
            let mut v: Value = serde_json::from_str(&line).map_err(|e| {
                format!("first bad record: seq {expected_seq} at {at}: not JSON ({e})")
            })?;
            let bad = |why: &str| format!("first bad record: seq {expected_seq} at {at}: {why}");
            let got_seq = v
                .get("seq")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("no seq"))?;
            if got_seq != expected_seq {
                return Err(bad(&format!(
                    "seq is {got_seq} (records removed or reordered)"
                )));
            }
            if v.get("prev_hash").and_then(Value::as_str) != Some(prev.as_str()) {
                return Err(bad("prev_hash does not match the previous record's hash"));
            }
            let stated = v
                .as_object_mut()
                .and_then(|o| o.remove("hash"))
                .and_then(|h| h.as_str().map(String::from));
            let stated = stated.ok_or_else(|| bad("no hash"))?;
            if record_hash(&prev, &v) != stated {
                return Err(bad("hash does not match the record's contents (edited)"));
            }
            seq = expected_seq;
            prev = stated.clone();
            hashes.push(stated);
        }
    }
    let key = dir.display().to_string();
    let head: Option<(i64, String)> = db
        .blocking(move |c| {
            Ok(c.query_row(
                "SELECT seq, hash FROM audit_heads WHERE dir = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })
        .map_err(|e| e.to_string())?;
    if let Some((hs, hh)) = head {
        let hs = hs as u64;
        if hs > seq {
            return Err(format!(
                "first bad record: seq {}: missing — the log ends at seq {seq} but the database head is at seq {hs} (tail cut off)",
                seq + 1
            ));
        }
        if hs > 0 && hashes[(hs - 1) as usize] != hh {
            return Err(format!(
                "first bad record: seq {hs}: hash differs from the one recorded in agent.db"
            ));
        }
    }
    Ok(VerifyReport {
        records: seq,
        files: files.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(action: &str, device: Option<&str>, approval: Option<&str>) -> AuditEntry {
        AuditEntry {
            ts_ms: 1_764_000_000_123,
            device_id: device.map(String::from),
            action: action.into(),
            params_digest: Some("ab".repeat(32)),
            outcome: "ok".into(),
            approval_id: approval.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn canonical_record_is_jcs() {
        let hostile = [
            "plain",
            "quote\" and \\ back",
            "ctl \u{1}\u{1f}\n\t\r\u{8}\u{c}",
            "ünïcødé €𝄞",
            "</script>",
            "",
        ];
        for (i, a) in hostile.iter().enumerate() {
            for (device, approval) in [
                (None, None),
                (Some("d\u{7f}ev"), Some("apr_1")),
                (Some("x"), None),
            ] {
                let e = entry(a, device, approval);
                let (fast, hash) = canonical_record(&e, i as u64 + 1, ZERO_HASH);
                let mut v = json!({"seq": i + 1, "ts": rfc3339_ms(e.ts_ms), "device_id": e.device_id, "action": e.action,
                                   "params_digest": e.params_digest, "outcome": e.outcome, "prev_hash": ZERO_HASH});
                if let Some(a) = &e.approval_id {
                    v["approval_id"] = json!(a);
                }
                assert_eq!(fast, serde_jcs::to_string(&v).unwrap(), "record {a:?}");
                assert_eq!(hash, record_hash(ZERO_HASH, &v));
            }
        }
    }

    #[test]
    fn written_lines_verify() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        let mut w = ChainWriter::new(d.path().join("audit"), db.clone());
        w.append(&[
            entry("a\"b", Some("dev"), Some("apr_x")),
            entry("ünï", None, None),
        ])
        .unwrap();
        w.append(&[entry("c", None, None)]).unwrap();
        let r = verify(&d.path().join("audit"), &db).unwrap();
        assert_eq!(r.records, 3);
    }

    #[test]
    fn dropped_records_are_counted_and_stated_once_writing_recovers() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        let dir = d.path().join("audit");
        let health = Arc::new(AuditHealth::default());
        let mut st = Writer {
            w: ChainWriter::new(dir.clone(), db.clone()),
            batch: vec![entry("first", None, None)],
            health: health.clone(),
        };
        assert!(st.write(None));
        // The directory becomes a file: nothing can be written.
        std::fs::rename(&dir, d.path().join("moved")).unwrap();
        std::fs::write(&dir, "x").unwrap();
        assert!(!st.check(1), "the probe sees it before any record is lost");
        assert_eq!(health.lost(), 0);
        st.batch = vec![entry("a", None, None), entry("b", None, None)];
        assert!(!st.write(None));
        assert!(!st.check(2), "still broken: the lost record is not written");
        assert!(health.is_failing());
        assert_eq!(health.lost(), 2);
        std::fs::remove_file(&dir).unwrap();
        std::fs::rename(d.path().join("moved"), &dir).unwrap();
        assert!(st.check(3), "the check writes the audit.lost record");
        assert!(!health.is_failing());
        assert_eq!(health.lost(), 0);
        let text = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            (last["seq"].as_u64(), &last["action"], &last["outcome"]),
            (Some(2), &Value::from(LOST_ACTION), &Value::from("lost:2"))
        );
        assert_eq!(verify(&dir, &db).unwrap().records, 2);
    }
}
