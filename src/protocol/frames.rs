//! Builders for the frames the server sends, and the shapes of the frames it reads.
//!
//! Each builder returns the frame's JSON text, serialised once.

use serde::Serialize;
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

/// `{"type":"admin_response","request_id":..,"payload":..}`, serialised once.
pub fn admin_response(request_id: &str, payload: &Value) -> String {
    #[derive(Serialize)]
    struct AdminResponse<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        request_id: &'a str,
        payload: &'a Value,
    }
    serde_json::to_string(&AdminResponse {
        kind: "admin_response",
        request_id,
        payload,
    })
    .expect("a JSON value serialises")
}

/// `{"jsonrpc":"2.0","id":..,"result":..}`, serialised once.
pub fn jsonrpc_result(id: &Value, result: &Value) -> String {
    #[derive(Serialize)]
    struct JsonRpcResult<'a> {
        jsonrpc: &'static str,
        id: &'a Value,
        result: &'a Value,
    }
    serde_json::to_string(&JsonRpcResult {
        jsonrpc: "2.0",
        id,
        result,
    })
    .expect("a JSON value serialises")
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

/// `{"type":"approval_request", ...request}`: `request` is the approval
/// request object (SPEC §8), sent to every session.
pub fn approval_request(request: &Value) -> String {
    let mut v = request.clone();
    v["type"] = json!("approval_request");
    v.to_string()
}

/// `{"type":"approval_result","approval_id":..,"status":..}`.
pub fn approval_result(approval_id: &str, status: &str) -> String {
    json!({"type": "approval_result", "approval_id": approval_id, "status": status}).to_string()
}

pub fn event(name: &str, data: Value) -> String {
    json!({"type": "event", "event": name, "data": data}).to_string()
}
