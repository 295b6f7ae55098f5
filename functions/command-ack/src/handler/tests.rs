//! Handler tests on the embedded (SQLite, in-memory) store: the sample acks of
//! `events/command-ack/` against a command recorded as command-dispatch records it.

use anyhow::{Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::commands::{CommandRecord, CommandStatus};
use fleet_shared::health::tally::{latency_bucket, latency_counter, minute_of, Bucket};
use fleet_shared::ports::HealthLedger;
use lambda_runtime::Context;
use serde_json::Map;

use super::*;

const SUCCEEDED: &str = include_str!("../../../../events/command-ack/succeeded.json");
const REJECTED: &str = include_str!("../../../../events/command-ack/rejected-replay.json");
const MALFORMED: &str = include_str!("../../../../events/command-ack/malformed.json");

const ISSUED: i64 = 1_764_000_000_000;

async fn deps() -> Result<Deps<SqliteStore, SqliteStore>> {
    let db = SqliteStore::in_memory()?;
    db.put_command(&CommandRecord {
        cmd_id: "c14a047d79f7f5f41-1".into(),
        thing: "sensor-001".into(),
        seq: 1,
        name: "reboot".into(),
        args: Map::new(),
        issued_at: ISSUED,
        expires_at: ISSUED + 60_000,
        status: CommandStatus::Sent,
        acked_at: None,
        latency_ms: None,
        reason: None,
        result: None,
        cohort: "sensor/eu-west/-".into(),
    })
    .await?;
    Ok(Deps { commands: db.clone(), health: db, clock: || ISSUED + 1_000, metrics: MetricsOut::Off })
}

async fn invoke(deps: &Deps<SqliteStore, SqliteStore>, event: &str) -> Result<Answer> {
    let payload = RawValue::from_string(event.to_owned())?;
    Ok(handle(deps, LambdaEvent::new(payload, Context::default())).await?)
}

#[tokio::test]
async fn an_ack_settles_its_command_once_and_measures_delivery_latency() -> Result<()> {
    let deps = deps().await?;
    // WHEN the device's ack arrives 250 ms after the command was issued
    let answer = invoke(&deps, SUCCEEDED).await?;
    // THEN the command is settled with its result and latency
    assert_eq!((answer.outcome, answer.latency_ms), (Outcome::Settled, Some(250)));
    let cmd = deps.commands.command("c14a047d79f7f5f41-1").await?.context("command")?;
    assert_eq!((cmd.status, cmd.latency_ms), (CommandStatus::Succeeded, Some(250)));
    assert_eq!(cmd.result.context("result")?["uptime_s"], 3);
    // AND fleet health counts one command delivered within 250 ms, in the device's cohort
    let minute = Bucket::Minute(minute_of(ISSUED + 250));
    let counts = deps.health.buckets(&[minute]).await?;
    let cohort: Cohort = "sensor/eu-west/-".parse()?;
    assert_eq!(counts[&minute][&cohort].get(&latency_counter(latency_bucket(250))), 1);
    // AND a second ack for it (the replayed command's rejection) is a counted duplicate
    assert_eq!(invoke(&deps, REJECTED).await?.outcome, Outcome::Duplicate);
    let cmd = deps.commands.command("c14a047d79f7f5f41-1").await?.context("command")?;
    assert_eq!(cmd.status, CommandStatus::Succeeded, "the first ack stands");
    Ok(())
}

#[tokio::test]
async fn unknown_late_and_malformed_acks_change_nothing() -> Result<()> {
    let deps = deps().await?;
    assert_eq!(invoke(&deps, MALFORMED).await?.outcome, Outcome::Malformed);
    // Another device cannot settle sensor-001's command.
    let other = SUCCEEDED.replace("\"thing\": \"sensor-001\"", "\"thing\": \"sensor-002\"");
    assert_eq!(invoke(&deps, &other).await?.outcome, Outcome::Unknown);
    let nobody = SUCCEEDED.replace("c14a047d79f7f5f41-1", "c0000000000000000-9");
    assert_eq!(invoke(&deps, &nobody).await?.outcome, Outcome::Unknown);
    // Too late: after expiry and its grace.
    let late = SUCCEEDED
        .replace("1764000000250", &(ISSUED + 60_000 + fleet_shared::commands::ACK_GRACE_MS + 1).to_string());
    assert_eq!(invoke(&deps, &late).await?.outcome, Outcome::Expired);
    let cmd = deps.commands.command("c14a047d79f7f5f41-1").await?.context("command")?;
    assert_eq!(cmd.status, CommandStatus::Sent);
    // The device refusing a replayed copy does not settle it: its own ack may still come.
    assert_eq!(invoke(&deps, REJECTED).await?.outcome, Outcome::Duplicate);
    let cmd = deps.commands.command("c14a047d79f7f5f41-1").await?.context("command")?;
    assert_eq!(cmd.status, CommandStatus::Sent);
    Ok(())
}
