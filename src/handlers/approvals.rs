//! `list_approvals`: what is waiting for a biometric approval.

use std::sync::Arc;

use serde_json::json;

use crate::rpc::{ActionResult, Caller, NoParams};
use crate::state::AppState;

pub async fn list_approvals(state: Arc<AppState>, _caller: Caller, _p: NoParams) -> ActionResult {
    Ok(json!({"result": "approvals", "approvals": state.approvals.list_pending()}))
}
