//! Plugins: discovery of `DATA_DIR/plugins/*/plugin.toml` (SPEC §3), the
//! loaded registry, and its persisted toggles.
//!
//! A broken manifest never stops the server: it is skipped, logged, and
//! reported by `reload_plugins`. When two manifests share a name, the first
//! folder in name order wins and the others are reported as failed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde_json::{Value, json};
use toml_edit::{DocumentMut, Item};

use crate::storage::toggles::Toggles;

/// A plugin that was never toggled is enabled.
const ENABLED_BY_DEFAULT: bool = true;

/// One loaded plugin manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Plugin {
    pub name: String,
    /// As written: `version = 1.0` is `"1.0"`.
    pub version: String,
    pub plugin_type: String,
    pub capabilities: Vec<String>,
    pub description: Option<String>,
    /// How to run it (for `plugin_type = "task_handler"`).
    pub command: Option<Vec<String>>,
    /// The plugin's folder.
    pub dir: PathBuf,
}

/// A manifest that could not be loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Relative to the data dir, e.g. `plugins/broken/plugin.toml`.
    pub path: String,
    pub error: String,
}

impl Failure {
    pub fn to_json(&self) -> Value {
        json!({"path": self.path, "error": self.error})
    }
}

#[derive(Debug, Default)]
struct Loaded {
    plugins: Vec<Plugin>,
    failed: Vec<Failure>,
}

/// The plugin registry: what was loaded, and which are toggled.
#[derive(Debug)]
pub struct Plugins {
    data_dir: PathBuf,
    loaded: RwLock<Arc<Loaded>>,
    toggles: Toggles,
}

/// What the scheduler runs for a `plugin` task.
#[derive(Debug, Clone)]
pub struct PluginCommand {
    pub argv: Vec<String>,
    pub dir: PathBuf,
}

fn str_item(item: Option<&Item>, key: &str, required: bool) -> Result<Option<String>, String> {
    match item {
        None => {
            if required {
                Err(format!("missing `{key}`"))
            } else {
                Ok(None)
            }
        }
        Some(i) => match i.as_value() {
            Some(toml_edit::Value::String(s)) => Ok(Some(s.value().clone())),
            _ => Err(format!("`{key}` must be a string")),
        },
    }
}

fn str_array(item: Option<&Item>, key: &str) -> Result<Option<Vec<String>>, String> {
    let Some(i) = item else { return Ok(None) };
    let arr = i
        .as_array()
        .ok_or_else(|| format!("`{key}` must be an array of strings"))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(String::from)
                .ok_or_else(|| format!("`{key}` must be an array of strings"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Parses a manifest's text. `dir` is the plugin's folder.
pub(crate) fn parse_manifest(text: &str, dir: &Path) -> Result<Plugin, String> {
    let doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| e.to_string().trim().to_string())?;
    let name = str_item(doc.get("name"), "name", true)?.unwrap_or_default();
    if name.trim().is_empty() {
        return Err("`name` must not be empty".into());
    }
    let version = match doc.get("version").and_then(Item::as_value) {
        Some(toml_edit::Value::String(s)) => s.value().clone(),
        // Written as a number (`version = 1.0`): keep it as written.
        Some(v @ (toml_edit::Value::Float(_) | toml_edit::Value::Integer(_))) => {
            v.to_string().trim().to_string()
        }
        Some(_) => return Err("`version` must be a string".into()),
        None => return Err("missing `version`".into()),
    };
    let plugin_type = str_item(doc.get("plugin_type"), "plugin_type", true)?.unwrap_or_default();
    let capabilities =
        str_array(doc.get("capabilities"), "capabilities")?.ok_or("missing `capabilities`")?;
    let description = str_item(doc.get("description"), "description", false)?;
    let command = str_array(doc.get("command"), "command")?;
    if command.as_ref().is_some_and(|c| c.is_empty()) {
        return Err("`command` must not be empty".into());
    }
    if plugin_type == "task_handler" && command.is_none() {
        return Err(
            "a `task_handler` plugin needs `command` (an array: program and arguments)".into(),
        );
    }
    Ok(Plugin {
        name,
        version,
        plugin_type,
        capabilities,
        description,
        command,
        dir: dir.to_path_buf(),
    })
}

/// The folders directly under `root`, in name order (none if it is missing).
pub(crate) fn subfolders(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect(),
        Err(_) => Vec::new(),
    };
    dirs.sort();
    dirs
}

fn scan(data_dir: &Path) -> Loaded {
    let root = data_dir.join("plugins");
    let dirs = subfolders(&root);
    let mut out = Loaded::default();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for dir in dirs {
        let manifest = dir.join("plugin.toml");
        let rel = manifest
            .strip_prefix(data_dir)
            .unwrap_or(&manifest)
            .display()
            .to_string();
        let text = match std::fs::read_to_string(&manifest) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.failed.push(Failure {
                    path: rel,
                    error: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        match parse_manifest(&text, &dir) {
            Ok(p) => {
                if let Some(first) = seen.get(&p.name) {
                    let first = first
                        .strip_prefix(data_dir)
                        .unwrap_or(first)
                        .display()
                        .to_string();
                    let error = format!(
                        "duplicate plugin name {:?}: already loaded from {first}",
                        p.name
                    );
                    out.failed.push(Failure { path: rel, error });
                } else {
                    seen.insert(p.name.clone(), dir.clone());
                    out.plugins.push(p);
                }
            }
            Err(error) => out.failed.push(Failure { path: rel, error }),
        }
    }
    for f in &out.failed {
        tracing::warn!(path = %f.path, error = %f.error, "plugin skipped");
    }
    out.plugins.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

impl Plugins {
    /// Scans the plugins folder. `toggles` are the persisted overrides
    /// (kind `plugin`).
    pub fn load(data_dir: &Path, toggles: Toggles) -> Plugins {
        let loaded = scan(data_dir);
        tracing::info!(
            loaded = loaded.plugins.len(),
            failed = loaded.failed.len(),
            "plugins loaded"
        );
        Plugins {
            data_dir: data_dir.to_path_buf(),
            loaded: RwLock::new(Arc::new(loaded)),
            toggles,
        }
    }

    fn snapshot(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rescans; returns (loaded count, failures). Blocking file I/O.
    pub fn reload(&self) -> (usize, Vec<Failure>) {
        let loaded = scan(&self.data_dir);
        let out = (loaded.plugins.len(), loaded.failed.clone());
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        out
    }

    pub fn count(&self) -> usize {
        self.snapshot().plugins.len()
    }

    pub fn is_enabled(&self, name: &str) -> bool {
        self.toggles.is_enabled(name, ENABLED_BY_DEFAULT)
    }

    /// The persisted toggles (`toggle_plugin` sets them).
    pub fn toggles(&self) -> &Toggles {
        &self.toggles
    }

    pub fn get(&self, name: &str) -> Option<Plugin> {
        self.snapshot()
            .plugins
            .iter()
            .find(|p| p.name == name)
            .cloned()
    }

    /// `list_plugins` entries, by name.
    pub fn list_json(&self) -> Vec<Value> {
        self.snapshot()
            .plugins
            .iter()
            .map(|p| {
                json!({"name": p.name, "version": p.version, "plugin_type": p.plugin_type,
                       "capabilities": p.capabilities, "enabled": self.is_enabled(&p.name)})
            })
            .collect()
    }

    /// The command of an enabled `task_handler` plugin, for the scheduler.
    pub fn task_command(&self, name: &str) -> Result<PluginCommand, String> {
        let p = self
            .get(name)
            .ok_or_else(|| format!("no plugin named {name:?} is loaded"))?;
        if !self.is_enabled(name) {
            return Err(format!("plugin {name:?} is disabled"));
        }
        if p.plugin_type != "task_handler" {
            return Err(format!(
                "plugin {name:?} is a {:?} plugin, not a task_handler",
                p.plugin_type
            ));
        }
        let argv = p
            .command
            .clone()
            .ok_or_else(|| format!("plugin {name:?} has no command"))?;
        Ok(PluginCommand { argv, dir: p.dir })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_fields_and_version_as_written() {
        let p = parse_manifest(
            "name = \"hello-plugin\"\nversion = 1.0\nplugin_type = \"tool\"\ncapabilities = [\"greet\"]\n",
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(p.version, "1.0");
        assert_eq!(p.capabilities, vec!["greet"]);
        assert!(parse_manifest("name = \"x\"\nversion = \"1\"\nplugin_type = \"task_handler\"\ncapabilities = []\n", Path::new("/x"))
            .unwrap_err()
            .contains("command"));
        assert!(parse_manifest("name = [", Path::new("/x")).is_err());
        assert!(
            parse_manifest(
                "name = \"x\"\nplugin_type = \"t\"\ncapabilities = []\n",
                Path::new("/x")
            )
            .unwrap_err()
            .contains("version")
        );
    }
}
