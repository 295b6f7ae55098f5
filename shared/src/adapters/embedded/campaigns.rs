//! [`CampaignStore`] on SQLite: one row per campaign (JSON), written only over the version it
//! was read at.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::error::StoreError;
use crate::ota::campaign::Campaign;
use crate::ports::CampaignStore;

/// A migration step (see `MIGRATIONS` in `sqlite.rs`).
pub(super) const CAMPAIGNS_SCHEMA: &str = "
CREATE TABLE campaigns (
    id TEXT NOT NULL PRIMARY KEY,
    version INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    body TEXT NOT NULL -- the Campaign as JSON
) WITHOUT ROWID;
";

pub(super) fn decode(op: &'static str, json: &str) -> Result<Campaign, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::permanent(op, e))
}

/// Rows that decode; one this binary cannot read (written by a newer one) holds up no other.
fn readable(op: &'static str, rows: &[String]) -> Vec<Campaign> {
    rows.iter()
        .filter_map(|j| {
            decode(op, j)
                .inspect_err(|e| tracing::warn!(error = %e, "campaign skipped: this binary cannot read it"))
                .ok()
        })
        .collect()
}

/// Pages of campaigns for the local stack's API and dashboard, which never load them all.
impl SqliteStore {
    /// Campaigns by id, those after `after`, at most `limit`.
    pub async fn campaigns_page(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<Campaign>, StoreError> {
        const OP: &str = "sqlite campaigns page";
        let rows: Vec<String> = self
            .with(OP, move |c| {
                let mut stmt = c.prepare("SELECT body FROM campaigns WHERE id > ?1 ORDER BY id LIMIT ?2")?;
                let rows = stmt
                    .query_map(params![after.unwrap_or_default(), limit as i64], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(rows)
            })
            .await?;
        Ok(readable(OP, &rows))
    }

    /// The `limit` newest campaigns, newest first, and how many there are in all.
    pub async fn newest_campaigns(&self, limit: usize) -> Result<(Vec<Campaign>, usize), StoreError> {
        const OP: &str = "sqlite newest campaigns";
        let (rows, total): (Vec<String>, i64) = self
            .with(OP, move |c| {
                let total = c.query_row("SELECT COUNT(*) FROM campaigns", [], |r| r.get(0))?;
                let mut stmt =
                    c.prepare("SELECT body FROM campaigns ORDER BY created_ms DESC, id LIMIT ?1")?;
                let rows =
                    stmt.query_map([limit as i64], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
                Ok((rows, total))
            })
            .await?;
        Ok((readable(OP, &rows), usize::try_from(total).unwrap_or(0)))
    }
}

impl CampaignStore for SqliteStore {
    async fn campaign(&self, id: &str) -> Result<Option<Campaign>, StoreError> {
        const OP: &str = "sqlite campaign get";
        let id = id.to_owned();
        let json: Option<String> = self
            .with(OP, move |c| {
                c.query_row("SELECT body FROM campaigns WHERE id = ?1", [id], |r| r.get(0)).optional()
            })
            .await?;
        json.map(|j| decode(OP, &j)).transpose()
    }

    async fn campaigns(&self) -> Result<Vec<Campaign>, StoreError> {
        const OP: &str = "sqlite campaigns";
        let rows: Vec<String> = self
            .with(OP, |c| {
                let mut stmt = c.prepare("SELECT body FROM campaigns ORDER BY created_ms DESC, id")?;
                let rows = stmt.query_map([], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
                Ok(rows)
            })
            .await?;
        Ok(readable(OP, &rows))
    }

    async fn put_campaign(&self, campaign: &Campaign) -> Result<u64, StoreError> {
        const OP: &str = "sqlite campaign put";
        let read_at = campaign.version;
        let mut stored = campaign.clone();
        stored.version = read_at + 1;
        let body = serde_json::to_string(&stored).map_err(|e| StoreError::permanent(OP, e))?;
        let (id, created) = (stored.spec.id.clone(), stored.created_ms);
        let written = self
            .with(OP, move |c| {
                if read_at == 0 {
                    c.execute(
                        "INSERT INTO campaigns (id, version, created_ms, body) VALUES (?1, 1, ?2, ?3)
                         ON CONFLICT (id) DO NOTHING",
                        params![id, created, body],
                    )
                } else {
                    c.execute(
                        "UPDATE campaigns SET version = ?2, body = ?3 WHERE id = ?1 AND version = ?4",
                        params![id, read_at as i64 + 1, body, read_at as i64],
                    )
                }
            })
            .await?;
        if written == 0 {
            let what = if read_at == 0 {
                "exists already".to_owned()
            } else {
                format!("changed since version {read_at}")
            };
            return Err(StoreError::conflict(OP, format!("campaign {} {what}", campaign.spec.id)));
        }
        Ok(read_at + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ota::campaign::CampaignSpec;

    #[tokio::test]
    async fn a_campaign_this_binary_cannot_read_holds_up_no_other() -> anyhow::Result<()> {
        // GIVEN a campaign, and one written by a newer binary with a change this one lacks
        let db = SqliteStore::in_memory()?;
        let good =
            crate::ota::campaign::tests::campaign(CampaignSpec::new("fw1", "sensor", "1.4.2", "1.5.0"))?;
        db.put_campaign(&good).await?;
        db.with("test insert", |c| {
            c.execute(
                "INSERT INTO campaigns (id, version, created_ms, body) VALUES ('future', 1, 0, ?1)",
                [r#"{"spec":{"id":"future","change":"teleport"}}"#],
            )
            .map(|_| ())
        })
        .await?;
        // WHEN every campaign is listed, THEN the readable one is, and the other is skipped
        let listed = db.campaigns().await?;
        assert_eq!(listed.iter().map(|c| c.spec.id.as_str()).collect::<Vec<_>>(), ["fw1"]);
        // AND read alone, it is an error that names the problem
        let alone = db.campaign("future").await.expect_err("unreadable");
        assert!(alone.to_string().contains("teleport"), "{alone}");
        Ok(())
    }
}
