//! Shared helpers of the `secrets_*` tests: the `secret` CLI run against a
//! test server's data dir, and a phone that answers release approvals.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

pub const T: Duration = Duration::from_secs(20);

/// Runs `secrets-agent secret ARGS --data-dir DIR` with `stdin`.
pub async fn cli(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    cli_env(dir, args, stdin, &[]).await
}

pub async fn cli_env(dir: &Path, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(crate::common::bin());
    cmd.arg("secret");
    // `--data-dir` goes before `--` (exec).
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    cmd.args(&args[..split])
        .arg("--data-dir")
        .arg(dir)
        .args(&args[split..]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .env("SECRETS_AGENT_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

/// Spawns [`cli`] so a phone can answer meanwhile.
pub fn spawn_cli(dir: &Path, args: &[&str], stdin: &[u8]) -> tokio::task::JoinHandle<Output> {
    let (dir, args, stdin) = (
        dir.to_path_buf(),
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        stdin.to_vec(),
    );
    tokio::spawn(async move {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&dir, &a, &stdin).await
    })
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every encoding of `value` a leak could take: itself, base64 (standard
/// and URL-safe, padded or not) and hex (lower and upper case).
pub fn leak_forms(value: &str) -> Vec<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let b = value.as_bytes();
    vec![
        value.to_string(),
        STANDARD.encode(b),
        STANDARD_NO_PAD.encode(b),
        URL_SAFE.encode(b),
        URL_SAFE_NO_PAD.encode(b),
        hex::encode(b),
        hex::encode_upper(b),
    ]
}

/// Panics if `haystack` holds any of `forms`.
#[track_caller]
pub fn assert_no_leak(what: &str, haystack: &[u8], forms: &[String]) {
    for f in forms {
        assert!(
            !haystack.windows(f.len().max(1)).any(|w| w == f.as_bytes()),
            "{what} holds the secret (form {:?}…)",
            &f[..f.len().min(12)]
        );
    }
}

/// One request over `DIR/agent.sock` from this process; every line the
/// server sent, the final one last.
pub async fn sock(dir: &Path, request: Value) -> Vec<Value> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let s = tokio::net::UnixStream::connect(dir.join("agent.sock"))
        .await
        .unwrap();
    let (rd, mut wr) = s.into_split();
    wr.write_all(format!("{request}\n").as_bytes())
        .await
        .unwrap();
    let mut lines = BufReader::new(rd).lines();
    let mut out = Vec::new();
    while let Some(l) = lines.next_line().await.unwrap() {
        let v: Value = serde_json::from_str(&l).unwrap();
        let last = v["type"] != "pending";
        out.push(v);
        if last {
            break;
        }
    }
    out
}

pub fn spawn_sock(dir: &Path, request: Value) -> tokio::task::JoinHandle<Vec<Value>> {
    let dir = dir.to_path_buf();
    tokio::spawn(async move { sock(&dir, request).await })
}

/// A release request line.
pub fn release_req(names: &[&str], requester: &str, lease_secs: u64) -> Value {
    serde_json::json!({"op": "release", "names": names, "reason": "test", "lease_secs": lease_secs, "requester": requester})
}
