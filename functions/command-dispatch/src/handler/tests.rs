//! Handler tests on the embedded (SQLite, in-memory) store with a publisher that keeps what it
//! was asked to publish: the envelope a device receives is checked with the device-side
//! verifier.

use std::sync::Mutex;

use anyhow::{Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::commands::{CommandVerifier, ReplayState, VerifierConfig};
use fleet_shared::model::DeviceRegistration;
use fleet_shared::ports::DeviceAdmin;
use lambda_runtime::Context;

use super::*;

const SEND_REBOOT: &str = include_str!("../../../../events/command-dispatch/send-reboot.json");
const FLOAT_ARG: &str = include_str!("../../../../events/command-dispatch/invalid-float-arg.json");

const NOW: i64 = 1_764_000_000_000;

/// What IoT Core would have carried to the devices.
#[derive(Default)]
struct Published {
    messages: Mutex<Vec<(String, Vec<u8>)>>,
    fail: bool,
}

impl CommandPublisher for Published {
    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), StoreError> {
        if self.fail {
            return Err(StoreError::transient("iot-data publish", "ThrottlingException"));
        }
        self.messages.lock().expect("lock").push((topic.to_owned(), payload.to_vec()));
        Ok(())
    }
}

fn key() -> CommandSigner {
    CommandSigner::from_bytes("k1", &[7; 32]).expect("key")
}

async fn deps(fail: bool) -> Result<Deps<SqliteStore, Published, SqliteStore, SqliteStore>> {
    let db = SqliteStore::in_memory()?;
    let reg = DeviceRegistration {
        class: "sensor".into(),
        region: "eu-west".into(),
        fw: "1.0".into(),
        registered_at_ms: 1,
    };
    db.register(&[(ThingName::parse("sensor-001")?, reg)]).await?;
    Ok(Deps {
        commands: db.clone(),
        publisher: Published { fail, ..Published::default() },
        registry: db.clone(),
        health: db,
        signer: key(),
        clock: || NOW,
        metrics: MetricsOut::Off,
    })
}

async fn invoke<P: CommandPublisher>(
    deps: &Deps<SqliteStore, P, SqliteStore, SqliteStore>,
    event: &str,
) -> Result<Sent, DispatchError> {
    let payload = RawValue::from_string(event.to_owned()).expect("event JSON");
    handle(deps, LambdaEvent::new(payload, Context::default())).await
}

fn device() -> CommandVerifier {
    let config = VerifierConfig::new("sensor-001", vec![("k1".to_owned(), key().verifying_key())]);
    CommandVerifier::new(config, ReplayState::default()).expect("window")
}

#[tokio::test]
async fn a_command_is_signed_recorded_and_published_for_its_device_to_verify() -> Result<()> {
    // GIVEN a registered device
    let deps = deps(false).await?;
    // WHEN an operator sends it a reboot, twice
    let first = invoke(&deps, SEND_REBOOT).await?;
    let second = invoke(&deps, SEND_REBOOT).await?;
    // THEN each got the device's next seq, expiring after its ttl
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!(first.cmd_id, "c14a047d79f7f5f41-1", "the id the sample ack events name");
    assert_eq!((first.issued_at, first.expires_at), (NOW, NOW + 60_000));
    assert_eq!(first.topic, "cmd/fleet/sensor-001/req");
    // AND the device accepts what was published, in order
    let published = deps.publisher.messages.lock().expect("lock").clone();
    assert_eq!(published.len(), 2);
    let mut verifier = device();
    for (i, (_, payload)) in published.iter().enumerate() {
        let cmd = verifier.verify(payload, NOW + 100).map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(
            (cmd.seq, cmd.name.as_str(), cmd.args["delay_s"].as_u64()),
            (i as u64 + 1, "reboot", Some(5))
        );
    }
    // AND the record says sent, with the device's cohort
    let stored = deps.commands.command(&first.cmd_id).await?.context("recorded")?;
    assert_eq!((stored.status, stored.cohort.as_str()), (CommandStatus::Sent, "sensor/eu-west/-"));
    Ok(())
}

#[tokio::test]
async fn bad_commands_and_unknown_devices_are_refused_and_nothing_is_sent() -> Result<()> {
    let deps = deps(false).await?;
    let err = invoke(&deps, FLOAT_ARG).await.expect_err("a float argument");
    assert_eq!(err.error_type(), "InvalidCommand");
    for bad in [
        r#"{"thing":"sensor-999","name":"reboot"}"#,
        r#"{"thing":"sensor-001","name":"reboot","ttl_s":0}"#,
        r#"{"thing":"sensor-001","name":"reboot","ttl_s":86401}"#,
        r#"{"thing":"sensor-001","name":"re boot"}"#,
        r#"{"thing":"sensor 001","name":"reboot"}"#,
        r#"{"thing":"sensor-001","name":"reboot","unexpected":1}"#,
    ] {
        let err = invoke(&deps, bad).await.expect_err(bad);
        assert_eq!(err.error_type(), "InvalidCommand", "{bad}: {err}");
    }
    assert!(deps.publisher.messages.lock().expect("lock").is_empty());
    // No sequence number was spent on them: the next good command is the device's first.
    assert_eq!(invoke(&deps, SEND_REBOOT).await?.seq, 1);
    Ok(())
}

#[tokio::test]
async fn a_publish_that_fails_is_retryable_and_the_record_stays_sent() -> Result<()> {
    let deps = deps(true).await?;
    let err = invoke(&deps, SEND_REBOOT).await.expect_err("publish fails");
    assert_eq!(err.error_type(), "Retryable");
    let stored = deps.commands.commands_of(&ThingName::parse("sensor-001")?, 10).await?;
    assert_eq!(stored.len(), 1);
    let late = NOW + 60_000 + fleet_shared::commands::ACK_GRACE_MS + 1;
    assert_eq!(stored[0].shown_status(late), "expired", "never answered, so it expires");
    Ok(())
}
