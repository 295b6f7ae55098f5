//! Health counters and the SLO ledger on SQLite ([`HealthCounters`], [`SloReader`],
//! [`HealthLedger`]): counters as one row per (bucket, cohort, name) added to by upsert, the
//! ledger as one JSON tally per (cohort, minute).

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Transaction};

use super::SqliteStore;
use crate::error::StoreError;
use crate::health::ledger::HealthReport;
use crate::health::tally::{Bucket, Cohort, HealthDelta, Tally};
use crate::ports::{HealthCounters, HealthLedger, LedgerRow, SloReader};

/// Migration step 12 (see `MIGRATIONS` in `sqlite.rs`).
pub(super) const HEALTH_SCHEMA: &str = "
CREATE TABLE health_counters (
    kind TEXT NOT NULL,     -- m (minute), h (hour), g (gauge)
    n INTEGER NOT NULL,     -- Unix minute or hour; 0 for gauges
    cohort TEXT NOT NULL,   -- class/region/firmware
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (kind, n, cohort, name)
) WITHOUT ROWID;
CREATE TABLE health_ledger (
    cohort TEXT NOT NULL,
    minute INTEGER NOT NULL,
    tally TEXT NOT NULL,    -- cumulative counters, JSON
    PRIMARY KEY (cohort, minute)
) WITHOUT ROWID;
CREATE TABLE health_meta (
    key TEXT NOT NULL PRIMARY KEY, -- closed_through, report
    value TEXT NOT NULL
) WITHOUT ROWID;
";

fn bucket_key(b: Bucket) -> (&'static str, i64) {
    match b {
        Bucket::Minute(m) => ("m", m),
        Bucket::Hour(h) => ("h", h),
        Bucket::Gauge => ("g", 0),
    }
}

/// Counters kept: two days of minutes and hours (fleet-health reads the last 24 hours).
const KEEP_COUNTER_MINUTES: i64 = 2 * 24 * 60;
/// Ledger rows kept: the SLO window and a day (older ones are never a window's start).
const KEEP_LEDGER_MINUTES: i64 = 29 * 24 * 60;

/// Add a delta inside a transaction (presence adds its gauge in the transaction of its write).
pub(super) fn add_delta(tx: &Transaction<'_>, delta: &HealthDelta) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "INSERT INTO health_counters (kind, n, cohort, name, value) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (kind, n, cohort, name) DO UPDATE SET value = value + excluded.value",
    )?;
    for ((bucket, cohort), tally) in &delta.0 {
        let ((kind, n), c) = (bucket_key(*bucket), cohort.to_string());
        for (name, v) in &tally.0 {
            st.execute(params![kind, n, c, name, v])?;
        }
    }
    Ok(())
}

fn parse_tally(op: &'static str, json: &str) -> Result<Tally, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::permanent(op, e))
}

fn parse_cohort(op: &'static str, s: &str) -> Result<Cohort, StoreError> {
    s.parse().map_err(|e| StoreError::permanent(op, e))
}

impl HealthCounters for SqliteStore {
    async fn add_health(&self, delta: &HealthDelta) -> Result<(), StoreError> {
        if delta.is_empty() {
            return Ok(());
        }
        let delta = delta.clone();
        self.with("sqlite health add", move |c| {
            let tx = c.transaction()?;
            add_delta(&tx, &delta)?;
            tx.commit()
        })
        .await
    }
}

impl SloReader for SqliteStore {
    async fn row_at(&self, cohort: &Cohort, minute: i64) -> Result<Option<LedgerRow>, StoreError> {
        const OP: &str = "sqlite ledger row";
        let key = cohort.to_string();
        let row: Option<(i64, String)> = self
            .with(OP, move |c| {
                c.prepare_cached(
                    "SELECT minute, tally FROM health_ledger WHERE cohort = ?1 AND minute <= ?2
                     ORDER BY minute DESC LIMIT 1",
                )?
                .query_row(params![key, minute], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
            })
            .await?;
        row.map(|(m, t)| Ok((m, parse_tally(OP, &t)?))).transpose()
    }

    async fn heads(&self) -> Result<BTreeMap<Cohort, LedgerRow>, StoreError> {
        const OP: &str = "sqlite ledger heads";
        let rows: Vec<(String, i64, String)> = self
            .with(OP, |c| {
                let mut st = c.prepare_cached(
                    "SELECT cohort, minute, tally FROM health_ledger l WHERE minute =
                       (SELECT MAX(minute) FROM health_ledger WHERE cohort = l.cohort)",
                )?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect()
            })
            .await?;
        rows.into_iter().map(|(c, m, t)| Ok((parse_cohort(OP, &c)?, (m, parse_tally(OP, &t)?)))).collect()
    }

    async fn latest_health(&self) -> Result<Option<HealthReport>, StoreError> {
        const OP: &str = "sqlite health report";
        let json: Option<String> = self
            .with(OP, |c| {
                c.query_row("SELECT value FROM health_meta WHERE key = 'report'", [], |r| r.get(0)).optional()
            })
            .await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| StoreError::permanent(OP, e))).transpose()
    }
}

impl HealthLedger for SqliteStore {
    async fn buckets(
        &self,
        buckets: &[Bucket],
    ) -> Result<BTreeMap<Bucket, BTreeMap<Cohort, Tally>>, StoreError> {
        const OP: &str = "sqlite health buckets";
        let keys: Vec<Bucket> = buckets.to_vec();
        let rows: Vec<(Bucket, String, String, i64)> = self
            .with(OP, move |c| {
                let mut st = c.prepare_cached(
                    "SELECT cohort, name, value FROM health_counters WHERE kind = ?1 AND n = ?2",
                )?;
                let mut out = Vec::new();
                for b in keys {
                    let (kind, n) = bucket_key(b);
                    let rows =
                        st.query_map(params![kind, n], |r| Ok((b, r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    for row in rows {
                        out.push(row?);
                    }
                }
                Ok(out)
            })
            .await?;
        let mut out: BTreeMap<Bucket, BTreeMap<Cohort, Tally>> = BTreeMap::new();
        for (b, cohort, name, v) in rows {
            out.entry(b).or_default().entry(parse_cohort(OP, &cohort)?).or_default().add(&name, v);
        }
        Ok(out)
    }

    async fn closed_through(&self) -> Result<Option<i64>, StoreError> {
        let v: Option<String> = self
            .with("sqlite health cursor", |c| {
                c.query_row("SELECT value FROM health_meta WHERE key = 'closed_through'", [], |r| r.get(0))
                    .optional()
            })
            .await?;
        Ok(v.and_then(|v| v.parse().ok()))
    }

    async fn close_minute(&self, minute: i64, rows: &[(Cohort, Tally)]) -> Result<(), StoreError> {
        const OP: &str = "sqlite ledger close";
        let rows = rows
            .iter()
            .map(|(c, t)| {
                Ok((c.to_string(), serde_json::to_string(t).map_err(|e| StoreError::permanent(OP, e))?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.with(OP, move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT OR REPLACE INTO health_ledger (cohort, minute, tally) VALUES (?1, ?2, ?3)",
                )?;
                for (cohort, tally) in &rows {
                    st.execute(params![cohort, minute, tally])?;
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO health_meta (key, value) VALUES ('closed_through', ?1)",
                [minute.to_string()],
            )?;
            if minute % 60 == 0 {
                // Hourly: drop counters nobody reads any more, and ledger rows older than any
                // window's start except each cohort's newest such row (a window may start there).
                let cutoff = minute - KEEP_COUNTER_MINUTES;
                tx.execute(
                    "DELETE FROM health_counters WHERE (kind = 'm' AND n < ?1) OR (kind = 'h' AND n < ?2)",
                    params![cutoff, cutoff / 60],
                )?;
                tx.execute(
                    "DELETE FROM health_ledger WHERE minute < (SELECT MAX(minute) FROM health_ledger l
                       WHERE l.cohort = health_ledger.cohort AND l.minute <= ?1)",
                    [minute - KEEP_LEDGER_MINUTES],
                )?;
            }
            tx.commit()
        })
        .await
    }

    /// Nothing to do: rows here never expire (the hourly prune keeps each cohort's newest row
    /// older than any window's start).
    async fn renew_rows(&self, _minute: i64, _rows: &[(Cohort, LedgerRow)]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn put_health(&self, report: &HealthReport) -> Result<(), StoreError> {
        const OP: &str = "sqlite health report put";
        let json = serde_json::to_string(report).map_err(|e| StoreError::permanent(OP, e))?;
        self.with(OP, move |c| {
            c.execute("INSERT OR REPLACE INTO health_meta (key, value) VALUES ('report', ?1)", [json])
                .map(|_| ())
        })
        .await
    }
}
