//! Test harness: a real server on 127.0.0.1:0 with a temp data dir, and
//! simulated phones from `mobile-client-sim`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use mobile_client_sim::client::{self, Endpoint};
use mobile_client_sim::{ApprovalAlg, Client, Connected, Identity, RawConn, proto};
use secrets_agent::auth::pairing::create_offer;
use secrets_agent::secrets::SecretValue;
use secrets_agent::{Options, ServerHandle};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// How long a test waits for one frame the server pushes (an approval
/// request, an answer) before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

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
        Self::start_in_dir(dir).await
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
        let auth = auth_frame(
            id,
            ch["server_key"].as_str().unwrap(),
            ch["nonce"].as_str().unwrap(),
            ch["ts"].as_i64().unwrap(),
        );
        r.send_json(&auth).await.unwrap();
        assert_eq!(r.recv_frame().await.unwrap()["type"], "auth_ok");
        r
    }

    /// A phone paired as `name`, its session closed, and a raw connection
    /// authenticated as it, for sending exact frames.
    pub async fn raw_session(&self, name: &str) -> (RawConn, Identity) {
        let (c, id) = self.phone(name).await;
        c.close().await;
        (self.raw_authed(&id).await, id)
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
        pairing_code(self.handle(), ttl, &self.url)
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

    /// A raw connection from the local address `from` (127.0.0.0/8).
    pub async fn raw_from(&self, from: std::net::IpAddr) -> RawConn {
        RawConn::connect_from(&self.url, None, Some(from))
            .await
            .unwrap()
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

    /// Stores secret `name` with `value` (no description), as the vault does.
    pub async fn set_secret(&self, name: &str, value: &str) {
        self.handle()
            .state
            .secrets
            .set(name, SecretValue::new(value.to_string()), None)
            .await
            .unwrap();
    }

    /// The data dir's `config.toml` as it is on disk.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(self.path().join("config.toml")).unwrap()
    }
}

/// Writes `text` to `dir/rel`, making the folders on the way.
pub fn write_file(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// `secrets-agent serve` on 127.0.0.1:0 with `dir`, as a child process:
/// (child, its url, the pairing code it printed when no device is paired).
pub fn serve(dir: &Path) -> (Child, String, Option<String>) {
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("SECRETS_AGENT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().expect("serve prints a line").unwrap();
    if let Some(rest) = first.strip_prefix("No device is paired yet. Pairing code: ") {
        let code = rest.split_whitespace().next().unwrap().to_string();
        let _key = lines.next().unwrap().unwrap();
        let url = lines
            .next()
            .unwrap()
            .unwrap()
            .trim()
            .strip_prefix("url: ")
            .unwrap()
            .to_string();
        (child, url, Some(code))
    } else {
        let url = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_string();
        (child, url, None)
    }
}

/// `secrets-agent pair --json` on `dir`: the offer it prints.
pub fn pair_json(dir: &Path) -> Value {
    let out = Command::new(bin())
        .args(["pair", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Everything logged in this test binary since [`capture_logs`].
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per test binary) what `secrets-agent serve` installs, at
/// `SECRETS_AGENT_LOG=trace` and without colours, writing to a buffer
/// (including the `log` bridge, so the HTTP client's own lines count too).
pub fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        tracing_subscriber::fmt()
            .with_env_filter(secrets_agent::logging::filter("trace"))
            .with_ansi(false)
            .with_writer(|| Capture)
            .init();
    });
}

/// The bytes logged so far (see [`capture_logs`]).
pub fn logged_bytes() -> Vec<u8> {
    LOG.lock().unwrap().clone()
}

/// The text logged so far (see [`capture_logs`]).
pub fn logged() -> String {
    String::from_utf8_lossy(&logged_bytes()).into_owned()
}

/// A pairing code made on `h`'s database, valid `ttl` s, for `url`.
pub fn pairing_code(h: &ServerHandle, ttl: u64, url: &str) -> String {
    let st = &h.state;
    create_offer(&st.db, st.clock.now_ms(), ttl, &st.key, url.to_string())
        .unwrap()
        .code
}

/// `config.toml` lines that serve wss:// with `cert.pem` and `key.pem`.
pub const TLS_CONFIG: &str = "[server]\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n";

/// Writes a new self-signed certificate for `localhost` to `dir/cert.pem`
/// and its key to `dir/key.pem`; returns them.
pub fn write_self_signed_cert(dir: &Path) -> rcgen::CertifiedKey<rcgen::KeyPair> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    cert
}

/// A data dir set up for TLS: a fresh certificate and [`TLS_CONFIG`] as
/// its `config.toml`.
pub fn write_tls_setup(dir: &Path) -> rcgen::CertifiedKey<rcgen::KeyPair> {
    let cert = write_self_signed_cert(dir);
    std::fs::write(dir.join("config.toml"), TLS_CONFIG).unwrap();
    cert
}

// ------------------------------------------------ the handshake (SPEC §4)

/// Reads the challenge and checks its shape: (server_key, nonce, ts).
pub async fn challenge(c: &mut RawConn) -> (String, String, i64) {
    let ch = c.recv_frame().await.unwrap();
    assert_eq!(ch["type"], "challenge", "{ch}");
    assert_eq!(ch["protocol"], 1);
    assert_eq!(
        proto::unb64(ch["nonce"].as_str().unwrap()).unwrap().len(),
        32
    );
    (
        ch["server_key"].as_str().unwrap().into(),
        ch["nonce"].as_str().unwrap().into(),
        ch["ts"].as_i64().unwrap(),
    )
}

/// Expects `auth_error` with `code` and a message, then close 4401;
/// returns the error frame.
pub async fn expect_refused(c: &mut RawConn, code: &str) -> Value {
    let f = c.recv_frame().await.unwrap();
    assert_eq!(f["type"], "auth_error", "{f}");
    assert_eq!(f["code"], code, "{f}");
    assert!(f["message"].as_str().is_some_and(|m| !m.is_empty()));
    let closed = c.closed().await.expect("a close frame");
    assert_eq!(closed.0, 4401);
    f
}

/// The `auth` frame answering a challenge (`nonce`, `ts`) as `id`.
pub fn auth_frame(id: &Identity, server_key: &str, nonce: &str, ts: i64) -> Value {
    let cn = proto::nonce32();
    let msg = proto::auth_string(server_key, nonce, &id.device_id(), &cn, ts);
    json!({"type": "auth", "protocol": 1, "device_id": id.device_id(), "nonce": nonce, "client_nonce": cn, "ts": ts, "signature": id.sign_device(&msg)})
}

/// The `pair` frame answering a challenge with `code`, as `id`.
pub fn pair_frame(id: &Identity, server_key: &str, nonce: &str, code: &str) -> Value {
    pair_frame_with(id, server_key, nonce, code, &id.device_name, false)
}

/// A `pair` frame for `id` with `device_name` as given; with `same_keys`
/// the device key stands (and signs) as the approval key too.
pub fn pair_frame_with(
    id: &Identity,
    server_key: &str,
    nonce: &str,
    code: &str,
    name: &str,
    same_keys: bool,
) -> Value {
    let cn = proto::nonce32();
    let dpk = id.public_key_b64();
    let apk = if same_keys {
        dpk.clone()
    } else {
        id.approval_public_key_b64()
    };
    let msg = proto::pair_string(server_key, nonce, code, &dpk, &apk, &cn);
    let asig = if same_keys {
        id.sign_device(&msg)
    } else {
        id.sign_approval(&msg)
    };
    json!({"type": "pair", "protocol": 1, "code": code, "device_name": name, "device_public_key": dpk,
           "approval_public_key": apk, "approval_key_alg": id.approval_alg().as_str(), "client_nonce": cn,
           "signature": id.sign_device(&msg), "approval_signature": asig})
}

/// Asserts no `approval_request` reaches the phone within 300 ms.
pub async fn assert_no_approval_request(c: &Client) {
    assert!(
        c.wait_event(Duration::from_millis(300), |f| f["type"]
            == "approval_request")
            .await
            .is_err()
    );
}

/// Reads frames from a raw connection until one matches (within [`WAIT`]).
pub async fn recv_until(r: &mut RawConn, pred: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let f = r.recv_frame().await.unwrap();
            if pred(&f) {
                return f;
            }
        }
    })
    .await
    .expect("the awaited frame")
}

// --------------------------------------- the approval round trip (SPEC §8)

/// Sends `action` with `params` from a task (a gated one waits for its
/// approval); the handle gives its final payload.
pub fn spawn_request(c: &Arc<Client>, action: &str, params: Value) -> JoinHandle<Value> {
    let (c, action) = (c.clone(), action.to_string());
    tokio::spawn(async move { c.request(&action, params).await.unwrap() })
}

/// The next `approval_request` the phone gets.
pub async fn next_approval_request(c: &Client) -> Value {
    c.wait_event(WAIT, |f| f["type"] == "approval_request")
        .await
        .expect("an approval_request")
}

/// Waits for the next approval request and answers it; returns it.
pub async fn answer_next(c: &Client, id: &Identity, decision: &str) -> Value {
    let req = next_approval_request(c).await;
    c.answer_approval(id, &req, decision).await.unwrap();
    req
}

/// One gated request, start to end: `action` with `params` from `c`, its
/// approval request answered with `decision` as `id`. Returns the final
/// payload and the approval request.
pub async fn approval_round_trip(
    c: &Arc<Client>,
    id: &Identity,
    action: &str,
    params: Value,
    decision: &str,
) -> (Value, Value) {
    let pending = spawn_request(c, action, params);
    let req = answer_next(c, id, decision).await;
    (pending.await.unwrap(), req)
}

/// The APPROVAL string of SPEC §4 that answers `req` with `decision`.
pub fn approval_text(req: &Value, decision: &str) -> String {
    let s = |k: &str| req[k].as_str().unwrap().to_string();
    proto::approval_string(
        &s("approval_id"),
        &s("action_digest"),
        &s("challenge"),
        decision,
    )
}

/// Whether `list_devices` shows `device` as revoked.
pub async fn is_revoked(c: &Client, device: &str) -> bool {
    let d = c.request("list_devices", json!({})).await.unwrap();
    d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["device_id"] == device)
        .unwrap()["revoked"]
        .as_bool()
        .unwrap()
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
            // Whole lines only: a last line without its newline is a
            // write cut short by a crash (`VerifyReport::incomplete_tail`).
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n') && !l.trim().is_empty())
                .map(|l| serde_json::from_str(l.trim_end()).unwrap())
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
