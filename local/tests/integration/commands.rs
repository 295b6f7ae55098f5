//! Signed commands on the local IoT Core, end to end: command-dispatch signs and publishes, a
//! simulated device (the demo's command handling) verifies, obeys and acknowledges, command-ack
//! settles the command; a raw `mosquitto_pub` replay of the same envelope is refused by the
//! device and counted, and its rejection changes nothing in the cloud. The device's connect and
//! disconnect reach presence and fleet health's connected gauge.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use fleet_local::LocalStack;
use fleet_shared::commands::sim::SimulatedCommands;
use fleet_shared::commands::{request_topic, CommandStatus, CommandVerifier, ReplayState, VerifierConfig};
use fleet_shared::model::{DeviceRegistration, ThingName};
use fleet_shared::ports::{CommandStore, DeviceAdmin, PresenceReader};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

use crate::support::{eventually, start};

/// Devices connected, by fleet health's gauge.
async fn connected(stack: &LocalStack) -> Result<i64> {
    use fleet_shared::health::tally::{counter, Bucket};
    use fleet_shared::ports::HealthLedger;
    let gauges = stack.store.buckets(&[Bucket::Gauge]).await?;
    Ok(gauges.get(&Bucket::Gauge).map_or(0, |g| g.values().map(|t| t.get(counter::CONNECTED)).sum()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto_pub (mosquitto-clients), installed by scripts/test.sh"]
async fn a_device_connects_obeys_a_signed_command_once_refuses_its_mosquitto_replay_and_disconnects(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let thing = ThingName::parse("sensor-001")?;
    let reg = DeviceRegistration {
        class: "sensor".into(),
        region: "eu-west".into(),
        fw: "1.0".into(),
        registered_at_ms: 1,
    };
    stack.store.register(&[(thing.clone(), reg)]).await?;

    // GIVEN a device trusting the stack's command key, subscribed to its request topic
    let (kid, key) = stack.command_key.clone();
    let config = VerifierConfig::new(thing.as_str(), vec![(kid, key)]);
    let device = Arc::new(Mutex::new(SimulatedCommands::new(
        thing.as_str(),
        CommandVerifier::new(config, ReplayState::default()).expect("window"),
    )));
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let mut opts = MqttOptions::new(thing.as_str(), "127.0.0.1", stack.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 16);
    client.subscribe(request_topic(thing.as_str()), QoS::AtLeastOnce).await?;
    let (answers, seen, requests) = (client.clone(), Arc::clone(&received), request_topic(thing.as_str()));
    let handler = Arc::clone(&device);
    let loop_task = tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                if p.topic == requests {
                    seen.lock().expect("lock").push(p.payload.to_vec());
                    let answer =
                        handler.lock().expect("lock").receive(&p.payload, fleet_shared::time::now_ms());
                    if let Some(ack) = answer.ack {
                        let _ = answers.try_publish(answer.topic, QoS::AtLeastOnce, false, ack.to_json());
                    }
                }
            }
        }
    });
    // (the subscription is in place before the first command)
    tokio::time::sleep(Duration::from_millis(300)).await;
    // AND its connection reached presence (the lifecycle event, its rule, the function) and
    // fleet health's connected gauge
    eventually(async || Ok(stack.store.presence(&thing).await?.filter(|p| p.connected))).await?;
    eventually(async || Ok((connected(&stack).await? == 1).then_some(()))).await?;

    // WHEN the operator sends it a ping through command-dispatch
    let sent =
        stack.invoke("CommandDispatchFunction", &json!({"thing": "sensor-001", "name": "ping"})).await?;
    let cmd_id = sent["cmd_id"].as_str().context("cmd_id")?.to_owned();
    // THEN the device obeys, and its ack settles the command with a latency
    let settled = eventually(async || {
        let c = stack.store.command(&cmd_id).await?.context("recorded")?;
        Ok((c.status != CommandStatus::Sent).then_some(c))
    })
    .await?;
    ensure!(settled.status == CommandStatus::Succeeded, "{settled:?}");
    ensure!(settled.latency_ms.is_some_and(|l| (0..10_000).contains(&l)), "{settled:?}");
    ensure!(settled.result.as_ref().is_some_and(|r| r.contains_key("pong")), "{settled:?}");

    // WHEN the same envelope is replayed by a raw MQTT client
    let envelope = received.lock().expect("lock").first().cloned().context("the device got the command")?;
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &stack.mqtt.port().to_string(), "-q", "1"])
        .args(["-u", "operator", "-i", "replayer", "-t", &request_topic(thing.as_str())])
        .arg("-m")
        .arg(String::from_utf8(envelope)?)
        .output()
        .context("running mosquitto_pub (scripts/test.sh installs mosquitto-clients)")?;
    ensure!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
    // THEN the device refuses it as a replay and counts it; it obeyed once
    eventually(async || Ok((device.lock().expect("lock").refused.get("replayed") == Some(&1)).then_some(())))
        .await?;
    ensure!(device.lock().expect("lock").obeyed == 1, "obeyed once");
    // AND its `rejected` ack reaches command-ack, which counts a duplicate and keeps the result
    eventually(async || Ok((stack.stats.metric("AcksDuplicate") == 1).then_some(()))).await?;
    let after = stack.store.command(&cmd_id).await?.context("recorded")?;
    ensure!(after.status == CommandStatus::Succeeded, "{after:?}");

    // WHEN the device disconnects, THEN presence says so, with the session's length, and it
    // no longer counts as connected
    client.disconnect().await?;
    let ended = eventually(async || Ok(stack.store.presence(&thing).await?.filter(|p| !p.connected))).await?;
    ensure!(ended.session_ms.is_some(), "{ended:?}");
    eventually(async || Ok((connected(&stack).await? == 0).then_some(()))).await?;
    loop_task.abort();
    stack.shutdown().await?;
    Ok(())
}
