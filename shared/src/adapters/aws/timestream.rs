//! Hot telemetry store (Amazon Timestream for LiveAnalytics): one multi-measure record per
//! reading, ≤ 100 records per WriteRecords with the shared parts as common attributes.
//! Readings are grouped by what records commonly share (`test`, `fw`, the version) before they
//! are cut into requests, and what every record of a request shares is written once, in its
//! common attributes ([`hoist_common`]): fewer bytes to serialise, sign and send, and fewer
//! write units, for the same rows.
//!
//! Record key and content are chosen so that the service's own rules give the ingest
//! semantics (Timestream WriteRecords API reference, "RejectedRecords"):
//! - key = dimensions + time + measure name. Dimensions hold only what the payload itself
//!   says (`thing`, `fw`, `test`), never enrichment that can change (class, region) nor the
//!   arrival time, so a redelivery or a replay lands on the same record. The time is the
//!   reading's time in nanoseconds with `seq % 1_000_000` below the millisecond, so the key is
//!   the message `(thing, boot, seq)` and two messages in one millisecond do not collide.
//! - content = the metrics and the payload's own fields, plus class and region as VARCHAR
//!   measures, versioned by the enrichment's version (the registration time). An identical
//!   rewrite is accepted silently; the same key with other values and the same version is
//!   rejected with `ExistingVersion`: a **conflict** (quarantined, never counted as a
//!   duplicate); a higher version (a re-registration, then a replay) updates the record.
//!
//! Requests are checked before they are sent ([`validate_record`]): a record that cannot fit
//! Timestream's limits is refused alone instead of failing its 99 neighbours (its request then
//! carries 99), and a request the service refuses as a whole (ValidationException) is split
//! until the bad record is found. A request's records are built just before it is sent, so
//! only the requests in flight hold records.

use std::sync::Arc;

use aws_config::SdkConfig;
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::{Dimension, MeasureValue, MeasureValueType, Record, TimeUnit};
use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt};

use super::{classify, endpoint_overridden, MAX_CONCURRENT_REQUESTS};
use crate::env::{ConfigError, Env};
use crate::error::{ErrorKind, StoreError};
use crate::model::{Reading, StoredReading};
use crate::ports::{TelemetrySink, WriteStatus};

/// WriteRecords: at most 100 records per request.
pub const WRITE_RECORDS_MAX: usize = 100;
/// Timestream's record size limit; the envelope rules (≤ 32 metrics, names ≤ 32 chars) keep
/// every valid reading under it.
pub const MAX_RECORD_BYTES: usize = 2048;
/// Dimension value limit (bytes).
pub const MAX_DIMENSION_VALUE_BYTES: usize = 2048;
/// Measures per multi-measure record.
pub const MAX_MEASURES_PER_RECORD: usize = 256;
/// VARCHAR measure value limit (bytes).
pub const MAX_VARCHAR_BYTES: usize = 2048;
pub const MEASURE_NAME: &str = "telemetry";
pub const TIME_UNIT_NANOS_PER_MS: i64 = 1_000_000;

/// The Timestream table telemetry is written to, on its own client.
#[derive(Clone, Debug)]
pub struct TimestreamSink {
    client: aws_sdk_timestreamwrite::Client,
    database: String,
    table: String,
}

impl TimestreamSink {
    /// Reads `FLEET_TELEMETRY_DB` and `FLEET_TELEMETRY_TABLE`. Against real AWS the client
    /// needs endpoint discovery (one DescribeEndpoints call); discovery would replace an
    /// endpoint override (a moto server) with AWS's own host, so it is only enabled when no
    /// override is set.
    pub async fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, TimestreamStartError> {
        let database = env.required("FLEET_TELEMETRY_DB")?;
        let table = env.required("FLEET_TELEMETRY_TABLE")?;
        let mut client = aws_sdk_timestreamwrite::Client::new(sdk);
        if !endpoint_overridden(sdk, "AWS_ENDPOINT_URL_TIMESTREAM_WRITE") {
            let (discovered, reload) = client
                .with_endpoint_discovery_enabled()
                .await
                .map_err(|e| StoreError::transient("timestream endpoint discovery", e))?;
            tokio::spawn(reload.reload_task());
            client = discovered;
        }
        Ok(Self::new(client, database, table))
    }

    pub fn new(
        client: aws_sdk_timestreamwrite::Client,
        database: impl Into<String>,
        table: impl Into<String>,
    ) -> Self {
        Self { client, database: database.into(), table: table.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TimestreamStartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn measure(name: &str, value: String, kind: MeasureValueType) -> MeasureValue {
    MeasureValue::builder()
        .name(name)
        .value(value)
        .r#type(kind)
        .build()
        .expect("name, value and type are set")
}

fn dimension(name: &str, value: &str) -> Dimension {
    Dimension::builder().name(name).value(value).build().expect("name and value are set")
}

/// A DOUBLE as Timestream reads it: plain decimal for everyday magnitudes, scientific
/// notation otherwise (Rust's `Display` would spell 1e-300 with 300 zeros).
fn double(v: f64) -> String {
    if v == 0.0 || (1e-6..1e15).contains(&v.abs()) {
        v.to_string()
    } else {
        format!("{v:e}")
    }
}

/// The record time: milliseconds with the message's seq in the sub-millisecond digits.
pub fn record_time_nanos(r: &Reading) -> i64 {
    r.time_ms * TIME_UNIT_NANOS_PER_MS + (r.id.seq % TIME_UNIT_NANOS_PER_MS as u64) as i64
}

/// The multi-measure record for one reading (common attributes supply measure name,
/// value type MULTI and the time unit).
pub fn record_for(s: &StoredReading) -> Record {
    let r = &s.reading;
    let mut dims = vec![dimension("thing", r.id.thing.as_str())];
    if let Some(fw) = r.fw.as_deref().filter(|v| !v.is_empty()) {
        dims.push(dimension("fw", fw));
    }
    dims.push(dimension("test", if r.test { "true" } else { "false" }));

    let mut values: Vec<MeasureValue> = Vec::with_capacity(r.metrics.len() + 9);
    values.extend(r.metrics.iter().map(|m| measure(&m.name, double(m.value), MeasureValueType::Double)));
    if let Some(b) = r.battery_pct {
        values.push(measure("bat", double(b), MeasureValueType::Double));
    }
    if let Some(u) = r.uptime_s {
        values.push(measure("up_s", u.to_string(), MeasureValueType::Bigint));
    }
    values.push(measure("boot", r.id.boot.to_string(), MeasureValueType::Bigint));
    values.push(measure("seq", r.id.seq.to_string(), MeasureValueType::Bigint));
    values.push(measure("schema", r.schema_version.to_string(), MeasureValueType::Bigint));
    values.push(measure("class", s.class.clone(), MeasureValueType::Varchar));
    if let Some(region) = s.region.as_deref().filter(|v| !v.is_empty()) {
        values.push(measure("region", region.to_owned(), MeasureValueType::Varchar));
    }
    if r.flags.skew_corrected {
        values.push(measure("skew", "true".into(), MeasureValueType::Boolean));
        values.push(measure("device_ms", r.device_time_ms.to_string(), MeasureValueType::Bigint));
    }
    Record::builder()
        .set_dimensions(Some(dims))
        .time(record_time_nanos(r).to_string())
        .set_measure_values(Some(values))
        .version(record_version(s))
        .build()
}

/// Timestream's size of a record: dimension names and values, the measure name, each
/// measure's name plus its value size (8 bytes for BIGINT/DOUBLE, 1 for BOOLEAN, the bytes
/// of a VARCHAR), and 8 for the time.
pub fn record_bytes(r: &Record) -> usize {
    let dims: usize = r.dimensions().iter().map(|d| d.name().len() + d.value().len()).sum();
    let measures: usize = r
        .measure_values()
        .iter()
        .map(|m| {
            m.name().len()
                + match m.r#type() {
                    MeasureValueType::Boolean => 1,
                    MeasureValueType::Varchar => m.value().len(),
                    _ => 8,
                }
        })
        .sum();
    dims + measures + MEASURE_NAME.len() + 8
}

/// Timestream for LiveAnalytics meters writes in 1 KiB units per WriteRecords request: each
/// event costs its timestamp (8 bytes), its dimension names and values, its measure names and
/// values (8 bytes for BIGINT/DOUBLE, 1 for BOOLEAN, the bytes of a VARCHAR); what the
/// request's common attributes carry (dimensions, the measure name) is counted once.
/// ("Metering and cost optimization: Writes", Timestream developer guide.)
pub const WRITE_UNIT_BYTES: u64 = 1024;

fn measure_bytes(name: &str, kind: &MeasureValueType, value: &str) -> usize {
    name.len()
        + match kind {
            MeasureValueType::Boolean => 1,
            MeasureValueType::Varchar => value.len(),
            _ => 8,
        }
}

/// The write units one WriteRecords request is metered at.
pub fn metered_write_units(common: Option<&Record>, records: &[Record]) -> u64 {
    let attrs = |r: &Record| -> usize {
        let dims: usize = r.dimensions().iter().map(|d| d.name().len() + d.value().len()).sum();
        let name = r.measure_name().map_or(0, str::len);
        let single = match (r.measure_value(), r.measure_value_type()) {
            (Some(v), Some(kind)) if kind != &MeasureValueType::Multi => measure_bytes("", kind, v),
            _ => 0,
        };
        let multi: usize =
            r.measure_values().iter().map(|m| measure_bytes(m.name(), m.r#type(), m.value())).sum();
        dims + name + single + multi
    };
    let events: usize = records.iter().map(|r| 8 + attrs(r)).sum();
    let bytes = (events + common.map_or(0, attrs)) as u64;
    bytes.div_ceil(WRITE_UNIT_BYTES).max(1)
}

/// What IoT Core's own Timestream rule action writes for one message carrying `r`: one
/// single-measure record per value (each metric, battery, uptime) with the thing as dimension,
/// in one WriteRecords request per message.
pub fn native_action_write_units(r: &Reading) -> u64 {
    let thing = dimension("thing", r.id.thing.as_str());
    let record = |name: &str, value: String, kind: MeasureValueType| {
        Record::builder()
            .dimensions(thing.clone())
            .measure_name(name)
            .measure_value(value)
            .measure_value_type(kind)
            .time(r.time_ms.to_string())
            .build()
    };
    let mut records: Vec<Record> =
        r.metrics.iter().map(|m| record(&m.name, double(m.value), MeasureValueType::Double)).collect();
    if let Some(b) = r.battery_pct {
        records.push(record("bat", double(b), MeasureValueType::Double));
    }
    if let Some(u) = r.uptime_s {
        records.push(record("up_s", u.to_string(), MeasureValueType::Bigint));
    }
    metered_write_units(None, &records)
}

/// Check one record against the service limits before it is sent.
pub fn validate_record(r: &Record) -> Result<(), String> {
    let bytes = record_bytes(r);
    if bytes > MAX_RECORD_BYTES {
        return Err(format!("record is {bytes} bytes > {MAX_RECORD_BYTES}"));
    }
    if r.measure_values().len() > MAX_MEASURES_PER_RECORD {
        return Err(format!("{} measures > {MAX_MEASURES_PER_RECORD}", r.measure_values().len()));
    }
    if let Some(d) =
        r.dimensions().iter().find(|d| d.value().is_empty() || d.value().len() > MAX_DIMENSION_VALUE_BYTES)
    {
        return Err(format!(
            "dimension {} value is empty or longer than {MAX_DIMENSION_VALUE_BYTES} bytes",
            d.name()
        ));
    }
    if let Some(m) = r
        .measure_values()
        .iter()
        .find(|m| m.r#type() == &MeasureValueType::Varchar && m.value().len() > MAX_VARCHAR_BYTES)
    {
        return Err(format!("measure {} is longer than {MAX_VARCHAR_BYTES} bytes", m.name()));
    }
    Ok(())
}

/// The common attributes of every WriteRecords request.
pub fn common_attributes() -> Record {
    Record::builder()
        .measure_name(MEASURE_NAME)
        .measure_value_type(MeasureValueType::Multi)
        .time_unit(TimeUnit::Nanoseconds)
        .build()
}

/// One request's common attributes: [`common_attributes`], plus each dimension (same name and
/// value) and the version that every one of `records` carries, which are taken out of the
/// records. Timestream applies common attributes to every record of the request, so the rows
/// are those the records would have written alone; the request is smaller, and common
/// attributes are metered once per request instead of once per record.
pub fn hoist_common(records: &mut [Record]) -> Record {
    let mut common = common_attributes();
    let Some((first, rest)) = records.split_first() else {
        return common;
    };
    let version = first.version.filter(|&v| rest.iter().all(|r| r.version == Some(v)));
    let shared: Vec<Dimension> = first
        .dimensions()
        .iter()
        .filter(|d| rest.iter().all(|r| r.dimensions().contains(d)))
        .cloned()
        .collect();
    for r in records.iter_mut() {
        if version.is_some() {
            r.version = None;
        }
        if let Some(dims) = r.dimensions.as_mut() {
            dims.retain(|d| !shared.contains(d));
        }
        if r.dimensions.as_ref().is_some_and(Vec::is_empty) {
            r.dimensions = None;
        }
    }
    common.version = version;
    if !shared.is_empty() {
        common.dimensions = Some(shared);
    }
    common
}

/// Readings that write the same common attributes sort together (see [`hoist_common`]): the
/// `test` and `fw` dimensions and the version as [`record_for`] writes them.
fn group_key(s: &StoredReading) -> (bool, Option<&str>, i64) {
    (s.reading.test, s.reading.fw.as_deref().filter(|v| !v.is_empty()), record_version(s))
}

/// A record the service rejected: what it means for the reading.
#[derive(Debug, thiserror::Error)]
#[error("record rejected: {reason}")]
pub struct RecordRejected {
    pub reason: String,
    pub existing_version: Option<i64>,
}

/// The version a reading's record is written with: its enrichment's (the registration time).
pub fn record_version(s: &StoredReading) -> i64 {
    s.enrichment_version.max(1)
}

/// A rejection's meaning for a record written with `version`: the same key holds a higher
/// version (this reading was enriched from a registration older than the one the stored record
/// came from: a read before a re-registration reached it, e.g. from a warm function's cache,
/// so it is retried and read again: transient), holds other values under the same or a lower
/// version (conflict), the time is outside what the table accepts (late), or the record itself
/// is invalid (permanent).
fn rejected_status(reason: Option<&str>, existing_version: Option<i64>, version: i64) -> WriteStatus {
    let reason = reason.unwrap_or("rejected without a reason").to_owned();
    if existing_version.is_some_and(|existing| existing > version) {
        WriteStatus::Refused(Arc::new(StoreError::transient(
            "timestream write",
            RecordRejected { reason, existing_version },
        )))
    } else if existing_version.is_some() {
        WriteStatus::Refused(Arc::new(StoreError::conflict(
            "timestream write",
            RecordRejected { reason, existing_version },
        )))
    } else if reason.contains("retention") || reason.contains("time range") {
        WriteStatus::TooLate
    } else {
        WriteStatus::Refused(Arc::new(StoreError::permanent(
            "timestream write",
            RecordRejected { reason, existing_version },
        )))
    }
}

impl TimestreamSink {
    /// One WriteRecords request for `records` (already validated, ≤ 100), which it consumes:
    /// the SDK takes the records by value, so nothing is copied on the way. A request refused
    /// as a whole for a permanent reason is split in halves (the halves rebuilt from
    /// `readings`) until the refused records are alone, so one bad record never fails its
    /// neighbours.
    fn write_chunk<'a>(
        &'a self,
        readings: &'a [&'a StoredReading],
        mut records: Vec<Record>,
    ) -> BoxFuture<'a, Vec<WriteStatus>> {
        Box::pin(async move {
            let n = records.len();
            let common = hoist_common(&mut records);
            let result = self
                .client
                .write_records()
                .database_name(&self.database)
                .table_name(&self.table)
                .common_attributes(common)
                .set_records(Some(records))
                .send()
                .await;
            match result {
                Ok(_) => vec![WriteStatus::Written; n],
                Err(e) => {
                    if let Some(WriteRecordsError::RejectedRecordsException(ex)) = e.as_service_error() {
                        // Records not listed were written.
                        let mut out = vec![WriteStatus::Written; n];
                        for rr in ex.rejected_records() {
                            let Some(i) = usize::try_from(rr.record_index()).ok().filter(|&i| i < n) else {
                                continue;
                            };
                            let version = record_version(readings[i]);
                            out[i] = rejected_status(rr.reason(), rr.existing_version(), version);
                        }
                        return out;
                    }
                    let err = classify("timestream write", e);
                    if err.kind == ErrorKind::Permanent && n > 1 {
                        let (a, b) = readings.split_at(n / 2);
                        let mut out = self.write_chunk(a, a.iter().map(|r| record_for(r)).collect()).await;
                        out.extend(self.write_chunk(b, b.iter().map(|r| record_for(r)).collect()).await);
                        return out;
                    }
                    tracing::warn!(error = %err, records = n, "timestream write failed");
                    vec![WriteStatus::Refused(Arc::new(err)); n]
                }
            }
        })
    }
}

impl TelemetrySink for TimestreamSink {
    async fn write(&self, readings: &[StoredReading]) -> Vec<WriteStatus> {
        // Requests take the readings grouped by what their records share (a stable order).
        let mut order: Vec<usize> = (0..readings.len()).collect();
        order.sort_by_key(|&i| group_key(&readings[i]));
        let writes: Vec<_> = order
            .chunks(WRITE_RECORDS_MAX)
            .map(|request| async move { (request, self.write_request(readings, request).await) })
            .collect();
        let done: Vec<(&[usize], Vec<WriteStatus>)> =
            stream::iter(writes).buffer_unordered(MAX_CONCURRENT_REQUESTS).collect().await;
        let mut statuses: Vec<Option<WriteStatus>> = vec![None; readings.len()];
        for (request, request_statuses) in done {
            for (&i, s) in request.iter().zip(request_statuses) {
                statuses[i] = Some(s);
            }
        }
        statuses.into_iter().map(|s| s.unwrap_or_else(unanswered)).collect()
    }
}

/// The status of a reading no request answered for: failed, to be retried.
fn unanswered() -> WriteStatus {
    WriteStatus::Refused(Arc::new(StoreError::transient("timestream write", "no status")))
}

impl TimestreamSink {
    /// The statuses of `readings[request]` (≤ 100, in that order), their records built just
    /// before their request is sent. A record that cannot fit the service's limits is refused
    /// alone, before sending; a reading left without an answer is failed, to be retried.
    async fn write_request(&self, readings: &[StoredReading], request: &[usize]) -> Vec<WriteStatus> {
        let mut statuses = vec![unanswered(); request.len()];
        let mut positions: Vec<usize> = Vec::with_capacity(request.len());
        let mut sent: Vec<&StoredReading> = Vec::with_capacity(request.len());
        let mut records: Vec<Record> = Vec::with_capacity(request.len());
        for (k, &i) in request.iter().enumerate() {
            let record = record_for(&readings[i]);
            match validate_record(&record) {
                Ok(()) => {
                    positions.push(k);
                    sent.push(&readings[i]);
                    records.push(record);
                }
                Err(problem) => {
                    statuses[k] = WriteStatus::Refused(Arc::new(StoreError::permanent(
                        "timestream record check",
                        problem,
                    )))
                }
            }
        }
        if !records.is_empty() {
            for (k, s) in positions.into_iter().zip(self.write_chunk(&sent, records).await) {
                statuses[k] = s;
            }
        }
        statuses
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::envelope::{MAX_METRICS, MAX_METRIC_NAME_LEN};
    use crate::model::{MessageId, Metric, ReadingFlags, ThingName};

    fn reading(metrics: usize, name_len: usize) -> StoredReading {
        StoredReading {
            reading: Reading {
                id: MessageId {
                    thing: ThingName::parse(&"t".repeat(128)).unwrap(),
                    boot: u32::MAX,
                    seq: i64::MAX as u64,
                },
                time_ms: 1_764_000_000_123,
                device_time_ms: 1_764_000_000_123 + 3_600_000,
                rx_ms: 1_764_000_000_123,
                fw: Some("f".repeat(64)),
                metrics: (0..metrics)
                    .map(|i| Metric {
                        name: format!("{i:0>width$}", width = name_len).replacen('0', "m", 1),
                        value: -1.234_567_890_123_456_7e-300,
                    })
                    .collect(),
                battery_pct: Some(99.999_999_999_999),
                uptime_s: Some(u64::MAX),
                test: true,
                flags: ReadingFlags { skew_corrected: true, late: false },
                schema_version: 2,
            },
            class: "c".repeat(crate::model::MAX_LABEL_LEN),
            region: Some("r".repeat(crate::model::MAX_LABEL_LEN)),
            enrichment_version: 1_700_000_000_000,
        }
    }

    #[test]
    fn doubles_are_written_compactly_and_exactly() {
        for v in [21.5, -0.25, 0.0, 1e-300, -1.234_567_890_123_456_7e-300, 6.02e23, 1e15, 123_456.789] {
            let s = double(v);
            assert!(s.len() <= 24, "{s}");
            assert_eq!(s.parse::<f64>(), Ok(v));
        }
    }

    #[test]
    fn the_largest_valid_reading_fits_one_record() {
        let r = record_for(&reading(MAX_METRICS, MAX_METRIC_NAME_LEN));
        assert!(record_bytes(&r) <= MAX_RECORD_BYTES, "{} bytes", record_bytes(&r));
        assert_eq!(validate_record(&r), Ok(()));
    }

    #[test]
    fn refuses_a_record_over_the_size_limit_before_sending() {
        let mut big = reading(MAX_METRICS, MAX_METRIC_NAME_LEN);
        big.class = "c".repeat(MAX_RECORD_BYTES);
        let err = validate_record(&record_for(&big)).unwrap_err();
        assert!(err.contains("bytes >"), "{err}");
    }

    #[test]
    fn the_record_key_holds_no_enrichment_and_no_arrival_time() {
        // GIVEN one message enriched two ways and arriving twice
        let a = reading(2, 5);
        let mut b = a.clone();
        b.class = "gateway".into();
        b.region = None;
        b.reading.rx_ms += 60_000;
        b.enrichment_version += 1;
        let (ra, rb) = (record_for(&a), record_for(&b));
        // THEN both records have the same key (dimensions + time) and only the version and
        // the enrichment measures differ
        assert_eq!((ra.dimensions(), ra.time()), (rb.dimensions(), rb.time()));
        assert!(ra.dimensions().iter().all(|d| !["class", "region", "rx_ms"].contains(&d.name())));
        assert!(rb.version() > ra.version());
        assert!(ra.measure_values().iter().all(|m| m.name() != "rx_ms"));
    }

    #[test]
    fn write_units_follow_the_metering_example_and_count_common_attributes_once() {
        // The developer guide's example: one event of 83 bytes; 12 such events fit 1 KiB.
        let event = Record::builder()
            .dimensions(dimension("region", "us-east-1"))
            .dimensions(dimension("az", "1d"))
            .dimensions(dimension("vpc", "vpc-1a2b3c4d"))
            .dimensions(dimension("hostname", "host-24Gju"))
            .measure_name("cpu_utilization")
            .measure_value("35.0")
            .measure_value_type(MeasureValueType::Double)
            .time("1602983435238563000")
            .build();
        assert_eq!(metered_write_units(None, std::slice::from_ref(&event)), 1);
        assert_eq!(metered_write_units(None, &vec![event.clone(); 12]), 1, "12 x 83 = 996 bytes");
        assert_eq!(metered_write_units(None, &vec![event; 13]), 2);
        // A multi-measure batch: the shared measure name is counted once.
        let r = reading(3, 8);
        let records = vec![record_for(&r); 100];
        let one = metered_write_units(Some(&common_attributes()), std::slice::from_ref(&records[0]));
        let hundred = metered_write_units(Some(&common_attributes()), &records);
        assert_eq!(one, 1);
        let per_record = (record_bytes(&records[0]) - MEASURE_NAME.len()) as u64;
        assert_eq!(hundred, (100 * per_record + MEASURE_NAME.len() as u64).div_ceil(WRITE_UNIT_BYTES));
    }

    /// The row Timestream writes for `record` in a request with `common`: the common
    /// dimensions added, the common version where the record has none.
    fn row(common: &Record, record: &Record) -> (Vec<(String, String)>, Option<i64>, Record) {
        let mut dims: Vec<(String, String)> = common
            .dimensions()
            .iter()
            .chain(record.dimensions())
            .map(|d| (d.name().to_owned(), d.value().to_owned()))
            .collect();
        dims.sort();
        let mut rest = record.clone();
        rest.dimensions = None;
        rest.version = None;
        (dims, record.version.or(common.version), rest)
    }

    fn stored(thing: &str, fw: Option<&str>, test: bool, version: i64) -> StoredReading {
        let mut s = reading(2, 4);
        s.reading.id.thing = ThingName::parse(thing).unwrap();
        s.reading.fw = fw.map(str::to_owned);
        s.reading.test = test;
        s.enrichment_version = version;
        s
    }

    #[test]
    fn what_every_record_of_a_request_shares_is_written_once_and_the_rows_stay_the_same() {
        // (case, readings, the dimensions hoisted, the version hoisted)
        type Case = (&'static str, Vec<StoredReading>, Vec<&'static str>, Option<i64>);
        let cases: Vec<Case> = vec![
            (
                "one firmware, one version",
                vec![stored("a", Some("1.0"), false, 7), stored("b", Some("1.0"), false, 7)],
                vec!["fw", "test"],
                Some(7),
            ),
            (
                "two firmwares, two versions",
                vec![stored("a", Some("1.0"), false, 7), stored("b", Some("2.0"), false, 8)],
                vec!["test"],
                None,
            ),
            (
                "a record without fw",
                vec![stored("a", None, true, 7), stored("b", Some("2.0"), true, 7)],
                vec!["test"],
                Some(7),
            ),
            ("one record", vec![stored("a", Some("1.0"), false, 7)], vec!["fw", "test", "thing"], Some(7)),
        ];
        for (case, readings, hoisted, version) in cases {
            let originals: Vec<Record> = readings.iter().map(record_for).collect();
            let mut records = originals.clone();
            let common = hoist_common(&mut records);
            let mut names: Vec<&str> = common.dimensions().iter().map(Dimension::name).collect();
            names.sort_unstable();
            assert_eq!(names, hoisted, "{case}");
            assert_eq!(common.version, version, "{case}");
            assert_eq!(common.measure_name(), Some(MEASURE_NAME), "{case}");
            for (original, record) in originals.iter().zip(&records) {
                assert_eq!(row(&common, record), row(&common_attributes(), original), "{case}");
                assert!(record.dimensions.as_ref().is_none_or(|d| !d.is_empty()), "{case}: empty list sent");
            }
            assert!(
                metered_write_units(Some(&common), &records)
                    <= metered_write_units(Some(&common_attributes()), &originals),
                "{case}"
            );
        }
    }

    #[test]
    fn record_time_carries_seq_below_the_millisecond() {
        let r = reading(1, 5);
        assert_eq!(record_for(&r).time(), Some("1764000000123775807"));
    }

    #[test]
    fn classifies_rejections() {
        let same_key = Some("A record with the same key exists");
        assert_eq!(rejected_status(same_key, Some(1), 1).kind(), Some(ErrorKind::Conflict));
        assert_eq!(rejected_status(same_key, Some(1), 2).kind(), Some(ErrorKind::Conflict));
        // A newer registration wrote the stored record: this reading's enrichment is stale.
        assert_eq!(rejected_status(same_key, Some(3), 2).kind(), Some(ErrorKind::Transient));
        assert_eq!(
            rejected_status(Some("The record timestamp is outside the time range [..) of the data ingestion window / retention"), None, 1),
            WriteStatus::TooLate
        );
        assert_eq!(
            rejected_status(Some("Measure name too long"), None, 1).kind(),
            Some(ErrorKind::Permanent)
        );
    }
}
