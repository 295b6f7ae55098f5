//! Twins table (DynamoDB): one item per (thing, shadow), the twin as JSON plus the attributes
//! the conditional write and the fleet queries need.
//!
//! - Key: `thing` (partition), `shadow` (sort) = `s#<name>` (`s#` for the classic shadow:
//!   DynamoDB keys cannot be empty).
//! - Writes: PutItem conditioned on the revision read (`attribute_not_exists(thing)` for a
//!   new twin), so concurrent invocations can neither lose an update nor move a twin back.
//! - Drift: a sparse GSI `by_drift` (partition `drift_shard` = `d#0`..`d#15` by thing, sort
//!   `drift_since_ms`), present only while a twin drifts. "Drifting since before T" is one
//!   Query per shard reading only drifting twins: at 1 M devices with 1 % drifting, 16
//!   queries returning 10,000 items (~4 KB each: ~5,000 RCU eventually consistent), never a
//!   scan of the fleet. Sixteen shards keep a fleet-wide drift (a bad desired value pushed
//!   to everyone) from writing one hot index partition.
//! - Stale-desired policies: one item (`thing` = `$policies`, `shadow` = `s#`; `$` is not
//!   allowed in a thing name, so it can be no twin) holding a map `policies` of key →
//!   `{after_ms, action}`; operators change one key at a time (UpdateItem on a map path), the
//!   sweep reads it with one GetItem.
//! - Firmware: a sparse GSI `by_reported_fw` (partition `reported_fw`, sort `thing`): "which
//!   devices report fw = X" is one Query returning only those twins (at 1 M devices, a
//!   firmware on 10 % of them: 100,000 items, ~50,000 RCU, paged).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use futures_util::stream::{self, StreamExt};

use super::{classify, query_items};
use crate::env::{ConfigError, Env};
use crate::error::StoreError;
use crate::model::{DriftSummary, ShadowName, ThingName, Twin};
use crate::ports::{DriftCursor, TwinPolicies, TwinStore};
use crate::twin::policy::StalePolicy;

/// The partition key of the policies item.
const POLICIES_ITEM: &str = "$policies";

/// Index shards of the drift GSI.
pub const DRIFT_SHARDS: u32 = 16;
pub const DRIFT_INDEX: &str = "by_drift";
/// GSI on `reported_fw` (partition) and `thing` (sort): twins by reported firmware.
pub const FW_INDEX: &str = "by_reported_fw";

#[derive(Clone, Debug)]
pub struct TwinsTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl TwinsTable {
    /// Reads `FLEET_TWINS_TABLE`.
    pub fn from_env(sdk: &aws_config::SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self::new(aws_sdk_dynamodb::Client::new(sdk), env.required("FLEET_TWINS_TABLE")?))
    }

    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }
}

fn sort_key(shadow: &ShadowName) -> String {
    format!("s#{}", shadow.as_str())
}

/// The drift index shard of a thing (FNV-1a: stable across builds and processes).
pub fn drift_shard(thing: &ThingName) -> String {
    let h = crate::hash::fnv1a32(thing.as_str().as_bytes());
    format!("d#{}", h % DRIFT_SHARDS)
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn twin_from_item(item: &HashMap<String, AttributeValue>) -> Result<Twin, StoreError> {
    let json = item
        .get("twin")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::permanent("dynamodb twin decode", "item without a twin attribute"))?;
    serde_json::from_str(json).map_err(|e| StoreError::permanent("dynamodb twin decode", e))
}

impl TwinsTable {
    /// Up to `limit` twins from a Query on `index` (`condition` over `values`), page by page.
    async fn query_index(
        &self,
        op: &'static str,
        index: &str,
        condition: &str,
        values: &[(&str, AttributeValue)],
        limit: usize,
    ) -> Result<Vec<Twin>, StoreError> {
        let mut req =
            self.client.query().table_name(&self.table).index_name(index).key_condition_expression(condition);
        for (name, value) in values {
            req = req.expression_attribute_values(*name, value.clone());
        }
        query_items(req, op, limit, |item| twin_from_item(item).map(Some)).await
    }
}

impl TwinsTable {
    /// One drift index shard: its count (`Select: COUNT`, every page) and its oldest drift
    /// (one item, ascending). Reads only the shard's drifting twins.
    async fn drift_shard_summary(&self, shard: u32) -> Result<DriftSummary, StoreError> {
        let op = "dynamodb twins drift summary";
        let query = || {
            self.client
                .query()
                .table_name(&self.table)
                .index_name(DRIFT_INDEX)
                .key_condition_expression("drift_shard = :shard")
                .expression_attribute_values(":shard", s(format!("d#{shard}")))
        };
        let mut pages = query().select(aws_sdk_dynamodb::types::Select::Count).into_paginator().send();
        let mut drifting = 0u64;
        while let Some(page) = pages.next().await {
            drifting += page.map_err(|e| classify(op, e))?.count().max(0) as u64;
        }
        if drifting == 0 {
            return Ok(DriftSummary::default());
        }
        let oldest = query()
            .scan_index_forward(true)
            .limit(1)
            .projection_expression("drift_since_ms")
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        let oldest_since_ms = oldest
            .items()
            .first()
            .and_then(|item| item.get("drift_since_ms"))
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok());
        Ok(DriftSummary { drifting, oldest_since_ms })
    }
}

/// A key (LastEvaluatedKey) as JSON, for a cursor: strings and numbers, as DynamoDB keys are.
fn key_to_json(key: &HashMap<String, AttributeValue>) -> serde_json::Value {
    let map = key
        .iter()
        .filter_map(|(k, v)| match v {
            AttributeValue::S(s) => Some((k.clone(), serde_json::json!({ "S": s }))),
            AttributeValue::N(n) => Some((k.clone(), serde_json::json!({ "N": n }))),
            _ => None,
        })
        .collect();
    serde_json::Value::Object(map)
}

fn key_from_json(v: &serde_json::Value) -> Option<HashMap<String, AttributeValue>> {
    let map = v.as_object()?;
    map.iter()
        .map(|(k, v)| match (v.get("S").and_then(|s| s.as_str()), v.get("N").and_then(|n| n.as_str())) {
            (Some(s), _) => Some((k.clone(), AttributeValue::S(s.to_owned()))),
            (_, Some(n)) => Some((k.clone(), AttributeValue::N(n.to_owned()))),
            _ => None,
        })
        .collect()
}

impl TwinsTable {
    /// One page of one drift shard, from `start` (a LastEvaluatedKey); the twins and where
    /// the shard goes on (`None`: done).
    async fn drift_shard_page(
        &self,
        shard: u32,
        before_ms: i64,
        start: Option<HashMap<String, AttributeValue>>,
        limit: usize,
    ) -> Result<(Vec<Twin>, Option<HashMap<String, AttributeValue>>), StoreError> {
        let op = "dynamodb twins drifting page";
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(DRIFT_INDEX)
            .key_condition_expression("drift_shard = :shard AND drift_since_ms <= :before")
            .expression_attribute_values(":shard", s(format!("d#{shard}")))
            .expression_attribute_values(":before", n(before_ms))
            .set_exclusive_start_key(start)
            .limit(limit.clamp(1, 1_000) as i32)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        let twins = out.items().iter().map(twin_from_item).collect::<Result<Vec<_>, _>>()?;
        Ok((twins, out.last_evaluated_key().cloned()))
    }
}

impl TwinStore for TwinsTable {
    async fn drifting_page(
        &self,
        before_ms: i64,
        cursor: Option<DriftCursor>,
        limit: usize,
    ) -> Result<(Vec<Twin>, Option<DriftCursor>), StoreError> {
        // The cursor holds each shard's position: `null` = from its start, `"done"`, or a key.
        let positions: Vec<serde_json::Value> = match cursor {
            Some(DriftCursor(serde_json::Value::Array(p))) if p.len() == DRIFT_SHARDS as usize => p,
            _ => vec![serde_json::Value::Null; DRIFT_SHARDS as usize],
        };
        let per_shard = limit.div_ceil(DRIFT_SHARDS as usize).max(1);
        let starts: Vec<(usize, Option<HashMap<String, AttributeValue>>)> = positions
            .iter()
            .enumerate()
            .filter(|(_, p)| p.as_str() != Some("done"))
            .map(|(i, p)| (i, key_from_json(p)))
            .collect();
        let pages = starts.into_iter().map(|(i, start)| async move {
            (i, self.drift_shard_page(i as u32, before_ms, start, per_shard).await)
        });
        let results: Vec<(usize, Result<_, StoreError>)> =
            stream::iter(pages).buffer_unordered(super::MAX_CONCURRENT_REQUESTS).collect().await;
        let mut next = positions.clone();
        let mut twins = Vec::new();
        for (i, r) in results {
            let (page, last) = r?;
            twins.extend(page);
            next[i] = last.as_ref().map_or_else(|| serde_json::Value::from("done"), key_to_json);
        }
        let more = next.iter().any(|p| p.as_str() != Some("done"));
        Ok((twins, more.then(|| DriftCursor(serde_json::Value::Array(next)))))
    }

    async fn drift_summary(&self) -> Result<DriftSummary, StoreError> {
        let shards = (0..DRIFT_SHARDS).map(|i| self.drift_shard_summary(i));
        let results: Vec<Result<DriftSummary, StoreError>> =
            stream::iter(shards).buffer_unordered(super::MAX_CONCURRENT_REQUESTS).collect().await;
        results.into_iter().try_fold(DriftSummary::default(), |acc, r| Ok(acc.merge(r?)))
    }

    async fn twin(&self, thing: &ThingName, shadow: &ShadowName) -> Result<Option<Twin>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("thing", s(thing.as_str()))
            .key("shadow", s(sort_key(shadow)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("dynamodb twin get", e))?;
        out.item().map(twin_from_item).transpose()
    }

    async fn put_twin(&self, twin: &Twin) -> Result<bool, StoreError> {
        let json =
            serde_json::to_string(twin).map_err(|e| StoreError::permanent("dynamodb twin encode", e))?;
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("thing", s(twin.thing.as_str()))
            .item("shadow", s(sort_key(&twin.shadow)))
            .item("version", n(twin.version))
            .item("revision", n(twin.revision))
            .item("twin", s(json));
        if let Some(fw) = twin.reported_fw() {
            req = req.item("reported_fw", s(fw));
        }
        if let Some(since) = twin.drift_since_ms {
            req = req.item("drift_shard", s(drift_shard(&twin.thing))).item("drift_since_ms", n(since));
        }
        req = if twin.revision <= 1 {
            req.condition_expression("attribute_not_exists(thing)")
        } else {
            req.condition_expression("revision = :read")
                .expression_attribute_values(":read", n(twin.revision - 1))
        };
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|se| se.is_conditional_check_failed_exception()) => {
                Ok(false)
            }
            Err(e) => Err(classify("dynamodb twin put", e)),
        }
    }

    async fn reporting_fw(&self, fw: &str, limit: usize) -> Result<Vec<Twin>, StoreError> {
        let values = [(":fw", s(fw))];
        self.query_index("dynamodb twins fw query", FW_INDEX, "reported_fw = :fw", &values, limit).await
    }

    async fn drifting_since(&self, before_ms: i64, limit: usize) -> Result<Vec<Twin>, StoreError> {
        let condition = "drift_shard = :shard AND drift_since_ms <= :before";
        let shards: Vec<_> = (0..DRIFT_SHARDS)
            .map(|i| async move {
                let values = [(":shard", s(format!("d#{i}"))), (":before", n(before_ms))];
                self.query_index("dynamodb twins drift query", DRIFT_INDEX, condition, &values, limit).await
            })
            .collect();
        let results: Vec<Result<Vec<Twin>, StoreError>> =
            stream::iter(shards).buffer_unordered(super::MAX_CONCURRENT_REQUESTS).collect().await;
        let mut all = Vec::new();
        for r in results {
            all.extend(r?);
        }
        all.sort_by(|a, b| {
            (a.drift_since_ms, &a.thing, &a.shadow).cmp(&(b.drift_since_ms, &b.thing, &b.shadow))
        });
        all.truncate(limit);
        Ok(all)
    }
}

impl TwinsTable {
    fn policies_update(&self) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("thing", s(POLICIES_ITEM))
            .key("shadow", s(sort_key(&ShadowName::classic())))
    }
}

impl TwinPolicies for TwinsTable {
    async fn policies(&self) -> Result<Vec<StalePolicy>, StoreError> {
        let op = "dynamodb twin policies";
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("thing", s(POLICIES_ITEM))
            .key("shadow", s(sort_key(&ShadowName::classic())))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        let Some(map) = out.item().and_then(|i| i.get("policies")).and_then(|v| v.as_m().ok()) else {
            return Ok(Vec::new());
        };
        let mut policies = Vec::with_capacity(map.len());
        for (key, v) in map {
            let fields =
                v.as_m().map_err(|_| StoreError::permanent(op, format!("policy {key}: not a map")))?;
            let after_ms = fields
                .get("after_ms")
                .and_then(|n| n.as_n().ok())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| StoreError::permanent(op, format!("policy {key}: no after_ms")))?;
            let action = fields.get("action").and_then(|a| a.as_s().ok()).map_or("", String::as_str);
            let policy = StalePolicy::stored(key, after_ms, action)
                .map_err(|e| StoreError::permanent(op, format!("policy {key}: {e}")))?;
            policies.push(policy);
        }
        policies.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(policies)
    }

    async fn set_policy(&self, policy: &StalePolicy) -> Result<(), StoreError> {
        let op = "dynamodb twin policy set";
        // The map first (a path into a missing map fails), then the one key: two writers of
        // different keys never overwrite each other.
        self.policies_update()
            .update_expression("SET policies = if_not_exists(policies, :empty)")
            .expression_attribute_values(":empty", AttributeValue::M(HashMap::new()))
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        let value = AttributeValue::M(HashMap::from([
            ("after_ms".to_owned(), n(policy.diverge_after_ms)),
            ("action".to_owned(), s(policy.action.as_str())),
        ]));
        self.policies_update()
            .update_expression("SET policies.#k = :p")
            .expression_attribute_names("#k", &policy.key)
            .expression_attribute_values(":p", value)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        Ok(())
    }

    async fn remove_policy(&self, key: &str) -> Result<bool, StoreError> {
        let out = self
            .policies_update()
            .update_expression("REMOVE policies.#k")
            .condition_expression("attribute_exists(policies.#k)")
            .expression_attribute_names("#k", key)
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|se| se.is_conditional_check_failed_exception()) => {
                Ok(false)
            }
            Err(e) => Err(classify("dynamodb twin policy remove", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_shards_are_stable_and_spread() {
        let t = |s: &str| ThingName::parse(s).expect("thing");
        assert_eq!(drift_shard(&t("sensor-001")), drift_shard(&t("sensor-001")));
        let shards: std::collections::HashSet<String> =
            (0..1_000).map(|i| drift_shard(&t(&format!("dev-{i}")))).collect();
        assert_eq!(shards.len(), DRIFT_SHARDS as usize);
    }
}
