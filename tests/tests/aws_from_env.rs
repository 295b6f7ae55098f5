//! The deployed start-up path: `Config::from_env()` + `Store::connect()` with the SDK's own
//! `AWS_ENDPOINT_URL` pointing at moto, as a Lambda would start with the template's variables.
//! Endpoint discovery must stay off when an endpoint override is set, or Timestream would be
//! sent to AWS's own host. One test in its own binary: it sets process environment variables.

use anyhow::{ensure, Result};
use fleet_shared::ingest::{ingest_batch, messages_from_event, IngestPorts, OwnedInbound};
use fleet_shared::{Config, Store};
use fleet_tests::{archive_objects, moto};

const VALID_V1: &str = include_str!("../../events/ingest-telemetry/sqs-valid-v1.json");

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn store_from_env_sends_every_client_to_the_endpoint_override() -> Result<()> {
    // GIVEN moto resources and the environment a Lambda gets from the template and the SDK
    let r = moto::fresh_resources().await?;
    for (k, v) in [
        ("AWS_ENDPOINT_URL", moto::endpoint()?),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("FLEET_BACKEND", "aws".into()),
        ("FLEET_DEVICES_TABLE", r.devices_table.clone()),
        ("FLEET_TELEMETRY_DB", r.telemetry_database.clone()),
        ("FLEET_TELEMETRY_TABLE", r.telemetry_table.clone()),
        ("FLEET_ARCHIVE_BUCKET", r.archive_bucket.clone()),
    ] {
        std::env::set_var(k, v);
    }
    // WHEN the store is built as main.rs builds it, and a batch is ingested through it
    let config = Config::from_env()?;
    let store = Store::connect(&config).await?;
    let owned = messages_from_event(VALID_V1, 1_764_000_001_000)?;
    let inbound: Vec<_> = owned.iter().map(OwnedInbound::borrow).collect();
    let ports = IngestPorts { registry: &store, sink: &store, archive: &store, quarantine: &store };
    let outcome = ingest_batch(ports, &config.policy, 1_764_000_001_000, &inbound).await;
    // THEN DynamoDB, Timestream and S3 all answered from moto
    ensure!(outcome.failed.is_empty(), "failed: {:?}", outcome.failed);
    ensure!(outcome.accepted == 4, "{outcome:?}");
    let Store::Aws(aws) = &store else { anyhow::bail!("FLEET_BACKEND=aws built another backend") };
    ensure!(archive_objects(aws, "raw/").await?.len() == 1, "raw archive object missing");
    Ok(())
}
