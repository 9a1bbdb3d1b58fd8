//! Test harness: a real server on 127.0.0.1:0 with a temp data dir, and
//! simulated phones from `mobile-client-sim`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use mobile_client_sim::client::{self, Endpoint};
use mobile_client_sim::{ApprovalAlg, Client, Connected, Identity, RawConn};
use secrets_agent::auth::pairing::create_offer;
use secrets_agent::{Options, ServerHandle};
use serde_json::Value;

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub dir: tempfile::TempDir,
    pub url: String,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with_config("").await
    }

    /// Starts with `config.toml` holding `extra` (TOML) on top of the defaults.
    pub async fn start_with_config(extra: &str) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        if !extra.is_empty() {
            std::fs::write(dir.path().join("config.toml"), extra).unwrap();
        }
        let handle = start_in(dir.path()).await;
        let url = handle.url.clone();
        TestServer {
            handle: Some(handle),
            dir,
            url,
        }
    }

    /// With the real embedding model (fetched by `scripts/fetch-models.sh`).
    pub async fn start_with_memory(extra: &str) -> TestServer {
        Self::start_with_config(&format!("{}\n{extra}", model_config())).await
    }

    /// Starts on a data dir the test prepared (plugins, skills, config).
    pub async fn start_in_dir(dir: tempfile::TempDir) -> TestServer {
        let handle = start_in(dir.path()).await;
        let url = handle.url.clone();
        TestServer {
            handle: Some(handle),
            dir,
            url,
        }
    }

    /// A raw connection authenticated as `id`, for sending exact frames.
    pub async fn raw_authed(&self, id: &Identity) -> RawConn {
        let mut r = self.raw().await;
        let ch = r.recv_frame().await.unwrap();
        let cn = mobile_client_sim::proto::nonce32();
        let (key, nonce, ts) = (
            ch["server_key"].as_str().unwrap(),
            ch["nonce"].as_str().unwrap(),
            ch["ts"].as_i64().unwrap(),
        );
        let msg = mobile_client_sim::proto::auth_string(key, nonce, &id.device_id(), &cn, ts);
        let auth = serde_json::json!({"type": "auth", "protocol": 1, "device_id": id.device_id(), "nonce": nonce,
                                      "client_nonce": cn, "ts": ts, "signature": id.sign_device(&msg)});
        r.send_json(&auth).await.unwrap();
        assert_eq!(r.recv_frame().await.unwrap()["type"], "auth_ok");
        r
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.url.clone())
    }

    /// A fresh pairing code (TTL 300 s on the server's clock).
    pub fn code(&self) -> String {
        self.code_with_ttl(300)
    }

    pub fn code_with_ttl(&self, ttl: u64) -> String {
        let st = &self.handle().state;
        create_offer(&st.db, st.clock.now_ms(), ttl, &st.key, self.url.clone())
            .unwrap()
            .code
    }

    pub fn server_key(&self) -> String {
        self.handle().state.key.public_b64().to_string()
    }

    /// Pairs a new phone and returns its session and identity.
    pub async fn phone(&self, name: &str) -> (Client, Identity) {
        self.phone_with(name, ApprovalAlg::Ed25519).await
    }

    pub async fn phone_with(&self, name: &str, alg: ApprovalAlg) -> (Client, Identity) {
        let mut id = Identity::generate(name, alg);
        let (c, _) = client::pair(
            &self.endpoint(),
            &mut id,
            &self.code(),
            Some(&self.server_key()),
        )
        .await
        .unwrap();
        (c, id)
    }

    /// A second session for an already paired identity.
    pub async fn connect(&self, id: &Identity) -> (Client, Connected) {
        client::auth(&self.endpoint(), id).await.unwrap()
    }

    pub async fn raw(&self) -> RawConn {
        RawConn::connect(&self.url).await.unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }

    /// Stops and starts again on the same data dir (a new port).
    pub async fn restart(&mut self) {
        self.stop().await;
        let h = start_in(self.dir.path()).await;
        self.url = h.url.clone();
        self.handle = Some(h);
    }

    /// Every retained audit record, across segments, oldest first.
    pub fn audit_lines(&self) -> Vec<Value> {
        audit_records(&self.path().join("audit"))
    }
}

pub async fn start_in(dir: &Path) -> ServerHandle {
    secrets_agent::start(Options {
        data_dir: dir.to_path_buf(),
        listen: Some("127.0.0.1:0".into()),
        print_pairing_code: false,
    })
    .await
    .unwrap()
}

/// The segment files under an audit dir, in chain order (closed segments by
/// the seq their name states, then the active `audit.jsonl`).
pub fn audit_segments(audit_dir: &Path) -> Vec<PathBuf> {
    secrets_agent::storage::audit::list_segments(audit_dir)
        .unwrap()
        .0
        .into_iter()
        .map(|s| s.path)
        .collect()
}

/// Every record in the segments under `audit_dir`, in chain order.
pub fn audit_records(audit_dir: &Path) -> Vec<Value> {
    audit_segments(audit_dir)
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// The audit log after everything queued so far is on disk.
pub async fn audit_now(server: &TestServer) -> Vec<Value> {
    server.handle().state.audit.flush().await;
    server.audit_lines()
}

/// Runs `secrets-agent audit verify` on `dir`: (success, stdout + stderr).
pub fn audit_verify(dir: &Path) -> (bool, String) {
    let out = std::process::Command::new(bin())
        .args(["audit", "verify", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Asserts the audit chain on `dir` verifies.
#[track_caller]
pub fn assert_audit_verifies(dir: &Path) {
    let (ok, text) = audit_verify(dir);
    assert!(ok, "audit verify failed: {text}");
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_secrets-agent"))
}

/// Asserts a payload is an error with `code`.
#[track_caller]
pub fn assert_error(payload: &Value, code: &str) {
    assert_eq!(
        payload["result"], "error",
        "expected error {code}, got {payload}"
    );
    assert_eq!(payload["code"], code, "payload: {payload}");
    assert!(
        payload["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error has a message: {payload}"
    );
}

/// The model the tests use: `.deps/models/all-MiniLM-L6-v2` in the repo.
pub fn model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.onnx").is_file() && dir.join("libonnxruntime.so").is_file(),
        "the test embedding model is missing: run scripts/fetch-models.sh (scripts/test.sh does)"
    );
    dir
}

/// `[memory] model_dir = <the test model>`.
pub fn model_config() -> String {
    format!(
        "[memory]\nmodel_dir = {:?}\n",
        model_dir().display().to_string()
    )
}
