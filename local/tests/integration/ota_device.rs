//! OTA jobs on the local IoT Core, end to end with the demo's device side
//! (`fleet_shared::ota::device::SimulatedJobs`) over real MQTT: a job created through
//! `JobsControl` (as a campaign's stage creates it) with a manifest signed by the local
//! firmware key reaches the device, which installs it and reports SUCCEEDED, and whose next
//! telemetry stores the new firmware; the same firmware sent again succeeds without an install;
//! a job signed by another key is REJECTED. The firmware key is made on first start and kept.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use fleet_local::LocalStack;
use fleet_shared::model::{DeviceRegistration, ExecutionStatus, JobId, NewJob, ThingName};
use fleet_shared::ota::device::{demo_image, DeviceFirmware, SimulatedJobs, DEFAULT_MIN_BATTERY_PCT};
use fleet_shared::ota::engine::job_document;
use fleet_shared::ota::manifest::{ManifestSigner, ManifestVerifier, UnsignedManifest};
use fleet_shared::ports::{DeviceAdmin, JobsControl};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

use crate::support::{eventually, start, subscribed};

/// A job for `thing` installing `class`/`fw`, its manifest over `image` signed by `key`.
fn job(
    id: &str,
    thing: &ThingName,
    key: &ManifestSigner,
    class: &str,
    fw: &str,
    image: &[u8],
) -> Result<NewJob> {
    let url = format!("https://firmware.example.com/{class}/{fw}.bin");
    let manifest = key.sign(UnsignedManifest::for_image(fw, class, url, image))?;
    Ok(NewJob {
        job_id: JobId::parse(id)?,
        targets: vec![thing.clone()],
        document: job_document("c1", &manifest),
        description: format!("{class} {fw}"),
        max_per_minute: None,
        in_progress_timeout_minutes: Some(10),
    })
}

/// A connected simulated device running `jobs`: what it installed, and its MQTT client.
struct Device {
    jobs: Arc<Mutex<SimulatedJobs>>,
    installs: Arc<Mutex<Vec<String>>>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connect as `thing`, subscribe to its jobs topics, then ask for its next job, as the
    /// demo's devices do; installs are recorded (the device "reboots" on them) before the
    /// answer goes out.
    async fn connect(stack: &LocalStack, thing: &ThingName, jobs: SimulatedJobs) -> Result<Self> {
        let mut opts = MqttOptions::new(thing.as_str(), "127.0.0.1", stack.mqtt.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(opts, 16);
        subscribed(&client, &mut events, &jobs.subscriptions()).await?;
        let jobs = Arc::new(Mutex::new(jobs));
        let installs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (handler, installed, answers) = (Arc::clone(&jobs), Arc::clone(&installs), client.clone());
        let task = tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let reaction = handler.lock().expect("lock").receive(&p.topic, &p.payload);
                    if let Some(fw) = reaction.install {
                        installed.lock().expect("lock").push(fw);
                    }
                    if let Some(m) = reaction.publish {
                        let _ = answers.try_publish(m.topic, QoS::AtLeastOnce, false, m.payload);
                    }
                }
            }
        });
        let ask = jobs.lock().expect("lock").start_next();
        client.publish(ask.topic, QoS::AtLeastOnce, false, ask.payload).await?;
        Ok(Self { jobs, installs, client, task })
    }

    fn fw(&self) -> String {
        self.jobs.lock().expect("lock").fw().to_owned()
    }

    /// One v1 telemetry message on the firmware the device runs now.
    async fn publish_telemetry(&self, thing: &ThingName, boot: u32) -> Result<()> {
        let payload = json!({"v": 1, "seq": 1, "boot": boot, "ts": fleet_shared::time::now_ms(), "fw": self.fw(),
                             "m": {"temp_c": 21.5}, "bat": 80});
        let topic = format!("dt/fleet/{thing}/telemetry");
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_string()).await?;
        Ok(())
    }

    async fn stop(self) -> Result<()> {
        self.client.disconnect().await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
        Ok(())
    }
}

/// A simulated sensor on `fw` trusting `trusted`.
fn sensor(thing: &ThingName, fw: &str, trusted: &ManifestVerifier) -> SimulatedJobs {
    let device = DeviceFirmware {
        class: "sensor".into(),
        fw: fw.into(),
        battery_pct: Some(80.0),
        min_battery_pct: DEFAULT_MIN_BATTERY_PCT,
    };
    SimulatedJobs::new(thing.as_str(), device, trusted.clone())
}

/// The execution of `job` for `thing` once it is terminal: its status and details.
async fn finished(
    stack: &LocalStack,
    thing: &ThingName,
    job: &str,
) -> Result<(ExecutionStatus, std::collections::BTreeMap<String, String>)> {
    let job = JobId::parse(job)?;
    eventually(async || {
        let e = stack.store.describe_job_execution(thing, &job, None).await?.context("the execution")?;
        let pending = matches!(e.status, ExecutionStatus::Queued | ExecutionStatus::InProgress);
        Ok((!pending).then_some((e.status, e.status_details)))
    })
    .await
    .with_context(|| format!("{job} for {thing} did not finish"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_installs_a_job_signed_by_the_local_firmware_key_and_refuses_one_signed_by_another(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let stack = start(&db).await?;
    let (one, two) = (ThingName::parse("sensor-001")?, ThingName::parse("sensor-002")?);
    let reg = DeviceRegistration {
        class: "sensor".into(),
        region: "eu-west".into(),
        fw: "1.4.2".into(),
        registered_at_ms: 1,
    };
    stack.store.register(&[(one.clone(), reg.clone()), (two.clone(), reg)]).await?;

    // GIVEN two sensors on 1.4.2 trusting the local firmware key, connected and listening
    let local = fleet_local::firmware_signer(&db)?;
    let trusted = ManifestVerifier::new(vec![(local.kid().to_owned(), local.verifying_key())]);
    let first = Device::connect(&stack, &one, sensor(&one, "1.4.2", &trusted)).await?;
    let second = Device::connect(&stack, &two, sensor(&two, "1.4.2", &trusted)).await?;
    first.publish_telemetry(&one, 1).await?;
    eventually(async || Ok(stack.store.device(&one).await?.and_then(|d| d.state).filter(|s| s.boot == 1)))
        .await?;

    // WHEN a job for the first, signed by the local firmware key, is created through the
    // control plane, and one for the second signed by an impostor's key under the same kid
    let image = demo_image("sensor", "1.5.0");
    stack.store.create_job(&job("fw-150-a", &one, &local, "sensor", "1.5.0", &image)?).await?;
    let impostor = ManifestSigner::from_bytes(fleet_local::FIRMWARE_KEY_ID, &[9; 32])?;
    stack.store.create_job(&job("fw-150-b", &two, &impostor, "sensor", "1.5.0", &image)?).await?;

    // THEN the first device installs 1.5.0 and its execution SUCCEEDED, saying so
    let (status, details) = finished(&stack, &one, "fw-150-a").await?;
    ensure!(status == ExecutionStatus::Succeeded, "{status:?} {details:?}");
    ensure!(details.get("fw").map(String::as_str) == Some("1.5.0"), "{details:?}");
    ensure!(details.get("result").map(String::as_str) == Some("installed"), "{details:?}");
    ensure!(*first.installs.lock().expect("lock") == ["1.5.0"], "installed once");
    // AND its next telemetry, from the boot on the new firmware, stores 1.5.0 as its firmware
    first.publish_telemetry(&one, 2).await?;
    let state = eventually(async || {
        Ok(stack.store.device(&one).await?.and_then(|d| d.state).filter(|s| s.boot == 2))
    })
    .await?;
    ensure!(state.fw.as_deref() == Some("1.5.0"), "{state:?}");
    // AND the second refused its job for the signature, and installed nothing
    let (status, details) = finished(&stack, &two, "fw-150-b").await?;
    ensure!(status == ExecutionStatus::Rejected, "{status:?} {details:?}");
    let reason = details.get("reason").map(String::as_str);
    ensure!(matches!(reason, Some("bad_signature" | "unknown_kid")), "{details:?}");
    ensure!(second.installs.lock().expect("lock").is_empty() && second.fw() == "1.4.2", "installed nothing");

    // WHEN the first device is sent 1.5.0 again (told on notify-next while connected)
    stack.store.create_job(&job("fw-150-again", &one, &local, "sensor", "1.5.0", &image)?).await?;
    // THEN it succeeds as already installed, without installing again
    let (status, details) = finished(&stack, &one, "fw-150-again").await?;
    ensure!(status == ExecutionStatus::Succeeded, "{status:?} {details:?}");
    ensure!(details.get("result").map(String::as_str) == Some("already_installed"), "{details:?}");
    ensure!(first.installs.lock().expect("lock").len() == 1, "no second install");
    let counts = {
        let jobs = first.jobs.lock().expect("lock");
        (jobs.installed, jobs.already_installed)
    };
    ensure!(counts == (1, 1), "{counts:?}");

    first.stop().await?;
    second.stop().await?;
    stack.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_iot_core_makes_its_firmware_key_on_first_start_and_keeps_it() -> Result<()> {
    // GIVEN a database the local IoT Core has never run on
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let file = fleet_local::firmware_key_file(&db);
    ensure!(file == dir.path().join("fleet.sqlite.firmware-key"), "{}", file.display());
    ensure!(!file.exists(), "no key yet");

    // WHEN it starts, stops and starts again
    start(&db).await?.shutdown().await?;
    let made = std::fs::read_to_string(&file)?;
    let var = fleet_local::firmware_keys_var(&db)?;
    start(&db).await?.shutdown().await?;

    // THEN the key was made once: 32 bytes in base64, readable by its owner only, the same key
    // after the restart, and the variable trusts its public half under kid local-fw
    let seed = base64::engine::general_purpose::STANDARD.decode(made.trim())?;
    ensure!(seed.len() == 32, "{} bytes", seed.len());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "mode {mode:o}");
    }
    ensure!(std::fs::read_to_string(&file)? == made, "the key changed on restart");
    let public = ManifestSigner::from_text("local-fw", &made)?.verifying_key();
    let expected =
        format!("local-fw={}", base64::engine::general_purpose::STANDARD.encode(public.as_bytes()));
    ensure!(var == expected, "{var} != {expected}");
    ensure!(fleet_local::firmware_keys_var(&db)? == var, "the variable changed on restart");
    Ok(())
}
