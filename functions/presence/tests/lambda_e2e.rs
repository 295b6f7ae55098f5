//! End to end: the real `presence` bootstrap (the binary this test build made, with the
//! `embedded` feature) polling cargo-lambda's runtime emulator, driven by
//! `cargo lambda invoke --data-file events/presence/...`, then the SQLite file is read back.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::lambda::emulator::Emulator;
use fleet_shared::model::ThingName;
use fleet_shared::ports::PresenceReader;
use serde_json::json;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test]
#[ignore = "needs cargo-lambda, installed by scripts/test.sh"]
async fn cargo_lambda_invoke_records_presence_in_session_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let store = SqliteStore::open(&db)?;
    let db_path = db.to_string_lossy();
    let mut lambda = Emulator::start(
        &workspace(),
        Path::new(env!("CARGO_BIN_EXE_presence")),
        &[("FLEET_BACKEND", "embedded"), ("FLEET_DB", &db_path), ("RUST_LOG", "info")],
        dir.path(),
    )?;
    let batch = lambda.invoke(&workspace().join("events/presence/sqs-out-of-order.json"))?;
    ensure!(batch == json!({"batchItemFailures": []}), "batch: {batch}");
    let direct = lambda.invoke(&workspace().join("events/presence/connected.json"))?;
    ensure!(
        direct == json!({"applied": 0, "stale": 1, "rejected": []}),
        "an older session's connect: {direct}"
    );
    let p = store.presence(&ThingName::parse("sensor-001")?).await?.context("sensor-001")?;
    ensure!(!p.connected && p.place.version == 5 && p.session_ms == Some(300_000), "{p:?}");
    Ok(())
}
