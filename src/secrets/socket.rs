//! The local socket `DIR/agent.sock` (SPEC §10 Local interface): JSON
//! lines, one request per connection, peers of the server's own uid only
//! (SO_PEERCRED). The protocol is described in `docs/secrets.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::release::{self, Host, PendingNotice, Requester, SecretAudit};
use super::{SecretValue, Secrets};
use crate::protocol::{ApiError, ErrorCode};

/// The longest request line (a 64 KiB value, JSON-escaped, fits).
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// A peer must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "the secrets socket path {0} is {1} bytes, longer than a Unix socket address allows ({MAX_SOCKET_PATH}); use a shorter --data-dir"
    )]
    PathTooLong(String, usize),
    #[error("another server is already serving {0}")]
    InUse(String),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// Binds `path` (0600): a stale socket left by a crash is replaced; a live
/// one (another server on this data dir) is an error.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let len = path.as_os_str().as_bytes().len();
    if len > MAX_SOCKET_PATH {
        return Err(SocketError::PathTooLong(shown, len));
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(shown));
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| SocketError::Bind {
        path: shown.clone(),
        source,
    };
    let l = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(l)
}

/// Removes the socket file at shutdown.
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Serves the socket until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    secrets: Secrets,
    host: Arc<dyn Host>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let me = unsafe { libc::geteuid() };
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("never closed"),
            _ = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "secrets socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let (secrets, host, shutdown) = (secrets.clone(), host.clone(), shutdown.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = connection(stream, me, &secrets, &*host) => {}
                _ = shutdown.cancelled() => {}
            }
            drop(permit);
        });
    }
    remove(&path);
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Set {
        name: String,
        value: SecretValue,
        #[serde(default)]
        description: Option<String>,
    },
    Rm {
        name: String,
    },
    List,
    Release {
        names: Vec<String>,
        reason: String,
        #[serde(default)]
        lease_secs: u64,
        #[serde(default)]
        requester: Option<String>,
    },
}

fn error_line(e: &ApiError) -> String {
    json!({"type": "error", "code": e.code.as_str(), "message": e.message}).to_string()
}

/// The parent of `pid` and the parent's executable (SPEC §10 requester key).
fn parent_of(pid: u32) -> (Option<u32>, Option<String>) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ppid = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse::<u32>().ok());
    let exe = ppid.and_then(|p| {
        std::fs::read_link(format!("/proc/{p}/exe"))
            .ok()
            .map(|e| e.display().to_string())
    });
    (ppid, exe)
}

async fn connection(stream: UnixStream, me: u32, secrets: &Secrets, host: &dyn Host) {
    let cred = stream.peer_cred();
    let (rd, mut wr) = stream.into_split();
    let (uid, pid) = match &cred {
        Ok(c) => (c.uid(), c.pid().map(|p| p as u32)),
        Err(_) => (u32::MAX, None),
    };
    if uid != me {
        tracing::warn!(uid, pid, "secrets socket: peer of another user refused");
        host.audit(SecretAudit {
            action: "secret.peer_refused",
            outcome: format!("forbidden:uid={uid}"),
            ..Default::default()
        })
        .await;
        let e = ApiError::new(
            ErrorCode::Forbidden,
            "this socket serves only the user the server runs as",
        );
        let _ = wr
            .write_all(format!("{}\n", error_line(&e)).as_bytes())
            .await;
        return;
    }
    let mut reader = BufReader::new(rd.take(MAX_REQUEST_BYTES));
    let mut line = zeroize::Zeroizing::new(String::new());
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 && line.ends_with('\n') => {}
        _ => {
            let e = ApiError::invalid("send one JSON request line (at most 1 MiB) within 10 s");
            let _ = wr
                .write_all(format!("{}\n", error_line(&e)).as_bytes())
                .await;
            return;
        }
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let e = ApiError::invalid(format!("bad request: {e}"));
            let _ = wr
                .write_all(format!("{}\n", error_line(&e)).as_bytes())
                .await;
            return;
        }
    };
    drop(line);
    // The requester's disconnect withdraws what it waits for.
    let gone = CancellationToken::new();
    let mut rest = reader.into_inner().into_inner();
    let watcher = {
        let gone = gone.clone();
        async move {
            let mut buf = [0u8; 256];
            loop {
                match rest.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            gone.cancel();
            std::future::pending::<()>().await
        }
    };
    let (tx, rx) = oneshot::channel::<PendingNotice>();
    let work = handle(req, pid, secrets, host, gone.clone(), tx);
    tokio::pin!(work);
    tokio::pin!(watcher);
    let mut rx = Some(rx);
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            n = async { rx.as_mut().expect("checked").await }, if rx.is_some() => {
                rx = None;
                if let Ok(n) = n {
                    let line = json!({"type": "pending", "approval_id": n.approval_id, "expires_at": n.expires_at_ms, "summary": n.summary});
                    let _ = wr.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
            _ = &mut watcher => unreachable!("the watcher never ends"),
        }
    };
    let text = zeroize::Zeroizing::new(match out {
        Ok(v) => {
            let mut m = v;
            m.insert("type".into(), "ok".into());
            Value::Object(m).to_string()
        }
        Err(e) => error_line(&e),
    });
    let _ = wr.write_all(text.as_bytes()).await;
    let _ = wr.write_all(b"\n").await;
    let _ = wr.shutdown().await;
}

async fn handle(
    req: Request,
    pid: Option<u32>,
    secrets: &Secrets,
    host: &dyn Host,
    gone: CancellationToken,
    pending: oneshot::Sender<PendingNotice>,
) -> Result<Map<String, Value>, ApiError> {
    match req {
        Request::List => {
            let list = secrets.list().await?;
            let mut m = Map::new();
            m.insert(
                "secrets".into(),
                serde_json::to_value(list).unwrap_or_default(),
            );
            Ok(m)
        }
        Request::Set {
            name,
            value,
            description,
        } => {
            super::check_name(&name)?;
            super::check_value(value.expose())?;
            if let Some(d) = &description {
                super::check_description(d)?;
            }
            // A value cannot be sealed under a wrong or missing key: say so
            // before anyone is asked.
            secrets.check_key().await?;
            let approval = if host.paired_devices().await? > 0 {
                let replacing = secrets.exists(&name).await?;
                let mut params = json!({"name": name, "value": value.expose()});
                if let Some(d) = &description {
                    params["description"] = json!(d);
                }
                let summary = format!(
                    "{} secret {name} (from the command line on this machine)",
                    if replacing { "Replace" } else { "Create" }
                );
                Some(
                    host.ask("set_secret", params, summary, gone, Some(pending))
                        .await?,
                )
            } else {
                None
            };
            let replaced = apply_set(secrets, host, &name, value, description, approval).await?;
            let mut m = Map::new();
            m.insert("replaced".into(), replaced.into());
            Ok(m)
        }
        Request::Rm { name } => {
            super::check_name(&name)?;
            if !secrets.exists(&name).await? {
                return Err(ApiError::not_found(format!("no secret named {name:?}")));
            }
            let approval = if host.paired_devices().await? > 0 {
                let summary =
                    format!("Delete secret {name} (from the command line on this machine)");
                Some(
                    host.ask(
                        "delete_secret",
                        json!({"name": name}),
                        summary,
                        gone,
                        Some(pending),
                    )
                    .await?,
                )
            } else {
                None
            };
            apply_delete(secrets, host, &name, approval).await?;
            Ok(Map::new())
        }
        Request::Release {
            names,
            reason,
            lease_secs,
            requester,
        } => {
            let (ppid, exe) = pid.map(parent_of).unwrap_or((None, None));
            let key = match requester {
                Some(k) if k.starts_with("task:") => {
                    return Err(ApiError::invalid(
                        "--requester may not start with \"task:\"",
                    ));
                }
                Some(k)
                    if k.trim().is_empty()
                        || k.chars().count() > 256
                        || k.chars().any(char::is_control) =>
                {
                    return Err(ApiError::invalid(
                        "--requester: 1 to 256 characters without control characters",
                    ));
                }
                Some(k) => k,
                None => exe.clone().ok_or_else(|| {
                    ApiError::invalid(
                        "cannot read the requesting process's executable; pass --requester",
                    )
                })?,
            };
            let req = release::ReleaseRequest {
                names,
                requester: Requester {
                    kind: "cli".into(),
                    key,
                    pid: ppid,
                    exe,
                },
                reason,
                lease_secs,
            };
            let r = release::release(secrets, host, req, gone, Some(pending)).await?;
            let mut values = Map::new();
            for (n, v) in &r.values {
                values.insert(n.clone(), Value::String(v.expose().to_string()));
            }
            let mut m = Map::new();
            m.insert("values".into(), Value::Object(values));
            m.insert("approval_id".into(), json!(r.approval_id));
            m.insert("lease_id".into(), json!(r.lease_id));
            Ok(m)
        }
    }
}

/// Creates or replaces a secret (after its approval, if one was needed),
/// and records `secret.set`. Ok(replaced).
pub async fn apply_set(
    secrets: &Secrets,
    host: &dyn Host,
    name: &str,
    value: SecretValue,
    description: Option<String>,
    approval: Option<release::Granted>,
) -> Result<bool, ApiError> {
    let out = secrets.set(name, value, description).await?;
    host.audit(SecretAudit {
        action: "secret.set",
        outcome: if out.replaced { "replaced" } else { "created" }.into(),
        device_id: approval.as_ref().and_then(|a| a.device_id.clone()),
        names: vec![name.to_string()],
        approval_id: approval.map(|a| a.approval_id),
        leases_ended: out.ended_leases,
        ..Default::default()
    })
    .await;
    tracing::info!(secret = %name, replaced = out.replaced, "secret set");
    Ok(out.replaced)
}

/// Deletes a secret and its leases, and records `secret.deleted`.
pub async fn apply_delete(
    secrets: &Secrets,
    host: &dyn Host,
    name: &str,
    approval: Option<release::Granted>,
) -> Result<(), ApiError> {
    let ended = secrets.delete(name).await?;
    host.audit(SecretAudit {
        action: "secret.deleted",
        outcome: "ok".into(),
        device_id: approval.as_ref().and_then(|a| a.device_id.clone()),
        names: vec![name.to_string()],
        approval_id: approval.map(|a| a.approval_id),
        leases_ended: ended,
        ..Default::default()
    })
    .await;
    tracing::info!(secret = %name, "secret deleted");
    Ok(())
}
