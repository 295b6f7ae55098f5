//! The local IoT Core's certificate registry on SQLite: the certificates it issued (fleet
//! provisioning's CreateKeysAndCertificate) or was given, their status, and the things each is
//! attached to. [`CertificateRegistry`] and [`CertificateControl`] read and change it as the
//! AWS adapter reads and changes AWS IoT's, so reconciliation and decommissioning run the same
//! code on one laptop. The reconciliation's cursor ([`ReconcileProgress`]) is kept here too.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::certs::parse_pem;
use crate::error::StoreError;
use crate::model::{
    CertStatus, CertificateDetail, CertificateId, CertificatePage, RegisteredCertificate, ThingName,
};
use crate::ports::{CertificateControl, CertificateRegistry, ReconcileProgress, ReconcileState};

/// Migration step 9 (see `MIGRATIONS` in `sqlite.rs`).
pub(super) const REGISTRY_SCHEMA: &str = "
CREATE TABLE local_certificates (
    id         TEXT    NOT NULL PRIMARY KEY,
    status     TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    pem        TEXT    NOT NULL
) WITHOUT ROWID;
CREATE TABLE local_thing_principals (
    thing       TEXT NOT NULL,
    certificate TEXT NOT NULL,
    PRIMARY KEY (thing, certificate)
) WITHOUT ROWID;
CREATE INDEX local_thing_principals_by_certificate ON local_thing_principals (certificate, thing);
CREATE TABLE reconcile_state (
    name  TEXT NOT NULL PRIMARY KEY,
    state TEXT NOT NULL -- the ReconcileState as JSON
) WITHOUT ROWID;
";

/// The account and region the local IoT Core's ARNs name.
pub const LOCAL_ARN_PREFIX: &str = "arn:aws:iot:local:000000000000";

/// A local certificate's ARN, as AWS writes one.
pub fn local_certificate_arn(id: &CertificateId) -> String {
    format!("{LOCAL_ARN_PREFIX}:cert/{id}")
}

fn status_of(op: &'static str, s: &str) -> Result<CertStatus, StoreError> {
    CertStatus::parse(s).ok_or_else(|| StoreError::permanent(op, format!("unknown certificate status {s:?}")))
}

impl SqliteStore {
    /// Register a certificate (PEM) in the local registry with `status`; its id, as AWS IoT
    /// gives it (SHA-256 of the DER). Registering it again keeps it as it is.
    pub async fn register_local_certificate(
        &self,
        pem: &str,
        status: CertStatus,
        at_ms: i64,
    ) -> Result<CertificateId, StoreError> {
        const OP: &str = "sqlite register certificate";
        let id = parse_pem(pem).map_err(|e| StoreError::permanent(OP, e))?.id;
        let (pem, key) = (pem.to_owned(), id.to_string());
        self.with(OP, move |c| {
            c.execute(
                "INSERT INTO local_certificates (id, status, created_ms, pem) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO NOTHING",
                params![key, status.as_str(), at_ms, pem],
            )
            .map(drop)
        })
        .await?;
        Ok(id)
    }

    /// Attach a certificate to a thing (AttachThingPrincipal).
    pub async fn attach_local_certificate(
        &self,
        thing: &ThingName,
        id: &CertificateId,
    ) -> Result<(), StoreError> {
        let (thing, id) = (thing.to_string(), id.to_string());
        self.with("sqlite attach certificate", move |c| {
            c.execute(
                "INSERT INTO local_thing_principals (thing, certificate) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![thing, id],
            )
            .map(drop)
        })
        .await
    }

    /// A certificate's status in the local registry (`None`: not registered).
    pub async fn local_certificate_status(
        &self,
        id: &CertificateId,
    ) -> Result<Option<CertStatus>, StoreError> {
        const OP: &str = "sqlite certificate status";
        let key = id.to_string();
        let status: Option<String> = self
            .with(OP, move |c| {
                c.query_row("SELECT status FROM local_certificates WHERE id = ?1", [key], |r| r.get(0))
                    .optional()
            })
            .await?;
        status.map(|s| status_of(OP, &s)).transpose()
    }
}

impl CertificateRegistry for SqliteStore {
    async fn list_certificates(
        &self,
        marker: Option<&str>,
        page_size: usize,
    ) -> Result<CertificatePage, StoreError> {
        const OP: &str = "sqlite list certificates";
        let after = marker.unwrap_or_default().to_owned();
        let size = page_size.max(1);
        let rows: Vec<(String, String, i64)> = self
            .with(OP, move |c| {
                let mut st = c.prepare_cached(
                    "SELECT id, status, created_ms FROM local_certificates WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?;
                let rows = st.query_map(params![after, size as i64 + 1], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect()
            })
            .await?;
        let more = rows.len() > size;
        let mut certificates = Vec::with_capacity(size.min(rows.len()));
        for (id, status, created_ms) in rows.into_iter().take(size) {
            let id = CertificateId::parse(&id).map_err(|e| StoreError::permanent(OP, e))?;
            certificates.push(RegisteredCertificate {
                arn: local_certificate_arn(&id),
                id,
                status: status_of(OP, &status)?,
                created_ms,
            });
        }
        let next = if more { certificates.last().map(|c| c.id.to_string()) } else { None };
        Ok(CertificatePage { certificates, next })
    }

    async fn describe_certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<CertificateDetail>, StoreError> {
        const OP: &str = "sqlite describe certificate";
        let key = id.to_string();
        let row: Option<(String, i64, String)> = self
            .with(OP, move |c| {
                c.query_row(
                    "SELECT status, created_ms, pem FROM local_certificates WHERE id = ?1",
                    [key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
            })
            .await?;
        row.map(|(status, created_ms, pem)| {
            Ok(CertificateDetail {
                listed: RegisteredCertificate {
                    id: id.clone(),
                    arn: local_certificate_arn(id),
                    status: status_of(OP, &status)?,
                    created_ms,
                },
                pem,
            })
        })
        .transpose()
    }

    async fn certificate_things(&self, arn: &str) -> Result<Vec<ThingName>, StoreError> {
        const OP: &str = "sqlite certificate things";
        let Some(id) = CertificateId::of_arn(arn) else { return Ok(Vec::new()) };
        let key = id.to_string();
        let names: Vec<String> = self
            .with(OP, move |c| {
                let mut st = c.prepare_cached(
                    "SELECT thing FROM local_thing_principals WHERE certificate = ?1 ORDER BY thing",
                )?;
                let rows = st.query_map([key], |r| r.get(0))?;
                rows.collect()
            })
            .await?;
        names.iter().map(|n| ThingName::parse(n).map_err(|e| StoreError::permanent(OP, e))).collect()
    }

    async fn thing_certificates(&self, thing: &ThingName) -> Result<Vec<CertificateId>, StoreError> {
        const OP: &str = "sqlite thing certificates";
        let key = thing.to_string();
        let ids: Vec<String> = self
            .with(OP, move |c| {
                let mut st = c.prepare_cached(
                    "SELECT certificate FROM local_thing_principals WHERE thing = ?1 ORDER BY certificate",
                )?;
                let rows = st.query_map([key], |r| r.get(0))?;
                rows.collect()
            })
            .await?;
        ids.iter().map(|i| CertificateId::parse(i).map_err(|e| StoreError::permanent(OP, e))).collect()
    }
}

impl CertificateControl for SqliteStore {
    async fn set_certificate_status(&self, id: &CertificateId, status: CertStatus) -> Result<(), StoreError> {
        const OP: &str = "sqlite update certificate";
        let key = id.to_string();
        let changed = self
            .with(OP, move |c| {
                c.execute(
                    "UPDATE local_certificates SET status = ?2 WHERE id = ?1",
                    params![key, status.as_str()],
                )
            })
            .await?;
        if changed == 0 {
            return Err(StoreError::permanent(OP, format!("no certificate {id} in the local registry")));
        }
        Ok(())
    }
}

impl ReconcileProgress for SqliteStore {
    async fn reconcile_state(&self) -> Result<Option<ReconcileState>, StoreError> {
        const OP: &str = "sqlite reconcile state get";
        let json: Option<String> = self
            .with(OP, |c| {
                c.query_row("SELECT state FROM reconcile_state WHERE name = 'certificates'", [], |r| r.get(0))
                    .optional()
            })
            .await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| StoreError::permanent(OP, e))).transpose()
    }

    async fn save_reconcile_state(&self, state: &ReconcileState) -> Result<(), StoreError> {
        const OP: &str = "sqlite reconcile state put";
        let json = serde_json::to_string(state).map_err(|e| StoreError::permanent(OP, e))?;
        self.with(OP, move |c| {
            c.execute(
                "INSERT INTO reconcile_state (name, state) VALUES ('certificates', ?1)
                 ON CONFLICT (name) DO UPDATE SET state = excluded.state",
                [json],
            )
            .map(drop)
        })
        .await
    }
}

/// Migration step 10 (see `MIGRATIONS` in `sqlite.rs`): the local IoT Core's things (CreateThing,
/// as fleet provisioning's templates create them) and its own credentials (the local CA's
/// certificate and key, the claim certificate), kept so certificates it issued stay verifiable
/// across restarts.
pub(super) const LOCAL_THINGS_SCHEMA: &str = "
CREATE TABLE local_things (
    name       TEXT    NOT NULL PRIMARY KEY,
    attributes TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE local_credentials (
    name       TEXT    NOT NULL PRIMARY KEY,
    cert_pem   TEXT    NOT NULL,
    key_pem    TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// A thing in the local IoT Core's registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalThing {
    pub name: ThingName,
    /// The thing's attributes (AttributePayload), name → value.
    pub attributes: std::collections::BTreeMap<String, String>,
    pub created_ms: i64,
}

/// A certificate and its private key (PEM), as the local IoT Core keeps its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCredentials {
    pub cert_pem: String,
    pub key_pem: String,
}

impl SqliteStore {
    /// Create a thing, or merge `attributes` into an existing one's (a provisioning template's
    /// `OverrideSettings: {AttributePayload: MERGE}`); the thing as stored.
    pub async fn create_local_thing(
        &self,
        thing: &ThingName,
        attributes: &std::collections::BTreeMap<String, String>,
        at_ms: i64,
    ) -> Result<LocalThing, StoreError> {
        const OP: &str = "sqlite create thing";
        let key = thing.to_string();
        let given = attributes.clone();
        let (json, created_ms): (String, i64) = self
            .with(OP, move |c| {
                let tx = c.transaction()?;
                let old: Option<(String, i64)> = tx
                    .query_row(
                        "SELECT attributes, created_ms FROM local_things WHERE name = ?1",
                        [&key],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let (mut merged, created_ms) = match old {
                    Some((json, created)) => (
                        serde_json::from_str::<std::collections::BTreeMap<String, String>>(&json)
                            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
                        created,
                    ),
                    None => (std::collections::BTreeMap::new(), at_ms),
                };
                merged.extend(given);
                let json = serde_json::to_string(&merged)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                tx.execute(
                    "INSERT INTO local_things (name, attributes, created_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET attributes = excluded.attributes",
                    params![key, json, created_ms],
                )?;
                tx.commit()?;
                Ok((json, created_ms))
            })
            .await?;
        let attributes = serde_json::from_str(&json).map_err(|e| StoreError::permanent(OP, e))?;
        Ok(LocalThing { name: thing.clone(), attributes, created_ms })
    }

    /// A thing of the local registry (`None`: no such thing).
    pub async fn local_thing(&self, thing: &ThingName) -> Result<Option<LocalThing>, StoreError> {
        const OP: &str = "sqlite describe thing";
        let key = thing.to_string();
        let row: Option<(String, i64)> = self
            .with(OP, move |c| {
                c.query_row("SELECT attributes, created_ms FROM local_things WHERE name = ?1", [key], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .await?;
        row.map(|(json, created_ms)| {
            let attributes = serde_json::from_str(&json).map_err(|e| StoreError::permanent(OP, e))?;
            Ok(LocalThing { name: thing.clone(), attributes, created_ms })
        })
        .transpose()
    }

    /// Delete a certificate that is still `PENDING_ACTIVATION` and attached to nothing (what
    /// AWS does when a fleet-provisioning ownership token expires unused); `true` if deleted.
    pub async fn delete_pending_local_certificate(&self, id: &CertificateId) -> Result<bool, StoreError> {
        let key = id.to_string();
        let deleted = self
            .with("sqlite delete pending certificate", move |c| {
                c.execute(
                    "DELETE FROM local_certificates WHERE id = ?1 AND status = ?2
                     AND NOT EXISTS (SELECT 1 FROM local_thing_principals WHERE certificate = ?1)",
                    params![key, CertStatus::PendingActivation.as_str()],
                )
            })
            .await?;
        Ok(deleted > 0)
    }

    /// Whether certificate `id` is attached to `thing`.
    pub async fn local_certificate_attached(
        &self,
        thing: &ThingName,
        id: &CertificateId,
    ) -> Result<bool, StoreError> {
        let (thing, id) = (thing.to_string(), id.to_string());
        self.with("sqlite certificate attached", move |c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM local_thing_principals WHERE thing = ?1 AND certificate = ?2)",
                params![thing, id],
                |r| r.get(0),
            )
        })
        .await
    }

    /// The local IoT Core's own credentials under `name` (`None`: not made yet).
    pub async fn local_credentials(&self, name: &str) -> Result<Option<LocalCredentials>, StoreError> {
        let key = name.to_owned();
        self.with("sqlite read credentials", move |c| {
            c.query_row("SELECT cert_pem, key_pem FROM local_credentials WHERE name = ?1", [key], |r| {
                Ok(LocalCredentials { cert_pem: r.get(0)?, key_pem: r.get(1)? })
            })
            .optional()
        })
        .await
    }

    /// Keep `made` under `name` unless credentials are kept there already; what is kept (so two
    /// processes starting on one file agree on one CA).
    pub async fn keep_local_credentials(
        &self,
        name: &str,
        made: &LocalCredentials,
        at_ms: i64,
    ) -> Result<LocalCredentials, StoreError> {
        let (key, made) = (name.to_owned(), made.clone());
        self.with("sqlite keep credentials", move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO local_credentials (name, cert_pem, key_pem, created_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO NOTHING",
                params![key, made.cert_pem, made.key_pem, at_ms],
            )?;
            let kept = tx.query_row(
                "SELECT cert_pem, key_pem FROM local_credentials WHERE name = ?1",
                [&key],
                |r| Ok(LocalCredentials { cert_pem: r.get(0)?, key_pem: r.get(1)? }),
            )?;
            tx.commit()?;
            Ok(kept)
        })
        .await
    }
}
