//! A device's acknowledgement → its command settled, once.
//!
//! The topic rule `SELECT *, topic(3) AS thing, timestamp() AS rx_ms FROM 'cmd/fleet/+/res'`
//! invokes this function with the device's ack (`{"cmd_id","status":"succeeded|failed|rejected",
//! "reason","result"}`, `fleet_shared::commands::CommandAck`) and the two fields the rule adds:
//! the thing from the topic (a device may only publish on its own topics) and the arrival time.
//!
//! The ack settles its command if the command was sent to that thing, is still `sent` and has
//! not expired (`fleet_shared::commands::settle`); the delivery latency (arrival − issue) goes to
//! fleet health's command-latency SLI for the device's cohort. Everything else changes nothing
//! and is counted: `AcksMalformed`, `AcksUnknown` (no such command for this device),
//! `AcksDuplicate` (settled already), `AcksExpired` (too late; also `cmd_exp` in fleet health).
//! Settled ones count as `AcksSettled`; a device's refusal (a replay, a bad signature: worth a
//! look) is logged as a warning. The answer says which: `{"outcome": ".."}`. Only a
//! store failure is an error (`Retryable`: Lambda retries, then the failure queue).

use std::sync::Arc;

use fleet_shared::adapters::aws::{CommandsTable, HealthTable};
use fleet_shared::commands::{settle, AckStatus, CommandAck, Settled};
use fleet_shared::health::signals;
use fleet_shared::health::tally::{counter, Cohort, HealthDelta};
use fleet_shared::lambda::{AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::ports::{CommandStore, HealthCounters};
use fleet_shared::{time, StoreError};
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tracing::{info, warn};

pub const FUNCTION: &str = "command-ack";

/// Everything the handler needs, built once per cold start.
pub struct Deps<S, H> {
    /// Commands table: the command an ack names, settled conditionally.
    pub commands: S,
    /// Health table: command latency per cohort.
    pub health: H,
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

impl Deps<CommandsTable, HealthTable> {
    /// On AWS: the Commands table (`FLEET_COMMANDS_TABLE`) and the Health table.
    pub fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        Ok(Self {
            commands: CommandsTable::from_env(&aws.sdk, &aws.env)?,
            health: HealthTable::from_env(&aws.sdk, &aws.env)?,
            clock: time::now_ms,
            metrics: MetricsOut::stdout(&aws.env)?,
        })
    }
}

#[cfg(feature = "embedded")]
pub type EmbeddedDeps =
    Deps<fleet_shared::adapters::embedded::SqliteStore, fleet_shared::adapters::embedded::SqliteStore>;

#[cfg(feature = "embedded")]
impl EmbeddedDeps {
    /// On the embedded backend: the one SQLite database; the stage is `local`.
    pub fn on_embedded(e: &fleet_shared::lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        Ok(Self {
            commands: e.db.clone(),
            health: e.db.clone(),
            clock: time::now_ms,
            metrics: MetricsOut::Stdout { stage: "local".to_owned() },
        })
    }
}

/// What became of one ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Settled,
    Malformed,
    Unknown,
    Duplicate,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<i64>,
}

/// The rule's event: the device's ack and what the rule added.
fn split(mut event: Value, now: i64) -> Result<(String, i64, CommandAck), String> {
    let obj = event.as_object_mut().ok_or("not a JSON object")?;
    let thing =
        obj.remove("thing").and_then(|t| t.as_str().map(str::to_owned)).ok_or("no thing (topic(3))")?;
    let rx_ms = obj.remove("rx_ms").and_then(|t| t.as_i64()).unwrap_or(now);
    let ack = CommandAck::parse(event.to_string().as_bytes()).map_err(|e| e.to_string())?;
    Ok((thing, rx_ms, ack))
}

pub async fn handle<S: CommandStore, H: HealthCounters>(
    deps: &Deps<S, H>,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<Answer, Retryable> {
    let now = (deps.clock)();
    let parsed = serde_json::from_str::<Value>(event.payload.get()).map_err(|e| e.to_string());
    let answer = match parsed.and_then(|v| split(v, now)) {
        Ok((thing, rx_ms, ack)) => record(deps, &thing, rx_ms, &ack)
            .await
            .map_err(|e| Retryable { what: "ack not recorded", source: Arc::new(e) })?,
        Err(why) => {
            warn!(reason = %why, "ack not understood");
            Answer { outcome: Outcome::Malformed, cmd_id: None, latency_ms: None }
        }
    };
    let name = match answer.outcome {
        Outcome::Settled => "AcksSettled",
        Outcome::Malformed => "AcksMalformed",
        Outcome::Unknown => "AcksUnknown",
        Outcome::Duplicate => "AcksDuplicate",
        Outcome::Expired => "AcksExpired",
    };
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: now,
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![(name, 1.0, Unit::Count)],
    }]);
    Ok(answer)
}

/// Settle the command `ack` names, if it may.
pub async fn record<S: CommandStore, H: HealthCounters>(
    deps: &Deps<S, H>,
    thing: &str,
    rx_ms: i64,
    ack: &CommandAck,
) -> Result<Answer, StoreError> {
    let stored = deps.commands.command(&ack.cmd_id).await?;
    let cmd_id = Some(ack.cmd_id.clone());
    let cohort = stored
        .as_ref()
        .and_then(|c| c.cohort.parse::<Cohort>().ok())
        .unwrap_or_else(|| Cohort::of(None, None));
    let outcome = match settle(stored.as_ref(), thing, ack, rx_ms) {
        Settled::Now(next) => {
            if !deps.commands.settle_command(&next).await? {
                return Ok(Answer { outcome: Outcome::Duplicate, cmd_id, latency_ms: None });
            }
            let latency = next.latency_ms.unwrap_or_default();
            let mut delta = HealthDelta::default();
            signals::command_acked(&mut delta, rx_ms, &cohort, latency);
            count(deps, &delta).await;
            if ack.status == AckStatus::Rejected {
                warn!(thing, cmd_id = %ack.cmd_id, reason = ?ack.reason, "the device refused a command");
            }
            info!(thing, cmd_id = %ack.cmd_id, status = ?ack.status, latency_ms = latency, "command settled");
            return Ok(Answer { outcome: Outcome::Settled, cmd_id, latency_ms: Some(latency) });
        }
        Settled::Unknown => Outcome::Unknown,
        Settled::Duplicate => Outcome::Duplicate,
        Settled::Expired => {
            let mut delta = HealthDelta::default();
            signals::command(&mut delta, rx_ms, &cohort, counter::COMMANDS_EXPIRED);
            count(deps, &delta).await;
            Outcome::Expired
        }
    };
    info!(thing, cmd_id = %ack.cmd_id, outcome = ?outcome, "ack ignored");
    Ok(Answer { outcome, cmd_id, latency_ms: None })
}

/// Health counts are best effort: the ack is recorded whatever they do.
async fn count<S, H: HealthCounters>(deps: &Deps<S, H>, delta: &HealthDelta) {
    if let Err(e) = deps.health.add_health(delta).await {
        warn!(error = %e, "ack not counted for fleet health");
    }
}

#[cfg(test)]
mod tests;
