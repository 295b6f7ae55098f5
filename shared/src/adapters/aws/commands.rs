//! The Commands table (DynamoDB, [`CommandStore`]): one item per command, keyed by `cmd_id`,
//! found per device through the `by_thing` index (thing, seq); and one counter item per device
//! (`cmd_id` = `seq#<thing>`, outside the index), incremented with `ADD`.

use std::collections::HashMap;

use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use super::{classify, query_items};
use crate::commands::{CommandRecord, CommandStatus};
use crate::env::{ConfigError, Env};
use crate::error::StoreError;
use crate::model::ThingName;
use crate::ports::CommandStore;

/// The index of a device's commands by seq.
pub const BY_THING_INDEX: &str = "by_thing";

#[derive(Clone)]
pub struct CommandsTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl CommandsTable {
    /// `FLEET_COMMANDS_TABLE`.
    pub fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self::new(aws_sdk_dynamodb::Client::new(sdk), env.required("FLEET_COMMANDS_TABLE")?))
    }

    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn item(op: &'static str, c: &CommandRecord) -> Result<HashMap<String, AttributeValue>, StoreError> {
    let json = serde_json::to_string(c).map_err(|e| StoreError::permanent(op, e))?;
    Ok(HashMap::from([
        ("cmd_id".to_owned(), s(&c.cmd_id)),
        ("thing".to_owned(), s(&c.thing)),
        ("seq".to_owned(), AttributeValue::N(c.seq.to_string())),
        ("status".to_owned(), s(c.status.as_str())),
        ("record".to_owned(), s(json)),
    ]))
}

fn record(op: &'static str, item: &HashMap<String, AttributeValue>) -> Result<CommandRecord, StoreError> {
    let json = item
        .get("record")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::permanent(op, "command item without record"))?;
    serde_json::from_str(json).map_err(|e| StoreError::permanent(op, e))
}

fn condition_failed<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
    e: &aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> bool {
    e.as_service_error().and_then(|se| se.code()) == Some("ConditionalCheckFailedException")
}

impl CommandStore for CommandsTable {
    async fn next_seq(&self, thing: &ThingName) -> Result<u64, StoreError> {
        const OP: &str = "dynamodb command seq";
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("cmd_id", s(format!("seq#{thing}")))
            .update_expression("ADD #n :one")
            .expression_attribute_names("#n", "counter")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| classify(OP, e))?;
        out.attributes()
            .and_then(|a| a.get("counter"))
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| StoreError::permanent(OP, "no counter in the answer"))
    }

    async fn put_command(&self, command: &CommandRecord) -> Result<(), StoreError> {
        const OP: &str = "dynamodb command put";
        match self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item(OP, command)?))
            .condition_expression("attribute_not_exists(cmd_id)")
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if condition_failed(&e) => {
                Err(StoreError::conflict(OP, format!("command {} exists", command.cmd_id)))
            }
            Err(e) => Err(classify(OP, e)),
        }
    }

    async fn command(&self, cmd_id: &str) -> Result<Option<CommandRecord>, StoreError> {
        const OP: &str = "dynamodb command get";
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("cmd_id", s(cmd_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(OP, e))?;
        // The counter items share the key space but hold no record.
        out.item().filter(|i| i.contains_key("record")).map(|i| record(OP, i)).transpose()
    }

    async fn commands_of(&self, thing: &ThingName, limit: usize) -> Result<Vec<CommandRecord>, StoreError> {
        const OP: &str = "dynamodb commands of";
        let req = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(BY_THING_INDEX)
            .key_condition_expression("thing = :t")
            .expression_attribute_values(":t", s(thing.as_str()))
            .scan_index_forward(false);
        query_items(req, OP, limit, |i| record(OP, i).map(Some)).await
    }

    async fn settle_command(&self, command: &CommandRecord) -> Result<bool, StoreError> {
        const OP: &str = "dynamodb command settle";
        match self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item(OP, command)?))
            .condition_expression("#s = :sent")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":sent", s(CommandStatus::Sent.as_str()))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(classify(OP, e)),
        }
    }
}
