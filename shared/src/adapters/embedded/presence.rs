//! [`PresenceStore`] on SQLite: one row per device, written only if the row is still the one
//! read (compare and set inside one transaction), with the connected gauge in the same
//! transaction.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::error::StoreError;
use crate::health::presence::{Place, Presence};
use crate::health::tally::HealthDelta;
use crate::model::ThingName;
use crate::ports::{PresencePage, PresenceReader, PresenceStore};

/// Migration step 11 (see `MIGRATIONS` in `sqlite.rs`).
pub(super) const PRESENCE_SCHEMA: &str = "
CREATE TABLE presence (
    thing TEXT NOT NULL PRIMARY KEY,
    place TEXT NOT NULL, -- the Place as JSON (what a conditional write compares)
    state TEXT NOT NULL  -- the Presence as JSON
) WITHOUT ROWID;
";

fn json<T: serde::Serialize>(op: &'static str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::permanent(op, e))
}

impl PresenceReader for SqliteStore {
    async fn presence(&self, thing: &ThingName) -> Result<Option<Presence>, StoreError> {
        const OP: &str = "sqlite presence get";
        let key = thing.to_string();
        let state: Option<String> = self
            .with(OP, move |c| {
                c.prepare_cached("SELECT state FROM presence WHERE thing = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()
            })
            .await?;
        state.map(|s| serde_json::from_str(&s).map_err(|e| StoreError::permanent(OP, e))).transpose()
    }

    async fn presence_page(
        &self,
        after: Option<&ThingName>,
        limit: usize,
    ) -> Result<PresencePage, StoreError> {
        const OP: &str = "sqlite presence page";
        let after = after.map(ToString::to_string).unwrap_or_default();
        let limit = limit.max(1);
        let rows: Vec<(String, String)> = self
            .with(OP, move |c| {
                let mut st = c.prepare_cached(
                    "SELECT thing, state FROM presence WHERE thing > ?1 ORDER BY thing LIMIT ?2",
                )?;
                let rows = st.query_map(params![after, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await?;
        let mut page = Vec::with_capacity(rows.len());
        for (thing, state) in rows {
            let thing = ThingName::parse(&thing).map_err(|e| StoreError::permanent(OP, e))?;
            page.push((thing, serde_json::from_str(&state).map_err(|e| StoreError::permanent(OP, e))?));
        }
        let next = (page.len() == limit).then(|| page.last().map(|(t, _)| t.clone())).flatten();
        Ok((page, next))
    }
}

impl PresenceStore for SqliteStore {
    async fn put_presence(
        &self,
        thing: &ThingName,
        next: &Presence,
        expected: Option<&Place>,
        counts: &HealthDelta,
    ) -> Result<bool, StoreError> {
        const OP: &str = "sqlite presence put";
        let (key, place, state) = (thing.to_string(), json(OP, &next.place)?, json(OP, next)?);
        let expected = expected.map(|p| json(OP, p)).transpose()?;
        let counts = counts.clone();
        self.with(OP, move |c| {
            let tx = c.transaction()?;
            let stored: Option<String> = tx
                .query_row("SELECT place FROM presence WHERE thing = ?1", [&key], |r| r.get(0))
                .optional()?;
            if stored != expected {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO presence (thing, place, state) VALUES (?1, ?2, ?3)
                 ON CONFLICT (thing) DO UPDATE SET place = excluded.place, state = excluded.state",
                params![key, place, state],
            )?;
            super::health::add_delta(&tx, &counts)?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }
}
