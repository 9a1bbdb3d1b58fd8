//! `get_config` (sanitized, never a secret).

use std::sync::Arc;

use crate::rpc::{ActionResult, Caller, NoParams};
use crate::state::AppState;

pub async fn get_config(state: Arc<AppState>, _caller: Caller, _p: NoParams) -> ActionResult {
    let mut v = state.config().public_view();
    v["result"] = "config".into();
    Ok(v)
}
