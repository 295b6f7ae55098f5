//! End to end: the real `provisioning-hook` bootstrap (the binary this test build made, with
//! the `embedded` feature) polling cargo-lambda's runtime emulator, driven by
//! `cargo lambda invoke --data-file events/provisioning-hook/...`, then the SQLite file is read.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::lambda::emulator::Emulator;
use fleet_shared::model::{AllowlistEntry, Enrolment, ThingName};
use fleet_shared::ports::{Allowlist, DeviceAdmin, ProvisioningAudit};
use serde_json::json;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn event(name: &str) -> PathBuf {
    workspace().join("events/provisioning-hook").join(name)
}

#[tokio::test]
#[ignore = "needs cargo-lambda, installed by scripts/test.sh"]
async fn cargo_lambda_invoke_allows_only_the_allowlisted_serial_and_records_it() -> Result<()> {
    // GIVEN sensor-101 on the allowlist of a fresh embedded database, and the hook's bootstrap
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let store = SqliteStore::open(&db)?;
    let serial = ThingName::parse("sensor-101")?;
    store
        .allow(&[AllowlistEntry {
            serial: serial.clone(),
            class: "env-sensor".into(),
            region: "eu-west".into(),
            added_ms: 1,
            enrolment: Enrolment::Allowed,
        }])
        .await?;
    let db_path = db.to_string_lossy();
    let mut lambda = Emulator::start(
        &workspace(),
        Path::new(env!("CARGO_BIN_EXE_provisioning-hook")),
        &[("FLEET_BACKEND", "embedded"), ("FLEET_DB", &db_path), ("RUST_LOG", "info")],
        dir.path(),
    )?;

    // WHEN the sample events are invoked
    let allowed = lambda.invoke(&event("allowed-serial.json"))?;
    let unknown = lambda.invoke(&event("unknown-serial.json"))?;
    let mismatch = lambda.invoke(&event("certificate-mismatch.json"))?;
    let malformed = lambda.invoke(&event("malformed.json"))?;

    // THEN only the allowlisted serial may provision, with its class and region
    ensure!(
        allowed
            == json!({"allowProvisioning": true,
                      "parameterOverrides": {"DeviceClass": "env-sensor", "DeviceRegion": "eu-west"}}),
        "allowed: {allowed}"
    );
    for r in [&unknown, &mismatch, &malformed] {
        ensure!(*r == json!({"allowProvisioning": false}), "refused: {r}");
    }
    // AND the serial is provisioned, the device registered, every decision audited
    let entry = store.entry(&serial).await?.context("entry")?;
    ensure!(matches!(entry.enrolment, Enrolment::Provisioned { .. }), "{entry:?}");
    ensure!(store.device(&serial).await?.and_then(|d| d.registration).is_some(), "not registered");
    let outcomes: Vec<String> = store.trail("sensor-101").await?.into_iter().map(|e| e.outcome).collect();
    ensure!(outcomes == ["allowed", "refused"], "sensor-101's trail: {outcomes:?}");
    Ok(())
}
