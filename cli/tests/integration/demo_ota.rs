//! `fleetctl demo` devices take OTA jobs as real ones do, the real binary on free loopback
//! ports: jobs created through `JobsControl` on the demo's database (as a campaign's stage
//! creates them, from another process) reach its devices; the one signed by the local firmware
//! key is installed (SUCCEEDED, and the device's telemetry from then on reports the new
//! firmware), those signed by other keys are REJECTED, and one whose image is not the released
//! one FAILED; the report counts them. `--ota` leaves a campaign per class of the devices on
//! FROM, pending, with manifests those devices accept.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::model::{ExecutionStatus, JobId, NewJob, ThingName};
use fleet_shared::ota::campaign::State;
use fleet_shared::ota::device::{demo_image, run_job, Action, DeviceFirmware};
use fleet_shared::ota::engine::job_document;
use fleet_shared::ota::manifest::{
    verifying_key_from_text, ManifestSigner, ManifestVerifier, UnsignedManifest,
};
use fleet_shared::ports::{CampaignStore, DeviceAdmin, JobsControl};
use serde_json::{json, Value};

use crate::support::{workspace, FLEETCTL};

/// A running `fleetctl demo`, killed on drop if the test ends first.
struct Demo {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Demo {
    fn start(dir: &Path, db: &Path, args: &[&str]) -> Result<Self> {
        let (stdout, stderr) = (dir.join("demo.json"), dir.join("demo.log"));
        let child = Command::new(FLEETCTL)
            .arg("--db")
            .arg(db)
            .args(["--json", "demo", "--mqtt-port", "0", "--http-port", "0", "--template"])
            .arg(workspace().join("infra/template.yaml"))
            .args(args)
            .env("FLEET_BACKEND", "embedded")
            .env_remove("FLEET_FIRMWARE_KEYS")
            .stdout(Stdio::from(std::fs::File::create(&stdout)?))
            .stderr(Stdio::from(std::fs::File::create(&stderr)?))
            .spawn()?;
        Ok(Self { child: Some(child), stdout, stderr })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Fail at once if the demo has already exited.
    fn running(&mut self) -> Result<()> {
        if let Some(status) = self.child.as_mut().context("reaped")?.try_wait()? {
            bail!("the demo exited early ({status}): {}", self.log());
        }
        Ok(())
    }

    /// Wait for the demo to end (`limit` at most); its JSON report.
    async fn report(mut self, limit: Duration) -> Result<Value> {
        let mut child = self.child.take().context("reaped")?;
        let deadline = tokio::time::Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the demo did not end within {limit:?}: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ensure!(status.success(), "the demo failed ({status}): {}", self.log());
        Ok(serde_json::from_str(&std::fs::read_to_string(&self.stdout)?)?)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Poll `check` every 100 ms for up to `limit`, failing early if the demo stopped.
async fn eventually<T>(
    demo: &mut Demo,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(t) = check().await? {
            return Ok(t);
        }
        demo.running()?;
        if tokio::time::Instant::now() > deadline {
            bail!("timed out: {}", demo.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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
        document: job_document("test", &manifest),
        description: format!("{class} {fw}"),
        max_per_minute: None,
        in_progress_timeout_minutes: Some(10),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_devices_install_a_job_signed_by_the_local_firmware_key_and_refuse_the_others() -> Result<()> {
    // GIVEN fleetctl demo with 4 devices (sim-00000 env-sensor on 1.4.2, sim-00001 air-quality
    // on 2.0.1, sim-00002 gateway on 1.4.2, sim-00003 env-sensor on 2.0.1) and --ota 1.4.2:1.5.0
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let mut demo = Demo::start(
        dir.path(),
        &db,
        // (the campaigns left to the orchestrator's schedule: this test's own jobs go to the
        // devices they would pick)
        &["--devices", "4", "--duration", "15s", "--rate", "2", "--ota", "1.4.2:1.5.0", "--ota-every", "0s"],
    )?;
    // (its firmware key, made on first start after the database, and its devices' telemetry)
    let key_file = fleet_local::firmware_key_file(&db);
    let local = eventually(&mut demo, Duration::from_secs(30), async || {
        Ok(key_file.exists().then(|| fleet_local::firmware_signer(&db).ok()).flatten())
    })
    .await?;
    let store = SqliteStore::open(&db)?;
    let things: Vec<ThingName> =
        (0..4).map(|i| ThingName::parse(&format!("sim-{i:05}"))).collect::<Result<_, _>>()?;
    let boot_before = eventually(&mut demo, Duration::from_secs(20), async || {
        let mut boots = Vec::new();
        for t in &things {
            match store.device(t).await?.and_then(|d| d.state) {
                Some(s) => boots.push(s.boot),
                None => return Ok(None),
            }
        }
        Ok(Some(boots[0]))
    })
    .await?;

    // WHEN jobs are created on its database: 1.5.0 for sim-00000 signed by the local firmware
    // key; for sim-00001 signed by an impostor under the local kid; for sim-00002 by a key of
    // another kid; for sim-00003 signed by the local key over an image that is not the release
    let impostor = ManifestSigner::from_bytes(fleet_local::FIRMWARE_KEY_ID, &[9; 32])?;
    let other = ManifestSigner::from_bytes("other-fw", &[9; 32])?;
    let jobs = [
        job("ota-install", &things[0], &local, "env-sensor", "1.5.0", &demo_image("env-sensor", "1.5.0"))?,
        job(
            "ota-forged",
            &things[1],
            &impostor,
            "air-quality",
            "2.1.0",
            &demo_image("air-quality", "2.1.0"),
        )?,
        job("ota-unknown-kid", &things[2], &other, "gateway", "1.5.0", &demo_image("gateway", "1.5.0"))?,
        job("ota-corrupt", &things[3], &local, "env-sensor", "2.1.0", &demo_image("env-sensor", "2.1.1"))?,
    ];
    for j in &jobs {
        store.create_job(j).await?;
    }

    // THEN each execution ends as the device decided, with its reason
    let mut ended = Vec::new();
    for (thing, j) in things.iter().zip(&jobs) {
        let e = eventually(&mut demo, Duration::from_secs(15), async || {
            let e = store.describe_job_execution(thing, &j.job_id, None).await?.context("the execution")?;
            Ok((!matches!(e.status, ExecutionStatus::Queued | ExecutionStatus::InProgress)).then_some(e))
        })
        .await
        .with_context(|| format!("{} for {thing}", j.job_id))?;
        let detail = |k: &str| e.status_details.get(k).cloned().unwrap_or_default();
        ended.push((e.status, detail("reason"), detail("result"), detail("fw")));
    }
    let text = |s: &str| s.to_owned();
    assert_eq!(
        ended,
        [
            (ExecutionStatus::Succeeded, text(""), text("installed"), text("1.5.0")),
            (ExecutionStatus::Rejected, text("bad_signature"), text(""), text("")),
            (ExecutionStatus::Rejected, text("unknown_kid"), text(""), text("")),
            (ExecutionStatus::Failed, text("digest_mismatch"), text(""), text("")),
        ]
    );
    // AND sim-00000's next telemetry, from a new boot, reports 1.5.0; the others keep theirs
    let state = eventually(&mut demo, Duration::from_secs(10), async || {
        Ok(store.device(&things[0]).await?.and_then(|d| d.state).filter(|s| s.fw.as_deref() == Some("1.5.0")))
    })
    .await?;
    ensure!(state.boot > boot_before, "rebooted on 1.5.0: boot {} after {boot_before}", state.boot);

    // WHEN the demo ends
    let report = demo.report(Duration::from_secs(90)).await?;
    // THEN its report counts what the devices did, still reconciled, and the firmware they report
    assert_eq!(
        (
            &report["reconciled"],
            &report["ota_installed"],
            &report["ota_already_installed"],
            &report["ota_rejected"],
            &report["ota_failed"]
        ),
        (
            &json!(true),
            &json!(1),
            &json!(0),
            &json!({"bad_signature": 1, "unknown_kid": 1}),
            &json!({"digest_mismatch": 1})
        ),
        "{report:#}"
    );
    assert_eq!(report["firmware_reported"], json!({"1.4.2": 1, "1.5.0": 1, "2.0.1": 2}), "{report:#}");
    for (thing, fw) in things.iter().zip(["1.5.0", "2.0.1", "1.4.2", "2.0.1"]) {
        let reported = store.device(thing).await?.and_then(|d| d.state).and_then(|s| s.fw);
        ensure!(reported.as_deref() == Some(fw), "{thing}: {reported:?}");
    }

    // AND --ota left a pending campaign per class on 1.4.2, sized for a demo, whose manifests
    // verify under the local firmware key and install on a device of that class
    let ids = ["demo-env-sensor-1_5_0", "demo-gateway-1_5_0"];
    assert_eq!(report["ota_campaigns"], json!(ids));
    assert_eq!(report["ota_ticks"], json!(0), "--ota-every 0s never ticks");
    let var = fleet_local::firmware_keys_var(&db)?;
    let (kid, public) = var.split_once('=').context("kid=key")?;
    let trusted = ManifestVerifier::new(vec![(kid.to_owned(), verifying_key_from_text(public)?)]);
    for (id, class) in ids.into_iter().zip(["env-sensor", "gateway"]) {
        let c = store.campaign(id).await?.with_context(|| format!("campaign {id}"))?;
        assert_eq!(c.state, State::Pending, "{id}");
        let s = &c.spec;
        assert_eq!(
            (s.class.as_str(), s.from_fw.as_str(), s.to_fw.as_str(), &s.stages, s.soak_minutes),
            (class, "1.4.2", "1.5.0", &vec![10, 50, 100], 1)
        );
        assert_eq!((s.gate.window_minutes, s.gate.min_events), (5, 20));
        assert_eq!((s.preconditions.min_battery_pct, s.preconditions.seen_within_minutes), (None, None));
        let (firmware, rollback) = c.manifests().context("a firmware campaign's manifests")?;
        trusted.verify(firmware)?;
        trusted.verify(rollback)?;
        let device = DeviceFirmware {
            class: class.into(),
            fw: "1.4.2".into(),
            battery_pct: None,
            min_battery_pct: 20.0,
        };
        let document = job_document(id, firmware).to_string();
        let outcome = run_job(&document, &device, &trusted, |m| Ok(demo_image(m.class(), m.fw())));
        assert_eq!(outcome.action, Action::Install { fw: "1.5.0".into() }, "{id}: {outcome:?}");
    }
    // AND the firmware key is its owner's only
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "mode {mode:o}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_ticks_its_campaigns_so_stage_one_installs_while_devices_publish() -> Result<()> {
    // GIVEN a demo of 20 devices (even ones on 1.4.2: 4 env-sensors, 3 air-quality, 3
    // gateways) with --ota 1.4.2:1.5.0 ticked every 2 s
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let demo = Demo::start(
        dir.path(),
        &db,
        &["--devices", "20", "--duration", "20s", "--rate", "1", "--ota", "1.4.2:1.5.0", "--ota-every", "2s"],
    )?;
    // WHEN it ends
    let report = demo.report(Duration::from_secs(120)).await?;
    // THEN the orchestrator ran, and each class's stage 1 (10 %: one device) went out and installed
    ensure!(report["ota_ticks"].as_u64().is_some_and(|n| n >= 5), "{report:#}");
    let store = SqliteStore::open(&db)?;
    let ids = ["demo-air-quality-1_5_0", "demo-env-sensor-1_5_0", "demo-gateway-1_5_0"];
    assert_eq!(report["ota_campaigns"], json!(ids), "{report:#}");
    let mut installed = Vec::new();
    for (id, population) in ids.into_iter().zip([3, 4, 3]) {
        let c = store.campaign(id).await?.with_context(|| format!("campaign {id}"))?;
        ensure!(
            matches!(c.state, State::Stage(_)) && c.paused.is_none(),
            "{id}: {:?} {:?}",
            c.state,
            c.paused
        );
        assert_eq!((c.targeted, c.population), (1, population), "{id}");
        let executions = store.job_executions(&c.spec.stage_job(0)).await?;
        assert_eq!(executions.len(), 1, "{id}: {executions:?}");
        ensure!(executions[0].1 == ExecutionStatus::Succeeded, "{id}: {executions:?}\n{report:#}");
        installed.push(executions[0].0.clone());
        let shown = &report["ota_campaign_states"][id];
        assert_eq!(shown, &json!(format!("stage: 1 of {population} devices targeted")), "{report:#}");
    }
    // AND the report counts the three installs, and those devices now report 1.5.0
    assert_eq!(report["ota_installed"], json!(3), "{report:#}");
    for thing in &installed {
        let fw = store.device(thing).await?.and_then(|d| d.state).and_then(|s| s.fw);
        ensure!(fw.as_deref() == Some("1.5.0"), "{thing}: {fw:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_devices_provision_one_after_another_and_connect_with_their_own_certificates() -> Result<()> {
    use fleet_shared::model::Enrolment;
    use fleet_shared::ports::{Allowlist, PresenceReader};
    // GIVEN a demo of 6 devices holding only the provisioning claim
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let demo =
        Demo::start(dir.path(), &db, &["--provision", "--devices", "6", "--duration", "8s", "--rate", "1"])?;
    // WHEN it ends
    let report = demo.report(Duration::from_secs(120)).await?;
    // THEN every device provisioned itself (each claim session leaves the answers to the next
    // once its device is back on its own certificate under the same client id)
    assert_eq!(report["provisioned"], json!(6), "{report:#}");
    // AND each one's presence names the certificate its serial is provisioned with
    let store = SqliteStore::open(&db)?;
    for i in 0..6 {
        let thing = fleet_shared::ingest::sim::thing_name(i);
        let thing = ThingName::parse(&thing)?;
        let entry = store.entry(&thing).await?.with_context(|| format!("{thing}: no entry"))?;
        let Enrolment::Provisioned { certificate, .. } = entry.enrolment else { bail!("{thing}: {entry:?}") };
        let principal = store.presence(&thing).await?.and_then(|p| p.principal);
        assert_eq!(principal.as_deref(), Some(certificate.as_str()), "{thing}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rotate_every_demo_device_moves_to_a_new_certificate_and_the_old_one_is_retired() -> Result<()> {
    use fleet_shared::model::{CertStatus, Enrolment};
    use fleet_shared::ports::{Allowlist, CertificateInventory, PresenceReader};
    // GIVEN a demo of 6 devices that provision themselves, with --rotate, ticked every 2 s
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let args = ["--rotate", "--devices", "6", "--duration", "30s", "--rate", "1", "--ota-every", "2s"];
    let demo = Demo::start(dir.path(), &db, &args)?;
    // WHEN it ends
    let report = demo.report(Duration::from_secs(180)).await?;
    // THEN all six provisioned and rotated, and every message still reconciles
    assert_eq!(report["provisioned"], json!(6), "{report:#}");
    assert_eq!(report["certificates_rotated"], json!(6), "{report:#}");
    assert_eq!(report["reconciled"], json!(true), "{report:#}");
    // AND a rotation campaign per class and firmware completed
    let states = report["ota_campaign_states"].as_object().context("campaign states")?;
    assert_eq!(states.len(), 6, "{report:#}");
    assert!(
        states.iter().all(|(id, s)| id.starts_with("demo-rotate-")
            && s.as_str().is_some_and(|s| s.starts_with("completed"))),
        "{states:?}"
    );
    // AND each device's serial is provisioned with an active certificate its latest session
    // used, while the one it provisioned with first (marked due: 20 days) is inactive
    let store = SqliteStore::open(&db)?;
    let now = fleet_shared::time::now_ms();
    let certificates = store.expiring(now - 86_400_000, now + 30 * 86_400_000, 100).await?;
    for i in 0..6 {
        let thing = ThingName::parse(&fleet_shared::ingest::sim::thing_name(i))?;
        let entry = store.entry(&thing).await?.with_context(|| format!("{thing}: no entry"))?;
        let Enrolment::Provisioned { certificate, .. } = entry.enrolment else { bail!("{thing}: {entry:?}") };
        let principal = store.presence(&thing).await?.and_then(|p| p.principal);
        assert_eq!(principal.as_deref(), Some(certificate.as_str()), "{thing}");
        let mut held: Vec<(String, CertStatus)> = certificates
            .iter()
            .filter(|c| c.thing.as_ref() == Some(&thing))
            .map(|c| (c.id.as_str().to_owned(), c.status))
            .collect();
        held.sort_by_key(|(id, _)| id.as_str() != certificate.as_str());
        assert_eq!(held.len(), 2, "{thing}: {held:?}");
        assert_eq!(held[0], (certificate.as_str().to_owned(), CertStatus::Active), "{thing}: {held:?}");
        assert_eq!(held[1].1, CertStatus::Inactive, "{thing}: {held:?}");
    }
    Ok(())
}
