//! Paired devices and one-time pairing codes in `agent.db`.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::StorageError;
use crate::auth::keys::{ApprovalAlg, random_bytes, sha256_hex};

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
        })
    }
}

const DEVICE_COLS: &str = "device_id, device_name, public_key, approval_public_key, approval_key_alg, paired_at, last_seen, revoked";

pub fn get_device(c: &Connection, device_id: &str) -> Result<Option<Device>, StorageError> {
    let sql = format!("SELECT {DEVICE_COLS} FROM devices WHERE device_id = ?1");
    Ok(c.query_row(&sql, [device_id], Device::from_row)
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
    c.execute(
        "UPDATE devices SET last_seen = ?2 WHERE device_id = ?1",
        params![device_id, now_ms],
    )?;
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
}

const CODE_ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The form a code is looked up by: upper case, no dashes or spaces.
fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase()
}

fn code_hash(code: &str) -> String {
    sha256_hex(normalize_code(code).as_bytes())
}

/// Creates a one-time code `XXXX-XXXX` (Crockford base32, 40 bits). Only its
/// hash is stored.
pub fn create_pairing_code(
    c: &Connection,
    now_ms: i64,
    ttl_secs: u64,
) -> Result<(String, i64), StorageError> {
    let raw = random_bytes::<8>();
    let chars: String = raw
        .iter()
        .map(|b| CODE_ALPHABET[(*b as usize) % 32] as char)
        .collect();
    let code = format!("{}-{}", &chars[..4], &chars[4..]);
    let expires_at = now_ms + (ttl_secs as i64) * 1000;
    c.execute(
        "INSERT INTO pairing_codes(code_hash, created_at, expires_at) VALUES (?1, ?2, ?3)",
        params![code_hash(&code), now_ms, expires_at],
    )?;
    // Keep the table small: forget codes that can no longer be used.
    c.execute(
        "DELETE FROM pairing_codes WHERE state != 'live' OR expires_at < ?1",
        [now_ms - 86_400_000],
    )?;
    Ok((code, expires_at))
}

/// Whether `code` is live: known, unused, unexpired, not burnt.
pub fn code_is_live(c: &Connection, code: &str, now_ms: i64) -> Result<bool, StorageError> {
    let n: i64 = c.query_row(
        "SELECT COUNT(*) FROM pairing_codes WHERE code_hash = ?1 AND state = 'live' AND expires_at > ?2 AND failures < ?3",
        params![code_hash(code), now_ms, MAX_PAIR_FAILURES],
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

/// Uses `code` and stores the device, in one transaction. A public key that
/// is already paired (even revoked) gets the new name and approval key and
/// is active again. Returns None if the code is no longer live.
pub fn complete_pairing(
    c: &mut Connection,
    code: &str,
    now_ms: i64,
    dev: &NewDevice,
) -> Result<Option<Device>, StorageError> {
    let tx = c.transaction()?;
    let used = tx.execute(
        "UPDATE pairing_codes SET state = 'used' WHERE code_hash = ?1 AND state = 'live' AND expires_at > ?2 AND failures < ?3",
        params![code_hash(code), now_ms, MAX_PAIR_FAILURES],
    )?;
    if used == 0 {
        return Ok(None);
    }
    tx.execute(
        "INSERT INTO devices(device_id, device_name, public_key, approval_public_key, approval_key_alg, paired_at, last_seen, revoked)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 0)
         ON CONFLICT(device_id) DO UPDATE SET device_name = excluded.device_name,
             approval_public_key = excluded.approval_public_key, approval_key_alg = excluded.approval_key_alg,
             last_seen = excluded.last_seen, revoked = 0",
        params![
            dev.device_id,
            dev.device_name,
            dev.public_key,
            dev.approval_public_key,
            dev.approval_key_alg.as_str(),
            now_ms
        ],
    )?;
    let device = get_device(&tx, &dev.device_id)?;
    tx.commit()?;
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Db;

    fn db() -> (tempfile::TempDir, Db) {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("agent.db")).unwrap();
        (d, db)
    }

    #[test]
    fn codes_are_stored_hashed_and_normalised() {
        let (_d, db) = db();
        db.blocking(|c| {
            let (code, _) = create_pairing_code(c, 1000, 300)?;
            let stored: String =
                c.query_row("SELECT code_hash FROM pairing_codes", [], |r| r.get(0))?;
            assert!(!stored.contains(&code[..4]));
            assert!(code_is_live(c, &code, 2000)?);
            assert!(code_is_live(
                c,
                &code.to_lowercase().replace('-', ""),
                2000
            )?);
            assert!(!code_is_live(c, &code, 1000 + 300_000)?, "expired");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn five_failures_burn_every_live_code() {
        let (_d, db) = db();
        db.blocking(|c| {
            let (a, _) = create_pairing_code(c, 0, 300)?;
            let (b, _) = create_pairing_code(c, 0, 300)?;
            for _ in 0..4 {
                assert_eq!(record_pair_failure(c, 1)?, 0);
            }
            assert!(code_is_live(c, &a, 1)?);
            assert_eq!(record_pair_failure(c, 1)?, 2);
            assert!(!code_is_live(c, &a, 1)? && !code_is_live(c, &b, 1)?);
            let (fresh, _) = create_pairing_code(c, 2, 300)?;
            assert!(
                code_is_live(c, &fresh, 3)?,
                "a code made after the burn is live"
            );
            Ok(())
        })
        .unwrap();
    }
}
