//! The port contract on the embedded (SQLite) backend.

use anyhow::Result;
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::ports::FleetQuery;
use fleet_tests::contract;

fn store() -> Result<SqliteStore> {
    Ok(SqliteStore::in_memory()?)
}

#[tokio::test]
async fn registration_round_trips_and_lists_sorted() -> Result<()> {
    contract::registration_round_trips_and_lists_sorted(&store()?).await
}

#[tokio::test]
async fn enrichment_lookup_returns_known_and_omits_unknown() -> Result<()> {
    contract::enrichment_lookup_returns_known_and_omits_unknown(&store()?).await
}

#[tokio::test]
async fn device_state_only_moves_forward() -> Result<()> {
    contract::device_state_only_moves_forward(&store()?).await
}

#[tokio::test]
async fn archive_put_is_idempotent_by_key() -> Result<()> {
    contract::archive_put_is_idempotent_by_key(&store()?).await
}

#[tokio::test]
async fn quarantine_round_trips_lines_once() -> Result<()> {
    let s = store()?;
    contract::quarantine_round_trips_lines_once(&s, async || Ok(s.quarantined(0).await?)).await
}

#[tokio::test]
async fn sink_takes_a_batch_over_the_request_limit() -> Result<()> {
    let s = store()?;
    contract::sink_takes_a_batch_over_the_request_limit(&s).await?;
    // SQLite can also be read back: each (thing, boot, seq) is stored once
    let rows = s.telemetry(&contract::thing(3), 0, 1000).await?;
    anyhow::ensure!(rows.len() == 25, "{} rows for thing 3, expected 25", rows.len());
    Ok(())
}
