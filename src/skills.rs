//! Skills: `DATA_DIR/skills/*/SKILL.md` with YAML front matter (SPEC §3).
//! The folder name is the skill's `id`. Bad front matter is reported and
//! skipped, never fatal. Skills are rescanned when listed, so an edited
//! SKILL.md shows without a restart.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde_json::{Value, json};
use yaml_rust2::{Yaml, YamlLoader};

use crate::plugins::Failure;
use crate::storage::toggles::Toggles;

/// A skill that was never toggled is enabled.
const ENABLED_BY_DEFAULT: bool = true;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Skill {
    pub id: String,
    pub name: String,
    pub description: String,
    /// As written (`1.0` is `"1.0"`), or None.
    pub version: Option<String>,
    pub triggers: Vec<String>,
}

/// Splits `---\nYAML\n---\nMarkdown` and parses the YAML.
pub(crate) fn parse_skill(id: &str, text: &str) -> Result<Skill, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rest = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
        .ok_or("SKILL.md must start with YAML front matter between `---` lines")?;
    let end = rest
        .find("\n---")
        .ok_or("the front matter is not closed by a `---` line")?;
    let yaml = &rest[..end];
    let docs = YamlLoader::load_from_str(yaml)
        .map_err(|e| format!("front matter is not valid YAML: {e}"))?;
    let doc = docs.into_iter().next().ok_or("the front matter is empty")?;
    if doc.as_hash().is_none() {
        return Err("the front matter must be a YAML mapping".into());
    }
    let scalar = |key: &str| -> Result<Option<String>, String> {
        match &doc[key] {
            Yaml::BadValue | Yaml::Null => Ok(None),
            Yaml::String(s) => Ok(Some(s.clone())),
            Yaml::Real(r) => Ok(Some(r.clone())),
            Yaml::Integer(i) => Ok(Some(i.to_string())),
            _ => Err(format!("`{key}` must be a string")),
        }
    };
    let name = scalar("name")?
        .filter(|s| !s.trim().is_empty())
        .ok_or("missing `name`")?;
    let description = scalar("description")?.ok_or("missing `description`")?;
    let version = scalar("version")?;
    let triggers = match &doc["triggers"] {
        Yaml::BadValue | Yaml::Null => Vec::new(),
        Yaml::Array(a) => a
            .iter()
            .map(|t| match t {
                Yaml::String(s) => Ok(s.clone()),
                _ => Err("`triggers` must be an array of strings".to_string()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err("`triggers` must be an array of strings".into()),
    };
    Ok(Skill {
        id: id.to_string(),
        name,
        description,
        version,
        triggers,
    })
}

#[derive(Debug)]
pub struct Skills {
    data_dir: PathBuf,
    loaded: RwLock<(Vec<Skill>, Vec<Failure>)>,
    toggles: Toggles,
}

fn scan(data_dir: &Path) -> (Vec<Skill>, Vec<Failure>) {
    let root = data_dir.join("skills");
    let dirs = crate::plugins::subfolders(&root);
    let (mut skills, mut failed) = (Vec::new(), Vec::new());
    for dir in dirs {
        let file = dir.join("SKILL.md");
        let rel = file
            .strip_prefix(data_dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        let id = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        match std::fs::read_to_string(&file) {
            Ok(text) => match parse_skill(&id, &text) {
                Ok(s) => skills.push(s),
                Err(error) => failed.push(Failure { path: rel, error }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => failed.push(Failure {
                path: rel,
                error: format!("cannot read: {e}"),
            }),
        }
    }
    (skills, failed)
}

impl Skills {
    /// Scans the skills folder. `toggles` are the persisted overrides
    /// (kind `skill`).
    pub fn load(data_dir: &Path, toggles: Toggles) -> Skills {
        let loaded = scan(data_dir);
        for f in &loaded.1 {
            tracing::warn!(path = %f.path, error = %f.error, "skill skipped");
        }
        Skills {
            data_dir: data_dir.to_path_buf(),
            loaded: RwLock::new(loaded),
            toggles,
        }
    }

    /// Rescans the folder (blocking file I/O); returns the failures.
    pub fn rescan(&self) -> Vec<Failure> {
        let loaded = scan(&self.data_dir);
        let failed = loaded.1.clone();
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        failed
    }

    pub fn count(&self) -> usize {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .len()
    }

    pub fn exists(&self, id: &str) -> bool {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .iter()
            .any(|s| s.id == id)
    }

    pub fn is_enabled(&self, id: &str) -> bool {
        self.toggles.is_enabled(id, ENABLED_BY_DEFAULT)
    }

    /// The persisted toggles (`toggle_skill` sets them).
    pub fn toggles(&self) -> &Toggles {
        &self.toggles
    }

    pub fn list_json(&self) -> (Vec<Value>, Vec<Value>) {
        let g = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        let skills = g
            .0
            .iter()
            .map(|s| {
                json!({"id": s.id, "name": s.name, "description": s.description, "version": s.version,
                       "triggers": s.triggers, "enabled": self.is_enabled(&s.id)})
            })
            .collect();
        (skills, g.1.iter().map(Failure::to_json).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_fields() {
        let s = parse_skill("web", "---\nname: Web search\ndescription: Looks things up\nversion: 1.0\ntriggers: [search, look up]\n---\n# Body\n").unwrap();
        assert_eq!(s.version.as_deref(), Some("1.0"));
        assert_eq!(s.triggers, vec!["search", "look up"]);
        assert!(parse_skill("x", "# no front matter").is_err());
        assert!(parse_skill("x", "---\nname: [unclosed\n---\n").is_err());
        assert!(
            parse_skill("x", "---\ndescription: d\n---\n")
                .unwrap_err()
                .contains("name")
        );
    }
}
