//! The local IoT Core's own shadow documents on SQLite, so shadows outlive a restart of
//! `fleetctl local` as they outlive anything on AWS. Not a port: only the local Device Shadow
//! service (`fleet_local::shadow`) reads and writes them. A deleted shadow keeps its row (no
//! document, its last version and when it was deleted) so a shadow created again within 48
//! hours continues its version numbers, as AWS does.

use rusqlite::params;

use super::SqliteStore;
use crate::error::StoreError;

/// Migration step 5 (see `MIGRATIONS` in `sqlite.rs`).
pub(super) const LOCAL_SHADOWS_SCHEMA: &str = "
CREATE TABLE local_shadows (
    thing         TEXT    NOT NULL,
    shadow        TEXT    NOT NULL, -- '' = the classic shadow
    version       INTEGER NOT NULL,
    document      TEXT,             -- the shadow as the service keeps it; NULL once deleted
    deleted_at_ms INTEGER,
    seq           INTEGER NOT NULL, -- the service's change counter: a row only moves forward
    PRIMARY KEY (thing, shadow)
) WITHOUT ROWID;
";

/// One shadow of the local IoT Core, or the trace of a deleted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalShadow {
    pub thing: String,
    pub shadow: String,
    pub version: u64,
    /// The document (JSON); `None` for a deleted shadow.
    pub document: Option<String>,
    pub deleted_at_ms: Option<i64>,
    /// The service's change counter when this was written (increasing across restarts):
    /// writes that arrive out of order never move a row back.
    pub seq: u64,
}

impl SqliteStore {
    /// Every shadow and deleted-shadow trace (read once when the local IoT Core starts).
    pub async fn local_shadows(&self) -> Result<Vec<LocalShadow>, StoreError> {
        self.with("sqlite local shadows", |c| {
            let mut stmt =
                c.prepare("SELECT thing, shadow, version, document, deleted_at_ms, seq FROM local_shadows")?;
            let rows = stmt.query_map([], |r| {
                Ok(LocalShadow {
                    thing: r.get(0)?,
                    shadow: r.get(1)?,
                    version: r.get::<_, i64>(2)?.max(0) as u64,
                    document: r.get(3)?,
                    deleted_at_ms: r.get(4)?,
                    seq: r.get::<_, i64>(5)?.max(0) as u64,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Store what one request left. Requests persist concurrently, so a row only moves
    /// forward: a write whose `seq` is not above the stored one changes nothing (`false`).
    pub async fn save_local_shadow(&self, s: LocalShadow) -> Result<bool, StoreError> {
        self.with("sqlite local shadow save", move |c| {
            let changed = c
                .prepare_cached(
                    "INSERT INTO local_shadows (thing, shadow, version, document, deleted_at_ms, seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (thing, shadow) DO UPDATE SET
                         version = excluded.version, document = excluded.document,
                         deleted_at_ms = excluded.deleted_at_ms, seq = excluded.seq
                     WHERE excluded.seq > local_shadows.seq",
                )?
                .execute(params![
                    s.thing,
                    s.shadow,
                    s.version as i64,
                    s.document,
                    s.deleted_at_ms,
                    s.seq as i64
                ])?;
            Ok(changed == 1)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: u64, version: u64, text: Option<&str>) -> LocalShadow {
        LocalShadow {
            thing: "d1".into(),
            shadow: String::new(),
            version,
            document: text.map(str::to_owned),
            deleted_at_ms: text.is_none().then_some(5),
            seq,
        }
    }

    #[tokio::test]
    async fn a_late_older_write_never_replaces_a_newer_one() -> Result<(), StoreError> {
        // GIVEN the delete of version 2 stored (change 3)
        let store = SqliteStore::in_memory()?;
        assert!(store.save_local_shadow(row(3, 2, None)).await?);
        // WHEN the writes of changes 1 and 2 arrive late
        assert!(!store.save_local_shadow(row(1, 1, Some("v1"))).await?);
        assert!(!store.save_local_shadow(row(2, 2, Some("v2"))).await?);
        // THEN the delete is what is stored; a shadow created again (change 4) replaces it
        assert_eq!(store.local_shadows().await?, vec![row(3, 2, None)]);
        assert!(store.save_local_shadow(row(4, 1, Some("new"))).await?);
        assert_eq!(store.local_shadows().await?, vec![row(4, 1, Some("new"))]);
        Ok(())
    }
}
