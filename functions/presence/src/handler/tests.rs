//! Handler tests: `events/presence/` through the handler on the embedded (SQLite, in-memory)
//! store: an out-of-order batch with duplicates and an unreadable event, direct invocations, a
//! concurrent writer, and a store that fails.

use anyhow::{Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::health::presence::{Place, Presence};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::{json, Value};

use fleet_shared::ports::PresenceReader;

use super::*;

const BATCH: &str = include_str!("../../../../events/presence/sqs-out-of-order.json");
const CONNECTED: &str = include_str!("../../../../events/presence/connected.json");
const DISCONNECTED: &str = include_str!("../../../../events/presence/disconnected.json");

fn fixed_clock() -> i64 {
    1_764_001_000_000
}

fn deps() -> Result<Deps<SqliteStore, SqliteStore, SqliteStore>> {
    let db = SqliteStore::in_memory()?;
    Ok(Deps {
        registry: db.clone(),
        presence: db.clone(),
        health: db,
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    })
}

async fn invoke<R: DeviceRegistry, P: PresenceStore, H: HealthCounters>(
    deps: &Deps<R, P, H>,
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
        health: db,
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
        health: db,
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
