//! `fleetctl ota` campaigns on the embedded backend: created from two signed manifests with
//! the trusted keys in FLEET_FIRMWARE_KEYS, ticked into stage 1 (an IoT Jobs job on the
//! database), paused, resumed and aborted by an operator.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Result};
use base64::Engine as _;
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::model::{DeviceRegistration, JobId, JobStatus, NewJob, ThingName};
use fleet_shared::ota::manifest::{ManifestSigner, UnsignedManifest};
use fleet_shared::ports::{DeviceAdmin, JobsControl};
use serde_json::Value;

use crate::support::FLEETCTL;

/// Run fleetctl on `db` with `keys` as FLEET_FIRMWARE_KEYS: (success, stdout, stderr).
fn fleetctl(db: &Path, keys: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(FLEETCTL)
        .arg("--db")
        .arg(db)
        .args(args)
        .env("FLEET_BACKEND", "embedded")
        .env("FLEET_FIRMWARE_KEYS", keys)
        .output()?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

fn json(db: &Path, keys: &str, args: &[&str]) -> Result<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = fleetctl(db, keys, &all)?;
    ensure!(ok, "fleetctl {args:?} failed: {err}");
    Ok(serde_json::from_str(&out)?)
}

/// Manifests of 1.5.0 and 1.4.2 for sensors, signed with `seed` under kid `fw`.
fn manifests(dir: &Path, seed: u8) -> Result<String> {
    let signer = ManifestSigner::from_bytes("fw", &[seed; 32])?;
    for fw in ["1.5.0", "1.4.2"] {
        let unsigned = UnsignedManifest::for_image(
            fw,
            "sensor",
            format!("https://fw.example.com/{fw}.bin"),
            fw.as_bytes(),
        );
        std::fs::write(dir.join(format!("{fw}-{seed}.json")), signer.sign(unsigned)?.to_json())?;
    }
    let public = base64::engine::general_purpose::STANDARD.encode(signer.verifying_key().as_bytes());
    Ok(format!("fw={public}"))
}

#[tokio::test]
async fn an_operator_creates_ticks_pauses_and_aborts_a_campaign() -> Result<()> {
    // GIVEN 40 registered sensors on 1.4.2 and two manifests signed by the trusted key
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let store = SqliteStore::open(&db)?;
    let devices: Vec<_> = (0..40)
        .map(|i| {
            let reg = DeviceRegistration {
                class: "sensor".into(),
                region: "eu-west".into(),
                fw: "1.4.2".into(),
                registered_at_ms: 0,
            };
            (ThingName::parse(&format!("sensor-{i:02}")).expect("thing"), reg)
        })
        .collect();
    store.register(&devices).await?;
    let keys = manifests(dir.path(), 1)?;
    let (to, from) = (dir.path().join("1.5.0-1.json"), dir.path().join("1.4.2-1.json"));
    let create = |keys: &str, to: &Path| {
        fleetctl(
            &db,
            keys,
            &[
                "ota",
                "create",
                "--id",
                "fw150",
                "--manifest",
                &to.to_string_lossy(),
                "--rollback-manifest",
                &from.to_string_lossy(),
                "--stages",
                "10,100",
                "--min-battery",
                "0",
                "--seen-within",
                "0s",
            ],
        )
    };

    // WHEN it is created without trusted keys, or from a manifest another key signed
    let (ok, _, err) = create("", &to)?;
    ensure!(!ok && err.contains("FLEET_FIRMWARE_KEYS"), "{err}");
    manifests(dir.path(), 2)?;
    let (ok, _, err) = create(&keys, &dir.path().join("1.5.0-2.json"))?;
    // THEN it is refused, naming why
    ensure!(!ok && err.contains("bad_signature"), "{err}");

    // WHEN it is created properly and ticked
    let (ok, out, err) = create(&keys, &to)?;
    ensure!(ok && out.contains("fw150") && out.contains("pending"), "{out}{err}");
    let ticked = json(&db, &keys, &["ota", "tick"])?;
    // THEN stage 1 sends the firmware to 10 % of the 40 sensors
    ensure!(ticked[0]["state"] == "stage", "{ticked}");
    ensure!(
        ticked[0]["summary"].as_str().unwrap_or_default().contains("stage 1 of 2 (10%): 4 devices"),
        "{ticked}"
    );
    let job = JobId::parse("fw150-s1")?;
    let progress = store.job_progress(&job).await?.expect("stage 1's job");
    ensure!(progress.counts.total() == 4 && progress.status == JobStatus::InProgress, "{progress:?}");
    let shown = json(&db, &keys, &["ota", "show", "fw150"])?;
    ensure!(shown["state"]["state"] == "stage" && shown["population"] == 40, "{shown}");

    // WHEN an operator pauses it, a tick leaves it alone; resumed, it moves again
    json(&db, &keys, &["ota", "pause", "fw150", "--reason", "holiday freeze"])?;
    let ticked = json(&db, &keys, &["ota", "tick"])?;
    ensure!(ticked.as_array().is_some_and(Vec::is_empty), "{ticked}");
    let (ok, out, _) = fleetctl(&db, &keys, &["ota", "show", "fw150"])?;
    ensure!(ok && out.contains("paused: holiday freeze"), "{out}");
    json(&db, &keys, &["ota", "resume", "fw150"])?;
    let ticked = json(&db, &keys, &["ota", "tick", "fw150"])?;
    ensure!(
        ticked[0]["summary"].as_str().unwrap_or_default().contains("4 of 4 installs pending"),
        "{ticked}"
    );

    // WHEN it is aborted, the queued installs are canceled and it stays ended
    let aborted = json(&db, &keys, &["ota", "abort", "fw150", "--reason", "wrong build"])?;
    ensure!(aborted["state"]["state"] == "aborted", "{aborted}");
    let progress = store.job_progress(&job).await?.expect("stage 1's job");
    ensure!(progress.counts.canceled == 4 && progress.status == JobStatus::Canceled, "{progress:?}");
    let (ok, _, err) = fleetctl(&db, &keys, &["ota", "rollback", "fw150"])?;
    ensure!(!ok && err.contains("aborted"), "{err}");

    // WHEN another stack in the account already made a job of a new campaign's ids (fw151-s2)
    store
        .create_job(&NewJob {
            job_id: JobId::parse("fw151-s2")?,
            targets: vec![ThingName::parse("sensor-07")?],
            document: serde_json::json!({"operation": "fleetline.ota"}),
            description: "fw151 stage 2: 1.4.2 -> 1.5.0 [campaign 0123]".into(),
            max_per_minute: None,
            in_progress_timeout_minutes: None,
        })
        .await?;
    let (to, from) = (to.to_string_lossy(), from.to_string_lossy());
    let (ok, _, err) = fleetctl(
        &db,
        &keys,
        &["ota", "create", "--id", "fw151", "--manifest", &to, "--rollback-manifest", &from],
    )?;
    // THEN creating it is refused, naming the job, and nothing is stored
    ensure!(!ok && err.contains("job fw151-s2 exists and is not this campaign's"), "{err}");
    let (ok, _, _) = fleetctl(&db, &keys, &["ota", "show", "fw151"])?;
    ensure!(!ok, "a refused campaign was stored");
    Ok(())
}

#[tokio::test]
async fn an_operator_rotates_the_certificates_of_the_devices_due_without_any_manifest() -> Result<()> {
    use fleet_shared::certs::expiry::ExpiryClass;
    use fleet_shared::model::CertificateId;
    use fleet_shared::ports::{CertMark, DeviceCertStatus};
    // GIVEN 20 registered sensors on 1.4.2, the daily check having marked 6 of them rotation due
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let store = SqliteStore::open(&db)?;
    let registration = DeviceRegistration {
        class: "sensor".into(),
        region: "eu-west".into(),
        fw: "1.4.2".into(),
        registered_at_ms: 0,
    };
    let things: Vec<ThingName> =
        (0..20).map(|i| ThingName::parse(&format!("sensor-{i:02}"))).collect::<Result<_, _>>()?;
    store.register(&things.iter().map(|t| (t.clone(), registration.clone())).collect::<Vec<_>>()).await?;
    let due: Vec<(ThingName, CertMark)> = things[..6]
        .iter()
        .map(|t| {
            let mark = CertMark {
                certificate: CertificateId::of_der(t.as_str().as_bytes()),
                class: ExpiryClass::Critical,
                not_after_ms: fleet_shared::time::now_ms() + 86_400_000,
                rotation_due: true,
                checked_ms: fleet_shared::time::now_ms(),
            };
            (t.clone(), mark)
        })
        .collect();
    store.mark_cert_status(&due).await?;
    let keys = manifests(dir.path(), 1)?;
    // WHEN an operator creates a rotation of 50 %, 100 % (no manifest, no firmware keys needed)
    let rotate = ["ota", "rotate-certs", "--id", "rot-2026", "--class", "sensor", "--fw", "1.4.2"];
    let limits = ["--stages", "50,100", "--min-battery", "0", "--seen-within", "0s"];
    let (ok, out, err) = fleetctl(&db, "", &[&rotate[..], &limits[..]].concat())?;
    // THEN it is stored, shown as a certificate change
    ensure!(ok && out.contains("sensor 1.4.2: new certificates") && out.contains("pending"), "{out}{err}");
    // AND a firmware campaign on the same sensors, created with the trusted key
    let (to, from) = (dir.path().join("1.5.0-1.json"), dir.path().join("1.4.2-1.json"));
    let firmware =
        ["ota", "create", "--id", "fw150", "--manifest", &to.to_string_lossy(), "--rollback-manifest"];
    let (ok, _, err) =
        fleetctl(&db, &keys, &[&firmware[..], &[&from.to_string_lossy()], &limits[..]].concat())?;
    ensure!(ok, "{err}");
    // WHEN both are ticked without FLEET_FIRMWARE_KEYS
    let ticked = json(&db, "", &["ota", "tick"])?;
    let line = |id: &str| {
        let found = ticked.as_array().into_iter().flatten().find(|t| t["campaign"] == id);
        found.and_then(|t| t["summary"].as_str()).unwrap_or_default().to_owned()
    };
    // THEN the rotation's stage 1 sends its job to 3 of the 6 due, and to no other sensor
    ensure!(line("rot-2026").contains("stage 1 of 2 (50%): 3 devices"), "{ticked}");
    // AND the firmware campaign is left as it was, saying what it needs; asked for by id, an error
    ensure!(
        line("fw150").starts_with("skipped:") && line("fw150").contains("FLEET_FIRMWARE_KEYS"),
        "{ticked}"
    );
    ensure!(store.job_progress(&JobId::parse("fw150-s1")?).await?.is_none(), "fw150 sent nothing");
    let (ok, _, err) = fleetctl(&db, "", &["ota", "tick", "fw150"])?;
    ensure!(!ok && err.contains("FLEET_FIRMWARE_KEYS"), "{err}");
    let job = JobId::parse("rot-2026-s1")?;
    let reached = store.job_executions(&job).await?;
    ensure!(reached.len() == 3 && reached.iter().all(|(t, _)| things[..6].contains(t)), "{reached:?}");
    let progress = store.job_progress(&job).await?.expect("stage 1's job");
    ensure!(
        progress.description.starts_with("rot-2026 stage 1: rotate certificates on 1.4.2"),
        "{progress:?}"
    );
    let shown = json(&db, &keys, &["ota", "show", "rot-2026"])?;
    ensure!(shown["spec"]["change"] == "certificate" && shown["population"] == 6, "{shown}");
    ensure!(shown.get("firmware").is_none(), "a rotation carries no manifest: {shown}");
    Ok(())
}
