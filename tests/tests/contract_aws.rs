//! The port contract on the AWS adapters, against the moto server that `scripts/test.sh`
//! starts on loopback (`FLEET_TEST_AWS_ENDPOINT`).

use anyhow::Result;
use fleet_shared::ports::FleetQuery;
use fleet_tests::{contract, moto};

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn registration_round_trips_and_lists_sorted() -> Result<()> {
    contract::registration_round_trips_and_lists_sorted(&moto::fresh_store().await?).await
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn enrichment_lookup_returns_known_and_omits_unknown() -> Result<()> {
    contract::enrichment_lookup_returns_known_and_omits_unknown(&moto::fresh_store().await?).await
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn device_state_only_moves_forward() -> Result<()> {
    contract::device_state_only_moves_forward(&moto::fresh_store().await?).await
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn archive_put_is_idempotent_by_key() -> Result<()> {
    contract::archive_put_is_idempotent_by_key(&moto::fresh_store().await?).await
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn quarantine_round_trips_lines_once() -> Result<()> {
    let s = moto::fresh_store().await?;
    contract::quarantine_round_trips_lines_once(&s, async || Ok(s.quarantined(0).await?)).await
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn sink_takes_a_batch_over_the_request_limit() -> Result<()> {
    contract::sink_takes_a_batch_over_the_request_limit(&moto::fresh_store().await?).await
}
