//! End to end: the real `command-dispatch` bootstrap (this test build's binary, with the
//! `embedded` feature) polling cargo-lambda's runtime emulator, driven by `cargo lambda invoke
//! --data-file events/command-dispatch/...`. No broker listens, so a valid command is signed
//! and recorded but cannot be published: a retryable error, the record left `sent`. (Delivery
//! to devices is tested on the local IoT Core: cli/tests/integration/local_stack.rs.)

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::lambda::emulator::Emulator;
use fleet_shared::model::{DeviceRegistration, ThingName};
use fleet_shared::ports::{CommandStore, DeviceAdmin};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test]
#[ignore = "needs cargo-lambda, installed by scripts/test.sh"]
async fn cargo_lambda_invoke_signs_and_records_and_refuses_bad_commands() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let store = SqliteStore::open(&db)?;
    let reg = DeviceRegistration {
        class: "sensor".into(),
        region: "eu-west".into(),
        fw: "1.0".into(),
        registered_at_ms: 1,
    };
    store.register(&[(ThingName::parse("sensor-001")?, reg)]).await?;
    let key = dir.path().join("command.key");
    std::fs::write(&key, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=")?;
    // A port nothing listens on: the broker is "down".
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    drop(std::net::TcpListener::bind(closed));
    let (db_path, key_path, mqtt) = (db.to_string_lossy(), key.to_string_lossy(), closed.to_string());
    let mut lambda = Emulator::start(
        &workspace(),
        Path::new(env!("CARGO_BIN_EXE_command-dispatch")),
        &[
            ("FLEET_BACKEND", "embedded"),
            ("FLEET_DB", &db_path),
            ("FLEET_COMMAND_KEY_FILE", &key_path),
            ("FLEET_COMMAND_KEY_ID", "k1"),
            ("FLEET_MQTT_ADDR", &mqtt),
            ("RUST_LOG", "info"),
        ],
        dir.path(),
    )?;
    let refused = lambda.invoke(&workspace().join("events/command-dispatch/invalid-float-arg.json"));
    ensure!(refused.as_ref().is_err_and(|e| e.to_string().contains("InvalidCommand")), "{refused:?}");
    let sent = lambda.invoke(&workspace().join("events/command-dispatch/send-reboot.json"));
    ensure!(sent.as_ref().is_err_and(|e| e.to_string().contains("Retryable")), "{sent:?}");
    let recorded = store.commands_of(&ThingName::parse("sensor-001")?, 10).await?;
    ensure!(recorded.len() == 1 && recorded[0].seq == 1 && recorded[0].name == "reboot", "{recorded:?}");
    Ok(())
}
