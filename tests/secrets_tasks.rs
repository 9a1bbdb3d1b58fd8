//! Tasks with secrets (SPEC §10 Tasks): the run waits for the release
//! (kind `task`), then the child gets the variables; denied, the run fails
//! with that reason and the command never starts; no value in executions,
//! events or errors, and the captured output is cleaned of the values.

mod common;
mod secrets_support;

use std::time::Duration;

use common::{TestServer, answer_next};
use secrets_agent::secrets::SecretValue;
use secrets_support::*;
use serde_json::{Value, json};

const VALUE: &str = "ghp_task-secret-ü-123";

fn config() -> String {
    let task = |name: &str, cmd: &str, extra: &str| {
        format!(
            "[[tasks]]\nname = \"{name}\"\ncron = \"0 0 1 1 *\"\nhandler = \"command\"\ncommand = [\"sh\", \"-c\", {cmd:?}]\nsecrets = {{ TOKEN = \"GH\" }}\n{extra}\n"
        )
    };
    [
        task(
            "publish",
            "printf %s \"$TOKEN\" > got.txt",
            "secrets_reason = \"push release notes\"\nsecrets_lease_secs = 3600",
        ),
        task("leaky", "echo \"token is $TOKEN\" >&2; exit 9", ""),
        task("never", "touch ran.txt", ""),
    ]
    .concat()
}

async fn finished(phone: &mobile_client_sim::Client, name: &str) -> Value {
    phone
        .wait_event(T, |f| {
            f["event"] == "task_finished" && f["data"]["task_name"] == name
        })
        .await
        .unwrap()["data"]
        .clone()
}

#[tokio::test]
async fn a_task_runs_with_its_secrets_after_approval_and_not_at_all_on_deny() {
    let s = TestServer::start_with_config(&config()).await;
    let (phone, pid) = s.phone("owner").await;
    s.handle()
        .state
        .secrets
        .set("GH", SecretValue::new(VALUE.into()), None)
        .await
        .unwrap();
    let phone = std::sync::Arc::new(phone);
    let forms = leak_forms(VALUE);

    // Approve: the child gets TOKEN; trigger_task answered once the run started.
    let r = phone
        .request("trigger_task", json!({"name": "publish"}))
        .await
        .unwrap();
    assert_eq!(r["result"], "success", "{r}");
    let again = phone
        .request("trigger_task", json!({"name": "publish"}))
        .await
        .unwrap();
    common::assert_error(&again, "conflict");
    let req = answer_next(&phone, &pid, "approve").await;
    assert_eq!(req["action"], "release_secret");
    assert_eq!(
        req["params"],
        json!({"names": ["GH"], "requester": {"kind": "task", "key": "task:publish", "pid": null, "exe": null},
               "reason": "push release notes", "lease_secs": 3600})
    );
    assert_eq!(
        req["summary"],
        "Release GH to task publish for 1 h: \"push release notes\""
    );
    let done = finished(&phone, "publish").await;
    assert_eq!(done["success"], true, "{done}");
    assert_eq!(
        std::fs::read_to_string(s.path().join("got.txt")).unwrap(),
        VALUE
    );
    // The lease serves the next run without asking.
    phone
        .request("trigger_task", json!({"name": "publish"}))
        .await
        .unwrap();
    assert_eq!(finished(&phone, "publish").await["success"], true);

    // Output that echoes the value is cleaned; the error holds no value.
    phone
        .request("trigger_task", json!({"name": "leaky"}))
        .await
        .unwrap();
    let req = answer_next(&phone, &pid, "approve").await;
    assert_eq!(req["params"]["reason"], "manual run");
    let done = finished(&phone, "leaky").await;
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains("exit code 9") && err.contains("token is [redacted]"),
        "{err}"
    );
    assert_no_leak("the execution event", done.to_string().as_bytes(), &forms);

    // Deny: the run fails with that reason and the command never starts.
    phone
        .request("trigger_task", json!({"name": "never"}))
        .await
        .unwrap();
    answer_next(&phone, &pid, "deny").await;
    let done = finished(&phone, "never").await;
    assert_eq!(done["success"], false);
    assert!(
        done["error"].as_str().unwrap().contains("approval_denied"),
        "{done}"
    );
    assert!(
        !s.path().join("ran.txt").exists(),
        "the command never started"
    );

    // Executions (the stored rows) hold no value.
    for name in ["publish", "leaky", "never"] {
        let r = phone
            .request(
                "list_task_executions",
                json!({"task_name": name, "limit": 10}),
            )
            .await
            .unwrap();
        assert_no_leak("executions", r.to_string().as_bytes(), &forms);
    }
    // Secrets on a webhook task are refused at parse time.
    let bad = secrets_agent::scheduler::task::parse_task(
        &toml::from_str(
            "name='w'\ncron='* * * * *'\nhandler='webhook'\nurl='http://x/'\nsecrets={A='B'}",
        )
        .unwrap(),
    );
    assert!(bad.unwrap_err().contains("only for `command` and `plugin`"));
    let _ = Duration::ZERO;
}
