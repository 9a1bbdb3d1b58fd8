//! Builders for the frames the server sends, and the shapes of the frames it reads.
//!
//! Each builder returns the frame's JSON text, serialised once.

use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::codes::{ApiError, AuthErrorCode, ErrorCode};

/// The protocol version this server speaks (SPEC §4).
pub const PROTOCOL: u64 = 1;

pub fn challenge(server_key: &str, nonce: &str, ts: i64) -> String {
    json!({"type": "challenge", "protocol": PROTOCOL, "server_key": server_key, "nonce": nonce, "ts": ts}).to_string()
}

pub fn auth_ok(session_id: &str, device_id: &str, server_signature: &str) -> String {
    json!({"type": "auth_ok", "session_id": session_id, "device_id": device_id, "server_signature": server_signature})
        .to_string()
}

pub fn pair_ok(
    device_id: &str,
    session_id: &str,
    server_key: &str,
    server_signature: &str,
) -> String {
    json!({"type": "pair_ok", "device_id": device_id, "session_id": session_id, "server_key": server_key,
           "server_signature": server_signature})
    .to_string()
}

pub fn auth_error(code: AuthErrorCode, message: &str, retry_after_ms: Option<u64>) -> String {
    let mut v = json!({"type": "auth_error", "code": code.as_str(), "message": message});
    if let Some(ms) = retry_after_ms {
        v["retry_after_ms"] = json!(ms);
    }
    v.to_string()
}

/// `{"type":"error",...}`: a frame the server could not treat as a request.
pub fn error(code: ErrorCode, message: &str) -> String {
    json!({"type": "error", "code": code.as_str(), "message": message}).to_string()
}

/// `{"type":"error",...,"approval_id":..}`: an `approval_response` that changed nothing.
pub fn approval_error(code: ErrorCode, message: &str, approval_id: Option<&str>) -> String {
    let mut v = json!({"type": "error", "code": code.as_str(), "message": message});
    if let Some(id) = approval_id {
        v["approval_id"] = json!(id);
    }
    v.to_string()
}

/// `{"type":"admin_response","request_id":..,"payload":<raw payload>}`.
pub fn admin_response_raw(request_id: &str, payload: &RawValue) -> String {
    let rid = serde_json::to_string(request_id).expect("a string serialises");
    let p = payload.get();
    let mut s = String::with_capacity(48 + rid.len() + p.len());
    s.push_str(r#"{"type":"admin_response","request_id":"#);
    s.push_str(&rid);
    s.push_str(r#","payload":"#);
    s.push_str(p);
    s.push('}');
    s
}

pub fn admin_error(request_id: &str, err: &ApiError) -> String {
    json!({"type": "admin_response", "request_id": request_id, "payload": err.to_payload()})
        .to_string()
}

/// A JSON-RPC 2.0 error response; `id` is the raw id (or null).
pub fn jsonrpc_error(id: &Value, err: &ApiError) -> String {
    let obj: jsonrpsee_types::ErrorObjectOwned = err.clone().into();
    json!({"jsonrpc": "2.0", "id": id, "error": obj}).to_string()
}

/// JSON-RPC -32600: a malformed request object or a batch (`data.code` `invalid_request`).
pub fn jsonrpc_invalid(id: &Value, message: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32600, "message": message, "data": {"code": "invalid_request"}}})
        .to_string()
}

pub fn event(name: &str, data: Value) -> String {
    json!({"type": "event", "event": name, "data": data}).to_string()
}
