//! Memories in `agent.db`: each row holds its embedding, so a memory is
//! never visible without one, and a delete removes both.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Value, json};

use crate::clock::rfc3339_ms;
use crate::storage::StorageError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    Low,
    Medium,
    High,
}

impl Confidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Confidence::Low => "low",
            Confidence::Medium => "medium",
            Confidence::High => "high",
        }
    }
    fn parse(s: &str) -> Confidence {
        match s {
            "low" => Confidence::Low,
            "high" => Confidence::High,
            _ => Confidence::Medium,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    pub content: String,
    pub category: String,
    pub tags: Vec<String>,
    pub confidence: Confidence,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Entry {
    /// The wire form (SPEC §6).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "content": self.content, "category": self.category, "tags": self.tags,
            "confidence": self.confidence.as_str(), "created_at": rfc3339_ms(self.created_at),
            "updated_at": rfc3339_ms(self.updated_at),
        })
    }

    fn from_row(r: &Row<'_>) -> rusqlite::Result<Entry> {
        let tags: String = r.get(3)?;
        let confidence: String = r.get(4)?;
        Ok(Entry {
            id: r.get(0)?,
            content: r.get(1)?,
            category: r.get(2)?,
            tags: serde_json::from_str(&tags).unwrap_or_default(),
            confidence: Confidence::parse(&confidence),
            created_at: r.get(5)?,
            updated_at: r.get(6)?,
        })
    }
}

const COLS: &str = "id, content, category, tags, confidence, created_at, updated_at";

pub fn encode(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn decode(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Inserts entries with their embeddings in one transaction (all or none).
/// Returns the rowid of each.
pub fn insert_batch(
    c: &mut Connection,
    rows: &[(Entry, Vec<f32>)],
    model_id: &str,
) -> Result<Vec<i64>, StorageError> {
    let tx = c.transaction()?;
    let mut rowids = Vec::with_capacity(rows.len());
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO memories(id, content, category, tags, confidence, created_at, updated_at, embedding, model_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for (e, v) in rows {
            st.execute(params![
                e.id,
                e.content,
                e.category,
                serde_json::to_string(&e.tags).unwrap_or_else(|_| "[]".into()),
                e.confidence.as_str(),
                e.created_at,
                e.updated_at,
                encode(v),
                model_id
            ])?;
            rowids.push(tx.last_insert_rowid());
        }
    }
    tx.commit()?;
    Ok(rowids)
}

pub fn exists(c: &Connection, id: &str) -> Result<bool, StorageError> {
    Ok(
        c.query_row("SELECT 1 FROM memories WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

pub fn get(c: &Connection, id: &str) -> Result<Option<Entry>, StorageError> {
    let sql = format!("SELECT {COLS} FROM memories WHERE id = ?1");
    Ok(c.query_row(&sql, [id], Entry::from_row).optional()?)
}

pub fn get_many(c: &Connection, ids: &[String]) -> Result<HashMap<String, Entry>, StorageError> {
    let sql = format!("SELECT {COLS} FROM memories WHERE id = ?1");
    let mut st = c.prepare_cached(&sql)?;
    let mut out = HashMap::with_capacity(ids.len());
    for id in ids {
        if let Some(e) = st.query_row([id], Entry::from_row).optional()? {
            out.insert(id.clone(), e);
        }
    }
    Ok(out)
}

pub fn delete(c: &Connection, id: &str) -> Result<bool, StorageError> {
    Ok(c.execute("DELETE FROM memories WHERE id = ?1", [id])? > 0)
}

pub fn count(c: &Connection) -> Result<i64, StorageError> {
    Ok(c.query_row("SELECT COUNT(*) FROM memories", [], |r| r.get(0))?)
}

/// Newest first (then by id, so pages never overlap or skip).
pub fn list(c: &Connection, offset: i64, limit: i64) -> Result<Vec<Entry>, StorageError> {
    let sql =
        format!("SELECT {COLS} FROM memories ORDER BY created_at DESC, id DESC LIMIT ?1 OFFSET ?2");
    let mut st = c.prepare_cached(&sql)?;
    let rows = st.query_map(params![limit, offset], Entry::from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Embeddings of rows after `rowid`, for the index: (rowid, id, vector).
pub fn vectors_after(
    c: &Connection,
    rowid: i64,
) -> Result<Vec<(i64, String, Vec<f32>)>, StorageError> {
    let mut st =
        c.prepare("SELECT rowid, id, embedding FROM memories WHERE rowid > ?1 ORDER BY rowid")?;
    let rows = st.query_map([rowid], |r| {
        Ok((r.get(0)?, r.get(1)?, decode(&r.get::<_, Vec<u8>>(2)?)))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn max_rowid(c: &Connection) -> Result<i64, StorageError> {
    Ok(
        c.query_row("SELECT COALESCE(MAX(rowid), 0) FROM memories", [], |r| {
            r.get(0)
        })?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> (Entry, Vec<f32>) {
        (
            Entry {
                id: id.into(),
                content: "c".into(),
                category: "note".into(),
                tags: vec![],
                confidence: Confidence::Medium,
                created_at: 1,
                updated_at: 1,
            },
            vec![0.5; 384],
        )
    }

    #[test]
    fn rowids_are_never_reused_so_catch_up_misses_nothing() {
        let d = tempfile::tempdir().unwrap();
        let db = crate::storage::Db::open(&d.path().join("agent.db")).unwrap();
        db.blocking(|c| {
            insert_batch(c, &[entry("a"), entry("b")], "m")?;
            let seen = max_rowid(c)?;
            assert!(delete(c, "b")?, "the newest row is deleted");
            insert_batch(c, &[entry("c")], "m")?;
            let after = vectors_after(c, seen)?;
            assert_eq!(
                after.len(),
                1,
                "the new row is after the highest rowid seen"
            );
            assert_eq!(after[0].1, "c");
            assert!(
                insert_batch(c, &[entry("d"), entry("a")], "m").is_err(),
                "a duplicate id fails the batch"
            );
            assert!(!exists(c, "d")?, "all or nothing");
            Ok(())
        })
        .unwrap();
    }
}
