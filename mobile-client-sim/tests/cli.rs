//! The `mobile-sim` binary against a real server: pair, admin (through an
//! approval), watch answering approvals by policy.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use secrets_agent::auth::pairing::create_offer;
use serde_json::Value;

fn sim(state: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mobile-sim"));
    c.arg("--state").arg(state);
    c
}

async fn run(mut c: Command) -> (bool, Value, String) {
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_admin_and_watch_with_approvals() {
    let dir = tempfile::tempdir().unwrap();
    let server = secrets_agent::start(secrets_agent::Options {
        data_dir: dir.path().join("data"),
        listen: Some("127.0.0.1:0".into()),
        print_pairing_code: false,
    })
    .await
    .unwrap();
    let st = &server.state;
    let code = |ttl| {
        create_offer(&st.db, st.clock.now_ms(), ttl, &st.key, server.url.clone())
            .unwrap()
            .code
    };
    let (phone, watcher) = (dir.path().join("phone"), dir.path().join("watcher"));

    let mut c = sim(&phone);
    c.args([
        "pair",
        "--url",
        &server.url,
        "--code",
        &code(60),
        "--name",
        "cli phone",
        "--server-key",
        st.key.public_b64(),
    ]);
    let (ok, v, out) = run(c).await;
    assert!(ok, "{out}");
    assert_eq!(v["device_id"].as_str().unwrap().len(), 32);
    let mut c = sim(&watcher);
    c.args([
        "pair",
        "--url",
        &server.url,
        "--code",
        &code(60),
        "--approval-alg",
        "es256",
    ]);
    let (ok, v, out) = run(c).await;
    assert!(ok, "{out}");
    assert_eq!(v["approval_key_alg"], "es256");

    let mut c = sim(&phone);
    c.args(["admin", "get_dashboard"]);
    let (ok, v, out) = run(c).await;
    assert!(ok, "{out}");
    assert_eq!(v["result"], "dashboard");
    let mut c = sim(&phone);
    c.args([
        "admin",
        "toggle_plugin",
        "name=nope",
        "enabled=false",
        "--jsonrpc",
    ]);
    let (ok, v, _) = run(c).await;
    assert!(!ok, "an error payload exits non-zero");
    assert_eq!(v["code"], "not_found");

    // A watcher that denies everything, then a gated request from the phone.
    let mut w = sim(&watcher)
        .args(["watch", "--approve", "never"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the first line, then keep draining: a closed stderr would make
    // the watcher's next line fail (and it would die before it answers).
    let stderr = w.stderr.take().unwrap();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        let _ = first_tx.send(lines.next().unwrap().unwrap());
        for _ in lines {}
    });
    let ready = first_rx.await.unwrap();
    assert!(ready.starts_with("connected as"), "{ready}");
    let mut c = sim(&phone);
    c.args([
        "admin",
        "update_config",
        "section=approvals",
        "value.timeout_secs=60",
    ]);
    let (ok, v, _) = run(c).await;
    assert!(!ok);
    assert_eq!(v["code"], "approval_denied", "the watcher denied it");
    w.kill().unwrap();
    let stdout = w.stdout.take().unwrap();
    let printed: Vec<Value> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    assert!(
        printed
            .iter()
            .any(|e| e["type"] == "approval_request" && e["sim_origin"] == "other_device"),
        "watch prints events, marking requests from other devices: {printed:?}"
    );
    let _ = w.wait();
    // With the watcher gone, the phone approves its own request.
    let mut c = sim(&phone);
    c.args([
        "admin",
        "update_config",
        "section=approvals",
        "value.timeout_secs=60",
        "--approve",
        "always",
    ]);
    let (ok, v, out) = run(c).await;
    assert!(ok, "{out}");
    assert_eq!(v["result"], "success");
    assert_eq!(server.state.config().approvals.timeout_secs, 60);
    server.shutdown().await;
}
