//! `[[tasks]]` from config.toml, parsed one by one: a bad task is reported
//! and skipped, never fatal (SPEC §7).

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use sha2::{Digest, Sha256};

/// Default seconds a `command`/`plugin` run may take before it is killed.
pub const DEFAULT_COMMAND_TIMEOUT: u64 = 60;
/// Default seconds a webhook call may take.
pub const DEFAULT_WEBHOOK_TIMEOUT: u64 = 30;

#[derive(Debug, Clone, PartialEq)]
pub enum Builtin {
    AuditVerify,
    PruneExecutions,
}

/// `Debug` shows a webhook URL redacted (it is a bearer secret).
#[derive(Clone, PartialEq)]
pub enum Handler {
    Command {
        argv: Vec<String>,
        timeout_secs: u64,
    },
    Webhook {
        url: String,
        method: String,
        timeout_secs: u64,
    },
    Builtin(Builtin),
    Plugin {
        plugin: String,
        timeout_secs: u64,
    },
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handler::Command { argv, timeout_secs } => f
                .debug_struct("Command")
                .field("argv", argv)
                .field("timeout_secs", timeout_secs)
                .finish(),
            Handler::Webhook {
                url,
                method,
                timeout_secs,
            } => f
                .debug_struct("Webhook")
                .field("url", &crate::redact::redact_url(url))
                .field("method", method)
                .field("timeout_secs", timeout_secs)
                .finish(),
            Handler::Builtin(b) => f.debug_tuple("Builtin").field(b).finish(),
            Handler::Plugin {
                plugin,
                timeout_secs,
            } => f
                .debug_struct("Plugin")
                .field("plugin", plugin)
                .field("timeout_secs", timeout_secs)
                .finish(),
        }
    }
}

impl Handler {
    pub fn kind(&self) -> &'static str {
        match self {
            Handler::Command { .. } => "command",
            Handler::Webhook { .. } => "webhook",
            Handler::Builtin(_) => "builtin",
            Handler::Plugin { .. } => "plugin",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TaskDef {
    /// `task_` + the first 8 bytes of SHA-256(name), in hex: stable across
    /// restarts and edits of everything but the name.
    pub id: String,
    pub name: String,
    pub cron_expression: String,
    pub cron: Cron,
    pub handler: Handler,
    /// The file's `enabled` (a toggle overrides it).
    pub enabled: bool,
    pub catch_up: bool,
    /// Secrets the run's child gets in its environment (SPEC §10 Tasks).
    pub secrets: TaskSecrets,
}

/// A task's `secrets = {ENV = "NAME"}`, `secrets_lease_secs`, `secrets_reason`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskSecrets {
    /// (environment variable, secret name), sorted by variable.
    pub env: Vec<(String, String)>,
    pub lease_secs: u64,
    pub reason: Option<String>,
}

impl TaskSecrets {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
    }
}

fn valid_env_name(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn parse_secrets(t: &toml::Table, kind: &str) -> Result<TaskSecrets, String> {
    let mut out = TaskSecrets::default();
    let any = ["secrets", "secrets_lease_secs", "secrets_reason"]
        .iter()
        .any(|k| t.contains_key(*k));
    if any && kind != "command" && kind != "plugin" {
        return Err("`secrets` is only for `command` and `plugin` tasks".into());
    }
    match t.get("secrets") {
        None => {}
        Some(toml::Value::Table(m)) => {
            for (var, v) in m {
                let name = v
                    .as_str()
                    .ok_or("`secrets` maps ENV_VAR = \"SECRET_NAME\" (strings)")?;
                if !valid_env_name(var) {
                    return Err(format!(
                        "`secrets`: {var:?} is not an environment variable name"
                    ));
                }
                if !crate::secrets::valid_name(name) {
                    return Err(format!("`secrets`: {name:?} is not a secret name"));
                }
                out.env.push((var.clone(), name.to_string()));
            }
            out.env.sort();
        }
        Some(_) => return Err("`secrets` must be a table: { ENV_VAR = \"SECRET_NAME\" }".into()),
    }
    match t.get("secrets_lease_secs") {
        None => {}
        Some(toml::Value::Integer(n)) if (0..=86400).contains(n) => out.lease_secs = *n as u64,
        Some(_) => return Err("`secrets_lease_secs` must be an integer in 0..=86400".into()),
    }
    match t.get("secrets_reason") {
        None => {}
        Some(toml::Value::String(r))
            if !r.trim().is_empty()
                && r.chars().count() <= crate::secrets::release::MAX_REASON_CHARS
                && !r.chars().any(char::is_control) =>
        {
            out.reason = Some(r.clone())
        }
        Some(_) => {
            return Err(
                "`secrets_reason` must be 1 to 200 characters without control characters".into(),
            );
        }
    }
    Ok(out)
}

pub fn task_id(name: &str) -> String {
    format!(
        "task_{}",
        hex::encode(&Sha256::digest(name.as_bytes())[..8])
    )
}

/// Parses a cron expression: 5 fields, or 6 with seconds first.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if fields != 5 && fields != 6 {
        return Err(format!(
            "cron {expr:?} has {fields} fields; use 5 (min hour dom month dow) or 6 (seconds first)"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| format!("cron {expr:?}: {e}"))
}

/// The first slot strictly after `after`, in `tz`, as UTC.
pub fn next_after<Tz: TimeZone>(
    cron: &Cron,
    tz: &Tz,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let local = after.with_timezone(tz);
    cron.find_next_occurrence(&local, false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn string(t: &toml::Table, key: &str) -> Result<Option<String>, String> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("`{key}` must be a string")),
    }
}

fn timeout(t: &toml::Table, default: u64) -> Result<u64, String> {
    match t.get("timeout_secs") {
        None => Ok(default),
        Some(toml::Value::Integer(n)) if (1..=86400).contains(n) => Ok(*n as u64),
        Some(_) => Err("`timeout_secs` must be an integer in 1..=86400".into()),
    }
}

/// Parses one `[[tasks]]` table.
pub fn parse_task(t: &toml::Table) -> Result<TaskDef, String> {
    let name = string(t, "name")?
        .filter(|n| !n.trim().is_empty())
        .ok_or("missing `name`")?;
    let known: &[&str] = &[
        "name",
        "cron",
        "handler",
        "enabled",
        "catch_up",
        "command",
        "timeout_secs",
        "url",
        "method",
        "builtin",
        "plugin",
        "secrets",
        "secrets_lease_secs",
        "secrets_reason",
    ];
    if let Some(k) = t.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown key `{k}`"));
    }
    let cron_expression = string(t, "cron")?.ok_or("missing `cron`")?;
    let cron = parse_cron(&cron_expression)?;
    let flag = |key: &str, default: bool| match t.get(key) {
        None => Ok(default),
        Some(toml::Value::Boolean(b)) => Ok(*b),
        Some(_) => Err(format!("`{key}` must be true or false")),
    };
    let enabled = flag("enabled", true)?;
    let catch_up = flag("catch_up", false)?;
    let handler =
        match string(t, "handler")?.as_deref() {
            Some("command") => {
                let argv = match t.get("command") {
                    Some(toml::Value::Array(a)) if !a.is_empty() => a
                        .iter()
                        .map(|v| {
                            v.as_str()
                                .map(String::from)
                                .ok_or("`command` must be an array of strings")
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    Some(_) => return Err(
                        "`command` must be a non-empty array of strings (program, then arguments)"
                            .into(),
                    ),
                    None => {
                        return Err(
                            "a `command` task needs `command = [\"program\", \"arg\", ...]`".into(),
                        );
                    }
                };
                Handler::Command {
                    argv,
                    timeout_secs: timeout(t, DEFAULT_COMMAND_TIMEOUT)?,
                }
            }
            Some("webhook") => {
                let url = string(t, "url")?.ok_or("a `webhook` task needs `url`")?;
                // The URL is a bearer secret: errors never quote it.
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err("`url` must start with http:// or https://".into());
                }
                if crate::redact::redact_url(&url) == "[unparseable url]" {
                    return Err("`url` is not a valid URL".into());
                }
                let method = string(t, "method")?
                    .unwrap_or_else(|| "POST".into())
                    .to_ascii_uppercase();
                if method != "POST" && method != "GET" {
                    return Err(format!("`method` must be POST or GET, got {method:?}"));
                }
                Handler::Webhook {
                    url,
                    method,
                    timeout_secs: timeout(t, DEFAULT_WEBHOOK_TIMEOUT)?,
                }
            }
            Some("builtin") => match string(t, "builtin")?.as_deref() {
                Some("audit-verify") => Handler::Builtin(Builtin::AuditVerify),
                Some("prune-executions") => Handler::Builtin(Builtin::PruneExecutions),
                Some(other) => {
                    return Err(format!(
                        "unknown builtin {other:?} (audit-verify, prune-executions)"
                    ));
                }
                None => return Err(
                    "a `builtin` task needs `builtin = \"audit-verify\"` or `\"prune-executions\"`"
                        .into(),
                ),
            },
            Some("plugin") => {
                let plugin =
                    string(t, "plugin")?.ok_or("a `plugin` task needs `plugin = \"NAME\"`")?;
                Handler::Plugin {
                    plugin,
                    timeout_secs: timeout(t, DEFAULT_COMMAND_TIMEOUT)?,
                }
            }
            Some(other) => {
                return Err(format!(
                    "unknown handler {other:?} (command, webhook, builtin, plugin)"
                ));
            }
            None => return Err("missing `handler`".into()),
        };
    let secrets = parse_secrets(t, handler.kind())?;
    Ok(TaskDef {
        secrets,
        id: task_id(&name),
        name,
        cron_expression,
        cron,
        handler,
        enabled,
        catch_up,
    })
}

/// Parses every task; returns the good ones and (which, error) for the rest.
/// A duplicate name: the first wins.
pub fn parse_all(tables: &[toml::Table]) -> (Vec<TaskDef>, Vec<(String, String)>) {
    let (mut ok, mut bad): (Vec<TaskDef>, Vec<(String, String)>) = (Vec::new(), Vec::new());
    for (i, t) in tables.iter().enumerate() {
        let which = t
            .get("name")
            .and_then(|v| v.as_str())
            .map(|n| format!("task {n:?}"))
            .unwrap_or_else(|| format!("[[tasks]] #{}", i + 1));
        match parse_task(t) {
            Ok(task) if ok.iter().any(|o| o.name == task.name) => {
                bad.push((which, "duplicate task name: the first one is used".into()))
            }
            Ok(task) => ok.push(task),
            Err(e) => bad.push((which, e)),
        }
    }
    (ok, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn next_run_for_several_expressions() {
        let now = at("2026-03-10T10:15:30Z");
        let cases = [
            ("*/5 * * * *", "2026-03-10T10:20:00Z"),
            ("0 3 * * *", "2026-03-11T03:00:00Z"),
            ("*/10 * * * * *", "2026-03-10T10:15:40Z"),
            ("0 9 * * 1", "2026-03-16T09:00:00Z"),
            ("30 2 1 * *", "2026-04-01T02:30:00Z"),
        ];
        for (expr, want) in cases {
            let c = parse_cron(expr).unwrap();
            assert_eq!(
                next_after(&c, &chrono_tz::UTC, now).unwrap(),
                at(want),
                "{expr}"
            );
        }
    }

    #[test]
    fn next_run_across_dst_in_berlin() {
        let berlin = chrono_tz::Europe::Berlin;
        let c = parse_cron("0 9 * * *").unwrap();
        // Spring forward on 2026-03-29: 09:00 local is 08:00 UTC before, 07:00 UTC after.
        assert_eq!(
            next_after(&c, &berlin, at("2026-03-28T12:00:00Z")).unwrap(),
            at("2026-03-29T07:00:00Z")
        );
        assert_eq!(
            next_after(&c, &berlin, at("2026-03-27T12:00:00Z")).unwrap(),
            at("2026-03-28T08:00:00Z")
        );
        // Fall back on 2026-10-25: 09:00 local is 07:00 UTC before, 08:00 UTC after.
        assert_eq!(
            next_after(&c, &berlin, at("2026-10-24T12:00:00Z")).unwrap(),
            at("2026-10-25T08:00:00Z")
        );
        // 02:30 does not exist on 2026-03-29 in Berlin: it never lands inside the gap.
        let gap = parse_cron("30 2 * * *").unwrap();
        let t = next_after(&gap, &berlin, at("2026-03-28T12:00:00Z")).unwrap();
        let local = t.with_timezone(&berlin);
        assert!(
            local.format("%H:%M").to_string() != "02:30"
                || local.date_naive() != chrono::NaiveDate::from_ymd_opt(2026, 3, 29).unwrap(),
            "{local}"
        );
        assert!(t > at("2026-03-29T00:00:00Z"));
        let _ = berlin.with_ymd_and_hms(2026, 1, 1, 0, 0, 0);
    }

    #[test]
    fn bad_tasks_are_reported_with_reasons() {
        let doc: toml::Table = toml::from_str(
            r#"
            [[tasks]]
            name = "ok"
            cron = "* * * * *"
            handler = "builtin"
            builtin = "prune-executions"
            [[tasks]]
            name = "bad-cron"
            cron = "61 * * * *"
            handler = "builtin"
            builtin = "prune-executions"
            [[tasks]]
            name = "no-handler"
            cron = "* * * * *"
            [[tasks]]
            name = "weird"
            cron = "* * * * *"
            handler = "telepathy"
            [[tasks]]
            name = "cmd"
            cron = "* * * * *"
            handler = "command"
            [[tasks]]
            name = "ok"
            cron = "* * * * *"
            handler = "builtin"
            builtin = "audit-verify"
            [[tasks]]
            cron = "* * * * *"
            "#,
        )
        .unwrap();
        let tables: Vec<toml::Table> = doc["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_table().unwrap().clone())
            .collect();
        let (ok, bad) = parse_all(&tables);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].id, task_id("ok"));
        let reasons: Vec<String> = bad.iter().map(|b| format!("{}: {}", b.0, b.1)).collect();
        assert_eq!(bad.len(), 6, "{reasons:?}");
        assert!(reasons[0].contains("bad-cron"));
        assert!(reasons[1].contains("missing `handler`"));
        assert!(reasons[2].contains("telepathy"));
        assert!(reasons[3].contains("needs `command"));
        assert!(reasons[4].contains("duplicate"));
        assert!(reasons[5].contains("#7") && reasons[5].contains("name"));
    }
}
