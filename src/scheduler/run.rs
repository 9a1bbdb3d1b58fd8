//! Running one task: the four handler kinds (SPEC §7). Each returns
//! Ok(()) or the error recorded in the execution.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::executions;
use super::task::{Builtin, Handler, TaskDef};
use crate::state::AppState;

/// Output kept per stream; the rest is dropped.
const KEEP_OUTPUT: usize = 64 * 1024;
/// Characters of stderr put into a failed run's `error`.
const ERROR_TAIL: usize = 1000;

/// Reads a stream to the end, keeping at most `KEEP_OUTPUT` bytes (the tail).
async fn drain(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > KEEP_OUTPUT {
                    kept.drain(..kept.len() - KEEP_OUTPUT);
                }
            }
        }
    }
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let n = s.chars().count();
    if n <= ERROR_TAIL {
        s.to_string()
    } else {
        format!("…{}", s.chars().skip(n - ERROR_TAIL).collect::<String>())
    }
}

/// Runs argv (no shell) in `cwd`, with `stdin` written to it, killed after
/// `timeout`. Non-zero exit → Err with the code and the stderr tail.
pub async fn run_process(
    argv: &[String],
    cwd: &std::path::Path,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut child = tokio::process::Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {prog:?}: {e}"))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            let _ = pipe.write_all(&data).await;
        });
    }
    let out = tokio::spawn(drain(child.stdout.take().expect("piped stdout")));
    let err = tokio::spawn(drain(child.stderr.take().expect("piped stderr")));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => s.map_err(|e| format!("waiting for {prog:?}: {e}"))?,
        Err(_) => {
            let _ = child.kill().await;
            return Err(format!("timed out after {} s; killed", timeout.as_secs()));
        }
    };
    let stdout = out.await.unwrap_or_default();
    let stderr = err.await.unwrap_or_default();
    tracing::debug!(program = %prog, stdout_bytes = stdout.len(), "task command finished");
    if status.success() {
        Ok(())
    } else {
        let code = status
            .code()
            .map(|c| format!("exit code {c}"))
            .unwrap_or_else(|| "killed by a signal".into());
        let t = tail(&stderr);
        Err(if t.is_empty() {
            code
        } else {
            format!("{code}: {t}")
        })
    }
}

/// What a webhook receives and a plugin reads on stdin.
pub fn describe_run(task: &TaskDef, execution_id: i64, started_at: i64, trigger: &str) -> Value {
    json!({"task_id": task.id, "task_name": task.name, "execution_id": execution_id,
           "started_at": crate::clock::rfc3339_ms(started_at), "trigger": trigger})
}

fn webhook(url: &str, method: &str, timeout: Duration, body: &Value) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let resp = if method == "GET" {
        agent.get(url).call()
    } else {
        agent
            .post(url)
            .header("content-type", "application/json")
            .send(body.to_string())
    }
    .map_err(|e| format!("webhook {method} {url}: {e}"))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "webhook {method} {url} answered HTTP {}",
            status.as_u16()
        ))
    }
}

/// Runs the task's handler to completion.
pub async fn run(
    state: &Arc<AppState>,
    task: &TaskDef,
    execution_id: i64,
    started_at: i64,
    trigger: &str,
) -> Result<(), String> {
    match &task.handler {
        Handler::Command { argv, timeout_secs } => {
            run_process(
                argv,
                &state.dir.root,
                None,
                Duration::from_secs(*timeout_secs),
            )
            .await
        }
        Handler::Plugin {
            plugin,
            timeout_secs,
        } => {
            let cmd = state.plugins.task_command(plugin)?;
            let input = describe_run(task, execution_id, started_at, trigger)
                .to_string()
                .into_bytes();
            run_process(
                &cmd.argv,
                &cmd.dir,
                Some(input),
                Duration::from_secs(*timeout_secs),
            )
            .await
        }
        Handler::Webhook {
            url,
            method,
            timeout_secs,
        } => {
            let (url, method, body) = (
                url.clone(),
                method.clone(),
                describe_run(task, execution_id, started_at, trigger),
            );
            let timeout = Duration::from_secs(*timeout_secs);
            tokio::task::spawn_blocking(move || webhook(&url, &method, timeout, &body))
                .await
                .map_err(|e| e.to_string())?
        }
        Handler::Builtin(Builtin::AuditVerify) => {
            state.audit.flush().await;
            let (dir, db) = (
                state.dir.resolve(&state.config().audit.dir),
                state.db.clone(),
            );
            tokio::task::spawn_blocking(move || {
                crate::storage::audit::verify(&dir, &db).map(|_| ())
            })
            .await
            .map_err(|e| e.to_string())?
        }
        Handler::Builtin(Builtin::PruneExecutions) => {
            let n = state
                .db
                .call(|c| executions::prune(c))
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(deleted = n, "old task executions pruned");
            Ok(())
        }
    }
}
