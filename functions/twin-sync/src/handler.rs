//! Event → twin sync → response.
//!
//! The topic rules put every shadow event (`update/documents` and `delete/accepted`, classic
//! and named, with `thing` and `shadow` added from the topic) on the twin events queue; this
//! function mirrors each into the Twins table (`fleet_shared::twin::sync`): a newer version is
//! applied, an older or repeated one changes nothing, so redelivery and any order are harmless.
//! - SQS: the answer names exactly the events that failed transiently (retried by SQS).
//! - A direct invocation (one event, e.g. `cargo lambda invoke`): `{"applied":n,"stale":n,
//!   "rejected":[reason]}`, or an error `Retryable`.
//!
//! - EventBridge's scheduled event (every 5 minutes): the fleet's drift, from the drift index,
//!   as metrics (`DevicesDrifting`, `OldestDriftAge`); answered with the summary.
//!
//! An event that cannot be read is rejected with its reason (logged, counted), never retried.

use std::sync::Arc;
use std::time::Instant;

use fleet_shared::adapters::aws::TwinsTable;
use fleet_shared::ingest::{parse_event, OwnedInbound, Trigger};
use fleet_shared::lambda::{self, AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::ports::TwinStore;
use fleet_shared::twin::{sync, TwinChange, TwinEvent};
use fleet_shared::{time, StoreError};
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{info, warn};

pub const FUNCTION: &str = "twin-sync";

/// Everything the handler needs, built once per cold start.
pub struct Deps<T> {
    /// Twins table: read and conditional write.
    pub twins: T,
    /// Milliseconds since the epoch; tests pass a fixed clock.
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

impl Deps<TwinsTable> {
    /// On AWS: the Twins table (`FLEET_TWINS_TABLE`).
    pub fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        Ok(Self {
            twins: TwinsTable::from_env(&aws.sdk, &aws.env)?,
            clock: time::now_ms,
            metrics: MetricsOut::stdout(&aws.env)?,
        })
    }
}

#[cfg(feature = "embedded")]
pub type EmbeddedDeps = Deps<fleet_shared::adapters::embedded::SqliteStore>;

#[cfg(feature = "embedded")]
impl EmbeddedDeps {
    /// On the embedded backend: the one SQLite database; the stage is `local`.
    pub fn on_embedded(e: &lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        Ok(Self {
            twins: e.db.clone(),
            clock: time::now_ms,
            metrics: MetricsOut::Stdout { stage: "local".to_owned() },
        })
    }
}

/// What one batch of events did.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    pub events: usize,
    pub applied: usize,
    pub stale: usize,
    /// Events refused for good, with the reason (unreadable, or a store refusal).
    pub rejected: Vec<(String, String)>,
    /// Events that failed transiently: (message id, error), retried.
    pub failed: Vec<(String, Arc<StoreError>)>,
}

/// The answer to a direct invocation.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DirectResponse {
    pub applied: usize,
    pub stale: usize,
    pub rejected: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Response {
    Sqs(aws_lambda_events::event::sqs::SqsBatchResponse),
    Direct(DirectResponse),
    Sweep(SweepResponse),
}

/// The answer to a scheduled invocation: the fleet's drift.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepResponse {
    pub drifting: u64,
    pub oldest_drift_age_s: i64,
}

/// Just enough of an event to tell EventBridge's scheduled event from the others.
#[derive(Deserialize)]
struct Scheduled<'a> {
    source: Option<&'a str>,
    #[serde(rename = "detail-type")]
    detail_type: Option<&'a str>,
}

fn is_scheduled(payload: &str) -> bool {
    serde_json::from_str::<Scheduled<'_>>(payload)
        .is_ok_and(|e| e.source == Some("aws.events") && e.detail_type == Some("Scheduled Event"))
}

/// The scheduled sweep: the fleet's drift from the drift index, as metrics.
pub async fn sweep<T: TwinStore>(deps: &Deps<T>, now: i64) -> Result<SweepResponse, Retryable> {
    let summary = deps
        .twins
        .drift_summary()
        .await
        .map_err(|e| Retryable { what: "drift not summarised", source: Arc::new(e) })?;
    let oldest_drift_age_s = summary.oldest_age_ms(now) / 1000;
    info!(drifting = summary.drifting, oldest_drift_age_s, "fleet drift");
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: now,
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![
            ("DevicesDrifting", summary.drifting as f64, Unit::Count),
            ("OldestDriftAge", oldest_drift_age_s as f64, Unit::Seconds),
        ],
    }]);
    Ok(SweepResponse { drifting: summary.drifting, oldest_drift_age_s })
}

pub async fn handle<T: TwinStore>(
    deps: &Deps<T>,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<Response, Retryable> {
    let now = (deps.clock)();
    if is_scheduled(event.payload.get()) {
        return sweep(deps, now).await.map(Response::Sweep);
    }
    match parse_event(event.payload.get(), now) {
        Trigger::Sqs(messages) => {
            let outcome = run(deps, now, &messages).await;
            Ok(Response::Sqs(lambda::batch_response(outcome.failed.iter().map(|(id, _)| id.as_str()))))
        }
        Trigger::Direct(message) => {
            let outcome = run(deps, now, std::slice::from_ref(&message)).await;
            if let Some((_, e)) = outcome.failed.into_iter().next() {
                return Err(Retryable { what: "twin not synced", source: e });
            }
            Ok(Response::Direct(DirectResponse {
                applied: outcome.applied,
                stale: outcome.stale,
                rejected: outcome.rejected.into_iter().map(|(_, why)| why).collect(),
            }))
        }
    }
}

/// Every event of a batch through [`sync`], logged and measured.
pub async fn run<T: TwinStore>(deps: &Deps<T>, now: i64, messages: &[OwnedInbound]) -> SyncOutcome {
    let started = Instant::now();
    let mut out = SyncOutcome { events: messages.len(), ..SyncOutcome::default() };
    for m in messages {
        let event = match m.defect.as_ref() {
            Some(defect) => Err(defect.detail.clone()),
            None => TwinEvent::parse(&m.body).map_err(|e| e.to_string()),
        };
        let event = match event {
            Ok(e) => e,
            Err(why) => {
                warn!(message_id = %m.message_id, reason = %why, "shadow event rejected");
                out.rejected.push((m.message_id.clone(), why));
                continue;
            }
        };
        match sync(&deps.twins, &event).await {
            Ok(TwinChange::Applied) => out.applied += 1,
            Ok(TwinChange::Stale) => out.stale += 1,
            Err(e) if e.is_transient() => {
                warn!(message_id = %m.message_id, error = %e, "twin not synced; will be retried");
                out.failed.push((m.message_id.clone(), Arc::new(e)));
            }
            Err(e) => {
                warn!(message_id = %m.message_id, error = %e, "twin refused by the store");
                out.rejected.push((m.message_id.clone(), e.to_string()));
            }
        }
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    info!(
        events = out.events,
        applied = out.applied,
        stale = out.stale,
        rejected = out.rejected.len(),
        failed = out.failed.len(),
        elapsed_ms,
        "shadow events synced"
    );
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: now,
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![
            ("Events", out.events as f64, Unit::Count),
            ("TwinsUpdated", out.applied as f64, Unit::Count),
            ("StaleIgnored", out.stale as f64, Unit::Count),
            ("Rejected", out.rejected.len() as f64, Unit::Count),
            ("Failed", out.failed.len() as f64, Unit::Count),
            ("BatchDuration", elapsed_ms, Unit::Milliseconds),
        ],
    }]);
    out
}

#[cfg(test)]
mod tests;
