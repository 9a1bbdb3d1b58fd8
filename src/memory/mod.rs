//! Memory: what the agent knows about its owner — entries in SQLite with
//! their embeddings, an in-memory vector index for exact semantic search,
//! and the embedding model on its own thread.
//!
//! Heavy work never runs on async worker threads: inference on the
//! embedder thread, SQLite through `Db::call`, vector scans and index
//! writes on the blocking pool. It is bounded: at most [`MAX_ADMITTED`]
//! `create_memory`/`search_memories`/`list_memories` requests are admitted
//! at once (running or waiting for the embedder or a scan), and at most
//! [`MAX_SCANS`] scans run together; a request beyond the bound is answered
//! `busy` with `retry_after_ms` at once instead of queueing.

pub mod embedder;
pub mod import;
pub mod index;
pub mod store;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::storage::{Db, StorageError};
use embedder::{Embedder, Status};
use index::VectorIndex;
use store::{Confidence, Entry};

/// The longest memory content accepted, in bytes.
pub const MAX_CONTENT_BYTES: usize = 32 * 1024;
const MAX_TAGS: usize = 32;
const MAX_TAG_CHARS: usize = 64;
const MAX_CATEGORY_CHARS: usize = 64;

/// A new memory as given by `create_memory` or an import line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMemory {
    pub content: String,
    pub category: Option<String>,
    pub tags: Option<Vec<String>>,
    pub confidence: Option<Confidence>,
}

impl NewMemory {
    /// Checks limits; returns the entry to store (a fresh id, times `now_ms`).
    pub fn validate(self, now_ms: i64) -> Result<Entry, String> {
        if self.content.trim().is_empty() {
            return Err("`content` must not be empty".into());
        }
        if self.content.len() > MAX_CONTENT_BYTES {
            return Err(format!(
                "`content` is {} bytes; at most {MAX_CONTENT_BYTES}",
                self.content.len()
            ));
        }
        let category = self.category.unwrap_or_else(|| "note".into());
        if category.trim().is_empty() || category.chars().count() > MAX_CATEGORY_CHARS {
            return Err(format!(
                "`category` must have 1 to {MAX_CATEGORY_CHARS} characters"
            ));
        }
        let tags = self.tags.unwrap_or_default();
        if tags.len() > MAX_TAGS
            || tags
                .iter()
                .any(|t| t.is_empty() || t.chars().count() > MAX_TAG_CHARS)
        {
            return Err(format!(
                "`tags`: at most {MAX_TAGS}, each 1 to {MAX_TAG_CHARS} characters"
            ));
        }
        Ok(Entry {
            id: new_id(),
            content: self.content,
            category,
            tags,
            confidence: self.confidence.unwrap_or(Confidence::Medium),
            created_at: now_ms,
            updated_at: now_ms,
        })
    }
}

/// `mem_` + 16 random hex characters.
pub fn new_id() -> String {
    crate::ids::memory_id()
}

/// Memory requests admitted at once (all devices together).
pub const MAX_ADMITTED: usize = 32;
/// Vector scans running at once (each may use several cores on a large index).
pub const MAX_SCANS: usize = 2;
/// The `retry_after_ms` of a `busy` answer.
pub const BUSY_RETRY_AFTER_MS: u64 = 250;

/// The memory service: it owns what it uses (its `Db` handle, the vector
/// index, the embedder and its admission limits); handlers reach it through
/// `AppState`, and it never reaches the server's state.
pub struct Memory {
    db: Db,
    index: Arc<RwLock<VectorIndex>>,
    /// `index.len()`, readable without the lock (the dashboard never waits on a scan).
    count: Arc<AtomicUsize>,
    admitted: Arc<Semaphore>,
    scans: Arc<Semaphore>,
    pub embedder: Embedder,
}

/// Holds a memory request's admission (see [`Memory::admit`]).
#[derive(Debug)]
pub struct Admission(#[allow(dead_code)] OwnedSemaphorePermit);

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("embedder", &self.embedder)
            .finish()
    }
}

/// Why a memory operation failed (the wire code is chosen in `errors.rs`).
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// [`MAX_ADMITTED`] requests are being served already.
    #[error(
        "memory is busy: {MAX_ADMITTED} memory requests are already being served; retry shortly"
    )]
    Busy,
    /// The embedding model cannot be used (the text says why and what to do).
    #[error("{0}")]
    ModelUnavailable(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Anything else that went wrong inside the server.
    #[error("{0}")]
    Internal(String),
}

/// `retry_after_ms` suggested with [`MemoryError::Busy`].
pub const BUSY_RETRY_MS: u64 = BUSY_RETRY_AFTER_MS;

impl Memory {
    /// Loads every stored vector into the index and starts the embedder.
    pub fn open(db: &Db, model_dir: std::path::PathBuf) -> Result<Memory, StorageError> {
        let rows = db.blocking(|c| store::vectors_after(c, 0))?;
        let mut index = VectorIndex::default();
        for (rowid, id, v) in rows {
            if v.len() == index::DIM {
                index.insert(&id, &v);
            }
            index.max_rowid = index.max_rowid.max(rowid);
        }
        tracing::info!(memories = index.len(), "memory index loaded");
        Ok(Memory {
            db: db.clone(),
            count: Arc::new(AtomicUsize::new(index.len())),
            index: Arc::new(RwLock::new(index)),
            admitted: Arc::new(Semaphore::new(MAX_ADMITTED)),
            scans: Arc::new(Semaphore::new(MAX_SCANS)),
            embedder: Embedder::start(model_dir),
        })
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Admits one memory request, or answers `busy` at once when
    /// [`MAX_ADMITTED`] are already admitted. Hold the value until done.
    pub fn admit(&self) -> Result<Admission, MemoryError> {
        self.admitted
            .clone()
            .try_acquire_owned()
            .map(Admission)
            .map_err(|_| MemoryError::Busy)
    }

    /// Runs `f` on the index (under its write lock) on the blocking pool.
    async fn update_index<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VectorIndex) -> R + Send + 'static,
    ) -> Result<R, MemoryError> {
        let (index, count) = (self.index.clone(), self.count.clone());
        tokio::task::spawn_blocking(move || {
            let mut idx = index.write().unwrap_or_else(|p| p.into_inner());
            let r = f(&mut idx);
            count.store(idx.len(), Ordering::Relaxed);
            r
        })
        .await
        .map_err(|e| MemoryError::Internal(format!("index update failed: {e}")))
    }

    fn model_id(&self) -> Result<String, MemoryError> {
        match self.embedder.status() {
            Status::Ready { model_id } => Ok(model_id),
            Status::Unavailable(m) => Err(MemoryError::ModelUnavailable(m)),
            Status::Loading => Ok(String::new()),
        }
    }

    async fn embed(&self, texts: Vec<String>) -> Result<(Vec<Vec<f32>>, String), MemoryError> {
        self.model_id()?;
        let vs = self
            .embedder
            .embed(texts)
            .await
            .map_err(MemoryError::ModelUnavailable)?;
        Ok((vs, self.model_id()?))
    }

    /// Stores a memory with its embedding; visible to list and search once
    /// this returns.
    pub async fn create(&self, entry: Entry) -> Result<Entry, MemoryError> {
        let (mut vs, model_id) = self.embed(vec![entry.content.clone()]).await?;
        let v = vs
            .pop()
            .ok_or_else(|| MemoryError::Internal("no embedding returned".into()))?;
        let (e2, v2) = (entry.clone(), v.clone());
        let rowids = self
            .db
            .call(move |c| store::insert_batch(c, &[(e2, v2)], &model_id))
            .await?;
        let (id, rowid) = (entry.id.clone(), rowids[0]);
        self.update_index(move |idx| {
            idx.insert(&id, &v);
            idx.max_rowid = idx.max_rowid.max(rowid);
        })
        .await?;
        Ok(entry)
    }

    pub async fn delete(&self, id: &str) -> Result<bool, MemoryError> {
        let id2 = id.to_string();
        let found = self.db.call(move |c| store::delete(c, &id2)).await?;
        let id = id.to_string();
        self.update_index(move |idx| idx.remove(&id)).await?;
        Ok(found)
    }

    /// Best first: (entry, cosine similarity).
    pub async fn search(
        &self,
        query: &str,
        limit: usize,
    ) -> Result<Vec<(Entry, f32)>, MemoryError> {
        let (mut vs, _) = self.embed(vec![query.to_string()]).await?;
        let q = vs
            .pop()
            .ok_or_else(|| MemoryError::Internal("no embedding returned".into()))?;
        // The scan is CPU-bound (and takes milliseconds on a large index):
        // on the blocking pool, at most MAX_SCANS at once.
        let _scan = self
            .scans
            .acquire()
            .await
            .map_err(|_| MemoryError::Internal("the scan limiter is closed".into()))?;
        let index = self.index.clone();
        let hits = tokio::task::spawn_blocking(move || {
            index
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .search(&q, limit)
        })
        .await
        .map_err(|e| MemoryError::Internal(format!("search failed: {e}")))?;
        let ids: Vec<String> = hits.iter().map(|(id, _)| id.to_string()).collect();
        let mut entries = self.db.call(move |c| store::get_many(c, &ids)).await?;
        Ok(hits
            .into_iter()
            .filter_map(|(id, s)| entries.remove(&*id).map(|e| (e, s)))
            .collect())
    }

    /// Picks up rows another process (the `memory import` CLI) committed.
    pub async fn catch_up(&self) -> Result<usize, StorageError> {
        let after = self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .max_rowid;
        let newest = self.db.call(|c| store::max_rowid(c)).await?;
        if newest <= after {
            return Ok(0);
        }
        let rows = self
            .db
            .call(move |c| store::vectors_after(c, after))
            .await?;
        let added = self
            .update_index(move |idx| {
                let mut added = 0;
                for (rowid, id, v) in rows {
                    if v.len() == index::DIM && !idx.contains(&id) {
                        idx.insert(&id, &v);
                        added += 1;
                    }
                    idx.max_rowid = idx.max_rowid.max(rowid);
                }
                added
            })
            .await
            .unwrap_or(0);
        Ok(added)
    }
}

impl Memory {
    /// Keeps the index in step with rows that the `memory import` CLI
    /// commits (another process): checks every 2 s until `shutdown`.
    /// (`update_config` reloads the embedder itself when `memory.model_dir`
    /// changes.)
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    match self.catch_up().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(added = n, "memories imported by another process are now searchable"),
                        Err(e) => tracing::error!(error = %e, "memory index catch-up failed"),
                    }
                }
            }
        }
    }
}
