//! Free space on the data and audit volumes: checked at start and every
//! [`CHECK_EVERY`]; what is low is logged (once, when it appears) and listed
//! in `get_dashboard`'s `warnings`, before anything fails (a full audit
//! volume would make the server refuse every state-changing action).
//!
//! A volume is low when the space available to the server is below
//! [`LOW_FREE_BYTES`] (1 GiB) or [`LOW_FREE_PERCENT`] (5 %) of its size,
//! whichever is smaller (so a small card warns at 5 %, a large disk at
//! 1 GiB). The audit volume is also flagged when it cannot hold the audit
//! log's growth up to `audit.max_bytes` (or, with no size limit, when it
//! is low).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::AuditConfig;

/// How often the volumes are checked.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(60);
/// Below this many free bytes a volume is low (unless 5 % is smaller).
pub(crate) const LOW_FREE_BYTES: u64 = 1 << 30;
/// Below this share of its size a volume is low (unless 1 GiB is smaller).
pub(crate) const LOW_FREE_PERCENT: u64 = 5;

/// A volume's size and the bytes an unprivileged process may still use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Space {
    pub available: u64,
    pub total: u64,
    /// The device the volume is on (to report a shared volume once).
    pub device: u64,
}

/// `statvfs` of the volume holding `path` (or its nearest existing parent).
pub(crate) fn space(path: &Path) -> std::io::Result<Space> {
    let mut p = path;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    let st = rustix::fs::statvfs(p)?;
    let meta = std::fs::metadata(p)?;
    let unit = st.f_frsize.max(1);
    Ok(Space {
        available: st.f_bavail.saturating_mul(unit),
        total: st.f_blocks.saturating_mul(unit),
        device: std::os::unix::fs::MetadataExt::dev(&meta),
    })
}

/// The free space below which a volume of `total` bytes is low.
pub(crate) fn low_threshold(total: u64) -> u64 {
    LOW_FREE_BYTES.min(total / (100 / LOW_FREE_PERCENT))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The warnings for measured volumes. `audit_bytes`: what the audit
/// segments hold now; `max_bytes`: `audit.max_bytes` (0: no limit).
pub(crate) fn warnings(
    data: (&Path, Space),
    audit: (&Path, Space),
    audit_bytes: u64,
    max_bytes: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    let shared = data.1.device == audit.1.device;
    let low = |what: &str, path: &Path, s: Space| {
        format!(
            "low disk space: {} free of {} on the volume of the {what} ({}), below the {} warning threshold; \
             free some space: once the audit log cannot be written, state-changing actions are refused",
            human(s.available),
            human(s.total),
            path.display(),
            human(low_threshold(s.total)),
        )
    };
    if data.1.available < low_threshold(data.1.total) {
        let what = if shared {
            "data directory and the audit log"
        } else {
            "data directory"
        };
        out.push(low(what, data.0, data.1));
    }
    if !shared && audit.1.available < low_threshold(audit.1.total) {
        out.push(low("audit log", audit.0, audit.1));
    }
    let room = max_bytes.saturating_sub(audit_bytes);
    if max_bytes > 0 && audit.1.available < room {
        out.push(format!(
            "the audit log may grow by {} more (to audit.max_bytes = {}) but only {} are free on its volume ({}); \
             lower audit.max_bytes or free some space",
            human(room),
            human(max_bytes),
            human(audit.1.available),
            audit.0.display(),
        ));
    }
    out
}

/// The last check's warnings, shared with `get_dashboard`.
#[derive(Debug, Default)]
pub struct DiskWatch {
    current: Mutex<Arc<Vec<String>>>,
}

impl DiskWatch {
    /// The warnings as of the last check (no I/O).
    pub fn warnings(&self) -> Arc<Vec<String>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Measures the volumes of `data_dir` and the audit dir; logs warnings
    /// that are new, and keeps them for the dashboard. Blocking (a few
    /// syscalls and a directory listing).
    pub fn check(&self, data_dir: &Path, audit_dir: &Path, audit: &AuditConfig) {
        let next = match (space(data_dir), space(audit_dir)) {
            (Ok(d), Ok(a)) => {
                let audit_bytes = crate::storage::audit::list_segments(audit_dir)
                    .map(|(segs, _)| segs.iter().map(|s| s.bytes).sum())
                    .unwrap_or(0);
                warnings((data_dir, d), (audit_dir, a), audit_bytes, audit.max_bytes)
            }
            (Err(e), _) | (_, Err(e)) => {
                vec![format!("cannot measure free disk space: {e}")]
            }
        };
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        for w in next.iter().filter(|w| !cur.contains(w)) {
            tracing::warn!("{w}");
        }
        if next.is_empty() && !cur.is_empty() {
            tracing::info!("disk space is sufficient again");
        }
        *cur = Arc::new(next);
    }
}

/// The paths a check needs, resolved from the data dir and config.
pub(crate) fn paths(root: &Path, audit: &AuditConfig) -> (PathBuf, PathBuf) {
    (
        root.to_path_buf(),
        crate::config::Config::resolve(root, &audit.dir),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn sp(available: u64, total: u64, device: u64) -> Space {
        Space {
            available,
            total,
            device,
        }
    }

    #[test]
    fn threshold_is_one_gib_or_five_percent_whichever_is_smaller() {
        assert_eq!(low_threshold(1000 * GIB), GIB);
        assert_eq!(low_threshold(10 * GIB), GIB / 2);
    }

    #[test]
    fn low_volumes_and_an_audit_limit_the_disk_cannot_hold_are_reported() {
        let (d, a) = (Path::new("/data"), Path::new("/data/audit"));
        let none = warnings(
            (d, sp(50 * GIB, 100 * GIB, 1)),
            (a, sp(50 * GIB, 100 * GIB, 1)),
            0,
            2 * GIB,
        );
        assert!(none.is_empty(), "{none:?}");
        // One shared volume, low: one warning naming both.
        let w = warnings(
            (d, sp(GIB / 2, 100 * GIB, 1)),
            (a, sp(GIB / 2, 100 * GIB, 1)),
            0,
            0,
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("data directory and the audit log") && w[0].contains("512.0 MiB"));
        // Separate volumes: the audit one low, and too small for max_bytes.
        let w = warnings(
            (d, sp(50 * GIB, 100 * GIB, 1)),
            (a, sp(GIB / 4, 8 * GIB, 2)),
            GIB / 2,
            2 * GIB,
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("the audit log (/data/audit)"), "{w:?}");
        assert!(w[1].contains("may grow by 1.5 GiB more"), "{w:?}");
        // Enough room for the limit: no warning even if the limit is large.
        let w = warnings(
            (d, sp(50 * GIB, 100 * GIB, 1)),
            (a, sp(50 * GIB, 100 * GIB, 1)),
            GIB,
            40 * GIB,
        );
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn measures_a_real_volume() {
        let d = tempfile::tempdir().unwrap();
        let s = space(&d.path().join("not/yet/made")).unwrap();
        assert!(s.total > 0 && s.available <= s.total);
    }
}
