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
use fleet_shared::ports::{Allowlist, CertificateInventory, PresenceReader, ProvisioningAudit};

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

/// sensor-001 provisioned with certificate `old`, then rotated to `new`: both ACTIVE, attached
/// to its thing and in the inventory. (`old`, `new`).
async fn rotated(db: &SqliteStore) -> Result<(CertificateId, CertificateId)> {
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
    for n in 1..=2 {
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
    let new = ids.pop().context("two")?;
    let old = ids.pop().context("two")?;
    db.enrol(&t, &old, 1).await?;
    db.rotate(&t, &old, &new, 2).await?;
    Ok((old, new))
}

/// A certificate's status in the registry and in the inventory.
async fn status(db: &SqliteStore, id: &CertificateId) -> Result<(Option<CertStatus>, Option<CertStatus>)> {
    let inventory = db.certificate(id).await?.map(|c| c.status);
    Ok((db.local_certificate_status(id).await?, inventory))
}

const ACTIVE: (Option<CertStatus>, Option<CertStatus>) = (Some(CertStatus::Active), Some(CertStatus::Active));
const INACTIVE: (Option<CertStatus>, Option<CertStatus>) =
    (Some(CertStatus::Inactive), Some(CertStatus::Inactive));

#[tokio::test]
async fn a_device_connecting_with_its_rotated_certificate_retires_the_one_it_replaced() -> Result<()> {
    // GIVEN sensor-001 rotated from `old` to `new`
    let deps = deps()?;
    let (db, t) = (&deps.certs, thing("sensor-001"));
    let (old, new) = rotated(db).await?;
    // WHEN it connects with the old certificate (it has not switched yet)
    invoke(&deps, &event_with("connected", 1, fixed_clock() - 3_000, old.as_str())).await?;
    invoke(&deps, &event_with("disconnected", 1, fixed_clock() - 2_000, old.as_str())).await?;
    // THEN nothing is retired
    assert_eq!((status(db, &old).await?, status(db, &new).await?), (ACTIVE, ACTIVE));
    // WHEN it connects with the new one
    invoke(&deps, &event_with("connected", 2, fixed_clock() - 1_000, new.as_str())).await?;
    // THEN the old one is INACTIVE in the registry and the inventory, the new one ACTIVE, and
    // the trail says so
    assert_eq!((status(db, &old).await?, status(db, &new).await?), (INACTIVE, ACTIVE));
    let trail = db.trail("sensor-001").await?;
    assert_eq!(trail.last().map(|e| e.outcome.as_str()), Some("retired"), "{trail:?}");
    // AND its presence names the new certificate; a later session with it retires nothing more
    let p = deps.presence.presence(&t).await?.context("presence")?;
    assert_eq!(p.principal.as_deref(), Some(new.as_str()));
    invoke(&deps, &event_with("connected", 3, fixed_clock(), new.as_str())).await?;
    assert_eq!(db.trail("sensor-001").await?.len(), trail.len());
    Ok(())
}

/// The local registry, throttled while `throttled` is set.
struct Throttled {
    inner: SqliteStore,
    throttled: std::sync::atomic::AtomicBool,
}

impl Throttled {
    fn check(&self) -> Result<(), StoreError> {
        if self.throttled.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::transient("iot", "ThrottlingException"));
        }
        Ok(())
    }
}

impl CertificateRegistry for Throttled {
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

impl CertificateControl for Throttled {
    async fn set_certificate_status(&self, id: &CertificateId, status: CertStatus) -> Result<(), StoreError> {
        self.check()?;
        self.inner.set_certificate_status(id, status).await
    }
}

#[tokio::test]
async fn a_throttled_registry_retries_the_devices_events_and_loses_no_retirement() -> Result<()> {
    // GIVEN sensor-001 rotated from `old` to `new`, and AWS IoT throttling
    let db = SqliteStore::in_memory()?;
    let (old, new) = rotated(&db).await?;
    let deps = Deps {
        registry: db.clone(),
        presence: db.clone(),
        health: db.clone(),
        certs: db.clone(),
        cert_registry: Throttled { inner: db.clone(), throttled: true.into() },
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    };
    let connected = event_with("connected", 2, fixed_clock() - 1_000, new.as_str());
    // WHEN it connects with the new certificate
    let err = invoke(&deps, &connected).await.expect_err("throttled");
    // THEN the invocation is retried, its presence not written, nothing retired yet
    assert!(err.to_string().contains("presence not recorded"), "{err}");
    assert_eq!(deps.presence.presence(&thing("sensor-001")).await?, None);
    assert_eq!(status(&db, &old).await?, ACTIVE);
    // AND the retry, AWS IoT answering again, retires the old certificate and records presence
    deps.cert_registry.throttled.store(false, std::sync::atomic::Ordering::Relaxed);
    invoke(&deps, &connected).await?;
    assert_eq!(status(&db, &old).await?, INACTIVE);
    let p = deps.presence.presence(&thing("sensor-001")).await?.context("presence")?;
    assert_eq!(p.principal.as_deref(), Some(new.as_str()));
    Ok(())
}
