//! `config.toml`: the typed configuration, its commented default text, and
//! the sanitized view `get_config` shows (SPEC §7).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration secret. Its `Debug` and `Display` never show the value.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The value, for the one place that must use it (the LLM client).
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Config {
    pub server: ServerConfig,
    pub llm: LlmConfig,
    pub scheduler: SchedulerConfig,
    pub audit: AuditConfig,
    pub memory: MemoryConfig,
    pub approvals: ApprovalsConfig,
    pub secrets: SecretsConfig,
    pub notify: NotifyConfig,
    /// `[[tasks]]`, kept raw: each is parsed by the scheduler on its own, so
    /// one bad task never stops the server.
    pub tasks: Vec<toml::Table>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub allow_insecure: bool,
    pub max_frame_bytes: usize,
    pub max_in_flight: usize,
    pub auth_timeout_secs: u64,
    pub auth_failures_per_minute: u32,
    pub pair_failures_per_minute: u32,
    /// The web companion's origin (SPEC §11), e.g. `https://agent.example.net:7420`;
    /// default `http(s)://localhost:PORT` when listening on loopback.
    pub web_origin: Option<String>,
    /// Further browser origins that may open `/ws` (SPEC §4).
    pub allowed_origins: Vec<String>,
    /// Admin requests per second a device may sustain, all its sessions
    /// together (SPEC §7 v1.1; see `budget.rs`).
    pub device_requests_per_sec: u32,
    /// Requests a device may send at once beyond that rate; 0 turns the
    /// budget off.
    pub device_request_burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    pub provider: String,
    pub model: String,
    pub api_key: Option<Secret>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    pub enabled: bool,
    pub check_interval_secs: u64,
    pub timezone: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub dir: PathBuf,
    /// A segment is closed once it holds this many bytes (SPEC §8a v1.1).
    pub segment_bytes: u64,
    /// Oldest segments are pruned while all hold more than this (0: no limit).
    pub max_bytes: u64,
    /// Segments whose newest record is older than this are pruned (0: never).
    pub keep_days: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    pub model_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    pub timeout_secs: u64,
}

/// `[secrets]` (SPEC §10).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// The longest lease a release may ask for (0..=86400; default 3600).
    pub max_lease_secs: u64,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        SecretsConfig {
            max_lease_secs: 3600,
        }
    }
}

/// `[notify]` (SPEC §10 Waking the phone).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// An http(s) URL (ntfy / UnifiedPush), or "" for none. A secret.
    pub url: Secret,
    pub include_summary: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7420".into(),
            tls_cert: None,
            tls_key: None,
            allow_insecure: false,
            max_frame_bytes: 1 << 20,
            max_in_flight: 64,
            auth_timeout_secs: 10,
            auth_failures_per_minute: 20,
            pair_failures_per_minute: 100,
            web_origin: None,
            allowed_origins: Vec::new(),
            device_requests_per_sec: 200,
            device_request_burst: 2000,
        }
    }
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            provider: "anthropic".into(),
            model: "claude-sonnet-4-5".into(),
            api_key: None,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            enabled: true,
            check_interval_secs: 30,
            timezone: "UTC".into(),
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: "audit".into(),
            segment_bytes: 64 << 20,
            max_bytes: 2 << 30,
            keep_days: 365,
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            model_dir: "models/all-MiniLM-L6-v2".into(),
        }
    }
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig { timeout_secs: 120 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid configuration: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Parses and validates configuration text.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })?;
        Ok(cfg)
    }

    /// Reads `path`; a missing file means the embedded defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Range checks (SPEC §7). Returns a message naming the bad key.
    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(format!("{name} must be in {lo}..={hi}, got {v}"))
            } else {
                Ok(())
            }
        };
        range(
            "scheduler.check_interval_secs",
            self.scheduler.check_interval_secs,
            1,
            86400,
        )?;
        range(
            "approvals.timeout_secs",
            self.approvals.timeout_secs,
            1,
            86400,
        )?;
        range(
            "server.auth_timeout_secs",
            self.server.auth_timeout_secs,
            1,
            3600,
        )?;
        range(
            "server.max_in_flight",
            self.server.max_in_flight as u64,
            1,
            65536,
        )?;
        for (i, o) in self
            .server
            .web_origin
            .iter()
            .chain(self.server.allowed_origins.iter())
            .enumerate()
        {
            if !is_origin(o) {
                let name = if i == 0 && self.server.web_origin.is_some() {
                    "server.web_origin".to_string()
                } else {
                    "server.allowed_origins".to_string()
                };
                return Err(format!(
                    "{name}: {o:?} is not an origin (scheme://host[:port], http or https, no path)"
                ));
            }
        }
        range(
            "server.max_frame_bytes",
            self.server.max_frame_bytes as u64,
            1024,
            64 << 20,
        )?;
        if self.scheduler.timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(format!(
                "scheduler.timezone {:?} is not an IANA time zone name",
                self.scheduler.timezone
            ));
        }
        range(
            "secrets.max_lease_secs",
            self.secrets.max_lease_secs,
            0,
            86400,
        )?;
        let url = self.notify.url.expose();
        if !url.is_empty()
            && (!(url.starts_with("http://") || url.starts_with("https://"))
                || url.parse::<ureq::http::Uri>().is_err()
                || url.chars().any(|c| c.is_control() || c == ' '))
        {
            // The URL is a secret: the message never quotes it.
            return Err("notify.url must be an http(s) URL, or \"\" for none".into());
        }
        if self.audit.dir.as_os_str().is_empty() {
            return Err("audit.dir must not be empty".into());
        }
        range(
            "audit.segment_bytes",
            self.audit.segment_bytes,
            MIN_SEGMENT_BYTES,
            1 << 40,
        )?;
        if self.audit.max_bytes != 0 && self.audit.max_bytes < 2 * self.audit.segment_bytes {
            return Err(format!(
                "audit.max_bytes must be 0 (no limit) or at least 2 × audit.segment_bytes ({}), got {}",
                2 * self.audit.segment_bytes,
                self.audit.max_bytes
            ));
        }
        range("audit.keep_days", self.audit.keep_days, 0, 36_500)?;
        if self.server.device_request_burst > 0 {
            range(
                "server.device_requests_per_sec",
                self.server.device_requests_per_sec as u64,
                1,
                1_000_000,
            )?;
        }
        range(
            "server.device_request_burst",
            self.server.device_request_burst as u64,
            0,
            10_000_000,
        )?;
        if self.memory.model_dir.as_os_str().is_empty() {
            return Err("memory.model_dir must not be empty".into());
        }
        if self.llm.provider.trim().is_empty() {
            return Err("llm.provider must not be empty".into());
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err("server.tls_cert and server.tls_key must be set together".into());
        }
        Ok(())
    }

    /// A path from the config, relative to the data dir unless absolute.
    pub fn resolve(data_dir: &Path, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            data_dir.join(p)
        }
    }

    /// The sanitized view of SPEC §6 `get_config`: never a secret.
    pub fn public_view(&self) -> serde_json::Value {
        serde_json::json!({
            "llm_provider": self.llm.provider,
            "llm_model": self.llm.model,
            "scheduler_enabled": self.scheduler.enabled,
            "scheduler_check_interval_secs": self.scheduler.check_interval_secs,
            "audit_dir": self.audit.dir.display().to_string(),
        })
    }
}

/// The smallest `audit.segment_bytes` accepted (a few records).
pub const MIN_SEGMENT_BYTES: u64 = 1024;

/// The commented `config.toml` written on first start.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default_config.toml");

/// Whether `o` is a serialised web origin: `http(s)://host[:port]`, lower
/// case, without path, query or trailing slash (how browsers send `Origin`).
fn is_origin(o: &str) -> bool {
    let Some(rest) = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
    else {
        return false;
    };
    !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
        && rest == rest.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_text_parses_to_defaults_plus_default_tasks() {
        let c = Config::parse(DEFAULT_CONFIG_TOML, Path::new("config.toml")).unwrap();
        assert_eq!(c.server, ServerConfig::default());
        assert_eq!(c.approvals.timeout_secs, 120);
        assert_eq!(c.scheduler.timezone, "UTC");
    }

    #[test]
    fn secret_debug_is_redacted() {
        let c = LlmConfig {
            api_key: Some(Secret::new("sk-live-123")),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("sk-live"));
        let n = NotifyConfig {
            url: Secret::new("https://ntfy.sh/topic-s3cr3t"),
            include_summary: false,
        };
        assert!(!format!("{n:?}").contains("s3cr3t"));
    }

    #[test]
    fn secrets_and_notify_sections() {
        let c = Config::parse(DEFAULT_CONFIG_TOML, Path::new("c")).unwrap();
        assert_eq!(c.secrets.max_lease_secs, 3600);
        assert!(c.notify.url.is_empty() && !c.notify.include_summary);
        assert!(Config::parse("[secrets]\nmax_lease_secs = 86401\n", Path::new("c")).is_err());
        assert!(Config::parse("[secrets]\nmax_lease_secs = 0\n", Path::new("c")).is_ok());
        let e = Config::parse("[notify]\nurl = \"ftp://x/s3cr3t\"\n", Path::new("c")).unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"));
        assert!(Config::parse("[notify]\nurl = \"https://ntfy.sh/t\"\n", Path::new("c")).is_ok());
    }

    #[test]
    fn unknown_key_and_range_are_refused() {
        assert!(Config::parse("[server]\nlisten_typo = 1\n", Path::new("c")).is_err());
        assert!(Config::parse("[approvals]\ntimeout_secs = 0\n", Path::new("c")).is_err());
        assert!(Config::parse("[scheduler]\ntimezone = \"Mars/Base\"\n", Path::new("c")).is_err());
    }

    #[test]
    fn origins_are_scheme_host_port_only() {
        for ok in [
            "http://localhost:7420",
            "https://agent.example.net",
            "https://[::1]:8443",
        ] {
            assert!(is_origin(ok), "{ok}");
        }
        for bad in [
            "localhost:7420",
            "http://x/",
            "https://a.b/path",
            "http://A.example",
            "null",
            "http://u@h",
            "ftp://h",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }

    #[test]
    fn audit_retention_and_device_budget_are_validated() {
        let c = Config::parse(DEFAULT_CONFIG_TOML, Path::new("c")).unwrap();
        assert_eq!(c.audit, AuditConfig::default());
        assert_eq!(
            (c.audit.segment_bytes, c.audit.max_bytes, c.audit.keep_days),
            (64 << 20, 2 << 30, 365)
        );
        assert_eq!(
            (
                c.server.device_requests_per_sec,
                c.server.device_request_burst
            ),
            (200, 2000)
        );
        let p = |t: &str| Config::parse(t, Path::new("c"));
        assert!(p("[audit]\nsegment_bytes = 1023\n").is_err());
        assert!(p("[audit]\nsegment_bytes = 4096\nmax_bytes = 8191\n").is_err());
        assert!(p("[audit]\nsegment_bytes = 4096\nmax_bytes = 8192\n").is_ok());
        assert!(p("[audit]\nmax_bytes = 0\nkeep_days = 0\n").is_ok());
        assert!(p("[audit]\nkeep_days = 36501\n").is_err());
        assert!(p("[audit]\nkeep_days = -1\n").is_err());
        assert!(p("[server]\ndevice_requests_per_sec = 0\n").is_err());
        assert!(p("[server]\ndevice_requests_per_sec = 0\ndevice_request_burst = 0\n").is_ok());
    }
}
