//! End to end: the real `twin-sync` bootstrap (the binary this test build made, with the
//! `embedded` feature) polling cargo-lambda's runtime emulator, driven by
//! `cargo lambda invoke --data-file events/twin-sync/...`, then the SQLite file is read back.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::lambda::emulator::Emulator;
use fleet_shared::model::{ShadowName, ThingName};
use fleet_shared::ports::TwinStore;
use serde_json::json;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn event(name: &str) -> PathBuf {
    workspace().join("events/twin-sync").join(name)
}

#[tokio::test]
#[ignore = "needs cargo-lambda, installed by scripts/test.sh"]
async fn cargo_lambda_invoke_mirrors_the_sample_shadow_events_in_the_embedded_backend() -> Result<()> {
    // GIVEN a fresh embedded database and the function's bootstrap polling the emulator
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let store = SqliteStore::open(&db)?;
    let db_path = db.to_string_lossy();
    let mut lambda = Emulator::start(
        &workspace(),
        Path::new(env!("CARGO_BIN_EXE_twin-sync")),
        &[("FLEET_BACKEND", "embedded"), ("FLEET_DB", &db_path), ("RUST_LOG", "info")],
        dir.path(),
    )?;

    // WHEN an out-of-order SQS batch with a duplicate and an unreadable event arrives
    let batch = lambda.invoke(&event("sqs-out-of-order.json"))?;
    // AND a named shadow's documents event, invoked directly as the rule would
    let named = lambda.invoke(&event("documents-named.json"))?;

    // THEN nothing is retried (the unreadable event is rejected, not retried)
    ensure!(batch == json!({"batchItemFailures": []}), "batch: {batch}");
    ensure!(named == json!({"applied": 1, "stale": 0, "rejected": []}), "named: {named}");
    // AND the classic twin ends at the highest version, in sync
    let classic = store
        .twin(&ThingName::parse("sensor-001")?, &ShadowName::classic())
        .await?
        .context("the classic twin of sensor-001")?;
    ensure!(
        (classic.version, classic.drift_since_ms, classic.delta.is_empty()) == (3, None, true),
        "{classic:?}"
    );
    // AND the named shadow is its own twin, drifting on rate_s
    let config = store
        .twin(&ThingName::parse("sensor-002")?, &ShadowName::parse("config")?)
        .await?
        .context("the config twin of sensor-002")?;
    ensure!((config.version, config.drift_keys()) == (7, vec!["rate_s".to_owned()]), "{config:?}");
    // AND the scheduled sweep counts that one drifting twin
    let sweep = lambda.invoke(&event("scheduled-sweep.json"))?;
    ensure!(sweep["drifting"] == 1 && sweep["oldest_drift_age_s"].as_i64() > Some(0), "sweep: {sweep}");

    // WHEN the classic shadow's delete arrives, then the same batch is delivered again
    let deleted = lambda.invoke(&event("delete-classic.json"))?;
    let again = lambda.invoke(&event("sqs-out-of-order.json"))?;

    // THEN the delete is mirrored and the redelivered (older) documents do not revive the twin
    ensure!(deleted == json!({"applied": 1, "stale": 0, "rejected": []}), "delete: {deleted}");
    ensure!(again == json!({"batchItemFailures": []}), "again: {again}");
    let classic =
        store.twin(&ThingName::parse("sensor-001")?, &ShadowName::classic()).await?.context("twin")?;
    ensure!(classic.deleted && classic.desired.is_empty(), "{classic:?}");
    Ok(())
}
