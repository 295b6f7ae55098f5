//! IoT Core's lifecycle events → each device's connectivity.
//!
//! The topic rule puts every `$aws/events/presence/connected|disconnected/<clientId>` event on
//! the presence queue; this function groups a batch's events by device, folds them into the
//! device's stored presence in session order (`fleet_shared::health::presence`: the greatest
//! `(versionNumber, connected < disconnected, timestamp)` wins, so duplicates and any arrival
//! order end in the state of the last session), and writes it only if the stored presence is
//! still the one read (re-read and fold again on a race).
//! - SQS: the answer names exactly the events of devices whose write failed transiently.
//! - A direct invocation (one event, e.g. `cargo lambda invoke`): `{"applied":n,"stale":n,
//!   "rejected":[reason]}`, or an error `Retryable`.
//!
//! An event that cannot be read (not a lifecycle event, a client id that is not a thing name)
//! is rejected with its reason (logged, counted `Rejected`), never retried: IoT Core wrote it,
//! so retrying cannot change it. Metrics: `Events`, `Connects`, `Disconnects`,
//! `DuplicateClientId` (sessions ended because another connection took the client id: a
//! cloned identity), `PresenceChanged`, `StaleIgnored`, `Rejected`, `Failed`,
//! `CertificatesRetired`, `RetireFailed`, `ClaimSessions` (events of fleet-provisioning claim
//! sessions, client ids `claim-…`: skipped, as no device's).
//!
//! Presence keeps the credential each session authenticated with (`principalIdentifier`: a
//! device's certificate id). When a device connects with another one than its stored presence
//! names (a presence recorded before principals were kept names none: that first connection
//! only records it) and it is the certificate its serial is provisioned with, i.e. its first
//! connection after a certificate rotation, the certificates the rotation superseded are
//! retired before its presence is written (`fleet_shared::certs::decommission::retire_on_connect`:
//! `INACTIVE` in AWS IoT and the inventory, audited `retired`). A transient failure there
//! retries the device's events, so the retirement is not lost; any other is logged and counted
//! (`RetireFailed`), presence goes on, and the retirement is left to `fleetctl devices
//! retire-certs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleet_shared::adapters::aws::{
    CertificatesTable, DevicesTable, HealthTable, IotControlPlane, PresenceTables,
};
use fleet_shared::certs::decommission::{self, retire_on_connect};
use fleet_shared::health::presence::{fold, EventError, Kind, LifecycleEvent, Presence};
use fleet_shared::health::signals;
use fleet_shared::health::tally::{Cohort, HealthDelta};
use fleet_shared::ingest::{parse_event, OwnedInbound, Trigger};
use fleet_shared::lambda::{self, AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::model::ThingName;
use fleet_shared::ports::{
    Allowlist, CertificateControl, CertificateInventory, CertificateRegistry, DeviceRegistry, HealthCounters,
    PresenceStore, ProvisioningAudit,
};
use fleet_shared::{time, StoreError};
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{info, warn};

pub const FUNCTION: &str = "presence";

/// Reads and conditional writes one device may take in one batch before its events are
/// retried.
pub const MAX_ATTEMPTS: usize = 5;

/// What retiring a rotated device's superseded certificates reads and writes.
pub trait CertStore: Allowlist + CertificateInventory + ProvisioningAudit {}
impl<T: Allowlist + CertificateInventory + ProvisioningAudit> CertStore for T {}
/// AWS IoT's certificate registry (or the local IoT Core's).
pub trait CertRegistry: CertificateRegistry + CertificateControl {}
impl<T: CertificateRegistry + CertificateControl> CertRegistry for T {}

/// Everything the handler needs, built once per cold start.
pub struct Deps<R, P, H, C, G> {
    /// Devices table: each device's class, region and firmware (its health cohort).
    pub registry: R,
    /// Devices table (the `presence` item per device) with the Health table's connected gauge.
    pub presence: P,
    /// Health table: connects, disconnects, DUPLICATE_CLIENTID per cohort and minute.
    pub health: H,
    /// Certificates table: the allowlist (a serial's current certificate), the inventory and
    /// the audit trail, for retiring superseded certificates after a rotation.
    pub certs: C,
    /// AWS IoT's registry: a thing's certificates, their status.
    pub cert_registry: G,
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

impl Deps<DevicesTable, PresenceTables, HealthTable, CertificatesTable, IotControlPlane> {
    /// On AWS: the Devices table (`FLEET_DEVICES_TABLE`), the Health table
    /// (`FLEET_HEALTH_TABLE`), the Certificates table (`FLEET_CERTIFICATES_TABLE`) and AWS IoT.
    pub fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        let devices = DevicesTable::from_env(&aws.sdk, &aws.env)?;
        let health = HealthTable::from_env(&aws.sdk, &aws.env)?;
        Ok(Self {
            registry: devices.clone(),
            presence: PresenceTables { devices, health: health.clone() },
            health,
            certs: CertificatesTable::from_env(&aws.sdk, &aws.env)?,
            cert_registry: IotControlPlane::new(&aws.sdk)?,
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
    /// On the embedded backend: the one SQLite database; the stage is `local`.
    pub fn on_embedded(e: &lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        Ok(Self {
            registry: e.db.clone(),
            presence: e.db.clone(),
            health: e.db.clone(),
            certs: e.db.clone(),
            cert_registry: e.db.clone(),
            clock: time::now_ms,
            metrics: MetricsOut::Stdout { stage: "local".to_owned() },
        })
    }
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub events: usize,
    pub connects: usize,
    pub disconnects: usize,
    pub duplicate_clientid: usize,
    /// Devices whose presence changed.
    pub changed: usize,
    /// Events that changed nothing (older, or already seen).
    pub stale: usize,
    /// Events refused for good, with the reason.
    pub rejected: Vec<(String, String)>,
    /// Events whose device's write failed transiently: (message id, error), retried.
    pub failed: Vec<(String, Arc<StoreError>)>,
    /// Certificates set `INACTIVE` because their device connected with the one a rotation
    /// replaced them with.
    pub retired: usize,
    /// Devices whose superseded certificates could not be retired (not transiently).
    pub retire_failed: usize,
    /// Events of fleet-provisioning claim sessions (client ids `claim-…`): no device's.
    pub claim_sessions: usize,
}

/// The answer to a direct invocation.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DirectResponse {
    pub applied: usize,
    pub stale: usize,
    pub rejected: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Response {
    Sqs(aws_lambda_events::event::sqs::SqsBatchResponse),
    Direct(DirectResponse),
}

pub async fn handle<R: DeviceRegistry, P: PresenceStore, H: HealthCounters, C: CertStore, G: CertRegistry>(
    deps: &Deps<R, P, H, C, G>,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<Response, Retryable> {
    let now = (deps.clock)();
    match parse_event(event.payload.get(), now) {
        Trigger::Sqs(messages) => {
            let outcome = run(deps, now, &messages).await;
            Ok(Response::Sqs(lambda::batch_response(outcome.failed.iter().map(|(id, _)| id.as_str()))))
        }
        Trigger::Direct(message) => {
            let outcome = run(deps, now, std::slice::from_ref(&message)).await;
            if let Some((_, e)) = outcome.failed.into_iter().next() {
                return Err(Retryable { what: "presence not recorded", source: e });
            }
            Ok(Response::Direct(DirectResponse {
                applied: outcome.changed,
                stale: outcome.stale,
                rejected: outcome.rejected.into_iter().map(|(_, why)| why).collect(),
            }))
        }
    }
}

/// A batch's events, by device, into each device's presence; logged and measured.
pub async fn run<R: DeviceRegistry, P: PresenceStore, H: HealthCounters, C: CertStore, G: CertRegistry>(
    deps: &Deps<R, P, H, C, G>,
    now: i64,
    messages: &[OwnedInbound],
) -> Outcome {
    let mut out = Outcome { events: messages.len(), ..Outcome::default() };
    let mut by_thing: BTreeMap<ThingName, Vec<(&str, LifecycleEvent)>> = BTreeMap::new();
    for m in messages {
        let parsed = match m.defect.as_ref() {
            Some(defect) => Err(defect.detail.clone()),
            None => match LifecycleEvent::parse(&m.body) {
                // A device provisioning by claim: no device's presence, nothing wrong either.
                Err(EventError::ClaimSession(_)) => {
                    out.claim_sessions += 1;
                    continue;
                }
                parsed => parsed.map_err(|e| e.to_string()),
            },
        };
        match parsed {
            Ok((thing, e)) => {
                match e.event_type {
                    Kind::Connected => out.connects += 1,
                    Kind::Disconnected => out.disconnects += 1,
                }
                out.duplicate_clientid +=
                    usize::from(e.disconnect_reason.as_deref() == Some("DUPLICATE_CLIENTID"));
                by_thing.entry(thing).or_default().push((m.message_id.as_str(), e));
            }
            Err(why) => {
                warn!(message_id = %m.message_id, reason = %why, "lifecycle event rejected");
                out.rejected.push((m.message_id.clone(), why));
            }
        }
    }
    // Each device's health cohort (class, region, firmware): one batched lookup. Without it the
    // events still count, as unregistered devices'.
    let things: Vec<ThingName> = by_thing.keys().cloned().collect();
    let devices = match deps.registry.get_many(&things).await {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "devices not looked up; their presence counts as unregistered");
            Default::default()
        }
    };
    let mut counts = HealthDelta::default();
    let certs = Certs { store: &deps.certs, registry: &deps.cert_registry, now };
    for (thing, events) in &by_thing {
        // Connectivity is counted per class and region: a device's firmware is often not
        // known yet when it connects.
        let cohort = Cohort::of(devices.get(thing), None).without_fw();
        let n = |kind: Kind| events.iter().filter(|(_, e)| e.event_type == kind).count() as i64;
        match record(&deps.presence, thing, &cohort, events.iter().map(|(_, e)| e), &certs).await {
            Ok(Some(Recorded { presence: now_stored, retired, retire_failed })) => {
                out.changed += 1;
                out.retired += retired;
                out.retire_failed += usize::from(retire_failed);
                out.stale += events.len() - 1;
                // A session taken over by another connection with the same client id (a cloned
                // identity), counted once however often its event is delivered.
                let taken_over = now_stored.disconnect_reason.as_deref() == Some("DUPLICATE_CLIENTID");
                let (c, d) = (n(Kind::Connected), n(Kind::Disconnected));
                signals::lifecycle(&mut counts, now, &cohort, c, d, i64::from(taken_over));
            }
            Ok(None) => out.stale += events.len(),
            Err(e) if e.is_transient() => {
                warn!(%thing, error = %e, "presence not recorded; its events will be retried");
                let e = Arc::new(e);
                out.failed.extend(events.iter().map(|(id, _)| ((*id).to_owned(), Arc::clone(&e))));
            }
            Err(e) => {
                warn!(%thing, error = %e, "presence refused by the store");
                out.rejected.extend(events.iter().map(|(id, _)| ((*id).to_owned(), e.to_string())));
            }
        }
    }
    if let Err(e) = deps.health.add_health(&counts).await {
        warn!(error = %e, "lifecycle counts not added to the health counters");
    }
    info!(
        events = out.events,
        changed = out.changed,
        stale = out.stale,
        rejected = out.rejected.len(),
        failed = out.failed.len(),
        "lifecycle events recorded"
    );
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: now,
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![
            ("Events", out.events as f64, Unit::Count),
            ("Connects", out.connects as f64, Unit::Count),
            ("Disconnects", out.disconnects as f64, Unit::Count),
            ("DuplicateClientId", out.duplicate_clientid as f64, Unit::Count),
            ("PresenceChanged", out.changed as f64, Unit::Count),
            ("StaleIgnored", out.stale as f64, Unit::Count),
            ("Rejected", out.rejected.len() as f64, Unit::Count),
            ("Failed", out.failed.len() as f64, Unit::Count),
            ("CertificatesRetired", out.retired as f64, Unit::Count),
            ("RetireFailed", out.retire_failed as f64, Unit::Count),
            ("ClaimSessions", out.claim_sessions as f64, Unit::Count),
        ],
    }]);
    out
}

/// The certificate ports a device's new credential is checked against.
pub struct Certs<'a, C, G> {
    pub store: &'a C,
    pub registry: &'a G,
    pub now: i64,
}

impl<C: CertStore, G: CertRegistry> Certs<'_, C, G> {
    /// `thing` connected with `principal`, another credential than before: retire what a
    /// rotation to it superseded. How many certificates it set `INACTIVE` (`None`: it failed,
    /// logged); only a transient failure is an error (the device's events are retried).
    async fn new_principal(&self, thing: &ThingName, principal: &str) -> Result<Option<usize>, StoreError> {
        let ports = decommission::Ports {
            allowlist: self.store,
            registry: self.registry,
            inventory: self.store,
            audit: self.store,
        };
        match retire_on_connect(ports, thing, principal, self.now).await {
            Ok(Some(r)) if !r.deactivated.is_empty() => {
                info!(%thing, kept = %r.kept, deactivated = ?r.deactivated, "superseded certificates retired");
                Ok(Some(r.deactivated.len()))
            }
            Ok(_) => Ok(Some(0)),
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                warn!(%thing, error = %e, "superseded certificates not retired: run fleetctl devices retire-certs");
                Ok(None)
            }
        }
    }
}

/// What [`record`] stored.
#[derive(Debug)]
pub struct Recorded {
    pub presence: Presence,
    /// Certificates retired on the way.
    pub retired: usize,
    /// Retiring them failed (not transiently).
    pub retire_failed: bool,
}

/// Fold one device's events into its stored presence and write it if it changed, on the
/// presence read (re-read and fold again when another writer got there first), moving the
/// connected gauge with it: a connected device counts in `cohort`. A device now known to use
/// another credential than the one its stored presence names goes through
/// [`Certs::new_principal`] first (an error there writes nothing). What it stored, if anything
/// changed.
pub async fn record<'a, P: PresenceStore, C: CertStore, G: CertRegistry>(
    store: &P,
    thing: &ThingName,
    cohort: &Cohort,
    events: impl Iterator<Item = &'a LifecycleEvent> + Clone,
    certs: &Certs<'_, C, G>,
) -> Result<Option<Recorded>, StoreError> {
    let (mut retired, mut retire_failed) = (0, false);
    for _ in 0..MAX_ATTEMPTS {
        let stored = store.presence(thing).await?;
        let Some(mut next) = fold(stored.as_ref(), events.clone()) else { return Ok(None) };
        // Only a change from a known credential: a presence stored before principals were kept
        // (or none at all) makes the first connection record it, not look anything up.
        let before = stored.as_ref().and_then(|p| p.principal.as_deref());
        if let (Some(before), Some(now)) = (before, next.principal.as_deref()) {
            if before != now {
                match certs.new_principal(thing, now).await? {
                    Some(n) => retired += n,
                    None => retire_failed = true,
                }
            }
        }
        next.counted_in = next.connected.then(|| cohort.clone());
        let mut gauge = HealthDelta::default();
        signals::presence(&mut gauge, stored.as_ref(), &next);
        if store.put_presence(thing, &next, stored.as_ref().map(|p| &p.place), &gauge).await? {
            return Ok(Some(Recorded { presence: next, retired, retire_failed }));
        }
    }
    Err(StoreError::transient("presence write", "the device's presence kept changing underneath"))
}

#[cfg(test)]
mod tests;
