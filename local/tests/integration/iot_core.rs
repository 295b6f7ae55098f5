//! The local IoT Core in-process with real MQTT clients: the template's device policy on every
//! publish, `clientid()` in rule SQL, and lifecycle events on `$aws/events/presence/…`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use fleet_local::stats::Snapshot;
use fleet_local::LocalStack;
use fleet_shared::model::ThingName;
use fleet_shared::ports::{DeviceAdmin, QuarantineReader};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::support::{client, start, until};

/// Poll the stack's counters until `done` holds (10 s at most); the snapshot that held.
async fn settled(stack: &LocalStack, done: impl Fn(&Snapshot) -> bool) -> Result<Snapshot> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = stack.stats.snapshot(fleet_shared::time::now_ms());
        if done(&s) {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("not settled: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn presence(event: &Event) -> Option<Value> {
    match event {
        Event::Incoming(Packet::Publish(p)) if p.topic.starts_with("$aws/events/presence/") => {
            serde_json::from_slice(&p.payload).ok()
        }
        _ => None,
    }
}

fn reading() -> String {
    let now = fleet_shared::time::now_ms();
    format!(r#"{{"v":1,"seq":1,"boot":1,"ts":{now},"fw":"1.4.2","m":{{"temp_c":21.5}}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_held_to_their_own_topics_and_their_sessions_are_announced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;

    // GIVEN an operator watching the lifecycle events
    let (operator, mut operator_events) = client(&stack, "ops-console", Some("operator"));
    operator.subscribe("$aws/events/presence/#", QoS::AtLeastOnce).await?;
    until(&mut operator_events, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await?;

    // WHEN sensor-001 connects, publishes on its own topic, then on sensor-002's and on a
    // reserved topic, and disconnects
    let (device, mut device_events) = client(&stack, "sensor-001", None);
    device.publish("dt/fleet/sensor-001/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    until(&mut device_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    let connected = until(&mut operator_events, presence).await?;
    device.publish("dt/fleet/sensor-002/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    device.publish("$aws/events/presence/connected/sensor-002", QoS::AtLeastOnce, false, "{}").await?;
    for _ in 0..2 {
        until(&mut device_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    }
    device.disconnect().await?;
    let _ = until(&mut device_events, |e| {
        matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)).then_some(())
    })
    .await;
    drop(device_events);
    let disconnected = until(&mut operator_events, presence).await?;

    // AND an operator tool publishes telemetry in a device's name
    operator.publish("dt/fleet/sensor-003/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    until(&mut operator_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    // AND a client whose id is not a thing name (it would make the policy's thing-name
    // variable a wildcard) tries to connect as a device
    let (_wild, mut wild_events) = client(&stack, "+", None);
    let wild = tokio::time::timeout(Duration::from_secs(10), wild_events.poll()).await?;
    let stats = std::sync::Arc::clone(&stack.stats);
    let store = stack.store.clone();
    stack.shutdown().await?;

    // THEN the session was announced as IoT Core announces it, connect and disconnect sharing
    // one version number
    assert_eq!(connected["eventType"], "connected", "{connected}");
    assert_eq!(connected["clientId"], "sensor-001");
    assert_eq!(connected["ipAddress"], "127.0.0.1");
    assert!(connected["versionNumber"].as_i64().is_some_and(|v| v > 0), "{connected}");
    assert_eq!(disconnected["eventType"], "disconnected", "{disconnected}");
    assert_eq!(disconnected["disconnectReason"], "CLIENT_INITIATED_DISCONNECT");
    assert_eq!(disconnected["clientInitiatedDisconnect"], true);
    assert_eq!(disconnected["versionNumber"], connected["versionNumber"]);
    assert_eq!(disconnected["sessionIdentifier"], connected["sessionIdentifier"]);
    // AND the device policy refused both foreign publishes (nothing of them reached the rules)
    // and the wildcard client id
    assert!(wild.is_err(), "a client id `+` connected: {wild:?}");
    assert_eq!(stats.snapshot(0).refused_by_policy, 3);
    let own = store.device(&ThingName::parse("sensor-001")?).await?.context("sensor-001 stored")?;
    assert!(own.state.is_some(), "{own:?}");
    if store.device(&ThingName::parse("sensor-002")?).await?.is_some() {
        bail!("a device wrote sensor-002's telemetry");
    }
    // AND the rule's clientid() is the publisher's: the tool's reading is quarantined as a
    // thing mismatch, not stored as sensor-003's
    let quarantined = store.quarantined(0).await?;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].reasons[0].reason.as_str(), "thing_mismatch", "{quarantined:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_of_exactly_128_kib_is_stored_and_one_byte_more_reaches_no_rule() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let mut opts = MqttOptions::new("sensor-001", "127.0.0.1", stack.mqtt.port());
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (device, mut events) = AsyncClient::new(opts, 16);
    // GIVEN valid readings padded to exactly 128 KiB, and to one byte more
    let padded = |seq: u64, len: usize| {
        let now = fleet_shared::time::now_ms();
        let head = format!(r#"{{"v":1,"seq":{seq},"boot":1,"ts":{now},"m":{{"temp_c":21.5}},"pad":""#);
        format!("{head}{}\"}}", "x".repeat(len - head.len() - 2))
    };
    let limit = fleet_shared::ingest::envelope::MAX_PAYLOAD_BYTES;
    let (exact, over) = (padded(1, limit), padded(2, limit + 1));
    assert_eq!((exact.len(), over.len()), (limit, limit + 1));
    // WHEN both are published
    for payload in [exact, over] {
        device.publish("dt/fleet/sensor-001/telemetry", QoS::AtLeastOnce, false, payload).await?;
        until(&mut events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    }
    // THEN the first is stored, the second refused at the broker and never routed
    let s = settled(&stack, |s| {
        s.metric("Accepted") >= 1 && s.payload_too_large >= 1 && s.metric("Connects") >= 1
    })
    .await?;
    assert_eq!((s.metric("Accepted"), s.metric("Quarantined"), s.payload_too_large), (1, 0, 1), "{s:?}");
    // Routed: the stored reading and the device's connect (the presence rule), nothing else.
    assert_eq!((s.routed, s.metric("Connects")), (2, 1), "{s:?}");
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_utf8_is_quarantined_with_its_original_bytes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let (device, mut events) = client(&stack, "sensor-001", None);
    // GIVEN a payload that is not UTF-8 (no SQS message or Lambda event can carry it)
    let bytes: Vec<u8> = [&b"{\"v\":1,\"fw\":\""[..], &[0xc3, 0x28, 0xff], b"\"}"].concat();
    // WHEN it is published
    device.publish("dt/fleet/sensor-001/telemetry", QoS::AtLeastOnce, false, bytes.clone()).await?;
    until(&mut events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    // THEN the rule's error action keeps it: quarantined byte for byte, with its thing and topic
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(line) = stack.store.quarantined(0).await?.into_iter().next() {
            break line;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nothing quarantined");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line.original(), bytes);
    assert!(line.body.is_none() && line.body_b64.is_some(), "{line:?}");
    assert_eq!(line.reasons[0].reason, fleet_shared::ingest::Reason::InvalidUtf8);
    assert_eq!(line.thing.as_deref(), Some("sensor-001"));
    assert_eq!(line.topic.as_deref(), Some("dt/fleet/sensor-001/telemetry"));
    assert_eq!(stack.stats.snapshot(0).rule_errors, 1);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_ingest_goes_straight_to_the_rule_and_no_subscriber_sees_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    // GIVEN an operator subscribed to everything under $aws/rules/
    let (operator, mut operator_events) = client(&stack, "ops-console", Some("operator"));
    operator.subscribe("$aws/rules/#", QoS::AtLeastOnce).await?;
    until(&mut operator_events, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await?;
    // WHEN sensor-001 publishes its reading through Basic Ingest (the rule's deployed name,
    // Stage at its default), and tries another thing's Basic Ingest topic
    let (device, mut events) = client(&stack, "sensor-001", None);
    let own = "$aws/rules/fleetline_dev_telemetry/dt/fleet/sensor-001/telemetry";
    device.publish(own, QoS::AtLeastOnce, false, reading()).await?;
    until(&mut events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    let other = "$aws/rules/fleetline_dev_telemetry/dt/fleet/sensor-002/telemetry";
    device.publish(other, QoS::AtLeastOnce, false, reading()).await?;
    // (the client sends only while its event loop is polled)
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    // THEN the reading is stored as sensor-001's (the rule saw the topic without the prefix),
    // the other thing's topic is refused by the device policy
    settled(&stack, |s| s.metric("Accepted") >= 1 && s.refused_by_policy >= 1).await?;
    let thing = ThingName::parse("sensor-001")?;
    let state = stack.store.device(&thing).await?.and_then(|d| d.state).context("sensor-001 state")?;
    assert_eq!(state.seq, 1);
    // AND the subscriber saw nothing of it
    let seen = tokio::time::timeout(
        Duration::from_millis(500),
        until(&mut operator_events, |e| match e {
            Event::Incoming(Packet::Publish(p)) => Some(p.topic.clone()),
            _ => None,
        }),
    )
    .await;
    assert!(seen.is_err(), "a subscriber received a Basic Ingest message: {seen:?}");
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_documents_published_on_the_shadow_topics_reach_twin_sync() -> Result<()> {
    use fleet_shared::model::ShadowName;
    use fleet_shared::ports::TwinStore;
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    // GIVEN the documents AWS's shadow service publishes for a classic and a named shadow
    // (published here by an operator: the local shadow service is not built yet)
    let (operator, mut events) = client(&stack, "ops-console", Some("operator"));
    let documents = |version: u64, desired: &str, reported: &str| {
        serde_json::json!({"previous": null, "timestamp": 1_764_000_000,
            "current": {"state": {"desired": {"fw": desired}, "reported": {"fw": reported}},
                        "metadata": {}, "version": version}})
        .to_string()
    };
    let classic = "$aws/things/sensor-001/shadow/update/documents";
    let named = "$aws/things/sensor-001/shadow/name/config/update/documents";
    operator.publish(classic, QoS::AtLeastOnce, false, documents(2, "1.5.0", "1.4.2")).await?;
    operator.publish(named, QoS::AtLeastOnce, false, documents(4, "a", "a")).await?;
    operator.publish(classic, QoS::AtLeastOnce, false, documents(1, "1.5.0", "1.5.0")).await?;
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    // THEN the rules add thing and shadow from the topic, and twin-sync mirrors both twins,
    // the stale version 1 changing nothing
    let thing = ThingName::parse("sensor-001")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let classic = stack.store.twin(&thing, &ShadowName::classic()).await?;
        let named = stack.store.twin(&thing, &ShadowName::parse("config")?).await?;
        if let (Some(c), Some(n)) = (&classic, &named) {
            if stack.stats.snapshot(0).metric("StaleIgnored") >= 1 {
                assert_eq!((c.version, c.drift_keys()), (2, vec!["fw".to_owned()]));
                assert_eq!((n.version, n.drift_since_ms), (4, None));
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("twins not synced: {classic:?} {named:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_keeps_its_shadow_over_mqtt_and_twin_sync_mirrors_it() -> Result<()> {
    use fleet_shared::model::ShadowName;
    use fleet_shared::ports::TwinStore;
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let (device, mut events) = client(&stack, "sensor-001", None);
    device.subscribe("$aws/things/sensor-001/shadow/#", QoS::AtLeastOnce).await?;
    until(&mut events, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await?;
    let answer = |topic: &'static str| {
        move |e: &Event| match e {
            Event::Incoming(Packet::Publish(p)) if p.topic == topic => {
                serde_json::from_slice::<Value>(&p.payload).ok()
            }
            _ => None,
        }
    };
    // WHEN an operator's desired firmware and the device's report go through the shadow topics
    let update = "$aws/things/sensor-001/shadow/update";
    let desired = r#"{"state":{"desired":{"fw":"1.5.0"}},"clientToken":"ops-1"}"#;
    device.publish(update, QoS::AtLeastOnce, false, desired).await?;
    let accepted = until(&mut events, answer("$aws/things/sensor-001/shadow/update/accepted")).await?;
    assert_eq!((accepted["version"].as_u64(), &accepted["clientToken"]), (Some(1), &Value::from("ops-1")));
    let delta = until(&mut events, answer("$aws/things/sensor-001/shadow/update/delta")).await?;
    assert_eq!(delta["state"]["fw"], "1.5.0");
    // a stale version is refused with 409
    device
        .publish(update, QoS::AtLeastOnce, false, r#"{"state":{"reported":{"fw":"1.4.2"}},"version":7}"#)
        .await?;
    let rejected = until(&mut events, answer("$aws/things/sensor-001/shadow/update/rejected")).await?;
    assert_eq!(rejected["code"], 409);
    // a state node other than desired and reported (a typo) is refused with 400, as on AWS
    device
        .publish(
            update,
            QoS::AtLeastOnce,
            false,
            r#"{"state":{"reportd":{"fw":"1.4.2"}},"clientToken":"d-2"}"#,
        )
        .await?;
    let rejected = until(&mut events, answer("$aws/things/sensor-001/shadow/update/rejected")).await?;
    assert_eq!(
        (&rejected["code"], &rejected["message"], &rejected["clientToken"]),
        (&Value::from(400), &Value::from("State contains an invalid node: 'reportd'"), &Value::from("d-2"))
    );
    device
        .publish(update, QoS::AtLeastOnce, false, r#"{"state":{"reported":{"fw":"1.4.2"}},"version":1}"#)
        .await?;
    until(&mut events, answer("$aws/things/sensor-001/shadow/update/accepted")).await?;
    // a device cannot forge the service's documents
    device.publish("$aws/things/sensor-001/shadow/update/documents", QoS::AtLeastOnce, false, "{}").await?;
    // THEN twin-sync mirrors version 2, drifting on fw
    let thing = ThingName::parse("sensor-001")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let twin = loop {
        if let Some(t) = stack.store.twin(&thing, &ShadowName::classic()).await?.filter(|t| t.version == 2) {
            break t;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("twin not at version 2: {:?}", stack.store.twin(&thing, &ShadowName::classic()).await?);
        }
        // keep the client's event loop turning
        let _ = tokio::time::timeout(Duration::from_millis(50), events.poll()).await;
    };
    assert_eq!(twin.drift_keys(), ["fw"]);
    assert!(stack.stats.snapshot(0).refused_by_policy >= 1, "the forged documents were not refused");
    // AND get after delete answers 404
    device.publish("$aws/things/sensor-001/shadow/delete", QoS::AtLeastOnce, false, "").await?;
    until(&mut events, answer("$aws/things/sensor-001/shadow/delete/accepted")).await?;
    device.publish("$aws/things/sensor-001/shadow/get", QoS::AtLeastOnce, false, "").await?;
    let missing = until(&mut events, answer("$aws/things/sensor-001/shadow/get/rejected")).await?;
    assert_eq!(missing["code"], 404);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_operator_writes_are_each_applied_or_reported_and_none_is_lost() -> Result<()> {
    use fleet_local::shadow_client::MqttShadows;
    use fleet_shared::model::ShadowName;
    use fleet_shared::ports::ShadowService;
    use fleet_shared::twin::write::{set_desired, WriteOutcome};
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let svc = std::sync::Arc::new(MqttShadows::connect(stack.mqtt));
    let thing = ThingName::parse("sensor-001")?;
    // WHEN 50 writers each set their own desired key on one shadow at once
    let writers = (0..50).map(|i| {
        let (svc, thing) = (std::sync::Arc::clone(&svc), thing.clone());
        tokio::spawn(async move {
            let patch = serde_json::json!({ format!("w{i}"): i }).as_object().cloned().unwrap_or_default();
            (i, set_desired(&*svc, &thing, &ShadowName::classic(), &patch, &format!("writer-{i}")).await)
        })
    });
    let mut applied = Vec::new();
    let mut gave_up = 0;
    for w in writers.collect::<Vec<_>>() {
        match w.await? {
            (i, Ok(WriteOutcome::Applied { version, .. })) => applied.push((i, version)),
            (_, Ok(WriteOutcome::GaveUp { .. })) => gave_up += 1,
            (i, other) => bail!("writer {i}: {other:?}"),
        }
    }
    // THEN each is applied at a version of its own or reported as given up, and the final
    // document holds every applied write
    assert_eq!(applied.len() + gave_up, 50);
    let mut versions: Vec<u64> = applied.iter().map(|(_, v)| *v).collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), applied.len(), "two writes reported the same version");
    let shadow = svc.get_shadow(&thing, &ShadowName::classic()).await?.context("no shadow")?;
    for (i, _) in &applied {
        assert_eq!(shadow.desired.get(&format!("w{i}")), Some(&Value::from(*i)), "applied write {i} lost");
    }
    assert_eq!(shadow.version, applied.len() as u64, "one version per applied write");
    assert!(applied.len() >= 25, "only {} of 50 applied: the backoff does not spread writers", applied.len());
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_outlive_a_restart_and_a_deleted_one_continues_its_versions() -> Result<()> {
    use fleet_local::shadow_client::MqttShadows;
    use fleet_shared::model::ShadowName;
    use fleet_shared::ports::ShadowService;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let (thing, config) = (ThingName::parse("sensor-001")?, ShadowName::parse("config")?);
    let update = |state: Value| serde_json::json!({ "state": state });

    // GIVEN a classic shadow at version 2 and a named one deleted at version 1
    let stack = start(&db).await?;
    let svc = MqttShadows::connect(stack.mqtt);
    svc.update_shadow(
        &thing,
        &ShadowName::classic(),
        &update(serde_json::json!({"desired": {"mode": "eco"}})),
    )
    .await?;
    svc.update_shadow(
        &thing,
        &ShadowName::classic(),
        &update(serde_json::json!({"reported": {"mode": "on"}})),
    )
    .await?;
    svc.update_shadow(&thing, &config, &update(serde_json::json!({"reported": {"rate_s": 60}}))).await?;
    assert_eq!(svc.delete_shadow(&thing, &config).await?, Some(1));
    drop(svc);
    stack.shutdown().await?;

    // WHEN the local IoT Core starts again on the same database
    let stack = start(&db).await?;
    let svc = MqttShadows::connect(stack.mqtt);

    // THEN the classic shadow is there as it was
    let classic = svc.get_shadow(&thing, &ShadowName::classic()).await?.context("classic shadow lost")?;
    assert_eq!(classic.version, 2);
    assert_eq!(
        (classic.desired["mode"].as_str(), classic.reported["mode"].as_str()),
        (Some("eco"), Some("on"))
    );
    // AND the deleted one is still gone (a second delete finds nothing), and continues at 2
    assert!(svc.get_shadow(&thing, &config).await?.is_none());
    assert_eq!(svc.delete_shadow(&thing, &config).await?, None);
    let v =
        svc.update_shadow(&thing, &config, &update(serde_json::json!({"reported": {"rate_s": 30}}))).await?;
    assert_eq!(v, 2);
    drop(svc);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_policy_removes_a_desired_key_the_device_never_took_from_its_shadow() -> Result<()> {
    use fleet_local::shadow_client::MqttShadows;
    use fleet_shared::model::{ShadowName, StaleAction};
    use fleet_shared::ports::{ShadowService, TwinPolicies, TwinStore};
    use fleet_shared::twin::policy::StalePolicy;
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let thing = ThingName::parse("sensor-001")?;
    let classic = ShadowName::classic();
    // GIVEN a policy: mode is released after 10 minutes of drift
    stack.store.set_policy(&StalePolicy::new("mode", 600_000, StaleAction::Release)?).await?;
    // AND a shadow desiring mode eco while the device reports on, mirrored as a twin
    let svc = MqttShadows::connect(stack.mqtt);
    let doc = serde_json::json!({"state": {"desired": {"mode": "eco"}, "reported": {"mode": "on"}}});
    assert_eq!(svc.update_shadow(&thing, &classic, &doc).await?, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut twin = loop {
        if let Some(t) = stack.store.twin(&thing, &classic).await? {
            break t;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the twin never appeared");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // AND that drift an hour old (the twin's history moved back, as if written an hour ago)
    for d in twin.history.versions.values_mut() {
        d.at_ms -= 3_600_000;
    }
    twin.drift_since_ms = twin.drift_since_ms.map(|s| s - 3_600_000);
    twin.revision += 1;
    assert!(stack.store.put_twin(&twin).await?, "the backdated twin is stored");

    // WHEN twin-sync's scheduled sweep runs
    let swept = stack.run_schedule("TwinSyncFunction").await?;

    // THEN mode is marked and released: the shadow no longer desires it (no delta is sent)
    assert_eq!(
        (&swept["diverged"], &swept["released"], &swept["release_failed"]),
        (&1.into(), &1.into(), &0.into()),
        "{swept}"
    );
    let shadow = svc.get_shadow(&thing, &classic).await?.context("shadow")?;
    assert!(!shadow.desired.contains_key("mode") && shadow.version == 2, "{shadow:?}");
    // AND the twin records what was given up, once the release's documents reach twin-sync
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let twin = stack.store.twin(&thing, &classic).await?.context("twin")?;
        if twin.version == 2 {
            let mode = twin.diverged.get("mode").context("mode's divergence kept")?;
            assert!(mode.released && mode.desired == "eco" && mode.reported == Some("on".into()), "{mode:?}");
            assert!(twin.delta.is_empty() && twin.drift_since_ms.is_none(), "{twin:?}");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the release never reached the twin: {twin:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // AND a second sweep has nothing left to do
    let again = stack.run_schedule("TwinSyncFunction").await?;
    assert_eq!((&again["diverged"], &again["released"]), (&0.into(), &0.into()), "{again}");
    drop(svc);
    stack.shutdown().await
}
