//! End to end: the real `cert-expiry-check` bootstrap (the binary this test build made, with
//! the `embedded` feature) polling cargo-lambda's runtime emulator, driven by
//! `cargo lambda invoke --data-file events/cert-expiry-check/scheduled-daily.json` and
//! `…/reconcile-weekly.json`.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::lambda::emulator::Emulator;
use fleet_shared::model::{CertStatus, Certificate, CertificateId, ThingName};
use fleet_shared::ports::{CertMarks, CertificateInventory, ReconcileProgress};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test]
#[ignore = "needs cargo-lambda, installed by scripts/test.sh"]
async fn cargo_lambda_invoke_runs_the_daily_check_on_the_embedded_backend() -> Result<()> {
    // GIVEN a certificate of sensor-001 expiring in 3 days, and one of sensor-002 in a year
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let store = SqliteStore::open(&db)?;
    let now = fleet_shared::time::now_ms();
    for (n, days) in [(1u8, 3), (2, 365)] {
        store
            .record(&Certificate {
                id: CertificateId::of_der(&[n]),
                thing: Some(ThingName::parse(&format!("sensor-00{n}"))?),
                serial: format!("{n:02x}"),
                issuer: "CN=ca".into(),
                subject: format!("CN=sensor-00{n}"),
                not_before_ms: 0,
                not_after_ms: now + days * 86_400_000,
                status: CertStatus::Active,
                recorded_ms: 0,
            })
            .await?;
    }
    let db_path = db.to_string_lossy();
    let mut lambda = Emulator::start(
        &workspace(),
        Path::new(env!("CARGO_BIN_EXE_cert-expiry-check")),
        &[("FLEET_BACKEND", "embedded"), ("FLEET_DB", &db_path), ("RUST_LOG", "info")],
        dir.path(),
    )?;
    // WHEN the scheduled event is invoked
    let s = lambda.invoke(&workspace().join("events/cert-expiry-check/scheduled-daily.json"))?;
    // THEN one critical certificate, read alone, and its device marked
    ensure!(s["critical"] == 1 && s["warning"] == 0 && s["read"] == 1, "{s}");
    let mark = store.cert_status(&ThingName::parse("sensor-001")?).await?.context("sensor-001 not marked")?;
    ensure!(mark.rotation_due, "{mark:?}");
    ensure!(store.cert_status(&ThingName::parse("sensor-002")?).await?.is_none(), "sensor-002 is fine");
    // AND the weekly schedule's event runs one reconciliation slice over the local registry
    // (empty here): finished in one slice, its cursor kept
    let r = lambda.invoke(&workspace().join("events/cert-expiry-check/reconcile-weekly.json"))?;
    ensure!(r["finished"] == true && r["slice"] == 1 && r["result"]["listed"] == 0, "{r}");
    ensure!(store.reconcile_state().await?.is_some_and(|s| s.finished_ms.is_some()), "no sweep recorded");
    Ok(())
}
