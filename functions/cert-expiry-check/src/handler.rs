//! Two schedules, one function over the certificate inventory:
//! - **daily** (EventBridge's scheduled event): the expiry check, below;
//! - **hourly, input `{"task":"reconcile"}`**: one slice of the weekly reconciliation with AWS
//!   IoT's registry ([`fleet_shared::certs::reconcile`]). A sweep starts at most once a week
//!   (7 days after the last one started); each slice works until the invocation's deadline
//!   (less a minute) and keeps its cursor in the Certificates table, so the next hour's trigger
//!   continues a sweep a large fleet cannot finish in one invocation (the IoT control plane
//!   allows a few to tens of calls per second). Each slice writes its findings to
//!   `reports/cert-reconcile/<sweep start>/slice-<n>.json` and emits `CertsAdopted`,
//!   `CertsListed`, `ReconcileRetries` and one count per finding kind.
//!
//! The daily check:
//! Reads only the certificates whose `notAfter` falls in `[now - 7 days, now + threshold)`
//! through the inventory's expiry index (no scan, no per-certificate API call), classifies the
//! active ones (`fleet_shared::certs::expiry`: expired, critical under 7 days, warning under the
//! threshold), marks each device `cert_status` / `rotation_due`, writes the findings report to
//! `reports/cert-expiry/<day>.json` next to the archive, emits counts per class (EMF), and
//! answers with the summary. The threshold is `FLEET_CERT_EXPIRY_THRESHOLD_DAYS` (30 to 3652,
//! as Device Defender allows; default 30). A store failure fails the invocation (`Retryable`):
//! EventBridge's retry runs the whole check again, and every write it makes is idempotent.

use std::sync::Arc;

use fleet_shared::adapters::aws::{CertificatesTable, DevicesTable, IotControlPlane, S3Archive};
use fleet_shared::certs::expiry::{self, ExpiryReport, Threshold};
use fleet_shared::certs::reconcile::{self, Reconciliation};
use fleet_shared::lambda::{AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::model::ThingName;
use fleet_shared::ports::{
    CertMark, CertificateInventory, CertificateRegistry, DeviceCertStatus, ReconcileProgress, ReconcileState,
    Reports,
};
use fleet_shared::{time, ConfigError, Env, StoreError};
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::info;

pub const FUNCTION: &str = "cert-expiry-check";

/// The most certificates one check reads (a window holding more is reported as truncated).
pub const MAX_CERTIFICATES: usize = 100_000;

/// A reconciliation sweep starts at most this often.
pub const SWEEP_EVERY_MS: i64 = 7 * 86_400_000;
/// A slice stops starting pages this long before the invocation's deadline.
const SLICE_MARGIN: std::time::Duration = std::time::Duration::from_secs(60);
/// The shortest slice (an invocation with less time left still makes progress).
const MIN_SLICE: std::time::Duration = std::time::Duration::from_secs(10);

/// Everything the handler needs, built once per cold start.
pub struct Deps<I, D, R, G, P> {
    /// Certificate inventory: the expiry index (the check), records (reconciliation).
    pub inventory: I,
    /// Devices: their certificate status.
    pub devices: D,
    /// The findings reports.
    pub reports: R,
    /// AWS IoT's certificate registry (reconciliation).
    pub registry: G,
    /// The reconciliation's cursor.
    pub progress: P,
    pub threshold: Threshold,
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

/// `FLEET_CERT_EXPIRY_THRESHOLD_DAYS`, 30 to 3652 (default 30).
pub fn threshold_from(env: &Env) -> Result<Threshold, ConfigError> {
    let Some(raw) = env.optional("FLEET_CERT_EXPIRY_THRESHOLD_DAYS") else { return Ok(Threshold::default()) };
    let invalid = || ConfigError::Invalid {
        var: "FLEET_CERT_EXPIRY_THRESHOLD_DAYS",
        value: raw.clone(),
        expected: "a number of days from 30 to 3652",
    };
    let days: u32 = raw.trim().parse().map_err(|_| invalid())?;
    Threshold::days(days).map_err(|_| invalid())
}

impl Deps<CertificatesTable, DevicesTable, S3Archive, IotControlPlane, CertificatesTable> {
    /// On AWS: the Certificates table, the Devices table, the archive bucket, AWS IoT.
    pub fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        let certificates = CertificatesTable::from_env(&aws.sdk, &aws.env)?;
        Ok(Self {
            inventory: certificates.clone(),
            progress: certificates,
            registry: IotControlPlane::new(&aws.sdk)?,
            devices: DevicesTable::from_env(&aws.sdk, &aws.env)?,
            reports: S3Archive::from_env(&aws.sdk, &aws.env)?,
            threshold: threshold_from(&aws.env)?,
            clock: time::now_ms,
            metrics: MetricsOut::stdout(&aws.env)?,
        })
    }
}

#[cfg(feature = "embedded")]
pub type EmbeddedDeps = Deps<
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
>;

#[cfg(feature = "embedded")]
impl EmbeddedDeps {
    /// On the embedded backend: the one SQLite database (the local IoT Core's registry is in
    /// it too); the stage is `local`.
    pub fn on_embedded(e: &fleet_shared::lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        Ok(Self {
            inventory: e.db.clone(),
            registry: e.db.clone(),
            progress: e.db.clone(),
            devices: e.db.clone(),
            reports: e.db.clone(),
            threshold: threshold_from(&e.env)?,
            clock: time::now_ms,
            metrics: MetricsOut::Stdout { stage: "local".to_owned() },
        })
    }
}

/// The check's answer.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckSummary {
    pub expired: usize,
    pub critical: usize,
    pub warning: usize,
    pub not_active: usize,
    /// Certificates read from the expiry index (the check's whole cost).
    pub read: usize,
    pub devices_marked: usize,
    /// Devices marked by the previous report and not by this one, whose marked certificate is
    /// no longer active: their marks removed.
    #[serde(default)]
    pub devices_cleared: usize,
    pub report: String,
    /// The window held more than [`MAX_CERTIFICATES`]: the rest waits for tomorrow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// What a schedule asks for: the daily scheduled event has no `task`.
#[derive(Deserialize)]
struct Task {
    #[serde(default)]
    task: Option<String>,
}

/// The function's answer: the daily check's summary or a reconciliation slice's.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Answer {
    Check(CheckSummary),
    Reconcile(SliceSummary),
}

/// One reconciliation slice, or why none ran.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SliceSummary {
    /// The sweep this slice belongs to (`None` when none is due).
    pub sweep_started_ms: Option<i64>,
    /// This slice's number in its sweep, from 1.
    pub slice: u32,
    pub finished: bool,
    /// No sweep due: the next starts then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sweep_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Reconciliation>,
}

pub async fn handle<I, D, R, G, P>(
    deps: &Deps<I, D, R, G, P>,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<Answer, Retryable>
where
    I: CertificateInventory,
    D: DeviceCertStatus,
    R: Reports,
    G: CertificateRegistry,
    P: ReconcileProgress,
{
    let task: Task = serde_json::from_str(event.payload.get()).map_err(|e| Retryable {
        what: "event not understood",
        source: Arc::new(StoreError::permanent("cert-expiry-check event", e)),
    })?;
    match task.task.as_deref() {
        None => check(deps).await.map(Answer::Check),
        Some("reconcile") => {
            let left =
                event.context.deadline().duration_since(std::time::SystemTime::now()).unwrap_or_default();
            let budget = left.saturating_sub(SLICE_MARGIN).max(MIN_SLICE);
            reconcile_slice(deps, budget).await.map(Answer::Reconcile)
        }
        Some(other) => Err(Retryable {
            what: "unknown task",
            source: Arc::new(StoreError::permanent(
                "cert-expiry-check event",
                format!("task {other:?}: expected none (the daily check) or \"reconcile\""),
            )),
        }),
    }
}

/// One slice of the weekly reconciliation: continue the sweep in progress, or start one when
/// the last started a week ago, for at most `budget`.
pub async fn reconcile_slice<I, D, R, G, P>(
    deps: &Deps<I, D, R, G, P>,
    budget: std::time::Duration,
) -> Result<SliceSummary, Retryable>
where
    I: CertificateInventory,
    R: Reports,
    G: CertificateRegistry,
    P: ReconcileProgress,
{
    let now = (deps.clock)();
    let retry = |what| move |e: StoreError| Retryable { what, source: Arc::new(e) };
    let state = deps.progress.reconcile_state().await.map_err(retry("reconciliation state not read"))?;
    let state = match state {
        // A sweep in progress (its next page's marker; `None`: its first page again).
        Some(s) if s.finished_ms.is_none() => s,
        Some(s) if s.started_ms + SWEEP_EVERY_MS > now => {
            return Ok(SliceSummary {
                sweep_started_ms: None,
                slice: 0,
                finished: s.finished_ms.is_some(),
                next_sweep_ms: Some(s.started_ms + SWEEP_EVERY_MS),
                report: None,
                result: None,
            })
        }
        _ => ReconcileState { started_ms: now, marker: None, finished_ms: None, slices: 0 },
    };
    let opts = reconcile::Options { budget: Some(budget), ..reconcile::Options::default() };
    let result = reconcile::reconcile(&deps.registry, &deps.inventory, state.marker.clone(), now, &opts)
        .await
        .map_err(retry("reconciliation slice failed"))?;
    let slice = state.slices + 1;
    let key = format!("reports/cert-reconcile/{}/slice-{slice:04}.json", time::rfc3339_ms(state.started_ms));
    write_report(&deps.reports, &key, &result).await?;
    let next = ReconcileState {
        started_ms: state.started_ms,
        marker: result.next_marker.clone(),
        finished_ms: result.finished().then_some(now),
        slices: slice,
    };
    deps.progress.save_reconcile_state(&next).await.map_err(retry("reconciliation state not written"))?;
    info!(
        slice,
        listed = result.listed,
        adopted = result.adopted,
        findings = result.findings.len(),
        finished = result.finished(),
        report = %key,
        "certificate registry reconciled"
    );
    let counts = result.counts();
    let count = |kind| counts.get(kind).copied().unwrap_or(0) as f64;
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: now,
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![
            ("CertsListed", result.listed as f64, Unit::Count),
            ("CertsAdopted", result.adopted as f64, Unit::Count),
            ("ReconcileRetries", result.retried as f64, Unit::Count),
            ("FindingsInactiveAttached", count("inactive_attached"), Unit::Count),
            ("FindingsSharedCertificate", count("shared_certificate"), Unit::Count),
            ("FindingsOnlyCertificateExpired", count("only_certificate_expired"), Unit::Count),
        ],
    }]);
    Ok(SliceSummary {
        sweep_started_ms: Some(state.started_ms),
        slice,
        finished: result.finished(),
        next_sweep_ms: None,
        report: Some(key),
        result: Some(result),
    })
}

/// A report as pretty JSON under `key`; a failure is `Retryable` (the run is idempotent).
async fn write_report(reports: &impl Reports, key: &str, value: &impl Serialize) -> Result<(), Retryable> {
    let failed = |e: StoreError| Retryable { what: "report not written", source: Arc::new(e) };
    let json =
        serde_json::to_vec_pretty(value).map_err(|e| failed(StoreError::permanent("report encode", e)))?;
    reports.put_report(key, &json).await.map_err(failed)
}

/// The daily report's key: `reports/cert-expiry/<UTC day>.json`.
fn report_key(at_ms: i64) -> String {
    format!("reports/cert-expiry/{}.json", &time::rfc3339_ms(at_ms)[..10])
}

/// The newest report of the last week (today's first, from an earlier run today), if any.
async fn previous_report(reports: &impl Reports, now: i64) -> Result<Option<ExpiryReport>, StoreError> {
    for days_ago in 0..=expiry::LOOKBACK_DAYS {
        let Some(body) = reports.report(&report_key(now - i64::from(days_ago) * 86_400_000)).await? else {
            continue;
        };
        return serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| StoreError::permanent("previous report", e));
    }
    Ok(None)
}

/// The daily expiry check.
pub async fn check<I, D, R, G, P>(deps: &Deps<I, D, R, G, P>) -> Result<CheckSummary, Retryable>
where
    I: CertificateInventory,
    D: DeviceCertStatus,
    R: Reports,
{
    let now = (deps.clock)();
    let retry = |what| move |e: StoreError| Retryable { what, source: Arc::new(e) };
    let window = expiry::window(now, deps.threshold, expiry::LOOKBACK_DAYS);
    let certs = deps
        .inventory
        .expiring(window.0, window.1, MAX_CERTIFICATES)
        .await
        .map_err(retry("expiring certificates not read"))?;
    let report: ExpiryReport = expiry::report(&certs, now, deps.threshold, window);
    // One mark per device (a device may hold several certificates in the window: one write
    // per key in a batch, as DynamoDB requires): its most urgent, as the findings are sorted.
    let mut marked = std::collections::HashSet::new();
    let marks: Vec<_> = report
        .findings
        .iter()
        .filter_map(|f| {
            let thing = f.thing.clone().filter(|t| marked.insert(t.clone()))?;
            let mark = CertMark {
                certificate: f.certificate.clone(),
                class: f.class,
                not_after_ms: f.not_after_ms,
                rotation_due: true,
                checked_ms: now,
            };
            Some((thing, mark))
        })
        .collect();
    deps.devices.mark_cert_status(&marks).await.map_err(retry("device certificate status not written"))?;
    // Devices the last report marked and this one does not, whose marked certificate is no
    // longer active (deactivated or revoked after a rotation, or gone): their marks go, so
    // `rotation_due` is never left behind. A certificate still active keeps its device's mark
    // even once it has left the window (expired more than a week ago, the device still cut
    // off); a truncated read clears nothing (what it did not read is not known to be fine).
    let mut cleared: Vec<ThingName> = Vec::new();
    if certs.len() < MAX_CERTIFICATES {
        let previous =
            previous_report(&deps.reports, now).await.map_err(retry("previous report not read"))?;
        let candidates: std::collections::BTreeMap<ThingName, fleet_shared::model::CertificateId> = previous
            .iter()
            .flat_map(|r| r.findings.iter())
            .filter_map(|f| Some((f.thing.clone()?, f.certificate.clone())))
            .filter(|(t, _)| !marked.contains(t))
            .collect();
        for (thing, id) in candidates {
            let cert = deps.inventory.certificate(&id).await.map_err(retry("marked certificate not read"))?;
            if cert.is_none_or(|c| c.status != fleet_shared::model::CertStatus::Active) {
                cleared.push(thing);
            }
        }
    }
    deps.devices.clear_cert_status(&cleared).await.map_err(retry("device certificate status not cleared"))?;
    let key = report_key(now);
    write_report(&deps.reports, &key, &report).await?;
    let summary = CheckSummary {
        expired: report.expired,
        critical: report.critical,
        warning: report.warning,
        not_active: report.not_active,
        read: certs.len(),
        devices_marked: marks.len(),
        devices_cleared: cleared.len(),
        report: key,
        truncated: certs.len() == MAX_CERTIFICATES,
    };
    info!(
        expired = summary.expired,
        critical = summary.critical,
        warning = summary.warning,
        read = summary.read,
        report = %summary.report,
        "certificate expiry checked"
    );
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: now,
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![
            ("CertsExpired", summary.expired as f64, Unit::Count),
            ("CertsCritical", summary.critical as f64, Unit::Count),
            ("CertsWarning", summary.warning as f64, Unit::Count),
            ("CertsRead", summary.read as f64, Unit::Count),
        ],
    }]);
    Ok(summary)
}

#[cfg(test)]
mod tests;
