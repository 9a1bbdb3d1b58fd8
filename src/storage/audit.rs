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
//!
//! Segments, rotation and retention (SPEC §8a v1.1, `docs/audit.md`):
//! records are appended to the active segment `audit.jsonl`; once it holds
//! `audit.segment_bytes` it is renamed `audit-<first seq>.jsonl` (names
//! that sort in seq order) and the next append starts a new one. Before an
//! append, whole oldest closed segments past `audit.max_bytes` or
//! `audit.keep_days` are pruned: an `audit.pruned` record naming the first
//! retained `seq` and its `prev_hash` is written first, that anchor is kept
//! in `agent.db` (with the head, in one transaction), and only then are the
//! files deleted. The CLI and the server do all of this under the same lock.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rusqlite::{OptionalExtension, params};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::{Db, StorageError};
use crate::clock::rfc3339_ms;

pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The segment being written. Closed segments are renamed
/// `audit-<seq of their first record, 20 digits>.jsonl`: those names sort
/// in seq order, and before this one. A log from before segments (one
/// `audit.jsonl`) is thus the active segment, closed like any other.
pub const ACTIVE_SEGMENT: &str = "audit.jsonl";
const SEGMENT_PREFIX: &str = "audit-";
const LOCK_FILE: &str = ".lock";
const DAY_MS: i64 = 86_400_000;
/// The action of the record written before oldest segments are deleted;
/// its outcome names the first retained record (see `docs/audit.md`):
/// `pruned:first_seq=S prev_hash=H segments=N records=R bytes=B reason=size|age`.
pub const PRUNED_ACTION: &str = "audit.pruned";
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

impl AuditEntry {
    /// A record of the common shape (no secrets fields), stamped `ts_ms`.
    pub fn new(
        ts_ms: i64,
        device_id: Option<&str>,
        action: &str,
        params_digest: Option<String>,
        outcome: &str,
        approval_id: Option<&str>,
    ) -> AuditEntry {
        AuditEntry {
            ts_ms,
            device_id: device_id.map(String::from),
            action: action.to_string(),
            params_digest,
            outcome: outcome.to_string(),
            approval_id: approval_id.map(String::from),
            ..Default::default()
        }
    }
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

/// Lower-case hex of `bytes` (the encoder behind every digest in the log:
/// `hex::encode` goes char by char, and it ran twice per request).
fn hex_lower(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex::encode_to_slice(bytes, &mut out).expect("twice the length");
    String::from_utf8(out).expect("hex is ASCII")
}

/// hex SHA-256 of the JCS form of `v` (used for `params_digest` and approvals).
pub fn jcs_digest(v: &Value) -> String {
    let canon = serde_jcs::to_string(v).unwrap_or_default();
    hex_lower(&Sha256::digest(canon.as_bytes()))
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
    hex_lower(&h.finalize())
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
    canonical_fields(
        &e.action,
        e.approval_id.as_deref(),
        e.device_id.as_deref(),
        &e.outcome,
        e.params_digest.as_deref(),
        prev,
        seq,
        &rfc3339_ms(e.ts_ms),
        Extras {
            lease_id: e.lease_id.as_deref(),
            leases_ended: e.leases_ended.as_deref(),
            names: e.names.as_deref(),
            requester: e.requester.as_ref(),
        },
    )
}

/// The optional fields of secrets records (SPEC §10), in a record's JCS form.
#[derive(Default, Clone, Copy)]
struct Extras<'a> {
    lease_id: Option<&'a str>,
    leases_ended: Option<&'a [String]>,
    names: Option<&'a [String]>,
    requester: Option<&'a Value>,
}

/// [`canonical_record`] from the record's fields as written.
#[allow(clippy::too_many_arguments)]
fn canonical_fields(
    action: &str,
    approval_id: Option<&str>,
    device_id: Option<&str>,
    outcome: &str,
    params_digest: Option<&str>,
    prev: &str,
    seq: u64,
    ts: &str,
    extra: Extras<'_>,
) -> (String, String) {
    let opt = |v: Option<&str>| v.map(json_str).unwrap_or_else(|| "null".into());
    let mut s = String::with_capacity(320);
    s.push_str("{\"action\":");
    s.push_str(&json_str(action));
    if let Some(a) = approval_id {
        s.push_str(",\"approval_id\":");
        s.push_str(&json_str(a));
    }
    s.push_str(",\"device_id\":");
    s.push_str(&opt(device_id));
    if let Some(l) = extra.lease_id {
        s.push_str(",\"lease_id\":");
        s.push_str(&json_str(l));
    }
    if let Some(l) = extra.leases_ended {
        s.push_str(",\"leases_ended\":");
        s.push_str(&jcs_text(l));
    }
    if let Some(n) = extra.names {
        s.push_str(",\"names\":");
        s.push_str(&jcs_text(n));
    }
    s.push_str(",\"outcome\":");
    s.push_str(&json_str(outcome));
    s.push_str(",\"params_digest\":");
    s.push_str(&opt(params_digest));
    s.push_str(",\"prev_hash\":");
    s.push_str(&json_str(prev));
    if let Some(r) = extra.requester {
        s.push_str(",\"requester\":");
        s.push_str(&jcs_text(r));
    }
    s.push_str(",\"seq\":");
    s.push_str(&seq.to_string());
    s.push_str(",\"ts\":");
    s.push_str(&json_str(ts));
    s.push('}');
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(s.as_bytes());
    (s, hex_lower(&h.finalize()))
}

/// How segments are cut and pruned (SPEC §8a v1.1; `[audit]` in config.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// A segment is closed once it holds this many bytes or more.
    pub segment_bytes: u64,
    /// Oldest closed segments are deleted while all segments together hold
    /// more than this (0: no size limit).
    pub max_bytes: u64,
    /// Closed segments whose newest record is older than this many days are
    /// deleted (0: kept forever).
    pub keep_days: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        let c = crate::config::AuditConfig::default();
        Retention::from(&c)
    }
}

impl From<&crate::config::AuditConfig> for Retention {
    fn from(c: &crate::config::AuditConfig) -> Retention {
        Retention {
            segment_bytes: c.segment_bytes,
            max_bytes: c.max_bytes,
            keep_days: c.keep_days,
        }
    }
}

/// The retention anchor kept in `agent.db` once oldest segments were pruned:
/// the first retained record's `seq` and `prev_hash`, and totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub prev_hash: String,
    pub pruned_segments: u64,
    pub pruned_bytes: u64,
    pub pruned_at_ms: i64,
}

fn load_anchor(c: &rusqlite::Connection, key: &str) -> Result<Option<Anchor>, StorageError> {
    Ok(c.query_row(
        "SELECT seq, prev_hash, pruned_segments, pruned_bytes, pruned_at FROM audit_anchors WHERE dir = ?1",
        [key],
        |r| {
            Ok(Anchor {
                seq: r.get::<_, i64>(0)? as u64,
                prev_hash: r.get(1)?,
                pruned_segments: r.get::<_, i64>(2)? as u64,
                pruned_bytes: r.get::<_, i64>(3)? as u64,
                pruned_at_ms: r.get(4)?,
            })
        },
    )
    .optional()?)
}

fn load_head(c: &rusqlite::Connection, key: &str) -> Result<Option<(u64, String)>, StorageError> {
    Ok(c.query_row(
        "SELECT seq, hash FROM audit_heads WHERE dir = ?1",
        [key],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
    )
    .optional()?)
}

/// The file name of a closed segment whose first record is `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}.jsonl")
}

/// The first seq a closed segment's file name states, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(".jsonl")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments under `dir`: closed ones in seq order, then the active one
/// (if it exists), and the names of other `*.jsonl` files (not part of the
/// chain).
pub fn list_segments(dir: &Path) -> std::io::Result<(Vec<Segment>, Vec<String>)> {
    let mut segs = Vec::new();
    let mut active = None;
    let mut other = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((segs, other)),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".jsonl") {
            continue;
        }
        let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
        if name == ACTIVE_SEGMENT {
            active = Some(Segment {
                path: e.path(),
                first_seq: None,
                bytes,
            });
        } else if let Some(first) = parse_segment_name(&name) {
            segs.push(Segment {
                path: e.path(),
                first_seq: Some(first),
                bytes,
            });
        } else {
            other.push(name);
        }
    }
    segs.sort_by_key(|s| s.first_seq);
    segs.extend(active);
    other.sort();
    Ok((segs, other))
}

/// One segment file.
#[derive(Debug, Clone)]
pub struct Segment {
    pub path: PathBuf,
    /// The seq its name states (None for the active segment).
    pub first_seq: Option<u64>,
    pub bytes: u64,
}

/// A closed segment as the writer knows it.
#[derive(Debug)]
struct Closed {
    path: PathBuf,
    first_seq: u64,
    bytes: u64,
    /// Unix ms of its newest record, read when first needed.
    newest_ms: Option<i64>,
}

impl Closed {
    fn newest_ms(&mut self) -> Option<i64> {
        if self.newest_ms.is_none() {
            let last = File::open(&self.path)
                .ok()
                .and_then(|mut f| last_record(&mut f).ok().flatten());
            self.newest_ms = last.as_ref().and_then(record_ms);
        }
        self.newest_ms
    }
}

/// What the writer knows of its directory since its last append. It is
/// trusted only while the active segment is the same file (device, inode)
/// with the length our last append left: any other writer's append,
/// rotation or pruning changes that, and the view is read again.
#[derive(Debug)]
struct View {
    /// (device, inode, length) of the active segment after our last
    /// append; None once we closed it (the next append starts a new one).
    active: Option<(u64, u64, u64)>,
    /// The seq of the active segment's first record (head + 1 while empty).
    active_first: u64,
    /// Unix ms of the active segment's first record (None while empty).
    active_first_ms: Option<i64>,
    seq: u64,
    hash: String,
    closed: VecDeque<Closed>,
    anchor: Option<Anchor>,
}

/// Oldest closed segments to delete, and the anchor that will remain.
#[derive(Debug)]
struct Prune {
    /// Leading closed segments a previous pruning already covered (its
    /// deletion did not finish): deleted without a new record.
    leftovers: usize,
    /// The segments after them to prune now.
    victims: usize,
    first_seq: u64,
    prev_hash: String,
    records: u64,
    bytes: u64,
    reason: &'static str,
}

/// Appends records to the chain in one directory, rotating and pruning
/// segments by its [`Retention`]. The server's writer thread and the CLI
/// each hold one; they serialise on the directory's lock file.
pub struct ChainWriter {
    dir: PathBuf,
    db: Db,
    retention: Retention,
    view: Option<View>,
}

impl ChainWriter {
    /// A writer with the default retention (see [`ChainWriter::with_retention`]).
    pub fn new(dir: PathBuf, db: Db) -> ChainWriter {
        ChainWriter {
            dir,
            db,
            retention: Retention::default(),
            view: None,
        }
    }

    pub fn with_retention(mut self, retention: Retention) -> ChainWriter {
        self.retention = retention;
        self
    }

    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn dir_key(&self) -> String {
        self.dir.display().to_string()
    }

    /// Appends `entries` under the lock, fsyncs, then moves the DB head;
    /// closes the active segment once it passes `segment_bytes`, and first
    /// prunes what retention says (their newest `ts` is the time compared
    /// with `keep_days`).
    pub fn append(&mut self, entries: &[AuditEntry]) -> Result<(), AuditError> {
        let Some(now_ms) = entries.iter().map(|e| e.ts_ms).max() else {
            return Ok(());
        };
        self.locked(|w| w.append_locked(entries, now_ms))
    }

    /// Prunes what retention says at `now_ms` (writing the `audit.pruned`
    /// record), without other records. For an idle server.
    pub fn maintain(&mut self, now_ms: i64) -> Result<(), AuditError> {
        self.locked(|w| w.append_locked(&[], now_ms))
    }

    fn locked(
        &mut self,
        f: impl FnOnce(&mut ChainWriter) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        let result = f(self);
        let _ = lock.unlock();
        result
    }

    fn append_locked(&mut self, entries: &[AuditEntry], now_ms: i64) -> Result<(), AuditError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(ACTIVE_SEGMENT);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let meta = file.metadata().map_err(io_err(&path))?;
        let mut len = meta.len();
        let known = self
            .view
            .as_ref()
            .is_some_and(|v| v.active == Some((meta.dev(), meta.ino(), len)));
        if !known && let Some(cut) = incomplete_tail_at(&mut file, len).map_err(io_err(&path))? {
            // A batch whose write was cut short (a crash mid-write): never
            // synced nor acknowledged, and the chain cannot continue after
            // half a line. Cut it off before anything is appended.
            file.set_len(cut)
                .and_then(|()| file.sync_data())
                .map_err(io_err(&path))?;
            tracing::warn!(
                bytes = len - cut,
                path = %path.display(),
                "cut off an incomplete audit record left by an interrupted write"
            );
            len = cut;
        }
        let id = (meta.dev(), meta.ino(), len);
        let mut view = match self.view.take() {
            Some(v) if v.active == Some(id) => v,
            _ => View {
                active: Some(id),
                ..self.rescan(&mut file, len)?
            },
        };
        // Pruning makes room for what is about to be written, so the
        // segments stay within max_bytes after the append.
        let (mut buf, mut seq, mut prev) = render(entries, view.seq, &view.hash);
        let prune = self.plan(&mut view, len, buf.len() as u64 + 512, now_ms);
        if let Some(p) = prune.as_ref().filter(|p| p.victims > 0) {
            let mut batch: Vec<AuditEntry> = Vec::with_capacity(entries.len() + 1);
            batch.push(AuditEntry {
                ts_ms: now_ms,
                device_id: None,
                action: PRUNED_ACTION.into(),
                params_digest: None,
                outcome: format!(
                    "pruned:first_seq={} prev_hash={} segments={} records={} bytes={} reason={}",
                    p.first_seq, p.prev_hash, p.victims, p.records, p.bytes, p.reason
                ),
                approval_id: None,
                ..Default::default()
            });
            batch.extend_from_slice(entries);
            (buf, seq, prev) = render(&batch, view.seq, &view.hash);
        }
        if buf.is_empty() {
            // Only leftovers of an earlier pruning, if any.
            if let Some(p) = prune {
                self.delete(&mut view, p.leftovers);
            }
            if len > 0
                && self.aged(&view, now_ms)
                && let Err(e) = self.rotate(&mut view, &path)
            {
                tracing::error!(error = %e, "cannot close the audit segment");
            }
            self.view = Some(view);
            return Ok(());
        }
        let written = file
            .write_all(buf.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            // A partial line (disk full) would break the chain: cut it off,
            // so the file ends at the last whole record again.
            let _ = file.set_len(len);
            let _ = file.sync_data();
            return Err(io_err(&path)(e));
        }
        if len == 0 {
            // A new segment: only now is a first record in it.
            let _ = fsync_dir(&self.dir);
        }
        // The records are on disk: from here on they count as written. A DB
        // head that lags behind the file is harmless (`verify` accepts it).
        let key = self.dir_key();
        let head_hash = prev.clone();
        let new_anchor = prune.as_ref().filter(|p| p.victims > 0).map(|p| Anchor {
            seq: p.first_seq,
            prev_hash: p.prev_hash.clone(),
            pruned_segments: p.victims as u64,
            pruned_bytes: p.bytes,
            pruned_at_ms: now_ms,
        });
        let a2 = new_anchor.clone();
        let moved = self.db.blocking(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO audit_heads(dir, seq, hash) VALUES (?1, ?2, ?3)
                 ON CONFLICT(dir) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                params![key, seq as i64, head_hash],
            )?;
            if let Some(a) = &a2 {
                tx.execute(
                    "INSERT INTO audit_anchors(dir, seq, prev_hash, pruned_segments, pruned_bytes, pruned_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(dir) DO UPDATE SET seq = excluded.seq, prev_hash = excluded.prev_hash,
                       pruned_segments = pruned_segments + excluded.pruned_segments,
                       pruned_bytes = pruned_bytes + excluded.pruned_bytes,
                       pruned_at = excluded.pruned_at",
                    params![
                        key,
                        a.seq as i64,
                        a.prev_hash,
                        a.pruned_segments as i64,
                        a.pruned_bytes as i64,
                        a.pruned_at_ms
                    ],
                )?;
            }
            tx.commit()?;
            Ok(())
        });
        let end = len + buf.len() as u64;
        view.active = Some((id.0, id.1, end));
        if len == 0 {
            view.active_first = view.seq + 1;
            view.active_first_ms = Some(entries.first().map_or(now_ms, |e| e.ts_ms.min(now_ms)));
        }
        view.seq = seq;
        view.hash = prev;
        match moved {
            Ok(()) => {
                if let Some(p) = prune {
                    if let Some(a) = new_anchor {
                        let (segs, bytes) = view
                            .anchor
                            .as_ref()
                            .map(|o| (o.pruned_segments, o.pruned_bytes))
                            .unwrap_or_default();
                        view.anchor = Some(Anchor {
                            pruned_segments: segs + a.pruned_segments,
                            pruned_bytes: bytes + a.pruned_bytes,
                            ..a
                        });
                        tracing::info!(
                            first_seq = p.first_seq,
                            segments = p.victims,
                            records = p.records,
                            bytes = p.bytes,
                            reason = p.reason,
                            dir = %self.dir.display(),
                            "pruning the oldest audit segments"
                        );
                    }
                    self.delete(&mut view, p.leftovers + p.victims);
                }
            }
            Err(e) => {
                // Without the anchor, nothing is deleted: `verify` must
                // still be able to prove the retained history.
                tracing::error!(error = %e, "cannot mirror the audit chain head in agent.db");
            }
        }
        if (end >= self.retention.segment_bytes || self.aged(&view, now_ms))
            && let Err(e) = self.rotate(&mut view, &path)
        {
            // The records are written; the segment just grows on.
            tracing::error!(error = %e, "cannot close the audit segment");
        }
        self.view = Some(view);
        Ok(())
    }

    /// Whether the active segment's first record is older than keep_days:
    /// it is then closed, so that no segment spans more than keep_days and
    /// a quiet server's records are pruned too (within 2 × keep_days).
    fn aged(&self, view: &View, now_ms: i64) -> bool {
        let days = self.retention.keep_days as i64;
        days > 0
            && view
                .active_first_ms
                .is_some_and(|t| t < now_ms.saturating_sub(days.saturating_mul(DAY_MS)))
    }

    /// Closes the active segment: renamed after its first seq.
    fn rotate(&self, view: &mut View, path: &Path) -> Result<(), AuditError> {
        let to = self.dir.join(segment_file_name(view.active_first));
        fs::rename(path, &to).map_err(io_err(path))?;
        let _ = fsync_dir(&self.dir);
        let bytes = view.active.map(|a| a.2).unwrap_or(0);
        tracing::debug!(segment = %to.display(), bytes, "audit segment closed");
        view.closed.push_back(Closed {
            path: to,
            first_seq: view.active_first,
            bytes,
            newest_ms: None,
        });
        view.active = None;
        view.active_first = view.seq + 1;
        view.active_first_ms = None;
        Ok(())
    }

    /// Deletes the `n` oldest closed segments (a missing one counts as deleted).
    fn delete(&self, view: &mut View, n: usize) {
        if n == 0 {
            return;
        }
        for _ in 0..n {
            let Some(c) = view.closed.pop_front() else {
                break;
            };
            match fs::remove_file(&c.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(error = %e, segment = %c.path.display(), "cannot delete a pruned audit segment; retrying at the next append");
                    view.closed.push_front(c);
                    break;
                }
            }
        }
        let _ = fsync_dir(&self.dir);
    }

    /// What to prune now, if anything.
    /// `incoming`: bytes about to be appended to the active segment.
    fn plan(&self, view: &mut View, active_len: u64, incoming: u64, now_ms: i64) -> Option<Prune> {
        let next_first = |v: &View, i: usize| {
            v.closed
                .get(i + 1)
                .map(|c| c.first_seq)
                .unwrap_or(v.active_first)
        };
        let anchor_seq = view.anchor.as_ref().map(|a| a.seq).unwrap_or(0);
        let mut leftovers = 0;
        while leftovers < view.closed.len() && next_first(view, leftovers) <= anchor_seq {
            leftovers += 1;
        }
        let r = self.retention;
        let mut total: u64 = view
            .closed
            .iter()
            .skip(leftovers)
            .map(|c| c.bytes)
            .sum::<u64>()
            + active_len
            + incoming;
        let cutoff = now_ms.saturating_sub((r.keep_days as i64).saturating_mul(DAY_MS));
        let (mut victims, mut bytes, mut reason) = (0usize, 0u64, "");
        for c in view.closed.iter_mut().skip(leftovers) {
            let by_size = r.max_bytes > 0 && total > r.max_bytes;
            let by_age = !by_size && r.keep_days > 0 && c.newest_ms().is_some_and(|t| t < cutoff);
            if !by_size && !by_age {
                break;
            }
            if reason.is_empty() {
                reason = if by_size { "size" } else { "age" };
            }
            victims += 1;
            bytes += c.bytes;
            total -= c.bytes;
        }
        if leftovers == 0 && victims == 0 {
            return None;
        }
        let keep = leftovers + victims;
        let mut plan = Prune {
            leftovers,
            victims: 0,
            first_seq: 0,
            prev_hash: String::new(),
            records: 0,
            bytes,
            reason,
        };
        if victims == 0 {
            return Some(plan);
        }
        // The first retained record: the first of the next closed segment,
        // else of the active one, else the next record to be written.
        let first_retained = match view.closed.get(keep) {
            Some(c) => first_record_at(&c.path).map(|f| (f.0, f.1)),
            None if active_len > 0 => {
                first_record_at(&self.dir.join(ACTIVE_SEGMENT)).map(|f| (f.0, f.1))
            }
            None => Some((view.seq + 1, view.hash.clone())),
        };
        let expected = next_first(view, keep - 1);
        match first_retained {
            Some((s, h)) if s == expected => {
                plan.victims = victims;
                plan.first_seq = s;
                plan.prev_hash = h;
                plan.records = s - view.closed[leftovers].first_seq;
            }
            other => {
                tracing::error!(expected, found = ?other.map(|o| o.0), dir = %self.dir.display(), "audit segments are not what their names say: not pruning (run `secrets-agent audit verify`)");
                plan.bytes = 0;
            }
        }
        Some(plan)
    }

    /// Reads the directory again: closed segments, the head, the anchor.
    fn rescan(&self, file: &mut File, len: u64) -> Result<View, AuditError> {
        let (segs, _) = list_segments(&self.dir).map_err(io_err(&self.dir))?;
        let closed: VecDeque<Closed> = segs
            .into_iter()
            .filter_map(|s| {
                Some(Closed {
                    first_seq: s.first_seq?,
                    path: s.path,
                    bytes: s.bytes,
                    newest_ms: None,
                })
            })
            .collect();
        let path = self.dir.join(ACTIVE_SEGMENT);
        let from_file = if len > 0 {
            last_record(file).map_err(io_err(&path))?
        } else {
            match closed.back() {
                Some(c) => File::open(&c.path)
                    .and_then(|mut f| last_record(&mut f))
                    .map_err(io_err(&c.path))?,
                None => None,
            }
        };
        let key = self.dir_key();
        let (from_db, anchor) = self
            .db
            .blocking(move |c| Ok((load_head(c, &key)?, load_anchor(c, &key)?)))?;
        let file_head = from_file.and_then(|v| {
            Some((
                v.get("seq")?.as_u64()?,
                v.get("hash")?.as_str()?.to_string(),
            ))
        });
        // The file's last record, or the DB head if the files lost records
        // (so the gap stays visible to `audit verify`).
        let (seq, hash) = match (file_head, from_db) {
            (Some(f), Some((s, h))) if s > f.0 => (s, h),
            (Some(f), _) => f,
            (None, Some(h)) => h,
            (None, None) => (0, ZERO_HASH.to_string()),
        };
        let first = if len > 0 {
            first_record_at(&path)
        } else {
            None
        };
        Ok(View {
            active: None,
            active_first: first.as_ref().map_or(seq + 1, |f| f.0),
            active_first_ms: first.and_then(|f| f.2),
            seq,
            hash,
            closed,
            anchor,
        })
    }

    /// Whether an append could start: the directory exists (or can be made)
    /// and the active segment opens for appending. Writes nothing.
    pub fn probe(&self) -> Result<(), AuditError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.dir.join(ACTIVE_SEGMENT);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(())
    }
}

/// Where the last complete line of a segment of `len` bytes ends, if the
/// segment does not end with a newline (else None): the length to cut it
/// back to.
fn incomplete_tail_at(file: &mut File, len: u64) -> std::io::Result<Option<u64>> {
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(None);
    }
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok(Some(start + i as u64 + 1));
        }
        end = start;
    }
    Ok(Some(0))
}

/// The lines of `entries` chained after (`seq`, `prev`): the text, and the
/// new head.
fn render(entries: &[AuditEntry], mut seq: u64, prev: &str) -> (String, u64, String) {
    let mut prev = prev.to_string();
    let mut buf = String::with_capacity(entries.len() * 400);
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
    (buf, seq, prev)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The `seq`, `prev_hash` and time (Unix ms) of the file's first record.
fn first_record_at(path: &Path) -> Option<(u64, String, Option<i64>)> {
    let f = File::open(path).ok()?;
    let mut line = String::new();
    BufReader::new(f).read_line(&mut line).ok()?;
    let v: Value = serde_json::from_str(line.trim_end()).ok()?;
    Some((
        v.get("seq")?.as_u64()?,
        v.get("prev_hash")?.as_str()?.to_string(),
        record_ms(&v),
    ))
}

/// A record's `ts` as Unix ms.
fn record_ms(v: &Value) -> Option<i64> {
    let ts = v.get("ts")?.as_str()?;
    chrono::DateTime::parse_from_rfc3339(ts)
        .ok()
        .map(|t| t.timestamp_millis())
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
    SetRetention(Retention),
    /// Prunes what retention says at `now_ms` (an idle server's records age too).
    Maintain {
        now_ms: i64,
    },
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

/// How long the writer gathers plain records after the first one before
/// it appends and syncs them as one batch (group commit). Anything that
/// waits for the disk (`check_writable`, `record_durable`, `flush`, a
/// directory change, `close`) ends the wait at once, so the delay only
/// bounds how long a plain record may sit in memory: at most this long
/// plus one write.
pub const GROUP_COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(4);
/// Messages that may be queued before producers wait (backpressure).
const QUEUE_CAPACITY: usize = 4096;
/// A batch this large is written without waiting for the delay to pass.
const MAX_BATCH: usize = 1024;

/// The writer thread has stopped: nothing more is queued.
#[derive(Debug)]
struct Stopped;

/// The queue between the request path and the writer thread. A producer
/// wakes the writer only when it sleeps with nothing to do, or for a
/// message that someone waits on ([`Msg::urgent`]); while the writer
/// gathers a batch, plain records are queued without a wake-up. This is
/// what keeps a busy server from waking (and syncing) once per request.
struct Queue {
    inner: std::sync::Mutex<QueueInner>,
    wake: std::sync::Condvar,
    /// One permit per message that may still be queued.
    space: tokio::sync::Semaphore,
}

#[derive(Default)]
struct QueueInner {
    msgs: VecDeque<Msg>,
    /// The writer sleeps until any message arrives.
    idle: bool,
    /// The writer has stopped: nothing more is accepted.
    closed: bool,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            inner: std::sync::Mutex::new(QueueInner::default()),
            wake: std::sync::Condvar::new(),
            space: tokio::sync::Semaphore::new(QUEUE_CAPACITY),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `msg`, waiting for room; Err (and `msg` dropped) once the
    /// writer stopped.
    async fn send(&self, msg: Msg) -> Result<(), Stopped> {
        match self.space.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(Stopped),
        }
        self.push(msg)
    }

    /// Queues `msg` without waiting for room (for `close`, which must not
    /// wait behind a full queue the writer is about to drain).
    fn push(&self, msg: Msg) -> Result<(), Stopped> {
        let mut q = self.lock();
        if q.closed {
            return Err(Stopped);
        }
        let wake = q.idle || msg.urgent();
        q.msgs.push_back(msg);
        if wake {
            q.idle = false;
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The writer's side: everything queued, waiting until there is some,
    /// or None once `deadline` passes with nothing queued. Without a
    /// deadline the writer sleeps as idle (the next message wakes it).
    fn take(&self, deadline: Option<std::time::Instant>) -> Option<VecDeque<Msg>> {
        let mut q = self.lock();
        loop {
            if !q.msgs.is_empty() {
                q.idle = false;
                let msgs = std::mem::take(&mut q.msgs);
                drop(q);
                let counted = msgs.iter().filter(|m| !matches!(m, Msg::Close)).count();
                self.space.add_permits(counted);
                return Some(msgs);
            }
            match deadline {
                None => {
                    q.idle = true;
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return None;
                    }
                    q = self
                        .wake
                        .wait_timeout(q, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Refuses every later message (the writer has stopped) and drops
    /// what is still queued, so that whoever waits on one of those
    /// messages hears `unavailable` instead of waiting for ever.
    fn close(&self) {
        let left = {
            let mut q = self.lock();
            q.closed = true;
            std::mem::take(&mut q.msgs)
        };
        self.space.close();
        drop(left);
    }
}

impl Msg {
    /// Whether someone waits on this message (or it must not be delayed):
    /// it wakes a gathering writer and ends the batch's delay.
    fn urgent(&self) -> bool {
        !matches!(self, Msg::Entry(_) | Msg::SetRetention(_))
    }
}

/// The server's audit writer: a dedicated thread fed by a bounded queue,
/// writing batches (one fsync per batch, group commit: see
/// [`GROUP_COMMIT_DELAY`]).
pub struct AuditLog {
    queue: Arc<Queue>,
    health: Arc<AuditHealth>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    /// Handles one message. Returns false once the writer must stop.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Entry(e) => self.batch.push(e),
            Msg::SetDir(d) => {
                self.write(None);
                let r = self.w.retention;
                self.w = ChainWriter::new(d, self.w.db.clone()).with_retention(r);
            }
            Msg::SetRetention(r) => self.w.set_retention(r),
            Msg::Maintain { now_ms } => {
                self.write(None);
                if !self.health.is_failing()
                    && let Err(e) = self.w.maintain(now_ms)
                {
                    tracing::warn!(error = %e, "audit retention check failed");
                }
            }
            Msg::Flush(ack) => {
                self.write(None);
                let _ = ack.send(());
            }
            Msg::Check { ts_ms, ack } => {
                let _ = ack.send(self.check(ts_ms));
            }
            Msg::Durable { entry, ack } => {
                self.batch.push(entry);
                let _ = ack.send(self.write(None));
            }
            Msg::Close => {
                self.write(None);
                return false;
            }
        }
        true
    }

    /// The writer thread: sleeps until a message comes, then gathers plain
    /// records for up to [`GROUP_COMMIT_DELAY`] (or [`MAX_BATCH`] of
    /// them) and writes them as one batch. Messages someone waits on are
    /// handled (and write what is queued) at once.
    fn run(mut self, queue: Arc<Queue>) {
        /// Closes the queue however the thread ends (a panic included).
        struct Closer(Arc<Queue>);
        impl Drop for Closer {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let _closer = Closer(queue.clone());
        loop {
            let mut msgs = queue.take(None).expect("no deadline");
            let mut deadline = None;
            loop {
                for msg in msgs.drain(..) {
                    if !self.handle(msg) {
                        return;
                    }
                }
                if self.batch.is_empty() {
                    break;
                }
                if self.batch.len() >= MAX_BATCH {
                    self.write(None);
                    break;
                }
                let d =
                    *deadline.get_or_insert_with(|| std::time::Instant::now() + GROUP_COMMIT_DELAY);
                match queue.take(Some(d)) {
                    Some(more) => msgs = more,
                    None => {
                        self.write(None);
                        break;
                    }
                }
            }
        }
    }
}

impl AuditLog {
    pub fn start(dir: PathBuf, db: Db, retention: Retention) -> AuditLog {
        let queue = Arc::new(Queue::new());
        let health = Arc::new(AuditHealth::default());
        let writer = Writer {
            w: ChainWriter::new(dir, db).with_retention(retention),
            batch: Vec::new(),
            health: health.clone(),
        };
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(q))
            .expect("spawn audit writer thread");
        AuditLog {
            queue,
            health,
            thread: std::sync::Mutex::new(Some(thread)),
        }
    }

    /// A cheap handle that queues records and retention checks, for tasks
    /// that do not hold the whole server state.
    pub fn sender(&self) -> AuditSender {
        AuditSender {
            queue: self.queue.clone(),
        }
    }

    /// The writer's health as last seen (no I/O).
    pub fn health(&self) -> &AuditHealth {
        &self.health
    }

    /// Queues a record; waits only if the queue is full. While the log
    /// cannot be written the record is dropped and counted (`audit.lost`).
    /// It reaches the disk within [`GROUP_COMMIT_DELAY`] (plus one write),
    /// or sooner when something waits for the disk.
    pub async fn record(&self, entry: AuditEntry) {
        let _ = self.queue.send(Msg::Entry(entry)).await;
    }

    /// Writes everything queued so far and answers whether the log can be
    /// written now. Call before running anything that changes state: Err
    /// means refuse it. After an outage, this writes the `audit.lost`
    /// record (stamped `now_ms`) first.
    pub async fn check_writable(&self, now_ms: i64) -> Result<(), AuditUnavailable> {
        let (ack, done) = oneshot::channel();
        self.queue
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
        self.queue
            .send(Msg::Durable { entry, ack })
            .await
            .map_err(|_| AuditUnavailable)?;
        match done.await {
            Ok(true) => Ok(()),
            _ => Err(AuditUnavailable),
        }
    }

    /// Applies new rotation and retention settings from the next append on.
    pub async fn set_retention(&self, retention: Retention) {
        let _ = self.queue.send(Msg::SetRetention(retention)).await;
    }

    /// Prunes what retention says at `now_ms` even if nothing is written
    /// (called periodically by the server).
    pub async fn maintain(&self, now_ms: i64) {
        let _ = self.queue.send(Msg::Maintain { now_ms }).await;
    }

    /// Switches to a new directory: a new chain starts there (SPEC §8a).
    pub async fn set_dir(&self, dir: PathBuf) {
        let _ = self.queue.send(Msg::SetDir(dir)).await;
    }

    /// Waits until everything queued before this call is on disk (or was
    /// found unwritable and counted as lost).
    pub async fn flush(&self) {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        if self.queue.send(Msg::Flush(ack)).await.is_ok() {
            let _ = tokio::task::spawn_blocking(move || done.recv()).await;
        }
    }

    /// Writes everything queued so far, then stops the writer thread.
    /// Records queued after this are dropped (call it once all sessions are gone).
    pub fn close(&self) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = self.queue.push(Msg::Close);
            let _ = h.join();
        }
    }

    /// Async form of [`AuditLog::close`].
    pub async fn close_async(&self) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = self.queue.push(Msg::Close);
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

/// The audit log with the clock that stamps its records: the one way the
/// server and its services append a record of the common shape.
#[derive(Clone)]
pub struct Auditor {
    log: Arc<AuditLog>,
    clock: crate::clock::Clock,
}

impl Auditor {
    pub fn new(log: Arc<AuditLog>, clock: crate::clock::Clock) -> Auditor {
        Auditor { log, clock }
    }

    fn entry(
        &self,
        device_id: Option<&str>,
        action: &str,
        params_digest: Option<String>,
        outcome: &str,
        approval_id: Option<&str>,
    ) -> AuditEntry {
        AuditEntry::new(
            self.clock.now_ms(),
            device_id,
            action,
            params_digest,
            outcome,
            approval_id,
        )
    }

    /// Appends a record stamped now (see [`AuditLog::record`]).
    pub async fn record(
        &self,
        device_id: Option<&str>,
        action: &str,
        params_digest: Option<String>,
        outcome: &str,
        approval_id: Option<&str>,
    ) {
        let e = self.entry(device_id, action, params_digest, outcome, approval_id);
        self.log.record(e).await;
    }

    /// Appends a record stamped now and waits until it is on disk (see
    /// [`AuditLog::record_durable`]).
    pub async fn record_durable(
        &self,
        device_id: Option<&str>,
        action: &str,
        params_digest: Option<String>,
        outcome: &str,
        approval_id: Option<&str>,
    ) -> Result<(), AuditUnavailable> {
        let e = self.entry(device_id, action, params_digest, outcome, approval_id);
        self.log.record_durable(e).await
    }
}

/// See [`AuditLog::sender`].
#[derive(Clone)]
pub struct AuditSender {
    queue: Arc<Queue>,
}

impl AuditSender {
    /// As [`AuditLog::record`].
    pub async fn record(&self, entry: AuditEntry) {
        let _ = self.queue.send(Msg::Entry(entry)).await;
    }

    /// As [`AuditLog::maintain`].
    pub async fn maintain(&self, now_ms: i64) {
        let _ = self.queue.send(Msg::Maintain { now_ms }).await;
    }
}

/// The result of a successful `audit verify`.
#[derive(Debug)]
pub struct VerifyReport {
    /// Records checked (the retained ones).
    pub records: u64,
    /// Segment files read.
    pub files: usize,
    /// The first and last retained seq (0, 0 for an empty log).
    pub first_seq: u64,
    pub last_seq: u64,
    /// What was pruned, per the anchor in agent.db (None: nothing).
    pub pruned: Option<Anchor>,
    /// `*.jsonl` files in the directory that are not segments (not read).
    pub ignored: Vec<String>,
    /// Bytes of an incomplete last line of the newest segment: a batch whose
    /// write was cut short (the process was killed mid-write). It was never
    /// synced or acknowledged, is not part of the chain, and the next append
    /// cuts it off. Records the DB head names must still all be there.
    pub incomplete_tail: u64,
}

/// A record as written, borrowed from its line (the fast path of `verify`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    seq: u64,
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(borrow)]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    action: Cow<'a, str>,
    #[serde(borrow)]
    params_digest: Option<Cow<'a, str>>,
    #[serde(borrow)]
    outcome: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "present")]
    approval_id: Option<Option<Cow<'a, str>>>,
    #[serde(borrow)]
    prev_hash: Cow<'a, str>,
    #[serde(borrow)]
    hash: Cow<'a, str>,
}

/// `Some(value)` for a field that is present (even `null`).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// The hash a record line states and the one its contents give, with its
/// seq, prev_hash and (for `audit.pruned`) outcome. Records of the shape
/// this build writes are hashed from their fields (`canonical_fields`, the
/// JCS form, checked against `serde_jcs` in the tests); any other shape
/// goes through `serde_jcs` itself.
struct Checked {
    seq: u64,
    prev_hash: String,
    stated: String,
    computed: String,
    pruned: Option<String>,
}

fn check_line(line: &str) -> Result<Checked, String> {
    if let Ok(l) = serde_json::from_str::<Line<'_>>(line)
        && !matches!(l.approval_id, Some(None))
    {
        let approval = l.approval_id.as_ref().and_then(|a| a.as_deref());
        let (_, computed) = canonical_fields(
            &l.action,
            approval,
            l.device_id.as_deref(),
            &l.outcome,
            l.params_digest.as_deref(),
            &l.prev_hash,
            l.seq,
            &l.ts,
            Extras::default(),
        );
        return Ok(Checked {
            seq: l.seq,
            prev_hash: l.prev_hash.into_owned(),
            stated: l.hash.into_owned(),
            computed,
            pruned: (l.action == PRUNED_ACTION).then(|| l.outcome.into_owned()),
        });
    }
    let mut v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let seq = v
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| "no seq".to_string())?;
    let prev_hash = v
        .get("prev_hash")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let pruned = (v.get("action").and_then(Value::as_str) == Some(PRUNED_ACTION))
        .then(|| v.get("outcome").and_then(Value::as_str).map(String::from))
        .flatten();
    let stated = v
        .as_object_mut()
        .and_then(|o| o.remove("hash"))
        .and_then(|h| h.as_str().map(String::from))
        .ok_or_else(|| "no hash".to_string())?;
    let computed = record_hash(&prev_hash, &v);
    Ok(Checked {
        seq,
        prev_hash,
        stated,
        computed,
        pruned,
    })
}

/// The (first_seq, prev_hash) an `audit.pruned` record's outcome names.
pub fn pruned_names(outcome: &str) -> Option<(u64, String)> {
    let rest = outcome.strip_prefix("pruned:")?;
    let mut seq = None;
    let mut prev = None;
    for kv in rest.split_whitespace() {
        match kv.split_once('=') {
            Some(("first_seq", v)) => seq = v.parse().ok(),
            Some(("prev_hash", v)) => prev = Some(v.to_string()),
            _ => {}
        }
    }
    Some((seq?, prev?))
}

/// What `verify` reads: the segments open and their lengths, the head and
/// the anchor, all taken under the writers' lock (held only for that), so
/// a writer rotating or pruning meanwhile changes nothing `verify` sees
/// (an open file stays readable when it is renamed or deleted).
struct Snapshot {
    files: Vec<(Segment, File)>,
    head: Option<(u64, String)>,
    anchor: Option<Anchor>,
    ignored: Vec<String>,
}

fn snapshot(dir: &Path, db: &Db) -> Result<Snapshot, String> {
    // Best effort: a read-only copy of a data dir is verified without it.
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .ok()
        .filter(|l| l.lock().is_ok());
    let taken = (|| {
        let (segments, ignored) =
            list_segments(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        // One descriptor per segment is held for the whole check.
        let _ = rlimit::increase_nofile_limit(segments.len() as u64 + 1024);
        let mut files = Vec::with_capacity(segments.len());
        for mut seg in segments {
            let f = File::open(&seg.path)
                .map_err(|e| format!("cannot read {}: {e}", seg.path.display()))?;
            seg.bytes = f
                .metadata()
                .map_err(|e| format!("cannot read {}: {e}", seg.path.display()))?
                .len();
            files.push((seg, f));
        }
        let key = dir.display().to_string();
        let (head, anchor) = db
            .blocking(move |c| Ok((load_head(c, &key)?, load_anchor(c, &key)?)))
            .map_err(|e| e.to_string())?;
        Ok(Snapshot {
            files,
            head,
            anchor,
            ignored,
        })
    })();
    if let Some(l) = lock {
        let _ = l.unlock();
    }
    taken
}

/// Checks the retained segments under `dir` as one chain, from the anchor
/// in agent.db when older segments were pruned, and the DB head against
/// its end. Reads line by line: memory stays constant whatever the size.
/// Errors name the first bad record.
pub fn verify(dir: &Path, db: &Db) -> Result<VerifyReport, String> {
    let snap = snapshot(dir, db)?;
    let (head, anchor, ignored) = (snap.head, snap.anchor, snap.ignored);
    let segments: Vec<&Segment> = snap.files.iter().map(|f| &f.0).collect();
    let mut first_seq = 0u64;
    let mut seq = 0u64;
    let mut prev = ZERO_HASH.to_string();
    let mut head_hash_seen: Option<String> = None;
    let mut anchor_stated = false;
    let mut incomplete_tail = 0u64;
    let mut line = String::new();
    let newest = snap.files.len().saturating_sub(1);
    for (i, (seg, file)) in snap.files.iter().map(|(s, f)| (s, f)).enumerate() {
        // Only the bytes there were when the snapshot was taken: a batch
        // being appended meanwhile is not read half-written.
        let file = Read::take(file, seg.bytes);
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut n = 0u64;
        let mut first_in_file = true;
        loop {
            line.clear();
            n += 1;
            let at = || format!("{}:{n}", seg.path.display());
            let read = reader
                .read_line(&mut line)
                .map_err(|e| format!("{}: unreadable: {e}", at()))?;
            if read == 0 {
                break;
            }
            if i == newest && !line.ends_with('\n') {
                // The end of the newest segment without its newline: a
                // write cut short (see `VerifyReport::incomplete_tail`).
                incomplete_tail = read as u64;
                break;
            }
            let text = line.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            let expected_seq = seq + 1;
            let bad =
                |why: &str| format!("first bad record: seq {expected_seq} at {}: {why}", at());
            let c = check_line(text).map_err(|e| bad(&e))?;
            if first_seq == 0 {
                // The first retained record: seq 1 from the zero hash, or
                // the anchor's seq and prev_hash (or earlier: a pruning
                // whose deletion did not finish; checked when reached).
                first_seq = c.seq;
                if c.seq != 1 {
                    match &anchor {
                        None => {
                            return Err(format!(
                                "first bad record: seq 1: missing — the log starts at seq {} at {} and agent.db has no pruning anchor (records removed)",
                                c.seq,
                                at()
                            ));
                        }
                        Some(a) if c.seq > a.seq => {
                            return Err(format!(
                                "first bad record: seq {}: missing — the retained history starts at seq {} (agent.db anchor) but the log starts at seq {} at {} (records removed)",
                                a.seq,
                                a.seq,
                                c.seq,
                                at()
                            ));
                        }
                        Some(_) => {}
                    }
                    seq = c.seq - 1;
                    prev = c.prev_hash.clone();
                }
            }
            let expected_seq = seq + 1;
            let bad =
                |why: &str| format!("first bad record: seq {expected_seq} at {}: {why}", at());
            if first_in_file
                && let Some(named) = seg.first_seq
                && named != c.seq
            {
                return Err(bad(&format!(
                    "segment is named for seq {named} but starts at seq {}",
                    c.seq
                )));
            }
            first_in_file = false;
            if c.seq != expected_seq {
                return Err(if c.seq > expected_seq && n == 1 {
                    bad(&format!(
                        "missing — this segment starts at seq {} (a segment was removed?)",
                        c.seq
                    ))
                } else {
                    bad(&format!("seq is {} (records removed or reordered)", c.seq))
                });
            }
            if c.prev_hash != prev {
                return Err(bad("prev_hash does not match the previous record's hash"));
            }
            if let Some(a) = &anchor
                && a.seq == c.seq
                && a.prev_hash != c.prev_hash
            {
                return Err(bad("prev_hash differs from the pruning anchor in agent.db"));
            }
            if c.computed != c.stated {
                return Err(bad("hash does not match the record's contents (edited)"));
            }
            if let (Some(a), Some(outcome)) = (&anchor, &c.pruned)
                && pruned_names(outcome).is_some_and(|(s, h)| s == a.seq && h == a.prev_hash)
            {
                anchor_stated = true;
            }
            if let Some((hs, _)) = &head
                && *hs == c.seq
            {
                head_hash_seen = Some(c.stated.clone());
            }
            seq = c.seq;
            prev = c.stated;
        }
    }
    if let Some(a) = &anchor
        && seq > 0
        && !anchor_stated
    {
        return Err(format!(
            "first bad record: seq {}: the pruning anchor in agent.db (seq {}) is not stated by any audit.pruned record in the log",
            a.seq, a.seq
        ));
    }
    if let Some((hs, hh)) = head {
        if hs > seq {
            return Err(format!(
                "first bad record: seq {}: missing — the log ends at seq {seq} but the database head is at seq {hs} (tail cut off)",
                seq + 1
            ));
        }
        if hs >= first_seq.max(1) && head_hash_seen.as_deref() != Some(hh.as_str()) {
            return Err(format!(
                "first bad record: seq {hs}: hash differs from the one recorded in agent.db"
            ));
        }
    }
    Ok(VerifyReport {
        records: if first_seq == 0 {
            0
        } else {
            seq - first_seq + 1
        },
        files: segments.len(),
        first_seq,
        last_seq: seq,
        pruned: anchor,
        ignored,
        incomplete_tail,
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
    fn secrets_records_with_optional_fields_are_jcs() {
        let mut e = entry("secret.released", None, Some("apr_1"));
        e.names = Some(vec!["B_TOKEN".into(), "A\u{1}é".into()]);
        e.requester =
            Some(json!({"kind": "cli", "key": "/usr/bin/sh \"x\"", "pid": 42, "exe": null}));
        e.lease_id = Some("lease_1".into());
        e.leases_ended = Some(vec!["lease_0".into()]);
        let (fast, hash) = canonical_record(&e, 7, ZERO_HASH);
        let v = json!({"seq": 7, "ts": rfc3339_ms(e.ts_ms), "device_id": null, "action": e.action,
                       "params_digest": e.params_digest, "outcome": e.outcome, "prev_hash": ZERO_HASH,
                       "approval_id": "apr_1", "names": e.names, "requester": e.requester,
                       "lease_id": "lease_1", "leases_ended": ["lease_0"]});
        assert_eq!(fast, serde_jcs::to_string(&v).unwrap());
        assert_eq!(hash, record_hash(ZERO_HASH, &v));
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

    /// A crash mid-write leaves half a line at the end of the active
    /// segment: `verify` reports it without failing (it was never synced),
    /// the next append cuts it off, and the chain goes on whole. Half a
    /// line anywhere else is still a broken log, and records the DB head
    /// names cannot hide behind one.
    #[test]
    fn a_write_cut_short_is_reported_then_cut_off_by_the_next_append() {
        use std::io::Write as _;
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        let dir = d.path().join("audit");
        let mut w = ChainWriter::new(dir.clone(), db.clone());
        w.append(&[entry("a", None, None), entry("b", None, None)])
            .unwrap();
        let active = dir.join(ACTIVE_SEGMENT);
        let torn = r#"{"seq":3,"ts":"2025-11-24T16:00:00.123Z","device_id":null,"act"#;
        let append_raw = |text: &str| {
            let mut f = OpenOptions::new().append(true).open(&active).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        append_raw(torn);
        let r = verify(&dir, &db).unwrap();
        assert_eq!((r.records, r.incomplete_tail), (2, torn.len() as u64));
        // A new writer (a restarted server) cuts it off, then appends.
        let mut w2 = ChainWriter::new(dir.clone(), db.clone());
        w2.append(&[entry("c", None, None)]).unwrap();
        let r = verify(&dir, &db).unwrap();
        assert_eq!((r.records, r.last_seq, r.incomplete_tail), (3, 3, 0));
        assert!(!fs::read_to_string(&active).unwrap().contains(torn));
        // Half a line followed by more lines is not a cut-short write.
        append_raw(&torn[..20]);
        append_raw("\n");
        assert!(verify(&dir, &db).is_err(), "a broken line inside the log");
        // Cutting whole records off and leaving half a line behind still
        // shows the loss: the DB head names seq 3.
        let text = fs::read_to_string(&active).unwrap();
        let first_two: String = text.split_inclusive('\n').take(2).collect();
        fs::write(&active, format!("{first_two}{torn}")).unwrap();
        let e = verify(&dir, &db).unwrap_err();
        assert!(e.contains('3'), "{e}");
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
        let text = std::fs::read_to_string(dir.join(ACTIVE_SEGMENT)).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            (last["seq"].as_u64(), &last["action"], &last["outcome"]),
            (Some(2), &Value::from(LOST_ACTION), &Value::from("lost:2"))
        );
        assert_eq!(verify(&dir, &db).unwrap().records, 2);
    }

    #[test]
    fn verify_hashes_any_record_shape_by_jcs() {
        // Records this build does not write (an explicit null approval_id,
        // an extra field, keys out of order) are checked by serde_jcs.
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        let dir = d.path().join("audit");
        std::fs::create_dir_all(&dir).unwrap();
        let mut prev = ZERO_HASH.to_string();
        let mut text = String::new();
        for (i, extra) in [json!({"approval_id": null}), json!({"note": "x"})]
            .into_iter()
            .enumerate()
        {
            let mut v = json!({"ts": "2026-01-01T00:00:00.000Z", "seq": i + 1, "device_id": null,
                               "action": "a", "params_digest": null, "outcome": "ok", "prev_hash": prev});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let hash = record_hash(&prev, &v);
            v["hash"] = json!(hash);
            text.push_str(&serde_json::to_string(&v).unwrap());
            text.push('\n');
            prev = hash;
        }
        std::fs::write(dir.join(ACTIVE_SEGMENT), &text).unwrap();
        assert_eq!(verify(&dir, &db).unwrap().records, 2);
        std::fs::write(dir.join(ACTIVE_SEGMENT), text.replace("\"x\"", "\"y\"")).unwrap();
        let err = verify(&dir, &db).unwrap_err();
        assert!(err.contains("seq 2") && err.contains("edited"), "{err}");
    }

    #[test]
    fn pruned_outcome_names_the_anchor() {
        let h = "ab".repeat(32);
        let o = format!(
            "pruned:first_seq=42 prev_hash={h} segments=2 records=41 bytes=9000 reason=size"
        );
        assert_eq!(pruned_names(&o), Some((42, h)));
        assert_eq!(pruned_names("ok"), None);
        assert_eq!(parse_segment_name(&segment_file_name(7)), Some(7));
        assert_eq!(parse_segment_name("audit-7.jsonl"), None);
        assert!(segment_file_name(9) < segment_file_name(10));
        assert!(segment_file_name(u64::MAX).as_str() < ACTIVE_SEGMENT);
    }

    #[test]
    fn a_quiet_servers_records_are_pruned_by_age_too() {
        // keep_days = 1 and segments far from full: the active segment is
        // closed once its first record is a day old, then pruned once its
        // newest one is; the clock is the records' (injected) time.
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        let dir = d.path().join("audit");
        let mut w = ChainWriter::new(dir.clone(), db.clone()).with_retention(Retention {
            segment_bytes: 1 << 20,
            max_bytes: 0,
            keep_days: 1,
        });
        let at = |ms: i64| AuditEntry {
            ts_ms: ms,
            ..entry("a", None, None)
        };
        let (t0, day) = (1_764_000_000_000, DAY_MS);
        w.append(&[at(t0), at(t0 + 1), at(t0 + 2)]).unwrap();
        w.maintain(t0 + day / 2).unwrap();
        assert!(
            !dir.join(segment_file_name(1)).exists(),
            "not a day old yet"
        );
        w.append(&[at(t0 + 2 * day)]).unwrap();
        assert!(dir.join(segment_file_name(1)).exists(), "closed: a day old");
        w.maintain(t0 + 2 * day + day / 2).unwrap();
        assert!(
            dir.join(segment_file_name(1)).exists(),
            "its newest is recent"
        );
        w.maintain(t0 + 3 * day + 1).unwrap();
        assert!(!dir.join(segment_file_name(1)).exists(), "pruned");
        let r = verify(&dir, &db).unwrap();
        assert_eq!((r.first_seq, r.last_seq), (5, 5), "{r:?}");
        assert_eq!(r.pruned.unwrap().seq, 5);
    }

    #[test]
    fn segments_a_pruning_did_not_get_to_delete_verify_and_go_next_time() {
        // A crash after the anchor is stored but before the files are
        // deleted: the segments are back, verify still accepts the chain
        // (checking the anchor where it is reached), and the next append
        // deletes them without a second audit.pruned record.
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        let dir = d.path().join("audit");
        let mut w = ChainWriter::new(dir.clone(), db.clone()).with_retention(Retention {
            segment_bytes: 1024,
            max_bytes: 4096,
            keep_days: 0,
        });
        let saved = d.path().join("saved");
        std::fs::create_dir_all(&saved).unwrap();
        let mut n = 0;
        while load_anchor_for(&db, &dir).is_none() {
            for seg in list_segments(&dir).unwrap().0 {
                if seg.first_seq.is_some() {
                    std::fs::copy(&seg.path, saved.join(seg.path.file_name().unwrap())).unwrap();
                }
            }
            w.append(&[entry("a", Some("dev"), None)]).unwrap();
            n += 1;
            assert!(n < 100, "never pruned");
        }
        let anchor = load_anchor_for(&db, &dir).unwrap();
        let mut restored = 0;
        for f in std::fs::read_dir(&saved).unwrap() {
            let f = f.unwrap();
            let to = dir.join(f.file_name());
            if !to.exists() {
                std::fs::copy(f.path(), to).unwrap();
                restored += 1;
            }
        }
        assert!(restored > 0);
        let r = verify(&dir, &db).unwrap();
        assert_eq!(r.first_seq, 1, "the restored segments are checked too");
        let pruned_before = records_with(&dir, PRUNED_ACTION);
        // The process restarts: a new writer.
        let mut w = ChainWriter::new(dir.clone(), db.clone()).with_retention(w.retention);
        w.append(&[entry("b", Some("dev"), None)]).unwrap();
        assert_eq!(
            records_with(&dir, PRUNED_ACTION),
            pruned_before,
            "no new pruning record"
        );
        let r = verify(&dir, &db).unwrap();
        assert_eq!(r.first_seq, anchor.seq, "the leftovers are gone");
    }

    /// Segments of 64 KiB (so the producers' records cross many
    /// rotations), nothing pruned.
    const ROTATING: Retention = Retention {
        segment_bytes: 64 * 1024,
        max_bytes: 0,
        keep_days: 0,
    };

    /// Every record on disk, in chain order (by seq). The writer may
    /// rotate meanwhile (the active segment renamed under the reader): the
    /// read counts only if the segments listed before and after it are
    /// the same.
    fn all_records(dir: &Path) -> Vec<Value> {
        let names = || {
            let mut n: Vec<PathBuf> = list_segments(dir)
                .unwrap()
                .0
                .into_iter()
                .map(|s| s.path)
                .collect();
            n.sort();
            n
        };
        loop {
            let before = names();
            let texts: Option<Vec<String>> = before
                .iter()
                .map(|p| std::fs::read_to_string(p).ok())
                .collect();
            if let Some(texts) = texts
                && names() == before
            {
                // The last line may be half written: whole lines only.
                let mut v: Vec<Value> = texts
                    .iter()
                    .flat_map(|t| t.lines())
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .collect();
                v.sort_by_key(|r| r["seq"].as_u64().unwrap());
                return v;
            }
        }
    }

    /// The outcomes (`i`) of producer `p`'s records, in chain order.
    fn produced(records: &[Value], p: usize) -> Vec<usize> {
        let action = format!("p{p}");
        records
            .iter()
            .filter(|r| r["action"] == action.as_str())
            .map(|r| r["outcome"].as_str().unwrap().parse().unwrap())
            .collect()
    }

    fn record_of(p: usize, i: usize) -> AuditEntry {
        AuditEntry::new(
            crate::clock::system_now_ms(),
            None,
            &format!("p{p}"),
            None,
            &i.to_string(),
            None,
        )
    }

    /// Eight tasks record concurrently while another runs `check_writable`
    /// and `record_durable` (urgent messages that cut the group commit
    /// short) over and over: no record is lost, duplicated or reordered
    /// (each producer's records are on disk exactly once, in its order),
    /// a `record_durable` is on disk when it returns, a `flush` returns
    /// only once everything its caller recorded before is on disk, and the
    /// chain verifies across the rotations. A queue that dropped a
    /// message, let an urgent one overtake a plain one in the batch, or
    /// acknowledged a flush before writing would fail one of these.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_producers_lose_and_reorder_nothing_and_flush_waits_for_them() {
        const P: usize = 8;
        const N: usize = 600;
        const URGENT: usize = 150;
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        let dir = d.path().join("audit");
        let log = Arc::new(AuditLog::start(dir.clone(), db.clone(), ROTATING));
        let mut tasks = Vec::new();
        for p in 0..P {
            let (log, dir) = (log.clone(), dir.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..N {
                    log.record(record_of(p, i)).await;
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                log.flush().await;
                let on_disk = produced(&all_records(&dir), p);
                assert_eq!(
                    on_disk.len(),
                    N,
                    "p{p}: flush returned before its records were on disk"
                );
            }));
        }
        let urgent = {
            let (log, dir) = (log.clone(), dir.clone());
            tokio::spawn(async move {
                for k in 0..URGENT {
                    let now = crate::clock::system_now_ms();
                    log.check_writable(now).await.unwrap();
                    let e = AuditEntry::new(now, None, "durable", None, &k.to_string(), None);
                    log.record_durable(e).await.unwrap();
                    if k % 10 == 0 {
                        assert_eq!(
                            records_with(&dir, "durable"),
                            k + 1,
                            "durable {k} not on disk"
                        );
                    }
                }
            })
        };
        for t in tasks {
            t.await.unwrap();
        }
        urgent.await.unwrap();
        log.close_async().await;
        let records = all_records(&dir);
        for p in 0..P {
            assert_eq!(
                produced(&records, p),
                (0..N).collect::<Vec<_>>(),
                "producer p{p}"
            );
        }
        assert_eq!(records_with(&dir, "durable"), URGENT);
        let report = verify(&dir, &db).unwrap();
        assert_eq!(report.records as usize, P * N + URGENT);
        assert!(report.files > 1, "the test crossed rotations");
    }

    /// `close` while producers keep a full queue (16,000 records against
    /// 4,096 places, so some wait for room): it returns, every producer
    /// finishes (those waiting for room are refused, not left waiting),
    /// what was written is, for each producer, a prefix of what it
    /// recorded (nothing reordered, no gap), and afterwards whoever waits
    /// on the disk hears `unavailable` at once. A close that waited for
    /// room, or a queue that kept its waiters after the writer ended,
    /// would hang past the timeouts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_under_a_full_queue_neither_deadlocks_nor_reorders() {
        const P: usize = 16;
        const N: usize = 1000;
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        let dir = d.path().join("audit");
        let log = Arc::new(AuditLog::start(dir.clone(), db.clone(), ROTATING));
        let tasks: Vec<_> = (0..P)
            .map(|p| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..N {
                        log.record(record_of(p, i)).await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let limit = std::time::Duration::from_secs(20);
        tokio::time::timeout(limit, log.close_async())
            .await
            .expect("close returns under a full queue");
        for t in tasks {
            tokio::time::timeout(limit, t)
                .await
                .expect("a producer waiting for room is let go")
                .unwrap();
        }
        let quick = std::time::Duration::from_secs(2);
        let now = crate::clock::system_now_ms();
        let after = |r: Option<Result<(), AuditUnavailable>>| matches!(r, Some(Err(_)));
        assert!(after(
            tokio::time::timeout(quick, log.check_writable(now))
                .await
                .ok()
        ));
        let e = AuditEntry::new(now, None, "late", None, "x", None);
        assert!(after(
            tokio::time::timeout(quick, log.record_durable(e))
                .await
                .ok()
        ));
        tokio::time::timeout(quick, log.flush())
            .await
            .expect("flush after close returns");
        let records = all_records(&dir);
        let mut written = 0;
        for p in 0..P {
            let got = produced(&records, p);
            assert_eq!(got, (0..got.len()).collect::<Vec<_>>(), "producer p{p}");
            written += got.len();
        }
        assert_eq!(verify(&dir, &db).unwrap().records as usize, written);
        eprintln!("{written} of {} records written before the close", P * N);
    }

    fn load_anchor_for(db: &Db, dir: &Path) -> Option<Anchor> {
        let key = dir.display().to_string();
        db.blocking(move |c| load_anchor(c, &key)).unwrap()
    }

    fn records_with(dir: &Path, action: &str) -> usize {
        list_segments(dir)
            .unwrap()
            .0
            .iter()
            .flat_map(|s| {
                std::fs::read_to_string(&s.path)
                    .unwrap()
                    .lines()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .filter(|l| l.contains(&format!("\"action\":\"{action}\"")))
            .count()
    }
}
