//! End to end: the real `ingest-telemetry` bootstrap (the binary this test build made, with the
//! `embedded` feature) polling cargo-lambda's runtime emulator, driven by
//! `cargo lambda invoke --data-file events/...`, then the SQLite file is read back.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::lambda::emulator::Emulator;
use fleet_shared::model::{DeviceRegistration, ThingName};
use fleet_shared::ports::{DeviceAdmin, QuarantineReader, TelemetryQuery};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn event(name: &str) -> PathBuf {
    workspace().join("events/ingest-telemetry").join(name)
}

#[tokio::test]
#[ignore = "needs cargo-lambda, installed by scripts/test.sh"]
async fn cargo_lambda_invoke_stores_sample_events_in_the_embedded_backend() -> Result<()> {
    // GIVEN a fresh embedded database with two registered devices
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("target/fleet-dev.sqlite");
    let store = SqliteStore::open(&db)?;
    let reg = DeviceRegistration {
        class: "env-sensor".into(),
        region: "eu-west".into(),
        fw: "1.4.0".into(),
        registered_at_ms: 1,
    };
    store
        .register(&[(ThingName::parse("sensor-001")?, reg.clone()), (ThingName::parse("sensor-002")?, reg)])
        .await?;

    // AND the function's bootstrap polling cargo-lambda's runtime emulator
    let db_path = db.to_string_lossy();
    let mut lambda = Emulator::start(
        &workspace(),
        Path::new(env!("CARGO_BIN_EXE_ingest-telemetry")),
        &[("FLEET_BACKEND", "embedded"), ("FLEET_DB", &db_path), ("RUST_LOG", "info")],
        dir.path(),
    )?;

    // WHEN the valid batch is invoked
    let first = lambda.invoke(&event("sqs-valid-v1.json"))?;
    // AND a mixed batch, a duplicate batch twice, and a direct rule invocation
    let mixed = lambda.invoke(&event("sqs-mixed-batch.json"))?;
    let dup1 = lambda.invoke(&event("sqs-duplicate-batch.json"))?;
    let dup2 = lambda.invoke(&event("sqs-duplicate-batch.json"))?;
    let direct = lambda.invoke(&event("direct-v1.json"))?;

    // THEN no message is reported for retry
    for r in [&first, &mixed, &dup1, &dup2] {
        ensure!(r["batchItemFailures"] == serde_json::json!([]), "unexpected failures: {r}");
    }
    ensure!(
        direct == serde_json::json!({"accepted": 1, "duplicates": 0, "quarantined": []}),
        "direct: {direct}"
    );
    // AND the database holds exactly what was sent, once
    let s1 = store.telemetry(&ThingName::parse("sensor-001")?, 0, 100).await?;
    let seqs: Vec<u64> = s1.iter().map(|r| r.reading.id.seq).collect();
    ensure!(seqs == [1042, 2001, 3001, 6001, 3002, 1043], "sensor-001 seqs {seqs:?}");
    ensure!(s1.iter().all(|r| r.class == "env-sensor"), "enrichment missing");
    let quarantined = store.quarantined(0).await?;
    ensure!(quarantined.len() == 8, "{} quarantined, expected the mixed batch's 8", quarantined.len());
    let state =
        store.device(&ThingName::parse("sensor-001")?).await?.and_then(|d| d.state).context("state")?;
    ensure!(state.seq == 1043, "last-seen from the newest reading, got {state:?}");
    Ok(())
}
