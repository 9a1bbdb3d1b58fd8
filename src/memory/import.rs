//! `secrets-agent memory import FILE`: JSON Lines, one memory per line
//! (`{"content", "category"?, "tags"?, "confidence"?, "id"?, "created_at"?,
//! "updated_at"?}`), embedded in batches and stored one transaction per
//! batch, so a crash leaves whole batches only. A bad line is reported with
//! its number and reason and does not stop the rest.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

use super::NewMemory;
use super::embedder::{Embedder, Status};
use super::store::{self, Confidence, Entry};
use crate::storage::Db;

/// Lines embedded and stored together.
pub const BATCH: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: Option<String>,
    content: String,
    category: Option<String>,
    tags: Option<Vec<String>>,
    confidence: Option<Confidence>,
    created_at: Option<String>,
    updated_at: Option<String>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub imported: usize,
    /// (line number, reason)
    pub failed: Vec<(usize, String)>,
}

fn parse_time(s: &str, field: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("`{field}` is not an RFC 3339 time: {e}"))
}

fn entry(line: &str, now_ms: i64) -> Result<Entry, String> {
    let l: Line = serde_json::from_str(line).map_err(|e| format!("not a memory object: {e}"))?;
    let mut e = NewMemory {
        content: l.content,
        category: l.category,
        tags: l.tags,
        confidence: l.confidence,
    }
    .validate(now_ms)?;
    if let Some(id) = l.id {
        if id.is_empty() || id.chars().count() > 128 {
            return Err("`id` must have 1 to 128 characters".into());
        }
        e.id = id;
    }
    if let Some(t) = l.created_at {
        e.created_at = parse_time(&t, "created_at")?;
        e.updated_at = e.created_at;
    }
    if let Some(t) = l.updated_at {
        e.updated_at = parse_time(&t, "updated_at")?;
    }
    Ok(e)
}

/// Imports `path`. `progress(bytes_read)` is called after each batch.
pub fn run(
    db: &Db,
    embedder: &Embedder,
    path: &Path,
    now_ms: i64,
    mut progress: impl FnMut(u64),
) -> Result<Report, String> {
    // Fails fast, with the fetch instructions, if the model is unavailable.
    embedder.embed_blocking(vec!["probe".into()])?;
    let model_id = match embedder.status() {
        Status::Ready { model_id } => model_id,
        Status::Unavailable(m) => return Err(m),
        Status::Loading => return Err("the embedding model did not load".into()),
    };
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut report = Report::default();
    let mut batch: Vec<(usize, Entry)> = Vec::with_capacity(BATCH);
    let mut seen: HashSet<String> = HashSet::new();
    let (mut n, mut bytes) = (0usize, 0u64);
    let mut buf = String::new();
    loop {
        buf.clear();
        let read = reader
            .read_line(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let eof = read == 0;
        if !eof {
            n += 1;
            bytes += read as u64;
            let line = buf.trim();
            if !line.is_empty() {
                match entry(line, now_ms) {
                    Ok(e) if !seen.insert(e.id.clone()) => report
                        .failed
                        .push((n, format!("id {:?} appears twice in the file", e.id))),
                    Ok(e) => batch.push((n, e)),
                    Err(reason) => report.failed.push((n, reason)),
                }
            }
        }
        if batch.len() >= BATCH || (eof && !batch.is_empty()) {
            flush(db, embedder, &model_id, &mut batch, &mut report);
            progress(bytes);
        }
        if eof {
            break;
        }
    }
    report.failed.sort_by_key(|f| f.0);
    Ok(report)
}

fn flush(
    db: &Db,
    embedder: &Embedder,
    model_id: &str,
    batch: &mut Vec<(usize, Entry)>,
    report: &mut Report,
) {
    let items = std::mem::take(batch);
    // Ids already stored are refused line by line, before embedding.
    let mut fresh = Vec::with_capacity(items.len());
    for (n, e) in items {
        match db.blocking(|c| store::exists(c, &e.id)) {
            Ok(true) => report
                .failed
                .push((n, format!("a memory with id {:?} already exists", e.id))),
            Ok(false) => fresh.push((n, e)),
            Err(err) => report.failed.push((n, err.to_string())),
        }
    }
    if fresh.is_empty() {
        return;
    }
    let texts = fresh.iter().map(|(_, e)| e.content.clone()).collect();
    let vectors = match embedder.embed_blocking(texts) {
        Ok(v) => v,
        Err(reason) => {
            report
                .failed
                .extend(fresh.iter().map(|(n, _)| (*n, reason.clone())));
            return;
        }
    };
    let lines: Vec<usize> = fresh.iter().map(|(n, _)| *n).collect();
    let rows: Vec<(Entry, Vec<f32>)> = fresh.into_iter().map(|(_, e)| e).zip(vectors).collect();
    match db.blocking(|c| store::insert_batch(c, &rows, model_id)) {
        Ok(_) => report.imported += rows.len(),
        Err(e) => report.failed.extend(
            lines
                .into_iter()
                .map(|n| (n, format!("not stored (the batch was rolled back): {e}"))),
        ),
    }
}
