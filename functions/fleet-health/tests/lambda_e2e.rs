//! End to end: the real `fleet-health` bootstrap (this test build's binary, with the
//! `embedded` feature) polling cargo-lambda's runtime emulator, driven by
//! `cargo lambda invoke --data-file events/fleet-health/scheduled.json`; the SQLite file is
//! read back.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::health::tally::{counter, minute_of, Bucket, Cohort, HealthDelta};
use fleet_shared::lambda::emulator::Emulator;
use fleet_shared::ports::{HealthCounters, SloReader};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test]
#[ignore = "needs cargo-lambda, installed by scripts/test.sh"]
async fn cargo_lambda_invoke_closes_the_last_minute_into_the_ledger() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let store = SqliteStore::open(&db)?;
    // GIVEN 10 messages, 1 quarantined, counted in each of the last 3 minutes (the run closes
    // the last minute that ended 10 s ago: one of them, whatever the second now is)
    let now = minute_of(fleet_shared::time::now_ms());
    let cohort = Cohort::new("sensor", "eu-west", "1.0");
    let mut delta = HealthDelta::default();
    for minute in now - 3..now {
        delta.add(Bucket::Minute(minute), &cohort, counter::RECEIVED, 10);
        delta.add(Bucket::Minute(minute), &cohort, counter::QUARANTINED, 1);
    }
    store.add_health(&delta).await?;
    let db_path = db.to_string_lossy();
    let mut lambda = Emulator::start(
        &workspace(),
        Path::new(env!("CARGO_BIN_EXE_fleet-health")),
        &[("FLEET_BACKEND", "embedded"), ("FLEET_DB", &db_path), ("RUST_LOG", "info")],
        dir.path(),
    )?;
    // WHEN the schedule's event is invoked
    let answer = lambda.invoke(&workspace().join("events/fleet-health/scheduled.json"))?;
    ensure!(answer["minutes_closed"] == 1, "{answer}");
    // THEN the fleet's ingest SLO counts those messages
    let report = store.latest_health().await?.context("a report")?;
    let fleet = report.cohorts.iter().find(|c| c.cohort == Cohort::fleet()).context("fleet")?;
    let ingest = fleet.slos.iter().find(|s| s.slo == "ingest").context("ingest")?;
    ensure!((ingest.good, ingest.total) == (9, 10), "{ingest:?}");
    Ok(())
}
