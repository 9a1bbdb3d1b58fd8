//! Issue 10's attacks on the data dir, pairing and the handshake, each
//! performed over real sockets (or on the real files) and shown to fail with
//! nothing lost: a local user reading the data dir, a copied `agent.db`, a
//! hostile pairing frame, a web page on another origin, oversized frames
//! and silent sockets before authentication.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{
    TestServer, approval_round_trip, auth_frame, bin, challenge, expect_refused, pair_frame_with,
    pair_json, write_self_signed_cert, write_tls_setup,
};
use mobile_client_sim::client::{self, Endpoint};
use mobile_client_sim::{ApprovalAlg, Identity, Incoming};
use serde_json::{Value, json};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every file and directory under `root` with group or world bits.
fn wide_entries(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if mode(&p) & 0o077 != 0 {
            out.push(format!("{} {:o}", p.display(), mode(&p)));
        }
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

fn device_count(dir: &Path) -> i64 {
    let c = rusqlite::Connection::open(dir.join("agent.db")).unwrap();
    c.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_fresh_data_dir_under_umask_022_has_no_group_or_world_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let script = format!(
        "umask 022; exec {:?} serve --data-dir {:?} --listen 127.0.0.1:0",
        bin(),
        dir
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut code, mut key, mut url) = (String::new(), String::new(), String::new());
    for _ in 0..3 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if let Some(rest) = line.split("Pairing code: ").nth(1) {
            code = rest.split_whitespace().next().unwrap().to_string();
        }
        if let Some(rest) = line.trim().strip_prefix("server key: ") {
            key = rest.to_string();
        }
        if let Some(rest) = line.trim().strip_prefix("url: ") {
            url = rest.to_string();
        }
    }
    // Use it: a device row, audit records, the WAL.
    let mut id = Identity::generate("phone", ApprovalAlg::Ed25519);
    let (c, _) = client::pair(&Endpoint::new(url), &mut id, &code, Some(&key))
        .await
        .unwrap();
    c.request("get_dashboard", json!({})).await.unwrap();
    assert!(
        dir.join("agent.db-wal").exists(),
        "the WAL is there to check"
    );
    let wide = wide_entries(&dir);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(wide.is_empty(), "while running: {wide:?}");
    // The CLI writes too (a code, an audit record) under the same umask.
    let script = format!("umask 022; exec {:?} pair --data-dir {:?}", bin(), dir);
    let st = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(st.status.success());
    assert_eq!(wide_entries(&dir), Vec::<String>::new());
    assert_eq!(mode(&dir), 0o700);
}

#[tokio::test]
async fn a_loosened_data_dir_is_tightened_at_start_and_config_rewrites_stay_private() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(tmp.path().join("config.toml"), "").unwrap();
    std::fs::set_permissions(
        tmp.path().join("config.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let s = TestServer::start_in_dir(tmp).await;
    assert_eq!(mode(s.path()), 0o700);
    assert_eq!(mode(&s.path().join("config.toml")), 0o600);
    // Loosen the config again; an approved update rewrites it 0600.
    std::fs::set_permissions(
        s.path().join("config.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (c, id) = s.phone("owner").await;
    let c = Arc::new(c);
    let (r, _) = approval_round_trip(
        &c,
        &id,
        "update_config",
        json!({"section": "llm", "value": {"api_key": "sk-private-1"}}),
        "approve",
    )
    .await;
    assert_eq!(r["result"], "success");
    assert!(s.config_text().contains("sk-private-1"));
    assert_eq!(mode(&s.path().join("config.toml")), 0o600);
    assert_eq!(wide_entries(s.path()), Vec::<String>::new());
}

#[tokio::test]
async fn a_copy_of_agent_db_does_not_reveal_a_live_code() {
    let s = TestServer::start().await;
    let code = s.code();
    s.handle().state.db.call(|_| Ok(())).await.unwrap();
    let normalised = code.replace('-', "");
    let plain = hex_sha256(normalised.as_bytes());
    let plain_dashed = hex_sha256(code.as_bytes());
    let mut bytes = Vec::new();
    for f in ["agent.db", "agent.db-wal"] {
        if let Ok(mut file) = std::fs::File::open(s.path().join(f)) {
            file.read_to_end(&mut bytes).unwrap();
        }
    }
    let hay = String::from_utf8_lossy(&bytes);
    assert!(hay.contains("pairing_codes"), "the table is in the copy");
    for needle in [&plain, &plain_dashed, &normalised, &code] {
        assert!(!hay.contains(needle.as_str()), "{needle} found in agent.db");
    }
    // ... and the code still works for the phone.
    let (c, _) = s.phone("owner").await;
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[tokio::test]
async fn hostile_pairing_frames_are_refused_and_store_nothing() {
    let s = TestServer::start().await;
    let code = s.code();
    let cases: [(&str, bool, &str); 6] = [
        ("phone", true, "equal device and approval keys"),
        ("evil\u{1b}[2Jphone", false, "an ESC in the name"),
        ("pay\u{202e}gnp.exe", false, "a bidi override in the name"),
        ("tab\there", false, "a control character"),
        ("", false, "an empty name"),
        (&"x".repeat(65), false, "65 characters"),
    ];
    for (name, same, what) in cases {
        let id = Identity::generate("x", ApprovalAlg::Ed25519);
        let mut c = s.raw().await;
        let (key, nonce, _) = challenge(&mut c).await;
        c.send_json(&pair_frame_with(&id, &key, &nonce, &code, name, same))
            .await
            .unwrap();
        let f = expect_refused(&mut c, "invalid_request").await;
        assert!(!f["message"].as_str().unwrap().is_empty(), "{what}");
    }
    assert_eq!(device_count(s.path()), 0, "nothing was stored");
    // 64 characters (not bytes) is fine, and the code was not used up.
    let id = Identity::generate("x", ApprovalAlg::Ed25519);
    let mut c = s.raw().await;
    let (key, nonce, _) = challenge(&mut c).await;
    let name = "é".repeat(64);
    c.send_json(&pair_frame_with(&id, &key, &nonce, &code, &name, false))
        .await
        .unwrap();
    assert_eq!(c.recv_frame().await.unwrap()["type"], "pair_ok");
    assert_eq!(device_count(s.path()), 1);
}

#[tokio::test]
async fn a_re_pairing_cannot_take_over_a_row_holding_another_key() {
    let s = TestServer::start().await;
    let (_c, owner) = s.phone("owner").await;
    let attacker = Identity::generate("attacker", ApprovalAlg::Ed25519);
    // A row under the attacker's device id that holds the owner's key (as a
    // device-id collision would): the attacker's pairing must not rewrite it.
    let db = rusqlite::Connection::open(s.path().join("agent.db")).unwrap();
    db.execute(
        "UPDATE devices SET device_id = ?1 WHERE device_id = ?2",
        [attacker.device_id(), owner.device_id()],
    )
    .unwrap();
    let code = s.code();
    let mut c = s.raw().await;
    let (key, nonce, _) = challenge(&mut c).await;
    c.send_json(&pair_frame_with(
        &attacker, &key, &nonce, &code, "attacker", false,
    ))
    .await
    .unwrap();
    expect_refused(&mut c, "invalid_request").await;
    let (name, pk, apk): (String, Vec<u8>, Vec<u8>) = db
        .query_row(
            "SELECT device_name, public_key, approval_public_key FROM devices WHERE device_id = ?1",
            [attacker.device_id()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(name, "owner");
    assert_eq!(pk, owner.public_key());
    assert_eq!(apk, owner.approval_public_key());
}

/// Sends an upgrade request with `origin` (if any); returns the status line.
fn upgrade_status(addr: std::net::SocketAddr, origin: Option<&str>) -> String {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    write!(
        tcp,
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(tcp).read_line(&mut line).unwrap();
    line.trim().to_string()
}

#[tokio::test]
async fn a_foreign_origin_gets_403() {
    let s = TestServer::start_with_config(
        "[server]\nallowed_origins = [\"https://dash.example.net\"]\n",
    )
    .await;
    let addr = s.handle().addr;
    let own = format!("http://localhost:{}", addr.port());
    let statuses = tokio::task::spawn_blocking(move || {
        [
            upgrade_status(addr, Some("https://evil.example")),
            upgrade_status(addr, Some("http://localhost:1")),
            upgrade_status(addr, Some("null")),
            upgrade_status(addr, Some(&format!("http://127.0.0.1:{}", addr.port()))),
            upgrade_status(addr, None),
            upgrade_status(addr, Some(&own)),
            upgrade_status(addr, Some("https://dash.example.net")),
        ]
    })
    .await
    .unwrap();
    for s in &statuses[..4] {
        assert!(s.contains(" 403 "), "{statuses:?}");
    }
    for s in &statuses[4..] {
        assert!(s.contains(" 101 "), "{statuses:?}");
    }
}

#[tokio::test]
async fn frames_over_4_kib_before_authentication_close_with_1009() {
    let s = TestServer::start().await;
    let (_c, id) = s.phone("owner").await;
    for size in [4097, 200_000] {
        let mut c = s.raw().await;
        let _ = challenge(&mut c).await;
        let pad = "x".repeat(size - 20);
        let _ = c
            .send_text(format!("{{\"type\":\"auth\",\"p\":\"{pad}\"}}"))
            .await;
        match c.recv().await {
            Incoming::Closed(Some((code, _))) => assert_eq!(code, 1009, "size {size}"),
            other => panic!("size {size}: expected close 1009, got {other:?}"),
        }
    }
    // After authentication the ordinary limit (1 MiB) applies.
    let (c, _) = s.connect(&id).await;
    let long = "y".repeat(16 * 1024);
    let r = c
        .request("list_memories", json!({"page": 1, "pad": long}))
        .await
        .unwrap();
    assert_eq!(r["code"], "invalid_request", "answered, not closed: {r}");
}

#[tokio::test]
async fn idle_sockets_from_one_address_are_capped_and_the_owner_gets_in() {
    let s = TestServer::start().await;
    let (_c, id) = s.phone("owner").await;
    let addr = s.handle().addr;
    let attacker: std::net::IpAddr = "127.0.0.9".parse().unwrap();
    let mut socks = Vec::new();
    for _ in 0..1500 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((attacker, 0).into()).unwrap();
        socks.push(sock.connect(addr).await.unwrap());
    }
    // The owner connects and works while they are open.
    let started = std::time::Instant::now();
    let (c, _) = s.connect(&id).await;
    assert_eq!(
        c.request("get_dashboard", json!({})).await.unwrap()["result"],
        "dashboard"
    );
    eprintln!(
        "owner authenticated in {:?} with 1500 idle sockets open",
        started.elapsed()
    );
    // All but a few of the idle sockets were closed by the server at once.
    let mut open = 0;
    for mut sock in socks {
        let mut b = [0u8; 1];
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout(Duration::from_millis(5), sock.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            _ => open += 1,
        }
    }
    assert!(
        open <= secrets_agent::admission::PER_PEER,
        "{open} idle sockets from one address still open"
    );
}

#[tokio::test(start_paused = true)]
async fn handshake_timeouts_count_as_failures() {
    let s = TestServer::start_with_config("[server]\nauth_failures_per_minute = 2\n").await;
    let (_c, id) = s.phone("owner").await;
    let slow: std::net::IpAddr = "127.0.0.7".parse().unwrap();
    for _ in 0..3 {
        let mut c = s.raw_from(slow).await;
        let _ = challenge(&mut c).await;
        match c.recv().await {
            Incoming::Closed(Some((code, _))) => assert_eq!(code, 4408),
            other => panic!("expected 4408, got {other:?}"),
        }
    }
    let mut c = s.raw_from(slow).await;
    let (key, nonce, ts) = challenge(&mut c).await;
    c.send_json(&auth_frame(&id, &key, &nonce, ts))
        .await
        .unwrap();
    expect_refused(&mut c, "rate_limited").await;
}

#[tokio::test]
async fn failed_handshakes_are_audited_in_aggregate() {
    let mut s = TestServer::start().await;
    let peer: std::net::IpAddr = "127.0.0.5".parse().unwrap();
    for _ in 0..10 {
        let mut c = s.raw_from(peer).await;
        let _ = challenge(&mut c).await;
        c.send_text("{}").await.unwrap();
        let _ = c.closed().await;
    }
    let dir = s.path().to_path_buf();
    s.stop().await; // the last report is written at shutdown
    let text = std::fs::read_to_string(dir.join("audit/audit.jsonl")).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["action"].as_str().unwrap().starts_with("handshake"))
        .collect();
    assert_eq!(records.len(), 1, "one record for ten failures: {records:?}");
    assert_eq!(records[0]["action"], "handshake.failures");
    assert_eq!(
        records[0]["outcome"],
        "10 failed from 127.0.0.5: unauthenticated:10"
    );
    common::assert_audit_verifies(&dir);
}

#[tokio::test]
async fn pair_json_carries_the_tls_pin_and_the_cli_escapes_device_names() {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_tls_setup(dir.path());
    let offer = pair_json(dir.path());
    use rcgen::PublicKeyData;
    let want = hex_sha256(&cert.signing_key.subject_public_key_info());
    assert_eq!(offer["tls_spki_sha256"], want.as_str(), "{offer}");

    // A name stored before v1.1's checks is printed escaped.
    let db = rusqlite::Connection::open(dir.path().join("agent.db")).unwrap();
    db.execute(
        "INSERT INTO devices(device_id, device_name, public_key, approval_public_key, approval_key_alg, paired_at, revoked)
         VALUES ('d1', 'evil' || char(27) || '[31m' || char(8238) || 'name', x'01', x'02', 'ed25519', 0, 0)",
        [],
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["devices", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{202e}'),
        "{text:?}"
    );
    assert!(text.contains("evil\\u{1b}[31m\\u{202e}name"), "{text}");
}

#[test]
fn without_tls_pair_json_has_no_pin() {
    let dir = tempfile::tempdir().unwrap();
    let offer = pair_json(dir.path());
    assert!(offer.get("tls_spki_sha256").is_none(), "{offer}");
}

#[tokio::test]
async fn no_device_is_paired_while_the_audit_log_cannot_record_it() {
    let s = TestServer::start().await;
    let code = s.code();
    let audit = s.path().join("audit");
    assert!(!audit.exists(), "nothing was audited yet");
    std::fs::write(&audit, "not a directory").unwrap();
    let id = Identity::generate("x", ApprovalAlg::Ed25519);
    let mut c = s.raw().await;
    let (key, nonce, _) = challenge(&mut c).await;
    c.send_json(&pair_frame_with(&id, &key, &nonce, &code, "phone", false))
        .await
        .unwrap();
    let f = expect_refused(&mut c, "invalid_request").await;
    assert!(f["message"].as_str().unwrap().contains("audit"), "{f}");
    assert_eq!(device_count(s.path()), 0);
    // Restored: the same code still pairs.
    std::fs::remove_file(&audit).unwrap();
    let mut c = s.raw().await;
    let (key, nonce, _) = challenge(&mut c).await;
    c.send_json(&pair_frame_with(&id, &key, &nonce, &code, "phone", false))
        .await
        .unwrap();
    assert_eq!(c.recv_frame().await.unwrap()["type"], "pair_ok");
    assert_eq!(device_count(s.path()), 1);
}

#[tokio::test]
async fn mobile_sim_pins_the_tls_key_from_pair_json() {
    let dir = tempfile::tempdir().unwrap();
    write_tls_setup(dir.path());
    let h = common::start_in(dir.path()).await;
    let offer = pair_json(dir.path());
    let pin = offer["tls_spki_sha256"].as_str().unwrap().to_string();
    let url = offer["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("wss://"), "{url}");

    // No CA: the pin alone authenticates the server.
    let mut ep = Endpoint::new(url.clone());
    ep.tls_pin = Some(pin.clone());
    let mut id = Identity::generate("pinned phone", ApprovalAlg::Ed25519);
    let code = offer["code"].as_str().unwrap();
    let (c, _) = client::pair(&ep, &mut id, code, offer["server_key"].as_str())
        .await
        .unwrap();
    assert_eq!(
        id.pinned.as_ref().unwrap().tls_spki_sha256.as_deref(),
        Some(pin.as_str())
    );
    c.close().await;
    client::auth(&ep, &id)
        .await
        .expect("the pinned key matches");
    let mut wrong = ep.clone();
    wrong.tls_pin = Some("00".repeat(32));
    assert!(
        client::auth(&wrong, &id).await.is_err(),
        "another pin is refused"
    );

    // The server's TLS key changes (same data dir, same server key): refused.
    h.shutdown().await;
    write_self_signed_cert(dir.path());
    let h = common::start_in(dir.path()).await;
    let mut ep2 = ep.clone();
    ep2.url = format!("wss://127.0.0.1:{}/ws", h.addr.port());
    let Err(err) = client::auth(&ep2, &id).await else {
        panic!("a server with another TLS key was accepted");
    };
    assert!(err.to_string().contains("pinned"), "{err}");
    h.shutdown().await;
}
