//! A secret's value is nowhere but where it was released (SPEC §10 Store):
//! after setting it, releasing it (get, exec, a lease hit, a task) and
//! listing, the value — and its base64 and hex forms — is absent from every
//! frame every phone received, the server log at trace level, the audit
//! files, `agent.db` and its WAL (bytes), and `Debug` output.

mod common;
mod secrets_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestServer, capture_logs, logged_bytes};
use mobile_client_sim::client::approval_response;
use secrets_support::*;
use serde_json::{Value, json};

const VALUE: &str = "Zq8-c4n4ry-ü-31337-leak-probe-value";

fn task_config() -> String {
    "[[tasks]]\nname = \"job\"\ncron = \"0 0 1 1 *\"\nhandler = \"command\"\ncommand = [\"sh\", \"-c\", \"test \\\"$T\\\" = \\\"x$T\\\" || echo \\\"$T\\\" >&2; exit 1\"]\nsecrets = { T = \"PROBE\" }\n".into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_value_is_nowhere_else() {
    capture_logs();
    let forms = leak_forms(VALUE);
    // The scan itself finds each form.
    for f in &forms {
        let hay = format!("..{f}..");
        assert!(
            std::panic::catch_unwind(|| assert_no_leak("probe", hay.as_bytes(), &forms)).is_err()
        );
    }
    let s = TestServer::start_with_config(&task_config()).await;

    // An observer phone records every frame it gets.
    let observer_id =
        mobile_client_sim::Identity::generate("observer", mobile_client_sim::ApprovalAlg::Ed25519);
    let (obs, _) = mobile_client_sim::client::pair(
        &s.endpoint(),
        &mut observer_id.clone(),
        &s.code(),
        Some(&s.server_key()),
    )
    .await
    .unwrap();
    drop(obs);
    let mut raw = s.raw_authed(&observer_id).await;
    // The approver is a raw connection too: every frame it gets is kept, and
    // it approves every request.
    let (_c, approver_id) = s.phone("approver").await;
    let mut approver = s.raw_authed(&approver_id).await;
    let frames: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let observe = {
        let (frames, stop) = (frames.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    f = raw.recv_frame() => match f {
                        Ok(f) => frames.lock().unwrap().push(f.to_string()),
                        Err(_) => return raw,
                    },
                    _ = stop.cancelled() => return raw,
                }
            }
        })
    };
    let approve = {
        let (frames, stop, id) = (frames.clone(), stop.clone(), approver_id.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    f = approver.recv_frame() => match f {
                        Ok(f) => {
                            frames.lock().unwrap().push(f.to_string());
                            if f["type"] == "approval_request" {
                                approver.send_json(&approval_response(&id, &f, "approve")).await.unwrap();
                            }
                        }
                        Err(_) => return approver,
                    },
                    _ = stop.cancelled() => return approver,
                }
            }
        })
    };

    // Set from the terminal, get, exec, a lease and its hit, a task run.
    let out = cli(s.path(), &["set", "PROBE"], format!("{VALUE}\n").as_bytes()).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = cli(
        s.path(),
        &[
            "get",
            "PROBE",
            "--reason",
            "r",
            "--lease-secs",
            "60",
            "--requester",
            "me",
        ],
        b"",
    )
    .await;
    assert_eq!(out.stdout, VALUE.as_bytes());
    let out = cli(
        s.path(),
        &["get", "PROBE", "--reason", "r", "--requester", "me"],
        b"",
    )
    .await;
    assert_eq!(out.stdout, VALUE.as_bytes(), "the lease hit");
    let out = cli(
        s.path(),
        &[
            "exec",
            "--reason",
            "r",
            "--env",
            "V=PROBE",
            "--",
            "sh",
            "-c",
            "test -n \"$V\"",
        ],
        b"",
    )
    .await;
    assert_eq!(code(&out), 0);
    // Phone reads, over a third session.
    let (phone, _) = s.connect(&approver_id).await;
    let mut replies = Vec::new();
    for (a, p) in [
        ("list_secrets", json!({})),
        ("list_secret_leases", json!({})),
        ("get_dashboard", json!({})),
        ("list_approvals", json!({})),
        ("get_config", json!({})),
        ("trigger_task", json!({"name": "job"})),
    ] {
        replies.push(phone.request(a, p).await.unwrap().to_string());
    }
    let done = phone
        .wait_event(T, |f| f["event"] == "task_finished")
        .await
        .unwrap();
    assert!(
        done["data"]["error"]
            .as_str()
            .unwrap()
            .contains("[redacted]"),
        "{done}"
    );
    let r = phone
        .request(
            "list_task_executions",
            json!({"task_name": "job", "limit": 5}),
        )
        .await
        .unwrap();
    replies.push(r.to_string());
    let dash: Value = serde_json::from_str(&replies[2]).unwrap();
    assert_eq!(dash["secret_count"], 1);

    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    let _ = observe.await.unwrap();
    let _ = approve.await.unwrap();
    let frames = frames.lock().unwrap().clone();
    assert!(
        frames.iter().any(|f| f.contains("release_secret")),
        "the observer saw the requests"
    );
    for f in frames.iter().chain(replies.iter()) {
        assert_no_leak("a frame a phone received", f.as_bytes(), &forms);
    }

    // Debug output of what holds values.
    let st = &s.handle().state;
    let released = secrets_agent::secrets::release::Released {
        values: vec![(
            "PROBE".into(),
            secrets_agent::secrets::SecretValue::new(VALUE.into()),
        )],
        approval_id: None,
        lease_id: None,
    };
    let set: secrets_agent::handlers::secrets::SetSecret =
        serde_json::from_value(json!({"name": "PROBE", "value": VALUE})).unwrap();
    let values = st
        .secrets
        .open_values(&["PROBE".to_string()], false)
        .await
        .unwrap();
    let debug = format!(
        "{released:?} {set:?} {values:?} {:?} {st:?} {:?}",
        st.secrets,
        st.config()
    );
    assert!(debug.contains("PROBE"));
    assert_no_leak("Debug output", debug.as_bytes(), &forms);

    // Audit files, the database and its WAL, the log (trace level).
    let mut s = s;
    s.stop().await;
    let dir = s.path().to_path_buf();
    for entry in std::fs::read_dir(dir.join("audit")).unwrap() {
        let p = entry.unwrap().path();
        assert_no_leak(
            &p.display().to_string(),
            &std::fs::read(&p).unwrap(),
            &forms,
        );
    }
    for f in ["agent.db", "agent.db-wal", "agent.db-shm"] {
        if let Ok(bytes) = std::fs::read(dir.join(f)) {
            assert_no_leak(f, &bytes, &forms);
        }
    }
    let log = logged_bytes();
    assert!(
        log.len() > 2_000,
        "the trace log was captured ({} bytes)",
        log.len()
    );
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("secret set") && text.contains("DEBUG"),
        "{text}"
    );
    assert_no_leak("the server log", &log, &forms);
}
