//! The registry glue of gated actions: what turns a handler pair
//! (`prepare`, `run`) into an action that waits in the approval gate
//! ([`crate::approvals::Approvals::gate`]). It lives here because the
//! registry's context is the server state; the gate itself never sees it.

use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::approvals::{Approved, GateRequest};
use crate::protocol::ApiError;
use crate::rpc::{ActionResult, Actions, Caller, params_from_ref, register_raw};
use crate::state::AppState;

/// Registers a gated action. `prepare` validates (and may refuse) before
/// any phone is asked; `run` executes after approval.
pub fn register_gated<P, G, Prep, PrepFut, Run, RunFut>(
    actions: &mut Actions,
    name: &'static str,
    prepare: Prep,
    run: Run,
) where
    P: DeserializeOwned + Send + 'static,
    Prep: Fn(Arc<AppState>, P) -> PrepFut + Clone + Send + Sync + 'static,
    PrepFut: Future<Output = Result<G, ApiError>> + Send + 'static,
    G: Into<GateRequest<P>>,
    Run: Fn(Arc<AppState>, Approved<P>) -> RunFut + Clone + Send + Sync + 'static,
    RunFut: Future<Output = ActionResult> + Send + 'static,
{
    register_gated_for_caller(
        actions,
        name,
        move |state, _caller, p| prepare(state, p),
        run,
    );
}

/// Like [`register_gated`], for an action whose `prepare` must see the
/// caller (e.g. `reveal_secret`, refused before asking unless the session
/// is over TLS or loopback).
pub fn register_gated_for_caller<P, G, Prep, PrepFut, Run, RunFut>(
    actions: &mut Actions,
    name: &'static str,
    prepare: Prep,
    run: Run,
) where
    P: DeserializeOwned + Send + 'static,
    Prep: Fn(Arc<AppState>, Caller, P) -> PrepFut + Clone + Send + Sync + 'static,
    PrepFut: Future<Output = Result<G, ApiError>> + Send + 'static,
    G: Into<GateRequest<P>>,
    Run: Fn(Arc<AppState>, Approved<P>) -> RunFut + Clone + Send + Sync + 'static,
    RunFut: Future<Output = ActionResult> + Send + 'static,
{
    // The device budget asks the registry which actions are gated.
    actions.gated.insert(name);
    register_raw::<P, _, _>(actions, name, move |state, caller, raw| {
        let (prepare, run) = (prepare.clone(), run.clone());
        async move {
            let raw = Value::Object(raw);
            let p: P = params_from_ref(&raw)?;
            let request: GateRequest<P> = prepare(state.clone(), caller.clone(), p).await?.into();
            let approved = state.approvals.gate(&caller, name, &raw, request).await?;
            run(state, approved).await
        }
    });
}
