//! Handler tests: real events from `events/ingest-telemetry/` through the handler, over the
//! embedded (SQLite, in-memory) ports; assertions on what was stored.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::error::StoreError;
use fleet_shared::ingest::{decode_lines, QuarantineLine, Reason};
use fleet_shared::model::{DeviceRegistration, StoredReading, ThingName};
use fleet_shared::ports::{
    DeviceAdmin, HealthCounters, QuarantineReader, TelemetryQuery, TelemetrySink, WriteStatus,
};
use lambda_runtime::{Context, Diagnostic, LambdaEvent};

use super::*;

const VALID_V1: &str = include_str!("../../../../events/ingest-telemetry/sqs-valid-v1.json");
const VALID_V2: &str = include_str!("../../../../events/ingest-telemetry/sqs-valid-v2.json");
const MIXED: &str = include_str!("../../../../events/ingest-telemetry/sqs-mixed-batch.json");
const DUPLICATE: &str = include_str!("../../../../events/ingest-telemetry/sqs-duplicate-batch.json");
const SPOOFED: &str = include_str!("../../../../events/ingest-telemetry/sqs-spoofed-thing.json");
const SKEW: &str = include_str!("../../../../events/ingest-telemetry/sqs-clock-skew.json");
const DIRECT_V1: &str = include_str!("../../../../events/ingest-telemetry/direct-v1.json");
const PACK: &str = include_str!("../../../../events/ingest-telemetry/sqs-v2-pack.json");
const MALFORMED_RECORDS: &str =
    include_str!("../../../../events/ingest-telemetry/sqs-malformed-records.json");
const DIRECT_MALFORMED: &str = include_str!("../../../../events/ingest-telemetry/direct-malformed.json");

/// The events' arrival time is 2025-11-24T16:00:00Z; the handler runs a second later.
fn fixed_clock() -> i64 {
    1_764_000_001_000
}

async fn deps_with_fleet() -> Result<EmbeddedDeps> {
    let store = SqliteStore::in_memory()?;
    let reg = |class: &str, region: &str| DeviceRegistration {
        class: class.into(),
        region: region.into(),
        fw: "1.4.0".into(),
        registered_at_ms: 1_700_000_000_000,
    };
    store
        .register(&[
            (thing("sensor-001"), reg("env-sensor", "eu-west")),
            (thing("sensor-002"), reg("env-sensor", "us-east")),
            (thing("sensor-003"), reg("air-quality", "eu-west")),
        ])
        .await?;
    let mut deps = Deps::embedded(store, IngestPolicy::default(), MetricsOut::Off);
    deps.clock = fixed_clock;
    Ok(deps)
}

fn thing(s: &str) -> ThingName {
    ThingName::parse(s).expect("valid test thing name")
}

fn event(json: &str) -> Result<LambdaEvent<Box<RawValue>>> {
    Ok(LambdaEvent::new(RawValue::from_string(json.to_owned())?, Context::default()))
}

async fn sqs<R, S, A, Q, H>(deps: &Deps<R, S, A, Q, H>, json: &str) -> Result<SqsBatchResponse>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
    H: HealthCounters,
{
    match handle(deps, event(json)?).await? {
        Response::Sqs(r) => Ok(r),
        other => Err(anyhow!("expected an SQS response, got {other:?}")),
    }
}

fn failed_ids(r: &SqsBatchResponse) -> Vec<&str> {
    r.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect()
}

async fn readings(store: &SqliteStore, t: &str) -> Result<Vec<StoredReading>> {
    Ok(store.telemetry(&thing(t), 0, 1000).await?)
}

/// Reasons per quarantined message, by message id.
async fn quarantine_by_message(store: &SqliteStore) -> Result<HashMap<String, Vec<Reason>>> {
    Ok(store
        .quarantined(0)
        .await?
        .into_iter()
        .map(|q: QuarantineLine| (q.message_id, q.reasons.into_iter().map(|p| p.reason).collect()))
        .collect())
}

fn msg(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

#[tokio::test]
async fn stores_every_reading_of_a_valid_v1_batch() -> Result<()> {
    // GIVEN a registered fleet
    let deps = deps_with_fleet().await?;
    // WHEN a batch of valid v1 messages arrives
    let response = sqs(&deps, VALID_V1).await?;
    // THEN nothing fails, every reading is stored and enriched
    assert!(response.batch_item_failures.is_empty());
    let s1 = readings(&deps.registry, "sensor-001").await?;
    let s2 = readings(&deps.registry, "sensor-002").await?;
    assert_eq!((s1.len(), s2.len()), (2, 2));
    assert_eq!(s1[0].class, "env-sensor");
    assert_eq!(s1[0].region.as_deref(), Some("eu-west"));
    assert_eq!(s1[0].reading.metrics.len(), 2);
    assert_eq!(s1[0].reading.time_ms, 1_763_999_999_880, "device time is kept");
    // AND test traffic is tagged, not dropped
    assert_eq!(s2.iter().filter(|r| r.reading.test).count(), 1);
    // AND device state comes from the newest reading
    let d1 = deps.registry.device(&thing("sensor-001")).await?.ok_or_else(|| anyhow!("no device"))?;
    let state = d1.state.ok_or_else(|| anyhow!("no state"))?;
    assert_eq!((state.seq, state.battery_pct), (1043, Some(86.0)));
    assert_eq!(d1.registration.map(|r| r.class).as_deref(), Some("env-sensor"));
    // AND the batch is archived as one object holding every line
    let raw = deps.registry.archive_objects("raw/").await?;
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].lines(), 4);
    assert!(raw[0].key().starts_with("raw/dt=2025-11-24/hour=16/"), "{}", raw[0].key());
    Ok(())
}

#[tokio::test]
async fn a_quarantined_message_counts_against_the_firmware_it_says_it_runs() -> Result<()> {
    use fleet_shared::health::tally::{counter, minute_of, Bucket, Cohort};
    use fleet_shared::ports::HealthLedger;
    // GIVEN sensor-001 stored on 1.4.2
    let deps = deps_with_fleet().await?;
    sqs(&deps, VALID_V1).await?;
    // WHEN it sends, after an update, a message on 1.5.0 that is refused (battery 150 %), and
    // one naming two firmwares (refused: duplicate key)
    let mut event: serde_json::Value = serde_json::from_str(VALID_V1)?;
    let records = event["Records"].as_array_mut().context("records")?;
    records.truncate(2);
    let body = |fw: &str, seq: u32| {
        format!(
            r#"{{"v":1,"seq":{seq},"boot":7,"ts":1764000000500,{fw},"m":{{"temp_c":21.5}},"bat":150,"thing":"sensor-001","rx_ms":1764000000600,"client_id":"sensor-001"}}"#
        )
    };
    records[0]["body"] = body(r#""fw":"1.5.0""#, 2001).into();
    records[0]["messageId"] = msg(901).into();
    records[1]["body"] = body(r#""fw":"1.5.0","fw":"1.6.0""#, 2002).into();
    records[1]["messageId"] = msg(902).into();
    let response = sqs(&deps, &event.to_string()).await?;
    assert!(response.batch_item_failures.is_empty());
    // THEN the first counts as quarantined for 1.5.0's cohort, the second for the stored 1.4.2's
    let minute = Bucket::Minute(minute_of(fixed_clock()));
    let buckets = deps.health.buckets(&[minute]).await?;
    let counts = buckets.get(&minute).context("the minute's counters")?;
    let quarantined =
        |fw: &str| counts.get(&Cohort::new("env-sensor", "eu-west", fw)).map(|t| t.get(counter::QUARANTINED));
    assert_eq!(quarantined("1.5.0"), Some(1), "{counts:?}");
    assert_eq!(quarantined("1.4.2"), Some(1), "{counts:?}");
    assert_eq!(quarantined("1.6.0"), None, "{counts:?}");
    Ok(())
}

#[tokio::test]
async fn counts_settled_and_quarantined_messages_and_fresh_devices_for_fleet_health() -> Result<()> {
    use fleet_shared::health::tally::{counter, minute_of, Bucket, Cohort};
    use fleet_shared::ports::HealthLedger;
    // GIVEN a registered fleet
    let deps = deps_with_fleet().await?;
    // WHEN the mixed batch (3 valid, 8 bad) arrives, then again (all duplicates or quarantined)
    sqs(&deps, MIXED).await?;
    sqs(&deps, MIXED).await?;
    // THEN the arrival minute counts 22 messages received, 16 quarantined, over every cohort
    let minute = Bucket::Minute(minute_of(fixed_clock()));
    let buckets = deps.health.buckets(&[minute]).await?;
    let counts = buckets.get(&minute).context("the minute's counters")?;
    let sum = |name: &str| counts.values().map(|t| t.get(name)).sum::<i64>();
    assert_eq!((sum(counter::RECEIVED), sum(counter::QUARANTINED)), (22, 16));
    // AND the three devices' newest data is in that minute, once (the repeat moved nothing)
    assert_eq!(sum(counter::LATEST), 3);
    let registered = counts.keys().find(|c| c.class == "env-sensor").context("the registered cohort")?;
    assert_eq!(registered.region, "eu-west");
    assert!(counts.keys().all(|c| *c != Cohort::fleet()), "writers count base cohorts only");
    Ok(())
}

#[tokio::test]
async fn upcasts_v2_and_tags_unregistered_things() -> Result<()> {
    let deps = deps_with_fleet().await?;
    let response = sqs(&deps, VALID_V2).await?;
    assert!(response.batch_item_failures.is_empty());
    // v2 SenML entries become the same metrics as v1's map
    let s3 = readings(&deps.registry, "sensor-003").await?;
    assert_eq!(s3.len(), 2);
    let mut metrics: Vec<(&str, f64)> =
        s3[0].reading.metrics.iter().map(|m| (m.name.as_str(), m.value)).collect();
    metrics.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(metrics, [("co2_ppm", 612.0), ("hum_pct", 55.0), ("temp_c", 19.25)]);
    assert_eq!(s3[0].reading.schema_version, 2);
    assert_eq!(s3[0].class, "air-quality");
    // an unknown thing is stored, tagged unregistered, and now known to the registry
    let stray = readings(&deps.registry, "stray-900").await?;
    assert_eq!(stray.len(), 1);
    assert_eq!(stray[0].class, "unregistered");
    assert!(stray[0].region.is_none());
    let d = deps.registry.device(&thing("stray-900")).await?.ok_or_else(|| anyhow!("no device"))?;
    assert!(d.registration.is_none());
    assert_eq!(d.state.map(|s| s.seq), Some(5));
    Ok(())
}

#[tokio::test]
async fn quarantines_bad_records_and_stores_their_valid_neighbours() -> Result<()> {
    let deps = deps_with_fleet().await?;
    // WHEN a batch mixing 3 valid and 8 bad messages arrives
    let response = sqs(&deps, MIXED).await?;
    // THEN bad input is not retried
    assert!(response.batch_item_failures.is_empty());
    // AND every valid neighbour is stored
    assert_eq!(readings(&deps.registry, "sensor-001").await?.len(), 1);
    assert_eq!(readings(&deps.registry, "sensor-002").await?.len(), 1);
    assert_eq!(readings(&deps.registry, "sensor-003").await?.len(), 1);
    // AND each bad message is quarantined with every reason
    let q = quarantine_by_message(&deps.registry).await?;
    use Reason::*;
    let expected: HashMap<String, Vec<Reason>> = [
        (2, vec![MalformedJson]),
        (4, vec![WrongType, MissingField]),
        (5, vec![NonFiniteValue]),
        (6, vec![TooManyMetrics]),
        (7, vec![TimestampOutOfRange]),
        (8, vec![UnsupportedVersion]),
        (9, vec![InvalidThingName]),
        (10, vec![WrongType, InvalidMetricName]),
    ]
    .into_iter()
    .map(|(n, r)| (msg(n), r))
    .collect();
    assert_eq!(q, expected);
    // AND the original bytes are kept
    let lines = deps.registry.quarantined(0).await?;
    let truncated = lines.iter().find(|l| l.message_id == msg(2)).ok_or_else(|| anyhow!("missing"))?;
    assert_eq!(truncated.original(), br#"{"v":1,"seq":2002,"boot":7,"ts":17640000"#.to_vec());
    Ok(())
}

#[tokio::test]
async fn a_v2_pack_stores_each_of_its_readings_and_a_redelivery_stores_none() -> Result<()> {
    let deps = deps_with_fleet().await?;
    // WHEN one message carrying ten readings (a SenML-style pack) arrives
    let response = sqs(&deps, PACK).await?;
    // THEN ten readings are stored, seq 500..509, one second apart, each enriched
    assert!(response.batch_item_failures.is_empty());
    let stored = readings(&deps.registry, "sensor-003").await?;
    let seqs: Vec<u64> = stored.iter().map(|r| r.reading.id.seq).collect();
    assert_eq!(seqs, (500..510).collect::<Vec<u64>>());
    assert!(stored.windows(2).all(|w| w[1].reading.time_ms - w[0].reading.time_ms == 1_000));
    assert!(stored.iter().all(|r| r.class == "air-quality" && r.reading.metrics.len() == 2));
    // AND the device state is the pack's newest reading
    let state = deps.registry.device(&thing("sensor-003")).await?.and_then(|d| d.state);
    assert_eq!(state.map(|s| s.seq), Some(509));
    // WHEN the same message is delivered again THEN nothing new is stored
    let again = sqs(&deps, PACK).await?;
    assert!(again.batch_item_failures.is_empty());
    assert_eq!(readings(&deps.registry, "sensor-003").await?.len(), 10);
    Ok(())
}

#[tokio::test]
async fn records_that_are_not_sqs_messages_are_quarantined_and_their_neighbours_stored() -> Result<()> {
    let deps = deps_with_fleet().await?;
    // WHEN an SQS event holds a null record, a Kinesis record and a record without a body
    // between two valid messages
    let response = sqs(&deps, MALFORMED_RECORDS).await?;
    // THEN nothing is retried, both valid neighbours are stored, the Kinesis record's body is
    // not read as telemetry
    assert!(response.batch_item_failures.is_empty(), "{:?}", failed_ids(&response));
    assert_eq!(readings(&deps.registry, "sensor-001").await?.len(), 1);
    assert_eq!(readings(&deps.registry, "sensor-003").await?.len(), 1);
    assert!(readings(&deps.registry, "sensor-002").await?.is_empty());
    // AND the three broken records are quarantined as malformed_record, with what arrived
    let lines = deps.registry.quarantined(0).await?;
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().all(|l| l.reasons.iter().map(|p| p.reason).eq([Reason::MalformedRecord])));
    assert!(lines.iter().any(|l| l.original() == b"null"));
    assert!(lines.iter().any(|l| l.message_id == msg(3) && l.reasons[0].detail.contains("aws:kinesis")));
    Ok(())
}

#[tokio::test]
async fn a_quarantine_line_names_the_thing_and_topic_the_rule_added() -> Result<()> {
    let deps = deps_with_fleet().await?;
    // WHEN a message with a repeated key arrives through the rule (which adds thing and topic)
    let body = r#"{"v":1,"seq":1,"boot":1,"ts":1763999999880,"m":{"t":1},"m":{"t":2},"thing":"sensor-001","topic":"dt/fleet/sensor-001/telemetry","rx_ms":1764000000000,"client_id":"sensor-001"}"#;
    let event =
        serde_json::json!({"Records": [{"messageId": msg(1), "eventSource": "aws:sqs", "body": body}]});
    sqs(&deps, &event.to_string()).await?;
    // THEN it is quarantined as a duplicate key, with the thing and the topic
    let lines = deps.registry.quarantined(0).await?;
    assert_eq!(lines.len(), 1);
    let l = &lines[0];
    assert_eq!((l.reasons[0].reason, l.reasons[0].field.as_deref()), (Reason::DuplicateKey, Some("m")));
    assert_eq!(
        (l.thing.as_deref(), l.topic.as_deref()),
        (Some("sensor-001"), Some("dt/fleet/sensor-001/telemetry"))
    );
    Ok(())
}

#[tokio::test]
async fn replaying_a_duplicate_batch_leaves_identical_stored_state() -> Result<()> {
    let deps = deps_with_fleet().await?;
    // WHEN a batch holding an in-batch redelivery arrives, then the whole batch twice more
    sqs(&deps, DUPLICATE).await?;
    let rows_once = readings(&deps.registry, "sensor-001").await?;
    let device_once = deps.registry.device(&thing("sensor-001")).await?;
    let archive_once = deps.registry.archive_objects("").await?;
    for _ in 0..2 {
        let r = sqs(&deps, DUPLICATE).await?;
        assert!(r.batch_item_failures.is_empty());
    }
    // THEN the redelivered message is stored once
    assert_eq!(rows_once.len(), 2);
    let seqs: Vec<u64> = rows_once.iter().map(|r| r.reading.id.seq).collect();
    assert_eq!(seqs, [3001, 3002]);
    // AND replays change nothing: rows, last-seen, archive objects (same key, same bytes)
    assert_eq!(readings(&deps.registry, "sensor-001").await?, rows_once);
    assert_eq!(deps.registry.device(&thing("sensor-001")).await?, device_once);
    let archive = deps.registry.archive_objects("").await?;
    assert_eq!(archive, archive_once);
    assert_eq!(archive.len(), 1);
    assert_eq!(decode_lines(archive[0].body())?.len(), 3, "distinct messages only");
    Ok(())
}

#[tokio::test]
async fn rejects_payload_whose_thing_disagrees_with_client_id_or_device_id() -> Result<()> {
    let deps = deps_with_fleet().await?;
    sqs(&deps, SPOOFED).await?;
    let q = quarantine_by_message(&deps.registry).await?;
    assert_eq!(q.get(&msg(2)), Some(&vec![Reason::ThingMismatch]));
    assert_eq!(q.get(&msg(3)), Some(&vec![Reason::ThingMismatch]));
    assert_eq!(q.len(), 2);
    // nothing was written under the claimed thing, the honest message is stored
    assert!(readings(&deps.registry, "sensor-002").await?.is_empty());
    assert_eq!(readings(&deps.registry, "sensor-001").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn stores_skewed_readings_at_arrival_time_and_flags_them() -> Result<()> {
    let deps = deps_with_fleet().await?;
    sqs(&deps, SKEW).await?;
    let s1 = readings(&deps.registry, "sensor-001").await?;
    let skewed = s1.iter().find(|r| r.reading.id.seq == 5001).ok_or_else(|| anyhow!("missing"))?;
    assert!(skewed.reading.flags.skew_corrected);
    assert_eq!(skewed.reading.time_ms, skewed.reading.rx_ms);
    assert_eq!(skewed.reading.device_time_ms, skewed.reading.rx_ms + 3_600_000);
    // within the 5-minute tolerance: kept at device time, not flagged
    let s2 = readings(&deps.registry, "sensor-002").await?;
    assert!(!s2[0].reading.flags.skew_corrected);
    assert_eq!(s2[0].reading.time_ms, s2[0].reading.rx_ms + 240_000);
    Ok(())
}

/// A hot store that records the Timestream record time of everything written to it.
struct RecordTimes {
    inner: SqliteStore,
    written: std::sync::Mutex<Vec<(u64, i64)>>,
}

impl TelemetrySink for RecordTimes {
    async fn write(&self, readings: &[StoredReading]) -> Vec<WriteStatus> {
        self.written.lock().expect("lock").extend(readings.iter().map(|r| {
            (r.reading.id.seq, fleet_shared::adapters::aws::timestream::record_time_nanos(&r.reading))
        }));
        self.inner.write(readings).await
    }
}

/// `json` as IoT Core delivers the same device messages again `later_ms` after: the rule
/// stamps a new `rx_ms`, SQS gives new message ids.
fn redelivered(json: &str, later_ms: i64) -> Result<String> {
    let mut event: serde_json::Value = serde_json::from_str(json)?;
    for (i, record) in
        event["Records"].as_array_mut().ok_or_else(|| anyhow!("no records"))?.iter_mut().enumerate()
    {
        let mut body: serde_json::Value = serde_json::from_str(record["body"].as_str().unwrap_or_default())?;
        body["rx_ms"] = (body["rx_ms"].as_i64().unwrap_or_default() + later_ms).into();
        record["body"] = body.to_string().into();
        record["messageId"] = format!("redelivered-{i}").into();
    }
    Ok(event.to_string())
}

#[tokio::test]
async fn a_redelivered_skewed_message_is_stored_once_at_its_first_arrival() -> Result<()> {
    // GIVEN a hot store that records the time of each record it is given
    let fleet = deps_with_fleet().await?;
    let db = fleet.registry.clone();
    let deps = on_fleet(&fleet, db.clone(), RecordTimes { inner: db, written: Default::default() });
    // WHEN a batch with a skewed message arrives, then the device sends it again 90 s later
    // (a QoS 1 retransmission gets a new arrival time from the rule)
    sqs(&deps, SKEW).await?;
    let again = sqs(&deps, &redelivered(SKEW, 90_000)?).await?;
    assert!(again.batch_item_failures.is_empty());
    // THEN both copies of the skewed message became the same record time (the first arrival):
    // Timestream keys a record by its dimensions and time, so the second write is the same
    // record, not a second reading
    let written = deps.sink.written.lock().expect("lock").clone();
    let skewed: Vec<i64> = written.iter().filter(|(seq, _)| *seq == 5001).map(|(_, t)| *t).collect();
    assert_eq!(skewed.len(), 2, "{written:?}");
    assert_eq!(skewed[0], skewed[1], "{written:?}");
    assert_eq!(skewed[0] / 1_000_000, 1_764_000_000_000, "stored at the first arrival");
    // AND one reading is stored, at the first arrival, flagged
    let s1 = readings(&deps.registry, "sensor-001").await?;
    let stored: Vec<_> = s1.iter().filter(|r| r.reading.id.seq == 5001).collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].reading.time_ms, 1_764_000_000_000);
    assert!(stored[0].reading.flags.skew_corrected);
    Ok(())
}

#[tokio::test]
async fn a_skewed_message_left_unpinned_is_retried_and_its_neighbours_stored() -> Result<()> {
    // GIVEN a registry whose pins fail transiently
    let fleet = deps_with_fleet().await?;
    let db = fleet.registry.clone();
    let deps = on_fleet(&fleet, PinsDown(db.clone()), db);
    // WHEN the batch with a skewed message arrives
    let response = sqs(&deps, SKEW).await?;
    // THEN only the skewed message is retried; its neighbours are stored
    assert_eq!(failed_ids(&response), [msg(1).as_str()]);
    let s1 = readings(&deps.sink, "sensor-001").await?;
    assert_eq!(s1.iter().map(|r| r.reading.id.seq).collect::<Vec<_>>(), [5002]);
    assert_eq!(readings(&deps.sink, "sensor-002").await?.len(), 1);
    Ok(())
}

/// The embedded registry, with every arrival pin failing transiently.
struct PinsDown(SqliteStore);

impl DeviceRegistry for PinsDown {
    async fn get_many(
        &self,
        things: &[ThingName],
    ) -> Result<HashMap<ThingName, fleet_shared::model::Device>, StoreError> {
        self.0.get_many(things).await
    }

    async fn record_states(
        &self,
        states: &[(ThingName, fleet_shared::model::DeviceState)],
    ) -> Vec<(ThingName, StoreError)> {
        self.0.record_states(states).await
    }

    async fn first_arrivals(
        &self,
        arrivals: &[(fleet_shared::model::MessageId, i64)],
    ) -> Vec<Result<i64, StoreError>> {
        arrivals.iter().map(|_| Err(StoreError::transient("test pins", "throttled"))).collect()
    }
}

#[tokio::test]
async fn direct_invocation_answers_with_counts() -> Result<()> {
    let deps = deps_with_fleet().await?;
    let Response::Direct(first) = handle(&deps, event(DIRECT_V1)?).await? else {
        return Err(anyhow!("expected a direct response"));
    };
    assert_eq!(first, DirectResponse { accepted: 1, duplicates: 0, quarantined: vec![] });
    // a retried invocation is a duplicate, not a second row
    let Response::Direct(again) = handle(&deps, event(DIRECT_V1)?).await? else {
        return Err(anyhow!("expected a direct response"));
    };
    assert_eq!((again.accepted, again.duplicates), (0, 1));
    assert_eq!(readings(&deps.registry, "sensor-001").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn direct_invocation_reports_every_problem_of_a_bad_payload() -> Result<()> {
    let deps = deps_with_fleet().await?;
    let Response::Direct(r) = handle(&deps, event(DIRECT_MALFORMED)?).await? else {
        return Err(anyhow!("expected a direct response"));
    };
    assert_eq!(r.accepted, 0);
    assert_eq!(r.quarantined.len(), 1);
    let got: Vec<(Reason, Option<&str>)> =
        r.quarantined[0].problems.iter().map(|p| (p.reason, p.field.as_deref())).collect();
    assert_eq!(
        got,
        [
            (Reason::WrongType, Some("seq")),
            (Reason::MissingField, Some("ts")),
            (Reason::NoMetrics, Some("m")),
        ]
    );
    assert_eq!(r.quarantined[0].reason, "wrong_type");
    Ok(())
}

/// A hot store that refuses one thing's readings with the given kind of error.
struct RefuseFor {
    inner: SqliteStore,
    thing: ThingName,
    kind: fleet_shared::ErrorKind,
}

impl TelemetrySink for RefuseFor {
    async fn write(&self, readings: &[StoredReading]) -> Vec<WriteStatus> {
        let ok: Vec<StoredReading> =
            readings.iter().filter(|r| r.reading.id.thing != self.thing).cloned().collect();
        let mut written = self.inner.write(&ok).await.into_iter();
        let refusal = Arc::new(StoreError::new("test sink", self.kind, "refused by the test"));
        readings
            .iter()
            .map(|r| {
                if r.reading.id.thing == self.thing {
                    WriteStatus::Refused(Arc::clone(&refusal))
                } else {
                    written.next().unwrap_or_else(|| WriteStatus::Refused(Arc::clone(&refusal)))
                }
            })
            .collect()
    }
}

/// The fleet's deps with the hot store swapped for one that refuses `thing`.
async fn refusing(
    thing_name: &str,
    kind: fleet_shared::ErrorKind,
) -> Result<(EmbeddedDeps, Deps<SqliteStore, RefuseFor, SqliteStore, SqliteStore, SqliteStore>)> {
    let fleet = deps_with_fleet().await?;
    let db = fleet.registry.clone();
    let deps = on_fleet(&fleet, db.clone(), RefuseFor { inner: db, thing: thing(thing_name), kind });
    Ok((fleet, deps))
}

/// The fleet's deps (its database for the archive, quarantine and health counters) with this
/// registry and hot store.
fn on_fleet<R, S>(
    fleet: &EmbeddedDeps,
    registry: R,
    sink: S,
) -> Deps<R, S, SqliteStore, SqliteStore, SqliteStore> {
    let db = fleet.registry.clone();
    Deps {
        registry,
        sink,
        archive: db.clone(),
        quarantine: db.clone(),
        health: db,
        policy: fleet.policy,
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    }
}

#[tokio::test]
async fn reports_only_failed_message_ids() -> Result<()> {
    // GIVEN a hot store that throttles writes for sensor-002
    let (fleet, deps) = refusing("sensor-002", fleet_shared::ErrorKind::Transient).await?;
    // WHEN the valid v1 batch arrives
    let response = sqs(&deps, VALID_V1).await?;
    // THEN exactly sensor-002's two messages are reported for retry, none quarantined
    assert_eq!(failed_ids(&response), [msg(2), msg(4)]);
    assert!(quarantine_by_message(&fleet.registry).await?.is_empty());
    // AND sensor-001's readings are stored, and its state recorded
    assert_eq!(readings(&fleet.registry, "sensor-001").await?.len(), 2);
    let d2 = fleet.registry.device(&thing("sensor-002")).await?.ok_or_else(|| anyhow!("no device"))?;
    assert!(d2.state.is_none(), "a failed device's state is not advanced");
    Ok(())
}

#[tokio::test]
async fn quarantines_what_a_store_refuses_for_good_instead_of_retrying_it() -> Result<()> {
    // GIVEN a hot store that refuses sensor-002's readings permanently (a validation error)
    let (fleet, deps) = refusing("sensor-002", fleet_shared::ErrorKind::Permanent).await?;
    // WHEN the valid v1 batch arrives
    let response = sqs(&deps, VALID_V1).await?;
    // THEN nothing is retried: sensor-002's messages are quarantined as store_rejected
    assert!(response.batch_item_failures.is_empty(), "{:?}", failed_ids(&response));
    let q = quarantine_by_message(&fleet.registry).await?;
    assert_eq!(q.get(&msg(2)), Some(&vec![Reason::StoreRejected]));
    assert_eq!(q.get(&msg(4)), Some(&vec![Reason::StoreRejected]));
    assert_eq!(q.len(), 2);
    // AND the quarantine keeps the original message, and its neighbours are stored
    let lines = fleet.registry.quarantined(0).await?;
    assert!(lines.iter().all(|l| l.thing.as_deref() == Some("sensor-002") && l.body.is_some()));
    assert_eq!(readings(&fleet.registry, "sensor-001").await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_different_payload_under_a_stored_message_key_is_quarantined_as_a_conflict() -> Result<()> {
    // GIVEN sensor-001's (boot 7, seq 1042) is stored
    let deps = deps_with_fleet().await?;
    sqs(&deps, VALID_V1).await?;
    // WHEN another payload arrives under the same key, with other values
    let tampered = VALID_V1.replacen("21.5", "99.5", 1);
    assert_ne!(tampered, VALID_V1, "the sample must carry temp_c 21.5");
    let response = sqs(&deps, &tampered).await?;
    // THEN it is quarantined as a conflict (not counted as a duplicate, not retried)
    assert!(response.batch_item_failures.is_empty());
    let q = quarantine_by_message(&deps.registry).await?;
    assert_eq!(q.get(&msg(1)), Some(&vec![Reason::Conflict]), "{q:?}");
    assert_eq!(q.len(), 1);
    // AND the stored reading is unchanged
    let s1 = readings(&deps.registry, "sensor-001").await?;
    assert!(s1.iter().all(|r| r.reading.metrics.iter().all(|m| m.value != 99.5)));
    Ok(())
}

#[tokio::test]
async fn a_redelivery_after_re_registration_updates_the_reading_in_place() -> Result<()> {
    // GIVEN the batch was stored while sensor-001 was an env-sensor
    let deps = deps_with_fleet().await?;
    sqs(&deps, VALID_V1).await?;
    // WHEN the device is re-registered and the same batch is delivered again
    let reg = DeviceRegistration {
        class: "gateway".into(),
        region: "ap-south".into(),
        fw: "2.0.0".into(),
        registered_at_ms: 1_800_000_000_000,
    };
    deps.registry.register(&[(thing("sensor-001"), reg)]).await?;
    let response = sqs(&deps, VALID_V1).await?;
    // THEN nothing conflicts; the same rows now carry the new enrichment (no second series)
    assert!(response.batch_item_failures.is_empty());
    assert!(quarantine_by_message(&deps.registry).await?.is_empty());
    let s1 = readings(&deps.registry, "sensor-001").await?;
    assert_eq!(s1.len(), 2);
    assert!(s1.iter().all(|r| r.class == "gateway" && r.enrichment_version == 1_800_000_000_000));
    Ok(())
}

#[tokio::test]
async fn direct_invocation_returns_a_retryable_error_on_transient_failure() -> Result<()> {
    let (_, deps) = refusing("sensor-001", fleet_shared::ErrorKind::Transient).await?;
    let err = handle(&deps, event(DIRECT_V1)?).await.err().ok_or_else(|| anyhow!("expected an error"))?;
    assert_eq!(Diagnostic::from(err).error_type, "Retryable");
    Ok(())
}

#[tokio::test]
async fn a_rule_payload_with_a_records_field_is_not_mistaken_for_an_sqs_batch() -> Result<()> {
    let deps = deps_with_fleet().await?;
    let payload = DIRECT_V1.trim_end().trim_end_matches('}').to_owned() + r#","Records":[{"x":1}]}"#;
    let Response::Direct(r) = handle(&deps, event(&payload)?).await? else {
        return Err(anyhow!("expected a direct response"));
    };
    assert_eq!((r.accepted, r.quarantined.len()), (1, 0));
    Ok(())
}
