//! The whole ingest use case on the AWS adapters (DynamoDB, Timestream, S3 on moto):
//! a mixed batch stores its valid neighbours, quarantines the rest with reasons, and a
//! replay of the same batch changes nothing.

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::aws::AwsStore;
use fleet_shared::ingest::{
    decode_lines, ingest_batch, messages_from_event, replay, BatchOutcome, IngestPolicy, IngestPorts,
    OwnedInbound, Reason,
};
use fleet_shared::model::{DeviceRegistration, ThingName};
use fleet_shared::ports::{DeviceAdmin, FleetQuery};
use fleet_tests::{archive_objects, moto};

const MIXED: &str = include_str!("../../events/ingest-telemetry/sqs-mixed-batch.json");
const NOW: i64 = 1_764_000_001_000;

async fn ingest(store: &AwsStore, event: &str) -> Result<BatchOutcome> {
    let owned: Vec<OwnedInbound> = messages_from_event(event, NOW)?;
    let inbound: Vec<_> = owned.iter().map(OwnedInbound::borrow).collect();
    let ports = IngestPorts { registry: store, sink: store, archive: store, quarantine: store };
    Ok(ingest_batch(ports, &IngestPolicy::default(), NOW, &inbound).await)
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn mixed_batch_on_aws_adapters_stores_neighbours_quarantines_bad_and_replays_idempotently() -> Result<()>
{
    // GIVEN fresh AWS resources with two registered devices
    let store = moto::fresh_store().await?;
    let reg = DeviceRegistration {
        class: "env-sensor".into(),
        region: "eu-west".into(),
        fw: "1.4.0".into(),
        registered_at_ms: 1,
    };
    let s1 = ThingName::parse("sensor-001")?;
    store.register(&[(s1.clone(), reg.clone()), (ThingName::parse("sensor-002")?, reg)]).await?;

    // WHEN the mixed batch is ingested
    let outcome = ingest(&store, MIXED).await?;

    // THEN 3 accepted, 8 quarantined, nothing failed; sensor-003 is unregistered
    ensure!(outcome.failed.is_empty(), "failed: {:?}", outcome.failed);
    ensure!((outcome.accepted, outcome.quarantined.len(), outcome.unregistered) == (3, 8, 1), "{outcome:?}");
    // AND S3 holds one raw object with the 3 valid bodies and one quarantine object with 8 lines
    let objects = archive_objects(&store, "").await?;
    let raw: Vec<_> = objects.iter().filter(|(k, _)| k.starts_with("raw/dt=2025-11-24/hour=16/")).collect();
    let quarantine: Vec<_> =
        objects.iter().filter(|(k, _)| k.starts_with("quarantine/dt=2025-11-24/hour=16/")).collect();
    ensure!(raw.len() == 1 && quarantine.len() == 1, "objects: {:?}", objects.keys());
    ensure!(decode_lines(raw[0].1)?.len() == 3, "raw lines");
    let q = store.quarantined(0).await?;
    ensure!(q.len() == 8, "{} quarantine lines", q.len());
    ensure!(q.iter().any(|l| l.reasons.iter().any(|p| p.reason == Reason::NonFiniteValue)), "reasons kept");
    // AND the device state was recorded from the newest reading
    let state = store.device(&s1).await?.and_then(|d| d.state).context("sensor-001 state")?;
    ensure!(state.seq == 2001, "state {state:?}");

    // WHEN the same batch is delivered again
    let again = ingest(&store, MIXED).await?;
    // THEN nothing fails and the archive is byte-identical (same keys, same objects)
    ensure!(again.failed.is_empty(), "replay failed: {:?}", again.failed);
    ensure!(archive_objects(&store, "").await? == objects, "replay changed the archive");
    ensure!(store.device(&s1).await?.and_then(|d| d.state) == Some(state), "replay changed last-seen");

    // AND replaying the archive through the AWS adapters reads every raw line back and fails nothing
    // (Timestream takes an identical record silently, so AWS reports these as written, not duplicates)
    let report = replay(&store, &store, &IngestPolicy::default(), NOW, "raw/").await?;
    ensure!((report.objects, report.messages, report.failed) == (1, 3, 0), "{report:?}");
    Ok(())
}
