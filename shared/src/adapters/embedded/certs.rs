//! [`Allowlist`], [`CertificateInventory`] and [`ProvisioningAudit`] on SQLite: the allowlist
//! by serial number, certificates with an index on `not_after_ms` (the daily check's window
//! is one index range), the audit trail, and per-claim counters of unknown serials.

use rusqlite::{params, OptionalExtension, Row};

use super::SqliteStore;
use crate::error::StoreError;
use crate::model::{AllowlistEntry, Certificate, CertificateId, Enrolment, ThingName};
use crate::ports::{
    rotation_settled, Allowlist, AuditEvent, CertMark, CertMarks, CertificateInventory, DeviceCertStatus,
    Enrolled, ProvisioningAudit, Reports,
};

/// Migration step 7 (see `MIGRATIONS` in `sqlite.rs`).
pub(super) const CERTS_SCHEMA: &str = "
CREATE TABLE allowlist (
    serial TEXT    NOT NULL PRIMARY KEY,
    entry  TEXT    NOT NULL -- the AllowlistEntry as JSON
) WITHOUT ROWID;
CREATE TABLE certificates (
    id           TEXT    NOT NULL PRIMARY KEY,
    not_after_ms INTEGER NOT NULL,
    cert         TEXT    NOT NULL -- the Certificate as JSON
) WITHOUT ROWID;
CREATE INDEX certificates_by_expiry ON certificates (not_after_ms);
CREATE TABLE provisioning_audit (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    serial TEXT    NOT NULL,
    event  TEXT    NOT NULL -- the AuditEvent as JSON
);
CREATE INDEX provisioning_audit_by_serial ON provisioning_audit (serial, seq);
CREATE TABLE claim_unknown_serials (
    claim   TEXT    NOT NULL PRIMARY KEY,
    count   INTEGER NOT NULL,
    last_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Migration step 8: what the daily expiry check said about each device's certificate.
pub(super) const CERT_STATUS_SCHEMA: &str = "
CREATE TABLE device_cert_status (
    thing TEXT NOT NULL PRIMARY KEY,
    mark  TEXT NOT NULL -- the CertMark as JSON
) WITHOUT ROWID;
";

/// The daily check's read: one range of the `notAfter` index.
const EXPIRING_SQL: &str = "SELECT cert FROM certificates WHERE not_after_ms >= ?1 AND not_after_ms < ?2
                            ORDER BY not_after_ms, id LIMIT ?3";

fn json_col<T: serde::de::DeserializeOwned>(r: &Row<'_>, i: usize) -> rusqlite::Result<T> {
    let text: String = r.get(i)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))
}

fn to_json<T: serde::Serialize>(op: &'static str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::permanent(op, e))
}

fn entry_of(c: &rusqlite::Connection, serial: &str) -> rusqlite::Result<Option<AllowlistEntry>> {
    c.prepare_cached("SELECT entry FROM allowlist WHERE serial = ?1")?
        .query_row([serial], |r| json_col(r, 0))
        .optional()
}

fn put_entry(c: &rusqlite::Connection, e: &AllowlistEntry) -> rusqlite::Result<()> {
    let json =
        serde_json::to_string(e).map_err(|err| rusqlite::Error::ToSqlConversionFailure(Box::new(err)))?;
    c.prepare_cached("INSERT INTO allowlist (serial, entry) VALUES (?1, ?2) ON CONFLICT (serial) DO UPDATE SET entry = excluded.entry")?
        .execute(params![e.serial.as_str(), json])?;
    Ok(())
}

impl Allowlist for SqliteStore {
    async fn entry(&self, serial: &ThingName) -> Result<Option<AllowlistEntry>, StoreError> {
        let serial = serial.to_string();
        self.with("sqlite allowlist get", move |c| entry_of(c, &serial)).await
    }

    async fn allow(&self, entries: &[AllowlistEntry]) -> Result<(), StoreError> {
        let entries = entries.to_vec();
        self.with("sqlite allowlist add", move |c| {
            let tx = c.transaction()?;
            for e in entries {
                let kept = match entry_of(&tx, e.serial.as_str())? {
                    Some(old) => AllowlistEntry { enrolment: old.enrolment, added_ms: old.added_ms, ..e },
                    None => e,
                };
                put_entry(&tx, &kept)?;
            }
            tx.commit()
        })
        .await
    }

    async fn disallow(&self, serial: &ThingName) -> Result<bool, StoreError> {
        let serial = serial.to_string();
        self.with("sqlite allowlist remove", move |c| {
            let tx = c.transaction()?;
            let removable =
                matches!(entry_of(&tx, &serial)?, Some(AllowlistEntry { enrolment: Enrolment::Allowed, .. }));
            if removable {
                tx.execute("DELETE FROM allowlist WHERE serial = ?1", [&serial])?;
            }
            tx.commit()?;
            Ok(removable)
        })
        .await
    }

    async fn entries(
        &self,
        after: Option<&ThingName>,
        limit: usize,
    ) -> Result<Vec<AllowlistEntry>, StoreError> {
        let after = after.map(ToString::to_string).unwrap_or_default();
        self.with("sqlite allowlist list", move |c| {
            let mut st =
                c.prepare_cached("SELECT entry FROM allowlist WHERE serial > ?1 ORDER BY serial LIMIT ?2")?;
            let rows = st.query_map(params![after, limit as i64], |r| json_col(r, 0))?;
            rows.collect()
        })
        .await
    }

    async fn enrol(
        &self,
        serial: &ThingName,
        certificate: &CertificateId,
        at_ms: i64,
    ) -> Result<Enrolled, StoreError> {
        let (serial, certificate) = (serial.clone(), certificate.clone());
        self.with("sqlite allowlist enrol", move |c| {
            let tx = c.transaction()?;
            let outcome =
                match entry_of(&tx, serial.as_str())? {
                    None => Enrolled::Unknown,
                    Some(AllowlistEntry { enrolment: Enrolment::Decommissioned { .. }, .. }) => {
                        Enrolled::Decommissioned
                    }
                    Some(AllowlistEntry {
                        enrolment: Enrolment::Provisioned { certificate: c, .. }, ..
                    }) if c != certificate => Enrolled::Taken(c),
                    Some(AllowlistEntry { enrolment: Enrolment::Provisioned { .. }, .. }) => Enrolled::Yes,
                    Some(e) => {
                        let thing = serial.clone();
                        put_entry(
                            &tx,
                            &AllowlistEntry {
                                enrolment: Enrolment::Provisioned { thing, certificate, at_ms },
                                ..e
                            },
                        )?;
                        Enrolled::Yes
                    }
                };
            tx.commit()?;
            Ok(outcome)
        })
        .await
    }

    async fn rotate(
        &self,
        serial: &ThingName,
        from: &CertificateId,
        to: &CertificateId,
        at_ms: i64,
    ) -> Result<Enrolled, StoreError> {
        let (serial, from, to) = (serial.clone(), from.clone(), to.clone());
        self.with("sqlite allowlist rotate", move |c| {
            let tx = c.transaction()?;
            let outcome = match entry_of(&tx, serial.as_str())? {
                None => Enrolled::Unknown,
                Some(e) => match rotation_settled(&e.enrolment, &from, &to) {
                    Some(settled) => settled,
                    None => {
                        let enrolment =
                            Enrolment::Provisioned { thing: serial.clone(), certificate: to, at_ms };
                        put_entry(&tx, &AllowlistEntry { enrolment, ..e })?;
                        Enrolled::Yes
                    }
                },
            };
            tx.commit()?;
            Ok(outcome)
        })
        .await
    }

    async fn reset(&self, serial: &ThingName) -> Result<bool, StoreError> {
        let serial = serial.to_string();
        self.with("sqlite allowlist reset", move |c| {
            let tx = c.transaction()?;
            let reset = match entry_of(&tx, &serial)? {
                Some(e @ AllowlistEntry { enrolment: Enrolment::Provisioned { .. }, .. }) => {
                    put_entry(&tx, &AllowlistEntry { enrolment: Enrolment::Allowed, ..e })?;
                    true
                }
                _ => false,
            };
            tx.commit()?;
            Ok(reset)
        })
        .await
    }

    async fn decommission(
        &self,
        serial: &ThingName,
        at_ms: i64,
    ) -> Result<Option<AllowlistEntry>, StoreError> {
        let serial = serial.to_string();
        self.with("sqlite allowlist decommission", move |c| {
            let tx = c.transaction()?;
            let before = entry_of(&tx, &serial)?;
            if let Some(e) = &before {
                put_entry(
                    &tx,
                    &AllowlistEntry { enrolment: Enrolment::Decommissioned { at_ms }, ..e.clone() },
                )?;
            }
            tx.commit()?;
            Ok(before)
        })
        .await
    }
}

impl CertificateInventory for SqliteStore {
    async fn record(&self, cert: &Certificate) -> Result<(), StoreError> {
        self.record_many(std::slice::from_ref(cert)).await
    }

    async fn record_many(&self, certs: &[Certificate]) -> Result<(), StoreError> {
        let rows = certs
            .iter()
            .map(|c| Ok((c.id.to_string(), c.not_after_ms, to_json("sqlite certificate encode", c)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.with("sqlite certificate put", move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO certificates (id, not_after_ms, cert) VALUES (?1, ?2, ?3)
                     ON CONFLICT (id) DO UPDATE SET not_after_ms = excluded.not_after_ms, cert = excluded.cert",
                )?;
                for (id, not_after_ms, json) in rows {
                    st.execute(params![id, not_after_ms, json])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn certificate(&self, id: &CertificateId) -> Result<Option<Certificate>, StoreError> {
        let id = id.to_string();
        self.with("sqlite certificate get", move |c| {
            c.prepare_cached("SELECT cert FROM certificates WHERE id = ?1")?
                .query_row([id], |r| json_col(r, 0))
                .optional()
        })
        .await
    }

    async fn expiring(&self, from_ms: i64, to_ms: i64, limit: usize) -> Result<Vec<Certificate>, StoreError> {
        self.with("sqlite certificates expiring", move |c| {
            let mut st = c.prepare_cached(EXPIRING_SQL)?;
            let rows = st.query_map(params![from_ms, to_ms, limit as i64], |r| json_col(r, 0))?;
            rows.collect()
        })
        .await
    }
}

impl ProvisioningAudit for SqliteStore {
    async fn audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let json = to_json("sqlite audit encode", event)?;
        let serial = event.serial.clone();
        self.with("sqlite audit append", move |c| {
            c.prepare_cached("INSERT INTO provisioning_audit (serial, event) VALUES (?1, ?2)")?
                .execute(params![serial, json])?;
            Ok(())
        })
        .await
    }

    async fn unknown_serial(&self, claim: &str, at_ms: i64) -> Result<u64, StoreError> {
        let claim = claim.to_owned();
        self.with("sqlite claim counter", move |c| {
            c.prepare_cached(
                "INSERT INTO claim_unknown_serials (claim, count, last_ms) VALUES (?1, 1, ?2)
                 ON CONFLICT (claim) DO UPDATE SET count = count + 1, last_ms = excluded.last_ms
                 RETURNING count",
            )?
            .query_row(params![claim, at_ms], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
        })
        .await
    }

    async fn trail(&self, serial: &str) -> Result<Vec<AuditEvent>, StoreError> {
        let serial = serial.to_owned();
        self.with("sqlite audit trail", move |c| {
            let mut st =
                c.prepare_cached("SELECT event FROM provisioning_audit WHERE serial = ?1 ORDER BY seq")?;
            let rows = st.query_map([serial], |r| json_col(r, 0))?;
            rows.collect()
        })
        .await
    }

    async fn suspicious_claims(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let at_least = crate::certs::hook::SUSPICIOUS_UNKNOWN_SERIALS;
        self.with("sqlite suspicious claims", move |c| {
            let mut st = c.prepare_cached(
                "SELECT claim, count FROM claim_unknown_serials WHERE count >= ?1 ORDER BY count DESC, claim",
            )?;
            let rows =
                st.query_map([at_least as i64], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
            rows.collect()
        })
        .await
    }
}

impl DeviceCertStatus for SqliteStore {
    async fn mark_cert_status(&self, marks: &[(ThingName, CertMark)]) -> Result<(), StoreError> {
        let rows = marks
            .iter()
            .map(|(t, m)| Ok((t.to_string(), to_json("sqlite cert status encode", m)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.with("sqlite cert status put", move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO device_cert_status (thing, mark) VALUES (?1, ?2)
                     ON CONFLICT (thing) DO UPDATE SET mark = excluded.mark",
                )?;
                for (thing, mark) in rows {
                    st.execute(params![thing, mark])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn clear_cert_status(&self, things: &[ThingName]) -> Result<(), StoreError> {
        let things: Vec<String> = things.iter().map(ToString::to_string).collect();
        self.with("sqlite cert status clear", move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached("DELETE FROM device_cert_status WHERE thing = ?1")?;
                for thing in things {
                    st.execute([thing])?;
                }
            }
            tx.commit()
        })
        .await
    }
}

impl CertMarks for SqliteStore {
    async fn rotation_due(&self) -> Result<Vec<(ThingName, CertMark)>, StoreError> {
        let marks: Vec<(String, CertMark)> = self
            .with("sqlite cert status due", |c| {
                let mut st = c.prepare_cached("SELECT thing, mark FROM device_cert_status ORDER BY thing")?;
                let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, json_col(r, 1)?)))?;
                rows.collect()
            })
            .await?;
        marks
            .into_iter()
            .filter(|(_, m)| m.rotation_due)
            .map(|(t, m)| {
                let thing =
                    ThingName::parse(&t).map_err(|e| StoreError::permanent("sqlite cert status due", e))?;
                Ok((thing, m))
            })
            .collect()
    }

    async fn cert_status(&self, thing: &ThingName) -> Result<Option<CertMark>, StoreError> {
        let thing = thing.to_string();
        self.with("sqlite cert status get", move |c| {
            c.prepare_cached("SELECT mark FROM device_cert_status WHERE thing = ?1")?
                .query_row([thing], |r| json_col(r, 0))
                .optional()
        })
        .await
    }
}

impl Reports for SqliteStore {
    async fn put_report(&self, key: &str, json: &[u8]) -> Result<(), StoreError> {
        let (key, body) = (key.to_owned(), json.to_vec());
        self.with("sqlite report put", move |c| {
            c.prepare_cached("INSERT OR REPLACE INTO archive (key, body, lines) VALUES (?1, ?2, 1)")?
                .execute(params![key, body])
                .map(drop)
        })
        .await
    }

    async fn report(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.with("sqlite report get", move |c| {
            c.prepare_cached("SELECT body FROM archive WHERE key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_expiry_window_is_one_range_of_the_not_after_index_never_a_scan() -> Result<(), StoreError> {
        let store = SqliteStore::in_memory()?;
        let plan: Vec<String> = store
            .with("explain", |c| {
                let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {EXPIRING_SQL}"))?;
                let rows = st.query_map(params![0i64, 1i64, 10i64], |r| r.get::<_, String>(3))?;
                rows.collect()
            })
            .await?;
        let plan = plan.join(" / ");
        assert!(plan.contains("USING INDEX certificates_by_expiry"), "{plan}");
        assert!(!plan.contains("SCAN certificates ") && !plan.ends_with("SCAN certificates"), "{plan}");
        Ok(())
    }
}
