//! Running one task: the four handler kinds (SPEC §7). Each returns
//! Ok(()) or the error recorded in the execution.
//!
//! A webhook URL is a bearer secret: errors, events and log lines name it
//! only by scheme, host, port and path ([`redact_url`]), never its user
//! info, query or fragment. A failed command's `error` carries at most the
//! last [`ERROR_TAIL`] characters of its stderr.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::task::{Builtin, Handler, TaskDef};
use super::{Scheduler, executions};
use crate::config::Config;
use crate::redact::redact_url;
use crate::secrets::SecretValue;
use crate::secrets::release::{Host, ReleaseRequest, Requester};

/// Output kept per stream, in bytes (the tail); the rest is dropped.
pub const KEEP_OUTPUT: usize = 64 * 1024;
/// A failed command's `error` holds at most this many characters (Unicode
/// scalar values) of its stderr: the last ones, decoded as lossy UTF-8,
/// trimmed, and cut only at character boundaries (`…` marks a cut).
pub const ERROR_TAIL: usize = 1000;

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

/// `bytes` with every occurrence of a released value replaced.
fn clean(mut bytes: Vec<u8>, secrets: &[(String, SecretValue)]) -> Vec<u8> {
    for (_, v) in secrets {
        let needle = v.expose().as_bytes();
        if needle.is_empty() {
            continue;
        }
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i..].starts_with(needle) {
                out.extend_from_slice(b"[redacted]");
                i += needle.len();
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        zeroize::Zeroize::zeroize(&mut bytes);
        bytes = out;
    }
    bytes
}

/// Asks for the task's secrets (kind `task`) and waits; Err is the run's
/// error (denied, expired, refused), which names no value.
async fn release_for(
    sched: &Scheduler,
    host: &dyn Host,
    task: &TaskDef,
    trigger: &str,
) -> Result<Vec<(String, SecretValue)>, String> {
    if task.secrets.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = task.secrets.env.iter().map(|(_, n)| n.clone()).collect();
    let reason = task.secrets.reason.clone().unwrap_or_else(|| {
        match trigger {
            "manual" => "manual run",
            "catch_up" => "catch-up run",
            _ => "scheduled run",
        }
        .to_string()
    });
    let req = ReleaseRequest {
        names,
        requester: Requester::task(&task.name),
        reason,
        lease_secs: task.secrets.lease_secs,
    };
    let released = crate::secrets::release::release(
        &sched.deps().secrets,
        host,
        req,
        tokio_util::sync::CancellationToken::new(),
        None,
    )
    .await
    .map_err(|e| format!("secrets not released ({}): {}", e.code.as_str(), e.message))?;
    let by_name: std::collections::HashMap<&str, &SecretValue> = released
        .values
        .iter()
        .map(|(n, v)| (n.as_str(), v))
        .collect();
    task.secrets
        .env
        .iter()
        .map(|(var, name)| {
            by_name
                .get(name.as_str())
                .map(|v| (var.clone(), (*v).clone()))
                .ok_or_else(|| format!("secret {name:?} was not released"))
        })
        .collect()
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    // A character cut by the 64 KiB window decodes as U+FFFD: drop it.
    let s = s.trim().trim_start_matches('\u{fffd}').trim();
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
    secrets: &[(String, SecretValue)],
) -> Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut child = tokio::process::Command::new(prog)
        .args(args)
        .envs(secrets.iter().map(|(k, v)| (k, v.expose())))
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
    // The captured output is cleaned of the values the run received.
    let stderr = clean(err.await.unwrap_or_default(), secrets);
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

/// `text` (e.g. an HTTP client's error) with `url` and its secret parts
/// (user info, query, fragment) replaced, in case the text quotes them.
fn scrub(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    let authority_end = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let mut secrets: Vec<&str> = Vec::new();
    if let Some((userinfo, _)) = after_scheme[..authority_end].rsplit_once('@') {
        secrets.push(userinfo);
        secrets.extend(userinfo.split(':'));
    }
    if let Some((_, query)) = url.split_once('?') {
        secrets.push(query);
        secrets.push(query.split('#').next().unwrap_or(query));
    }
    if let Some((_, fragment)) = url.split_once('#') {
        secrets.push(fragment);
    }
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in secrets.into_iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "[redacted]");
    }
    out
}

fn webhook(url: &str, method: &str, timeout: Duration, body: &Value) -> Result<(), String> {
    let shown = redact_url(url);
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
    .map_err(|e| format!("webhook {method} {shown}: {}", scrub(&e.to_string(), url)))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "webhook {method} {shown} answered HTTP {}",
            status.as_u16()
        ))
    }
}

/// Runs the task's handler to completion. `host` asks for its secrets.
pub async fn run(
    sched: &Scheduler,
    host: &dyn Host,
    task: &TaskDef,
    execution_id: i64,
    started_at: i64,
    trigger: &str,
) -> Result<(), String> {
    match &task.handler {
        Handler::Command { argv, timeout_secs } => {
            let secrets = release_for(sched, host, task, trigger).await?;
            run_process(
                argv,
                &sched.deps().root,
                None,
                Duration::from_secs(*timeout_secs),
                &secrets,
            )
            .await
        }
        Handler::Plugin {
            plugin,
            timeout_secs,
        } => {
            let cmd = sched.deps().plugins.task_command(plugin)?;
            let secrets = release_for(sched, host, task, trigger).await?;
            let input = describe_run(task, execution_id, started_at, trigger)
                .to_string()
                .into_bytes();
            run_process(
                &cmd.argv,
                &cmd.dir,
                Some(input),
                Duration::from_secs(*timeout_secs),
                &secrets,
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
            // The HTTP client logs the request line, query included, at
            // debug: nothing is logged during the call (its errors come
            // back in our own, redacted, message).
            tokio::task::spawn_blocking(move || {
                tracing::subscriber::with_default(
                    tracing::subscriber::NoSubscriber::default(),
                    || webhook(&url, &method, timeout, &body),
                )
            })
            .await
            .map_err(|e| e.to_string())?
        }
        Handler::Builtin(Builtin::AuditVerify) => {
            let deps = sched.deps();
            deps.audit.flush().await;
            let (dir, db) = (
                Config::resolve(&deps.root, &sched.config().audit.dir),
                deps.db.clone(),
            );
            tokio::task::spawn_blocking(move || {
                crate::storage::audit::verify(&dir, &db).map(|_| ())
            })
            .await
            .map_err(|e| e.to_string())?
        }
        Handler::Builtin(Builtin::PruneExecutions) => {
            let n = sched
                .deps()
                .db
                .call(|c| executions::prune(c))
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(deleted = n, "old task executions pruned");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_secrets() {
        let url = "https://user:pa55@hooks.example.net:8443/a/b?token=SECRET#frag";
        assert_eq!(redact_url(url), "https://hooks.example.net:8443/a/b");
        assert_eq!(redact_url("http://127.0.0.1/x"), "http://127.0.0.1/x");
        assert_eq!(redact_url("not a url"), "[unparseable url]");
        let text = format!("bad uri: {url} (user:pa55, token=SECRET, frag)");
        let s = scrub(&text, url);
        for secret in ["pa55", "SECRET", "user", "frag"] {
            assert!(!s.contains(secret), "{secret} in {s}");
        }
    }

    #[test]
    fn the_stderr_tail_is_capped_at_character_boundaries() {
        // 3-byte characters: a byte cap would split one.
        let long = "€".repeat(ERROR_TAIL + 10);
        let t = tail(long.as_bytes());
        assert_eq!(t.chars().count(), ERROR_TAIL + 1, "the tail and the … mark");
        assert!(t.starts_with('…') && t.ends_with('€'));
        // The 64 KiB window can cut a character in two: no U+FFFD is shown.
        let cut = &"€".as_bytes()[1..];
        let t = tail(&[cut, "ok".as_bytes()].concat());
        assert_eq!(t, "ok");
    }
}
