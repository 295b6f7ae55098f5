//! Hook event → decision → `{allowProvisioning, parameterOverrides}`.
//!
//! AWS IoT calls this synchronously during fleet provisioning (RegisterThing) and allows
//! 5 seconds. A device provisions only when `fleet_shared::certs::hook` says so: its serial
//! number on the allowlist, not decommissioned, not provisioned with another certificate, and
//! a valid certificate whose id matches its PEM. Then, in order: the serial is enrolled with
//! the certificate (conditional: one winner), the certificate recorded in the inventory, the
//! device registered with its class and region, the decision audited.
//!
//! A provisioned device rotating its certificate (it claims with the certificate its serial is
//! provisioned with, `hook::Admission::Rotate`) moves its serial to the new certificate
//! (conditional on the old one), the new certificate is recorded, the device's registration is
//! left as it is, and the audit trail says `rotated` and from what (a retry of a rotation whose
//! answer was lost is recognised by its claim, and recorded the same way). The old certificate
//! stays active until the device connects with the new one: then the presence function retires
//! it (`fleet_shared::certs::decommission::retire_on_connect`). A claim that is a device's certificate (the inventory names its
//! thing) provisions that thing only: `claim_of_another_thing` otherwise; a claim that is not a
//! certificate id at all is `malformed_event`.
//!
//! Every refusal is answered `allowProvisioning: false` with its reason logged, counted
//! (`Refused` by `Reason`) and written to the audit trail; a claim certificate asking for
//! unknown serials is counted, and reported once it reaches `SUSPICIOUS_UNKNOWN_SERIALS`.
//! A store failure on the way to allowing fails the invocation (`Retryable`): IoT Core then
//! refuses this attempt and the device tries again; nothing is left half-provisioned that a
//! retry would not finish.

use std::sync::Arc;

use fleet_shared::adapters::aws::{CertificatesTable, DevicesTable};
use fleet_shared::certs::hook::{self, Admission, HookResponse, Refusal, SUSPICIOUS_UNKNOWN_SERIALS};
use fleet_shared::lambda::{AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::model::{CertStatus, Certificate, CertificateId, DeviceRegistration};
use fleet_shared::ports::{
    Allowlist, AuditEvent, CertificateInventory, DeviceAdmin, Enrolled, ProvisioningAudit,
};
use fleet_shared::{time, StoreError};
use lambda_runtime::LambdaEvent;
use serde_json::value::RawValue;
use tracing::{info, warn};

pub const FUNCTION: &str = "provisioning-hook";

/// Where refusals of requests without a usable serial number are audited (an empty, overlong
/// or otherwise invalid `SerialNumber`; a malformed event).
pub const INVALID_SERIAL: &str = "~invalid";

/// Everything the handler needs, built once per cold start.
pub struct Deps<A, I, P, R> {
    /// Allowlist: read an entry, enrol it (conditional).
    pub allowlist: A,
    /// Certificate inventory: record the new certificate.
    pub inventory: I,
    /// Audit trail and claim counters.
    pub audit: P,
    /// Device registry: register the device's class and region.
    pub registry: R,
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

impl Deps<CertificatesTable, CertificatesTable, CertificatesTable, DevicesTable> {
    /// On AWS: the Certificates table (`FLEET_CERTIFICATES_TABLE`) and the Devices table
    /// (`FLEET_DEVICES_TABLE`).
    pub fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        let certs = CertificatesTable::from_env(&aws.sdk, &aws.env)?;
        Ok(Self {
            allowlist: certs.clone(),
            inventory: certs.clone(),
            audit: certs,
            registry: DevicesTable::from_env(&aws.sdk, &aws.env)?,
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
>;

#[cfg(feature = "embedded")]
impl EmbeddedDeps {
    /// On the embedded backend: the one SQLite database; the stage is `local`.
    pub fn on_embedded(e: &fleet_shared::lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        Ok(Self {
            allowlist: e.db.clone(),
            inventory: e.db.clone(),
            audit: e.db.clone(),
            registry: e.db.clone(),
            clock: time::now_ms,
            metrics: MetricsOut::Stdout { stage: "local".to_owned() },
        })
    }
}

pub async fn handle<A, I, P, R>(
    deps: &Deps<A, I, P, R>,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<HookResponse, Retryable>
where
    A: Allowlist,
    I: CertificateInventory,
    P: ProvisioningAudit,
    R: DeviceAdmin,
{
    let now = (deps.clock)();
    let request = match hook::parse_request(event.payload.get()) {
        Ok(r) => r,
        Err(refusal) => return Ok(refuse(deps, now, &Asked::default(), refusal).await),
    };
    let mut asked = Asked {
        serial: request
            .parameters
            .get("SerialNumber")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned(),
        claim: request.claim_certificate_id.clone(),
        certificate: Some(request.certificate_id.clone()),
    };
    let serial = match hook::serial_of(&request) {
        Ok(s) => s,
        Err(refusal) => return Ok(refuse(deps, now, &asked, refusal).await),
    };
    asked.serial = serial.to_string();
    let cert = match hook::check_certificate(&request, now) {
        Ok(c) => c,
        Err(refusal) => return Ok(refuse(deps, now, &asked, refusal).await),
    };
    let retry = |what| move |e: StoreError| Retryable { what, source: Arc::new(e) };
    // The claim is the certificate the device connected with (AWS IoT always names one). A
    // device's own certificate (the inventory names its thing) claims for that thing only: a
    // rotation, never another serial. Any other claim is the fleet's claim certificate, which
    // the allowlist governs.
    let Ok(claim) = CertificateId::parse(&request.claim_certificate_id) else {
        let refusal = Refusal::MalformedEvent(format!(
            "claimCertificateId {:?} is not a certificate id",
            fleet_shared::text::printable(&asked.claim.chars().take(64).collect::<String>())
        ));
        return Ok(refuse(deps, now, &asked, refusal).await);
    };
    // Read together: the claim's certificate and the serial's allowlist entry.
    let (claimed, entry) = tokio::join!(deps.inventory.certificate(&claim), deps.allowlist.entry(&serial));
    let claim_thing = claimed.map_err(retry("claim certificate not read"))?.and_then(|c| c.thing);
    if let Some(thing) = claim_thing.as_ref().filter(|t| **t != serial) {
        let refusal = Refusal::ClaimOfAnotherThing { claim_thing: thing.to_string() };
        return Ok(refuse(deps, now, &asked, refusal).await);
    }
    // This serial's own device certificate as the claim: a rotation, or the retry of one
    // whose answer was lost (the serial already moved to this certificate).
    let rotation = claim_thing.is_some();
    let entry = entry.map_err(retry("allowlist not read"))?;
    let admission = match hook::admit(&serial, entry.as_ref(), &cert.id, &request.claim_certificate_id) {
        Ok(a) => a,
        Err(refusal) => return Ok(refuse(deps, now, &asked, refusal).await),
    };
    let Some(entry) = entry else {
        return Ok(refuse(deps, now, &asked, Refusal::UnknownSerial(serial.to_string())).await);
    };
    // Two devices presenting one serial at once: the conditional enrolment has one winner; a
    // rotation is conditional on the certificate it rotates from.
    let enrolled = match &admission {
        Admission::Enrol => deps.allowlist.enrol(&serial, &cert.id, now).await,
        Admission::Rotate { from } => deps.allowlist.rotate(&serial, from, &cert.id, now).await,
    };
    let refusal = match enrolled.map_err(retry("serial not enrolled"))? {
        Enrolled::Yes => None,
        Enrolled::Unknown => Some(Refusal::UnknownSerial(serial.to_string())),
        Enrolled::Decommissioned => Some(Refusal::Decommissioned(serial.to_string())),
        Enrolled::Taken(certificate) => {
            Some(Refusal::AlreadyProvisioned { serial: serial.to_string(), certificate })
        }
        Enrolled::NotProvisioned => Some(Refusal::NotProvisioned(serial.to_string())),
    };
    if let Some(refusal) = refusal {
        return Ok(refuse(deps, now, &asked, refusal).await);
    }
    let record = Certificate {
        id: cert.id.clone(),
        thing: Some(serial.clone()),
        serial: cert.serial,
        issuer: cert.issuer,
        subject: cert.subject,
        not_before_ms: cert.not_before_ms,
        not_after_ms: cert.not_after_ms,
        status: CertStatus::Active,
        recorded_ms: now,
    };
    deps.inventory.record(&record).await.map_err(retry("certificate not recorded"))?;
    // A rotation leaves the registration as it is (it names no firmware); a first provisioning
    // registers the device.
    let rotated = rotation || matches!(admission, Admission::Rotate { .. });
    if !rotated {
        let fw = request
            .parameters
            .get("Firmware")
            .and_then(|v| v.as_str())
            .filter(|fw| fleet_shared::model::validate_label("fw", fw).is_ok());
        let registration = DeviceRegistration {
            class: entry.class.clone(),
            region: entry.region.clone(),
            fw: fw.unwrap_or("unknown").to_owned(),
            registered_at_ms: now,
        };
        deps.registry
            .register(&[(serial.clone(), registration)])
            .await
            .map_err(retry("device not registered"))?;
    }
    let event = AuditEvent {
        at_ms: now,
        serial: serial.to_string(),
        claim_certificate: asked.claim.clone(),
        certificate: Some(cert.id.to_string()),
        outcome: if rotated { hook::ROTATED } else { "allowed" }.into(),
        reason: rotated.then(|| format!("from certificate {claim}")),
    };
    deps.audit.audit(&event).await.map_err(retry("decision not audited"))?;
    if rotated {
        info!(serial = %serial, certificate = %cert.id, from = %claim, "certificate rotation allowed");
    } else {
        info!(serial = %serial, certificate = %cert.id, class = %entry.class, region = %entry.region, "provisioning allowed");
    }
    emit(deps, now, None);
    Ok(hook::allow(&entry))
}

/// What a request asked for, as far as it could be read (for the audit trail).
#[derive(Debug, Default)]
struct Asked {
    serial: String,
    claim: String,
    certificate: Option<String>,
}

/// Refuse: log, count, audit (a failing audit is logged: the answer is a refusal either way),
/// and count unknown serials per claim certificate.
async fn refuse<A, I, P, R>(
    deps: &Deps<A, I, P, R>,
    now: i64,
    asked: &Asked,
    refusal: Refusal,
) -> HookResponse
where
    P: ProvisioningAudit,
{
    warn!(serial = %asked.serial, claim = %asked.claim, reason = refusal.code(), detail = %refusal, "provisioning refused");
    if matches!(refusal, Refusal::UnknownSerial(_)) && !asked.claim.is_empty() {
        match deps.audit.unknown_serial(&asked.claim, now).await {
            Ok(n) if n >= SUSPICIOUS_UNKNOWN_SERIALS => {
                warn!(claim = %asked.claim, unknown_serials = n, "claim certificate keeps asking for unknown serials");
            }
            Ok(_) => {}
            Err(e) => warn!(claim = %asked.claim, error = %e, "unknown serial not counted"),
        }
    }
    // A serial that is not a thing name is the device's text: audited under one fixed name,
    // its first 64 characters kept (escaped) in the reason, never used as a key.
    let (serial, reason) = match fleet_shared::model::ThingName::parse(&asked.serial) {
        Ok(_) => (asked.serial.clone(), format!("{}: {refusal}", refusal.code())),
        Err(_) => {
            let shown: String = asked.serial.chars().take(64).collect();
            (
                INVALID_SERIAL.to_owned(),
                format!("{}: serial {:?}", refusal.code(), fleet_shared::text::printable(&shown)),
            )
        }
    };
    let event = AuditEvent {
        at_ms: now,
        serial,
        claim_certificate: asked.claim.chars().take(64).collect(),
        certificate: asked.certificate.clone(),
        outcome: "refused".into(),
        reason: Some(reason),
    };
    if let Err(e) = deps.audit.audit(&event).await {
        warn!(serial = %asked.serial, error = %e, "refusal not audited");
    }
    emit(deps, now, Some(refusal.code()));
    HookResponse::refuse()
}

fn emit<A, I, P, R>(deps: &Deps<A, I, P, R>, now: i64, refused: Option<&'static str>) {
    let mut dimensions = vec![("Function", FUNCTION.to_owned())];
    let metric = match refused {
        None => "Allowed",
        Some(reason) => {
            dimensions.push(("Reason", reason.to_owned()));
            "Refused"
        }
    };
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: now,
        dimensions,
        values: vec![(metric, 1.0, Unit::Count)],
    }]);
}

#[cfg(test)]
mod tests;
