//! `fleetctl ota gate` on the embedded backend: a ledger written as fleet-health writes it
//! (closed minutes, then the evaluation that names the last one), read by the CLI.

use std::process::Command;

use anyhow::{ensure, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::health::ledger::HealthReport;
use fleet_shared::health::tally::{counter, Cohort, Tally};
use fleet_shared::ports::HealthLedger;
use serde_json::Value;

use crate::support::FLEETCTL;
const START: i64 = 29_400_000; // 2025-11-24T16:00Z in minutes

/// Two hours of ingest counts: the canary quarantines `canary_bad` of 1,000 messages a
/// minute, the control none.
async fn ledger(db: &std::path::Path, canary_bad: i64) -> Result<()> {
    let store = SqliteStore::open(db)?;
    let tally = |rx: i64, bad: i64| {
        let mut t = Tally::default();
        t.add(counter::RECEIVED, rx);
        t.add(counter::QUARANTINED, bad);
        t
    };
    let canary: Cohort = "sensor/eu-west/1.5.0".parse()?;
    let control: Cohort = "sensor/eu-west/1.4.2".parse()?;
    for i in 0..120 {
        let n = i + 1;
        let rows =
            [(canary.clone(), tally(1_000 * n, canary_bad * n)), (control.clone(), tally(1_000 * n, 0))];
        store.close_minute(START + i, &rows).await?;
    }
    store
        .put_health(&HealthReport {
            minute: START + 119,
            computed_at_ms: (START + 120) * 60_000,
            cohorts: vec![],
        })
        .await?;
    Ok(())
}

fn gate(db: &std::path::Path, json: bool) -> Result<String> {
    let mut cmd = Command::new(FLEETCTL);
    cmd.arg("--db").arg(db);
    if json {
        cmd.arg("--json");
    }
    let out = cmd
        .args(["ota", "gate", "--canary", "sensor/*/1.5.0", "--control", "sensor/*/1.4.2", "--slo", "ingest"])
        .env("FLEET_BACKEND", "embedded")
        .output()?;
    ensure!(out.status.success(), "fleetctl failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test]
async fn a_canary_burning_its_budget_is_rolled_back_and_a_healthy_one_advances() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // GIVEN a canary quarantining 1 % of its messages (10x the ingest SLO's budget)
    let burning = dir.path().join("burning.sqlite");
    ledger(&burning, 10).await?;
    // WHEN the gate is asked
    let answer: Value = serde_json::from_str(&gate(&burning, true)?)?;
    // THEN it says roll back, with the readings it judged over the last hour
    ensure!(answer["verdict"]["verdict"] == "roll_back", "{answer}");
    let slo = &answer["slos"][0];
    ensure!(slo["canary"]["total"] == 60_000 && slo["canary"]["good"] == 59_400, "{slo}");
    ensure!(slo["control"]["total"] == 60_000 && slo["control"]["good"] == 60_000, "{slo}");
    ensure!(answer["minute"] == START + 119, "{answer}");
    // AND a text run says so to an operator
    let text = gate(&burning, false)?;
    ensure!(text.contains("roll back: ingest: the canary burns 10.00x"), "{text}");

    // GIVEN a canary as clean as its control
    let healthy = dir.path().join("healthy.sqlite");
    ledger(&healthy, 0).await?;
    let text = gate(&healthy, false)?;
    ensure!(
        text.contains("advance: every SLO passes over the 60 min through the minute 2025-11-24T17:59"),
        "{text}"
    );
    Ok(())
}

#[test]
fn without_a_closed_minute_the_gate_says_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(FLEETCTL)
        .arg("--db")
        .arg(dir.path().join("empty.sqlite"))
        .args(["ota", "gate", "--canary", "sensor/*/1.5.0", "--control", "sensor/*/1.4.2"])
        .env("FLEET_BACKEND", "embedded")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("fleet-health has not closed a minute yet"), "{stderr}");
    Ok(())
}
