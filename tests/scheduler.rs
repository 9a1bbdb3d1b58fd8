//! The scheduler (SPEC §6, §7): real runs of real commands, a local webhook
//! server, plugins; tokio's paused clock for schedules and timeouts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, assert_error};
use mobile_client_sim::Client;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

async fn executions(c: &Client, name: &str) -> Vec<Value> {
    let r = c
        .request(
            "list_task_executions",
            json!({"task_name": name, "limit": 100}),
        )
        .await
        .unwrap();
    assert_eq!(r["result"], "task_executions", "{r}");
    r["executions"].as_array().unwrap().clone()
}

async fn trigger_and_wait(c: &Client, name: &str) -> Value {
    let r = c
        .request("trigger_task", json!({"name": name}))
        .await
        .unwrap();
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(r["message"], format!("Task '{name}' started"));
    c.wait_event(T, |f| {
        f["event"] == "task_finished" && f["data"]["task_name"] == name
    })
    .await
    .unwrap()["data"]
        .clone()
}

fn task(name: &str, cron: &str, rest: &str) -> String {
    format!("[[tasks]]\nname = \"{name}\"\ncron = \"{cron}\"\n{rest}\n")
}

#[tokio::test(start_paused = true)]
async fn due_tasks_run_on_schedule_and_disabled_ones_do_not() {
    let cfg = format!(
        "[scheduler]\ncheck_interval_secs = 1\n{}{}",
        task(
            "every-2s",
            "*/2 * * * * *",
            "handler = \"builtin\"\nbuiltin = \"prune-executions\""
        ),
        task(
            "off",
            "*/2 * * * * *",
            "handler = \"builtin\"\nbuiltin = \"prune-executions\"\nenabled = false"
        ),
    );
    let s = TestServer::start_with_config(&cfg).await;
    let (c, _) = s.phone("p").await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let runs = executions(&c, "every-2s").await;
    assert!((2..=4).contains(&runs.len()), "ran on schedule: {runs:?}");
    assert!(
        runs.iter()
            .filter(|r| !r["completed_at"].is_null())
            .all(|r| r["success"] == true),
        "{runs:?}"
    );
    assert!(
        executions(&c, "off").await.is_empty(),
        "a disabled task does not run"
    );
    let dash = c.request("get_dashboard", json!({})).await.unwrap();
    assert_eq!(dash["scheduled_task_count"], 2);
    assert_eq!(dash["recent_executions"][0]["task_name"], "every-2s");
    // Scheduler disabled live: nothing more runs.
    s.handle().state.set_config({
        let mut c = (*s.handle().state.config()).clone();
        c.scheduler.enabled = false;
        c
    });
    let before = executions(&c, "every-2s").await.len();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        executions(&c, "every-2s").await.len(),
        before,
        "[scheduler] enabled = false applies live"
    );
}

#[tokio::test]
async fn list_shows_next_and_last_runs_in_the_configured_timezone() {
    let cfg = format!(
        "[scheduler]\ntimezone = \"Europe/Berlin\"\n{}{}{}",
        task(
            "morning",
            "0 9 * * *",
            "handler = \"builtin\"\nbuiltin = \"audit-verify\""
        ),
        task(
            "off",
            "0 9 * * *",
            "handler = \"builtin\"\nbuiltin = \"audit-verify\"\nenabled = false"
        ),
        task(
            "secs",
            "*/10 * * * * *",
            "handler = \"builtin\"\nbuiltin = \"audit-verify\""
        ),
    );
    let s = TestServer::start_with_config(&cfg).await;
    let (c, _) = s.phone("p").await;
    let list = c.request("list_scheduled_tasks", json!({})).await.unwrap();
    assert_eq!(list["result"], "scheduled_tasks");
    let tasks = list["tasks"].as_array().unwrap();
    let morning = &tasks[0];
    assert_eq!(morning["name"], "morning");
    assert!(morning["id"].as_str().unwrap().starts_with("task_"));
    assert_eq!(
        (
            morning["cron_expression"].as_str(),
            morning["handler_type"].as_str()
        ),
        (Some("0 9 * * *"), Some("builtin"))
    );
    assert_eq!(morning["last_run"], Value::Null);
    let next = chrono::DateTime::parse_from_rfc3339(morning["next_run"].as_str().unwrap()).unwrap();
    let local = next.with_timezone(&chrono_tz::Europe::Berlin);
    assert_eq!(
        local.format("%H:%M:%S").to_string(),
        "09:00:00",
        "09:00 in Berlin: {next}"
    );
    let now = chrono::Utc::now();
    let next = next.with_timezone(&chrono::Utc);
    assert!(next > now && next - now <= chrono::Duration::hours(24));
    assert_eq!(tasks[1]["next_run"], Value::Null, "disabled: no next run");
    let secs =
        chrono::DateTime::parse_from_rfc3339(tasks[2]["next_run"].as_str().unwrap()).unwrap();
    assert_eq!(secs.timestamp() % 10, 0);
    let ran = trigger_and_wait(&c, "morning").await;
    assert_eq!(ran["success"], true, "{ran}");
    let list = c.request("list_scheduled_tasks", json!({})).await.unwrap();
    assert_eq!(list["tasks"][0]["last_run"], ran["started_at"]);
}

#[tokio::test]
async fn trigger_records_success_and_failure_with_the_error() {
    let cfg = format!(
        "{}{}",
        task(
            "ok",
            "0 0 1 1 *",
            "handler = \"command\"\ncommand = [\"/bin/sh\", \"-c\", \"echo fine\"]\nenabled = false"
        ),
        task(
            "boom",
            "0 0 1 1 *",
            "handler = \"command\"\ncommand = [\"/bin/sh\", \"-c\", \"echo about to fail; echo 'disk full' >&2; exit 3\"]"
        ),
    );
    let s = TestServer::start_with_config(&cfg).await;
    let (c, _) = s.phone("p").await;
    let ok = trigger_and_wait(&c, "ok").await;
    assert_eq!(
        (ok["success"].as_bool(), ok["error"].as_str()),
        (Some(true), None),
        "runs even though disabled: {ok}"
    );
    let bad = trigger_and_wait(&c, "boom").await;
    assert_eq!(bad["success"], false);
    let err = bad["error"].as_str().unwrap();
    assert!(
        err.contains("exit code 3") && err.contains("disk full"),
        "{err}"
    );
    let hist = executions(&c, "boom").await;
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0]["task_id"], bad["task_id"]);
    assert!(hist[0]["completed_at"].is_string());
    let keys: Vec<&String> = hist[0].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 5, "{keys:?}");
}

// A real clock (1 s): a paused one auto-advanced the test's own wait for
// the event past its timeout while the server recorded the run.
#[tokio::test]
async fn a_hanging_command_is_killed_at_its_timeout() {
    let cfg = task(
        "hang",
        "0 0 1 1 *",
        "handler = \"command\"\ncommand = [\"/bin/sleep\", \"1000\"]\ntimeout_secs = 1",
    );
    let s = TestServer::start_with_config(&cfg).await;
    let (c, _) = s.phone("p").await;
    let r = trigger_and_wait(&c, "hang").await;
    assert_eq!(r["success"], false);
    assert!(
        r["error"].as_str().unwrap().contains("timed out after 1 s"),
        "{r}"
    );
}

#[tokio::test]
async fn triggering_a_running_task_does_not_start_a_second_run() {
    let cfg = task(
        "slow",
        "0 0 1 1 *",
        "handler = \"command\"\ncommand = [\"/bin/sleep\", \"30\"]\ntimeout_secs = 60",
    );
    let s = TestServer::start_with_config(&cfg).await;
    let (c, _) = s.phone("p").await;
    assert_eq!(
        c.request("trigger_task", json!({"name": "slow"}))
            .await
            .unwrap()["result"],
        "success"
    );
    let again = c
        .request("trigger_task", json!({"name": "slow"}))
        .await
        .unwrap();
    assert_error(&again, "conflict");
    let runs = executions(&c, "slow").await;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0]["completed_at"],
        Value::Null,
        "still running: completed_at is null"
    );
}

/// A one-shot HTTP server: answers `status` and returns the request it got.
async fn http_once(status: u16) -> (String, tokio::task::JoinHandle<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_string();
            if let Some(i) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if req.len() >= i + 4 + len {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        s.write_all(
            format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        String::from_utf8_lossy(&req).to_string()
    });
    (url, h)
}

#[tokio::test]
async fn webhooks_succeed_on_2xx_and_fail_otherwise() {
    let (ok_url, ok_req) = http_once(204).await;
    let (bad_url, _bad_req) = http_once(500).await;
    let cfg = format!(
        "{}{}{}",
        task(
            "hook",
            "0 0 1 1 *",
            &format!("handler = \"webhook\"\nurl = \"{ok_url}\"")
        ),
        task(
            "broken-hook",
            "0 0 1 1 *",
            &format!("handler = \"webhook\"\nurl = \"{bad_url}\"\nmethod = \"GET\"")
        ),
        task(
            "nobody-home",
            "0 0 1 1 *",
            "handler = \"webhook\"\nurl = \"http://127.0.0.1:9/x\"\ntimeout_secs = 5"
        ),
    );
    let s = TestServer::start_with_config(&cfg).await;
    let (c, _) = s.phone("p").await;
    let r = trigger_and_wait(&c, "hook").await;
    assert_eq!(r["success"], true, "{r}");
    let req = ok_req.await.unwrap();
    assert!(req.starts_with("POST /hook "), "{req}");
    let body: Value = serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        (body["task_name"].as_str(), body["trigger"].as_str()),
        (Some("hook"), Some("manual"))
    );
    let r = trigger_and_wait(&c, "broken-hook").await;
    assert_eq!(r["success"], false);
    assert!(r["error"].as_str().unwrap().contains("HTTP 500"), "{r}");
    let r = trigger_and_wait(&c, "nobody-home").await;
    assert_eq!(r["success"], false);
}

#[tokio::test]
async fn plugin_tasks_get_the_run_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plugins/reporter");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("plugin.toml"), "name = \"reporter\"\nversion = \"1\"\nplugin_type = \"task_handler\"\ncapabilities = [\"report\"]\ncommand = [\"/bin/sh\", \"-c\", \"cat > last-run.json\"]\n").unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "{}{}",
            task(
                "report",
                "0 0 1 1 *",
                "handler = \"plugin\"\nplugin = \"reporter\""
            ),
            task(
                "ghost",
                "0 0 1 1 *",
                "handler = \"plugin\"\nplugin = \"nope\""
            )
        ),
    )
    .unwrap();
    let s = TestServer::start_in_dir(dir).await;
    let (c, _) = s.phone("p").await;
    let r = trigger_and_wait(&c, "report").await;
    assert_eq!(r["success"], true, "{r}");
    let got: Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("last-run.json")).unwrap()).unwrap();
    assert_eq!(got["task_name"], "report");
    assert_eq!(got["trigger"], "manual");
    let r = trigger_and_wait(&c, "ghost").await;
    assert!(
        r["error"].as_str().unwrap().contains("no plugin named"),
        "{r}"
    );
    c.request(
        "toggle_plugin",
        json!({"name": "reporter", "enabled": false}),
    )
    .await
    .unwrap();
    let r = trigger_and_wait(&c, "report").await;
    assert!(r["error"].as_str().unwrap().contains("disabled"), "{r}");
}

#[tokio::test]
async fn bad_tasks_are_skipped_and_bad_params_refused() {
    let cfg = format!(
        "{}{}{}{}",
        task(
            "good",
            "0 0 1 1 *",
            "handler = \"builtin\"\nbuiltin = \"audit-verify\""
        ),
        task(
            "bad-cron",
            "every day",
            "handler = \"builtin\"\nbuiltin = \"audit-verify\""
        ),
        task("bad-handler", "0 0 1 1 *", "handler = \"smoke-signals\""),
        task("no-command", "0 0 1 1 *", "handler = \"command\""),
    );
    let mut s = TestServer::start_with_config(&cfg).await;
    let (c, id) = s.phone("p").await;
    let list = c.request("list_scheduled_tasks", json!({})).await.unwrap();
    assert_eq!(
        list["tasks"].as_array().unwrap().len(),
        1,
        "only the good task: {list}"
    );
    for (action, params) in [
        ("toggle_task", json!({"name": "ghost", "enabled": true})),
        ("trigger_task", json!({"name": "ghost"})),
        ("list_task_executions", json!({"task_name": "ghost"})),
    ] {
        assert_error(&c.request(action, params).await.unwrap(), "not_found");
    }
    for (action, params) in [
        ("toggle_task", json!({"name": "good"})),
        ("toggle_task", json!({"name": "good", "enabled": 1})),
        ("trigger_task", json!({})),
        (
            "list_task_executions",
            json!({"task_name": "good", "limit": 0}),
        ),
        (
            "list_task_executions",
            json!({"task_name": "good", "limit": 101}),
        ),
        ("list_scheduled_tasks", json!({"all": true})),
    ] {
        assert_error(&c.request(action, params).await.unwrap(), "invalid_request");
    }
    let r = c
        .request("toggle_task", json!({"name": "good", "enabled": false}))
        .await
        .unwrap();
    assert_eq!(r["message"], "Task 'good' disabled");
    s.restart().await;
    let (c, _) = s.connect(&id).await;
    let list = c.request("list_scheduled_tasks", json!({})).await.unwrap();
    assert_eq!(
        list["tasks"][0]["enabled"], false,
        "the toggle survived the restart"
    );
    assert_eq!(list["tasks"][0]["next_run"], Value::Null);
}

#[tokio::test]
async fn catch_up_runs_a_missed_slot_once_at_start() {
    let cfg = format!(
        "{}{}",
        task(
            "catcher",
            "0 * * * *",
            "handler = \"builtin\"\nbuiltin = \"audit-verify\"\ncatch_up = true"
        ),
        task(
            "waiter",
            "0 * * * *",
            "handler = \"builtin\"\nbuiltin = \"audit-verify\""
        ),
    );
    let mut s = TestServer::start_with_config(&cfg).await;
    let (c, id) = s.phone("p").await;
    assert!(executions(&c, "catcher").await.is_empty());
    s.stop().await;
    // The server was "down" for three hours: its progress marks are old.
    let db = rusqlite::Connection::open(s.path().join("agent.db")).unwrap();
    let old = chrono::Utc::now().timestamp_millis() - 3 * 3_600_000;
    db.execute(
        "INSERT INTO task_state(task_id, last_slot) SELECT task_id, ?1 FROM task_state WHERE 0",
        [old],
    )
    .unwrap();
    for name in ["catcher", "waiter"] {
        let tid = secrets_agent::scheduler::task::task_id(name);
        db.execute("INSERT INTO task_state(task_id, last_slot) VALUES (?1, ?2) ON CONFLICT(task_id) DO UPDATE SET last_slot = excluded.last_slot", rusqlite::params![tid, old]).unwrap();
    }
    drop(db);
    s.restart().await;
    let (c, _) = s.connect(&id).await;
    let c = Arc::new(c);
    let mut runs = executions(&c, "catcher").await;
    if runs.is_empty() || runs[0]["completed_at"].is_null() {
        c.wait_event(T, |f| f["event"] == "task_finished")
            .await
            .ok();
        runs = executions(&c, "catcher").await;
    }
    assert_eq!(runs.len(), 1, "caught up once, not three times: {runs:?}");
    assert!(
        executions(&c, "waiter").await.is_empty(),
        "without catch_up a missed slot waits for the next one"
    );
}
