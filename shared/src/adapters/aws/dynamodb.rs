//! Devices table (DynamoDB). One partition per thing, two items in it:
//! - `item = "registration"`: what an operator registered; replaced whole (BatchWriteItem).
//! - `item = "state"`: what telemetry last said; a conditional UpdateItem that only ever
//!   moves forward in time (`last_ts_ms`), so out-of-order batches cannot rewind it and
//!   concurrent invocations cannot race it backwards.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, PutRequest, WriteRequest};
use futures_util::stream::{self, StreamExt};

use super::{backoff, classify, AwsStore, MAX_BATCH_ATTEMPTS, MAX_CONCURRENT_REQUESTS};
use crate::error::StoreError;
use crate::model::{Device, DeviceRegistration, DeviceState, ThingName};
use crate::ports::{DeviceAdmin, DeviceRegistry};

/// BatchGetItem: at most 100 keys per request.
pub const BATCH_GET_MAX_KEYS: usize = 100;
/// BatchWriteItem: at most 25 items per request.
pub const BATCH_WRITE_MAX_ITEMS: usize = 25;

const PK: &str = "thing";
const SK: &str = "item";
const REGISTRATION: &str = "registration";
const STATE: &str = "state";

type Item = HashMap<String, AttributeValue>;

fn key(thing: &str, item: &str) -> Item {
    HashMap::from([
        (PK.to_owned(), AttributeValue::S(thing.to_owned())),
        (SK.to_owned(), AttributeValue::S(item.to_owned())),
    ])
}

fn s(item: &Item, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}

fn n<T: std::str::FromStr>(item: &Item, name: &str) -> Option<T> {
    item.get(name).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok())
}

fn num(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn registration_item(thing: &ThingName, r: &DeviceRegistration) -> Item {
    let mut item = key(thing.as_str(), REGISTRATION);
    item.insert("class".into(), AttributeValue::S(r.class.clone()));
    item.insert("region".into(), AttributeValue::S(r.region.clone()));
    item.insert("fw".into(), AttributeValue::S(r.fw.clone()));
    item.insert("registered_at_ms".into(), num(r.registered_at_ms));
    item
}

fn registration_from(item: &Item) -> Option<DeviceRegistration> {
    Some(DeviceRegistration {
        class: s(item, "class")?,
        region: s(item, "region").unwrap_or_default(),
        fw: s(item, "fw").unwrap_or_default(),
        registered_at_ms: n(item, "registered_at_ms").unwrap_or(0),
    })
}

fn state_from(item: &Item) -> Option<DeviceState> {
    let last_ts_ms = n(item, "last_ts_ms")?;
    Some(DeviceState {
        last_ts_ms,
        last_rx_ms: n(item, "last_rx_ms").unwrap_or(last_ts_ms),
        boot: n(item, "boot").unwrap_or(0),
        seq: n(item, "seq").unwrap_or(0),
        battery_pct: n(item, "battery_pct"),
        fw: s(item, "fw_reported"),
    })
}

/// Fold the items of many partitions into devices. Items with a bad key are skipped.
fn devices_from(items: impl IntoIterator<Item = Item>) -> HashMap<ThingName, Device> {
    let mut out: HashMap<ThingName, Device> = HashMap::new();
    for item in items {
        let (Some(thing), Some(kind)) = (s(&item, PK), s(&item, SK)) else {
            continue;
        };
        let Ok(thing) = ThingName::parse(&thing) else {
            continue;
        };
        let d = out.entry(thing.clone()).or_insert(Device { thing, registration: None, state: None });
        match kind.as_str() {
            REGISTRATION => d.registration = registration_from(&item),
            STATE => d.state = state_from(&item),
            _ => {}
        }
    }
    out
}

impl AwsStore {
    fn devices_table(&self) -> &str {
        &self.resources.devices_table
    }

    /// BatchGetItem of `keys` (≤ 100), resubmitting UnprocessedKeys with backoff.
    async fn batch_get(&self, keys: Vec<Item>) -> Result<Vec<Item>, StoreError> {
        let table = self.devices_table().to_owned();
        let mut pending = KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .build()
            .map_err(|e| StoreError::permanent("dynamodb batch get", e))?;
        let mut items = Vec::new();
        for attempt in 0..MAX_BATCH_ATTEMPTS {
            let out = self
                .dynamodb
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
                    backoff(attempt).await;
                }
            }
        }
        Err(StoreError::transient("dynamodb batch get", "unprocessed keys remained after retries"))
    }

    /// BatchWriteItem of `requests` (≤ 25), resubmitting UnprocessedItems with backoff.
    async fn batch_write(&self, mut requests: Vec<WriteRequest>) -> Result<(), StoreError> {
        let table = self.devices_table().to_owned();
        for attempt in 0..MAX_BATCH_ATTEMPTS {
            let out = self
                .dynamodb
                .batch_write_item()
                .request_items(&table, requests)
                .send()
                .await
                .map_err(|e| classify("dynamodb batch write", e))?;
            match out.unprocessed_items.and_then(|mut u| u.remove(&table)).filter(|r| !r.is_empty()) {
                None => return Ok(()),
                Some(rest) => {
                    requests = rest;
                    backoff(attempt).await;
                }
            }
        }
        Err(StoreError::transient("dynamodb batch write", "unprocessed items remained after retries"))
    }

    async fn update_state(&self, thing: &ThingName, s: &DeviceState) -> Result<(), StoreError> {
        let mut set = vec!["last_ts_ms = :t", "last_rx_ms = :rx", "boot = :boot", "seq = :seq"];
        let mut req = self
            .dynamodb
            .update_item()
            .table_name(self.devices_table())
            .set_key(Some(key(thing.as_str(), STATE)))
            .condition_expression("attribute_not_exists(last_ts_ms) OR last_ts_ms < :t")
            .expression_attribute_values(":t", num(s.last_ts_ms))
            .expression_attribute_values(":rx", num(s.last_rx_ms))
            .expression_attribute_values(":boot", num(s.boot))
            .expression_attribute_values(":seq", num(s.seq));
        if let Some(b) = s.battery_pct {
            set.push("battery_pct = :bat");
            req = req.expression_attribute_values(":bat", num(b));
        }
        if let Some(fw) = &s.fw {
            set.push("fw_reported = :fw");
            req = req.expression_attribute_values(":fw", AttributeValue::S(fw.clone()));
        }
        match req.update_expression(format!("SET {}", set.join(", "))).send().await {
            Ok(_) => Ok(()),
            // A newer state is already stored: nothing to do, by design.
            Err(e) if e.as_service_error().is_some_and(|se| se.is_conditional_check_failed_exception()) => {
                Ok(())
            }
            Err(e) => Err(classify("dynamodb update state", e)),
        }
    }
}

impl DeviceRegistry for AwsStore {
    async fn get_many(&self, things: &[ThingName]) -> Result<HashMap<ThingName, Device>, StoreError> {
        let keys: Vec<Item> =
            things.iter().flat_map(|t| [key(t.as_str(), REGISTRATION), key(t.as_str(), STATE)]).collect();
        let chunks: Vec<Vec<Item>> = keys.chunks(BATCH_GET_MAX_KEYS).map(<[Item]>::to_vec).collect();
        let results: Vec<Result<Vec<Item>, StoreError>> = stream::iter(chunks)
            .map(|chunk| self.batch_get(chunk))
            .buffer_unordered(MAX_CONCURRENT_REQUESTS)
            .collect()
            .await;
        let mut items = Vec::with_capacity(keys.len());
        for r in results {
            items.extend(r?);
        }
        Ok(devices_from(items))
    }

    async fn record_states(&self, states: &[(ThingName, DeviceState)]) -> Vec<(ThingName, StoreError)> {
        // Futures built eagerly: a closure inside the stream would not be `Send` for all lifetimes.
        let updates: Vec<_> = states
            .iter()
            .map(|(t, s)| async move { self.update_state(t, s).await.err().map(|e| (t.clone(), e)) })
            .collect();
        let results: Vec<Option<(ThingName, StoreError)>> =
            stream::iter(updates).buffer_unordered(MAX_CONCURRENT_REQUESTS).collect().await;
        results.into_iter().flatten().collect()
    }
}

impl DeviceAdmin for AwsStore {
    async fn register(&self, devices: &[(ThingName, DeviceRegistration)]) -> Result<(), StoreError> {
        for chunk in devices.chunks(BATCH_WRITE_MAX_ITEMS) {
            let requests = chunk
                .iter()
                .map(|(t, r)| {
                    let put = PutRequest::builder()
                        .set_item(Some(registration_item(t, r)))
                        .build()
                        .map_err(|e| StoreError::permanent("dynamodb register", e))?;
                    Ok(WriteRequest::builder().put_request(put).build())
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            self.batch_write(requests).await?;
        }
        Ok(())
    }

    async fn device(&self, thing: &ThingName) -> Result<Option<Device>, StoreError> {
        let items = self
            .dynamodb
            .query()
            .table_name(self.devices_table())
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
        let mut pages = self.dynamodb.scan().table_name(self.devices_table()).into_paginator().send();
        let mut items = Vec::new();
        while let Some(page) = pages.next().await {
            items.extend(page.map_err(|e| classify("dynamodb devices scan", e))?.items.unwrap_or_default());
        }
        let mut devices: Vec<Device> = devices_from(items).into_values().collect();
        devices.sort_by(|a, b| a.thing.cmp(&b.thing));
        Ok(devices)
    }
}
