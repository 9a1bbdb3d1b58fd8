//! Paired devices and one-time pairing codes in `agent.db`.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::StorageError;
use crate::auth::keys::ApprovalAlg;

/// Failed pairing attempts after which every live code is burnt (SPEC §4).
pub const MAX_PAIR_FAILURES: i64 = 5;

#[derive(Debug, Clone)]
pub struct Device {
    pub device_id: String,
    pub device_name: String,
    pub public_key: Vec<u8>,
    pub approval_public_key: Vec<u8>,
    pub approval_key_alg: ApprovalAlg,
    pub paired_at: i64,
    pub last_seen: Option<i64>,
    pub revoked: bool,
    /// The last signCount a WebAuthn approval key reported (0 otherwise).
    pub sign_count: u32,
}

impl Device {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Device> {
        let alg: String = r.get(4)?;
        Ok(Device {
            device_id: r.get(0)?,
            device_name: r.get(1)?,
            public_key: r.get(2)?,
            approval_public_key: r.get(3)?,
            approval_key_alg: ApprovalAlg::parse(&alg).unwrap_or(ApprovalAlg::Ed25519),
            paired_at: r.get(5)?,
            last_seen: r.get(6)?,
            revoked: r.get::<_, i64>(7)? != 0,
            sign_count: u32::try_from(r.get::<_, i64>(8)?).unwrap_or(u32::MAX),
        })
    }
}

const DEVICE_COLS: &str = "device_id, device_name, public_key, approval_public_key, approval_key_alg, paired_at, last_seen, revoked, sign_count";

pub fn get_device(c: &Connection, device_id: &str) -> Result<Option<Device>, StorageError> {
    let sql = format!("SELECT {DEVICE_COLS} FROM devices WHERE device_id = ?1");
    Ok(c.prepare_cached(&sql)?
        .query_row([device_id], Device::from_row)
        .optional()?)
}

pub fn list_devices(c: &Connection) -> Result<Vec<Device>, StorageError> {
    let sql = format!("SELECT {DEVICE_COLS} FROM devices ORDER BY paired_at, device_id");
    let mut st = c.prepare(&sql)?;
    let rows = st.query_map([], Device::from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn count_active_devices(c: &Connection) -> Result<i64, StorageError> {
    Ok(
        c.query_row("SELECT COUNT(*) FROM devices WHERE revoked = 0", [], |r| {
            r.get(0)
        })?,
    )
}

/// Marks a device revoked. Returns false if there is no such device.
pub fn revoke_device(c: &Connection, device_id: &str) -> Result<bool, StorageError> {
    Ok(c.execute(
        "UPDATE devices SET revoked = 1 WHERE device_id = ?1",
        [device_id],
    )? > 0)
}

/// Ids of revoked devices among `ids`.
pub fn revoked_among(c: &Connection, ids: &[String]) -> Result<Vec<String>, StorageError> {
    let mut st = c.prepare_cached("SELECT revoked FROM devices WHERE device_id = ?1")?;
    let mut out = Vec::new();
    for id in ids {
        let revoked: Option<i64> = st.query_row([id], |r| r.get(0)).optional()?;
        if revoked != Some(0) {
            out.push(id.clone());
        }
    }
    Ok(out)
}

pub fn touch_last_seen(c: &Connection, device_id: &str, now_ms: i64) -> Result<(), StorageError> {
    c.prepare_cached("UPDATE devices SET last_seen = ?2 WHERE device_id = ?1")?
        .execute(params![device_id, now_ms])?;
    Ok(())
}

/// What a successful pairing stores.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub device_id: String,
    pub device_name: String,
    pub public_key: Vec<u8>,
    pub approval_public_key: Vec<u8>,
    pub approval_key_alg: ApprovalAlg,
    /// A WebAuthn approval key: its credential id and the signCount of the
    /// pairing assertion (SPEC §11).
    pub webauthn: Option<(Vec<u8>, u32)>,
}

/// Stores a pairing code by its keyed hash (`auth::pairing::code_hash`);
/// returns its expiry. The code itself never reaches the database.
pub fn insert_pairing_code(
    c: &Connection,
    code_hash: &str,
    now_ms: i64,
    ttl_secs: u64,
) -> Result<i64, StorageError> {
    let expires_at = now_ms + (ttl_secs as i64) * 1000;
    c.execute(
        "INSERT INTO pairing_codes(code_hash, created_at, expires_at) VALUES (?1, ?2, ?3)",
        params![code_hash, now_ms, expires_at],
    )?;
    // Keep the table small: forget codes that can no longer be used.
    c.execute(
        "DELETE FROM pairing_codes WHERE state != 'live' OR expires_at < ?1",
        [now_ms - 86_400_000],
    )?;
    Ok(expires_at)
}

/// Whether the code with this hash is live: known, unused, unexpired, not burnt.
pub fn code_is_live(c: &Connection, code_hash: &str, now_ms: i64) -> Result<bool, StorageError> {
    let n: i64 = c.query_row(
        "SELECT COUNT(*) FROM pairing_codes WHERE code_hash = ?1 AND state = 'live' AND expires_at > ?2 AND failures < ?3",
        params![code_hash, now_ms, MAX_PAIR_FAILURES],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// Counts one failed pairing against every live code; codes reaching the
/// limit are burnt. Returns how many codes were burnt now.
pub fn record_pair_failure(c: &Connection, now_ms: i64) -> Result<usize, StorageError> {
    c.execute(
        "UPDATE pairing_codes SET failures = failures + 1 WHERE state = 'live' AND expires_at > ?1",
        [now_ms],
    )?;
    Ok(c.execute(
        "UPDATE pairing_codes SET state = 'burnt' WHERE state = 'live' AND failures >= ?1",
        [MAX_PAIR_FAILURES],
    )?)
}

/// What `complete_pairing` did.
#[derive(Debug)]
pub enum Paired {
    Stored(Device),
    /// The code was used, expired or burnt meanwhile.
    CodeGone,
    /// A row with this device id holds another public key: left unchanged.
    KeyMismatch,
}

/// Uses the code with hash `code_hash` and stores the device, in one
/// transaction. A public key that is already paired (even revoked) gets the
/// new name and approval key and is active again; a row is only ever updated
/// by the public key it holds.
pub fn complete_pairing(
    c: &mut Connection,
    code_hash: &str,
    now_ms: i64,
    dev: &NewDevice,
) -> Result<Paired, StorageError> {
    let tx = c.transaction()?;
    let used = tx.execute(
        "UPDATE pairing_codes SET state = 'used' WHERE code_hash = ?1 AND state = 'live' AND expires_at > ?2 AND failures < ?3",
        params![code_hash, now_ms, MAX_PAIR_FAILURES],
    )?;
    if used == 0 {
        return Ok(Paired::CodeGone);
    }
    let (credential_id, sign_count) = match &dev.webauthn {
        Some((id, n)) => (Some(id.as_slice()), *n),
        None => (None, 0),
    };
    tx.execute(
        "INSERT INTO devices(device_id, device_name, public_key, approval_public_key, approval_key_alg, paired_at, last_seen, revoked, webauthn_credential_id, sign_count)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 0, ?7, ?8)
         ON CONFLICT(device_id) DO UPDATE SET device_name = excluded.device_name,
             approval_public_key = excluded.approval_public_key, approval_key_alg = excluded.approval_key_alg,
             last_seen = excluded.last_seen, revoked = 0,
             webauthn_credential_id = excluded.webauthn_credential_id, sign_count = excluded.sign_count
         WHERE devices.public_key = excluded.public_key",
        params![
            dev.device_id,
            dev.device_name,
            dev.public_key,
            dev.approval_public_key,
            dev.approval_key_alg.as_str(),
            now_ms,
            credential_id,
            sign_count
        ],
    )?;
    let device = get_device(&tx, &dev.device_id)?;
    match device {
        Some(d) if d.public_key == dev.public_key => {
            tx.commit()?;
            Ok(Paired::Stored(d))
        }
        // Rolled back: the code stays live for the real phone.
        _ => Ok(Paired::KeyMismatch),
    }
}

/// Records `new` as the signCount of `device_id`'s WebAuthn key if it
/// advances the stored one per WebAuthn's rule
/// (`auth::webauthn::sign_count_advances`), the device is not revoked and
/// still holds `approval_public_key`; Some(the count it replaced). One
/// transaction, so of two assertions with the same count only one passes.
pub fn advance_sign_count(
    c: &mut Connection,
    device_id: &str,
    approval_public_key: &[u8],
    new: u32,
) -> Result<Option<u32>, StorageError> {
    let tx = c.transaction()?;
    let stored: Option<i64> = tx
        .query_row(
            "SELECT sign_count FROM devices WHERE device_id = ?1 AND approval_public_key = ?2 AND revoked = 0",
            params![device_id, approval_public_key],
            |r| r.get(0),
        )
        .optional()?;
    let Some(stored) = stored.and_then(|n| u32::try_from(n).ok()) else {
        return Ok(None);
    };
    if !crate::auth::webauthn::sign_count_advances(stored, new) {
        return Ok(None);
    }
    tx.execute(
        "UPDATE devices SET sign_count = ?2 WHERE device_id = ?1",
        params![device_id, new],
    )?;
    tx.commit()?;
    Ok(Some(stored))
}

/// Undoes [`advance_sign_count`] when the decision it went with could not
/// be made (the approval was decided or expired meanwhile), unless a later
/// assertion has moved the count on since.
pub fn restore_sign_count(
    c: &Connection,
    device_id: &str,
    from: u32,
    to: u32,
) -> Result<(), StorageError> {
    c.execute(
        "UPDATE devices SET sign_count = ?3 WHERE device_id = ?1 AND sign_count = ?2",
        params![device_id, from, to],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::temp_db as db;

    #[test]
    fn five_failures_burn_every_live_code() {
        let (_d, db) = db();
        db.blocking(|c| {
            insert_pairing_code(c, "a", 0, 300)?;
            insert_pairing_code(c, "b", 0, 300)?;
            for _ in 0..4 {
                assert_eq!(record_pair_failure(c, 1)?, 0);
            }
            assert!(code_is_live(c, "a", 1)?);
            assert_eq!(record_pair_failure(c, 1)?, 2);
            assert!(!code_is_live(c, "a", 1)? && !code_is_live(c, "b", 1)?);
            insert_pairing_code(c, "fresh", 2, 300)?;
            assert!(
                code_is_live(c, "fresh", 3)?,
                "a code made after the burn is live"
            );
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_passkey_sign_count_only_advances() {
        let (_d, db) = db();
        let dev = NewDevice {
            device_id: "web1".into(),
            device_name: "browser".into(),
            public_key: vec![1; 32],
            approval_public_key: vec![2; 91],
            approval_key_alg: ApprovalAlg::WebauthnEs256,
            webauthn: Some((b"cred".to_vec(), 2)),
        };
        db.blocking(|c| {
            insert_pairing_code(c, "c1", 0, 300)?;
            assert!(matches!(complete_pairing(c, "c1", 1, &dev)?, Paired::Stored(d) if d.sign_count == 2));
            assert_eq!(advance_sign_count(c, "web1", &[2; 91], 2)?, None, "a repeated count");
            assert_eq!(advance_sign_count(c, "web1", &[2; 91], 1)?, None, "a lower count");
            assert_eq!(advance_sign_count(c, "web1", &[9; 91], 3)?, None, "another key");
            assert_eq!(advance_sign_count(c, "web1", &[2; 91], 3)?, Some(2));
            restore_sign_count(c, "web1", 3, 2)?;
            assert_eq!(get_device(c, "web1")?.unwrap().sign_count, 2, "put back");
            assert_eq!(advance_sign_count(c, "web1", &[2; 91], 5)?, Some(2));
            restore_sign_count(c, "web1", 3, 2)?;
            assert_eq!(get_device(c, "web1")?.unwrap().sign_count, 5, "a later count stays");
            revoke_device(c, "web1")?;
            assert_eq!(advance_sign_count(c, "web1", &[2; 91], 6)?, None, "revoked");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_row_is_updated_only_by_its_own_public_key() {
        let (_d, db) = db();
        let dev = |pk: u8, name: &str| NewDevice {
            device_id: "dev1".into(),
            device_name: name.into(),
            public_key: vec![pk; 32],
            approval_public_key: vec![pk + 1; 32],
            approval_key_alg: ApprovalAlg::Ed25519,
            webauthn: None,
        };
        let mut db2 = db.clone();
        let _ = &mut db2;
        db.blocking(|c| {
            insert_pairing_code(c, "c1", 0, 300)?;
            insert_pairing_code(c, "c2", 0, 300)?;
            insert_pairing_code(c, "c3", 0, 300)?;
            assert!(matches!(complete_pairing(c, "c1", 1, &dev(1, "phone"))?, Paired::Stored(_)));
            assert!(matches!(
                complete_pairing(c, "c2", 2, &dev(7, "attacker"))?,
                Paired::KeyMismatch
            ));
            let d = get_device(c, "dev1")?.unwrap();
            assert_eq!((d.device_name.as_str(), d.public_key[0], d.approval_public_key[0]), ("phone", 1, 2));
            assert!(code_is_live(c, "c2", 3)?, "a refused pairing does not use the code");
            assert!(matches!(complete_pairing(c, "c3", 3, &dev(1, "renamed"))?, Paired::Stored(d) if d.device_name == "renamed"));
            Ok(())
        })
        .unwrap();
    }
}
