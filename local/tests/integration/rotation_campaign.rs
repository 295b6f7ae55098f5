//! A certificate rotation campaign on the local IoT Core, end to end over real MQTT: devices
//! provisioned by claim with keys of their own are marked `rotation_due`; the campaign's stages
//! send them `fleetline.rotate_cert` jobs; each device (the demo's device side,
//! `SimulatedJobs::with_rotation`) makes a new key, rotates over its own connection, connects
//! with its new certificate and reports from there; presence retires the old certificates on
//! its own; each stage's gate passes once its devices are seen on their new certificates.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use fleet_shared::certs::expiry::ExpiryClass;
use fleet_shared::health::slo::Catalog;
use fleet_shared::model::{
    CertStatus, CertificateId, DeviceRegistration, Enrolment, ExecutionStatus, ThingName,
};
use fleet_shared::ota::campaign::{Campaign, CampaignSpec, Preconditions, State};
use fleet_shared::ota::device::{DeviceFirmware, SimulatedJobs, DEFAULT_MIN_BATTERY_PCT};
use fleet_shared::ota::engine::{Engine, RotationPorts};
use fleet_shared::ota::manifest::ManifestVerifier;
use fleet_shared::ports::{
    Allowlist, CampaignStore, CertMark, DeviceAdmin, DeviceCertStatus, JobsControl, PresenceReader,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

use crate::provisioning::{allow, provision_with_csr};
use crate::support::{eventually, subscribed};

/// The template's provisioning template, deployed with `Stage=dev`.
const TEMPLATE: &str = "fleetline-dev-devices";

/// A session of `thing` with certificate `cert`, subscribed to what `jobs` listens to (every
/// subscription acknowledged), having asked for its next job.
async fn session(
    mqtt: SocketAddr,
    thing: &ThingName,
    cert: &str,
    jobs: &mut SimulatedJobs,
) -> Result<(AsyncClient, EventLoop)> {
    let mut opts = MqttOptions::new(thing.as_str(), "127.0.0.1", mqtt.port());
    opts.set_credentials(format!("cert/{cert}"), "");
    let (client, mut events) = AsyncClient::new(opts, 16);
    jobs.connected_with(cert);
    subscribed(&client, &mut events, &jobs.subscriptions()).await?;
    let ask = jobs.start_next();
    client.publish(ask.topic, QoS::AtLeastOnce, false, ask.payload).await?;
    Ok((client, events))
}

/// A sensor on 1.4.2 that runs its jobs, rotating when told to, as firmware would: it connects
/// with its current certificate; given a new one it stores it (here: keeps it), leaves, comes
/// back with it, and reports the rotation from there. Returns the certificates it connected
/// with, in order, once its rotation is reported and accepted.
async fn rotating_device(mqtt: SocketAddr, thing: ThingName, first: CertificateId) -> Result<Vec<String>> {
    let device = DeviceFirmware {
        class: "sensor".into(),
        fw: "1.4.2".into(),
        battery_pct: Some(80.0),
        min_battery_pct: DEFAULT_MIN_BATTERY_PCT,
    };
    let mut jobs =
        SimulatedJobs::new(thing.as_str(), device, ManifestVerifier::new(vec![])).with_rotation(TEMPLATE);
    let mut used = vec![first.as_str().to_owned()];
    loop {
        let cert = used.last().context("a certificate")?.clone();
        let (client, mut events) = session(mqtt, &thing, &cert, &mut jobs).await?;
        let rotated = loop {
            let event =
                tokio::time::timeout(CAMPAIGN_PATIENCE, events.poll()).await.context(thing.to_string())??;
            let Event::Incoming(Packet::Publish(p)) = event else { continue };
            let reaction = jobs.receive(&p.topic, &p.payload);
            if let Some(m) = reaction.publish {
                client.publish(m.topic, QoS::AtLeastOnce, false, m.payload).await?;
            }
            if reaction.rotate.is_some() || (jobs.rotated > 0 && p.topic.ends_with("/update/accepted")) {
                break reaction.rotate;
            }
        };
        client.disconnect().await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while events.poll().await.is_ok() {} })
            .await;
        match rotated {
            Some(new) => used.push(new.certificate_id),
            None => return Ok(used),
        }
    }
}

const CAMPAIGN_PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_campaign_moves_the_devices_due_to_new_certificates_stage_by_stage() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = crate::support::start(&dir.path().join("fleet.sqlite")).await?;
    // GIVEN five sensors on 1.4.2 provisioned by claim with keys of their own, four of them
    // marked rotation due by the daily expiry check
    let mut certs = Vec::new();
    for i in 0..5 {
        let serial = format!("sensor-k{i:02}");
        allow(&stack, &serial).await?;
        let cert = provision_with_csr(&stack, &serial).await?;
        let thing = ThingName::parse(&serial)?;
        let registration = DeviceRegistration {
            class: "sensor".into(),
            region: "eu-west".into(),
            fw: "1.4.2".into(),
            registered_at_ms: 1,
        };
        stack.store.register(&[(thing.clone(), registration)]).await?;
        certs.push((thing, cert));
    }
    let marks: Vec<(ThingName, CertMark)> = certs[..4]
        .iter()
        .map(|(t, c)| {
            let mark = CertMark {
                certificate: c.clone(),
                class: ExpiryClass::Warning,
                not_after_ms: fleet_shared::time::now_ms() + 20 * 86_400_000,
                rotation_due: true,
                checked_ms: fleet_shared::time::now_ms(),
            };
            (t.clone(), mark)
        })
        .collect();
    stack.store.mark_cert_status(&marks).await?;
    // AND the four running, connected with their current certificates
    let devices: Vec<_> = certs[..4]
        .iter()
        .map(|(t, c)| {
            let (mqtt, t, c) = (stack.mqtt, t.clone(), c.clone());
            tokio::spawn(async move { rotating_device(mqtt, t, c).await })
        })
        .collect();
    // WHEN a rotation campaign of 50 %, 100 % runs, ticked as the orchestrator ticks it
    let spec = CampaignSpec {
        stages: vec![50, 100],
        soak_minutes: 0,
        preconditions: Preconditions { min_battery_pct: None, seen_within_minutes: None },
        ..CampaignSpec::rotation("rotate-k", "sensor", "1.4.2")
    };
    stack.store.put_campaign(&Campaign::rotation(spec, fleet_shared::time::now_ms())?).await?;
    let (catalog, verifier) = (Catalog::builtin(), ManifestVerifier::new(vec![]));
    let db = &stack.store;
    let rotation = RotationPorts::of(db);
    let engine = Engine::over(db, &rotation, &catalog, &verifier);
    let deadline = tokio::time::Instant::now() + CAMPAIGN_PATIENCE;
    let campaign = loop {
        let mut c = stack.store.campaign("rotate-k").await?.context("stored")?;
        engine.tick(&mut c, fleet_shared::time::now_ms()).await?;
        // The local orchestrator ticks it too, on IoT Jobs' events: the later write loses, and
        // the next round reads again, as the orchestrator itself does.
        match stack.store.put_campaign(&c).await {
            Err(e) if e.kind == fleet_shared::error::ErrorKind::Conflict => {
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "every write lost: {e}");
                continue;
            }
            other => other?,
        };
        if c.state.is_final() || c.paused.is_some() || tokio::time::Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // THEN it completes, two stages of two devices, each stage's gate passed
    assert_eq!(campaign.state, State::Completed, "{:?}", campaign.log);
    assert_eq!((campaign.population, campaign.targeted, campaign.jobs.len()), (4, 4, 2));
    // AND every device connected with a new certificate its serial is provisioned with, which
    // its rotation job names, while its old one was retired on its own
    for (device, (thing, old)) in devices.into_iter().zip(&certs) {
        let used = device.await??;
        let new = CertificateId::parse(used.last().context("used")?)?;
        assert_eq!(used.len(), 2, "{thing}: {used:?}");
        let entry = stack.store.entry(thing).await?.context("entry")?;
        assert!(
            matches!(&entry.enrolment, Enrolment::Provisioned { certificate, .. } if *certificate == new),
            "{thing}: {entry:?}"
        );
        let presence = stack.store.presence(thing).await?.context("presence")?;
        assert_eq!(presence.principal.as_deref(), Some(new.as_str()), "{thing}");
        let retired = eventually(async || {
            let status = stack.store.local_certificate_status(old).await?;
            Ok((status == Some(CertStatus::Inactive)).then_some(()))
        })
        .await;
        assert!(
            retired.is_ok(),
            "{thing}: {old} still {:?}",
            stack.store.local_certificate_status(old).await?
        );
        let mut reported = None;
        for job in &campaign.jobs {
            if let Some(e) = stack.store.describe_job_execution(thing, job, None).await? {
                reported = e.status_details.get("certificate").cloned();
            }
        }
        assert_eq!(reported.as_deref(), Some(new.as_str()), "{thing}: the job names the new certificate");
    }
    // AND the device not due got no job
    for job in &campaign.jobs {
        let reached = stack.store.job_executions(job).await?;
        assert!(
            reached.iter().all(|(t, s)| *t != certs[4].0 && *s == ExecutionStatus::Succeeded),
            "{reached:?}"
        );
    }
    stack.shutdown().await
}
