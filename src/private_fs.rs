//! The data dir is private to its owner (SPEC §3): the directory is 0700 and
//! every file the server or the CLI creates or rewrites in it is 0600,
//! whatever the umask the process was started with.
//!
//! Two mechanisms, so that no single forgotten `open` leaks: the process
//! umask is set to 077 before anything is created (SQLite's `-wal`/`-shm`,
//! audit segments, temp files, the socket all inherit it), and at start the
//! files we know of are tightened if an older version or the owner left them
//! wider.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Makes every file this process creates from now on private (umask 077).
pub(crate) fn set_private_umask() {
    // SAFETY: umask only changes the process's file-creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` (and its parents) with mode 0700; an existing `dir` with
/// wider permissions is tightened, with a log line.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    tighten(dir, 0o700)
}

/// Sets `path`'s mode to `mode` if it has group or world bits; absent files
/// are fine. Returns whether anything changed.
pub(crate) fn tighten(path: &Path, mode: u32) -> std::io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let old = meta.permissions().mode() & 0o7777;
    if old & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        tracing::warn!(
            path = %path.display(),
            old = format!("{old:o}"),
            new = format!("{mode:o}"),
            "tightened permissions: the data dir is private to its owner"
        );
    }
    Ok(())
}

/// Tightens the files a data dir holds (and the audit dir's), for a data dir
/// made by an older version or loosened by hand.
pub(crate) fn tighten_known_files(root: &Path, audit_dir: &Path) {
    let files = [
        "config.toml",
        "agent.db",
        "agent.db-wal",
        "agent.db-shm",
        "agent.db-journal",
        "server.key",
        "vault.key",
    ];
    for f in files {
        if let Err(e) = tighten(&root.join(f), 0o600) {
            tracing::warn!(file = f, error = %e, "cannot tighten permissions");
        }
    }
    for d in ["plugins", "skills"] {
        let _ = tighten(&root.join(d), 0o700);
    }
    if audit_dir.is_dir() {
        let _ = tighten(audit_dir, 0o700);
        if let Ok(entries) = fs::read_dir(audit_dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = tighten(&e.path(), 0o600);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wide_dir_and_file_are_tightened() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("data");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("config.toml"), "").unwrap();
        fs::set_permissions(root.join("config.toml"), fs::Permissions::from_mode(0o644)).unwrap();
        create_private_dir(&root).unwrap();
        tighten_known_files(&root, &root.join("audit"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("config.toml")), 0o600);
    }
}
