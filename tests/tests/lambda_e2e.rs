//! End to end: the real `ingest-telemetry` bootstrap under `cargo lambda watch` (with the
//! workspace's `[workspace.metadata.lambda.env]`: embedded backend), driven by
//! `cargo lambda invoke --data-file events/...`, then the SQLite file is read back.
//!
//! The watcher runs in a temporary directory, so the metadata's relative `FLEET_DB`
//! (`target/fleet-dev.sqlite`) lands there and the test owns its database.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::model::{DeviceRegistration, ThingName};
use fleet_shared::ports::{DeviceAdmin, QuarantineReader, TelemetryQuery};
use serde_json::Value;

const FIRST_INVOKE_DEADLINE: Duration = Duration::from_secs(900);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `cargo lambda watch` in its own process group, stopped (group and all) on drop.
struct Watch(Child);

impl Drop for Watch {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.0.wait();
    }
}

fn invoke(port: u16, event: &str) -> Result<Output> {
    Command::new(env!("CARGO"))
        .args([
            "lambda",
            "invoke",
            "ingest-telemetry",
            "-A",
            "127.0.0.1",
            "-P",
            &port.to_string(),
            "-o",
            "json",
            "-F",
        ])
        .arg(workspace().join("events/ingest-telemetry").join(event))
        .output()
        .context("running cargo lambda invoke (is cargo-lambda on PATH? scripts/test.sh installs it)")
}

fn invoke_json(port: u16, event: &str) -> Result<Value> {
    let out = invoke(port, event)?;
    ensure!(out.status.success(), "invoke {event} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("invoke output: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
#[ignore = "needs cargo-lambda, installed by scripts/test.sh"]
async fn cargo_lambda_invoke_stores_sample_events_in_the_embedded_backend() -> Result<()> {
    // GIVEN a fresh embedded database with two registered devices
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("target/fleet-dev.sqlite");
    let store = SqliteStore::open(&db)?;
    let reg = DeviceRegistration {
        class: "env-sensor".into(),
        region: "eu-west".into(),
        fw: "1.4.0".into(),
        registered_at_ms: 1,
    };
    store
        .register(&[(ThingName::parse("sensor-001")?, reg.clone()), (ThingName::parse("sensor-002")?, reg)])
        .await?;

    // AND the function running under cargo lambda watch
    let port = free_port()?;
    let log = std::fs::File::create(dir.path().join("watch.log"))?;
    let child = Command::new(env!("CARGO"))
        .args([
            "lambda",
            "watch",
            "--ignore-changes",
            "-A",
            "127.0.0.1",
            "-P",
            &port.to_string(),
            "-p",
            "ingest-telemetry",
            // The deployed bootstrap links only AWS; the embedded backend is a feature.
            "--features",
            "embedded",
        ])
        .arg("--manifest-path")
        .arg(workspace().join("Cargo.toml"))
        .current_dir(dir.path())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .process_group(0)
        .spawn()
        .context("starting cargo lambda watch (is cargo-lambda on PATH? scripts/test.sh installs it)")?;
    let mut watch = Watch(child);

    // WHEN the valid batch is invoked (the first call waits for the build)
    let started = Instant::now();
    let first = loop {
        let out = invoke(port, "sqs-valid-v1.json")?;
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout)?;
        }
        let log = || std::fs::read_to_string(dir.path().join("watch.log")).unwrap_or_default();
        if let Some(status) = watch.0.try_wait()? {
            bail!("cargo lambda watch exited ({status}) before serving an invoke:\n{}", log());
        }
        if started.elapsed() > FIRST_INVOKE_DEADLINE {
            bail!(
                "no successful invoke within {FIRST_INVOKE_DEADLINE:?}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                log()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    // AND a mixed batch, a duplicate batch twice, and a direct rule invocation
    let mixed = invoke_json(port, "sqs-mixed-batch.json")?;
    let dup1 = invoke_json(port, "sqs-duplicate-batch.json")?;
    let dup2 = invoke_json(port, "sqs-duplicate-batch.json")?;
    let direct = invoke_json(port, "direct-v1.json")?;

    // THEN no message is reported for retry
    for r in [&first, &mixed, &dup1, &dup2] {
        ensure!(r["batchItemFailures"] == serde_json::json!([]), "unexpected failures: {r}");
    }
    ensure!(
        direct == serde_json::json!({"accepted": 1, "duplicates": 0, "quarantined": []}),
        "direct: {direct}"
    );
    // AND the database holds exactly what was sent, once
    let s1 = store.telemetry(&ThingName::parse("sensor-001")?, 0, 100).await?;
    let seqs: Vec<u64> = s1.iter().map(|r| r.reading.id.seq).collect();
    ensure!(seqs == [1042, 2001, 3001, 6001, 3002, 1043], "sensor-001 seqs {seqs:?}");
    ensure!(s1.iter().all(|r| r.class == "env-sensor"), "enrichment missing");
    let quarantined = store.quarantined(0).await?;
    ensure!(quarantined.len() == 8, "{} quarantined, expected the mixed batch's 8", quarantined.len());
    let state =
        store.device(&ThingName::parse("sensor-001")?).await?.and_then(|d| d.state).context("state")?;
    ensure!(state.seq == 1043, "last-seen from the newest reading, got {state:?}");
    Ok(())
}
