//! Adapter tests for responses a moto server never produces: Timestream RejectedRecords and
//! throttling, DynamoDB UnprocessedItems / UnprocessedKeys and conditional-check failures,
//! Timestream query pagination. Scripted with aws-smithy-mocks.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::batch_get_item::BatchGetItemOutput;
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemOutput;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::error::ConditionalCheckFailedException;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use aws_sdk_timestreamquery::operation::query::QueryOutput;
use aws_sdk_timestreamquery::types::{ColumnInfo, Datum, Row};
use aws_sdk_timestreamwrite::error::ErrorMetadata;
use aws_sdk_timestreamwrite::operation::write_records::{WriteRecordsError, WriteRecordsOutput};
use aws_sdk_timestreamwrite::types::error::{
    RejectedRecordsException, ThrottlingException, ValidationException,
};
use aws_sdk_timestreamwrite::types::RejectedRecord;
use aws_smithy_mocks::{mock, mock_client, Rule, RuleMode};

use super::{DevicesTable, TimestreamQuery, TimestreamSink};
use crate::error::ErrorKind;
use crate::model::{
    DeviceRegistration, DeviceState, MessageId, Metric, Reading, ReadingFlags, StoredReading, ThingName,
};
use crate::ports::{DeviceAdmin, DeviceRegistry, TelemetryQuery, TelemetrySink, WriteStatus};

/// Adapters whose clients answer only from the given rules.
fn devices(rules: &[&Rule]) -> DevicesTable {
    DevicesTable::new(mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, rules), "Devices")
}

fn sink(rules: &[&Rule]) -> TimestreamSink {
    TimestreamSink::new(
        mock_client!(aws_sdk_timestreamwrite, RuleMode::MatchAny, rules),
        "fleet",
        "telemetry",
    )
}

fn query(rules: &[&Rule]) -> TimestreamQuery {
    TimestreamQuery::new(
        mock_client!(aws_sdk_timestreamquery, RuleMode::MatchAny, rules),
        "fleet",
        "telemetry",
    )
}

fn thing(n: usize) -> ThingName {
    ThingName::parse(&format!("dev-{n:04}")).expect("valid")
}

fn reading(n: usize) -> StoredReading {
    StoredReading {
        reading: Reading {
            id: MessageId { thing: thing(n % 7), boot: 1, seq: n as u64 },
            time_ms: 1_764_000_000_000 + n as i64,
            device_time_ms: 1_764_000_000_000 + n as i64,
            rx_ms: 1_764_000_000_100 + n as i64,
            fw: Some("1.0.0".into()),
            metrics: vec![Metric { name: "temp_c".into(), value: 20.0 + n as f64 }],
            battery_pct: Some(80.0),
            uptime_s: Some(60),
            test: false,
            flags: ReadingFlags::default(),
            schema_version: 1,
        },
        class: "env".into(),
        region: Some("eu".into()),
        enrichment_version: 1,
    }
}

fn rejected(index: i32, reason: &str, existing: Option<i64>) -> RejectedRecord {
    RejectedRecord::builder().record_index(index).reason(reason).set_existing_version(existing).build()
}

#[tokio::test]
async fn rejected_records_fail_only_the_affected_readings_and_duplicates_are_not_failures() {
    // GIVEN Timestream rejects 3 of 5 records: one identical existing, one too old, one invalid
    let rule = mock!(aws_sdk_timestreamwrite::Client::write_records).then_error(|| {
        WriteRecordsError::RejectedRecordsException(
            RejectedRecordsException::builder()
                .rejected_records(rejected(
                    1,
                    "A record with the same dimensions, time and measure name exists",
                    Some(1),
                ))
                .rejected_records(rejected(
                    2,
                    "The record timestamp is outside the retention period of the magnetic store",
                    None,
                ))
                .rejected_records(rejected(4, "Dimension value exceeds the limit", None))
                .build(),
        )
    });
    let s = sink(&[&rule]);
    // WHEN
    let statuses = s.write(&(0..5).map(reading).collect::<Vec<_>>()).await;
    // THEN the existing version is a conflict, the invalid record permanent, the rest written
    assert_eq!(statuses[0], WriteStatus::Written);
    assert_eq!(statuses[1].kind(), Some(ErrorKind::Conflict));
    assert_eq!(statuses[2], WriteStatus::TooLate);
    assert_eq!(statuses[3], WriteStatus::Written);
    assert!(matches!(&statuses[4], WriteStatus::Refused(e)
        if e.kind == ErrorKind::Permanent && e.to_string().contains("Dimension value")));
}

#[tokio::test]
async fn a_request_refused_as_a_whole_is_split_until_only_the_bad_record_is_refused() {
    // GIVEN Timestream refuses any request that carries the record of seq 37
    let bad_time = super::timestream::record_time_nanos(&reading(37).reading).to_string();
    let carries_bad = move |r: &aws_sdk_timestreamwrite::operation::write_records::WriteRecordsInput| {
        r.records().iter().any(|rec| rec.time() == Some(bad_time.as_str()))
    };
    let refuse = mock!(aws_sdk_timestreamwrite::Client::write_records)
        .match_requests(carries_bad.clone())
        .then_error(|| {
            WriteRecordsError::ValidationException(
                ValidationException::builder()
                    .message("invalid measure value")
                    .meta(ErrorMetadata::builder().code("ValidationException").build())
                    .build()
                    .expect("message set"),
            )
        });
    let ok = mock!(aws_sdk_timestreamwrite::Client::write_records)
        .match_requests(move |r| !carries_bad(r))
        .then_output(|| WriteRecordsOutput::builder().build());
    let s = sink(&[&refuse, &ok]);
    // WHEN 100 readings are written
    let statuses = s.write(&(0..100).map(reading).collect::<Vec<_>>()).await;
    // THEN only reading 37 is refused, permanently; its 99 neighbours are written
    assert_eq!(statuses.len(), 100);
    assert_eq!(statuses[37].kind(), Some(ErrorKind::Permanent));
    assert_eq!(statuses.iter().filter(|s| **s == WriteStatus::Written).count(), 99);
    // AND the search took log2(100) rounds, not 100 single-record requests
    assert!(refuse.num_calls() + ok.num_calls() <= 16, "{} requests", refuse.num_calls() + ok.num_calls());
}

#[tokio::test]
async fn writes_timestream_in_chunks_of_100_and_throttling_fails_only_its_chunk() {
    // GIVEN the request carrying the last 50 records is throttled
    let ok = mock!(aws_sdk_timestreamwrite::Client::write_records)
        .match_requests(|r| r.records().len() == 100)
        .then_output(|| WriteRecordsOutput::builder().build());
    let throttled = mock!(aws_sdk_timestreamwrite::Client::write_records)
        .match_requests(|r| r.records().len() == 50)
        .then_error(|| {
            WriteRecordsError::ThrottlingException(
                ThrottlingException::builder()
                    .message("slow down")
                    // The service names the error in its response; the SDK reads the code from there.
                    .meta(ErrorMetadata::builder().code("ThrottlingException").message("slow down").build())
                    .build()
                    .expect("message set"),
            )
        });
    let s = sink(&[&ok, &throttled]);
    // WHEN 250 readings are written
    let statuses = s.write(&(0..250).map(reading).collect::<Vec<_>>()).await;
    // THEN 3 requests (100 + 100 + 50); exactly the last 50 failed
    assert_eq!(ok.num_calls(), 2);
    assert_eq!(statuses.len(), 250);
    assert!(statuses[..200].iter().all(|s| *s == WriteStatus::Written));
    assert!(statuses[200..].iter().all(|s| s.kind() == Some(ErrorKind::Transient)));
    // AND a throttled request is never split (only permanent refusals are): a 25-record
    // request would match no rule and fail this test; the SDK's own retries resend all 50
    assert!((1..=3).contains(&throttled.num_calls()), "{}", throttled.num_calls());
}

fn unprocessed_put() -> HashMap<String, Vec<aws_sdk_dynamodb::types::WriteRequest>> {
    let put = aws_sdk_dynamodb::types::PutRequest::builder()
        .item("thing", AttributeValue::S("dev-0000".into()))
        .item("item", AttributeValue::S("registration".into()))
        .build()
        .expect("item set");
    HashMap::from([(
        "Devices".to_owned(),
        vec![aws_sdk_dynamodb::types::WriteRequest::builder().put_request(put).build()],
    )])
}

fn registration() -> DeviceRegistration {
    DeviceRegistration { class: "env".into(), region: "eu".into(), fw: "1.0.0".into(), registered_at_ms: 1 }
}

#[tokio::test(start_paused = true)]
async fn resubmits_dynamodb_unprocessed_items_with_backoff() {
    // GIVEN the first BatchWriteItem leaves one item unprocessed, the second takes it
    let rule = mock!(aws_sdk_dynamodb::Client::batch_write_item)
        .sequence()
        .output(|| BatchWriteItemOutput::builder().set_unprocessed_items(Some(unprocessed_put())).build())
        .output(|| BatchWriteItemOutput::builder().build())
        .repeatedly()
        .build();
    let s = devices(&[&rule]);
    // WHEN 30 devices are registered (25 + 5 per request)
    let devices: Vec<_> = (0..30).map(|n| (thing(n), registration())).collect();
    s.register(&devices).await.expect("registered");
    // THEN 2 chunks + 1 resubmission
    assert_eq!(rule.num_calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn gives_up_with_a_transient_error_when_items_stay_unprocessed() {
    let rule = mock!(aws_sdk_dynamodb::Client::batch_write_item)
        .sequence()
        .output(|| BatchWriteItemOutput::builder().set_unprocessed_items(Some(unprocessed_put())).build())
        .repeatedly()
        .build();
    let s = devices(&[&rule]);
    let err = s.register(&[(thing(0), registration())]).await.expect_err("must fail");
    assert!(err.is_transient(), "{err}");
    assert_eq!(rule.num_calls(), super::MAX_BATCH_RETRIES + 1);
}

#[tokio::test(start_paused = true)]
async fn resubmits_dynamodb_unprocessed_keys() {
    let key = |item: &str| {
        HashMap::from([
            ("thing".to_owned(), AttributeValue::S("dev-0001".into())),
            ("item".to_owned(), AttributeValue::S(item.into())),
        ])
    };
    let registration_item = move || {
        let mut i = key("registration");
        i.insert("class".into(), AttributeValue::S("env".into()));
        i.insert("region".into(), AttributeValue::S("eu".into()));
        i.insert("fw".into(), AttributeValue::S("1.0.0".into()));
        i.insert("registered_at_ms".into(), AttributeValue::N("1".into()));
        i
    };
    let rule = mock!(aws_sdk_dynamodb::Client::batch_get_item)
        .sequence()
        .output(move || {
            BatchGetItemOutput::builder()
                .responses("Devices", vec![])
                .unprocessed_keys(
                    "Devices",
                    KeysAndAttributes::builder().keys(key("registration")).build().expect("keys set"),
                )
                .build()
        })
        .output(move || BatchGetItemOutput::builder().responses("Devices", vec![registration_item()]).build())
        .build();
    let s = devices(&[&rule]);
    let devices = s.get_many(&[thing(1)]).await.expect("looked up");
    assert_eq!(rule.num_calls(), 2);
    assert_eq!(devices[&thing(1)].class(), "env");
}

#[tokio::test]
async fn an_older_state_losing_the_condition_is_not_an_error() {
    let newer_exists = mock!(aws_sdk_dynamodb::Client::update_item).then_error(|| {
        UpdateItemError::ConditionalCheckFailedException(ConditionalCheckFailedException::builder().build())
    });
    let s = devices(&[&newer_exists]);
    let state = DeviceState { last_ts_ms: 1, last_rx_ms: 1, boot: 1, seq: 1, battery_pct: None, fw: None };
    assert!(s.record_states(&[(thing(1), state)]).await.is_empty());
    assert_eq!(newer_exists.num_calls(), 1);
}

#[tokio::test]
async fn reads_every_page_of_a_telemetry_query() {
    let page = |seq: &str, token: Option<&str>| {
        let columns = ["thing", "class", "measure_name", "time", "boot", "seq", "temp_c"]
            .map(|n| ColumnInfo::builder().name(n).build());
        let values = ["dev-0001", "env", "telemetry", "2025-11-24 16:00:00.000000001", "1", seq, "21.5"];
        QueryOutput::builder()
            .query_id("q")
            .set_column_info(Some(columns.to_vec()))
            .rows(
                Row::builder()
                    .set_data(Some(values.map(|v| Datum::builder().scalar_value(v).build()).to_vec()))
                    .build()
                    .expect("data set"),
            )
            .set_next_token(token.map(str::to_owned))
            .build()
            .expect("query output")
    };
    let rule = mock!(aws_sdk_timestreamquery::Client::query)
        .sequence()
        .output(move || page("1", Some("next")))
        .output(move || page("2", None))
        .build();
    let s = query(&[&rule]);
    let readings = s.telemetry(&thing(1), 0, 10).await.expect("queried");
    assert_eq!(rule.num_calls(), 2);
    let seqs: Vec<u64> = readings.iter().map(|r| r.reading.id.seq).collect();
    assert_eq!(seqs, [1, 2]);
}

#[cfg(feature = "test-support")]
#[tokio::test]
async fn ingesting_1000_messages_from_100_devices_makes_the_target_api_calls() {
    use super::counting::{ApiCalls, CountingAws};

    // GIVEN 100 registered devices and one SQS batch of 1,000 messages from them
    let aws = CountingAws::new((0..100).map(crate::ingest::sim::thing_name).collect());
    let batch = crate::ingest::sim::fleet_batch(100, 1_000, 1_764_000_000_000, 1);
    // WHEN it is ingested
    let outcome = aws.ingest(&batch, 1_764_000_002_000).await;
    // THEN everything is stored with 10 WriteRecords, 1 PUT, 1 state write per device, and no dedupe writes
    assert_eq!((outcome.accepted, outcome.unregistered), (1_000, 0));
    let calls = aws.calls();
    assert_eq!(
        calls,
        ApiCalls {
            batch_get_item: 2,
            update_item: 100,
            batch_write_item: 0,
            write_records: 10,
            timestream_write_units: calls.timestream_write_units,
            put_object: 1
        }
    );
    // AND the ten requests are metered by their bytes, not one write per reading: the sim's
    // records are 100-250 bytes, so 1,000 of them are 100-250 KiB.
    assert!((100..=250).contains(&calls.timestream_write_units), "{calls:?}");
}

#[tokio::test]
async fn a_batch_of_packs_stores_ten_readings_per_message_with_the_same_requests() {
    use super::counting::CountingAws;

    // GIVEN 100 registered devices and one SQS batch of 100 v2 packs of 10 readings
    let aws = CountingAws::new((0..100).map(crate::ingest::sim::thing_name).collect());
    let batch = crate::ingest::sim::pack_batch(100, 100, 10, 1_764_000_000_000, 1);
    // WHEN it is ingested
    let outcome = aws.ingest(&batch, 1_764_000_020_000).await;
    // THEN every message is accepted with its ten readings
    assert_eq!((outcome.messages, outcome.accepted, outcome.readings), (100, 100, 1_000), "{outcome:?}");
    // AND the 1,000 readings cost what 1,000 single-reading messages cost in requests
    let calls = aws.calls();
    assert_eq!((calls.write_records, calls.put_object, calls.update_item), (10, 1, 100), "{calls:?}");
}
