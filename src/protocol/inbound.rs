//! Decoding of the frames an authenticated session receives (SPEC §5, §8).
//! Pure: no I/O, no state — the fuzz target drives it directly.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::codes::{ApiError, ErrorCode};
use super::frames;

/// What a text frame asks for.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// An admin envelope: run `action` with `params`.
    Admin {
        request_id: String,
        action: String,
        params: Map<String, Value>,
    },
    /// A JSON-RPC 2.0 call; `key` is the id rendered as a string.
    JsonRpc {
        id: Value,
        key: String,
        method: String,
        params: Map<String, Value>,
    },
    /// A JSON-RPC notification: not executed, no reply.
    Notification,
    /// A phone's answer to an approval request, its fields checked.
    ApprovalResponse(ApprovalResponseFrame),
    /// Nothing to run: send this frame back.
    Reply(String),
}

/// The longest `request_id`, in characters.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

pub fn decode(text: &str) -> Inbound {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Inbound::Reply(frames::error(
                ErrorCode::InvalidJson,
                &format!("not JSON: {e}"),
            ));
        }
    };
    let obj = match v {
        Value::Object(o) => o,
        Value::Array(_) => {
            let msg = "JSON-RPC batches are not supported: send one request per frame";
            return Inbound::Reply(frames::jsonrpc_invalid(&Value::Null, msg));
        }
        _ => {
            return Inbound::Reply(frames::error(
                ErrorCode::InvalidRequest,
                "a frame must be a JSON object",
            ));
        }
    };
    if obj.contains_key("jsonrpc") {
        return decode_jsonrpc(obj);
    }
    match obj.get("type").and_then(Value::as_str) {
        Some("admin") => decode_admin(obj),
        Some("approval_response") => decode_approval_response(obj),
        Some(other) => {
            let msg = format!(
                "unknown frame type {:?}",
                other.chars().take(64).collect::<String>()
            );
            Inbound::Reply(frames::error(ErrorCode::InvalidRequest, &msg))
        }
        None => Inbound::Reply(frames::error(
            ErrorCode::InvalidRequest,
            "missing or non-string field `type`",
        )),
    }
}

/// An `approval_response` frame (SPEC §8): which approval, which device's
/// approval key signed, the decision and the signature. Decoding checks the
/// fields' presence and types and the decision; the signature is read by
/// the approval gate, which knows the signing device's key type.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalResponseFrame {
    pub approval_id: String,
    pub device_id: String,
    pub decision: ApprovalDecision,
    pub signature: ResponseSignature,
}

/// `approve` or `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalDecision {
    Approve,
    Deny,
}

impl ApprovalDecision {
    /// The wire form, as signed.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalDecision::Approve => "approve",
            ApprovalDecision::Deny => "deny",
        }
    }
}

/// An `approval_response` signature as sent: base64url text (Ed25519,
/// ES256) or a passkey's WebAuthn assertion object (SPEC §11).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ResponseSignature {
    Encoded(String),
    Assertion(Map<String, Value>),
}

/// The fields of an `approval_response` before the decision is checked.
#[derive(Deserialize)]
struct ApprovalResponseFields {
    approval_id: String,
    device_id: String,
    decision: String,
    signature: ResponseSignature,
}

fn decode_approval_response(obj: Map<String, Value>) -> Inbound {
    // Every refusal names the approval when the frame did (as a string).
    let echo = obj
        .get("approval_id")
        .and_then(Value::as_str)
        .map(String::from);
    let refuse = |msg: &str| {
        Inbound::Reply(frames::approval_error(
            ErrorCode::InvalidRequest,
            msg,
            echo.as_deref(),
        ))
    };
    let Ok(f) = ApprovalResponseFields::deserialize(Value::Object(obj)) else {
        return refuse(
            "approval_response needs string fields approval_id, device_id, decision, signature (an object for a passkey)",
        );
    };
    let decision = match f.decision.as_str() {
        "approve" => ApprovalDecision::Approve,
        "deny" => ApprovalDecision::Deny,
        _ => return refuse("decision must be \"approve\" or \"deny\""),
    };
    Inbound::ApprovalResponse(ApprovalResponseFrame {
        approval_id: f.approval_id,
        device_id: f.device_id,
        decision,
        signature: f.signature,
    })
}

fn decode_admin(mut obj: Map<String, Value>) -> Inbound {
    let request_id = match obj.remove("request_id") {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_REQUEST_ID_CHARS => s,
        _ => {
            let msg = "`request_id` must be a string of 1 to 128 characters";
            return Inbound::Reply(frames::error(ErrorCode::InvalidRequest, msg));
        }
    };
    let mut params = match obj.remove("payload") {
        Some(Value::Object(p)) => p,
        _ => {
            return Inbound::Reply(frames::admin_error(
                &request_id,
                &ApiError::invalid("`payload` must be an object"),
            ));
        }
    };
    match params.remove("action") {
        Some(Value::String(action)) => Inbound::Admin {
            request_id,
            action,
            params,
        },
        _ => Inbound::Reply(frames::admin_error(
            &request_id,
            &ApiError::invalid("`payload.action` must be a string"),
        )),
    }
}

fn decode_jsonrpc(mut obj: Map<String, Value>) -> Inbound {
    let id = obj.remove("id");
    let well_formed_id = matches!(
        id,
        None | Some(Value::String(_) | Value::Number(_) | Value::Null)
    );
    let reply_id = if well_formed_id {
        id.clone().unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let version_ok = obj.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    let method = obj.remove("method");
    let (true, true, Some(Value::String(method))) = (well_formed_id, version_ok, method) else {
        let msg = "malformed JSON-RPC 2.0 request: needs \"jsonrpc\":\"2.0\", a string `method` and a string, number or null `id`";
        return Inbound::Reply(frames::jsonrpc_invalid(&reply_id, msg));
    };
    let Some(id) = id else {
        return Inbound::Notification;
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Inbound::Reply(frames::jsonrpc_error(
                &id,
                &ApiError::invalid("params must be an object of named params"),
            ));
        }
    };
    let key = match &id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Inbound::JsonRpc {
        id,
        key,
        method,
        params,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_both_codecs() {
        let a = decode(r#"{"type":"admin","request_id":"1","payload":{"action":"x","k":2}}"#);
        assert_eq!(
            a,
            Inbound::Admin {
                request_id: "1".into(),
                action: "x".into(),
                params: json!({"k": 2}).as_object().unwrap().clone()
            }
        );
        let j = decode(r#"{"jsonrpc":"2.0","id":7,"method":"x"}"#);
        assert!(matches!(j, Inbound::JsonRpc { key, .. } if key == "7"));
        assert_eq!(
            decode(r#"{"jsonrpc":"2.0","method":"x"}"#),
            Inbound::Notification
        );
        assert!(matches!(decode("[1]"), Inbound::Reply(r) if r.contains("-32600")));
        assert!(matches!(decode("nope"), Inbound::Reply(r) if r.contains("invalid_json")));
    }

    fn reply(text: &str) -> Value {
        match decode(text) {
            Inbound::Reply(r) => serde_json::from_str(&r).unwrap(),
            other => panic!("{text}: decoded to {other:?}"),
        }
    }

    #[test]
    fn approval_responses_are_typed_or_refused_as_before() {
        let ok = decode(
            r#"{"type":"approval_response","approval_id":"apr_1","device_id":"d","decision":"deny","signature":"AA","extra":1}"#,
        );
        assert_eq!(
            ok,
            Inbound::ApprovalResponse(ApprovalResponseFrame {
                approval_id: "apr_1".into(),
                device_id: "d".into(),
                decision: ApprovalDecision::Deny,
                signature: ResponseSignature::Encoded("AA".into()),
            })
        );
        let passkey = decode(
            r#"{"type":"approval_response","approval_id":"a","device_id":"d","decision":"approve","signature":{"k":1}}"#,
        );
        assert!(matches!(
            passkey,
            Inbound::ApprovalResponse(ApprovalResponseFrame { signature: ResponseSignature::Assertion(m), decision: ApprovalDecision::Approve, .. }) if m["k"] == 1
        ));
        let needs = "approval_response needs string fields approval_id, device_id, decision, signature (an object for a passkey)";
        let r = reply(r#"{"type":"approval_response"}"#);
        assert_eq!(
            r,
            json!({"type": "error", "code": "invalid_request", "message": needs})
        );
        for bad in [
            r#"{"type":"approval_response","approval_id":"apr_1","device_id":"d","decision":"approve","signature":7}"#,
            r#"{"type":"approval_response","approval_id":"apr_1","device_id":null,"decision":"approve","signature":"AA"}"#,
            r#"{"type":"approval_response","approval_id":"apr_1","device_id":"d","decision":true,"signature":"AA"}"#,
        ] {
            assert_eq!(
                reply(bad),
                json!({"type": "error", "code": "invalid_request", "message": needs, "approval_id": "apr_1"}),
                "{bad}"
            );
        }
        let r = reply(
            r#"{"type":"approval_response","approval_id":5,"device_id":"d","decision":"approve","signature":"AA"}"#,
        );
        assert_eq!(r.get("approval_id"), None, "only a string id is echoed");
        let r = reply(
            r#"{"type":"approval_response","approval_id":"apr_2","device_id":"d","decision":"maybe","signature":"AA"}"#,
        );
        assert_eq!(
            r,
            json!({"type": "error", "code": "invalid_request", "message": "decision must be \"approve\" or \"deny\"", "approval_id": "apr_2"})
        );
    }
}
