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
use jsonrpsee_types::{ErrorObjectOwned, Id, Params};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::protocol::{ApiError, ErrorCode};
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

/// Who is calling: reaches every handler through `Extensions`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub session_id: Arc<str>,
    pub device_id: Arc<str>,
    /// The session's peer address (for `reveal_secret`: TLS or loopback only).
    pub peer: Option<std::net::SocketAddr>,
    /// The envelope `request_id`, or the JSON-RPC id rendered as a string.
    pub request_id: Arc<str>,
}

pub type ActionResult = Result<Value, ApiError>;

/// Keys whose values are secrets wherever they appear in params.
pub const SECRET_KEYS: &[&str] = &["api_key", "password", "token", "secret"];

/// Params that are secrets for one action only, named by their path from
/// the params object (a key such as `value` is a secret in `set_secret`,
/// not in `update_config`, where only `[notify] url` is).
pub fn action_secret_paths(action: &str, params: &Value) -> &'static [&'static [&'static str]] {
    match action {
        "set_secret" => &[&["value"]],
        "update_config" if params.get("section").and_then(Value::as_str) == Some("notify") => {
            &[&["value", "url"]]
        }
        _ => &[],
    }
}

/// A copy of `params` with each of `action`'s own secret params
/// ([`action_secret_paths`]) replaced by `mask(value)`.
pub fn mask_action_secrets(
    action: &str,
    params: &Value,
    mask: &mut dyn FnMut(&Value) -> Value,
) -> Value {
    let mut out = params.clone();
    for path in action_secret_paths(action, params) {
        let mut slot = Some(&mut out);
        for k in path.iter() {
            slot = slot.and_then(|v| v.get_mut(*k));
        }
        if let Some(v) = slot {
            *v = mask(v);
        }
    }
    out
}

/// [`redact_secrets`] after [`mask_action_secrets`]: what the audit sees.
pub fn redact_action_params(action: &str, params: &Value) -> Value {
    let masked = mask_action_secrets(action, params, &mut |v| {
        if v.is_null() {
            Value::Null
        } else {
            Value::String("[redacted]".into())
        }
    });
    redact_secrets(&masked)
}

/// A copy of `params` with every secret value replaced by `"[redacted]"`:
/// what the audit's `params_digest` is computed over, so no secret (nor a
/// commitment to one) reaches the audit log. Approval requests show secrets
/// as per-approval commitments instead (`approvals::commitment`).
pub fn redact_secrets(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = if SECRET_KEYS.contains(&k.as_str()) && !v.is_null() {
                        Value::String("[redacted]".into())
                    } else {
                        redact_secrets(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact_secrets).collect()),
        other => other.clone(),
    }
}

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

/// Registers an action: `f(state, caller, params)`.
pub fn register<P, F, Fut>(actions: &mut Actions, name: &'static str, f: F)
where
    P: DeserializeOwned + Send + 'static,
    F: Fn(Arc<AppState>, Caller, P) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ActionResult> + Send + 'static,
{
    actions.add_check::<P>(name);
    actions
        .module
        .register_async_method(
            name,
            move |params: Params<'static>, state: Arc<AppState>, ext: Extensions| {
                let f = f.clone();
                async move {
                    let caller = ext
                        .get::<Caller>()
                        .cloned()
                        .ok_or_else(|| ApiError::internal("no caller"))?;
                    let p: P = parse_params(params.as_str())?;
                    f(state, caller, p).await
                }
            },
        )
        .unwrap_or_else(|e| panic!("action {name} registered twice: {e}"));
}

/// The registry: every action, type-erased.
#[derive(Clone)]
pub struct Registry {
    methods: Methods,
    checks: Arc<HashMap<&'static str, ParamsCheck>>,
    gated: Arc<std::collections::HashSet<&'static str>>,
}

#[derive(Deserialize)]
struct RawOutput<'a> {
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    error: Option<ErrorObjectOwned>,
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
    /// and audits the outcome. Ok is the payload object's JSON text.
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
        params: Map<String, Value>,
        caller: Caller,
    ) -> Result<Box<RawValue>, ApiError> {
        let params = Value::Object(params);
        let redacted = redact_action_params(action, &params);
        let known = self.methods.method(action).is_some();
        let (audited_action, digest) = if known {
            (action, jcs_digest(&redacted))
        } else {
            (
                UNKNOWN_ACTION_RECORD,
                jcs_digest(&serde_json::json!({"action": action, "params": redacted})),
            )
        };
        let device = caller.device_id.clone();
        let out = if known && !is_read_only(action) {
            match state.require_audit().await {
                Ok(()) => self.invoke(action, &params, caller).await,
                Err(e) => Err(e),
            }
        } else {
            self.invoke(action, &params, caller).await
        };
        let outcome = match &out {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        state
            .audit(Some(&device), audited_action, Some(digest), outcome, None)
            .await;
        out
    }

    async fn invoke(
        &self,
        action: &str,
        params: &Value,
        caller: Caller,
    ) -> Result<Box<RawValue>, ApiError> {
        let Some(MethodCallback::Async(cb)) = self.methods.method(action) else {
            return Err(ApiError::new(
                ErrorCode::UnknownAction,
                format!("unknown action {action:?}"),
            ));
        };
        let mut ext = Extensions::new();
        ext.insert(caller);
        let raw = params.to_string();
        let resp = cb(
            Id::Number(0),
            Params::new(Some(&raw)).into_owned(),
            ConnectionId(0),
            usize::MAX,
            ext,
        )
        .await;
        let json = resp.into_json();
        let out: RawOutput<'_> = serde_json::from_str(json.get())
            .map_err(|e| ApiError::internal(format!("bad handler output: {e}")))?;
        match (out.result, out.error) {
            (Some(r), None) => Ok(r.to_owned()),
            (_, Some(e)) => Err(ApiError::from_error_object(&e)),
            _ => Err(ApiError::internal("handler produced no result")),
        }
    }
}
