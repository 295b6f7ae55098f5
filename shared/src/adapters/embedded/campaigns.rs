//! [`CampaignStore`] on SQLite: one row per campaign (JSON), written only over the version it
//! was read at.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::error::StoreError;
use crate::ota::campaign::{Campaign, State};
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

/// How many campaigns are in each state (`state` tag), paused or not.
pub type CampaignCounts = Vec<(String, bool, u64)>;

/// Pages of campaigns for the local stack's API and dashboard, which never load them all.
impl SqliteStore {
    /// Campaigns by id, those after `after`, at most `limit`; and the id to go on after, if
    /// more follow (counted on the rows, so a campaign this binary cannot read, skipped, does
    /// not end the pages early).
    pub async fn campaigns_page(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Campaign>, Option<String>), StoreError> {
        const OP: &str = "sqlite campaigns page";
        let mut rows: Vec<(String, String)> = self
            .with(OP, move |c| {
                let mut stmt =
                    c.prepare("SELECT id, body FROM campaigns WHERE id > ?1 ORDER BY id LIMIT ?2")?;
                let rows = stmt
                    .query_map(params![after.unwrap_or_default(), limit as i64 + 1], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more { rows.last().map(|(id, _)| id.clone()) } else { None };
        let bodies: Vec<String> = rows.into_iter().map(|(_, body)| body).collect();
        Ok((readable(OP, &bodies), next))
    }

    /// Up to `limit` campaigns, those that have not ended first, newest first within each.
    pub async fn campaigns_to_show(&self, limit: usize) -> Result<Vec<Campaign>, StoreError> {
        const OP: &str = "sqlite campaigns to show";
        let rows: Vec<String> = self
            .with(OP, move |c| {
                let sql = format!(
                    "SELECT body FROM campaigns
                     ORDER BY json_extract(body, '$.state.state') IN ({}), created_ms DESC, id LIMIT ?1",
                    final_names()
                );
                let mut stmt = c.prepare(&sql)?;
                let rows =
                    stmt.query_map([limit as i64], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
                Ok(rows)
            })
            .await?;
        Ok(readable(OP, &rows))
    }

    /// Every campaign counted by state and pause, without reading their bodies into memory.
    pub async fn campaign_counts(&self) -> Result<CampaignCounts, StoreError> {
        const OP: &str = "sqlite campaign counts";
        self.with(OP, |c| {
            let mut stmt = c.prepare(
                "SELECT json_extract(body, '$.state.state'), json_extract(body, '$.paused') IS NOT NULL, COUNT(*)
                 FROM campaigns GROUP BY 1, 2",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, Option<String>>(0)?.unwrap_or_default(), r.get(1)?, r.get(2)?)))?
                .collect::<Result<Vec<(String, bool, i64)>, _>>()?;
            Ok(rows.into_iter().map(|(s, p, n)| (s, p, u64::try_from(n).unwrap_or(0))).collect())
        })
        .await
    }
}

/// `'rolled_back', 'halted', ...`: the final states' tags, for SQL.
fn final_names() -> String {
    State::FINAL_NAMES.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
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
        // AND a page that holds it ("future", "fw1" by id) still says where the next starts
        let second = crate::ota::campaign::tests::campaign(CampaignSpec::new("gw1", "gw", "1.4.2", "1.5.0"))?;
        db.put_campaign(&second).await?;
        let (page, next) = db.campaigns_page(None, 2).await?;
        assert_eq!(page.iter().map(|c| c.spec.id.as_str()).collect::<Vec<_>>(), ["fw1"]);
        assert_eq!(next.as_deref(), Some("fw1"));
        let (page, next) = db.campaigns_page(next, 2).await?;
        assert_eq!((page.len(), page[0].spec.id.as_str(), next), (1, "gw1", None));
        Ok(())
    }

    #[tokio::test]
    async fn campaigns_are_counted_by_state_and_pause_and_shown_not_ended_first() -> anyhow::Result<()> {
        use crate::ota::campaign::State;
        // GIVEN three rotations created a second apart: the oldest paused, the newest completed
        let db = SqliteStore::in_memory()?;
        for (i, id) in ["old", "mid", "new"].into_iter().enumerate() {
            let mut c = Campaign::rotation(CampaignSpec::rotation(id, "sensor", "1.4.2"), 1_000 * i as i64)?;
            if id == "old" {
                c.paused = Some("by an operator".into());
            }
            if id == "new" {
                c.state = State::Completed;
            }
            db.put_campaign(&c).await?;
        }
        // WHEN they are counted and listed for the dashboard
        let mut counts = db.campaign_counts().await?;
        counts.sort();
        let shown = db.campaigns_to_show(10).await?;
        // THEN each state and pause is counted, and those not ended come first, newest first
        assert_eq!(
            counts,
            [
                ("completed".to_owned(), false, 1),
                ("pending".to_owned(), false, 1),
                ("pending".to_owned(), true, 1)
            ]
        );
        assert_eq!(shown.iter().map(|c| c.spec.id.as_str()).collect::<Vec<_>>(), ["mid", "old", "new"]);
        Ok(())
    }
}
