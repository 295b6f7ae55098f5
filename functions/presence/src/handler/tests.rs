//! Handler tests: `events/presence/` through the handler on the embedded (SQLite, in-memory)
//! store: an out-of-order batch with duplicates and an unreadable event, direct invocations, a
//! concurrent writer, and a store that fails.

use anyhow::{Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::health::presence::{Place, Presence};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::{json, Value};

use fleet_shared::certs::{parse_pem, test_certs};
use fleet_shared::model::{AllowlistEntry, CertStatus, Certificate, CertificateId, Enrolment};
use fleet_shared::ports::{Allowlist, AuditEvent, CertificateInventory, PresenceReader, ProvisioningAudit};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU8, AtomicUsize};

use super::*;

const BATCH: &str = include_str!("../../../../events/presence/sqs-out-of-order.json");
const CONNECTED: &str = include_str!("../../../../events/presence/connected.json");
const DISCONNECTED: &str = include_str!("../../../../events/presence/disconnected.json");

fn fixed_clock() -> i64 {
    1_764_001_000_000
}

type Embedded = Deps<SqliteStore, SqliteStore, SqliteStore, SqliteStore, SqliteStore>;

fn deps() -> Result<Embedded> {
    let db = SqliteStore::in_memory()?;
    Ok(Deps {
        registry: db.clone(),
        presence: db.clone(),
        health: db.clone(),
        certs: db.clone(),
        cert_registry: db,
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    })
}

async fn invoke<R: DeviceRegistry, P: PresenceStore, H: HealthCounters, C: CertStore, G: CertRegistry>(
    deps: &Deps<R, P, H, C, G>,
    event: &str,
) -> Result<Value> {
    let payload = RawValue::from_string(event.to_owned())?;
    let answer = handle(deps, LambdaEvent::new(payload, Context::default())).await?;
    Ok(serde_json::to_value(answer)?)
}

fn thing(name: &str) -> ThingName {
    ThingName::parse(name).expect("thing name")
}

#[tokio::test]
async fn an_out_of_order_batch_ends_in_each_devices_last_session() -> Result<()> {
    let deps = deps()?;
    // WHEN the batch arrives twice (sessions 3 and 5 of sensor-001 shuffled, with a duplicate)
    for _ in 0..2 {
        let answer = invoke(&deps, BATCH).await?;
        assert_eq!(
            answer,
            json!({"batchItemFailures": []}),
            "nothing to retry: the unreadable event is rejected"
        );
    }
    // THEN sensor-001 is disconnected by session 5's end, which lasted 5 minutes
    let p = deps.presence.presence(&thing("sensor-001")).await?.context("sensor-001")?;
    assert!(!p.connected);
    assert_eq!(p.place.version, 5);
    assert_eq!((p.session_started_ms, p.session_ms), (Some(1_764_000_600_000), Some(300_000)));
    assert_eq!(p.disconnect_reason.as_deref(), Some("CONNECTION_LOST"));
    // AND sensor-002 connected, sensor-003's session taken over, sensor-004's event refused
    assert!(deps.presence.presence(&thing("sensor-002")).await?.context("sensor-002")?.connected);
    let p3 = deps.presence.presence(&thing("sensor-003")).await?.context("sensor-003")?;
    assert_eq!(p3.disconnect_reason.as_deref(), Some("DUPLICATE_CLIENTID"));
    assert!(deps.presence.presence(&thing("sensor-004")).await?.is_none());
    // AND fleet health counts one device connected, and one session taken over once, though
    // the batch came twice
    use fleet_shared::health::tally::{counter, minute_of, Bucket};
    use fleet_shared::ports::HealthLedger;
    let minute = Bucket::Minute(minute_of(fixed_clock()));
    let b = deps.health.buckets(&[Bucket::Gauge, minute]).await?;
    let sum = |bucket: Bucket, name: &str| {
        b.get(&bucket).map_or(0, |m| m.values().map(|t| t.get(name)).sum::<i64>())
    };
    assert_eq!(sum(Bucket::Gauge, counter::CONNECTED), 1);
    assert_eq!(sum(minute, counter::DUPLICATE_CLIENTID), 1);
    Ok(())
}

#[tokio::test]
async fn a_late_connect_never_flips_a_disconnected_device() -> Result<()> {
    let deps = deps()?;
    let d = invoke(&deps, DISCONNECTED).await?;
    assert_eq!(d, json!({"applied": 1, "stale": 0, "rejected": []}));
    // The session's connect, delivered after its disconnect: the session's length, not a flip.
    let c = invoke(&deps, CONNECTED).await?;
    assert_eq!(c, json!({"applied": 1, "stale": 0, "rejected": []}));
    let p = deps.presence.presence(&thing("sensor-001")).await?.context("presence")?;
    assert!(!p.connected);
    assert_eq!(p.session_ms, Some(300_000));
    // And again: nothing changes.
    assert_eq!(invoke(&deps, CONNECTED).await?, json!({"applied": 0, "stale": 1, "rejected": []}));
    Ok(())
}

#[tokio::test]
async fn a_claim_sessions_events_are_skipped_as_no_devices_and_not_rejected() -> Result<()> {
    let db = SqliteStore::in_memory()?;
    let deps = deps_with_registry(&db);
    // GIVEN sensor-001 provisioning by claim (client id claim-sensor-001), then connecting as itself
    let claim = |kind: &str, v: i64| {
        let mut e: Value =
            serde_json::from_str(&event_with(kind, v, 1_764_000_000_000 + v, "claim-cert")).expect("json");
        e["clientId"] = json!("claim-sensor-001");
        e.to_string()
    };
    let events = [
        claim("connected", 1),
        claim("disconnected", 1),
        event_with("connected", 1, 1_764_000_100_000, "c1"),
    ];
    // WHEN the three events come in one batch
    let out = batch(&deps, &events).await;
    // THEN the claim session's two are skipped (counted, not rejected: nothing is wrong), and
    // only the device has a presence
    assert_eq!((out.claim_sessions, out.rejected.len(), out.changed), (2, 0, 1), "{:?}", out.rejected);
    assert!(db.presence(&thing("sensor-001")).await?.is_some_and(|p| p.connected));
    let (page, _) = db.presence_page(None, 10).await?;
    assert_eq!(page.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), ["sensor-001"]);
    Ok(())
}

/// A store where another writer changes the presence once between each read and write.
struct Racing {
    inner: SqliteStore,
    raced: std::sync::atomic::AtomicBool,
}

impl PresenceReader for Racing {
    async fn presence(&self, thing: &ThingName) -> Result<Option<Presence>, StoreError> {
        self.inner.presence(thing).await
    }
    async fn presence_page(
        &self,
        after: Option<&ThingName>,
        limit: usize,
    ) -> Result<fleet_shared::ports::PresencePage, StoreError> {
        self.inner.presence_page(after, limit).await
    }
}

impl PresenceStore for Racing {
    async fn put_presence(
        &self,
        thing: &ThingName,
        next: &Presence,
        expected: Option<&Place>,
        counts: &HealthDelta,
    ) -> Result<bool, StoreError> {
        if !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // Another invocation records session 4's connect first.
            let (_, c4) = LifecycleEvent::parse(
                br#"{"clientId":"sensor-001","timestamp":1764000400000,"eventType":"connected","versionNumber":4}"#,
            )
            .expect("event");
            let theirs = fold(None, [&c4]).expect("state");
            assert!(self.inner.put_presence(thing, &theirs, None, &HealthDelta::default()).await?);
        }
        self.inner.put_presence(thing, next, expected, counts).await
    }
}

#[tokio::test]
async fn a_concurrent_writer_is_read_again_and_the_later_session_still_wins() -> Result<()> {
    let db = SqliteStore::in_memory()?;
    let deps = Deps {
        registry: db.clone(),
        presence: Racing { inner: db.clone(), raced: false.into() },
        health: db.clone(),
        certs: db.clone(),
        cert_registry: db,
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    };
    invoke(&deps, DISCONNECTED).await?; // session 3 ends; meanwhile session 4 connected
    let p = deps.presence.presence(&thing("sensor-001")).await?.context("presence")?;
    assert!(p.connected && p.place.version == 4, "session 4 is newer than session 3's end: {p:?}");
    Ok(())
}

/// A store that is always busy.
struct Busy;

impl PresenceReader for Busy {
    async fn presence(&self, _: &ThingName) -> Result<Option<Presence>, StoreError> {
        Err(StoreError::transient("presence get", "ProvisionedThroughputExceeded"))
    }
    async fn presence_page(
        &self,
        _: Option<&ThingName>,
        _: usize,
    ) -> Result<fleet_shared::ports::PresencePage, StoreError> {
        Err(StoreError::transient("presence scan", "ProvisionedThroughputExceeded"))
    }
}

impl PresenceStore for Busy {
    async fn put_presence(
        &self,
        _: &ThingName,
        _: &Presence,
        _: Option<&Place>,
        _: &HealthDelta,
    ) -> Result<bool, StoreError> {
        unreachable!("never read")
    }
}

#[tokio::test]
async fn a_busy_store_retries_exactly_the_readable_events() -> Result<()> {
    let db = SqliteStore::in_memory()?;
    let deps = Deps {
        registry: db.clone(),
        presence: Busy,
        health: db.clone(),
        certs: db.clone(),
        cert_registry: db,
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    };
    let answer = invoke(&deps, BATCH).await?;
    let failed: Vec<&str> = answer["batchItemFailures"]
        .as_array()
        .context("failures")?
        .iter()
        .filter_map(|f| f["itemIdentifier"].as_str())
        .collect();
    // 7 readable events of 3 devices are retried; the unreadable 8th is not.
    assert_eq!(failed.len(), 7, "{answer}");
    assert!(!failed.iter().any(|id| id.ends_with("000000000008")), "{answer}");
    let direct =
        handle(&deps, LambdaEvent::new(RawValue::from_string(CONNECTED.to_owned())?, Context::default()))
            .await;
    assert!(direct.is_err(), "a direct invocation fails for Lambda to retry");
    Ok(())
}

/// A lifecycle event of `sensor-001` authenticated with `principal`.
fn event_with(kind: &str, version: i64, at_ms: i64, principal: &str) -> String {
    let mut e = json!({
        "clientId": "sensor-001",
        "timestamp": at_ms,
        "eventType": kind,
        "sessionIdentifier": format!("s-{version}"),
        "principalIdentifier": principal,
        "versionNumber": version,
    });
    if kind == "disconnected" {
        e["disconnectReason"] = json!("CLIENT_INITIATED_DISCONNECT");
        e["clientInitiatedDisconnect"] = json!(true);
    }
    e.to_string()
}

/// sensor-001 provisioned with certificate `old`, then rotated to `new` (as the provisioning
/// hook does it: the serial moved, the rotation audited), and a `spare` certificate attached to
/// its thing by other means: all three ACTIVE, attached and in the inventory.
struct Rotated {
    old: CertificateId,
    new: CertificateId,
    spare: CertificateId,
}

async fn rotated(db: &SqliteStore) -> Result<Rotated> {
    let t = thing("sensor-001");
    let entry = AllowlistEntry {
        serial: t.clone(),
        class: "meter".into(),
        region: "eu".into(),
        added_ms: 0,
        enrolment: Enrolment::Allowed,
    };
    db.allow(&[entry]).await?;
    let now_s = fixed_clock() / 1000;
    let mut ids = Vec::new();
    for n in 1..=3 {
        let pem = test_certs::pem("sensor-001", n, now_s - 100, now_s + 86_400 * 100);
        let id = db.register_local_certificate(&pem, CertStatus::Active, 0).await?;
        db.attach_local_certificate(&t, &id).await?;
        let p = parse_pem(&pem)?;
        db.record(&Certificate {
            id: id.clone(),
            thing: Some(t.clone()),
            serial: p.serial,
            issuer: p.issuer,
            subject: p.subject,
            not_before_ms: p.not_before_ms,
            not_after_ms: p.not_after_ms,
            status: CertStatus::Active,
            recorded_ms: 0,
        })
        .await?;
        ids.push(id);
    }
    let r = Rotated { old: ids[0].clone(), new: ids[1].clone(), spare: ids[2].clone() };
    db.enrol(&t, &r.old, 1).await?;
    db.rotate(&t, &r.old, &r.new, 2).await?;
    db.audit(&AuditEvent {
        at_ms: 2,
        serial: t.to_string(),
        claim_certificate: r.old.to_string(),
        certificate: Some(r.new.to_string()),
        outcome: fleet_shared::certs::hook::ROTATED.into(),
        reason: None,
    })
    .await?;
    Ok(r)
}

/// A certificate's status in the registry and in the inventory.
async fn status(db: &SqliteStore, id: &CertificateId) -> Result<(Option<CertStatus>, Option<CertStatus>)> {
    let inventory = db.certificate(id).await?.map(|c| c.status);
    Ok((db.local_certificate_status(id).await?, inventory))
}

const ACTIVE: (Option<CertStatus>, Option<CertStatus>) = (Some(CertStatus::Active), Some(CertStatus::Active));
const INACTIVE: (Option<CertStatus>, Option<CertStatus>) =
    (Some(CertStatus::Inactive), Some(CertStatus::Inactive));

/// The local registry, answering as `mode` says (0: normally, 1: throttled, 2: refused for
/// good), counting the calls it gets.
struct Scripted {
    inner: SqliteStore,
    mode: AtomicU8,
    calls: AtomicUsize,
}

impl Scripted {
    fn new(inner: SqliteStore) -> Self {
        Self { inner, mode: AtomicU8::new(0), calls: AtomicUsize::new(0) }
    }

    fn check(&self) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Relaxed);
        match self.mode.load(Relaxed) {
            0 => Ok(()),
            1 => Err(StoreError::transient("iot", "ThrottlingException")),
            _ => Err(StoreError::permanent("iot", "AccessDeniedException")),
        }
    }
}

impl CertificateRegistry for Scripted {
    async fn list_certificates(
        &self,
        marker: Option<&str>,
        page_size: usize,
    ) -> Result<fleet_shared::model::CertificatePage, StoreError> {
        self.check()?;
        self.inner.list_certificates(marker, page_size).await
    }
    async fn describe_certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<fleet_shared::model::CertificateDetail>, StoreError> {
        self.check()?;
        self.inner.describe_certificate(id).await
    }
    async fn certificate_things(&self, arn: &str) -> Result<Vec<ThingName>, StoreError> {
        self.check()?;
        self.inner.certificate_things(arn).await
    }
    async fn thing_certificates(&self, thing: &ThingName) -> Result<Vec<CertificateId>, StoreError> {
        self.check()?;
        self.inner.thing_certificates(thing).await
    }
}

impl CertificateControl for Scripted {
    async fn set_certificate_status(&self, id: &CertificateId, status: CertStatus) -> Result<(), StoreError> {
        self.check()?;
        self.inner.set_certificate_status(id, status).await
    }
}

type WithRegistry = Deps<SqliteStore, SqliteStore, SqliteStore, SqliteStore, Scripted>;

fn deps_with_registry(db: &SqliteStore) -> WithRegistry {
    Deps {
        registry: db.clone(),
        presence: db.clone(),
        health: db.clone(),
        certs: db.clone(),
        cert_registry: Scripted::new(db.clone()),
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    }
}

/// Run `events` (JSON lifecycle events) as one SQS batch: what the handler did.
async fn batch(deps: &WithRegistry, events: &[String]) -> Outcome {
    let messages: Vec<OwnedInbound> =
        events.iter().enumerate().map(|(i, e)| OwnedInbound::new(format!("m{i}"), 0, e.as_bytes())).collect();
    run(deps, fixed_clock(), &messages).await
}

#[tokio::test]
async fn a_device_connecting_with_its_rotated_certificate_retires_the_one_it_replaced() -> Result<()> {
    // GIVEN sensor-001 rotated from `old` to `new`, with a spare certificate attached too
    let db = SqliteStore::in_memory()?;
    let deps = deps_with_registry(&db);
    let t = thing("sensor-001");
    let r = rotated(&db).await?;
    // WHEN it connects with the old certificate (it has not switched yet)
    let old_session = [
        event_with("connected", 1, fixed_clock() - 3_000, r.old.as_str()),
        event_with("disconnected", 1, fixed_clock() - 2_000, r.old.as_str()),
    ];
    let out = batch(&deps, &old_session).await;
    // THEN nothing is retired (its first recorded credential is only recorded)
    assert_eq!((out.retired, out.retire_failed, out.changed), (0, 0, 1));
    assert_eq!((status(&db, &r.old).await?, status(&db, &r.new).await?), (ACTIVE, ACTIVE));
    // WHEN it connects with the new one
    let out = batch(&deps, &[event_with("connected", 2, fixed_clock() - 1_000, r.new.as_str())]).await;
    // THEN the old one is INACTIVE in the registry and the inventory, the new one ACTIVE, the
    // spare (no rotation superseded it) left alone, and the trail says so
    assert_eq!((out.retired, out.retire_failed), (1, 0));
    assert_eq!((status(&db, &r.old).await?, status(&db, &r.new).await?), (INACTIVE, ACTIVE));
    assert_eq!(status(&db, &r.spare).await?, ACTIVE);
    let trail = db.trail("sensor-001").await?;
    assert_eq!(trail.last().map(|e| e.outcome.as_str()), Some("retired"), "{trail:?}");
    // AND its presence names the new certificate; a later session with it asks AWS IoT nothing
    let p = deps.presence.presence(&t).await?.context("presence")?;
    assert_eq!(p.principal.as_deref(), Some(r.new.as_str()));
    let calls = deps.cert_registry.calls.load(Relaxed);
    let out = batch(&deps, &[event_with("connected", 3, fixed_clock(), r.new.as_str())]).await;
    assert_eq!((out.changed, out.retired), (1, 0));
    assert_eq!(deps.cert_registry.calls.load(Relaxed), calls, "no registry call for a known credential");
    Ok(())
}

/// sensor-001 [`rotated`], its session on `old` recorded, then the registry in `mode`.
async fn seen_on_old(mode: u8) -> Result<(SqliteStore, WithRegistry, Rotated)> {
    let db = SqliteStore::in_memory()?;
    let deps = deps_with_registry(&db);
    let r = rotated(&db).await?;
    batch(&deps, &[event_with("connected", 1, fixed_clock() - 3_000, r.old.as_str())]).await;
    deps.cert_registry.mode.store(mode, Relaxed);
    Ok((db, deps, r))
}

#[tokio::test]
async fn a_throttled_registry_retries_the_devices_events_and_loses_no_retirement() -> Result<()> {
    // GIVEN sensor-001 rotated from `old` to `new`, seen on `old`, and AWS IoT throttling
    let (db, deps, r) = seen_on_old(1).await?;
    // WHEN it connects with the new certificate
    let connected = [event_with("connected", 2, fixed_clock() - 1_000, r.new.as_str())];
    let out = batch(&deps, &connected).await;
    // THEN its event is retried, its presence not written, nothing retired yet
    assert_eq!(out.failed.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["m0"]);
    let p = deps.presence.presence(&thing("sensor-001")).await?.context("presence")?;
    assert_eq!(p.principal.as_deref(), Some(r.old.as_str()));
    assert_eq!(status(&db, &r.old).await?, ACTIVE);
    // AND the retry, AWS IoT answering again, retires the old certificate and records presence
    deps.cert_registry.mode.store(0, Relaxed);
    let out = batch(&deps, &connected).await;
    assert_eq!((out.failed.len(), out.retired), (0, 1));
    assert_eq!(status(&db, &r.old).await?, INACTIVE);
    let p = deps.presence.presence(&thing("sensor-001")).await?.context("presence")?;
    assert_eq!(p.principal.as_deref(), Some(r.new.as_str()));
    Ok(())
}

#[tokio::test]
async fn a_registry_refusing_for_good_is_counted_and_presence_goes_on() -> Result<()> {
    // GIVEN sensor-001 rotated, seen on `old`, and AWS IoT refusing the presence function
    let (db, deps, r) = seen_on_old(2).await?;
    // WHEN it connects with the new certificate
    let out = batch(&deps, &[event_with("connected", 2, fixed_clock() - 1_000, r.new.as_str())]).await;
    // THEN the failure is counted, not retried; presence is recorded; the old one stays ACTIVE
    // (left to `fleetctl devices retire-certs`)
    assert_eq!((out.retire_failed, out.failed.len(), out.changed), (1, 0, 1));
    let p = deps.presence.presence(&thing("sensor-001")).await?.context("presence")?;
    assert_eq!(p.principal.as_deref(), Some(r.new.as_str()));
    assert_eq!(status(&db, &r.old).await?, ACTIVE);
    Ok(())
}
