//! The one method registry (a jsonrpsee `RpcModule`) and the two codecs over
//! it: the seed `admin` envelope and JSON-RPC 2.0 (SPEC §5).
//!
//! Every action is registered once, with a typed params struct. `call` runs
//! an action for an authenticated caller: the caller reaches the handler
//! through the call's `Extensions`, and every call is audited here, so no
//! handler has to remember to.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use jsonrpsee_core::server::{ConnectionId, Extensions, MethodCallback, Methods, RpcModule};
use jsonrpsee_types::{Id, Params};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::protocol::{ApiError, ErrorCode};
use crate::redact::redact_action_params;
pub use crate::sessions::Caller;
use crate::state::AppState;
use crate::storage::audit::jcs_digest;

/// Actions that only read. They still answer while the audit log cannot be
/// written (their records are then counted in the next `audit.lost`);
/// every other action, gated ones included, is refused with `unavailable`.
/// A new action is state-changing unless it is added here.
pub const READ_ONLY_ACTIONS: &[&str] = &[
    "get_dashboard",
    "get_config",
    "list_devices",
    "list_approvals",
    "list_plugins",
    "list_skills",
    "list_scheduled_tasks",
    "list_task_executions",
    "list_memories",
    "search_memories",
    "list_secrets",
    "list_secret_leases",
];

/// Whether `action` only reads (see [`READ_ONLY_ACTIONS`]).
pub fn is_read_only(action: &str) -> bool {
    READ_ONLY_ACTIONS.contains(&action)
}

/// The audit record's `action` for a name no action is registered under;
/// `params_digest` is then the JCS digest of `{"action": NAME, "params": PARAMS}`.
pub const UNKNOWN_ACTION_RECORD: &str = "unknown_action";

pub type ActionResult = Result<Value, ApiError>;

/// An action without params: any param is refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// Parses named params; absent params are `{}`.
pub fn parse_params<P: DeserializeOwned>(raw: Option<&str>) -> Result<P, ApiError> {
    serde_json::from_str(raw.unwrap_or("{}"))
        .map_err(|e| ApiError::invalid(format!("invalid params: {e}")))
}

/// Checks that raw params parse as an action's params type.
pub type ParamsCheck = fn(Option<&str>) -> Result<(), ApiError>;

/// Collects actions: the jsonrpsee module, and a params check per action
/// (for `Registry::check_params`, which the fuzz targets drive).
pub struct Actions {
    pub(crate) module: RpcModule<AppState>,
    pub(crate) checks: HashMap<&'static str, ParamsCheck>,
    /// Actions that wait for a biometric approval (`register_gated`).
    pub(crate) gated: std::collections::HashSet<&'static str>,
}

impl Actions {
    pub fn new(state: Arc<AppState>) -> Actions {
        Actions {
            module: RpcModule::from_arc(state),
            checks: HashMap::new(),
            gated: Default::default(),
        }
    }
    pub(crate) fn add_check<P: DeserializeOwned>(&mut self, name: &'static str) {
        self.checks
            .insert(name, |raw| parse_params::<P>(raw).map(|_| ()));
    }
}

/// Params as the frame carried them (an object without `action`), parsed
/// once with the frame.
pub type RawParams = Map<String, Value>;

/// Parses an action's params from the frame's params object: no text is
/// parsed again (a `Value` tree moves into the typed struct).
pub fn params_from<P: DeserializeOwned>(raw: RawParams) -> Result<P, ApiError> {
    P::deserialize(Value::Object(raw))
        .map_err(|e| ApiError::invalid(format!("invalid params: {e}")))
}

/// [`params_from`] without giving up the params (a gated action shows them
/// to the approver as well).
pub fn params_from_ref<P: DeserializeOwned>(raw: &Value) -> Result<P, ApiError> {
    P::deserialize(raw).map_err(|e| ApiError::invalid(format!("invalid params: {e}")))
}

/// One call's way in and out of the registry, through `Extensions`: the
/// caller and the params go in, the handler's result comes out, as Rust
/// values. jsonrpsee finds and runs the method; its own params text and
/// JSON-RPC response are not used, so a request is parsed once (with its
/// frame) and its result serialised once (into the outgoing frame), and an
/// error never makes a round trip through a JSON-RPC error object.
#[derive(Clone)]
struct CallSlot(Arc<std::sync::Mutex<CallState>>);

struct CallState {
    input: Option<(Caller, RawParams)>,
    output: Option<ActionResult>,
}

impl CallSlot {
    fn new(caller: Caller, params: RawParams) -> CallSlot {
        CallSlot(Arc::new(std::sync::Mutex::new(CallState {
            input: Some((caller, params)),
            output: None,
        })))
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, CallState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn take_input(&self) -> Option<(Caller, RawParams)> {
        self.lock().input.take()
    }
    fn put_output(&self, out: ActionResult) {
        self.lock().output = Some(out);
    }
    fn take_output(&self) -> Option<ActionResult> {
        self.lock().output.take()
    }
}

/// Registers an action that takes its params as the frame carried them
/// (`P` is their type, for `Registry::check_params`): `f(state, caller, raw)`.
/// The building block of [`register`] and of the approval gate.
pub fn register_raw<P, F, Fut>(actions: &mut Actions, name: &'static str, f: F)
where
    P: DeserializeOwned + Send + 'static,
    F: Fn(Arc<AppState>, Caller, RawParams) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ActionResult> + Send + 'static,
{
    actions.add_check::<P>(name);
    actions
        .module
        .register_async_method(
            name,
            move |_: Params<'static>, state: Arc<AppState>, ext: Extensions| {
                let f = f.clone();
                async move {
                    let Some(slot) = ext.get::<CallSlot>().cloned() else {
                        return;
                    };
                    let Some((caller, params)) = slot.take_input() else {
                        return;
                    };
                    let out = f(state, caller, params).await;
                    slot.put_output(out);
                }
            },
        )
        .unwrap_or_else(|e| panic!("action {name} registered twice: {e}"));
}

/// Registers an action: `f(state, caller, params)`.
pub fn register<P, F, Fut>(actions: &mut Actions, name: &'static str, f: F)
where
    P: DeserializeOwned + Send + 'static,
    F: Fn(Arc<AppState>, Caller, P) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ActionResult> + Send + 'static,
{
    register_raw::<P, _, _>(actions, name, move |state, caller, raw| {
        let f = f.clone();
        async move { f(state, caller, params_from(raw)?).await }
    });
}

/// The registry: every action, type-erased.
#[derive(Clone)]
pub struct Registry {
    methods: Methods,
    checks: Arc<HashMap<&'static str, ParamsCheck>>,
    gated: Arc<std::collections::HashSet<&'static str>>,
}

impl Registry {
    pub fn new(actions: Actions) -> Registry {
        Registry {
            methods: actions.module.into(),
            checks: Arc::new(actions.checks),
            gated: Arc::new(actions.gated),
        }
    }

    /// Whether `action` waits for a biometric approval: the one list, kept
    /// by `register_gated` itself.
    pub fn is_gated(&self, action: &str) -> bool {
        self.gated.contains(action)
    }

    /// Every gated action name, sorted.
    pub fn gated_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.gated.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Parses `raw` params as `action`'s params type, without running it.
    pub fn check_params(&self, action: &str, raw: Option<&str>) -> Result<(), ApiError> {
        match self.checks.get(action) {
            Some(check) => check(raw),
            None => Err(ApiError::new(
                ErrorCode::UnknownAction,
                format!("unknown action {action:?}"),
            )),
        }
    }

    pub fn action_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.methods.method_names().collect();
        v.sort_unstable();
        v
    }

    /// Runs `action` with `params` (an object without `action`) for `caller`,
    /// and audits the outcome. Ok is the payload object.
    ///
    /// Fails closed: an action not in [`READ_ONLY_ACTIONS`] runs only after
    /// the audit log proved writable ([`AppState::require_audit`]); else it
    /// answers `unavailable` and does not run. An unregistered name is
    /// recorded as [`UNKNOWN_ACTION_RECORD`], its name only inside
    /// `params_digest`, so a peer cannot write text into the audit log.
    pub async fn call(
        &self,
        state: &AppState,
        action: &str,
        params: RawParams,
        caller: Caller,
    ) -> ActionResult {
        let redacted = redact_action_params(action, &params);
        let method = self.methods.method(action);
        let (audited_action, digest) = if method.is_some() {
            (action, jcs_digest(&redacted))
        } else {
            (
                UNKNOWN_ACTION_RECORD,
                jcs_digest(&serde_json::json!({"action": action, "params": redacted})),
            )
        };
        let device = caller.device_id.clone();
        let out = match method {
            None => Err(ApiError::new(
                ErrorCode::UnknownAction,
                format!("unknown action {action:?}"),
            )),
            Some(m) if !is_read_only(action) => match state.require_audit().await {
                Ok(()) => invoke(m, params, caller).await,
                Err(e) => Err(e),
            },
            Some(m) => invoke(m, params, caller).await,
        };
        let outcome = match &out {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        state
            .auditor
            .record(Some(&device), audited_action, Some(digest), outcome, None)
            .await;
        out
    }
}

/// Runs one registered method with `params` for `caller`, through a
/// [`CallSlot`] (see there).
async fn invoke(method: &MethodCallback, params: RawParams, caller: Caller) -> ActionResult {
    let MethodCallback::Async(cb) = method else {
        return Err(ApiError::internal("every action is registered as async"));
    };
    let slot = CallSlot::new(caller, params);
    let mut ext = Extensions::new();
    ext.insert(slot.clone());
    cb(
        Id::Number(0),
        Params::new(None),
        ConnectionId(0),
        usize::MAX,
        ext,
    )
    .await;
    slot.take_output()
        .unwrap_or_else(|| Err(ApiError::internal("the action produced no result")))
}
