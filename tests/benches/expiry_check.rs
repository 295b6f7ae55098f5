//! `cargo bench -p fleet-tests --bench expiry_check` (also run by `scripts/bench-moto.sh`).
//!
//! The daily certificate expiry check's real handler over a SQLite file holding 100,000
//! certificates of which 1 % expire within 30 days: prints how many certificates each check
//! read (only those in its window) and its time (p50 and max of 10 runs), the figure the issue
//! asks to report rather than assert. The same read on DynamoDB is one Query per day and shard
//! of the window (README, "Certificates and provisioning").

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use cert_expiry_check::handler::{handle, Answer, Deps};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::certs::expiry::Threshold;
use fleet_shared::metrics::MetricsOut;
use fleet_shared::model::{CertStatus, Certificate, CertificateId, ThingName};
use fleet_shared::ports::CertificateInventory;
use lambda_runtime::{Context, LambdaEvent};
use serde_json::value::RawValue;

const FLEET: u32 = 100_000;
const RUNS: usize = 10;
const DAY_MS: i64 = 86_400_000;

fn now() -> i64 {
    1_764_000_000_000
}

#[tokio::main]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = SqliteStore::open(&dir.path().join("fleet.sqlite"))?;
    let fleet: Vec<Certificate> = (0..FLEET)
        .map(|n| {
            let days = if n % 100 == 0 { i64::from(n % 29 + 1) } else { 365 + i64::from(n % 700) };
            Certificate {
                id: CertificateId::of_der(&n.to_be_bytes()),
                thing: ThingName::parse(&format!("dev-{n}")).ok(),
                serial: format!("{n:x}"),
                issuer: "CN=Fleetline CA".into(),
                subject: format!("CN=dev-{n}"),
                not_before_ms: 0,
                not_after_ms: now() + days * DAY_MS,
                status: CertStatus::Active,
                recorded_ms: 0,
            }
        })
        .collect();
    let loaded = Instant::now();
    db.record_many(&fleet).await?;
    println!("expiry check: {FLEET} certificates recorded in {:.1} s", loaded.elapsed().as_secs_f64());
    let deps = Deps {
        inventory: db.clone(),
        devices: db.clone(),
        reports: db.clone(),
        registry: db.clone(),
        progress: db,
        threshold: Threshold::default(),
        clock: now,
        metrics: MetricsOut::Off,
    };
    let event = include_str!("../../events/cert-expiry-check/scheduled-daily.json");
    let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
    let mut read = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        let answer =
            handle(&deps, LambdaEvent::new(RawValue::from_string(event.to_owned())?, Context::default()))
                .await?;
        times.push(started.elapsed());
        let Answer::Check(summary) = answer else { anyhow::bail!("the daily event ran something else") };
        read = summary.read;
    }
    ensure!(read == (FLEET / 100) as usize, "read {read}, expected only the {} expiring", FLEET / 100);
    times.sort();
    println!(
        "expiry check: read {read} of {FLEET} certificates (1 % expiring) per check; p50 {:.1} ms, max {:.1} ms over {RUNS} checks (device marks and the report included)",
        times[RUNS / 2].as_secs_f64() * 1000.0,
        times[RUNS - 1].as_secs_f64() * 1000.0
    );
    Ok(())
}
