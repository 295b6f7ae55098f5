//! EventBridge's daily scheduled event → the certificates expiring in the window → findings.
//!
//! Reads only the certificates whose `notAfter` falls in `[now - 7 days, now + threshold)`
//! through the inventory's expiry index (no scan, no per-certificate API call), classifies the
//! active ones (`fleet_shared::certs::expiry`: expired, critical under 7 days, warning under the
//! threshold), marks each device `cert_status` / `rotation_due`, writes the findings report to
//! `reports/cert-expiry/<day>.json` next to the archive, emits counts per class (EMF), and
//! answers with the summary. The threshold is `FLEET_CERT_EXPIRY_THRESHOLD_DAYS` (30 to 3652,
//! as Device Defender allows; default 30). A store failure fails the invocation (`Retryable`):
//! EventBridge's retry runs the whole check again, and every write it makes is idempotent.

use std::sync::Arc;

use fleet_shared::adapters::aws::{CertificatesTable, DevicesTable, S3Archive};
use fleet_shared::certs::expiry::{self, ExpiryReport, Threshold};
use fleet_shared::lambda::{AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::ports::{CertMark, CertificateInventory, DeviceCertStatus, Reports};
use fleet_shared::{time, ConfigError, Env, StoreError};
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::info;

pub const FUNCTION: &str = "cert-expiry-check";

/// The most certificates one check reads (a window holding more is reported as truncated).
pub const MAX_CERTIFICATES: usize = 100_000;

/// Everything the handler needs, built once per cold start.
pub struct Deps<I, D, R> {
    /// Certificate inventory: the expiry index.
    pub inventory: I,
    /// Devices: their certificate status.
    pub devices: D,
    /// The findings report.
    pub reports: R,
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

impl Deps<CertificatesTable, DevicesTable, S3Archive> {
    /// On AWS: the Certificates table, the Devices table, the archive bucket.
    pub fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        Ok(Self {
            inventory: CertificatesTable::from_env(&aws.sdk, &aws.env)?,
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
>;

#[cfg(feature = "embedded")]
impl EmbeddedDeps {
    /// On the embedded backend: the one SQLite database; the stage is `local`.
    pub fn on_embedded(e: &fleet_shared::lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        Ok(Self {
            inventory: e.db.clone(),
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
    pub report: String,
    /// The window held more than [`MAX_CERTIFICATES`]: the rest waits for tomorrow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

pub async fn handle<I, D, R>(
    deps: &Deps<I, D, R>,
    _event: LambdaEvent<Box<RawValue>>,
) -> Result<CheckSummary, Retryable>
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
    let key = format!("reports/cert-expiry/{}.json", &time::rfc3339_ms(now)[..10]);
    let json = serde_json::to_vec_pretty(&report).map_err(|e| Retryable {
        what: "findings report not encoded",
        source: Arc::new(StoreError::permanent("report encode", e)),
    })?;
    deps.reports.put_report(&key, &json).await.map_err(retry("findings report not written"))?;
    let summary = CheckSummary {
        expired: report.expired,
        critical: report.critical,
        warning: report.warning,
        not_active: report.not_active,
        read: certs.len(),
        devices_marked: marks.len(),
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
