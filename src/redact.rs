//! What counts as a secret where it is shown or recorded: the params that
//! are secrets (by name anywhere, or by path for one action), and how a URL
//! is shown without its secret parts. One policy for the audit digest
//! (`rpc`), the approval commitments (`approvals::commitment`), the config
//! view and the webhook errors (`scheduler::run`, `approvals::notify`).

use serde_json::{Map, Value};

/// Keys whose values are secrets wherever they appear in params.
pub const SECRET_KEYS: &[&str] = &["api_key", "password", "token", "secret"];

/// Params that are secrets for one action only, named by their path from
/// the params object (a key such as `value` is a secret in `set_secret`,
/// not in `update_config`, where only `[notify] url` is).
pub fn action_secret_paths(
    action: &str,
    params: &Map<String, Value>,
) -> &'static [&'static [&'static str]] {
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
    let empty = Map::new();
    for path in action_secret_paths(action, params.as_object().unwrap_or(&empty)) {
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

/// [`redact_secrets`] and [`action_secret_paths`] masked: what the audit
/// sees. One copy of the params is made.
pub fn redact_action_params(action: &str, params: &Map<String, Value>) -> Value {
    let mut out = Value::Object(redact_map(params));
    for path in action_secret_paths(action, params) {
        let mut slot = Some(&mut out);
        for k in path.iter() {
            slot = slot.and_then(|v| v.get_mut(*k));
        }
        if let Some(v) = slot.filter(|v| !v.is_null()) {
            *v = Value::String("[redacted]".into());
        }
    }
    out
}

/// A copy of `params` with every secret value replaced by `"[redacted]"`:
/// what the audit's `params_digest` is computed over, so no secret (nor a
/// commitment to one) reaches the audit log. Approval requests show secrets
/// as per-approval commitments instead (`approvals::commitment`).
pub fn redact_secrets(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(redact_map(m)),
        Value::Array(a) => Value::Array(a.iter().map(redact_secrets).collect()),
        other => other.clone(),
    }
}

fn redact_map(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .map(|(k, v)| {
            let v = if SECRET_KEYS.contains(&k.as_str()) && !v.is_null() {
                Value::String("[redacted]".into())
            } else {
                redact_secrets(v)
            };
            (k.clone(), v)
        })
        .collect()
}

/// Where a URL points, as the owner may see it: `scheme://host[:port]`,
/// without user info, path, query or fragment (the parts that may be a
/// bearer capability). `[unparseable url]` when it does not parse.
pub fn url_origin(url: &str) -> String {
    let shown = redact_url(url);
    match shown.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.split('/').next().unwrap_or("")),
        None => shown,
    }
}

/// A URL as it may be shown: `scheme://host[:port]/path`, without user
/// info, query or fragment (a webhook URL is a bearer capability). A URL
/// that does not parse is shown as `[unparseable url]`.
pub fn redact_url(url: &str) -> String {
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        return "[unparseable url]".into();
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return "[unparseable url]".into();
    };
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{}", uri.path())
}
