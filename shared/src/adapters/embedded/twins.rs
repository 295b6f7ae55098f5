//! [`TwinStore`] on SQLite: one row per (thing, shadow) holding the twin as JSON, the columns
//! the conditional write and the fleet queries need, and a partial index on the drift start.

use rusqlite::{params, OptionalExtension, Row};

use super::SqliteStore;
use crate::error::StoreError;
use crate::model::{DriftSummary, ShadowName, ThingName, Twin};
use crate::ports::{DriftCursor, TwinPolicies, TwinStore};
use crate::twin::policy::StalePolicy;

/// Migration step 3 (see `MIGRATIONS` in `sqlite.rs`).
pub(super) const TWINS_SCHEMA: &str = "
CREATE TABLE twins (
    thing          TEXT    NOT NULL,
    shadow         TEXT    NOT NULL, -- '' = the classic shadow
    version        INTEGER NOT NULL,
    revision       INTEGER NOT NULL, -- every write + 1; writes are conditional on it
    drift_since_ms INTEGER,
    twin           TEXT    NOT NULL, -- the Twin as JSON
    PRIMARY KEY (thing, shadow)
) WITHOUT ROWID;
CREATE INDEX twins_by_drift ON twins (drift_since_ms) WHERE drift_since_ms IS NOT NULL;
";

/// Migration step 4: the reported firmware, indexed for fleet queries.
pub(super) const TWINS_FW_INDEX: &str = "
ALTER TABLE twins ADD COLUMN reported_fw TEXT;
CREATE INDEX twins_by_fw ON twins (reported_fw, thing) WHERE reported_fw IS NOT NULL;
";

/// Migration step 6: stale-desired policies.
pub(super) const TWIN_POLICIES_SCHEMA: &str = "
CREATE TABLE twin_policies (
    key              TEXT    NOT NULL PRIMARY KEY,
    diverge_after_ms INTEGER NOT NULL,
    action           TEXT    NOT NULL
) WITHOUT ROWID;
";

fn twin_from_row(r: &Row<'_>) -> rusqlite::Result<Twin> {
    let text: String = r.get(0)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

impl TwinStore for SqliteStore {
    async fn twin(&self, thing: &ThingName, shadow: &ShadowName) -> Result<Option<Twin>, StoreError> {
        let (thing, shadow) = (thing.clone(), shadow.clone());
        self.with("sqlite twin get", move |c| {
            c.prepare_cached("SELECT twin FROM twins WHERE thing = ?1 AND shadow = ?2")?
                .query_row([thing.as_str(), shadow.as_str()], twin_from_row)
                .optional()
        })
        .await
    }

    async fn put_twin(&self, twin: &Twin) -> Result<bool, StoreError> {
        let json = serde_json::to_string(twin).map_err(|e| StoreError::permanent("sqlite twin encode", e))?;
        let twin = twin.clone();
        self.with("sqlite twin put", move |c| {
            let (thing, shadow) = (twin.thing.as_str(), twin.shadow.as_str());
            let revision = twin.revision as i64;
            // A first revision creates the row; any other replaces the revision before it.
            let sql = if twin.revision <= 1 {
                "INSERT INTO twins (thing, shadow, version, revision, drift_since_ms, twin, reported_fw)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (thing, shadow) DO NOTHING"
            } else {
                "UPDATE twins SET version = ?3, revision = ?4, drift_since_ms = ?5, twin = ?6, reported_fw = ?7
                 WHERE thing = ?1 AND shadow = ?2 AND revision = ?4 - 1"
            };
            let changed = c.prepare_cached(sql)?.execute(params![
                thing,
                shadow,
                twin.version as i64,
                revision,
                twin.drift_since_ms,
                json,
                twin.reported_fw()
            ])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn reporting_fw(&self, fw: &str, limit: usize) -> Result<Vec<Twin>, StoreError> {
        let fw = fw.to_owned();
        self.with("sqlite twins by fw", move |c| {
            let mut st = c.prepare_cached(
                "SELECT twin FROM twins WHERE reported_fw = ?1 ORDER BY thing, shadow LIMIT ?2",
            )?;
            let rows = st.query_map(params![fw, limit as i64], twin_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn drift_summary(&self) -> Result<DriftSummary, StoreError> {
        self.with("sqlite twins drift summary", |c| {
            c.prepare_cached(
                "SELECT count(*), min(drift_since_ms) FROM twins WHERE drift_since_ms IS NOT NULL",
            )?
            .query_row([], |r| {
                Ok(DriftSummary { drifting: r.get::<_, i64>(0)?.max(0) as u64, oldest_since_ms: r.get(1)? })
            })
        })
        .await
    }

    async fn drifting_page(
        &self,
        before_ms: i64,
        cursor: Option<DriftCursor>,
        limit: usize,
    ) -> Result<(Vec<Twin>, Option<DriftCursor>), StoreError> {
        // Keyset paging on (drift_since_ms, thing, shadow), the partial index's order.
        let after = cursor.map(|c| c.0);
        let (since, thing, shadow) = match &after {
            Some(v) => (
                v["since"].as_i64().unwrap_or(i64::MIN),
                v["thing"].as_str().unwrap_or_default().to_owned(),
                v["shadow"].as_str().unwrap_or_default().to_owned(),
            ),
            None => (i64::MIN, String::new(), String::new()),
        };
        let twins: Vec<Twin> = self
            .with("sqlite twins drifting page", move |c| {
                let mut st = c.prepare_cached(
                    "SELECT twin FROM twins WHERE drift_since_ms IS NOT NULL AND drift_since_ms <= ?1
                       AND (drift_since_ms, thing, shadow) > (?2, ?3, ?4)
                     ORDER BY drift_since_ms, thing, shadow LIMIT ?5",
                )?;
                let rows =
                    st.query_map(params![before_ms, since, thing, shadow, limit as i64], twin_from_row)?;
                rows.collect()
            })
            .await?;
        let next = match twins.last() {
            Some(t) if twins.len() == limit => Some(DriftCursor(serde_json::json!({
                "since": t.drift_since_ms, "thing": t.thing, "shadow": t.shadow,
            }))),
            _ => None,
        };
        Ok((twins, next))
    }

    async fn drifting_since(&self, before_ms: i64, limit: usize) -> Result<Vec<Twin>, StoreError> {
        self.with("sqlite twins drifting", move |c| {
            let mut st = c.prepare_cached(
                "SELECT twin FROM twins WHERE drift_since_ms IS NOT NULL AND drift_since_ms <= ?1
                 ORDER BY drift_since_ms, thing, shadow LIMIT ?2",
            )?;
            let rows = st.query_map(params![before_ms, limit as i64], twin_from_row)?;
            rows.collect()
        })
        .await
    }
}

impl TwinPolicies for SqliteStore {
    async fn policies(&self) -> Result<Vec<StalePolicy>, StoreError> {
        self.with("sqlite twin policies", |c| {
            let mut st =
                c.prepare_cached("SELECT key, diverge_after_ms, action FROM twin_policies ORDER BY key")?;
            let rows = st.query_map([], |r| {
                let (key, after, action): (String, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
                StalePolicy::stored(&key, after, &action).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn set_policy(&self, policy: &StalePolicy) -> Result<(), StoreError> {
        let p = policy.clone();
        self.with("sqlite twin policy set", move |c| {
            c.prepare_cached(
                "INSERT INTO twin_policies (key, diverge_after_ms, action) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET diverge_after_ms = excluded.diverge_after_ms, action = excluded.action",
            )?
            .execute(params![p.key, p.diverge_after_ms, p.action.as_str()])?;
            Ok(())
        })
        .await
    }

    async fn remove_policy(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_owned();
        self.with("sqlite twin policy remove", move |c| {
            Ok(c.prepare_cached("DELETE FROM twin_policies WHERE key = ?1")?.execute([key])? == 1)
        })
        .await
    }
}
