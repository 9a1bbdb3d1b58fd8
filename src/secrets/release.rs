//! The release flow (SPEC §10 Release approvals, Leases): validation, the
//! no-device and unknown-name refusals, lease hits, the approval, and the
//! audit records. Shared by the local socket and task runs.

use std::future::Future;
use std::pin::Pin;

use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{SecretValue, Secrets, check_name};
use crate::protocol::{ApiError, ErrorCode};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The longest `reason`, in characters.
pub const MAX_REASON_CHARS: usize = 200;

/// Who asks for a release (SPEC §10 `requester`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    /// `cli` or `task`.
    pub kind: String,
    pub key: String,
    pub pid: Option<u32>,
    pub exe: Option<String>,
}

impl Requester {
    pub fn task(name: &str) -> Requester {
        Requester {
            kind: "task".into(),
            key: format!("task:{name}"),
            pid: None,
            exe: None,
        }
    }
    pub fn to_json(&self) -> Value {
        json!({"kind": self.kind, "key": self.key, "pid": self.pid, "exe": self.exe})
    }
    /// How a summary names it: `task nightly-backup`, `cli /usr/bin/bash`.
    fn shown(&self) -> String {
        match self.key.strip_prefix("task:") {
            Some(t) if self.kind == "task" => format!("task {t}"),
            _ => format!("{} {}", self.kind, self.key),
        }
    }
}

/// A release request, before validation.
#[derive(Debug, Clone)]
pub struct ReleaseRequest {
    pub names: Vec<String>,
    pub requester: Requester,
    pub reason: String,
    pub lease_secs: u64,
}

/// An approval that was granted.
#[derive(Debug, Clone)]
pub struct Granted {
    pub approval_id: String,
    /// The device whose approval key signed.
    pub device_id: Option<String>,
}

/// An approval that was created and now waits (for "waiting for approval").
#[derive(Debug, Clone)]
pub struct PendingNotice {
    pub approval_id: String,
    pub expires_at_ms: i64,
    pub summary: String,
}

/// One audit record about secrets: names and requesters, never values.
#[derive(Debug, Clone, Default)]
pub struct SecretAudit {
    pub action: &'static str,
    pub outcome: String,
    pub device_id: Option<String>,
    pub names: Vec<String>,
    pub requester: Option<Value>,
    pub approval_id: Option<String>,
    pub lease_id: Option<String>,
    /// Leases this action ended.
    pub leases_ended: Vec<String>,
}

/// An ask that ended without a grant: why, and the approval it was if one
/// was made (a denied or expired release names it in its audit record).
#[derive(Debug)]
pub struct NotGranted {
    pub error: ApiError,
    pub approval_id: Option<String>,
}

impl From<ApiError> for NotGranted {
    fn from(error: ApiError) -> NotGranted {
        NotGranted {
            error,
            approval_id: None,
        }
    }
}

impl From<NotGranted> for ApiError {
    fn from(n: NotGranted) -> ApiError {
        n.error
    }
}

/// What the vault needs from the server: the approval gate, the paired
/// devices, the lease cap and the audit log (implemented by
/// `approvals::Approvals`, which holds all four).
pub trait Host: Send + Sync {
    /// Asks the phones (an approval with null `origin_device_id` and
    /// `request_id`); `gone` expires it at once; `pending` hears of it.
    fn ask(
        &self,
        action: &'static str,
        params: Value,
        summary: String,
        gone: CancellationToken,
        pending: Option<oneshot::Sender<PendingNotice>>,
    ) -> BoxFuture<'_, Result<Granted, NotGranted>>;
    /// Paired, non-revoked devices.
    fn paired_devices(&self) -> BoxFuture<'_, Result<i64, ApiError>>;
    /// `secrets.max_lease_secs`.
    fn max_lease_secs(&self) -> u64;
    fn audit(&self, record: SecretAudit) -> BoxFuture<'_, ()>;
}

/// Released values, for the requester only.
pub struct Released {
    pub values: Vec<(String, SecretValue)>,
    pub approval_id: Option<String>,
    pub lease_id: Option<String>,
}

impl std::fmt::Debug for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Released")
            .field(
                "names",
                &self.values.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("approval_id", &self.approval_id)
            .field("lease_id", &self.lease_id)
            .finish()
    }
}

/// `3600` → `1 h`, `90` → `90 s`, `120` → `2 min`.
pub fn duration_words(secs: u64) -> String {
    if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{} h", secs / 3600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// The text a phone shows for a release.
pub fn summary(names: &[String], requester: &Requester, reason: &str, lease_secs: u64) -> String {
    let lease = if lease_secs == 0 {
        "once".to_string()
    } else {
        format!("for {}", duration_words(lease_secs))
    };
    format!(
        "Release {} to {} {lease}: {}",
        names.join(", "),
        requester.shown(),
        serde_json::to_string(reason).unwrap_or_default()
    )
}

/// Validates a request: names (distinct, sorted by byte value), reason,
/// lease within `max_lease_secs`.
pub fn validate(mut req: ReleaseRequest, max_lease_secs: u64) -> Result<ReleaseRequest, ApiError> {
    if req.names.is_empty() {
        return Err(ApiError::invalid("name at least one secret"));
    }
    for n in &req.names {
        check_name(n)?;
    }
    req.names.sort_unstable();
    req.names.dedup();
    if req.reason.trim().is_empty()
        || req.reason.chars().count() > MAX_REASON_CHARS
        || req.reason.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "reason: 1 to 200 characters without control characters",
        ));
    }
    if req.lease_secs > max_lease_secs {
        return Err(ApiError::invalid(format!(
            "lease_secs {} is above secrets.max_lease_secs ({max_lease_secs})",
            req.lease_secs
        )));
    }
    Ok(req)
}

/// The error for "no device is paired" (nothing is asked).
pub fn no_device() -> ApiError {
    ApiError::new(
        ErrorCode::Forbidden,
        "no device is paired, so no one can approve: pair a phone first (`secrets-agent pair`)",
    )
}

/// Runs a release end to end: refusals, lease hit, approval, values.
pub async fn release(
    secrets: &Secrets,
    host: &dyn Host,
    req: ReleaseRequest,
    gone: CancellationToken,
    pending: Option<oneshot::Sender<PendingNotice>>,
) -> Result<Released, ApiError> {
    let req = validate(req, host.max_lease_secs())?;
    let requester_json = req.requester.to_json();
    let refused = |outcome: &str, approval_id: Option<String>| SecretAudit {
        action: "secret.release_refused",
        outcome: outcome.to_string(),
        names: req.names.clone(),
        requester: Some(requester_json.clone()),
        approval_id,
        ..Default::default()
    };
    if host.paired_devices().await? == 0 {
        host.audit(refused("no_device", None)).await;
        return Err(no_device());
    }
    if let Some(missing) = secrets.first_missing(&req.names).await? {
        host.audit(refused("not_found", None)).await;
        return Err(ApiError::not_found(format!("no secret named {missing:?}")));
    }
    secrets.check_key().await?;
    if let Some(lease_id) = secrets
        .find_lease(&req.requester.kind, &req.requester.key, &req.names)
        .await?
    {
        let values = secrets.open_values(&req.names, true).await?;
        host.audit(SecretAudit {
            action: "secret.released",
            outcome: "ok".into(),
            names: req.names.clone(),
            requester: Some(requester_json.clone()),
            lease_id: Some(lease_id.clone()),
            ..Default::default()
        })
        .await;
        return Ok(Released {
            values,
            approval_id: None,
            lease_id: Some(lease_id),
        });
    }
    let params = json!({
        "names": req.names,
        "requester": requester_json,
        "reason": req.reason,
        "lease_secs": req.lease_secs,
    });
    let text = summary(&req.names, &req.requester, &req.reason, req.lease_secs);
    let granted = match host
        .ask("release_secret", params, text, gone, pending)
        .await
    {
        Ok(g) => g,
        Err(NotGranted { error, approval_id }) => {
            host.audit(refused(error.code.as_str(), approval_id)).await;
            return Err(error);
        }
    };
    let values = match secrets.open_values(&req.names, true).await {
        Ok(v) => v,
        Err(e) => {
            host.audit(refused("error", Some(granted.approval_id.clone())))
                .await;
            return Err(e.into());
        }
    };
    let lease_id = if req.lease_secs > 0 {
        Some(
            secrets
                .open_lease(
                    &req.names,
                    &req.requester,
                    &req.reason,
                    req.lease_secs,
                    &granted.approval_id,
                    granted.device_id.as_deref(),
                )
                .await?,
        )
    } else {
        None
    };
    host.audit(SecretAudit {
        action: "secret.released",
        outcome: "ok".into(),
        device_id: granted.device_id.clone(),
        names: req.names.clone(),
        requester: Some(requester_json),
        approval_id: Some(granted.approval_id.clone()),
        lease_id: lease_id.clone(),
        ..Default::default()
    })
    .await;
    Ok(Released {
        values,
        approval_id: Some(granted.approval_id),
        lease_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_reads_like_the_spec() {
        let s = summary(
            &["GITHUB_TOKEN".into()],
            &Requester::task("nightly-backup"),
            "push release notes",
            3600,
        );
        assert_eq!(
            s,
            "Release GITHUB_TOKEN to task nightly-backup for 1 h: \"push release notes\""
        );
    }

    #[test]
    fn names_are_sorted_and_distinct_and_the_lease_capped() {
        let r = ReleaseRequest {
            names: vec!["b".into(), "B".into(), "b".into(), "_a".into()],
            requester: Requester::task("t"),
            reason: "r".into(),
            lease_secs: 10,
        };
        assert_eq!(validate(r.clone(), 10).unwrap().names, ["B", "_a", "b"]);
        assert!(validate(r, 9).is_err());
    }
}
