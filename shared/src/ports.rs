//! Ports: small traits in domain types, one per capability and IAM grant. A function's `Deps`
//! holds one field per port it uses, so its trait bounds read like its IAM statements in
//! `infra/template.yaml`. The AWS and the embedded adapters implement the same traits and
//! pass the same contract suite (`tests/src/contract.rs`).
//!
//! | trait | AWS adapter | AWS grant (template) |
//! |---|---|---|
//! | [`DeviceRegistry`] | `DevicesTable` | `dynamodb:BatchGetItem`, `dynamodb:PartiQLUpdate` + `dynamodb:PartiQLInsert` (BatchExecuteStatement) on the Devices table (items `state`, `arrival#<boot>#<seq>`) |
//! | [`DeviceAdmin`] | `DevicesTable` | `dynamodb:BatchWriteItem`, `Query`, `Scan` (operators, fleetctl); `Scan` (a firmware campaign's stage), `BatchGetItem` (a rotation's stage: the devices due) |
//! | [`TelemetrySink`] | `HotStore`: `TimestreamSink`, or none (the archive holds it) | `timestream:WriteRecords` on the table (+ `DescribeEndpoints`), only with `HotStore=timestream` |
//! | [`TelemetryQuery`] | `TelemetryReader`: `TimestreamQuery`, or `ArchiveTelemetry` over the archive | `timestream:Select`, or `s3:ListBucket` + `s3:GetObject` on `raw/*` (operators) |
//! | [`RawArchive`] | `S3Archive` | `s3:PutObject` on `raw/*` |
//! | [`ArchiveReader`] | `S3Archive` | `s3:ListBucket`, `s3:GetObject` on `raw/*` (replay, operators) |
//! | [`Quarantine`] | `S3Archive` | `s3:PutObject` on `quarantine/*` |
//! | [`QuarantineReader`] | `S3Archive` | `s3:ListBucket`, `s3:GetObject` on `quarantine/*` (operators) |
//! | [`ShadowService`] | `IotDataShadows` (locally `fleet_local::shadow_client::MqttShadows`) | `iot:GetThingShadow`, `iot:UpdateThingShadow`, `iot:DeleteThingShadow` on the things (operators) |
//! | [`TwinStore`] | `TwinsTable` | `dynamodb:GetItem`, `dynamodb:PutItem` on the Twins table, `dynamodb:Query` on its `by_drift` index |
//! | [`TwinPolicies`] | `TwinsTable` | `dynamodb:GetItem` on the Twins table (`UpdateItem` for operators) |
//! | [`Allowlist`] | `CertificatesTable` | `dynamodb:GetItem`, `dynamodb:UpdateItem` (enrol, conditional) on the Certificates table (`PutItem`, `DeleteItem`, `Query` for operators) |
//! | [`CertificateInventory`] | `CertificatesTable` | `dynamodb:PutItem` (hook), `dynamodb:Query` on its `by_expiry` index (expiry check), `GetItem` |
//! | [`ProvisioningAudit`] | `CertificatesTable` | `dynamodb:PutItem` (audit events), `dynamodb:UpdateItem` (claim counters) |
//! | [`DeviceCertStatus`] | `DevicesTable` | `dynamodb:BatchWriteItem` on the Devices table (item `cert` per device: put, delete) |
//! | [`Reports`] | `S3Archive` | `s3:PutObject`, `s3:GetObject` on `reports/*`, `s3:ListBucket` under `reports/` (a report is listed before it is read) |
//! | [`ReconcileProgress`] | `CertificatesTable` | `dynamodb:GetItem`, `dynamodb:PutItem` (item `$reconcile`) |
//! | [`PresenceReader`] | `DevicesTable` | `dynamodb:GetItem` on the Devices table (item `presence` per device); `Scan` for operators (`presence_page`) |
//! | [`PresenceStore`] | `PresenceTables` | `dynamodb:GetItem`, `dynamodb:PutItem` (conditional) on the Devices table, `dynamodb:UpdateItem` on the Health table, in one `TransactWriteItems` |
//! | [`HealthCounters`] | `HealthTable` | `dynamodb:UpdateItem` on the Health table |
//! | [`SloReader`] | `HealthTable` | `dynamodb:GetItem`, `dynamodb:Query` on the Health table |
//! | [`HealthLedger`] | `HealthTable` | `dynamodb:Query`, `GetItem`, `BatchWriteItem`, `PutItem` on the Health table |
//! | [`CommandStore`] | `CommandsTable` | `dynamodb:UpdateItem` (the seq counter, a settled command, conditional), `PutItem` (conditional), `GetItem`, `Query` on its `by_thing` index |
//! | [`CommandPublisher`] | `IotDataShadows` (locally `MqttPublisher`, the broker) | `iot:Publish` on `topic/cmd/fleet/*/req` |
//! | [`CertificateRegistry`] | `IotControlPlane` | `iot:ListCertificates`, `iot:DescribeCertificate` on `cert/*`, `iot:ListPrincipalThings`, `iot:ListThingPrincipals` on `thing/*` (reconciliation, decommission) |
//! | [`CertificateControl`] | `IotControlPlane` | `iot:UpdateCertificate` on `cert/*` (operators: decommission) |
//! | [`CampaignStore`] | `CampaignsTable` | `dynamodb:GetItem`, `dynamodb:PutItem` (conditional on the version), `dynamodb:Scan` on the Campaigns table |
//! | [`JobsControl`] | `IotJobs` (locally the local IoT Core's jobs service) | `iot:CreateJob`, `iot:CancelJob`, `iot:DescribeJob`, `iot:ListJobExecutionsForJob` on `job/*` (CreateJob also on `thing/*` and `thinggroup/fleetline-job-*`); `iot:CreateThingGroup`, `iot:AddThingToThingGroup`, `iot:DeleteThingGroup` on `thinggroup/fleetline-job-*` (jobs over 100 targets; OTA campaigns) |

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use crate::error::{ErrorKind, StoreError};
use crate::ingest::{ArchiveObject, QuarantineLine};
use crate::model::{
    AllowlistEntry, CertStatus, Certificate, CertificateDetail, CertificateId, CertificatePage, Device,
    DeviceRegistration, DeviceState, DriftSummary, Enrolment, ExecutionStatus, JobId, JobProgress, MessageId,
    NewJob, ShadowName, StoredReading, ThingName, Twin,
};
use crate::ota::campaign::Campaign;
use crate::twin::policy::StalePolicy;

/// What the ingest pipeline reads and writes about devices.
pub trait DeviceRegistry: Send + Sync {
    /// Look up many things at once (enrichment). Unknown things are simply absent.
    fn get_many(
        &self,
        things: &[ThingName],
    ) -> impl Future<Output = Result<HashMap<ThingName, Device>, StoreError>> + Send;

    /// Record each device's newest state, at most one write per device, never replacing a
    /// newer stored state (`last_ts_ms`). Creates the device item for unregistered things.
    /// Returns the devices whose write failed, each with a typed error.
    fn record_states(
        &self,
        states: &[(ThingName, DeviceState)],
    ) -> impl Future<Output = Vec<(ThingName, StoreError)>> + Send;

    /// A skew-corrected reading is stored at its message's arrival time, which a redelivered
    /// copy does not share, so each such message's first arrival is pinned here. For each
    /// `(id, rx_ms)` (the id of a message's first skew-corrected reading, this copy's arrival),
    /// the arrival the message was first seen with: `rx_ms` itself when the message is new.
    /// Pins are kept for [`ARRIVAL_PIN_DAYS`]; an error is that message's alone.
    fn first_arrivals(
        &self,
        arrivals: &[(MessageId, i64)],
    ) -> impl Future<Output = Vec<Result<i64, StoreError>>> + Send;
}

/// How long a skew-corrected message's first arrival is kept ([`DeviceRegistry::first_arrivals`]):
/// a copy redelivered (or replayed alone from the archive) later than this is stored again.
pub const ARRIVAL_PIN_DAYS: i64 = 30;

/// How the hot store took one reading.
#[derive(Debug, Clone)]
pub enum WriteStatus {
    /// Newly stored (or an identical rewrite the store cannot tell apart).
    Written,
    /// Already stored with the same content (same `(thing, boot, seq)`): nothing changed.
    Duplicate,
    /// Outside the time range the store accepts: kept in the archive only.
    TooLate,
    /// Not stored. The error's kind says what to do: transient → retry, permanent or
    /// conflict → quarantine with the reason. Shared by every reading one request carried.
    Refused(Arc<StoreError>),
}

impl WriteStatus {
    pub fn is_stored(&self) -> bool {
        matches!(self, WriteStatus::Written | WriteStatus::Duplicate | WriteStatus::TooLate)
    }

    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            WriteStatus::Refused(e) => Some(e.kind),
            _ => None,
        }
    }
}

impl PartialEq for WriteStatus {
    /// Refusals compare by kind (errors themselves have no equality).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (WriteStatus::Refused(a), WriteStatus::Refused(b)) => a.kind == b.kind,
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

/// The hot time-series store.
pub trait TelemetrySink: Send + Sync {
    /// Write readings; the result has one status per input, in order. A request-level
    /// failure becomes a `Refused` status on every reading it carried.
    fn write(&self, readings: &[StoredReading]) -> impl Future<Output = Vec<WriteStatus>> + Send;
}

/// Reading stored telemetry back (operators, dashboards).
pub trait TelemetryQuery: Send + Sync {
    /// A thing's readings with `time_ms >= since_ms`, oldest first, at most `limit`.
    fn telemetry(
        &self,
        thing: &ThingName,
        since_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredReading>, StoreError>> + Send;
}

/// The cold archive of raw payloads: the source of truth that replays read.
pub trait RawArchive: Send + Sync {
    fn put_raw(&self, object: &ArchiveObject) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Reading the raw archive back: the source of truth a replay re-ingests.
pub trait ArchiveReader: Send + Sync {
    /// Keys of the archive objects under `prefix` (e.g. `raw/dt=2025-11-24/`), every page, in key order.
    fn archive_keys(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Keys under `prefix` that sort after `start_after`, in key order, at most `max`: the
    /// partitions from a time on, without listing what lies before it.
    fn archive_keys_after(
        &self,
        prefix: &str,
        start_after: &str,
        max: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// One object's bytes (gzip NDJSON).
    fn archive_object(&self, key: &str) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;
}

/// Where payloads that cannot be stored go, with their reasons.
pub trait Quarantine: Send + Sync {
    fn put_quarantined(
        &self,
        lines: &[QuarantineLine],
        received_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Reading the quarantine back (operators).
pub trait QuarantineReader: Send + Sync {
    /// Quarantined messages received at or after `since_ms`, oldest first.
    fn quarantined(
        &self,
        since_ms: i64,
    ) -> impl Future<Output = Result<Vec<QuarantineLine>, StoreError>> + Send;
}

/// Operator writes and reads of the device registry.
pub trait DeviceAdmin: Send + Sync {
    fn register(
        &self,
        devices: &[(ThingName, DeviceRegistration)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn device(&self, thing: &ThingName) -> impl Future<Output = Result<Option<Device>, StoreError>> + Send;
    /// Every device, all pages, sorted by thing name.
    fn devices(&self) -> impl Future<Output = Result<Vec<Device>, StoreError>> + Send;
    /// The devices among `things` (those the registry knows), sorted by thing name: read by key,
    /// so it costs what `things` holds, not what the fleet holds (a rotation's devices due).
    fn devices_among(
        &self,
        things: &[ThingName],
    ) -> impl Future<Output = Result<Vec<Device>, StoreError>> + Send;
}

/// Twins: mirrored shadows, written only by conditional writes on their store revision.
pub trait TwinStore: Send + Sync {
    fn twin(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
    ) -> impl Future<Output = Result<Option<Twin>, StoreError>> + Send;

    /// Store `twin` if the stored one is still at revision `twin.revision - 1` (revision 1:
    /// if none is stored). `Ok(false)`: another writer got there first; read and try again.
    fn put_twin(&self, twin: &Twin) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Twins drifting since `before_ms` or earlier, oldest drift first, at most `limit`: read
    /// through an index on the drift start, never a scan of the fleet.
    fn drifting_since(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Twin>, StoreError>> + Send;

    /// Every twin drifting since `before_ms` or earlier, one page at a time (index order, not
    /// globally sorted): start with `None`; each answer carries the cursor of the next page,
    /// `None` after the last. The cursor is only good within the process that got it.
    fn drifting_page(
        &self,
        before_ms: i64,
        cursor: Option<DriftCursor>,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<Twin>, Option<DriftCursor>), StoreError>> + Send;

    /// How many twins drift and since when the oldest does, from the drift index: the cost
    /// grows with the drifting twins, not with the fleet.
    fn drift_summary(&self) -> impl Future<Output = Result<DriftSummary, StoreError>> + Send;

    /// Twins whose reported firmware is `fw` (see [`Twin::reported_fw`]), by thing, at most
    /// `limit`: read through an index on it, never a scan.
    fn reporting_fw(
        &self,
        fw: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Twin>, StoreError>> + Send;
}

/// Where a walk through the drift index stands (each backend keeps its own position in it).
#[derive(Debug, Clone, PartialEq)]
pub struct DriftCursor(pub serde_json::Value);

/// The fleet's stale-desired policies ([`StalePolicy`], one per top-level desired key).
pub trait TwinPolicies: Send + Sync {
    /// Every policy, by key.
    fn policies(&self) -> impl Future<Output = Result<Vec<StalePolicy>, StoreError>> + Send;
    /// Add or replace the policy of `policy.key`.
    fn set_policy(&self, policy: &StalePolicy) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// `false` when the key had no policy.
    fn remove_policy(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// A shadow as the Device Shadow service holds it, for an operator write.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowState {
    pub version: u64,
    pub desired: serde_json::Map<String, serde_json::Value>,
    pub reported: serde_json::Map<String, serde_json::Value>,
}

impl ShadowState {
    /// From a shadow document as the service returns it (`{"state":{"desired","reported"},
    /// "version"}`, the answer to a get on either transport).
    pub fn from_document(doc: &serde_json::Value) -> Self {
        let section = |name: &str| doc["state"][name].as_object().cloned().unwrap_or_default();
        Self {
            version: doc["version"].as_u64().unwrap_or(0),
            desired: section("desired"),
            reported: section("reported"),
        }
    }
}

/// Why the shadow service did not apply an update.
#[derive(Debug, thiserror::Error)]
pub enum ShadowCallError {
    /// 409: the shadow is no longer at the version the request carried.
    #[error("version conflict")]
    Conflict,
    /// Refused for good (400, 404, 413, ...), with the service's message.
    #[error("rejected {code}: {message}")]
    Rejected { code: u16, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The Device Shadow service, as an operator writes to it (AWS: iot-data; locally: MQTT).
pub trait ShadowService: Send + Sync {
    fn get_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
    ) -> impl Future<Output = Result<Option<ShadowState>, StoreError>> + Send;

    /// Send one update request (`{"state":…, "version"?, "clientToken"}`); the new version.
    fn update_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
        request: &serde_json::Value,
    ) -> impl Future<Output = Result<u64, ShadowCallError>> + Send;

    /// Delete the shadow (its version numbering continues if it is created again); the
    /// version it had, or `None` when there was no shadow.
    fn delete_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;
}

/// No shadow service: for a function built where none is reachable (e.g. twin-sync under
/// `cargo lambda watch`). It has no values, so an `Option<NoShadowService>` is always `None`.
#[derive(Debug, Clone, Copy)]
pub enum NoShadowService {}

impl ShadowService for NoShadowService {
    async fn get_shadow(&self, _: &ThingName, _: &ShadowName) -> Result<Option<ShadowState>, StoreError> {
        match *self {}
    }
    async fn update_shadow(
        &self,
        _: &ThingName,
        _: &ShadowName,
        _: &serde_json::Value,
    ) -> Result<u64, ShadowCallError> {
        match *self {}
    }
    async fn delete_shadow(&self, _: &ThingName, _: &ShadowName) -> Result<Option<u64>, StoreError> {
        match *self {}
    }
}

/// How enrolling a serial number with a certificate ended (a conditional write: two devices
/// presenting one serial at once cannot both provision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    /// Now provisioned with that certificate (or already was: a retry).
    Yes,
    /// Not on the allowlist.
    Unknown,
    /// Decommissioned.
    Decommissioned,
    /// Provisioned with another certificate.
    Taken(CertificateId),
    /// Not provisioned (a rotation needs a provisioned serial: it was reset meanwhile).
    NotProvisioned,
}

/// How rotating from `from` to `to` ends for a serial whose enrolment is `current`, when that
/// alone decides it; `None`: provisioned with `from`, so the rotation is to be written
/// (conditional on it). Both allowlist backends decide by this.
pub fn rotation_settled(current: &Enrolment, from: &CertificateId, to: &CertificateId) -> Option<Enrolled> {
    match current {
        Enrolment::Decommissioned { .. } => Some(Enrolled::Decommissioned),
        Enrolment::Allowed => Some(Enrolled::NotProvisioned),
        Enrolment::Provisioned { certificate, .. } if certificate == to => Some(Enrolled::Yes),
        Enrolment::Provisioned { certificate, .. } if certificate != from => {
            Some(Enrolled::Taken(certificate.clone()))
        }
        Enrolment::Provisioned { .. } => None,
    }
}

/// The provisioning allowlist: serial numbers that may provision, and where each stands.
pub trait Allowlist: Send + Sync {
    fn entry(
        &self,
        serial: &ThingName,
    ) -> impl Future<Output = Result<Option<AllowlistEntry>, StoreError>> + Send;

    /// Add serial numbers as allowed; an existing entry keeps its enrolment (class and region
    /// are updated).
    fn allow(&self, entries: &[AllowlistEntry]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Take a serial number off the list if it has not provisioned (`false`: absent, or
    /// provisioned or decommissioned: those are kept, as history).
    fn disallow(&self, serial: &ThingName) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Entries by serial number after `after` (exclusive), at most `limit`.
    fn entries(
        &self,
        after: Option<&ThingName>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<AllowlistEntry>, StoreError>> + Send;

    /// Provision `serial` with `certificate` if it is allowed, or already provisioned with
    /// that certificate; conditional, so a race has one winner.
    fn enrol(
        &self,
        serial: &ThingName,
        certificate: &CertificateId,
        at_ms: i64,
    ) -> impl Future<Output = Result<Enrolled, StoreError>> + Send;

    /// Rotate a provisioned serial number's certificate: provisioned with `from`, it becomes
    /// provisioned with `to` (conditional on `from`, so a race has one winner); already with
    /// `to` is a retry (`Yes`); with a third certificate, `Taken`.
    fn rotate(
        &self,
        serial: &ThingName,
        from: &CertificateId,
        to: &CertificateId,
        at_ms: i64,
    ) -> impl Future<Output = Result<Enrolled, StoreError>> + Send;

    /// Put a provisioned serial number back to allowed (an operator's way out when a device
    /// was enrolled but its provisioning did not complete, and it asks again with a new
    /// certificate); `false` unless it was provisioned.
    fn reset(&self, serial: &ThingName) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Mark a serial number decommissioned (kept, never provisioned again); the entry before.
    fn decommission(
        &self,
        serial: &ThingName,
        at_ms: i64,
    ) -> impl Future<Output = Result<Option<AllowlistEntry>, StoreError>> + Send;
}

/// The certificate inventory, with an index on expiry so the daily check reads only what
/// expires inside its window.
pub trait CertificateInventory: Send + Sync {
    /// Record (or replace) a certificate.
    fn record(&self, cert: &Certificate) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Record many (reconciliation adopting what it found, bulk loads).
    fn record_many(&self, certs: &[Certificate]) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn certificate(
        &self,
        id: &CertificateId,
    ) -> impl Future<Output = Result<Option<Certificate>, StoreError>> + Send;

    /// Certificates whose `notAfter` is in `[from_ms, to_ms)`, soonest first, at most `limit`,
    /// through the expiry index (never a scan).
    fn expiring(
        &self,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Certificate>, StoreError>> + Send;
}

/// One provisioning decision, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEvent {
    pub at_ms: i64,
    /// The serial number asked for (as sent, when it was not a valid one).
    pub serial: String,
    pub claim_certificate: String,
    pub certificate: Option<String>,
    /// `allowed` or `refused`.
    pub outcome: String,
    /// The refusal's reason code and detail.
    pub reason: Option<String>,
}

/// The provisioning audit trail, and the counters that find abusive claims.
pub trait ProvisioningAudit: Send + Sync {
    fn audit(&self, event: &AuditEvent) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Count one more unknown serial asked for with `claim`; the count now.
    fn unknown_serial(&self, claim: &str, at_ms: i64)
        -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A serial number's audit trail, oldest first.
    fn trail(&self, serial: &str) -> impl Future<Output = Result<Vec<AuditEvent>, StoreError>> + Send;

    /// Claim certificates that asked for at least
    /// [`SUSPICIOUS_UNKNOWN_SERIALS`](crate::certs::hook::SUSPICIOUS_UNKNOWN_SERIALS) unknown
    /// serials, with their count, most first.
    fn suspicious_claims(&self) -> impl Future<Output = Result<Vec<(String, u64)>, StoreError>> + Send;
}

/// What the daily expiry check says about a device's certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertMark {
    pub certificate: CertificateId,
    pub class: crate::certs::expiry::ExpiryClass,
    pub not_after_ms: i64,
    /// The device needs a new certificate (every class the check reports).
    pub rotation_due: bool,
    pub checked_ms: i64,
}

/// Devices' certificate marks, read: what a certificate rotation campaign needs.
pub trait CertMarks: Send + Sync {
    fn cert_status(
        &self,
        thing: &ThingName,
    ) -> impl Future<Output = Result<Option<CertMark>, StoreError>> + Send;

    /// Every device marked `rotation_due`, by thing name: whom a certificate rotation campaign
    /// takes. Read when a stage starts, never per device; it costs what is due, not the fleet
    /// (on AWS a Query of the sparse index `by_rotation_due`).
    fn rotation_due(&self) -> impl Future<Output = Result<Vec<(ThingName, CertMark)>, StoreError>> + Send;
}

/// Devices' certificate status (`cert_status`, `rotation_due`), written by the daily check.
pub trait DeviceCertStatus: CertMarks {
    fn mark_cert_status(
        &self,
        marks: &[(ThingName, CertMark)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Remove devices' marks (their certificate no longer expires: rotated, or deactivated).
    fn clear_cert_status(&self, things: &[ThingName]) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Reports written next to the archive (`reports/...`, JSON).
pub trait Reports: Send + Sync {
    fn put_report(&self, key: &str, json: &[u8]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A report written before (`None`: there is none under that key).
    fn report(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;
}

/// AWS IoT's certificate registry, read: what reconciliation compares the inventory with.
/// Throttling is a [`Transient`](ErrorKind::Transient) error; the caller backs off.
pub trait CertificateRegistry: Send + Sync {
    /// One page of certificates (ListCertificates), oldest first, after `marker`.
    fn list_certificates(
        &self,
        marker: Option<&str>,
        page_size: usize,
    ) -> impl Future<Output = Result<CertificatePage, StoreError>> + Send;

    /// DescribeCertificate; `None` when the registry no longer has it.
    fn describe_certificate(
        &self,
        id: &CertificateId,
    ) -> impl Future<Output = Result<Option<CertificateDetail>, StoreError>> + Send;

    /// The things a certificate is attached to (ListPrincipalThings, every page).
    fn certificate_things(
        &self,
        arn: &str,
    ) -> impl Future<Output = Result<Vec<ThingName>, StoreError>> + Send;

    /// The certificates attached to a thing (ListThingPrincipals, certificate principals only).
    fn thing_certificates(
        &self,
        thing: &ThingName,
    ) -> impl Future<Output = Result<Vec<CertificateId>, StoreError>> + Send;
}

/// AWS IoT's certificate registry, changed: what decommissioning a device does to it.
pub trait CertificateControl: Send + Sync {
    /// UpdateCertificate: set a certificate's status (`INACTIVE`, `REVOKED`, `ACTIVE`).
    fn set_certificate_status(
        &self,
        id: &CertificateId,
        status: CertStatus,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Where the weekly reconciliation stands: a sweep in progress (`finished_ms` unset: its start,
/// the marker of its next ListCertificates page, `None` for the first) or the last one
/// finished.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReconcileState {
    pub started_ms: i64,
    pub marker: Option<String>,
    pub finished_ms: Option<i64>,
    /// Slices (invocations) this sweep has taken so far.
    pub slices: u32,
}

/// The reconciliation's cursor, kept between the slices of a sweep.
pub trait ReconcileProgress: Send + Sync {
    fn reconcile_state(&self) -> impl Future<Output = Result<Option<ReconcileState>, StoreError>> + Send;
    fn save_reconcile_state(
        &self,
        state: &ReconcileState,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Reading devices' connectivity ([`crate::health::presence`]).
pub trait PresenceReader: Send + Sync {
    fn presence(
        &self,
        thing: &ThingName,
    ) -> impl Future<Output = Result<Option<crate::health::presence::Presence>, StoreError>> + Send;

    /// One page of every device's presence, by thing name after `after` (exclusive), and the
    /// cursor of the next page (`None`: the last). Operators only: it reads the whole fleet.
    fn presence_page(
        &self,
        after: Option<&ThingName>,
        limit: usize,
    ) -> impl Future<Output = Result<PresencePage, StoreError>> + Send;
}

/// A page of devices' presence and where the next page starts.
pub type PresencePage = (Vec<(ThingName, crate::health::presence::Presence)>, Option<ThingName>);

/// Devices' connectivity, written with optimistic concurrency.
pub trait PresenceStore: PresenceReader {
    /// Store `next` if the stored presence is still the one read (`expected`: its place;
    /// `None`: none stored), and add `counts` (the connected gauge's move) to the health
    /// counters in the same transaction, so the gauge counts exactly the devices stored as
    /// connected. `false`: it changed meanwhile (read again and decide again); nothing added.
    fn put_presence(
        &self,
        thing: &ThingName,
        next: &crate::health::presence::Presence,
        expected: Option<&crate::health::presence::Place>,
        counts: &crate::health::tally::HealthDelta,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// The health counters every function adds to as it works ([`crate::health::tally`]).
pub trait HealthCounters: Send + Sync {
    /// Add every tally of `delta` to its bucket and cohort, atomically per counter.
    fn add_health(
        &self,
        delta: &crate::health::tally::HealthDelta,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A cohort's cumulative ledger row and the minute it is at.
pub type LedgerRow = (i64, crate::health::tally::Tally);

/// Reading the SLO ledger ([`crate::health::ledger`]): fleet-health, OTA gates, dashboards.
pub trait SloReader: Send + Sync {
    /// The newest row of `cohort` at or before `minute`.
    fn row_at(
        &self,
        cohort: &crate::health::tally::Cohort,
        minute: i64,
    ) -> impl Future<Output = Result<Option<LedgerRow>, StoreError>> + Send;

    /// Every cohort's newest row (base cohorts and aggregates).
    fn heads(
        &self,
    ) -> impl Future<
        Output = Result<std::collections::BTreeMap<crate::health::tally::Cohort, LedgerRow>, StoreError>,
    > + Send;

    /// The last evaluation fleet-health stored.
    fn latest_health(
        &self,
    ) -> impl Future<Output = Result<Option<crate::health::ledger::HealthReport>, StoreError>> + Send;
}

/// What fleet-health writes: it reads counters, closes minutes into the ledger.
pub trait HealthLedger: SloReader {
    /// The counters of each bucket asked for, by cohort (absent: nothing counted).
    fn buckets(
        &self,
        buckets: &[crate::health::tally::Bucket],
    ) -> impl Future<
        Output = Result<
            std::collections::BTreeMap<
                crate::health::tally::Bucket,
                std::collections::BTreeMap<crate::health::tally::Cohort, crate::health::tally::Tally>,
            >,
            StoreError,
        >,
    > + Send;

    /// The last minute closed (`None`: never).
    fn closed_through(&self) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// Write `minute`'s rows (also the cohorts' heads), then mark it closed. Idempotent: a
    /// minute written twice writes the same rows.
    fn close_minute(
        &self,
        minute: i64,
        rows: &[(crate::health::tally::Cohort, crate::health::tally::Tally)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Write these rows again as they are (each cohort's newest, at its own minute), to be kept
    /// as long as `minute`'s: a cohort quiet for a day or more is active again, and its last row
    /// is where every window reaching back into the quiet time starts. Where rows expire (on
    /// AWS, 30 days after their minute), it would otherwise go while windows still need it.
    fn renew_rows(
        &self,
        minute: i64,
        rows: &[(crate::health::tally::Cohort, LedgerRow)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn put_health(
        &self,
        report: &crate::health::ledger::HealthReport,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The commands sent to devices ([`crate::commands::CommandRecord`]) and each device's
/// command counter.
pub trait CommandStore: Send + Sync {
    /// The thing's next `seq` (1, 2, ...), by an atomic increment: two dispatchers never get
    /// the same one.
    fn next_seq(&self, thing: &ThingName) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Store a new command; a `cmd_id` already stored is a conflict.
    fn put_command(
        &self,
        command: &crate::commands::CommandRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn command(
        &self,
        cmd_id: &str,
    ) -> impl Future<Output = Result<Option<crate::commands::CommandRecord>, StoreError>> + Send;

    /// The thing's commands, newest (highest `seq`) first, at most `limit`.
    fn commands_of(
        &self,
        thing: &ThingName,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<crate::commands::CommandRecord>, StoreError>> + Send;

    /// Store a settled command if the stored one is still `sent`; `false`: an ack settled it
    /// meanwhile.
    fn settle_command(
        &self,
        command: &crate::commands::CommandRecord,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// Publishing a message to devices (IoT Core's data plane; the local broker).
pub trait CommandPublisher: Send + Sync {
    /// Publish `payload` on `topic` at QoS 1.
    fn publish(&self, topic: &str, payload: &[u8]) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// IoT Jobs' control plane: what an OTA campaign asks of it.
pub trait JobsControl: Send + Sync {
    /// Create a job for its targets. A job id that exists already is a [`ErrorKind::Conflict`]
    /// (AWS keeps job ids unique, even after a job is deleted), so a retried create is told
    /// from a new one by the caller.
    fn create_job(&self, job: &NewJob) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Cancel a job: its queued executions become CANCELED; with `force`, those in progress too.
    /// Cancelling a job that is no longer in progress changes nothing.
    fn cancel_job(&self, job: &JobId, force: bool) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The job's status, its executions' counts and the description it was created with;
    /// `None` for an unknown job.
    fn job_progress(
        &self,
        job: &JobId,
    ) -> impl Future<Output = Result<Option<JobProgress>, StoreError>> + Send;
    /// Every execution of the job with its status, in thing order (all pages).
    fn job_executions(
        &self,
        job: &JobId,
    ) -> impl Future<Output = Result<Vec<(ThingName, ExecutionStatus)>, StoreError>> + Send;
    /// The campaign is done with a settled job: free what it holds on the way. On AWS, the
    /// static thing group a job over 100 targets was sent through (a thing can belong to only
    /// 10 static groups, so they must not pile up); locally nothing. Repeating it, or retiring
    /// a job that holds nothing, changes nothing.
    fn retire_job(&self, job: &JobId) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Where OTA campaigns are kept.
pub trait CampaignStore: Send + Sync {
    fn campaign(&self, id: &str) -> impl Future<Output = Result<Option<Campaign>, StoreError>> + Send;
    /// Every campaign, newest first.
    fn campaigns(&self) -> impl Future<Output = Result<Vec<Campaign>, StoreError>> + Send;
    /// Store `campaign` if the stored copy is still at `campaign.version` (0: none stored yet),
    /// as version + 1, which it returns; another writer got there first is a
    /// [`ErrorKind::Conflict`], so an operator's pause and a tick never overwrite each other.
    fn put_campaign(&self, campaign: &Campaign) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
