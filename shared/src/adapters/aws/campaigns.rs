//! The Campaigns table (DynamoDB, [`CampaignStore`]): one item per OTA campaign, keyed by
//! `id`, `{id (S), version (N), created_ms (N), body (S: the campaign as JSON)}`, written
//! only over the version it was read at (a conditional PutItem), so an operator's pause and
//! a tick never overwrite each other. Campaigns are few (one per firmware rollout): listing
//! them is a Scan of every page, sorted newest first here.

use std::collections::HashMap;

use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use serde::{Deserialize, Serialize};

use super::classify;
use crate::env::{ConfigError, Env};
use crate::error::StoreError;
use crate::ota::campaign::Campaign;
use crate::ports::CampaignStore;

#[derive(Clone)]
pub struct CampaignsTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl CampaignsTable {
    /// `FLEET_CAMPAIGNS_TABLE`.
    pub fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self::new(aws_sdk_dynamodb::Client::new(sdk), env.required("FLEET_CAMPAIGNS_TABLE")?))
    }

    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }
}

/// A campaign as stored: the key and what ordering and the version check need, beside the
/// campaign itself.
#[derive(Serialize, Deserialize)]
struct CampaignItem {
    id: String,
    version: u64,
    created_ms: i64,
    body: String,
}

fn decode(op: &'static str, item: HashMap<String, AttributeValue>) -> Result<(i64, Campaign), StoreError> {
    let stored: CampaignItem = serde_dynamo::from_item(item).map_err(|e| StoreError::permanent(op, e))?;
    let campaign = serde_json::from_str(&stored.body).map_err(|e| StoreError::permanent(op, e))?;
    Ok((stored.created_ms, campaign))
}

fn condition_failed<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
    e: &aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> bool {
    e.as_service_error().and_then(|se| se.code()) == Some("ConditionalCheckFailedException")
}

impl CampaignStore for CampaignsTable {
    async fn campaign(&self, id: &str) -> Result<Option<Campaign>, StoreError> {
        const OP: &str = "dynamodb campaign get";
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("id", AttributeValue::S(id.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(OP, e))?;
        out.item.map(|item| decode(OP, item).map(|(_, c)| c)).transpose()
    }

    async fn campaigns(&self) -> Result<Vec<Campaign>, StoreError> {
        const OP: &str = "dynamodb campaigns";
        let mut pages =
            self.client.scan().table_name(&self.table).consistent_read(true).into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            for item in page.map_err(|e| classify(OP, e))?.items.unwrap_or_default() {
                // One campaign this binary cannot read (written by a newer one) holds up no other.
                match decode(OP, item) {
                    Ok(c) => out.push(c),
                    Err(e) => tracing::warn!(error = %e, "campaign skipped: this binary cannot read it"),
                }
            }
        }
        // Newest first; campaigns created in the same millisecond by id.
        out.sort_by(|(a_ms, a), (b_ms, b)| b_ms.cmp(a_ms).then_with(|| a.spec.id.cmp(&b.spec.id)));
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    async fn put_campaign(&self, campaign: &Campaign) -> Result<u64, StoreError> {
        const OP: &str = "dynamodb campaign put";
        let read_at = campaign.version;
        let mut stored = campaign.clone();
        stored.version = read_at + 1;
        let item = CampaignItem {
            id: stored.spec.id.clone(),
            version: stored.version,
            created_ms: stored.created_ms,
            body: serde_json::to_string(&stored).map_err(|e| StoreError::permanent(OP, e))?,
        };
        let item = serde_dynamo::to_item(item).map_err(|e| StoreError::permanent(OP, e))?;
        let put = self.client.put_item().table_name(&self.table).set_item(Some(item));
        let put = if read_at == 0 {
            put.condition_expression("attribute_not_exists(#id)").expression_attribute_names("#id", "id")
        } else {
            put.condition_expression("#v = :read")
                .expression_attribute_names("#v", "version")
                .expression_attribute_values(":read", AttributeValue::N(read_at.to_string()))
        };
        match put.send().await {
            Ok(_) => Ok(read_at + 1),
            Err(e) if condition_failed(&e) => {
                let what = if read_at == 0 {
                    "exists already".to_owned()
                } else {
                    format!("changed since version {read_at}")
                };
                Err(StoreError::conflict(OP, format!("campaign {} {what}", campaign.spec.id)))
            }
            Err(e) => Err(classify(OP, e)),
        }
    }
}
