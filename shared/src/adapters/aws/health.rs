//! The Health table (DynamoDB): health counters, the SLO ledger and fleet-health's cursor and
//! report ([`HealthCounters`], [`SloReader`], [`HealthLedger`]); and [`PresenceTables`],
//! which writes a device's presence and its connected gauge in one transaction.
//!
//! | item | pk | sk | attributes |
//! |---|---|---|---|
//! | counters | `m#<minute>`, `h#<hour>`, `gauge` | cohort | `c_<name>` numbers (added with `ADD`), `ttl` (not on gauges) |
//! | ledger row | `l#<cohort>` | minute, 10 digits | `tally` (JSON), `ttl` |
//! | head | `head` | cohort | `minute`, `tally`: the newest row, never expiring |
//! | cursor, report | `meta` | `closed_through`, `report` | `minute`, `json` |
//!
//! Every read is a Query of one partition or a GetItem: fleet-health reads O(cohorts) items a
//! minute, never the fleet.

use std::collections::{BTreeMap, HashMap};

use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::{AttributeValue, Put, PutRequest, TransactWriteItem, Update, WriteRequest};
use futures_util::stream::{self, StreamExt};
use serde::Serialize;

use super::{classify, query_items, DevicesTable, MAX_CONCURRENT_REQUESTS};
use crate::env::{ConfigError, Env};
use crate::error::StoreError;
use crate::health::ledger::HealthReport;
use crate::health::presence::{Place, Presence};
use crate::health::tally::{Bucket, Cohort, HealthDelta, Tally, HOUR_MS, MINUTE_MS};
use crate::model::ThingName;
use crate::ports::{HealthCounters, HealthLedger, LedgerRow, PresenceReader, PresenceStore, SloReader};

type Item = HashMap<String, AttributeValue>;
/// One bucket's counters, by cohort.
type Counts = BTreeMap<Cohort, Tally>;

/// BatchWriteItem's limit.
const BATCH_WRITE_MAX: usize = 25;
/// TransactWriteItems' limit.
const TRANSACT_MAX: usize = 100;
/// Counter buckets live 3 days (fleet-health reads the last 24 hours); ledger rows the SLO
/// window and 2 days (a window's start is at most 28 days back).
const COUNTER_TTL_S: i64 = 3 * 24 * 3600;
const LEDGER_TTL_S: i64 = 30 * 24 * 3600;

#[derive(Clone)]
pub struct HealthTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl HealthTable {
    /// `FLEET_HEALTH_TABLE`.
    pub fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self::new(aws_sdk_dynamodb::Client::new(sdk), env.required("FLEET_HEALTH_TABLE")?))
    }

    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s(sk))])
}

/// A bucket's partition, and when its items expire (epoch seconds; `None`: never).
fn bucket_pk(b: Bucket) -> (String, Option<i64>) {
    match b {
        Bucket::Minute(m) => (format!("m#{m}"), Some(m * MINUTE_MS / 1000 + COUNTER_TTL_S)),
        Bucket::Hour(h) => (format!("h#{h}"), Some(h * HOUR_MS / 1000 + COUNTER_TTL_S)),
        Bucket::Gauge => ("gauge".to_owned(), None),
    }
}

fn minute_sk(minute: i64) -> String {
    format!("{minute:010}")
}

/// `cohort`'s ledger row at `minute` (its cumulative tally, as JSON), kept until
/// [`LEDGER_TTL_S`] after `kept_from` (the minute it is written in: its own when closed, a
/// later one when renewed).
fn ledger_row(cohort: &Cohort, minute: i64, tally_json: String, kept_from: i64) -> Item {
    let mut row = key(format!("l#{cohort}"), minute_sk(minute));
    row.insert("tally".into(), s(tally_json));
    row.insert("ttl".into(), n(kept_from * MINUTE_MS / 1000 + LEDGER_TTL_S));
    row
}

const COUNTER_PREFIX: &str = "c_";

/// The UpdateItem that adds `tally` to a bucket's cohort item.
fn add_update(table: &str, bucket: Bucket, cohort: &Cohort, tally: &Tally) -> Update {
    let (pk, ttl) = bucket_pk(bucket);
    let mut names = HashMap::new();
    let mut values = HashMap::new();
    let mut adds = Vec::new();
    for (i, (name, v)) in tally.0.iter().enumerate() {
        names.insert(format!("#c{i}"), format!("{COUNTER_PREFIX}{name}"));
        values.insert(format!(":c{i}"), n(v));
        adds.push(format!("#c{i} :c{i}"));
    }
    let mut expr = format!("ADD {}", adds.join(", "));
    if let Some(ttl) = ttl {
        names.insert("#ttl".into(), "ttl".into());
        values.insert(":ttl".into(), n(ttl));
        expr.push_str(" SET #ttl = :ttl");
    }
    Update::builder()
        .table_name(table)
        .set_key(Some(key(pk, cohort.to_string())))
        .update_expression(expr)
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .build()
        .expect("table, key and expression are set")
}

fn tally_of(item: &Item) -> Tally {
    let mut t = Tally::default();
    for (k, v) in item {
        if let (Some(name), Ok(v)) = (k.strip_prefix(COUNTER_PREFIX), v.as_n()) {
            // Counters are integers; a value that is not (written by hand) counts as nothing.
            t.add(name, v.parse().unwrap_or(0));
        }
    }
    t
}

fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn parse_tally(op: &'static str, item: &Item) -> Result<Tally, StoreError> {
    let json = get_s(item, "tally").ok_or_else(|| StoreError::permanent(op, "ledger item without tally"))?;
    serde_json::from_str(json).map_err(|e| StoreError::permanent(op, e))
}

fn encode(op: &'static str, v: &impl Serialize) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::permanent(op, e))
}

impl HealthTable {
    async fn get(&self, op: &'static str, key: Item) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        Ok(out.item)
    }

    /// Put every item, 25 per BatchWriteItem, requests in parallel.
    async fn put_all(&self, items: Vec<Item>) -> Result<(), StoreError> {
        let requests: Vec<WriteRequest> = items
            .into_iter()
            .map(|item| {
                let put = PutRequest::builder().set_item(Some(item)).build().expect("item is set");
                WriteRequest::builder().put_request(put).build()
            })
            .collect();
        let chunks: Vec<Vec<WriteRequest>> = requests.chunks(BATCH_WRITE_MAX).map(<[_]>::to_vec).collect();
        let results: Vec<Result<(), StoreError>> = stream::iter(chunks)
            .map(|c| super::batch_write(&self.client, &self.table, c))
            .buffer_unordered(MAX_CONCURRENT_REQUESTS)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn put(&self, op: &'static str, item: Item) -> Result<(), StoreError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map(drop)
            .map_err(|e| classify(op, e))
    }

    async fn head(&self, cohort: &Cohort) -> Result<Option<LedgerRow>, StoreError> {
        const OP: &str = "dynamodb health head";
        let item = self.get(OP, key("head", cohort.to_string())).await?;
        item.map(|i| head_row(OP, &i)).transpose()
    }
}

/// The cohort an item's sort key names (counters, heads).
fn cohort_of(op: &'static str, item: &Item) -> Result<Cohort, StoreError> {
    get_s(item, "sk").unwrap_or_default().parse().map_err(|e| StoreError::permanent(op, e))
}

/// A head item: the newest row and its minute.
fn head_row(op: &'static str, item: &Item) -> Result<LedgerRow, StoreError> {
    let minute = item.get("minute").and_then(|v| v.as_n().ok()).and_then(|m| m.parse().ok());
    let minute = minute.ok_or_else(|| StoreError::permanent(op, "head without minute"))?;
    Ok((minute, parse_tally(op, item)?))
}

impl HealthTable {
    async fn add(&self, update: Update) -> Result<(), StoreError> {
        self.client
            .update_item()
            .table_name(update.table_name)
            .set_key(Some(update.key))
            .update_expression(update.update_expression)
            .set_expression_attribute_names(update.expression_attribute_names)
            .set_expression_attribute_values(update.expression_attribute_values)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("dynamodb health add", e))
    }

    async fn query_bucket(&self, bucket: Bucket) -> Result<(Bucket, BTreeMap<Cohort, Tally>), StoreError> {
        const OP: &str = "dynamodb health buckets";
        let req = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(bucket_pk(bucket).0));
        let rows =
            query_items(req, OP, usize::MAX, |item| Ok(Some((cohort_of(OP, item)?, tally_of(item))))).await?;
        Ok((bucket, rows.into_iter().collect()))
    }
}

impl HealthCounters for HealthTable {
    async fn add_health(&self, delta: &HealthDelta) -> Result<(), StoreError> {
        let updates: Vec<Update> = delta
            .0
            .iter()
            .map(|((bucket, cohort), tally)| add_update(&self.table, *bucket, cohort, tally))
            .collect();
        let results: Vec<Result<(), StoreError>> = stream::iter(updates)
            .map(|u| self.add(u))
            .buffer_unordered(MAX_CONCURRENT_REQUESTS)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

impl SloReader for HealthTable {
    async fn row_at(&self, cohort: &Cohort, minute: i64) -> Result<Option<LedgerRow>, StoreError> {
        const OP: &str = "dynamodb ledger row";
        let req = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND sk <= :sk")
            .expression_attribute_values(":pk", s(format!("l#{cohort}")))
            .expression_attribute_values(":sk", s(minute_sk(minute)))
            .scan_index_forward(false);
        let rows = query_items(req, OP, 1, |item| {
            let m = get_s(item, "sk").and_then(|m| m.parse().ok());
            let m = m.ok_or_else(|| StoreError::permanent(OP, "ledger row without a minute"))?;
            Ok(Some((m, parse_tally(OP, item)?)))
        })
        .await?;
        if let Some(row) = rows.into_iter().next() {
            return Ok(Some(row));
        }
        // Rows expire; a cohort quiet since then still has its head.
        Ok(self.head(cohort).await?.filter(|(m, _)| *m <= minute))
    }

    async fn heads(&self) -> Result<BTreeMap<Cohort, LedgerRow>, StoreError> {
        const OP: &str = "dynamodb health heads";
        let req = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s("head"));
        let rows =
            query_items(req, OP, usize::MAX, |item| Ok(Some((cohort_of(OP, item)?, head_row(OP, item)?))))
                .await?;
        Ok(rows.into_iter().collect())
    }

    async fn latest_health(&self) -> Result<Option<HealthReport>, StoreError> {
        const OP: &str = "dynamodb health report";
        let Some(item) = self.get(OP, key("meta", "report")).await? else { return Ok(None) };
        let json = get_s(&item, "json").ok_or_else(|| StoreError::permanent(OP, "report without json"))?;
        serde_json::from_str(json).map(Some).map_err(|e| StoreError::permanent(OP, e))
    }
}

impl HealthLedger for HealthTable {
    async fn buckets(
        &self,
        buckets: &[Bucket],
    ) -> Result<BTreeMap<Bucket, BTreeMap<Cohort, Tally>>, StoreError> {
        let results: Vec<Result<(Bucket, Counts), StoreError>> = stream::iter(buckets.to_vec())
            .map(|b| self.query_bucket(b))
            .buffer_unordered(MAX_CONCURRENT_REQUESTS)
            .collect()
            .await;
        let mut out = BTreeMap::new();
        for r in results {
            let (b, rows) = r?;
            if !rows.is_empty() {
                out.insert(b, rows);
            }
        }
        Ok(out)
    }

    async fn closed_through(&self) -> Result<Option<i64>, StoreError> {
        let item = self.get("dynamodb health cursor", key("meta", "closed_through")).await?;
        Ok(item.and_then(|i| i.get("minute")?.as_n().ok()?.parse().ok()))
    }

    async fn close_minute(&self, minute: i64, rows: &[(Cohort, Tally)]) -> Result<(), StoreError> {
        const OP: &str = "dynamodb ledger close";
        let mut items = Vec::with_capacity(rows.len() * 2);
        for (cohort, tally) in rows {
            let json = encode(OP, tally)?;
            let mut head = key("head", cohort.to_string());
            head.insert("tally".into(), s(json.clone()));
            head.insert("minute".into(), n(minute));
            items.extend([ledger_row(cohort, minute, json, minute), head]);
        }
        self.put_all(items).await?;
        let mut cursor = key("meta", "closed_through");
        cursor.insert("minute".into(), n(minute));
        self.put(OP, cursor).await
    }

    async fn renew_rows(&self, minute: i64, rows: &[(Cohort, LedgerRow)]) -> Result<(), StoreError> {
        const OP: &str = "dynamodb ledger renew";
        let items = rows
            .iter()
            .map(|(cohort, (at, tally))| Ok(ledger_row(cohort, *at, encode(OP, tally)?, minute)))
            .collect::<Result<Vec<Item>, StoreError>>()?;
        self.put_all(items).await
    }

    async fn put_health(&self, report: &HealthReport) -> Result<(), StoreError> {
        const OP: &str = "dynamodb health report put";
        let mut item = key("meta", "report");
        item.insert("json".into(), s(encode(OP, report)?));
        self.put(OP, item).await
    }
}

/// Presence on the Devices table, with the connected gauge on the Health table: a device's
/// presence and the gauge move in one TransactWriteItems, so the gauge counts exactly the
/// devices whose stored presence says connected.
#[derive(Clone)]
pub struct PresenceTables {
    pub devices: DevicesTable,
    pub health: HealthTable,
}

impl PresenceReader for PresenceTables {
    async fn presence(&self, thing: &ThingName) -> Result<Option<Presence>, StoreError> {
        self.devices.presence_item(thing).await
    }

    async fn presence_page(
        &self,
        after: Option<&ThingName>,
        limit: usize,
    ) -> Result<crate::ports::PresencePage, StoreError> {
        self.devices.presence_scan(after, limit).await
    }
}

impl PresenceStore for PresenceTables {
    async fn put_presence(
        &self,
        thing: &ThingName,
        next: &Presence,
        expected: Option<&Place>,
        counts: &HealthDelta,
    ) -> Result<bool, StoreError> {
        const OP: &str = "dynamodb presence put";
        let mut items = Vec::with_capacity(1 + counts.0.len());
        let put: Put = self.devices.presence_put(thing, next, expected)?;
        items.push(TransactWriteItem::builder().put(put).build());
        for ((bucket, cohort), tally) in &counts.0 {
            let update = add_update(&self.health.table, *bucket, cohort, tally);
            items.push(TransactWriteItem::builder().update(update).build());
        }
        if items.len() > TRANSACT_MAX {
            return Err(StoreError::permanent(OP, format!("{} items in one transaction", items.len())));
        }
        match self.devices.client().transact_write_items().set_transact_items(Some(items)).send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError as T;
                let reasons: Vec<String> = match e.as_service_error() {
                    Some(T::TransactionCanceledException(t)) => {
                        t.cancellation_reasons().iter().filter_map(|r| r.code().map(str::to_owned)).collect()
                    }
                    _ => Vec::new(),
                };
                // Cancelled because the presence's condition failed: it changed meanwhile.
                if reasons.first().map(String::as_str) == Some("ConditionalCheckFailed") {
                    return Ok(false);
                }
                // Another transaction on the shared gauge item, or throttling: retry later.
                const BUSY: [&str; 4] = [
                    "TransactionConflict",
                    "ThrottlingError",
                    "ProvisionedThroughputExceeded",
                    "RequestLimitExceeded",
                ];
                if reasons.iter().any(|r| BUSY.contains(&r.as_str())) {
                    return Err(StoreError::transient(OP, format!("transaction cancelled: {reasons:?}")));
                }
                Err(classify(OP, e))
            }
        }
    }
}
