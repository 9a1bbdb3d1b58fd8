//! The vault at rest (SPEC §10 Store): a row moved to another name does
//! not decrypt and is reported, never returned; a wrong or missing
//! `vault.key` is a clear `unavailable`, and nothing is overwritten.

mod common;
mod secrets_support;

use common::{TestServer, answer_next, audit_now, spawn_request};
use secrets_support::*;
use serde_json::json;

async fn seed(s: &TestServer, pairs: &[(&str, &str)]) {
    for (n, v) in pairs {
        s.set_secret(n, v).await;
    }
}

#[tokio::test]
async fn a_ciphertext_moved_to_another_name_is_reported_not_returned() {
    let s = TestServer::start().await;
    let (phone, pid) = s.phone("owner").await;
    seed(&s, &[("ALPHA", "alpha-value"), ("BETA", "beta-value")]).await;
    let db = rusqlite::Connection::open(s.path().join("agent.db")).unwrap();
    let n = db
        .execute(
            "UPDATE secrets SET ciphertext = (SELECT ciphertext FROM secrets WHERE name = 'ALPHA') WHERE name = 'BETA'",
            [],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(db);
    let get = spawn_cli(s.path(), &["get", "BETA", "--reason", "r"], b"");
    answer_next(&phone, &pid, "approve").await;
    let out = get.await.unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "nothing returned");
    assert!(
        stderr(&out).contains("does not decrypt"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("alpha-value"));
    // The phone's reveal says the same, without a value.
    let phone = std::sync::Arc::new(phone);
    let reveal = spawn_request(&phone, "reveal_secret", json!({"name": "BETA"}));
    answer_next(&phone, &pid, "approve").await;
    let r = reveal.await.unwrap();
    common::assert_error(&r, "internal");
    assert!(!r.to_string().contains("alpha-value"));
    // The untouched secret still opens.
    let get = spawn_cli(s.path(), &["get", "ALPHA", "--reason", "r"], b"");
    answer_next(&phone, &pid, "approve").await;
    assert_eq!(get.await.unwrap().stdout, b"alpha-value");
    let log = audit_now(&s).await;
    assert!(
        log.iter()
            .any(|r| r["action"] == "secret.release_refused" && r["names"] == json!(["BETA"]))
    );
}

#[tokio::test]
async fn a_wrong_or_missing_vault_key_is_a_clear_error_and_nothing_is_overwritten() {
    let mut s = TestServer::start().await;
    let (_phone, owner) = s.phone("owner").await;
    seed(&s, &[("ALPHA", "alpha-value")]).await;
    let key_path = s.path().join("vault.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let right = std::fs::read(&key_path).unwrap();
    assert_eq!(right.len(), 32);

    // Another key: refused before anything is asked, no garbage.
    s.stop().await;
    std::fs::write(&key_path, [7u8; 32]).unwrap();
    s.restart().await;
    let (phone, _) = s.connect(&owner).await;
    let out = cli(s.path(), &["get", "ALPHA", "--reason", "r"], b"").await;
    assert_eq!(code(&out), 1);
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("not the key these secrets were encrypted with"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("unavailable"));
    let asked_at = std::time::Instant::now();
    let out = cli(s.path(), &["set", "OTHER"], b"x").await;
    assert_eq!(code(&out), 1, "no secret is written under a wrong key");
    assert!(
        stderr(&out).contains("not the key these secrets were encrypted with"),
        "{}",
        stderr(&out)
    );
    assert!(
        asked_at.elapsed() < std::time::Duration::from_secs(30),
        "refused at once, not after an approval timed out"
    );
    let pending = phone.request("list_approvals", json!({})).await.unwrap();
    assert_eq!(pending["approvals"], json!([]));
    assert_eq!(
        std::fs::read(&key_path).unwrap(),
        [7u8; 32],
        "not overwritten"
    );

    // No key while secrets exist: unavailable with how to restore; none made.
    s.stop().await;
    std::fs::remove_file(&key_path).unwrap();
    s.restart().await;
    let out = cli(s.path(), &["get", "ALPHA", "--reason", "r"], b"").await;
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("vault.key is missing") && stderr(&out).contains("restore"),
        "{}",
        stderr(&out)
    );
    assert!(!key_path.exists(), "no new key is made while secrets exist");

    // The right key back: it works again.
    s.stop().await;
    std::fs::write(&key_path, &right).unwrap();
    s.restart().await;
    let (phone, _) = s.connect(&owner).await;
    let get = spawn_cli(s.path(), &["get", "ALPHA", "--reason", "r"], b"");
    answer_next(&phone, &owner, "approve").await;
    assert_eq!(get.await.unwrap().stdout, b"alpha-value");
}
