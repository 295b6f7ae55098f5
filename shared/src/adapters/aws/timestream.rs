//! Hot telemetry store (Amazon Timestream for LiveAnalytics): one multi-measure record per
//! reading, ≤ 100 records per WriteRecords with the shared parts as common attributes.
//!
//! Record identity is `(dimensions, time, measure_name)`. The time is the reading's time in
//! nanoseconds with `seq % 1_000_000` in the sub-millisecond digits, so a record is keyed by
//! its message `(thing, boot, seq)`: a redelivered message lands on the same record (identical
//! → no new row), two different messages stamped in the same millisecond do not collide, and
//! the time stays exact to the millisecond.

use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::{Dimension, MeasureValue, MeasureValueType, Record, TimeUnit};
use futures_util::stream::{self, StreamExt};

use super::{classify, AwsStore, MAX_CONCURRENT_REQUESTS};
use crate::error::StoreError;
use crate::model::{MessageId, Metric, Reading, ReadingFlags, StoredReading, ThingName};
use crate::ports::{FleetQuery, TelemetrySink, WriteStatus};
use crate::time::parse_timestream_time;

/// WriteRecords: at most 100 records per request.
pub const WRITE_RECORDS_MAX: usize = 100;
/// Timestream's record size limit; the envelope rules (≤ 32 metrics, names ≤ 40 chars) keep
/// every valid reading under it.
pub const MAX_RECORD_BYTES: usize = 2048;
pub const MEASURE_NAME: &str = "telemetry";
pub const TIME_UNIT_NANOS_PER_MS: i64 = 1_000_000;
/// Query results page size is Timestream's; this bounds how many pages one call reads.
const MAX_QUERY_PAGES: usize = 100;

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
    let mut dims = vec![dimension("thing", r.id.thing.as_str()), dimension("class", &s.class)];
    if let Some(region) = s.region.as_deref().filter(|v| !v.is_empty()) {
        dims.push(dimension("region", region));
    }
    if let Some(fw) = r.fw.as_deref().filter(|v| !v.is_empty()) {
        dims.push(dimension("fw", fw));
    }
    dims.push(dimension("test", if r.test { "true" } else { "false" }));

    let mut values: Vec<MeasureValue> = Vec::with_capacity(r.metrics.len() + 8);
    values.extend(r.metrics.iter().map(|m| measure(&m.name, double(m.value), MeasureValueType::Double)));
    if let Some(b) = r.battery_pct {
        values.push(measure("bat", double(b), MeasureValueType::Double));
    }
    if let Some(u) = r.uptime_s {
        values.push(measure("up_s", u.to_string(), MeasureValueType::Bigint));
    }
    values.push(measure("boot", r.id.boot.to_string(), MeasureValueType::Bigint));
    values.push(measure("seq", r.id.seq.to_string(), MeasureValueType::Bigint));
    values.push(measure("rx_ms", r.rx_ms.to_string(), MeasureValueType::Bigint));
    values.push(measure("schema", r.schema_version.to_string(), MeasureValueType::Bigint));
    if r.flags.skew_corrected {
        values.push(measure("skew", "true".into(), MeasureValueType::Boolean));
        values.push(measure("device_ms", r.device_time_ms.to_string(), MeasureValueType::Bigint));
    }
    Record::builder()
        .set_dimensions(Some(dims))
        .time(record_time_nanos(r).to_string())
        .set_measure_values(Some(values))
        .build()
}

/// The common attributes of every WriteRecords request.
fn common_attributes() -> Record {
    Record::builder()
        .measure_name(MEASURE_NAME)
        .measure_value_type(MeasureValueType::Multi)
        .time_unit(TimeUnit::Nanoseconds)
        .build()
}

/// A rejection's meaning: the same record exists (duplicate), the time is outside what the
/// table accepts (late), or anything else (retry).
fn rejected_status(reason: Option<&str>, existing_version: Option<i64>) -> WriteStatus {
    let reason = reason.unwrap_or("rejected without a reason");
    if existing_version.is_some() {
        WriteStatus::Duplicate
    } else if reason.contains("retention") || reason.contains("time range") {
        WriteStatus::TooLate
    } else {
        WriteStatus::Failed(format!("rejected: {reason}"))
    }
}

impl AwsStore {
    async fn write_chunk(&self, chunk: &[StoredReading]) -> Vec<WriteStatus> {
        let result = self
            .timestream
            .write_records()
            .database_name(&self.resources.telemetry_database)
            .table_name(&self.resources.telemetry_table)
            .common_attributes(common_attributes())
            .set_records(Some(chunk.iter().map(record_for).collect()))
            .send()
            .await;
        match result {
            Ok(_) => vec![WriteStatus::Written; chunk.len()],
            Err(e) => {
                if let Some(WriteRecordsError::RejectedRecordsException(ex)) = e.as_service_error() {
                    // Records not listed were written.
                    let mut out = vec![WriteStatus::Written; chunk.len()];
                    for rr in ex.rejected_records() {
                        if let Some(slot) =
                            usize::try_from(rr.record_index()).ok().and_then(|i| out.get_mut(i))
                        {
                            *slot = rejected_status(rr.reason(), rr.existing_version());
                        }
                    }
                    return out;
                }
                let err = classify("timestream write", e);
                tracing::warn!(error = %err, records = chunk.len(), "timestream write failed");
                vec![WriteStatus::Failed(err.to_string()); chunk.len()]
            }
        }
    }
}

impl TelemetrySink for AwsStore {
    async fn write(&self, readings: &[StoredReading]) -> Result<Vec<WriteStatus>, StoreError> {
        let writes: Vec<_> = readings
            .chunks(WRITE_RECORDS_MAX)
            .enumerate()
            .map(|(i, chunk)| async move { (i, self.write_chunk(chunk).await) })
            .collect();
        let mut chunks: Vec<(usize, Vec<WriteStatus>)> =
            stream::iter(writes).buffer_unordered(MAX_CONCURRENT_REQUESTS).collect().await;
        chunks.sort_by_key(|(i, _)| *i);
        Ok(chunks.into_iter().flat_map(|(_, s)| s).collect())
    }
}

/// Columns the adapter writes itself; every other non-null measure is a device metric.
const OWN_COLUMNS: [&str; 15] = [
    "thing",
    "class",
    "region",
    "fw",
    "test",
    "measure_name",
    "time",
    "bat",
    "up_s",
    "boot",
    "seq",
    "rx_ms",
    "schema",
    "skew",
    "device_ms",
];

/// One query result row (column name → scalar) back to a reading.
pub(crate) fn reading_from_row(columns: &[(String, Option<String>)]) -> Option<StoredReading> {
    let get = |name: &str| columns.iter().find(|(c, _)| c == name).and_then(|(_, v)| v.as_deref());
    let time_ms = parse_timestream_time(get("time")?)?;
    let rx_ms = get("rx_ms").and_then(|v| v.parse().ok()).unwrap_or(time_ms);
    let skew_corrected = get("skew") == Some("true");
    Some(StoredReading {
        reading: Reading {
            id: MessageId {
                thing: ThingName::parse(get("thing")?).ok()?,
                boot: get("boot")?.parse().ok()?,
                seq: get("seq")?.parse().ok()?,
            },
            time_ms,
            device_time_ms: get("device_ms").and_then(|v| v.parse().ok()).unwrap_or(time_ms),
            rx_ms,
            fw: get("fw").map(str::to_owned),
            metrics: columns
                .iter()
                .filter(|(c, _)| !OWN_COLUMNS.contains(&c.as_str()))
                .filter_map(|(c, v)| Some(Metric { name: c.clone(), value: v.as_deref()?.parse().ok()? }))
                .collect(),
            battery_pct: get("bat").and_then(|v| v.parse().ok()),
            uptime_s: get("up_s").and_then(|v| v.parse().ok()),
            test: get("test") == Some("true"),
            flags: ReadingFlags { skew_corrected, late: false },
            schema_version: get("schema").and_then(|v| v.parse().ok()).unwrap_or(1),
        },
        class: get("class").unwrap_or(crate::model::UNREGISTERED_CLASS).to_owned(),
        region: get("region").map(str::to_owned),
    })
}

impl AwsStore {
    pub(crate) async fn query_telemetry(
        &self,
        thing: &ThingName,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredReading>, StoreError> {
        // ThingName admits only [a-zA-Z0-9:_-]: safe to quote into SQL.
        let sql = format!(
            "SELECT * FROM \"{}\".\"{}\" WHERE thing = '{}' AND measure_name = '{MEASURE_NAME}' \
             AND time >= from_milliseconds({since_ms}) ORDER BY time ASC LIMIT {limit}",
            self.resources.telemetry_database,
            self.resources.telemetry_table,
            thing.as_str()
        );
        let mut out = Vec::new();
        let client = self.query_client().await?;
        let mut token: Option<String> = None;
        for _ in 0..MAX_QUERY_PAGES {
            let page = client
                .query()
                .query_string(&sql)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| classify("timestream query", e))?;
            let names: Vec<String> =
                page.column_info().iter().map(|c| c.name().unwrap_or_default().to_owned()).collect();
            for row in page.rows() {
                let columns: Vec<(String, Option<String>)> = names
                    .iter()
                    .cloned()
                    .zip(row.data().iter().map(|d| d.scalar_value().map(str::to_owned)))
                    .collect();
                out.extend(reading_from_row(&columns));
            }
            match page.next_token() {
                Some(t) if out.len() < limit => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}

impl FleetQuery for AwsStore {
    async fn telemetry(
        &self,
        thing: &ThingName,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredReading>, StoreError> {
        self.query_telemetry(thing, since_ms, limit).await
    }

    async fn quarantined(&self, since_ms: i64) -> Result<Vec<crate::ingest::QuarantineLine>, StoreError> {
        self.list_quarantined(since_ms).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::envelope::{MAX_METRICS, MAX_METRIC_NAME_LEN};

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
        }
    }

    /// Timestream's record size: dimension names and values, the measure name, each measure's
    /// name plus its value size (8 bytes for BIGINT/DOUBLE, 1 for BOOLEAN), and 8 for time.
    fn record_bytes(r: &Record) -> usize {
        let dims: usize = r.dimensions().iter().map(|d| d.name().len() + d.value().len()).sum();
        let measures: usize = r
            .measure_values()
            .iter()
            .map(|m| m.name().len() + if m.r#type() == &MeasureValueType::Boolean { 1 } else { 8 })
            .sum();
        dims + measures + MEASURE_NAME.len() + 8
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
    }

    #[test]
    fn record_time_carries_seq_below_the_millisecond() {
        let r = reading(1, 5);
        assert_eq!(record_for(&r).time(), Some("1764000000123775807"));
    }

    #[test]
    fn classifies_rejections() {
        assert_eq!(rejected_status(Some("The record already exists"), Some(1)), WriteStatus::Duplicate);
        assert_eq!(
            rejected_status(Some("The record timestamp is outside the time range [..) of the data ingestion window / retention"), None),
            WriteStatus::TooLate
        );
        assert!(matches!(rejected_status(Some("Measure name too long"), None), WriteStatus::Failed(_)));
    }

    #[test]
    fn reads_a_query_row_back_into_a_reading() {
        let col = |n: &str, v: Option<&str>| (n.to_owned(), v.map(str::to_owned));
        let row = vec![
            col("thing", Some("sensor-001")),
            col("class", Some("env")),
            col("region", None),
            col("fw", Some("1.4.2")),
            col("test", Some("false")),
            col("measure_name", Some("telemetry")),
            col("time", Some("2025-11-24 16:00:00.123001042")),
            col("temp_c", Some("21.5")),
            col("co2_ppm", None),
            col("boot", Some("7")),
            col("seq", Some("1042")),
            col("rx_ms", Some("1764000000200")),
            col("bat", Some("87.0")),
        ];
        let r = reading_from_row(&row).expect("row parses");
        assert_eq!(r.reading.time_ms, 1_764_000_000_123);
        assert_eq!(r.reading.id.seq, 1042);
        assert_eq!(r.reading.metrics, vec![Metric { name: "temp_c".into(), value: 21.5 }]);
        assert_eq!(r.region, None);
        assert_eq!(r.reading.battery_pct, Some(87.0));
    }
}
