//! `bash scripts/bench-moto.sh` (starts moto on loopback, then runs this with
//! `cargo bench -p fleet-tests --bench hook_latency`).
//!
//! The provisioning hook's real handler, allowing a fresh allowlisted serial with a fresh
//! certificate per call (as a fleet provisioning one device after another), on the embedded
//! backend (a SQLite file) and on the AWS adapters against moto. Prints p50 / p99 / max of the
//! handler's latency over 300 calls each, and the cold start: building the backend and `Deps`
//! plus the first call. AWS IoT allows the hook 5 s; the target is well under that.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::lambda::{AwsBackend, EmbeddedBackend};
use fleet_shared::metrics::MetricsOut;
use fleet_shared::model::{AllowlistEntry, CertificateId, Enrolment, ThingName};
use fleet_shared::ports::Allowlist;
use fleet_shared::Env;
use fleet_tests::moto;
use lambda_runtime::{Context, LambdaEvent};
use provisioning_hook::handler::{handle, Deps};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use serde_json::value::RawValue;

const CALLS: usize = 300;
const LIMIT: Duration = Duration::from_secs(5);

/// A hook event for `serial` with a fresh certificate valid for a year.
fn event(serial: &str) -> Result<Box<RawValue>> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, serial);
    params.distinguished_name = dn;
    let now = ::time::OffsetDateTime::now_utc();
    params.not_before = now - ::time::Duration::hours(1);
    params.not_after = now + ::time::Duration::days(365);
    let cert = params.self_signed(&KeyPair::generate()?)?;
    let id = CertificateId::of_der(cert.der());
    let body = serde_json::json!({
        "claimCertificateId": "c".repeat(64), "certificateId": id.as_str(), "certificatePem": cert.pem(),
        "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/bench", "clientId": serial,
        "parameters": {"SerialNumber": serial}});
    Ok(RawValue::from_string(body.to_string())?)
}

fn entry(serial: &str) -> Result<AllowlistEntry> {
    Ok(AllowlistEntry {
        serial: ThingName::parse(serial)?,
        class: "env-sensor".into(),
        region: "eu-west".into(),
        added_ms: 1,
        enrolment: Enrolment::Allowed,
    })
}

fn report(name: &str, cold: Duration, mut times: Vec<Duration>) {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    let (p50, p99, max) = (at(0.50), at(0.99), at(1.0));
    let verdict = if cold.max(max) < LIMIT { "PASS" } else { "FAIL" };
    println!(
        "{name:<10} cold start + first call {:>8.1} ms | p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms | limit 5 s  {verdict}",
        cold.as_secs_f64() * 1e3,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
}

/// Allowlist the serials, time a cold start (`build` + the first call), then every call.
async fn run<A, I, P, R, F, Fut>(name: &str, prefix: &str, build: F) -> Result<()>
where
    A: Allowlist,
    I: fleet_shared::ports::CertificateInventory,
    P: fleet_shared::ports::ProvisioningAudit,
    R: fleet_shared::ports::DeviceAdmin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Deps<A, I, P, R>>>,
{
    let serials: Vec<String> = (0..=CALLS).map(|n| format!("{prefix}-{n:04}")).collect();
    let events: Vec<Box<RawValue>> = serials.iter().map(|s| event(s)).collect::<Result<_>>()?;
    let entries: Vec<AllowlistEntry> = serials.iter().map(|s| entry(s)).collect::<Result<_>>()?;
    // Cold start: the backend and Deps built, then the first call (the allowlist is loaded in
    // between, untimed: it is the operator's work, not the hook's).
    let started = Instant::now();
    let mut deps = build().await?;
    let built = started.elapsed();
    deps.metrics = MetricsOut::Off;
    deps.allowlist.allow(&entries).await?;
    let mut events = events.into_iter();
    let first = Instant::now();
    let r = handle(&deps, LambdaEvent::new(events.next().context("events")?, Context::default())).await?;
    anyhow::ensure!(r.allow_provisioning, "the first device was refused");
    let cold = built + first.elapsed();
    let mut times = Vec::with_capacity(CALLS);
    for e in events {
        let t = Instant::now();
        let r = handle(&deps, LambdaEvent::new(e, Context::default())).await?;
        times.push(t.elapsed());
        anyhow::ensure!(r.allow_provisioning, "a device was refused");
    }
    report(name, cold, times);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    println!(
        "provisioning hook: {CALLS} devices provisioning one after another (certificates made beforehand)"
    );
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    run("embedded", "emb", || async {
        let e = EmbeddedBackend { db: SqliteStore::open(Path::new(&db))?, env: Env::from_fn(|_| None) };
        Ok(provisioning_hook::handler::EmbeddedDeps::on_embedded(&e)?)
    })
    .await?;
    let resources = moto::fresh_resources().await?;
    let env = resources.env();
    run("moto", "aws", || async {
        let aws = AwsBackend { sdk: moto::sdk_config().await?, env: env.clone() };
        Ok(Deps::on_aws(&aws)?)
    })
    .await?;
    Ok(())
}
