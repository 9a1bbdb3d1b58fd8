//! The phone's session: pairing and authentication (with the server's
//! signature checked against the pinned key), multiplexed admin requests
//! over both codecs, events, and approval answers.
//!
//! Approvals: a phone matches an approval to its own request only by the
//! `approval_id` of the `approval_pending` event its session received (never
//! by `request_id`, which other sessions may reuse), and before approving its
//! own request it checks that the params shown are exactly the ones it sent,
//! secret commitments included (SPEC §8 v1.1). Requests from other sessions
//! or devices are marked as such ([`Origin`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::Verifier;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

pub use crate::endpoint::{ClientError, Endpoint};
use crate::identity::{Identity, Pinned};
use crate::proto;
use crate::raw::{RawConn, Ws};

/// Where an approval request came from, as far as this session can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This session asked: its `approval_pending` named this `approval_id`.
    ThisSession,
    /// This device, but not this session (or not provably this session).
    OtherSession,
    /// Another device (`origin_device_id` is not ours).
    OtherDevice,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::ThisSession => "this_session",
            Origin::OtherSession => "other_session",
            Origin::OtherDevice => "other_device",
        }
    }
}

/// An `approval_request` as this phone sees it.
#[derive(Debug, Clone)]
pub struct Approval {
    pub approval_id: String,
    pub origin_device_id: String,
    pub action: String,
    pub summary: String,
    pub origin: Origin,
    /// The frame as received (what `answer_approval` signs over).
    pub frame: Value,
}

impl Approval {
    /// Not asked by this session: the owner should look twice.
    pub fn is_foreign(&self) -> bool {
        self.origin != Origin::ThisSession
    }
}

/// How long a phone waits for its own `approval_pending` after an
/// `approval_request` from its own device (the server sends it right after).
const OWN_PENDING_WAIT: Duration = Duration::from_secs(2);
/// Own approvals remembered at once (oldest forgotten first).
const OWN_MAX: usize = 4096;

/// What this session sent and which approvals are its own.
#[derive(Default)]
struct Own {
    /// Params of in-flight requests by their `request_id` as the server
    /// renders it (several entries: ambiguous, never trusted).
    sent: HashMap<String, Vec<Value>>,
    /// approval_id → (the params sent, if known; commitment key).
    approvals: HashMap<String, (Option<Value>, Option<Vec<u8>>)>,
    order: VecDeque<String>,
}

impl Own {
    fn on_pending(&mut self, data: &Value) {
        let (Some(rid), Some(aid)) = (
            data.get("request_id").and_then(Value::as_str),
            data.get("approval_id").and_then(Value::as_str),
        ) else {
            return;
        };
        let params = match self.sent.get(rid).map(Vec::as_slice) {
            Some([one]) => Some(one.clone()),
            _ => None,
        };
        let key = data
            .get("commitment_key")
            .and_then(Value::as_str)
            .and_then(proto::unb64);
        if self.approvals.len() >= OWN_MAX
            && let Some(old) = self.order.pop_front()
        {
            self.approvals.remove(&old);
        }
        self.approvals.insert(aid.to_string(), (params, key));
        self.order.push_back(aid.to_string());
    }

    fn sent_done(&mut self, rid: &str) {
        if let Some(v) = self.sent.get_mut(rid) {
            v.pop();
            if v.is_empty() {
                self.sent.remove(rid);
            }
        }
    }
}

/// The session the handshake established.
#[derive(Debug, Clone)]
pub struct Connected {
    pub session_id: String,
    pub device_id: String,
    pub server_key: String,
}

async fn read_challenge(conn: &mut RawConn) -> Result<(String, String, i64), ClientError> {
    let ch = conn.recv_frame().await?;
    if ch["type"] != "challenge" || ch["protocol"] != 1 {
        return Err(ClientError::Protocol(format!(
            "expected a protocol 1 challenge, got {ch}"
        )));
    }
    let s = |k: &str| {
        ch[k]
            .as_str()
            .map(String::from)
            .ok_or_else(|| ClientError::Protocol(format!("challenge without {k}")))
    };
    Ok((
        s("server_key")?,
        s("nonce")?,
        ch["ts"]
            .as_i64()
            .ok_or_else(|| ClientError::Protocol("challenge without ts".into()))?,
    ))
}

fn verify_server(
    server_key: &str,
    session_id: &str,
    device_id: &str,
    client_nonce: &str,
    sig: &str,
) -> Result<(), ClientError> {
    let pk: [u8; 32] = proto::unb64(server_key)
        .and_then(|b| b.try_into().ok())
        .ok_or(ClientError::ServerSignature)?;
    let vk =
        ed25519_dalek::VerifyingKey::from_bytes(&pk).map_err(|_| ClientError::ServerSignature)?;
    let sig = proto::unb64(sig).ok_or(ClientError::ServerSignature)?;
    let sig =
        ed25519_dalek::Signature::from_slice(&sig).map_err(|_| ClientError::ServerSignature)?;
    let msg = proto::auth_ok_string(server_key, session_id, device_id, client_nonce);
    vk.verify(msg.as_bytes(), &sig)
        .map_err(|_| ClientError::ServerSignature)
}

async fn finish_handshake(
    mut conn: RawConn,
    expect: &str,
    server_key: &str,
    client_nonce: &str,
) -> Result<(Client, Connected), ClientError> {
    let reply = match conn.recv().await {
        crate::Incoming::Frame(v) => v,
        crate::Incoming::Text(t) => {
            return Err(ClientError::Protocol(format!("non-JSON frame {t}")));
        }
        crate::Incoming::Closed(c) => return Err(ClientError::Closed(c)),
    };
    if reply["type"] == "auth_error" {
        let close = conn.closed().await;
        return Err(ClientError::Refused {
            code: reply["code"].as_str().unwrap_or("").into(),
            message: reply["message"].as_str().unwrap_or("").into(),
            close,
        });
    }
    if reply["type"] != expect {
        return Err(ClientError::Protocol(format!(
            "expected {expect}, got {reply}"
        )));
    }
    let s = |k: &str| reply[k].as_str().unwrap_or("").to_string();
    if expect == "pair_ok" && s("server_key") != server_key {
        return Err(ClientError::ServerKeyMismatch {
            got: s("server_key"),
            pinned: server_key.into(),
        });
    }
    verify_server(
        server_key,
        &s("session_id"),
        &s("device_id"),
        client_nonce,
        &s("server_signature"),
    )?;
    let connected = Connected {
        session_id: s("session_id"),
        device_id: s("device_id"),
        server_key: server_key.into(),
    };
    Ok((
        Client::start(conn.ws, connected.device_id.clone()),
        connected,
    ))
}

/// Pairs `id` using `code`; on success the server key is pinned in `id`.
/// `expected_server_key` is what `secrets-agent pair` showed the owner.
pub async fn pair(
    ep: &Endpoint,
    id: &mut Identity,
    code: &str,
    expected_server_key: Option<&str>,
) -> Result<(Client, Connected), ClientError> {
    let mut conn = RawConn::connect_endpoint(ep).await?;
    let (server_key, nonce, _ts) = read_challenge(&mut conn).await?;
    if let Some(k) = expected_server_key.filter(|k| *k != server_key) {
        return Err(ClientError::ServerKeyMismatch {
            got: server_key,
            pinned: k.into(),
        });
    }
    let client_nonce = proto::nonce32();
    let (dpk, apk) = (id.public_key_b64(), id.approval_public_key_b64());
    let msg = proto::pair_string(&server_key, &nonce, code, &dpk, &apk, &client_nonce);
    conn.send_json(&json!({
        "type": "pair", "protocol": 1, "code": code, "device_name": id.device_name,
        "device_public_key": dpk, "approval_public_key": apk, "approval_key_alg": id.approval_alg().as_str(),
        "client_nonce": client_nonce, "signature": id.sign_device(&msg), "approval_signature": id.sign_approval(&msg),
    }))
    .await?;
    let out = finish_handshake(conn, "pair_ok", &server_key, &client_nonce).await?;
    id.pinned = Some(Pinned {
        url: ep.url.clone(),
        server_key: server_key.clone(),
        device_id: out.1.device_id.clone(),
        tls_spki_sha256: ep.tls_pin.clone(),
    });
    Ok(out)
}

/// Authenticates a paired identity against the server key it pinned.
pub async fn auth(ep: &Endpoint, id: &Identity) -> Result<(Client, Connected), ClientError> {
    let pinned = id
        .pinned
        .as_ref()
        .ok_or_else(|| ClientError::Protocol("this identity is not paired yet".into()))?;
    let mut conn = RawConn::connect_endpoint(ep).await?;
    let (server_key, nonce, ts) = read_challenge(&mut conn).await?;
    if server_key != pinned.server_key {
        return Err(ClientError::ServerKeyMismatch {
            got: server_key,
            pinned: pinned.server_key.clone(),
        });
    }
    let client_nonce = proto::nonce32();
    let device_id = id.device_id();
    let msg = proto::auth_string(&server_key, &nonce, &device_id, &client_nonce, ts);
    conn.send_json(&json!({
        "type": "auth", "protocol": 1, "device_id": device_id, "nonce": nonce,
        "client_nonce": client_nonce, "ts": ts, "signature": id.sign_device(&msg),
    }))
    .await?;
    finish_handshake(conn, "auth_ok", &server_key, &client_nonce).await
}

type PendingMap = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// An authenticated session with requests multiplexed over it.
pub struct Client {
    device_id: String,
    own: Arc<Mutex<Own>>,
    own_seen: watch::Receiver<u64>,
    out: mpsc::Sender<Message>,
    pending: PendingMap,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Value>>,
    closed: watch::Receiver<Option<Option<(u16, String)>>>,
    next_id: AtomicU64,
}

impl Client {
    fn start(ws: Ws, device_id: String) -> Client {
        let (mut sink, mut stream) = ws.split();
        let own: Arc<Mutex<Own>> = Arc::default();
        let (own_tx, own_seen) = watch::channel(0u64);
        let own2 = own.clone();
        let (out, mut out_rx) = mpsc::channel::<Message>(1024);
        let pending: PendingMap = Arc::default();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed) = watch::channel(None);
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let p2 = pending.clone();
        tokio::spawn(async move {
            let close = loop {
                match stream.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                            continue;
                        };
                        if v["type"] == "event" && v["event"] == "approval_pending" {
                            own2.lock().unwrap().on_pending(&v["data"]);
                            own_tx.send_modify(|n| *n += 1);
                        }
                        let key = response_key(&v);
                        let waiter = key.and_then(|k| p2.lock().unwrap().remove(&k));
                        match waiter {
                            Some(w) => {
                                let _ = w.send(v);
                            }
                            None => {
                                let _ = ev_tx.send(v);
                            }
                        }
                    }
                    Some(Ok(Message::Close(c))) => {
                        break c.map(|c| (u16::from(c.code), c.reason.to_string()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break None,
                }
            };
            p2.lock().unwrap().clear();
            let _ = closed_tx.send(Some(close));
        });
        Client {
            device_id,
            own,
            own_seen,
            out,
            pending,
            events: tokio::sync::Mutex::new(ev_rx),
            closed,
            next_id: AtomicU64::new(1),
        }
    }

    /// Sends a text frame as is.
    pub async fn send_raw(&self, text: impl Into<String>) -> Result<(), ClientError> {
        self.out
            .send(Message::text(text.into()))
            .await
            .map_err(|_| ClientError::Closed(None))
    }

    async fn call(&self, key: String, frame: String) -> Result<Value, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(key, tx);
        self.send_raw(frame).await?;
        rx.await
            .map_err(|_| ClientError::Closed(self.closed.borrow().clone().flatten()))
    }

    /// An envelope request with a fresh `request_id`; returns the payload.
    pub async fn request(&self, action: &str, params: Value) -> Result<Value, ClientError> {
        let rid = format!("r{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        self.request_with_id(&rid, action, params).await
    }

    /// An envelope request with the given `request_id`; returns the payload.
    pub async fn request_with_id(
        &self,
        rid: &str,
        action: &str,
        params: Value,
    ) -> Result<Value, ClientError> {
        let mut payload = match params {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            other => {
                return Err(ClientError::Protocol(format!(
                    "params must be an object, got {other}"
                )));
            }
        };
        let sent = Value::Object(payload.clone());
        payload.insert("action".into(), json!(action));
        let frame = json!({"type": "admin", "request_id": rid, "payload": payload}).to_string();
        let resp = self
            .tracked(rid, sent, self.call(format!("env:{rid}"), frame))
            .await?;
        Ok(resp["payload"].clone())
    }

    /// A JSON-RPC 2.0 call; returns the whole response object.
    pub async fn jsonrpc(
        &self,
        id: Value,
        method: &str,
        params: Value,
    ) -> Result<Value, ClientError> {
        let frame =
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
        let sent = match &params {
            Value::Null => json!({}),
            p => p.clone(),
        };
        let key = id_key(&id);
        self.tracked(&key, sent, self.call(format!("rpc:{key}"), frame))
            .await
    }

    /// Remembers the params of a request while it is in flight, so an
    /// `approval_pending` for it can be checked against what was sent.
    async fn tracked(
        &self,
        rid: &str,
        sent: Value,
        call: impl std::future::Future<Output = Result<Value, ClientError>>,
    ) -> Result<Value, ClientError> {
        self.own
            .lock()
            .unwrap()
            .sent
            .entry(rid.to_string())
            .or_default()
            .push(sent);
        let out = call.await;
        self.own.lock().unwrap().sent_done(rid);
        out
    }

    /// The next frame that is not a response to one of our requests.
    pub async fn next_event(&self) -> Option<Value> {
        self.events.lock().await.recv().await
    }

    /// Waits (up to `within`) for an event matching `pred`, dropping others.
    pub async fn wait_event(
        &self,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, ClientError> {
        tokio::time::timeout(within, async {
            loop {
                match self.next_event().await {
                    Some(v) if pred(&v) => return Ok(v),
                    Some(_) => continue,
                    None => {
                        return Err(ClientError::Closed(self.closed.borrow().clone().flatten()));
                    }
                }
            }
        })
        .await
        .map_err(|_| ClientError::Timeout)?
    }

    /// Classifies an `approval_request` frame: this session's own request
    /// (by the `approval_id` of its `approval_pending`), another session of
    /// this device, or another device.
    pub async fn approval(&self, frame: &Value) -> Approval {
        let s = |k: &str| frame[k].as_str().unwrap_or("").to_string();
        let approval_id = s("approval_id");
        let origin = if s("origin_device_id") != self.device_id {
            Origin::OtherDevice
        } else if self.own_pending(&approval_id).await {
            Origin::ThisSession
        } else {
            Origin::OtherSession
        };
        Approval {
            origin_device_id: s("origin_device_id"),
            action: s("action"),
            summary: s("summary"),
            approval_id,
            origin,
            frame: frame.clone(),
        }
    }

    /// Whether this session's `approval_pending` named `approval_id`; while
    /// requests of ours are in flight, waits a little for it (the server
    /// sends it just after the `approval_request`).
    async fn own_pending(&self, approval_id: &str) -> bool {
        let mut seen = self.own_seen.clone();
        let wait = async {
            loop {
                {
                    let own = self.own.lock().unwrap();
                    if own.approvals.contains_key(approval_id) {
                        return true;
                    }
                    if own.sent.is_empty() {
                        return false;
                    }
                }
                if seen.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(OWN_PENDING_WAIT, wait)
            .await
            .unwrap_or(false)
    }

    /// Waits for this session's own approval of request `rid`: the
    /// `approval_pending` event for `rid` names the `approval_id`, and the
    /// `approval_request` with that id is returned. Other events seen while
    /// waiting (other sessions' approvals with the same `request_id`
    /// included) are dropped.
    pub async fn own_approval(&self, rid: &str, within: Duration) -> Result<Approval, ClientError> {
        let mut requests: HashMap<String, Value> = HashMap::new();
        let mut mine: Option<String> = None;
        let found = tokio::time::timeout(within, async {
            loop {
                if let Some(req) = mine.as_ref().and_then(|id| requests.remove(id)) {
                    return Ok(req);
                }
                let Some(ev) = self.next_event().await else {
                    return Err(ClientError::Closed(self.closed.borrow().clone().flatten()));
                };
                if ev["type"] == "approval_request" {
                    if let Some(id) = ev["approval_id"].as_str()
                        && requests.len() < OWN_MAX
                    {
                        requests.insert(id.to_string(), ev.clone());
                    }
                } else if ev["type"] == "event"
                    && ev["event"] == "approval_pending"
                    && ev["data"]["request_id"] == rid
                {
                    mine = ev["data"]["approval_id"].as_str().map(String::from);
                }
            }
        })
        .await
        .map_err(|_| ClientError::Timeout)??;
        Ok(self.approval(&found).await)
    }

    /// Answers an `approval_request` after checking that its digest matches
    /// the action and params shown, and, to approve this session's own
    /// request, that the params are exactly the ones sent (each secret's
    /// commitment recomputed with the `commitment_key`). `decision`:
    /// "approve" or "deny".
    pub async fn answer_approval(
        &self,
        id: &Identity,
        request: &Value,
        decision: &str,
    ) -> Result<(), ClientError> {
        let action = request["action"].as_str().unwrap_or("");
        let digest = request["action_digest"].as_str().unwrap_or("");
        if proto::action_digest(action, &request["params"]) != digest {
            return Err(ClientError::Protocol(
                "action_digest does not match the action and params shown; refusing to sign".into(),
            ));
        }
        if decision == "approve" {
            self.check_own(request).await?;
        }
        let frame = approval_response(id, request, decision);
        self.send_raw(frame.to_string()).await
    }

    /// For this session's own request: the params shown must be the ones sent.
    async fn check_own(&self, request: &Value) -> Result<(), ClientError> {
        let approval = self.approval(request).await;
        if approval.origin != Origin::ThisSession {
            return Ok(());
        }
        let (sent, key) = self
            .own
            .lock()
            .unwrap()
            .approvals
            .get(&approval.approval_id)
            .cloned()
            .unwrap_or_default();
        let Some(sent) = sent else {
            return Err(ClientError::Mismatch(
                "which request it answers is ambiguous".into(),
            ));
        };
        proto::check_own_params(&sent, &request["params"], key.as_deref())
            .map_err(ClientError::Mismatch)
    }

    /// Waits until the server closes the connection; its close code and reason.
    pub async fn closed(&self) -> Option<(u16, String)> {
        let mut rx = self.closed.clone();
        loop {
            if let Some(c) = rx.borrow().clone() {
                return c;
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        let _ = self.out.send(Message::Close(None)).await;
    }
}

/// The signed `approval_response` for `request` (no digest check).
pub fn approval_response(id: &Identity, request: &Value, decision: &str) -> Value {
    let s = |k: &str| request[k].as_str().unwrap_or("").to_string();
    let msg = proto::approval_string(
        &s("approval_id"),
        &s("action_digest"),
        &s("challenge"),
        decision,
    );
    json!({
        "type": "approval_response", "approval_id": s("approval_id"), "device_id": id.device_id(),
        "decision": decision, "signature": id.sign_approval(&msg),
    })
}

fn id_key(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The pending-map key a frame answers, if it is a response.
fn response_key(v: &Value) -> Option<String> {
    if v.get("type").and_then(Value::as_str) == Some("admin_response") {
        return v
            .get("request_id")
            .and_then(Value::as_str)
            .map(|r| format!("env:{r}"));
    }
    if v.get("jsonrpc").is_some() && (v.get("result").is_some() || v.get("error").is_some()) {
        return v.get("id").map(|id| format!("rpc:{}", id_key(id)));
    }
    None
}
