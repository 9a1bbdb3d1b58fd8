//! `create_memory`, `list_memories`, `search_memories`, `delete_memory` (gated).
//! The first three are admitted by `Memory::admit` (bounded: `busy` beyond)
//! after their params are checked.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::approvals::{Approved, Prepared};
use crate::memory::{NewMemory, store};
use crate::protocol::ApiError;
use crate::rpc::{ActionResult, Caller};
use crate::state::AppState;

pub async fn create_memory(state: Arc<AppState>, _c: Caller, p: NewMemory) -> ActionResult {
    let entry = p
        .validate(state.clock.now_ms())
        .map_err(ApiError::invalid)?;
    let _admitted = state.memory.admit()?;
    let entry = state.memory.create(entry).await?;
    Ok(json!({"result": "memory", "entry": entry.to_json()}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListMemories {
    page: Option<u32>,
    per_page: Option<u32>,
}

pub async fn list_memories(state: Arc<AppState>, _c: Caller, p: ListMemories) -> ActionResult {
    let page = p.page.unwrap_or(1);
    let per_page = p.per_page.unwrap_or(20);
    if page < 1 {
        return Err(ApiError::invalid("`page` starts at 1"));
    }
    if !(1..=100).contains(&per_page) {
        return Err(ApiError::invalid("`per_page` must be in 1..=100"));
    }
    let offset = (page as i64 - 1) * per_page as i64;
    let _admitted = state.memory.admit()?;
    let (entries, total) = state
        .db
        .call(move |c| Ok((store::list(c, offset, per_page as i64)?, store::count(c)?)))
        .await?;
    Ok(
        json!({"result": "memories", "entries": entries.iter().map(|e| e.to_json()).collect::<Vec<_>>(),
              "page": page, "per_page": per_page, "total": total}),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchMemories {
    query: String,
    limit: Option<usize>,
}

pub async fn search_memories(state: Arc<AppState>, _c: Caller, p: SearchMemories) -> ActionResult {
    let limit = p.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("`limit` must be in 1..=100"));
    }
    if p.query.trim().is_empty() {
        return Err(ApiError::invalid("`query` must not be empty"));
    }
    if p.query.len() > crate::memory::MAX_CONTENT_BYTES {
        return Err(ApiError::invalid("`query` is too long"));
    }
    let _admitted = state.memory.admit()?;
    let hits = state.memory.search(&p.query, limit).await?;
    let results: Vec<_> = hits
        .iter()
        .map(|(e, s)| json!({"entry": e.to_json(), "similarity": s}))
        .collect();
    Ok(json!({"result": "memory_search", "results": results}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteMemory {
    id: String,
}

fn shorten(s: &str, max: usize) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        format!("{}…", flat.chars().take(max).collect::<String>())
    }
}

/// `not_found` before any phone is asked; the summary shows the content.
pub async fn prepare_delete(
    state: Arc<AppState>,
    p: DeleteMemory,
) -> Result<Prepared<DeleteMemory>, ApiError> {
    let id = p.id.clone();
    let entry = state
        .db
        .call(move |c| store::get(c, &id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no memory {:?}", p.id)))?;
    let summary = format!(
        "Delete memory {}: \"{}\"",
        entry.id,
        shorten(&entry.content, 60)
    );
    Ok(Prepared { params: p, summary })
}

pub async fn delete_memory(state: Arc<AppState>, approved: Approved<DeleteMemory>) -> ActionResult {
    let id = approved.params().id.clone();
    if !state.memory.delete(&id).await? {
        return Err(ApiError::not_found(format!("no memory {id:?}")));
    }
    tracing::info!(memory = %id, approval = approved.approval_id(), "memory deleted");
    Ok(json!({"result": "success", "message": format!("Memory '{id}' deleted")}))
}
