//! Attacks on the one-task connection (reader, calls and writer polled by
//! one task) and its outbox's wake-ups, over real sockets: frames pushed
//! to an idle session from other tasks, responses of calls finished by
//! another device, a peer that pipelines without reading, and calls left
//! behind by a disconnect.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestServer, audit_now, recv_until};
use mobile_client_sim::client::approval_response;
use mobile_client_sim::{Incoming, RawConn};
use serde_json::{Value, json};

/// What "promptly" means for a frame pushed to an idle session.
const PROMPT: Duration = Duration::from_secs(1);

fn revoke(request_id: &str, device: &str) -> Value {
    json!({"type": "admin", "request_id": request_id,
           "payload": {"action": "revoke_device", "device_id": device}})
}

/// Whether `f` is the response to request `id`.
fn is_response(f: &Value, id: &str) -> bool {
    f["type"] == "admin_response" && f["request_id"] == id
}

/// The next frame matching `pred`, which must come within [`PROMPT`].
async fn promptly(r: &mut RawConn, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(PROMPT, async {
        loop {
            let f = r.recv_frame().await.unwrap();
            if pred(&f) {
                return f;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} did not reach an idle session within {PROMPT:?}"))
}

async fn closed_promptly(r: &mut RawConn, what: &str, within: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(within, r.closed())
        .await
        .unwrap_or_else(|_| panic!("{what}: no close within {within:?}"))
}

/// Every frame pushed to an idle session by another task reaches it at
/// once: the approval request (pushed by the requester's task), the
/// response of a call that another device's approval finished (the call
/// runs in the requester's task but is woken by the approver's), and the
/// revocation close. If a push from another task did not wake the writer
/// (or a woken call were not polled), the frame would wait for the next
/// ping (20 s) or inbound frame and these 1 s bounds would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_other_tasks_reach_idle_sessions_at_once() {
    let s = TestServer::start().await;
    let (mut req, _rid) = s.raw_session("requester").await;
    let (mut appr, aid) = s.raw_session("approver").await;
    let (mut victim, vid) = s.raw_session("victim").await;
    // Everyone idle for a while: the writers sleep in `recv`.
    tokio::time::sleep(Duration::from_millis(300)).await;

    req.send_json(&revoke("g1", &vid.device_id()))
        .await
        .unwrap();
    let ask = promptly(&mut appr, "approval_request", |f| {
        f["type"] == "approval_request"
    })
    .await;
    promptly(&mut victim, "approval_request", |f| {
        f["type"] == "approval_request"
    })
    .await;
    assert_eq!(ask["action"], "revoke_device");

    // The requester's call now waits for a decision; nothing arrives on
    // its connection from here on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    appr.send_json(&approval_response(&aid, &ask, "approve"))
        .await
        .unwrap();
    let resp = promptly(&mut req, "the approved call's response", |f| {
        is_response(f, "g1")
    })
    .await;
    assert!(
        resp.to_string().contains("success"),
        "the revocation ran: {resp}"
    );
    let closed = closed_promptly(&mut victim, "revoked session", PROMPT).await;
    assert_eq!(closed.map(|c| c.0), Some(4403));
    promptly(&mut appr, "approval_result", |f| {
        f["type"] == "approval_result"
    })
    .await;

    // Answered once: the next response on the connection is for the next
    // request, not a second g1.
    req.send_json(&json!({"type": "admin", "request_id": "after",
                          "payload": {"action": "get_dashboard"}}))
        .await
        .unwrap();
    let next = recv_until(&mut req, |f| f["type"] == "admin_response").await;
    assert_eq!(next["request_id"], "after", "g1 answered twice: {next}");
}

/// Shutdown reaches an idle session at once (1001), and a session whose
/// call waits for an approval gets that call's answer before its 1001,
/// well inside `DRAIN_ON_SHUTDOWN` (the approval ends at shutdown). If the
/// drain did not poll the calls, or the close did not wake the writer, the
/// requester would wait the full 10 s drain and the bound would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reaches_idle_sessions_and_answers_waiting_calls() {
    let mut s = TestServer::start().await;
    let (mut req, _) = s.raw_session("requester").await;
    let (mut idle, _) = s.raw_session("idle").await;
    let (_victim, vid) = s.raw_session("victim").await;
    req.send_json(&revoke("g1", &vid.device_id()))
        .await
        .unwrap();
    recv_until(&mut req, |f| f["type"] == "approval_request").await;
    recv_until(&mut idle, |f| f["type"] == "approval_request").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let handle = s.handle.take().unwrap();
    let stopping = tokio::spawn(handle.shutdown());
    let code = closed_promptly(&mut idle, "idle session at shutdown", PROMPT).await;
    assert_eq!(code.map(|c| c.0), Some(1001));
    let answered = tokio::time::timeout(Duration::from_secs(3), async {
        let mut answer = None;
        loop {
            match req.recv().await {
                Incoming::Frame(f) if is_response(&f, "g1") => {
                    assert!(answer.is_none(), "g1 answered twice");
                    answer = Some(f);
                }
                Incoming::Closed(c) => return (answer, c),
                _ => {}
            }
        }
    })
    .await
    .expect("the requester's session ends within 3 s of shutdown");
    let (answer, code) = answered;
    let answer = answer.expect("the waiting call is answered before the close");
    assert!(!answer.to_string().contains("success"), "{answer}");
    assert_eq!(code.map(|c| c.0), Some(1001));
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("shutdown finishes")
        .unwrap();
}

/// A peer that pipelines tens of thousands of requests and reads nothing
/// until it has sent them all: every request is answered at most once, and
/// either all are answered or the session is closed as a slow consumer
/// (1013); never a hang. Meanwhile another device's requests are answered
/// promptly. A lost wake-up of the writer, a response written twice, or a
/// session that neither answers nor closes would each fail an assertion
/// (the last by the 60 s bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_peer_is_answered_once_or_closed_and_others_are_unaffected() {
    const N: usize = 40_000;
    // No request budget: every request reaches the in-flight cap and the
    // outbox, not the rate limiter.
    let s = TestServer::start_with_config("[server]\ndevice_request_burst = 0\n").await;
    let (mut flood, fid) = s.raw_session("flooder").await;
    // The server's side of the flooder's session, to read its close code.
    let flood_handle = s
        .handle()
        .state
        .sessions
        .all()
        .into_iter()
        .find(|h| *h.device_id == fid.device_id())
        .expect("the flooder's session");
    let (other, _) = s.phone("other").await;
    let other = Arc::new(other);
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (other, stop) = (other.clone(), stop.clone());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    other.request("get_dashboard", json!({})),
                )
                .await;
                let r = r.expect("the other device is answered").unwrap();
                assert_eq!(r["result"], "dashboard");
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            worst
        })
    };

    let pad = "x".repeat(100);
    let mut sent = 0;
    let sending = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..N {
            // get_config: a response of some KB, so that the answers
            // outgrow the socket buffers and the outbox.
            let f = json!({"type": "admin", "request_id": format!("p{i}-{pad}"),
                           "payload": {"action": "get_config"}});
            if flood.send_json(&f).await.is_err() {
                break;
            }
            sent += 1;
        }
    })
    .await;
    assert!(
        sending.is_ok(),
        "sending stalled without the session closing"
    );

    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut refused: HashMap<String, usize> = HashMap::new();
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match flood.recv().await {
                Incoming::Frame(f) => {
                    if let (true, Some(id)) =
                        (f["type"] == "admin_response", f["request_id"].as_str())
                    {
                        *seen.entry(id.to_string()).or_default() += 1;
                        if let Some(code) = f["payload"]["code"].as_str() {
                            *refused.entry(code.to_string()).or_default() += 1;
                        }
                        if seen.len() == sent {
                            return None;
                        }
                    }
                }
                Incoming::Text(_) => {}
                Incoming::Closed(c) => return Some(c),
            }
        }
    })
    .await
    .expect("every request answered or the session closed: no hang");
    stop.store(true, Ordering::SeqCst);
    let worst = prober.await.unwrap();

    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    match end {
        None => assert_eq!(seen.len(), sent),
        // A slow consumer's writer gives up on the blocked socket, so the
        // close frame may not get through: then the connection just ends,
        // and the server's side says why.
        Some(ref code) => {
            let why = code.as_ref().map_or(flood_handle.close_code(), |c| c.0);
            assert_eq!(
                why,
                1013,
                "closed otherwise than as a slow consumer: {code:?} ({} of {sent} answered)",
                seen.len()
            );
        }
    }
    eprintln!(
        "sent {sent}, answered {} (refused: {refused:?}), closed: {end:?}, other device's worst latency {worst:?}",
        seen.len(),
    );
    assert!(worst < PROMPT, "the other device waited {worst:?}");
}

/// A gated call whose requester disconnects (abruptly, mid-wait) goes on
/// outside the connection: approved by another device it runs exactly
/// once; left alone it expires and never runs. If unfinished calls were
/// dropped with the connection, the approval would stay undecided and the
/// action would not run (first case); if they were run twice, or run when
/// expired, the audit counts would differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_left_behind_by_a_disconnect_are_decided_once() {
    let s = TestServer::start_with_config("[approvals]\ntimeout_secs = 2\n").await;
    let (mut appr, aid) = s.raw_session("approver").await;
    let (_v1, v1) = s.raw_session("victim1").await;
    let (_v2, v2) = s.raw_session("victim2").await;

    // Approved after the requester left: runs once.
    let (mut req, _) = s.raw_session("requester").await;
    req.send_json(&revoke("g1", &v1.device_id())).await.unwrap();
    recv_until(&mut req, |f| f["type"] == "approval_request").await;
    let ask = recv_until(&mut appr, |f| f["type"] == "approval_request").await;
    drop(req);
    tokio::time::sleep(Duration::from_millis(200)).await;
    appr.send_json(&approval_response(&aid, &ask, "approve"))
        .await
        .unwrap();
    let result = recv_until(&mut appr, |f| f["type"] == "approval_result").await;
    assert_eq!(result["status"], "approved");

    // Left alone after the requester left: expires, never runs.
    let (mut req, _) = s.raw_session("requester2").await;
    req.send_json(&revoke("g2", &v2.device_id())).await.unwrap();
    recv_until(&mut req, |f| f["type"] == "approval_request").await;
    let ask2 = recv_until(&mut appr, |f| f["type"] == "approval_request").await;
    drop(req);
    let result = tokio::time::timeout(
        Duration::from_secs(6),
        recv_until(&mut appr, |f| {
            f["type"] == "approval_result" && f["approval_id"] == ask2["approval_id"]
        }),
    )
    .await
    .expect("the orphaned approval expires on time");
    assert_eq!(result["status"], "expired");

    // Let the first action's record reach the log.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = audit_now(&s).await;
    let count = |action: &str, approval: &Value| {
        log.iter()
            .filter(|r| r["action"] == action && r["approval_id"] == *approval)
            .count()
    };
    let runs = log
        .iter()
        .filter(|r| r["action"] == "revoke_device" && r["outcome"] == "ok")
        .count();
    assert_eq!(runs, 1, "exactly the approved revocation ran: {log:?}");
    assert_eq!(count("approval.approved", &ask["approval_id"]), 1);
    assert_eq!(count("approval.expired", &ask2["approval_id"]), 1);
    assert_eq!(count("approval.approved", &ask2["approval_id"]), 0);
}

/// A peer that floods binary frames (each refused with an `error` frame)
/// while it reads every reply: the session loop lets the writer run as the
/// replies queue up, so the peer gets all of them and is not closed as a
/// slow consumer (before, only text frames gave the writer its turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_flood_that_reads_its_replies_is_not_closed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const N: usize = 5_000;
    let s = TestServer::start_with_config("[server]\ndevice_request_burst = 0\n").await;
    let (r, _) = s.raw_session("binary").await;
    let (mut tx, mut rx) = r.ws.split();
    let sender = tokio::spawn(async move {
        for _ in 0..N {
            tx.feed(Message::Binary(vec![0u8; 8].into())).await.unwrap();
        }
        tx.flush().await.unwrap();
        tx
    });
    let mut errors = 0;
    while errors < N {
        let m = tokio::time::timeout(Duration::from_secs(30), rx.next())
            .await
            .expect("a reply within 30 s")
            .expect("the session stays open")
            .expect("no error: not closed as a slow consumer");
        match m {
            Message::Text(t) => {
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(f["type"], "error", "{f}");
                assert_eq!(f["code"], "invalid_request", "{f}");
                errors += 1;
            }
            Message::Close(c) => panic!("closed after {errors} replies: {c:?}"),
            _ => {}
        }
    }
    let _ = sender.await.unwrap();
}
