//! A call-counting AWS store: every client answers success from an aws-smithy-mocks rule, and
//! each rule counts its calls. The real adapters run unchanged on top, so the counts are the
//! API calls a deployment makes. Used by the cost report and the call-count tests.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_sdk_dynamodb::operation::batch_execute_statement::BatchExecuteStatementOutput;
use aws_sdk_dynamodb::operation::batch_get_item::BatchGetItemOutput;
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemOutput;
use aws_sdk_dynamodb::types::{AttributeValue, BatchStatementResponse};
use aws_sdk_s3::operation::put_object::PutObjectOutput;
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsOutput;
use aws_smithy_mocks::{mock, mock_client, Rule, RuleMode};

use super::{DevicesTable, S3Archive, TimestreamSink};
use crate::ingest::{ingest_batch, BatchOutcome, IngestPolicy, IngestPorts, OwnedInbound};

/// API calls made, by operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiCalls {
    pub batch_get_item: usize,
    /// State writes (PartiQL, up to 25 statements each).
    pub batch_execute_statement: usize,
    /// PartiQL statements those requests carried (one write request unit each when applied).
    pub state_statements: u64,
    pub batch_write_item: usize,
    pub write_records: usize,
    /// Timestream write units those WriteRecords requests are metered at.
    pub timestream_write_units: u64,
    pub put_object: usize,
}

pub struct CountingAws {
    pub devices: DevicesTable,
    pub sink: TimestreamSink,
    pub archive: S3Archive,
    batch_get_item: Rule,
    batch_execute_statement: Rule,
    batch_write_item: Rule,
    write_records: Rule,
    write_units: Arc<AtomicU64>,
    statements: Arc<AtomicU64>,
    put_object: Rule,
}

impl CountingAws {
    /// A store where `registered` things have a registration (class `env-sensor`).
    pub fn new(registered: HashSet<String>) -> Self {
        let table = "Devices";
        let batch_get_item =
            mock!(aws_sdk_dynamodb::Client::batch_get_item).then_compute_output(move |req| {
                let keys = req
                    .request_items()
                    .and_then(|r| r.get(table))
                    .map(|k| k.keys().to_vec())
                    .unwrap_or_default();
                let items: Vec<HashMap<String, AttributeValue>> = keys
                    .into_iter()
                    .filter(|k| {
                        let thing = k.get("thing").and_then(|v| v.as_s().ok());
                        let item = k.get("item").and_then(|v| v.as_s().ok());
                        item.is_some_and(|i| i == "registration")
                            && thing.is_some_and(|t| registered.contains(t))
                    })
                    .map(|mut k| {
                        k.insert("class".into(), AttributeValue::S("env-sensor".into()));
                        k.insert("region".into(), AttributeValue::S("eu-west".into()));
                        k.insert("fw".into(), AttributeValue::S("1.4.0".into()));
                        k.insert("registered_at_ms".into(), AttributeValue::N("1".into()));
                        k
                    })
                    .collect();
                BatchGetItemOutput::builder().responses(table, items).build()
            });
        // Every state write applies (each device already has an older state).
        let statements = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&statements);
        let batch_execute_statement = mock!(aws_sdk_dynamodb::Client::batch_execute_statement)
            .then_compute_output(move |req| {
                counted.fetch_add(req.statements().len() as u64, Ordering::Relaxed);
                let applied = req.statements().iter().map(|_| BatchStatementResponse::builder().build());
                BatchExecuteStatementOutput::builder().set_responses(Some(applied.collect())).build()
            });
        let batch_write_item = mock!(aws_sdk_dynamodb::Client::batch_write_item)
            .then_output(|| BatchWriteItemOutput::builder().build());
        let write_units = Arc::new(AtomicU64::new(0));
        let metered = Arc::clone(&write_units);
        let write_records =
            mock!(aws_sdk_timestreamwrite::Client::write_records).then_compute_output(move |req| {
                let units = super::timestream::metered_write_units(req.common_attributes(), req.records());
                metered.fetch_add(units, Ordering::Relaxed);
                WriteRecordsOutput::builder().build()
            });
        let put_object =
            mock!(aws_sdk_s3::Client::put_object).then_output(|| PutObjectOutput::builder().build());
        let devices = DevicesTable::new(
            mock_client!(
                aws_sdk_dynamodb,
                RuleMode::MatchAny,
                [&batch_get_item, &batch_execute_statement, &batch_write_item]
            ),
            table,
        );
        let sink = TimestreamSink::new(
            mock_client!(aws_sdk_timestreamwrite, RuleMode::MatchAny, [&write_records]),
            "fleet",
            "telemetry",
        );
        let archive = S3Archive::new(mock_client!(aws_sdk_s3, RuleMode::MatchAny, [&put_object]), "archive");
        Self {
            devices,
            sink,
            archive,
            batch_get_item,
            batch_execute_statement,
            batch_write_item,
            write_records,
            write_units,
            statements,
            put_object,
        }
    }

    /// Run one batch through the ingest use case on these adapters.
    pub async fn ingest(&self, batch: &[OwnedInbound], now_ms: i64) -> BatchOutcome {
        let inbound: Vec<_> = batch.iter().map(OwnedInbound::borrow).collect();
        let ports = IngestPorts {
            registry: &self.devices,
            sink: &self.sink,
            archive: &self.archive,
            quarantine: &self.archive,
        };
        ingest_batch(ports, &IngestPolicy::default(), now_ms, &inbound).await
    }

    pub fn calls(&self) -> ApiCalls {
        ApiCalls {
            batch_get_item: self.batch_get_item.num_calls(),
            batch_execute_statement: self.batch_execute_statement.num_calls(),
            state_statements: self.statements.load(Ordering::Relaxed),
            batch_write_item: self.batch_write_item.num_calls(),
            write_records: self.write_records.num_calls(),
            timestream_write_units: self.write_units.load(Ordering::Relaxed),
            put_object: self.put_object.num_calls(),
        }
    }
}
