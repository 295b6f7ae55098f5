//! The ingest function on the AWS adapters (DynamoDB, Timestream, S3 on moto), through its
//! own entry point `handler::handle`: a mixed batch stores its valid neighbours, quarantines
//! the rest with reasons, a redelivery changes nothing, and a replay of the archive fails nothing.

use anyhow::{anyhow, ensure, Context, Result};
use fleet_shared::adapters::aws::{DevicesTable, HealthTable, HotStore, S3Archive, TelemetryReader};
use fleet_shared::ingest::{decode_lines, replay, IngestPolicy, Reason, ReplayPorts};
use fleet_shared::lambda::AwsBackend;
use fleet_shared::metrics::MetricsOut;
use fleet_shared::model::{DeviceRegistration, ThingName};
use fleet_shared::ports::{DeviceAdmin, QuarantineReader};
use fleet_shared::ports::{TelemetryQuery, TelemetrySink};
use fleet_shared::Env;
use fleet_tests::{archive_objects, moto};
use ingest_telemetry::handler::{handle, Deps, Response};
use lambda_runtime::{Context as LambdaContext, LambdaEvent};
use serde_json::value::RawValue;

const MIXED: &str = include_str!("../../../events/ingest-telemetry/sqs-mixed-batch.json");
const NOW: i64 = 1_764_000_001_000;

fn now() -> i64 {
    NOW
}

async fn invoke<S: TelemetrySink>(
    deps: &Deps<DevicesTable, S, S3Archive, S3Archive, HealthTable>,
    event: &str,
) -> Result<Vec<String>> {
    let event = LambdaEvent::new(RawValue::from_string(event.to_owned())?, LambdaContext::default());
    match handle(deps, event).await? {
        Response::Sqs(r) => Ok(r.batch_item_failures.into_iter().map(|f| f.item_identifier).collect()),
        other => Err(anyhow!("expected an SQS response, got {other:?}")),
    }
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn mixed_batch_through_the_handler_on_aws_stores_neighbours_quarantines_bad_and_replays_idempotently(
) -> Result<()> {
    // GIVEN the function's deps on fresh AWS resources, two devices registered
    let a = moto::fresh_adapters().await?;
    let deps = Deps {
        registry: a.devices.clone(),
        sink: a.sink.clone(),
        archive: a.archive.clone(),
        quarantine: a.archive.clone(),
        health: a.health.clone(),
        policy: IngestPolicy::default(),
        clock: now,
        metrics: MetricsOut::Off,
    };
    let reg = DeviceRegistration {
        class: "env-sensor".into(),
        region: "eu-west".into(),
        fw: "1.4.0".into(),
        registered_at_ms: 1,
    };
    let s1 = ThingName::parse("sensor-001")?;
    a.devices.register(&[(s1.clone(), reg.clone()), (ThingName::parse("sensor-002")?, reg)]).await?;

    // WHEN the mixed batch is delivered
    let failed = invoke(&deps, MIXED).await?;

    // THEN nothing is retried
    ensure!(failed.is_empty(), "retried: {failed:?}");
    // AND S3 holds one raw object with the 3 valid bodies and one quarantine object with 8 lines
    let objects = archive_objects(&a.archive, "").await?;
    let raw: Vec<_> = objects.iter().filter(|(k, _)| k.starts_with("raw/dt=2025-11-24/hour=16/")).collect();
    let quarantine: Vec<_> =
        objects.iter().filter(|(k, _)| k.starts_with("quarantine/dt=2025-11-24/hour=16/")).collect();
    ensure!(raw.len() == 1 && quarantine.len() == 1, "objects: {:?}", objects.keys());
    ensure!(decode_lines(raw[0].1)?.len() == 3, "raw lines");
    let q = a.archive.quarantined(0).await?;
    ensure!(q.len() == 8, "{} quarantine lines", q.len());
    ensure!(q.iter().any(|l| l.reasons.iter().any(|p| p.reason == Reason::NonFiniteValue)), "reasons kept");
    // AND the device state was recorded from the newest reading
    let state = a.devices.device(&s1).await?.and_then(|d| d.state).context("sensor-001 state")?;
    ensure!(state.seq == 2001, "state {state:?}");

    // WHEN the same batch is delivered again
    let again = invoke(&deps, MIXED).await?;
    // THEN nothing fails and the archive is byte-identical (same keys, same objects)
    ensure!(again.is_empty(), "redelivery retried: {again:?}");
    ensure!(archive_objects(&a.archive, "").await? == objects, "redelivery changed the archive");
    ensure!(
        a.devices.device(&s1).await?.and_then(|d| d.state) == Some(state),
        "redelivery changed last-seen"
    );

    // AND replaying the archive through the AWS adapters reads every raw line back and fails nothing
    // (Timestream takes an identical record silently, so AWS reports these as written, not duplicates)
    let ports =
        ReplayPorts { registry: &a.devices, sink: &a.sink, quarantine: &a.archive, reader: &a.archive };
    let report = replay(ports, &IngestPolicy::default(), NOW, "raw/").await?;
    ensure!(
        (report.objects, report.messages, report.failed, report.quarantined) == (1, 3, 0, 0),
        "{report:?}"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn without_a_hot_store_the_archive_is_the_store_and_fleetctl_reads_telemetry_back_from_it() -> Result<()>
{
    // GIVEN a deployment with HotStore=none: the template gives no Timestream variable at all
    let r = moto::fresh_resources().await?;
    let vars = [
        ("FLEET_BACKEND", "aws".to_owned()),
        ("FLEET_STAGE", "test".to_owned()),
        ("FLEET_HOT_STORE", "none".to_owned()),
        ("FLEET_DEVICES_TABLE", r.devices_table.clone()),
        ("FLEET_HEALTH_TABLE", r.health_table.clone()),
        ("FLEET_ARCHIVE_BUCKET", r.archive_bucket.clone()),
    ];
    let env = Env::from_fn(move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()));
    let aws = AwsBackend { sdk: moto::sdk_config().await?, env: env.clone() };
    // WHEN the function starts as main.rs starts it, and the mixed batch is delivered
    let mut deps = Deps::on_aws(&aws).await?;
    ensure!(matches!(deps.sink, HotStore::None), "a hot store was built");
    deps.clock = now;
    deps.metrics = MetricsOut::Off;
    let failed = invoke(&deps, MIXED).await?;
    // THEN nothing is retried, the valid readings are archived and the bad ones quarantined
    ensure!(failed.is_empty(), "retried: {failed:?}");
    let raw = archive_objects(&deps.archive, "raw/").await?;
    ensure!(raw.len() == 1, "raw objects: {:?}", raw.keys());
    ensure!(deps.archive.quarantined(0).await?.len() == 8, "quarantine lines");

    // AND `fleetctl telemetry` on this deployment reads the device's readings from the archive
    let reader = TelemetryReader::from_env(&aws.sdk, &env, IngestPolicy::default())?;
    ensure!(matches!(reader, TelemetryReader::Archive(_)), "read from another store");
    let s1 = ThingName::parse("sensor-001")?;
    let readings = reader.telemetry(&s1, NOW - 3_600_000, 100).await?;
    let seqs: Vec<u64> = readings.iter().map(|r| r.reading.id.seq).collect();
    ensure!(!seqs.is_empty() && seqs.windows(2).all(|w| w[0] < w[1]), "sensor-001 readings: {seqs:?}");
    ensure!(readings.iter().all(|r| r.reading.id.thing == s1), "another thing's readings");
    // AND a redelivery is archived as the same object and still read back once
    ensure!(invoke(&deps, MIXED).await?.is_empty(), "redelivery retried");
    ensure!(archive_objects(&deps.archive, "raw/").await? == raw, "redelivery changed the archive");
    ensure!(reader.telemetry(&s1, NOW - 3_600_000, 100).await?.len() == readings.len(), "read twice");
    Ok(())
}
