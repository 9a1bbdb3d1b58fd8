//! Approvals in `agent.db`: what restart expiry and the record of decisions
//! need. A row never holds a `challenge` (nor a commitment key, which is in
//! no request).

use rusqlite::{Connection, OptionalExtension, params};

use super::StorageError;

/// An approval that was pending when the server stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleApproval {
    pub approval_id: String,
    /// The `approval_request` object as stored (without `challenge`).
    pub request_json: String,
}

/// Stores a new pending approval.
pub fn insert_pending(
    c: &Connection,
    approval_id: &str,
    request_json: &str,
    created_at: i64,
    expires_at: i64,
) -> Result<(), StorageError> {
    c.execute(
        "INSERT INTO approvals(approval_id, request_json, status, created_at, expires_at) VALUES (?1, ?2, 'pending', ?3, ?4)",
        params![approval_id, request_json, created_at, expires_at],
    )?;
    Ok(())
}

/// Records a decision: `status` is `approved`, `denied` or `expired`;
/// `decided_by` the device whose approval key signed, if any.
pub fn record_decision(
    c: &Connection,
    approval_id: &str,
    status: &str,
    decided_at: i64,
    decided_by: Option<&str>,
) -> Result<(), StorageError> {
    c.execute(
        "UPDATE approvals SET status = ?2, decided_at = ?3, decided_by = ?4 WHERE approval_id = ?1",
        params![approval_id, status, decided_at, decided_by],
    )?;
    Ok(())
}

/// An approval's stored status (`pending`, `approved`, `denied`,
/// `expired`) and the device that decided it, if the row exists.
pub fn status(
    c: &Connection,
    approval_id: &str,
) -> Result<Option<(String, Option<String>)>, StorageError> {
    Ok(c.query_row(
        "SELECT status, decided_by FROM approvals WHERE approval_id = ?1",
        [approval_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?)
}

/// At start: every approval still pending is expired (never run), in one
/// transaction, and rows written before v1.1 lose the `challenge` they kept.
/// Returns the approvals it expired.
pub fn expire_pending_at_start(
    c: &mut Connection,
    now_ms: i64,
) -> Result<Vec<StaleApproval>, StorageError> {
    let tx = c.transaction()?;
    let stale: Vec<StaleApproval> = {
        let mut st =
            tx.prepare("SELECT approval_id, request_json FROM approvals WHERE status = 'pending'")?;
        st.query_map([], |r| {
            Ok(StaleApproval {
                approval_id: r.get(0)?,
                request_json: r.get(1)?,
            })
        })?
        .collect::<Result<_, _>>()?
    };
    tx.execute(
        "UPDATE approvals SET status = 'expired', decided_at = ?1 WHERE status = 'pending'",
        [now_ms],
    )?;
    tx.execute(
        "UPDATE approvals SET request_json = json_remove(request_json, '$.challenge') WHERE json_extract(request_json, '$.challenge') IS NOT NULL",
        [],
    )?;
    tx.commit()?;
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(c: &Connection, id: &str) -> (String, Option<i64>, Option<String>) {
        c.query_row(
            "SELECT status, decided_at, decided_by FROM approvals WHERE approval_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    }

    #[test]
    fn pending_rows_are_decided_or_expired_at_start() {
        let (_dir, db) = crate::storage::temp_db();
        db.blocking(|c| {
            insert_pending(c, "apr_a", r#"{"approval_id":"apr_a"}"#, 1, 100)?;
            insert_pending(
                c,
                "apr_b",
                r#"{"approval_id":"apr_b","challenge":"x"}"#,
                2,
                100,
            )?;
            insert_pending(c, "apr_c", r#"{"approval_id":"apr_c"}"#, 3, 100)?;
            record_decision(c, "apr_a", "approved", 5, Some("dev1"))?;
            assert_eq!(
                decided(c, "apr_a"),
                ("approved".into(), Some(5), Some("dev1".into()))
            );
            assert_eq!(
                status(c, "apr_a")?,
                Some(("approved".into(), Some("dev1".into())))
            );
            assert_eq!(status(c, "apr_nope")?, None);
            let stale = expire_pending_at_start(c, 9)?;
            let ids: Vec<_> = stale.iter().map(|s| s.approval_id.as_str()).collect();
            assert_eq!(ids.len(), 2);
            assert!(ids.contains(&"apr_b") && ids.contains(&"apr_c"));
            assert_eq!(decided(c, "apr_b"), ("expired".into(), Some(9), None));
            assert_eq!(decided(c, "apr_a").0, "approved", "decided rows stay");
            let kept: String = c.query_row(
                "SELECT request_json FROM approvals WHERE approval_id = 'apr_b'",
                [],
                |r| r.get(0),
            )?;
            assert!(!kept.contains("challenge"), "{kept}");
            assert!(expire_pending_at_start(c, 10)?.is_empty());
            Ok(())
        })
        .unwrap();
    }
}
