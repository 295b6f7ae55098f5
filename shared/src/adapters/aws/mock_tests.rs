//! Adapter tests for responses a moto server never produces: Timestream RejectedRecords and
//! throttling, DynamoDB UnprocessedItems / UnprocessedKeys and conditional-check failures,
//! Timestream query pagination. Scripted with aws-smithy-mocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::operation::batch_execute_statement::{
    BatchExecuteStatementError, BatchExecuteStatementOutput,
};
use aws_sdk_dynamodb::operation::batch_get_item::BatchGetItemOutput;
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemOutput;
use aws_sdk_dynamodb::types::{
    AttributeValue, BatchStatementError, BatchStatementErrorCodeEnum as Code, BatchStatementResponse,
    KeysAndAttributes,
};
use aws_sdk_timestreamquery::operation::query::QueryOutput;
use aws_sdk_timestreamquery::types::{ColumnInfo, Datum, Row};
use aws_sdk_timestreamwrite::error::ErrorMetadata;
use aws_sdk_timestreamwrite::operation::write_records::{WriteRecordsError, WriteRecordsOutput};
use aws_sdk_timestreamwrite::types::error::{
    RejectedRecordsException, ThrottlingException, ValidationException,
};
use aws_sdk_timestreamwrite::types::RejectedRecord;
use aws_smithy_mocks::{mock, mock_client, MockResponse, Rule, RuleMode};

use super::devices::{devices_from, registration_item, state_statement, StateStep};
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
async fn rejections_reach_the_right_readings_after_grouping_and_a_newer_stored_version_is_retried() {
    // GIVEN readings of two firmwares and two registration versions, interleaved, and a table
    // whose stored records for seq 1 and seq 4 came from registrations of version 2
    let readings: Vec<StoredReading> = (0..6)
        .map(|n| {
            let mut r = reading(n);
            r.reading.fw = Some(if n % 2 == 0 { "1.0.0" } else { "2.0.0" }.into());
            r.enrichment_version = if n == 1 || n == 5 { 2 } else { 1 };
            r
        })
        .collect();
    let sent: Arc<Mutex<Vec<Vec<u64>>>> = Arc::default();
    let seen = Arc::clone(&sent);
    let rule = mock!(aws_sdk_timestreamwrite::Client::write_records).then_compute_response(move |req| {
        // Each record's seq, in the request's order; the request's records share `test` only.
        let seq = |r: &aws_sdk_timestreamwrite::types::Record| -> u64 {
            let m = r.measure_values().iter().find(|m| m.name() == "seq");
            m.and_then(|m| m.value().parse().ok()).unwrap_or(u64::MAX)
        };
        let seqs: Vec<u64> = req.records().iter().map(seq).collect();
        seen.lock().expect("lock").push(seqs.clone());
        let at = |s: u64| seqs.iter().position(|&x| x == s).expect("sent") as i32;
        MockResponse::Error(WriteRecordsError::RejectedRecordsException(
            RejectedRecordsException::builder()
                .rejected_records(rejected(at(1), "A record with the same key exists", Some(2)))
                .rejected_records(rejected(at(4), "A record with the same key exists", Some(2)))
                .build(),
        ))
    });
    // WHEN they are written
    let statuses = sink(&[&rule]).write(&readings).await;
    // THEN one request carries them grouped by firmware, then version
    assert_eq!(*sent.lock().expect("lock"), [vec![0, 2, 4, 3, 1, 5]]);
    // AND each rejection lands on its own reading: seq 1 (version 2, as stored) is a conflict,
    // seq 4 (version 1, older than the stored 2: enriched from a stale registration) is retried
    for (n, status) in statuses.iter().enumerate() {
        let expected = match n {
            1 => Some(ErrorKind::Conflict),
            4 => Some(ErrorKind::Transient),
            _ => None,
        };
        assert_eq!(status.kind(), expected, "seq {n}: {status:?}");
    }
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

#[tokio::test]
async fn a_record_over_the_limits_is_refused_before_sending_and_its_request_carries_the_rest() {
    // GIVEN 150 readings of two firmwares (requests take them grouped: the even seqs first),
    // of which seq 5, the 78th sent, would make a record over Timestream's size limit
    let ok = mock!(aws_sdk_timestreamwrite::Client::write_records)
        .match_requests(|r| r.records().len() == 99 || r.records().len() == 50)
        .then_output(|| WriteRecordsOutput::builder().build());
    let mut readings: Vec<StoredReading> = (0..150).map(reading).collect();
    for (n, r) in readings.iter_mut().enumerate() {
        r.reading.fw = Some(if n % 2 == 0 { "1.0.0" } else { "2.0.0" }.into());
    }
    readings[5].class = "c".repeat(super::timestream::MAX_RECORD_BYTES);
    let s = sink(&[&ok]);
    // WHEN they are written
    let statuses = s.write(&readings).await;
    // THEN seq 5 alone is refused for good, by the check, and the other 149 are written
    let WriteStatus::Refused(e) = &statuses[5] else { panic!("{:?}", statuses[5]) };
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.to_string().contains("timestream record check"), "{e}");
    assert_eq!(statuses.iter().filter(|s| **s == WriteStatus::Written).count(), 149);
    // AND the two requests carried 99 and 50 records: the refused one was never sent, and any
    // other request shape would match no rule and fail a reading
    assert_eq!(ok.num_calls(), 2);
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

fn state(ts: i64, battery: Option<f64>) -> DeviceState {
    DeviceState {
        last_ts_ms: ts,
        last_rx_ms: ts + 5,
        boot: 2,
        seq: 7,
        battery_pct: battery,
        fw: Some("1.4.2".into()),
    }
}

#[test]
fn state_statements_are_parameterised_partiql_with_the_forward_only_condition() {
    let t = thing(1);
    let (update, params) = state_statement("Devices-test", &t, &state(1_000, Some(80.0)), StateStep::Update);
    assert_eq!(
        update,
        r#"UPDATE "Devices-test" SET "last_ts_ms" = ? SET "last_rx_ms" = ? SET "boot" = ? SET "seq" = ? SET "battery_pct" = ? SET "fw_reported" = ? WHERE "thing" = ? AND "item" = 'state' AND "last_ts_ms" < ?"#
    );
    let n = |v: &str| AttributeValue::N(v.into());
    let s = |v: &str| AttributeValue::S(v.into());
    assert_eq!(params, [n("1000"), n("1005"), n("2"), n("7"), n("80"), s("1.4.2"), s("dev-0001"), n("1000")]);
    let (insert, params) = state_statement("Devices-test", &t, &state(1_000, None), StateStep::Insert);
    assert_eq!(
        insert,
        r#"INSERT INTO "Devices-test" VALUE {'thing': ?, 'item': 'state', 'last_ts_ms': ?, 'last_rx_ms': ?, 'boot': ?, 'seq': ?, 'fw_reported': ?}"#
    );
    assert_eq!(params, [s("dev-0001"), n("1000"), n("1005"), n("2"), n("7"), s("1.4.2")]);
    let (again, _) = state_statement("Devices-test", &t, &state(1_000, Some(80.0)), StateStep::UpdateAgain);
    assert_eq!(again, update);
}

/// Answers state statements as DynamoDB would for a table where devices 0-19 have an older
/// state, 20-39 none, 40-49 a newer one; device 50 is throttled once, device 51 refused.
fn scripted_state_table() -> (Rule, Arc<Mutex<Vec<usize>>>) {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&sizes);
    let throttled = Arc::new(AtomicBool::new(false));
    let rule = mock!(aws_sdk_dynamodb::Client::batch_execute_statement).then_compute_output(move |req| {
        seen.lock().expect("lock").push(req.statements().len());
        let answers = req.statements().iter().map(|st| {
            let insert = st.statement().starts_with("INSERT");
            let thing = st.parameters().iter().find_map(|p| p.as_s().ok().filter(|s| s.starts_with("dev-")));
            let n: usize = thing.and_then(|t| t[4..].parse().ok()).expect("thing parameter");
            let code = match n {
                0..=19 => None,
                20..=39 if insert => None,
                20..=39 => Some(Code::ConditionalCheckFailed),
                40..=49 if insert => Some(Code::DuplicateItem),
                40..=49 => Some(Code::ConditionalCheckFailed),
                50 if !throttled.swap(true, Ordering::SeqCst) => Some(Code::ThrottlingError),
                50 => None,
                _ => Some(Code::ValidationError),
            };
            let error = code.map(|c| BatchStatementError::builder().code(c).message("scripted").build());
            BatchStatementResponse::builder().set_error(error).build()
        });
        BatchExecuteStatementOutput::builder().set_responses(Some(answers.collect())).build()
    });
    (rule, sizes)
}

#[tokio::test]
async fn state_writes_take_25_devices_a_request_and_each_device_its_own_path() {
    // GIVEN 52 devices: older state, no state, newer state, throttled once, refused
    let (rule, sizes) = scripted_state_table();
    let s = devices(&[&rule]);
    let states: Vec<_> = (0..52).map(|n| (thing(n), state(1_000, None))).collect();
    // WHEN their states are recorded
    let failed = s.record_states(&states).await;
    // THEN only the refused device fails, permanently, with DynamoDB's code
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!((&failed[0].0, failed[0].1.kind), (&thing(51), ErrorKind::Permanent));
    assert!(failed[0].1.to_string().contains("ValidationError"), "{}", failed[0].1);
    // AND the rounds were: 52 updates (25+25+2); 30 inserts + the throttled retry (25+6);
    // 10 updates again for the devices whose insert found an item
    assert_eq!(*sizes.lock().expect("lock"), [25, 25, 2, 25, 6, 10]);
}

#[tokio::test]
async fn a_state_request_refused_as_a_whole_fails_each_device_with_its_kind() {
    let denied = mock!(aws_sdk_dynamodb::Client::batch_execute_statement).then_error(|| {
        BatchExecuteStatementError::generic(
            aws_sdk_dynamodb::error::ErrorMetadata::builder()
                .code("AccessDeniedException")
                .message("no")
                .build(),
        )
    });
    let s = devices(&[&denied]);
    let failed = s.record_states(&[(thing(1), state(1, None)), (thing(2), state(1, None))]).await;
    assert_eq!(failed.len(), 2);
    assert!(failed
        .iter()
        .all(|(_, e)| e.kind == ErrorKind::Permanent && e.to_string().contains("AccessDenied")));
    assert_eq!(denied.num_calls(), 1);
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
    // THEN everything is stored with 10 WriteRecords, 1 PUT, one state statement per device
    // in requests of 25, and no dedupe writes
    assert_eq!((outcome.accepted, outcome.unregistered), (1_000, 0));
    let calls = aws.calls();
    assert_eq!(
        calls,
        ApiCalls {
            batch_get_item: 2,
            batch_execute_statement: 4,
            state_statements: 100,
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

#[cfg(feature = "test-support")]
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
    assert_eq!(
        (calls.write_records, calls.put_object, calls.batch_execute_statement),
        (10, 1, 4),
        "{calls:?}"
    );
}

#[tokio::test]
async fn when_the_archive_cannot_be_written_nothing_reaches_the_hot_store_and_the_batch_is_retried() {
    use super::counting::CountingAws;
    use crate::ingest::{ingest_batch, IngestPolicy, IngestPorts, OwnedInbound};
    use aws_sdk_s3::operation::put_object::PutObjectError;

    // GIVEN 100 registered devices and an archive bucket that answers SlowDown to every upload
    let aws = CountingAws::new((0..100).map(crate::ingest::sim::thing_name).collect());
    let slow_down = mock!(aws_sdk_s3::Client::put_object).then_error(|| {
        PutObjectError::generic(aws_sdk_s3::error::ErrorMetadata::builder().code("SlowDown").build())
    });
    let archive =
        super::S3Archive::new(mock_client!(aws_sdk_s3, RuleMode::MatchAny, [&slow_down]), "archive");
    let batch = crate::ingest::sim::fleet_batch(100, 200, 1_764_000_000_000, 1);
    let inbound: Vec<_> = batch.iter().map(OwnedInbound::borrow).collect();
    let ports =
        IngestPorts { registry: &aws.devices, sink: &aws.sink, archive: &archive, quarantine: &archive };
    // WHEN a batch is ingested (the registry lookup and the upload run at the same time)
    let outcome = ingest_batch(ports, &IngestPolicy::default(), 1_764_000_020_000, &inbound).await;
    // THEN every message fails transiently with the archive's error, to be delivered again
    assert_eq!((outcome.messages, outcome.accepted, outcome.failed.len()), (200, 0, 200), "{outcome:?}");
    assert!(outcome
        .failed
        .iter()
        .all(|f| f.error.kind == ErrorKind::Transient && f.error.to_string().contains("s3 put raw")));
    // AND nothing was written to Timestream or to the devices' state
    let calls = aws.calls();
    assert_eq!((calls.write_records, calls.batch_execute_statement), (0, 0), "{calls:?}");
    assert!(slow_down.num_calls() >= 1);
}

#[tokio::test]
async fn a_registry_that_refuses_for_good_quarantines_the_batch_which_stays_archived() {
    use super::counting::CountingAws;
    use crate::ingest::{ingest_batch, IngestPolicy, IngestPorts, OwnedInbound, Reason};
    use aws_sdk_dynamodb::operation::batch_get_item::BatchGetItemError;

    // GIVEN a Devices table this function may not read (AccessDenied), and working S3 and
    // Timestream
    let aws = CountingAws::new((0..100).map(crate::ingest::sim::thing_name).collect());
    let denied = mock!(aws_sdk_dynamodb::Client::batch_get_item).then_error(|| {
        BatchGetItemError::generic(
            aws_sdk_dynamodb::error::ErrorMetadata::builder().code("AccessDeniedException").build(),
        )
    });
    let registry = devices(&[&denied]);
    let batch = crate::ingest::sim::fleet_batch(100, 200, 1_764_000_000_000, 1);
    let inbound: Vec<_> = batch.iter().map(OwnedInbound::borrow).collect();
    let ports =
        IngestPorts { registry: &registry, sink: &aws.sink, archive: &aws.archive, quarantine: &aws.archive };
    // WHEN a batch is ingested
    let outcome = ingest_batch(ports, &IngestPolicy::default(), 1_764_000_020_000, &inbound).await;
    // THEN every message is quarantined as refused by a store, none is retried
    assert_eq!(
        (outcome.accepted, outcome.quarantined.len(), outcome.failed.len()),
        (0, 200, 0),
        "{outcome:?}"
    );
    assert!(outcome.quarantined.iter().all(|q| q.problems.iter().any(|p| p.reason == Reason::StoreRejected)));
    // AND nothing reached Timestream or the devices' state, while the raw archive holds the batch
    // (the lookup and the upload run together): 2 objects, the raw one and the quarantine's
    let calls = aws.calls();
    assert_eq!(
        (calls.write_records, calls.batch_execute_statement, calls.put_object),
        (0, 0, 2),
        "{calls:?}"
    );
}

#[tokio::test]
async fn an_operator_write_rereads_and_retries_on_conflicts_then_reports_the_version() {
    use aws_sdk_iotdataplane::operation::get_thing_shadow::GetThingShadowOutput;
    use aws_sdk_iotdataplane::operation::update_thing_shadow::{
        UpdateThingShadowError, UpdateThingShadowOutput,
    };
    use aws_sdk_iotdataplane::primitives::Blob;
    use aws_sdk_iotdataplane::types::error::ConflictException;

    use super::IotDataShadows;
    use crate::model::ShadowName;
    use crate::twin::write::{set_desired, WriteOutcome};

    // GIVEN a shadow another writer moves on twice before ours lands
    let versions = Arc::new(std::sync::atomic::AtomicU64::new(4));
    let read = Arc::clone(&versions);
    let get = mock!(aws_sdk_iotdataplane::Client::get_thing_shadow).then_compute_output(move |_| {
        let v = read.load(Ordering::SeqCst);
        let body = format!(r#"{{"state":{{"desired":{{"mode":"eco"}}}},"version":{v}}}"#);
        GetThingShadowOutput::builder().payload(Blob::new(body)).build()
    });
    let sent = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&sent);
    let update = mock!(aws_sdk_iotdataplane::Client::update_thing_shadow).then_compute_response(move |req| {
        let body: serde_json::Value =
            serde_json::from_slice(req.payload().map(|b| b.as_ref()).unwrap_or_default()).expect("JSON");
        seen.lock().expect("lock").push(body["version"].as_u64());
        let v = versions.fetch_add(1, Ordering::SeqCst);
        if seen.lock().expect("lock").len() < 3 {
            MockResponse::Error(UpdateThingShadowError::ConflictException(
                ConflictException::builder().build(),
            ))
        } else {
            let body = format!(r#"{{"version":{}}}"#, v + 1);
            MockResponse::Output(UpdateThingShadowOutput::builder().payload(Blob::new(body)).build())
        }
    });
    let svc = IotDataShadows::new(mock_client!(aws_sdk_iotdataplane, RuleMode::MatchAny, [&get, &update]));
    let desired = serde_json::json!({"fw": "2.1.0"}).as_object().cloned().expect("object");
    // WHEN an operator sets desired fw
    let outcome =
        set_desired(&svc, &thing(1), &ShadowName::classic(), &desired, "op-1").await.expect("written");
    // THEN each try carried the version it had just read, and the third was applied
    assert_eq!(*sent.lock().expect("lock"), [Some(4), Some(5), Some(6)]);
    assert_eq!(outcome, WriteOutcome::Applied { version: 7, attempts: 3 });
}

/// The headers and body of every request an SDK client is about to send (after signing).
#[derive(Debug, Clone, Default)]
struct Sent(Arc<Mutex<Vec<SentRequest>>>);

/// A request's headers and body.
type SentRequest = (http::HeaderMap, Vec<u8>);

impl aws_sdk_s3::config::Intercept for Sent {
    fn name(&self) -> &'static str {
        "Sent"
    }

    fn read_before_transmit(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef<
            '_,
        >,
        _components: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let request = context.request();
        let mut headers = http::HeaderMap::new();
        for (name, value) in request.headers() {
            headers
                .insert(http::HeaderName::from_bytes(name.as_bytes())?, http::HeaderValue::from_str(value)?);
        }
        let body = request.body().bytes().unwrap_or_default().to_vec();
        self.0.lock().expect("lock").push((headers, body));
        Ok(())
    }
}

#[tokio::test]
async fn an_archive_upload_is_signed_with_the_hash_that_names_it() {
    use crate::ingest::archive::raw_object;
    use crate::ports::RawArchive;
    use aws_sdk_s3::operation::put_object::PutObjectOutput;
    use sha2::{Digest, Sha256};

    // GIVEN an S3 archive whose client records what it sends
    let put = mock!(aws_sdk_s3::Client::put_object).then_output(|| PutObjectOutput::builder().build());
    let sent = Sent::default();
    let client = mock_client!(aws_sdk_s3, RuleMode::MatchAny, [&put], |conf| conf.interceptor(sent.clone()));
    let archive = super::S3Archive::new(client, "archive");
    // WHEN a batch's raw object is put
    let object = raw_object([&b"{\"a\":1}"[..], b"{\"b\":2}"], 1_764_000_000_000).expect("two lines");
    archive.put_raw(&object).await.expect("put");
    // THEN the signed payload hash is the SHA-256 of the body sent, which names the object
    let sent = sent.0.lock().expect("lock").clone();
    let [(headers, body)] = sent.as_slice() else { panic!("{} requests", sent.len()) };
    assert_eq!(body.as_slice(), object.body());
    let digest: String = Sha256::digest(body).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(headers.get("x-amz-content-sha256").and_then(|v| v.to_str().ok()), Some(digest.as_str()));
    assert!(object.key().contains(&digest[..32]), "{}", object.key());
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(authorization.contains("x-amz-content-sha256"), "the hash is not signed: {authorization}");
}

#[tokio::test]
async fn the_sdk_signs_with_the_precomputed_hash_instead_of_hashing_the_body() {
    use aws_sdk_s3::operation::put_object::PutObjectOutput;

    // GIVEN a put whose precomputed payload hash is not the body's
    let put = mock!(aws_sdk_s3::Client::put_object).then_output(|| PutObjectOutput::builder().build());
    let sent = Sent::default();
    let client = mock_client!(aws_sdk_s3, RuleMode::MatchAny, [&put], |conf| conf.interceptor(sent.clone()));
    let stand_in = "ab".repeat(32);
    // WHEN it is sent
    client
        .put_object()
        .bucket("archive")
        .key("k")
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"body"))
        .customize()
        .interceptor(super::s3::PrecomputedPayloadHash(stand_in.clone()))
        .send()
        .await
        .expect("put");
    // THEN the request carries that hash: the SDK took it and did not hash the body itself
    let sent = sent.0.lock().expect("lock").clone();
    let hash = sent.first().and_then(|(h, _)| h.get("x-amz-content-sha256")).and_then(|v| v.to_str().ok());
    assert_eq!(hash, Some(stand_in.as_str()));
}

#[test]
fn reads_registration_and_state_items_and_skips_only_a_corrupt_one() {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let n = |v: &str| AttributeValue::N(v.to_owned());
    let item = |attrs: Vec<(&str, AttributeValue)>| -> HashMap<String, AttributeValue> {
        attrs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    };
    let registered = DeviceRegistration {
        class: "pump".into(),
        region: "eu".into(),
        fw: "1.0".into(),
        registered_at_ms: 5,
    };
    let items = vec![
        // dev-0001: a registration as the adapter writes it, and a full state
        registration_item(&thing(1), &registered).expect("encodes"),
        item(vec![
            ("thing", s("dev-0001")),
            ("item", s("state")),
            ("last_ts_ms", n("100")),
            ("boot", n("2")),
            ("seq", n("9")),
            ("battery_pct", n("87.5")),
            ("fw_reported", s("1.1")),
            ("something_else", s("ignored")),
        ]),
        // dev-0002: a registration whose class is a number (skipped), a state without options
        item(vec![("thing", s("dev-0002")), ("item", s("registration")), ("class", n("7"))]),
        item(vec![
            ("thing", s("dev-0002")),
            ("item", s("state")),
            ("last_ts_ms", n("50")),
            ("last_rx_ms", n("60")),
        ]),
        // dev-0003: only a presence item, and a state whose seq does not fit: no device
        item(vec![
            ("thing", s("dev-0003")),
            ("item", s("presence")),
            ("connected", AttributeValue::Bool(true)),
        ]),
        item(vec![("thing", s("dev-0003")), ("item", s("state")), ("last_ts_ms", n("1")), ("seq", n("-1"))]),
    ];
    let devices = devices_from(items);
    let mut things: Vec<&str> = devices.keys().map(ThingName::as_str).collect();
    things.sort_unstable();
    assert_eq!(things, ["dev-0001", "dev-0002"]);
    let one = &devices[&thing(1)];
    assert_eq!(one.registration.as_ref(), Some(&registered));
    assert_eq!(
        one.state,
        Some(DeviceState {
            last_ts_ms: 100,
            last_rx_ms: 100,
            boot: 2,
            seq: 9,
            battery_pct: Some(87.5),
            fw: Some("1.1".into())
        })
    );
    let two = &devices[&thing(2)];
    assert_eq!(two.registration, None);
    assert_eq!(
        two.state,
        Some(DeviceState { last_ts_ms: 50, last_rx_ms: 60, boot: 0, seq: 0, battery_pct: None, fw: None })
    );
}

/// The keys of each BatchGetItem request, as `(thing, item)`.
type KeysRequested = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// A Devices table answering BatchGetItem from `registered` things (registration and state)
/// and `state_only` things (state), recording each request's keys.
fn recording_devices_table(
    registered: &'static [usize],
    state_only: &'static [usize],
) -> (Rule, Rule, KeysRequested) {
    let requests: KeysRequested = Arc::default();
    let seen = Arc::clone(&requests);
    let get = mock!(aws_sdk_dynamodb::Client::batch_get_item).then_compute_output(move |req| {
        let keys: Vec<(String, String)> = req
            .request_items()
            .and_then(|r| r.get("Devices"))
            .map(|k| k.keys().to_vec())
            .unwrap_or_default()
            .into_iter()
            .map(|k| {
                let text = |n: &str| k.get(n).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
                (text("thing"), text("item"))
            })
            .collect();
        seen.lock().expect("lock").push(keys.clone());
        let items: Vec<HashMap<String, AttributeValue>> = keys
            .into_iter()
            .filter_map(|(thing, item)| {
                let n: usize = thing.strip_prefix("dev-")?.parse().ok()?;
                let mut i = HashMap::from([
                    ("thing".to_owned(), AttributeValue::S(thing.clone())),
                    ("item".to_owned(), AttributeValue::S(item.clone())),
                ]);
                match item.as_str() {
                    "registration" if registered.contains(&n) => {
                        i.insert("class".into(), AttributeValue::S(format!("class-{n}")));
                    }
                    "state" if registered.contains(&n) || state_only.contains(&n) => {
                        i.insert("last_ts_ms".into(), AttributeValue::N("5".into()));
                    }
                    _ => return None,
                }
                Some(i)
            })
            .collect();
        BatchGetItemOutput::builder().responses("Devices", items).build()
    });
    let put = mock!(aws_sdk_dynamodb::Client::batch_write_item)
        .then_output(|| BatchWriteItemOutput::builder().build());
    (get, put, requests)
}

#[tokio::test]
async fn a_warm_ingest_reads_registrations_once_per_time_to_live_and_at_once_after_registering() {
    let (get, put, requests) = recording_devices_table(&[1, 2], &[3]);
    let table = devices(&[&get, &put]).caching_registrations(std::time::Duration::from_secs(60));
    let keys = |n: usize| -> Vec<(String, String)> {
        let mut k = requests.lock().expect("lock")[n].clone();
        k.sort();
        k
    };
    let k = |t: &str, item: &str| (t.to_owned(), item.to_owned());
    let things = [thing(1), thing(2), thing(3)];

    // WHEN three devices are looked up twice
    let first = table.get_many(&things).await.expect("looked up");
    let second = table.get_many(&things).await.expect("looked up");
    // THEN the second read asks only for states, and for the registration not found before
    assert_eq!(keys(0).len(), 6);
    assert_eq!(
        keys(1),
        [
            k("dev-0001", "state"),
            k("dev-0002", "state"),
            k("dev-0003", "registration"),
            k("dev-0003", "state")
        ]
    );
    // AND finds the same devices
    for t in &things {
        assert_eq!(first[t], second[t], "{t}");
    }
    assert_eq!(second[&thing(2)].class(), "class-2");
    assert!(second[&thing(3)].registration.is_none() && second[&thing(3)].state.is_some());

    // WHEN a device is registered through the same table
    table.register(&[(thing(2), registration())]).await.expect("registered");
    table.get_many(&things[..2]).await.expect("looked up");
    // THEN its registration is read again at once
    assert_eq!(keys(2), [k("dev-0001", "state"), k("dev-0002", "registration"), k("dev-0002", "state")]);
}

#[tokio::test]
async fn without_a_registration_cache_every_read_asks_for_registrations() {
    let (get, put, requests) = recording_devices_table(&[1], &[]);
    for table in
        [devices(&[&get, &put]), devices(&[&get, &put]).caching_registrations(std::time::Duration::ZERO)]
    {
        table.get_many(&[thing(1)]).await.expect("looked up");
        table.get_many(&[thing(1)]).await.expect("looked up");
    }
    let requests = requests.lock().expect("lock");
    assert_eq!(requests.len(), 4);
    assert!(requests.iter().all(|keys| keys.len() == 2), "{requests:?}");
}
