//! End to end: the real `command-ack` bootstrap (this test build's binary, with the `embedded`
//! feature) polling cargo-lambda's runtime emulator, driven by `cargo lambda invoke
//! --data-file events/command-ack/...`; the SQLite file is read back.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::commands::{CommandRecord, CommandStatus};
use fleet_shared::lambda::emulator::Emulator;
use fleet_shared::ports::CommandStore;
use serde_json::json;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test]
#[ignore = "needs cargo-lambda, installed by scripts/test.sh"]
async fn cargo_lambda_invoke_settles_a_command_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let store = SqliteStore::open(&db)?;
    store
        .put_command(&CommandRecord {
            cmd_id: "c14a047d79f7f5f41-1".into(),
            thing: "sensor-001".into(),
            seq: 1,
            name: "reboot".into(),
            args: Default::default(),
            issued_at: 1_764_000_000_000,
            expires_at: 1_764_000_060_000,
            status: CommandStatus::Sent,
            acked_at: None,
            latency_ms: None,
            reason: None,
            result: None,
            cohort: "sensor/eu-west/-".into(),
        })
        .await?;
    let db_path = db.to_string_lossy();
    let mut lambda = Emulator::start(
        &workspace(),
        Path::new(env!("CARGO_BIN_EXE_command-ack")),
        &[("FLEET_BACKEND", "embedded"), ("FLEET_DB", &db_path), ("RUST_LOG", "info")],
        dir.path(),
    )?;
    let first = lambda.invoke(&workspace().join("events/command-ack/succeeded.json"))?;
    ensure!(
        first == json!({"outcome": "settled", "cmd_id": "c14a047d79f7f5f41-1", "latency_ms": 250}),
        "{first}"
    );
    let again = lambda.invoke(&workspace().join("events/command-ack/rejected-replay.json"))?;
    ensure!(again["outcome"] == "duplicate", "{again}");
    let malformed = lambda.invoke(&workspace().join("events/command-ack/malformed.json"))?;
    ensure!(malformed["outcome"] == "malformed", "{malformed}");
    let cmd = store.command("c14a047d79f7f5f41-1").await?.context("command")?;
    ensure!(cmd.status == CommandStatus::Succeeded, "{cmd:?}");
    Ok(())
}
