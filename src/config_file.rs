//! Editing `config.toml` in place: merge a section update with `toml_edit`
//! (keeping the owner's comments and layout) and replace the file atomically
//! (temp file in the same folder, fsync, rename, fsync of the folder).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};
use toml_edit::DocumentMut;

static FAIL_NEXT_RENAME: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Makes the next atomic replace of `path` fail at the rename step, as a
/// crash there would. For crash-safety tests only.
#[doc(hidden)]
pub fn fail_next_rename_for_tests(path: &Path) {
    FAIL_NEXT_RENAME
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.to_path_buf());
}

fn take_injected_failure(path: &Path) -> bool {
    let mut g = FAIL_NEXT_RENAME.lock().unwrap_or_else(|p| p.into_inner());
    let before = g.len();
    g.retain(|p| p != path);
    g.len() != before
}

/// Writes `text` to `path` atomically: readers see the old file or the new
/// one, never a mix; a failure leaves the old file untouched.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".config.toml.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    // The temp file is 0600 (tempfile's default, whatever the umask), and
    // so is the config after the rename: it may hold secrets (SPEC §3).
    tmp.as_file().sync_all()?;
    if take_injected_failure(path) {
        // Dropping `tmp` removes the temp file, as after a failed rename.
        return Err(std::io::Error::other("simulated failure at rename"));
    }
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes temp files a crash left between write and rename (only ours:
/// `.config.toml.*.tmp`). The config itself is always the old or the new file.
pub fn remove_stale_temp_files(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".config.toml.") && name.ends_with(".tmp") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %name, "removed a temp file left by an interrupted config write")
                }
                Err(err) => {
                    tracing::warn!(file = %name, error = %err, "cannot remove a stale temp file")
                }
            }
        }
    }
}

fn to_toml(v: &Value) -> Option<toml_edit::Value> {
    Some(match v {
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64()?.into(),
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => {
            let mut arr = toml_edit::Array::new();
            for x in a {
                arr.push(to_toml(x)?);
            }
            toml_edit::Value::Array(arr)
        }
        Value::Null | Value::Object(_) => return None,
    })
}

/// Merges `value` into `[section]` of the document text; `null` removes a
/// key. Existing keys keep their comments.
pub fn merge_section(
    text: &str,
    section: &str,
    value: &Map<String, Value>,
) -> Result<String, String> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| format!("config.toml does not parse: {e}"))?;
    let item = doc.entry(section).or_insert(toml_edit::table());
    let table = item
        .as_table_mut()
        .ok_or_else(|| format!("[{section}] in config.toml is not a table"))?;
    for (k, v) in value {
        if v.is_null() {
            table.remove(k);
            continue;
        }
        let new = to_toml(v)
            .ok_or_else(|| format!("`{k}` has a value that cannot be written to TOML"))?;
        match table.get_mut(k).and_then(|i| i.as_value_mut()) {
            Some(old) => {
                let decor = old.decor().clone();
                *old = new;
                *old.decor_mut() = decor;
            }
            None => {
                table.insert(k, toml_edit::Item::Value(new));
            }
        }
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_keeps_comments_and_layout() {
        let text = "# top\n[llm]\n# the model\nmodel = \"a\" # trailing\nprovider = \"x\"\n\n[other]\nk = 1\n";
        let out = merge_section(
            text,
            "llm",
            json!({"model": "b", "api_key": "s"}).as_object().unwrap(),
        )
        .unwrap();
        assert!(
            out.contains("# top\n[llm]\n# the model\nmodel = \"b\" # trailing\n"),
            "{out}"
        );
        assert!(out.contains("api_key = \"s\""));
        assert!(out.contains("[other]\nk = 1"));
        let out =
            merge_section(&out, "llm", json!({"api_key": null}).as_object().unwrap()).unwrap();
        assert!(!out.contains("api_key"));
    }

    #[test]
    fn a_failed_rename_leaves_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(&p, "old").unwrap();
        fail_next_rename_for_tests(&p);
        assert!(write_atomically(&p, "new").is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "old");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp file left behind"
        );
        write_atomically(&p, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
    }
}
