//! Waking the phone (SPEC §10): every new approval POSTs `ACTION
//! APPROVAL_ID` (and the summary when `notify.include_summary`) as
//! text/plain to `notify.url`. In the background: it never delays or
//! decides an approval. At most [`ATTEMPTS`] attempts, with backoff. The
//! URL is a bearer capability: logged only as scheme, host and port.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Approvals;
use crate::redact::url_origin;

/// Attempts in all (the first and three retries).
pub(crate) const ATTEMPTS: u32 = 4;
/// Wait before the first retry; doubled each time.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Each attempt's time limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The body posted for an approval.
pub(crate) fn body(
    action: &str,
    approval_id: &str,
    summary: &str,
    include_summary: bool,
) -> String {
    if include_summary {
        format!("{action} {approval_id}\n{summary}")
    } else {
        format!("{action} {approval_id}")
    }
}

impl Approvals {
    /// Starts the notification of a new approval, if `notify.url` is set.
    pub(super) fn notify_created(&self, action: &str, approval_id: &str, summary: &str) {
        let cfg = self.config();
        let url = cfg.notify.url.expose().to_string();
        if url.is_empty() {
            return;
        }
        let text = body(action, approval_id, summary, cfg.notify.include_summary);
        let (shutdown, id) = (self.deps().shutdown.clone(), approval_id.to_string());
        self.deps()
            .tracker
            .spawn(post_with_retries(url, text, shutdown, id));
    }
}

/// Up to [`ATTEMPTS`] POSTs with backoff; stops at shutdown.
async fn post_with_retries(url: String, text: String, shutdown: CancellationToken, id: String) {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let (u, t) = (url.clone(), text.clone());
        let sent = tokio::select! {
            r = tokio::task::spawn_blocking(move || post(&u, t)) => r.unwrap_or_else(|e| Err(e.to_string())),
            _ = shutdown.cancelled() => return,
        };
        match sent {
            Ok(()) => {
                tracing::debug!(approval = %id, attempt, "approval notification sent");
                return;
            }
            Err(e) => {
                tracing::warn!(approval = %id, attempt, to = %url_origin(&url), error = %e, "approval notification failed");
            }
        }
        if attempt < ATTEMPTS {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff *= 2;
        }
    }
}

/// One POST; the HTTP client logs nothing during it (it would log the URL).
fn post(url: &str, text: String) -> Result<(), String> {
    tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(ATTEMPT_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        let resp = agent
            .post(url)
            .header("content-type", "text/plain; charset=utf-8")
            .send(text)
            .map_err(|e| {
                // Errors may quote the URL: only its kind is kept.
                let kind = format!("{e:?}");
                kind.split(['(', ' ', '{'])
                    .next()
                    .unwrap_or("error")
                    .to_string()
            })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", resp.status().as_u16()))
        }
    })
}
