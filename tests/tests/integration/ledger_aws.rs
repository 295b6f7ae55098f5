//! The SLO ledger on DynamoDB (moto): rows expire 30 days after their minute, so fleet-health
//! renews a cohort's last row when the cohort is active again after a quiet day; a renewed row
//! reads as it did and expires 30 days after the minute it was renewed at.

use anyhow::{Context, Result};
use aws_sdk_dynamodb::types::AttributeValue;
use fleet_shared::adapters::aws::HealthTable;
use fleet_shared::health::tally::{counter, Cohort, Tally};
use fleet_shared::ports::{HealthLedger, SloReader};
use fleet_tests::moto;

const THIRTY_DAYS_S: i64 = 30 * 24 * 3600;

/// The `ttl` of `cohort`'s ledger row at `minute`, as stored.
async fn ttl(client: &aws_sdk_dynamodb::Client, table: &str, cohort: &Cohort, minute: i64) -> Result<i64> {
    let item = client
        .get_item()
        .table_name(table)
        .key("pk", AttributeValue::S(format!("l#{cohort}")))
        .key("sk", AttributeValue::S(format!("{minute:010}")))
        .send()
        .await?
        .item
        .context("the row")?;
    let ttl = item.get("ttl").and_then(|v| v.as_n().ok()).context("a ttl")?;
    Ok(ttl.parse()?)
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn a_renewed_row_reads_as_before_and_expires_30_days_after_its_renewal() -> Result<()> {
    let r = moto::fresh_resources().await?;
    let client = aws_sdk_dynamodb::Client::new(&moto::sdk_config().await?);
    let ledger = HealthTable::new(client.clone(), &r.health_table);
    // GIVEN a cohort's row at minute 10, expiring 30 days after it
    let cohort = Cohort::new("sensor", "eu-west", "1.0");
    let mut tally = Tally::default();
    tally.add(counter::RECEIVED, 5);
    ledger.close_minute(10, &[(cohort.clone(), tally.clone())]).await?;
    assert_eq!(ttl(&client, &r.health_table, &cohort, 10).await?, 10 * 60 + THIRTY_DAYS_S);

    // WHEN the cohort is active again 34 days later and its row is renewed
    let resumed = 10 + 34 * 24 * 60;
    ledger.renew_rows(resumed, &[(cohort.clone(), (10, tally.clone()))]).await?;

    // THEN the row reads as before, as the start of any window reaching back into the quiet
    // days, and lives 30 days from the renewal
    assert_eq!(ledger.row_at(&cohort, resumed - 1).await?, Some((10, tally.clone())));
    assert_eq!(ttl(&client, &r.health_table, &cohort, 10).await?, resumed * 60 + THIRTY_DAYS_S);
    // AND the head and the cursor are untouched
    assert_eq!(ledger.heads().await?.get(&cohort), Some(&(10, tally)));
    assert_eq!(ledger.closed_through().await?, Some(10));
    Ok(())
}
