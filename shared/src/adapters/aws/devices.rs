//! Devices table (DynamoDB). One partition per thing, these items in it (and `cert`, `presence`):
//! - `item = "registration"`: what an operator registered; replaced whole (BatchWriteItem).
//! - `item = "state"`: what telemetry last said; written only forward in time (`last_ts_ms`),
//!   so out-of-order batches cannot rewind it and concurrent invocations cannot race it
//!   backwards. Written with PartiQL in BatchExecuteStatement, 25 devices per request, each
//!   statement with its own condition and its own answer (see [`StateStep`]).
//! - `item = "arrival#<boot>#<seq>"`: a skew-corrected message's first arrival, inserted once
//!   (see [`arrival_statement`]) and expired by the table's TTL.
//! - `item = "cert"`: the daily expiry check's mark. A mark due a rotation also carries
//!   `rotation_queue = "due"`, the partition key of the sparse index [`ROTATION_DUE_INDEX`]
//!   (sort key `thing`, projecting `mark`): a rotation's stage reads what is due by a Query of
//!   it and those devices by key, never the whole table.
//!
//! The ingest function keeps the registrations it read for a while ([`RegistrationCache`]):
//! its batches then read only their devices' state items.
//!
//! Items map to and from Rust structs with `serde_dynamo`, except the registration and state
//! items every ingest batch reads for each of its devices, which are decoded by hand
//! ([`devices_from`]): serde_dynamo first copies an item into a map of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{
    AttributeValue, BatchStatementErrorCodeEnum as Code, BatchStatementRequest, BatchStatementResponse,
    DeleteRequest, KeysAndAttributes, PutRequest, WriteRequest,
};
use futures_util::stream::{self, StreamExt};
use serde::Serialize;

use super::{batch_backoff, classify, MAX_CONCURRENT_REQUESTS};
use crate::env::{ConfigError, Env};
use crate::error::{ErrorKind, StoreError};
use crate::model::{Device, DeviceRegistration, DeviceState, MessageId, ThingName};
use crate::ports::{DeviceAdmin, DeviceRegistry, ARRIVAL_PIN_DAYS};

/// BatchGetItem: at most 100 keys per request.
pub const BATCH_GET_MAX_KEYS: usize = 100;
/// BatchWriteItem: at most 25 items per request.
pub const BATCH_WRITE_MAX_ITEMS: usize = 25;
/// BatchExecuteStatement: at most 25 statements per request.
pub const BATCH_STATEMENT_MAX: usize = 25;

/// The sparse index of the marks due a rotation (the template's `by_rotation_due`).
pub const ROTATION_DUE_INDEX: &str = "by_rotation_due";
/// Its partition key, present only on the marks due, always with the value [`DUE`].
pub const ROTATION_QUEUE: &str = "rotation_queue";
const DUE: &str = "due";

const PK: &str = "thing";
const SK: &str = "item";
const REGISTRATION: &str = "registration";
const STATE: &str = "state";

type Item = HashMap<String, AttributeValue>;

/// The Devices table, on its own client.
#[derive(Clone, Debug)]
pub struct DevicesTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
    registrations: Option<Arc<RegistrationCache>>,
}

impl DevicesTable {
    /// Reads `FLEET_DEVICES_TABLE`.
    pub fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self::new(aws_sdk_dynamodb::Client::new(sdk), env.required("FLEET_DEVICES_TABLE")?))
    }

    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into(), registrations: None }
    }

    /// The same table, keeping each registration [`DeviceRegistry::get_many`] reads for `ttl`
    /// (see [`RegistrationCache`]); a zero `ttl` keeps none.
    pub fn caching_registrations(self, ttl: Duration) -> Self {
        let registrations = (!ttl.is_zero()).then(|| Arc::new(RegistrationCache::new(ttl)));
        Self { registrations, ..self }
    }
}

/// Registrations read recently, so that a warm ingest function's batches read only their
/// devices' state items: half the keys, half the items to decode, and half the read units.
/// A registration changed meanwhile (a re-registration, a removal) reaches ingest within the
/// time to live: until then readings are enriched with the one read before. (A redelivered
/// message enriched that way after another instance stored it with the newer registration
/// is refused by Timestream with the higher version, and retried: the SQS visibility timeout
/// is longer than the time to live.) Only found registrations are kept: a device registered a
/// moment ago is found by the next batch. Registering through the same table drops the
/// devices' entries at once, and what a read in flight found is then not kept.
#[derive(Debug)]
pub struct RegistrationCache {
    ttl: Duration,
    state: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    by_thing: HashMap<ThingName, (DeviceRegistration, Instant)>,
    /// Bumped by every [`RegistrationCache::forget`]: a read that started before it does not
    /// keep what it found (it may be the registration just replaced).
    generation: u64,
}

/// At most this many registrations are kept: past it the expired ones are dropped, and if that
/// is not enough, all of them.
pub const REGISTRATION_CACHE_MAX: usize = 100_000;
/// How long the ingest function keeps a registration unless `FLEET_REGISTRATION_CACHE_S` says.
pub const REGISTRATION_CACHE_TTL: Duration = Duration::from_secs(60);

/// `FLEET_REGISTRATION_CACHE_S`: how long the ingest function keeps the registrations it read
/// ([`REGISTRATION_CACHE_TTL`] when unset; 0 keeps none).
pub fn registration_cache_ttl(env: &Env) -> Result<Duration, ConfigError> {
    const VAR: &str = "FLEET_REGISTRATION_CACHE_S";
    match env.optional(VAR) {
        None => Ok(REGISTRATION_CACHE_TTL),
        Some(v) => v.parse::<u64>().map(Duration::from_secs).map_err(|_| ConfigError::Invalid {
            var: VAR,
            value: v,
            expected: "a whole number of seconds (0: keep none)",
        }),
    }
}

impl RegistrationCache {
    fn new(ttl: Duration) -> Self {
        Self { ttl, state: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Each of `things`' registration read less than the time to live ago (or `None`), and the
    /// generation to hand back to [`Self::found`].
    fn fresh(&self, things: &[ThingName], now: Instant) -> (Vec<Option<DeviceRegistration>>, u64) {
        let entries = self.lock();
        let fresh = things
            .iter()
            .map(|t| {
                entries
                    .by_thing
                    .get(t)
                    .filter(|(_, read)| now.saturating_duration_since(*read) < self.ttl)
                    .map(|(r, _)| r.clone())
            })
            .collect();
        (fresh, entries.generation)
    }

    /// What a read of `things` that started at `now` (in `generation`) found: their
    /// registrations are kept from `now`, and the things found without one are forgotten.
    /// Nothing is kept if a registration was written meanwhile.
    fn found(
        &self,
        things: &[&ThingName],
        devices: &HashMap<ThingName, Device>,
        now: Instant,
        generation: u64,
    ) {
        let mut entries = self.lock();
        if entries.generation != generation {
            return;
        }
        if entries.by_thing.len() + things.len() > REGISTRATION_CACHE_MAX {
            entries.by_thing.retain(|_, (_, read)| now.saturating_duration_since(*read) < self.ttl);
            if entries.by_thing.len() + things.len() > REGISTRATION_CACHE_MAX {
                entries.by_thing.clear();
            }
        }
        for &thing in things {
            match devices.get(thing).and_then(|d| d.registration.as_ref()) {
                Some(r) => {
                    entries.by_thing.insert(thing.clone(), (r.clone(), now));
                }
                None => {
                    entries.by_thing.remove(thing);
                }
            }
        }
    }

    fn forget<'a>(&self, things: impl IntoIterator<Item = &'a ThingName>) {
        let mut entries = self.lock();
        entries.generation += 1;
        for thing in things {
            entries.by_thing.remove(thing);
        }
    }
}

fn key(thing: &str, item: &str) -> Item {
    HashMap::from([
        (PK.to_owned(), AttributeValue::S(thing.to_owned())),
        (SK.to_owned(), AttributeValue::S(item.to_owned())),
    ])
}

fn num(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The registration item as stored (read back by [`Attributes::registration`]).
#[derive(Debug, Serialize)]
struct RegistrationItem {
    thing: String,
    item: String,
    class: String,
    #[serde(default)]
    region: String,
    #[serde(default)]
    fw: String,
    #[serde(default)]
    registered_at_ms: i64,
}

/// An item's attributes, taken by name with the type they must have. A missing or NULL
/// attribute is `None`; one of another type, or a number that does not fit, is an error.
struct Attributes(Item);

impl Attributes {
    fn text(&mut self, name: &str) -> Result<Option<String>, String> {
        match self.0.remove(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::S(s)) => Ok(Some(s)),
            Some(other) => Err(format!("{name} is not a string: {other:?}")),
        }
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        match self.0.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::N(n)) => {
                n.parse().map(Some).map_err(|_| format!("{name} = {n} is out of range"))
            }
            Some(other) => Err(format!("{name} is not a number: {other:?}")),
        }
    }

    /// The registration item as stored (see [`RegistrationItem`]).
    fn registration(mut self) -> Result<DeviceRegistration, String> {
        Ok(DeviceRegistration {
            class: self.text("class")?.ok_or("no class")?,
            region: self.text("region")?.unwrap_or_default(),
            fw: self.text("fw")?.unwrap_or_default(),
            registered_at_ms: self.number("registered_at_ms")?.unwrap_or_default(),
        })
    }

    /// The state item as stored (written by the statements of [`state_statement`]).
    fn state(mut self) -> Result<DeviceState, String> {
        let last_ts_ms = self.number("last_ts_ms")?.ok_or("no last_ts_ms")?;
        Ok(DeviceState {
            last_ts_ms,
            last_rx_ms: self.number("last_rx_ms")?.unwrap_or(last_ts_ms),
            boot: self.number("boot")?.unwrap_or_default(),
            seq: self.number("seq")?.unwrap_or_default(),
            battery_pct: self.number("battery_pct")?,
            fw: self.text("fw_reported")?,
        })
    }
}

pub(super) fn registration_item(thing: &ThingName, r: &DeviceRegistration) -> Result<Item, StoreError> {
    let item = RegistrationItem {
        thing: thing.as_str().to_owned(),
        item: REGISTRATION.to_owned(),
        class: r.class.clone(),
        region: r.region.clone(),
        fw: r.fw.clone(),
        registered_at_ms: r.registered_at_ms,
    };
    serde_dynamo::to_item(item).map_err(|e| StoreError::permanent("dynamodb registration encode", e))
}

/// Fold the items of many partitions into devices. Items that do not decode are skipped
/// (logged): one corrupt item must not hide the rest of the fleet.
pub(super) fn devices_from(items: impl IntoIterator<Item = Item>) -> HashMap<ThingName, Device> {
    let mut out: HashMap<ThingName, Device> = HashMap::new();
    for item in items {
        let mut item = Attributes(item);
        let (Ok(Some(thing)), Ok(Some(kind))) = (item.text(PK), item.text(SK)) else { continue };
        let Ok(thing) = ThingName::parse(&thing) else { continue };
        let d = out.entry(thing).or_insert_with_key(|t| Device {
            thing: t.clone(),
            registration: None,
            state: None,
        });
        match kind.as_str() {
            REGISTRATION => match item.registration() {
                Ok(r) => d.registration = Some(r),
                Err(e) => tracing::warn!(thing = %d.thing, error = %e, "registration item skipped"),
            },
            STATE => match item.state() {
                Ok(s) => d.state = Some(s),
                Err(e) => tracing::warn!(thing = %d.thing, error = %e, "state item skipped"),
            },
            _ => {}
        }
    }
    // Only a device's other items (`cert`, `presence`: a console or claim client's connects)
    // do not make a device.
    out.retain(|_, d| d.registration.is_some() || d.state.is_some());
    out
}

impl DevicesTable {
    /// BatchGetItem of `keys` (≤ 100), resubmitting UnprocessedKeys with backoff.
    async fn batch_get(&self, keys: Vec<Item>, consistent: bool) -> Result<Vec<Item>, StoreError> {
        let table = self.table.clone();
        let mut pending = KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .set_consistent_read(consistent.then_some(true))
            .build()
            .map_err(|e| StoreError::permanent("dynamodb batch get", e))?;
        let mut items = Vec::new();
        let mut delays = batch_backoff();
        loop {
            let out = self
                .client
                .batch_get_item()
                .request_items(&table, pending)
                .send()
                .await
                .map_err(|e| classify("dynamodb batch get", e))?;
            if let Some(mut responses) = out.responses {
                items.extend(responses.remove(&table).unwrap_or_default());
            }
            match out.unprocessed_keys.and_then(|mut u| u.remove(&table)).filter(|k| !k.keys.is_empty()) {
                None => return Ok(items),
                Some(rest) => {
                    pending = rest;
                    let Some(delay) = delays.next() else {
                        return Err(StoreError::transient(
                            "dynamodb batch get",
                            "unprocessed keys remained after retries",
                        ));
                    };
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// BatchWriteItem of `requests` (≤ 25), resubmitting UnprocessedItems with backoff.
    async fn batch_write(&self, requests: Vec<WriteRequest>) -> Result<(), StoreError> {
        super::batch_write(&self.client, &self.table, requests).await
    }
}

/// The statement a state write runs next. PartiQL's UPDATE applies only to an existing item
/// (it answers ConditionalCheckFailed when the WHERE clause matches nothing) and INSERT only
/// when there is none (DuplicateItem), so "write unless a newer state is stored" is at most
/// three statements, and in the steady state (the device has an older state) one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateStep {
    /// `UPDATE … WHERE thing AND item = 'state' AND last_ts_ms < new`.
    Update,
    /// The update matched nothing, so the item is missing or newer: `INSERT`.
    Insert,
    /// The insert found an item (newer, or created meanwhile): `UPDATE` once more. Failing the
    /// condition now means a newer state is stored: nothing to do, by design.
    UpdateAgain,
}

/// What DynamoDB answered to one statement.
#[derive(Debug)]
enum StatementAnswer {
    Applied,
    ConditionFailed,
    Duplicate,
    Failed(StoreError),
}

/// The state item's attributes, as (name, value).
fn state_attributes(s: &DeviceState) -> Vec<(&'static str, AttributeValue)> {
    let mut attrs = vec![
        ("last_ts_ms", num(s.last_ts_ms)),
        ("last_rx_ms", num(s.last_rx_ms)),
        ("boot", num(s.boot)),
        ("seq", num(s.seq)),
    ];
    if let Some(b) = s.battery_pct {
        attrs.push(("battery_pct", num(b)));
    }
    if let Some(fw) = &s.fw {
        attrs.push(("fw_reported", AttributeValue::S(fw.clone())));
    }
    attrs
}

/// The PartiQL statement and its parameters for one step of one device's state write.
/// Attribute and table names are quoted identifiers; values are always parameters.
pub fn state_statement(
    table: &str,
    thing: &ThingName,
    s: &DeviceState,
    step: StateStep,
) -> (String, Vec<AttributeValue>) {
    let attrs = state_attributes(s);
    let thing = AttributeValue::S(thing.as_str().to_owned());
    match step {
        StateStep::Update | StateStep::UpdateAgain => {
            // Appended piece by piece (no formatting): this runs for each device of each batch.
            let mut statement = String::with_capacity(160 + table.len());
            statement.extend(["UPDATE \"", table, "\""]);
            for (name, _) in &attrs {
                statement.extend([" SET \"", name, "\" = ?"]);
            }
            statement.extend([
                " WHERE \"",
                PK,
                "\" = ? AND \"",
                SK,
                "\" = '",
                STATE,
                "' AND \"last_ts_ms\" < ?",
            ]);
            let mut params: Vec<AttributeValue> = attrs.into_iter().map(|(_, v)| v).collect();
            params.extend([thing, num(s.last_ts_ms)]);
            (statement, params)
        }
        StateStep::Insert => {
            let fields: String = attrs.iter().map(|(name, _)| format!(", '{name}': ?")).collect();
            let statement = format!("INSERT INTO \"{table}\" VALUE {{'{PK}': ?, '{SK}': '{STATE}'{fields}}}");
            let params = std::iter::once(thing).chain(attrs.into_iter().map(|(_, v)| v)).collect();
            (statement, params)
        }
    }
}

const STATE_WRITE: &str = "dynamodb state write";

/// A skew-corrected message's first arrival ([`DeviceRegistry::first_arrivals`]): the item
/// `arrival#<boot>#<seq>` in its device's partition, `rx_ms`, expiring (`ttl`, epoch seconds)
/// [`ARRIVAL_PIN_DAYS`] after that arrival.
const ARRIVAL: &str = "arrival#";
const ARRIVAL_PIN: &str = "dynamodb arrival pin";

fn arrival_item(id: &MessageId) -> String {
    format!("{ARRIVAL}{}#{}", id.boot, id.seq)
}

/// The INSERT that pins one message's first arrival; DuplicateItem means it is pinned already.
pub fn arrival_statement(table: &str, id: &MessageId, rx_ms: i64) -> (String, Vec<AttributeValue>) {
    let ttl = rx_ms.div_euclid(1000) + ARRIVAL_PIN_DAYS * 86_400;
    let statement = format!("INSERT INTO \"{table}\" VALUE {{'{PK}': ?, '{SK}': ?, 'rx_ms': ?, 'ttl': ?}}");
    let params = vec![
        AttributeValue::S(id.thing.as_str().to_owned()),
        AttributeValue::S(arrival_item(id)),
        num(rx_ms),
        num(ttl),
    ];
    (statement, params)
}

impl StatementAnswer {
    fn from_response(r: &BatchStatementResponse, op: &'static str) -> Self {
        let Some(e) = r.error() else { return StatementAnswer::Applied };
        let detail =
            || format!("{}: {}", e.code().map_or("unknown", Code::as_str), e.message().unwrap_or(""));
        match e.code() {
            Some(Code::ConditionalCheckFailed) => StatementAnswer::ConditionFailed,
            Some(Code::DuplicateItem) => StatementAnswer::Duplicate,
            Some(
                Code::ThrottlingError
                | Code::ProvisionedThroughputExceeded
                | Code::RequestLimitExceeded
                | Code::InternalServerError
                | Code::TransactionConflict,
            ) => StatementAnswer::Failed(StoreError::transient(op, detail())),
            _ => StatementAnswer::Failed(StoreError::permanent(op, detail())),
        }
    }
}

impl DevicesTable {
    /// One BatchExecuteStatement (≤ 25 statements): one answer per statement, in order. A
    /// request that fails as a whole fails each of its statements with the same kind.
    async fn execute_batch(
        &self,
        statements: Vec<(String, Vec<AttributeValue>)>,
        op: &'static str,
    ) -> Vec<StatementAnswer> {
        let n = statements.len();
        let requests: Result<Vec<BatchStatementRequest>, _> = statements
            .into_iter()
            .map(|(statement, params)| {
                BatchStatementRequest::builder().statement(statement).set_parameters(Some(params)).build()
            })
            .collect();
        let sent = match requests {
            Ok(requests) => self
                .client
                .batch_execute_statement()
                .set_statements(Some(requests))
                .send()
                .await
                .map_err(|e| classify(op, e)),
            Err(e) => Err(StoreError::permanent(op, e)),
        };
        match sent {
            Ok(out) => {
                let responses = out.responses();
                (0..n)
                    .map(|i| match responses.get(i) {
                        Some(r) => StatementAnswer::from_response(r, op),
                        None => {
                            StatementAnswer::Failed(StoreError::transient(op, "no answer for the statement"))
                        }
                    })
                    .collect()
            }
            Err(e) => {
                let (kind, why) = (e.kind, DisplayErrorContext(e.source.as_ref()).to_string());
                (0..n).map(|_| StatementAnswer::Failed(StoreError::new(op, kind, why.clone()))).collect()
            }
        }
    }
}

impl DevicesTable {
    /// `statements` in BatchExecuteStatement requests of 25 (a few at a time): one answer per
    /// statement, in order.
    async fn execute_all(
        &self,
        mut statements: Vec<(String, Vec<AttributeValue>)>,
        op: &'static str,
    ) -> Vec<StatementAnswer> {
        let mut requests = Vec::new();
        while !statements.is_empty() {
            let rest = statements.split_off(statements.len().min(BATCH_STATEMENT_MAX));
            requests.push(self.execute_batch(std::mem::replace(&mut statements, rest), op));
        }
        let answers: Vec<Vec<StatementAnswer>> =
            stream::iter(requests).buffered(MAX_CONCURRENT_REQUESTS).collect().await;
        answers.into_iter().flatten().collect()
    }
}

impl DeviceRegistry for DevicesTable {
    async fn get_many(&self, things: &[ThingName]) -> Result<HashMap<ThingName, Device>, StoreError> {
        let now = Instant::now();
        let (cached, generation) = match &self.registrations {
            Some(cache) => cache.fresh(things, now),
            None => (vec![None; things.len()], 0),
        };
        let mut keys = things.iter().zip(&cached).flat_map(|(t, cached)| {
            let registration = cached.is_none().then(|| key(t.as_str(), REGISTRATION));
            registration.into_iter().chain([key(t.as_str(), STATE)])
        });
        let chunks: Vec<Vec<Item>> = std::iter::from_fn(|| {
            let chunk: Vec<Item> = keys.by_ref().take(BATCH_GET_MAX_KEYS).collect();
            (!chunk.is_empty()).then_some(chunk)
        })
        .collect();
        let results: Vec<Result<Vec<Item>, StoreError>> = stream::iter(chunks)
            .map(|chunk| self.batch_get(chunk, false))
            .buffer_unordered(MAX_CONCURRENT_REQUESTS)
            .collect()
            .await;
        let mut items = Vec::with_capacity(things.len() * 2);
        for r in results {
            items.extend(r?);
        }
        let mut devices = devices_from(items);
        if let Some(cache) = &self.registrations {
            let read: Vec<&ThingName> =
                things.iter().zip(&cached).filter(|(_, c)| c.is_none()).map(|(t, _)| t).collect();
            cache.found(&read, &devices, now, generation);
            for (thing, registration) in things.iter().zip(cached) {
                if let Some(registration) = registration {
                    devices
                        .entry(thing.clone())
                        .or_insert_with(|| Device { thing: thing.clone(), registration: None, state: None })
                        .registration = Some(registration);
                }
            }
        }
        Ok(devices)
    }

    async fn record_states(&self, states: &[(ThingName, DeviceState)]) -> Vec<(ThingName, StoreError)> {
        let mut pending: Vec<(usize, StateStep)> =
            (0..states.len()).map(|i| (i, StateStep::Update)).collect();
        let mut failed = Vec::new();
        let mut delays = batch_backoff();
        while !pending.is_empty() {
            let statements = pending
                .iter()
                .map(|&(i, step)| state_statement(&self.table, &states[i].0, &states[i].1, step))
                .collect();
            let answers = self.execute_all(statements, STATE_WRITE).await;
            let mut next = Vec::new();
            let mut retry = Vec::new();
            for ((i, step), answer) in pending.into_iter().zip(answers) {
                match (step, answer) {
                    (_, StatementAnswer::Applied)
                    | (StateStep::UpdateAgain, StatementAnswer::ConditionFailed) => {}
                    (StateStep::Update, StatementAnswer::ConditionFailed) => {
                        next.push((i, StateStep::Insert))
                    }
                    (StateStep::Insert, StatementAnswer::Duplicate) => next.push((i, StateStep::UpdateAgain)),
                    (_, StatementAnswer::Failed(e)) if e.kind == ErrorKind::Transient => {
                        retry.push((i, step, e))
                    }
                    (_, StatementAnswer::Failed(e)) => failed.push((states[i].0.clone(), e)),
                    (step, answer) => failed.push((
                        states[i].0.clone(),
                        StoreError::permanent(STATE_WRITE, format!("unexpected {answer:?} to {step:?}")),
                    )),
                }
            }
            if !retry.is_empty() {
                match delays.next() {
                    Some(delay) => {
                        tokio::time::sleep(delay).await;
                        next.extend(retry.into_iter().map(|(i, step, _)| (i, step)));
                    }
                    None => failed.extend(retry.into_iter().map(|(i, _, e)| (states[i].0.clone(), e))),
                }
            }
            pending = next;
        }
        failed
    }

    async fn first_arrivals(&self, arrivals: &[(MessageId, i64)]) -> Vec<Result<i64, StoreError>> {
        let mut out: Vec<Option<Result<i64, StoreError>>> = arrivals.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..arrivals.len()).collect();
        let mut pinned_before: Vec<usize> = Vec::new();
        let mut delays = batch_backoff();
        while !pending.is_empty() {
            let statements = pending
                .iter()
                .map(|&i| arrival_statement(&self.table, &arrivals[i].0, arrivals[i].1))
                .collect();
            let answers = self.execute_all(statements, ARRIVAL_PIN).await;
            let mut retry = Vec::new();
            for (i, answer) in std::mem::take(&mut pending).into_iter().zip(answers) {
                match answer {
                    StatementAnswer::Applied => out[i] = Some(Ok(arrivals[i].1)),
                    StatementAnswer::Duplicate => pinned_before.push(i),
                    StatementAnswer::Failed(e) if e.kind == ErrorKind::Transient => retry.push((i, e)),
                    StatementAnswer::Failed(e) => out[i] = Some(Err(e)),
                    StatementAnswer::ConditionFailed => {
                        out[i] = Some(Err(StoreError::permanent(
                            ARRIVAL_PIN,
                            "ConditionalCheckFailed to an INSERT",
                        )))
                    }
                }
            }
            if !retry.is_empty() {
                match delays.next() {
                    Some(delay) => {
                        tokio::time::sleep(delay).await;
                        pending = retry.into_iter().map(|(i, _)| i).collect();
                    }
                    None => retry.into_iter().for_each(|(i, e)| out[i] = Some(Err(e))),
                }
            }
        }
        let ids: Vec<&MessageId> = pinned_before.iter().map(|&i| &arrivals[i].0).collect();
        for (i, pinned) in pinned_before.iter().zip(self.read_arrivals(&ids).await) {
            out[*i] = Some(pinned);
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(StoreError::transient(ARRIVAL_PIN, "no answer"))))
            .collect()
    }
}

impl DevicesTable {
    /// The pins of `ids`, read consistently (a concurrent copy may have pinned a moment ago):
    /// each arrival, or the error for it (transient when a pin is not there: it expired and
    /// was removed between the insert and this read; the message is retried).
    async fn read_arrivals(&self, ids: &[&MessageId]) -> Vec<Result<i64, StoreError>> {
        let chunks: Vec<&[&MessageId]> = ids.chunks(BATCH_GET_MAX_KEYS).collect();
        let keys: Vec<Vec<Item>> = chunks
            .iter()
            .map(|chunk| chunk.iter().map(|id| key(id.thing.as_str(), &arrival_item(id))).collect())
            .collect();
        let results: Vec<Result<Vec<Item>, StoreError>> = stream::iter(keys)
            .map(|keys| self.batch_get(keys, true))
            .buffered(MAX_CONCURRENT_REQUESTS)
            .collect()
            .await;
        let mut out = Vec::with_capacity(ids.len());
        for (chunk, result) in chunks.into_iter().zip(results) {
            match result {
                Ok(items) => {
                    let pins: HashMap<(&str, &str), i64> = items
                        .iter()
                        .filter_map(|item| {
                            let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok());
                            let rx =
                                item.get("rx_ms").and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok());
                            Some(((text(PK)?.as_str(), text(SK)?.as_str()), rx?))
                        })
                        .collect();
                    out.extend(chunk.iter().map(|id| {
                        let item = arrival_item(id);
                        pins.get(&(id.thing.as_str(), item.as_str())).copied().ok_or_else(|| {
                            StoreError::transient(
                                ARRIVAL_PIN,
                                format!("{} {item}: pinned, then not found", id.thing),
                            )
                        })
                    }));
                }
                Err(e) => {
                    let (kind, why) = (e.kind, DisplayErrorContext(e.source.as_ref()).to_string());
                    out.extend(chunk.iter().map(|_| Err(StoreError::new(ARRIVAL_PIN, kind, why.clone()))));
                }
            }
        }
        out
    }
}

impl DevicesTable {
    async fn write_registrations(
        &self,
        devices: &[(ThingName, DeviceRegistration)],
    ) -> Result<(), StoreError> {
        for chunk in devices.chunks(BATCH_WRITE_MAX_ITEMS) {
            let requests = chunk
                .iter()
                .map(|(t, r)| {
                    let put = PutRequest::builder()
                        .set_item(Some(registration_item(t, r)?))
                        .build()
                        .map_err(|e| StoreError::permanent("dynamodb register", e))?;
                    Ok(WriteRequest::builder().put_request(put).build())
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            self.batch_write(requests).await?;
        }
        Ok(())
    }
}

impl DeviceAdmin for DevicesTable {
    async fn register(&self, devices: &[(ThingName, DeviceRegistration)]) -> Result<(), StoreError> {
        let written = self.write_registrations(devices).await;
        if let Some(cache) = &self.registrations {
            cache.forget(devices.iter().map(|(t, _)| t));
        }
        written
    }

    async fn device(&self, thing: &ThingName) -> Result<Option<Device>, StoreError> {
        let items = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("#pk = :t")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":t", AttributeValue::S(thing.as_str().to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("dynamodb device query", e))?
            .items
            .unwrap_or_default();
        Ok(devices_from(items).remove(thing))
    }

    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        let mut pages = self.client.scan().table_name(&self.table).into_paginator().send();
        let mut items = Vec::new();
        while let Some(page) = pages.next().await {
            items.extend(page.map_err(|e| classify("dynamodb devices scan", e))?.items.unwrap_or_default());
        }
        let mut devices: Vec<Device> = devices_from(items).into_values().collect();
        devices.sort_by(|a, b| a.thing.cmp(&b.thing));
        Ok(devices)
    }

    /// BatchGetItem of their `registration` and `state` items, 50 devices per request (each
    /// thing once: DynamoDB refuses a request naming a key twice).
    async fn devices_among(&self, things: &[ThingName]) -> Result<Vec<Device>, StoreError> {
        let mut things = things.to_vec();
        things.sort_unstable();
        things.dedup();
        let mut devices: Vec<Device> = self.get_many(&things).await?.into_values().collect();
        devices.sort_by(|a, b| a.thing.cmp(&b.thing));
        Ok(devices)
    }
}

/// The `cert` item of a device: what the daily expiry check said about its certificate.
const CERT: &str = "cert";

impl crate::ports::DeviceCertStatus for DevicesTable {
    async fn mark_cert_status(
        &self,
        marks: &[(ThingName, crate::ports::CertMark)],
    ) -> Result<(), StoreError> {
        let op = "dynamodb cert status";
        for chunk in marks.chunks(BATCH_WRITE_MAX_ITEMS) {
            let requests = chunk
                .iter()
                .map(|(t, m)| {
                    let mut item = key(t.as_str(), CERT);
                    let json = serde_json::to_string(m).map_err(|e| StoreError::permanent(op, e))?;
                    item.insert("mark".into(), AttributeValue::S(json));
                    item.insert("cert_status".into(), AttributeValue::S(m.class.as_str().to_owned()));
                    item.insert("rotation_due".into(), AttributeValue::Bool(m.rotation_due));
                    if m.rotation_due {
                        item.insert(ROTATION_QUEUE.into(), AttributeValue::S(DUE.to_owned()));
                    }
                    let put = PutRequest::builder()
                        .set_item(Some(item))
                        .build()
                        .map_err(|e| StoreError::permanent(op, e))?;
                    Ok(WriteRequest::builder().put_request(put).build())
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            self.batch_write(requests).await?;
        }
        Ok(())
    }

    async fn clear_cert_status(&self, things: &[ThingName]) -> Result<(), StoreError> {
        let op = "dynamodb cert status clear";
        for chunk in things.chunks(BATCH_WRITE_MAX_ITEMS) {
            let requests = chunk
                .iter()
                .map(|t| {
                    let delete = DeleteRequest::builder()
                        .set_key(Some(key(t.as_str(), CERT)))
                        .build()
                        .map_err(|e| StoreError::permanent(op, e))?;
                    Ok(WriteRequest::builder().delete_request(delete).build())
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            self.batch_write(requests).await?;
        }
        Ok(())
    }
}

/// A device item's thing and its JSON attribute `attribute`, read; `None` if it lacks either.
fn thing_and_json<T: serde::de::DeserializeOwned>(
    op: &'static str,
    item: &Item,
    attribute: &str,
) -> Result<Option<(ThingName, T)>, StoreError> {
    let thing = item.get(PK).and_then(|v| v.as_s().ok());
    let json = item.get(attribute).and_then(|v| v.as_s().ok());
    let (Some(thing), Some(json)) = (thing, json) else { return Ok(None) };
    let thing = ThingName::parse(thing).map_err(|e| StoreError::permanent(op, e))?;
    Ok(Some((thing, serde_json::from_str(json).map_err(|e| StoreError::permanent(op, e))?)))
}

impl DevicesTable {
    /// The marks due in the sparse index [`ROTATION_DUE_INDEX`] (a Query), by thing.
    async fn marks_indexed(&self) -> Result<Vec<(ThingName, crate::ports::CertMark)>, StoreError> {
        let op = "dynamodb cert status due";
        let req = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(ROTATION_DUE_INDEX)
            .key_condition_expression("#q = :due")
            .expression_attribute_names("#q", ROTATION_QUEUE)
            .expression_attribute_values(":due", AttributeValue::S(DUE.to_owned()));
        super::query_items(req, op, usize::MAX, |item| thing_and_json(op, item, "mark")).await
    }

    /// The marks due anywhere in the table (a Scan, filtered after it is read): also those
    /// written before the index existed.
    async fn marks_scanned(&self) -> Result<Vec<(ThingName, crate::ports::CertMark)>, StoreError> {
        let op = "dynamodb cert status due scan";
        let mut pages = self
            .client
            .scan()
            .table_name(&self.table)
            .filter_expression("#i = :c AND rotation_due = :due")
            .expression_attribute_names("#i", SK)
            .expression_attribute_values(":c", AttributeValue::S(CERT.to_owned()))
            .expression_attribute_values(":due", AttributeValue::Bool(true))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            for item in page.map_err(|e| classify(op, e))?.items() {
                out.extend(thing_and_json(op, item, "mark")?);
            }
        }
        Ok(out)
    }
}

impl crate::ports::CertMarks for DevicesTable {
    /// A Query of the sparse index [`ROTATION_DUE_INDEX`]: it holds the marks due and nothing
    /// else, so it reads what is due, however large the fleet. When it holds none, the table is
    /// scanned once for marks due written before the index existed (the daily check adds each
    /// to the index when it marks its device again): a deploy cannot make a running rotation
    /// find nobody due and complete. So a stage start that finds somebody due reads only them;
    /// one that finds nobody (a rotation about to pause or complete) costs a Scan.
    async fn rotation_due(&self) -> Result<Vec<(ThingName, crate::ports::CertMark)>, StoreError> {
        let mut out = self.marks_indexed().await?;
        if out.is_empty() {
            out = self.marks_scanned().await?;
            if !out.is_empty() {
                tracing::warn!(
                    marks = out.len(),
                    "marks due found by a Scan, none in by_rotation_due: written before the index existed; \
                     the daily expiry check adds them when it marks their devices again"
                );
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn cert_status(&self, thing: &ThingName) -> Result<Option<crate::ports::CertMark>, StoreError> {
        let op = "dynamodb cert status get";
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(thing.as_str(), CERT)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        let Some(text) = out.item().and_then(|i| i.get("mark")).and_then(|v| v.as_s().ok()) else {
            return Ok(None);
        };
        serde_json::from_str(text).map(Some).map_err(|e| StoreError::permanent(op, e))
    }
}

/// The `presence` item of a device: its connectivity (`health::presence`), with its place as
/// a string the conditional write compares.
const PRESENCE: &str = "presence";

impl crate::ports::PresenceReader for DevicesTable {
    async fn presence(
        &self,
        thing: &ThingName,
    ) -> Result<Option<crate::health::presence::Presence>, StoreError> {
        self.presence_item(thing).await
    }

    async fn presence_page(
        &self,
        after: Option<&ThingName>,
        limit: usize,
    ) -> Result<crate::ports::PresencePage, StoreError> {
        self.presence_scan(after, limit).await
    }
}

impl DevicesTable {
    /// A Scan of the `presence` items, resumed after `after`'s, until `limit` are found or the
    /// table ends (a Scan page is filtered after it is read: one may hold none).
    pub(crate) async fn presence_scan(
        &self,
        after: Option<&ThingName>,
        limit: usize,
    ) -> Result<crate::ports::PresencePage, StoreError> {
        let op = "dynamodb presence scan";
        let mut start = after.map(|t| key(t.as_str(), PRESENCE));
        let mut out = Vec::new();
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression("#i = :p")
                .expression_attribute_names("#i", SK)
                .expression_attribute_values(":p", AttributeValue::S(PRESENCE.to_owned()))
                .set_exclusive_start_key(start.take())
                .limit(limit.clamp(1, 1_000) as i32)
                .send()
                .await
                .map_err(|e| classify(op, e))?;
            for item in page.items() {
                out.extend(thing_and_json(op, item, "state")?);
            }
            start = page.last_evaluated_key;
            if start.is_none() || out.len() >= limit {
                // Resume right after the last presence returned (a Scan resumes from any key;
                // items evaluated after it are read again and filtered out again).
                let next = start.and(out.last().map(|(t, _)| t.clone()));
                return Ok((out, next));
            }
        }
    }
}

impl DevicesTable {
    pub(crate) fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.client
    }

    pub(crate) async fn presence_item(
        &self,
        thing: &ThingName,
    ) -> Result<Option<crate::health::presence::Presence>, StoreError> {
        let op = "dynamodb presence get";
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(thing.as_str(), PRESENCE)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        let Some(text) = out.item().and_then(|i| i.get("state")).and_then(|v| v.as_s().ok()) else {
            return Ok(None);
        };
        serde_json::from_str(text).map(Some).map_err(|e| StoreError::permanent(op, e))
    }

    /// The conditional Put of a device's presence: only over the place read (`None`: none).
    pub(crate) fn presence_put(
        &self,
        thing: &ThingName,
        next: &crate::health::presence::Presence,
        expected: Option<&crate::health::presence::Place>,
    ) -> Result<aws_sdk_dynamodb::types::Put, StoreError> {
        fn encode(v: &impl Serialize) -> Result<String, StoreError> {
            serde_json::to_string(v).map_err(|e| StoreError::permanent("dynamodb presence put", e))
        }
        let mut item = key(thing.as_str(), PRESENCE);
        item.insert("place".into(), AttributeValue::S(encode(&next.place)?));
        item.insert("state".into(), AttributeValue::S(encode(next)?));
        item.insert("connected".into(), AttributeValue::Bool(next.connected));
        let put = aws_sdk_dynamodb::types::Put::builder().table_name(&self.table).set_item(Some(item));
        let put = match expected {
            None => put.condition_expression("attribute_not_exists(thing)"),
            Some(place) => put
                .condition_expression("place = :read")
                .expression_attribute_values(":read", AttributeValue::S(encode(place)?)),
        };
        put.build().map_err(|e| StoreError::permanent("dynamodb presence put", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(things: &[&ThingName]) -> HashMap<ThingName, Device> {
        things
            .iter()
            .map(|&t| {
                let registration = DeviceRegistration {
                    class: format!("class-{t}"),
                    region: "eu".into(),
                    fw: "1.0".into(),
                    registered_at_ms: 1,
                };
                (t.clone(), Device { thing: t.clone(), registration: Some(registration), state: None })
            })
            .collect()
    }

    #[test]
    fn a_registration_is_kept_for_its_time_to_live_and_not_when_a_write_overtook_the_read() {
        let cache = RegistrationCache::new(Duration::from_secs(60));
        let (a, b) = (ThingName::parse("a").unwrap(), ThingName::parse("b").unwrap());
        let t0 = Instant::now();
        let (_, generation) = cache.fresh(std::slice::from_ref(&a), t0);
        cache.found(&[&a], &registered(&[&a]), t0, generation);
        // kept until its time to live has passed
        let kept = |at: Instant| cache.fresh(std::slice::from_ref(&a), at).0[0].is_some();
        assert!(kept(t0 + Duration::from_secs(59)));
        assert!(!kept(t0 + Duration::from_secs(60)));
        // a read that started before a registration was written keeps nothing
        let (_, generation) = cache.fresh(std::slice::from_ref(&b), t0);
        cache.forget([&b]);
        cache.found(&[&b], &registered(&[&b]), t0, generation);
        assert!(cache.fresh(std::slice::from_ref(&b), t0).0[0].is_none());
        // and a thing found without a registration is forgotten
        let (_, generation) = cache.fresh(std::slice::from_ref(&a), t0);
        cache.found(&[&a], &HashMap::new(), t0, generation);
        assert!(!kept(t0));
    }

    #[test]
    fn a_full_cache_drops_expired_registrations_first() {
        let cache = RegistrationCache::new(Duration::from_secs(60));
        let things: Vec<ThingName> =
            (0..REGISTRATION_CACHE_MAX).map(|i| ThingName::parse(&format!("t{i}")).unwrap()).collect();
        let t0 = Instant::now();
        let (old, new) = things.split_at(REGISTRATION_CACHE_MAX / 2);
        let old: Vec<&ThingName> = old.iter().collect();
        let new: Vec<&ThingName> = new.iter().collect();
        cache.found(&old, &registered(&old), t0, 0);
        let later = t0 + Duration::from_secs(61);
        cache.found(&new, &registered(&new), later, 0);
        // full: one more read drops the expired half, not the fresh one
        let one = ThingName::parse("one-more").unwrap();
        cache.found(&[&one], &registered(&[&one]), later, 0);
        assert_eq!(cache.lock().by_thing.len(), new.len() + 1);
        assert!(cache.fresh(std::slice::from_ref(new[0]), later).0[0].is_some());
    }
}
