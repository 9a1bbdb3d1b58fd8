//! Webhook URLs are bearer secrets (issue 10): a failing webhook's error,
//! the events and the log (captured at `trace`, with the binary's filter)
//! name it by scheme, host, port and path only. A failed command's stderr
//! in `error` is capped at `ERROR_TAIL` characters, cut on characters.

mod common;

use std::time::Duration;

use common::{TestServer, capture_logs, logged};
use secrets_agent::scheduler::run::ERROR_TAIL;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn task(name: &str, rest: &str) -> String {
    format!("[[tasks]]\nname = \"{name}\"\ncron = \"0 0 1 1 *\"\n{rest}\n")
}

/// Triggers `name` and returns every event frame up to its `task_finished`.
async fn trigger_collecting_events(c: &mobile_client_sim::Client, name: &str) -> Vec<Value> {
    let r = c
        .request("trigger_task", json!({"name": name}))
        .await
        .unwrap();
    assert_eq!(r["result"], "success", "{r}");
    let mut seen = Vec::new();
    tokio::time::timeout(T, async {
        loop {
            let f = c.next_event().await.expect("connection open");
            let done = f["event"] == "task_finished" && f["data"]["task_name"] == name;
            seen.push(f);
            if done {
                return;
            }
        }
    })
    .await
    .expect("the run finished");
    seen
}

const SECRETS: &[&str] = &["hookuser", "hunter2pw", "SECRET123", "SECRETFRAG"];

#[tokio::test]
async fn a_failing_webhook_never_shows_its_secret_parts() {
    capture_logs();
    // Port 1 refuses the connection at once. User info, query and fragment
    // are all secrets; distinctive words so the checks cannot match by chance.
    let url = "http://hookuser:hunter2pw@127.0.0.1:1/hook?token=SECRET123#SECRETFRAG";
    let cfg = task(
        "leaky",
        &format!("handler = \"webhook\"\nurl = \"{url}\"\ntimeout_secs = 5"),
    );
    let s = TestServer::start_with_config(&cfg).await;
    let (c, _) = s.phone("p").await;
    let events = trigger_collecting_events(&c, "leaky").await;
    let finished = events.last().unwrap();
    assert_eq!(finished["data"]["success"], false, "{finished}");
    let error = finished["data"]["error"].as_str().unwrap();
    assert!(
        error.contains("http://127.0.0.1:1/hook"),
        "the error names the webhook by scheme, host, port and path: {error}"
    );

    let execs = c
        .request(
            "list_task_executions",
            json!({"task_name": "leaky", "limit": 10}),
        )
        .await
        .unwrap();
    assert_eq!(execs["executions"][0]["error"], error, "{execs}");
    let listed = c.request("list_scheduled_tasks", json!({})).await.unwrap();

    let log = logged();
    assert!(
        log.contains("task failed") && log.contains("leaky"),
        "the capture sees the server's log lines: {log}"
    );
    let wire = format!("{events:?}{execs}{listed}");
    for secret in SECRETS {
        assert!(!wire.contains(secret), "{secret} sent to the phone: {wire}");
        let leaked: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
        assert!(leaked.is_empty(), "{secret} in the log: {leaked:#?}");
    }
}

#[tokio::test]
async fn a_command_error_keeps_only_the_last_characters_of_stderr() {
    capture_logs();
    // 5000 two-byte characters, then a marker: more than the cap in both
    // bytes and characters.
    let script =
        "i=0; while [ $i -lt 5000 ]; do printf 'é' >&2; i=$((i+1)); done; printf 'END' >&2; exit 3";
    let cfg = task(
        "noisy",
        &format!("handler = \"command\"\ncommand = [\"sh\", \"-c\", \"{script}\"]"),
    );
    let s = TestServer::start_with_config(&cfg).await;
    let (c, _) = s.phone("p").await;
    let events = trigger_collecting_events(&c, "noisy").await;
    let error = events.last().unwrap()["data"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    let (head, stderr) = error.split_once(": ").unwrap();
    assert_eq!(head, "exit code 3");
    assert!(
        stderr.starts_with('…') && stderr.ends_with("éEND"),
        "{error}"
    );
    assert_eq!(
        stderr.chars().count(),
        ERROR_TAIL + 1,
        "the last {ERROR_TAIL} characters and the cut mark"
    );
    assert!(!stderr.contains('\u{fffd}'), "cut on a character boundary");
}
