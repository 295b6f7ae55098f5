//! Event → ingest use case → response.
//!
//! Two triggers feed this function:
//! - SQS (the topic rule's queue): an `SqsEvent`; the answer is an `SqsBatchResponse` naming
//!   exactly the messages that failed transiently. Quarantined messages are not retried.
//! - A direct IoT rule → Lambda action: one JSON object; the answer is
//!   `{"accepted":n,"duplicates":n,"quarantined":[{"reason":..}]}`, and a transient failure is
//!   an error so Lambda retries the invocation.

use std::time::Instant;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use fleet_shared::ingest::{
    direct_message, ingest_batch, BatchOutcome, Inbound, IngestPolicy, IngestPorts, Problem,
};
use fleet_shared::ports::{DeviceRegistry, Quarantine, RawArchive, TelemetrySink};
use fleet_shared::{metrics, time, Config, Store};
use lambda_runtime::{Diagnostic, LambdaEvent};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{info, warn};

const FUNCTION: &str = "ingest-telemetry";

/// Everything the handler needs, built once per cold start.
pub struct Deps<S> {
    pub store: S,
    pub policy: IngestPolicy,
    /// Milliseconds since the epoch; tests pass a fixed clock.
    pub clock: fn() -> i64,
    /// Print CloudWatch EMF metric lines to stdout (on in Lambda; the local stack keeps its own counts).
    pub emit_metrics: bool,
}

impl Deps<Store> {
    pub async fn from_env() -> Result<Self, lambda_runtime::Error> {
        let config = Config::from_env()?;
        let store = Store::connect(&config).await?;
        Ok(Self { store, policy: config.policy, clock: time::now_ms, emit_metrics: true })
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct QuarantinedEntry {
    /// The first reason; `problems` has them all.
    pub reason: String,
    pub problems: Vec<Problem>,
}

/// The answer to a direct IoT rule invocation.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DirectResponse {
    pub accepted: usize,
    pub duplicates: usize,
    pub quarantined: Vec<QuarantinedEntry>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Response {
    Sqs(SqsBatchResponse),
    Direct(DirectResponse),
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A downstream store failed; the invocation should be retried.
    #[error("telemetry not stored, retry: {0}")]
    Retryable(String),
    /// The event is neither an SQS batch nor a rule payload object.
    #[error("unrecognised event: {0}")]
    InvalidEvent(String),
}

impl From<HandlerError> for Diagnostic {
    fn from(e: HandlerError) -> Self {
        let error_type = match e {
            HandlerError::Retryable(_) => "Retryable",
            HandlerError::InvalidEvent(_) => "InvalidEvent",
        };
        Diagnostic { error_type: error_type.to_owned(), error_message: e.to_string() }
    }
}

/// Just enough of an event to tell an SQS batch from a rule payload (which may itself
/// carry a field called `Records`).
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "Records")]
    records: Vec<ProbeRecord>,
}

#[derive(Deserialize)]
struct ProbeRecord {
    #[serde(rename = "eventSource")]
    event_source: Option<String>,
}

fn is_sqs_event(raw: &str) -> bool {
    serde_json::from_str::<Probe>(raw).is_ok_and(|p| {
        !p.records.is_empty() && p.records.iter().all(|r| r.event_source.as_deref() == Some("aws:sqs"))
    })
}

pub async fn handle<S>(deps: &Deps<S>, event: LambdaEvent<Box<RawValue>>) -> Result<Response, HandlerError>
where
    S: DeviceRegistry + TelemetrySink + RawArchive + Quarantine,
{
    let raw = event.payload.get();
    if is_sqs_event(raw) {
        let sqs: SqsEvent =
            serde_json::from_str(raw).map_err(|e| HandlerError::InvalidEvent(e.to_string()))?;
        Ok(Response::Sqs(process_sqs(deps, &sqs).await.0))
    } else {
        handle_direct(deps, raw.as_bytes()).await.map(Response::Direct)
    }
}

/// An SQS batch through the ingest use case: the batch response (exactly the messages to
/// retry) and what happened to every message.
pub async fn process_sqs<S>(deps: &Deps<S>, event: &SqsEvent) -> (SqsBatchResponse, BatchOutcome)
where
    S: DeviceRegistry + TelemetrySink + RawArchive + Quarantine,
{
    let now = (deps.clock)();
    let inbound: Vec<Inbound<'_>> = event
        .records
        .iter()
        .map(|m| Inbound {
            message_id: m.message_id.as_deref().unwrap_or_default(),
            received_ms: m.attributes.get("SentTimestamp").and_then(|t| t.parse().ok()).unwrap_or(now),
            body: m.body.as_deref().unwrap_or_default().as_bytes(),
        })
        .collect();
    let outcome = run(deps, now, &inbound).await;
    let mut response = SqsBatchResponse::default();
    for f in &outcome.failed {
        let mut failure = BatchItemFailure::default();
        failure.item_identifier = f.message_id.clone();
        response.batch_item_failures.push(failure);
    }
    (response, outcome)
}

async fn handle_direct<S>(deps: &Deps<S>, body: &[u8]) -> Result<DirectResponse, HandlerError>
where
    S: DeviceRegistry + TelemetrySink + RawArchive + Quarantine,
{
    let now = (deps.clock)();
    #[derive(Deserialize)]
    struct RxOnly {
        rx_ms: Option<i64>,
    }
    let rx_ms = serde_json::from_slice::<RxOnly>(body).ok().and_then(|r| r.rx_ms);
    let message = direct_message(body, rx_ms, now);
    let outcome = run(deps, now, &[message.borrow()]).await;
    if let Some(f) = outcome.failed.first() {
        return Err(HandlerError::Retryable(f.error.clone()));
    }
    Ok(DirectResponse {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        quarantined: outcome
            .quarantined
            .into_iter()
            .map(|q| QuarantinedEntry {
                reason: q.problems.first().map(|p| p.reason.to_string()).unwrap_or_default(),
                problems: q.problems,
            })
            .collect(),
    })
}

async fn run<S>(deps: &Deps<S>, now: i64, inbound: &[Inbound<'_>]) -> BatchOutcome
where
    S: DeviceRegistry + TelemetrySink + RawArchive + Quarantine,
{
    let started = Instant::now();
    let ports = IngestPorts {
        registry: &deps.store,
        sink: &deps.store,
        archive: &deps.store,
        quarantine: &deps.store,
    };
    let outcome = ingest_batch(ports, &deps.policy, now, inbound).await;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    for q in &outcome.quarantined {
        warn!(message_id = %q.message_id, thing = q.thing.as_deref().unwrap_or("?"),
              reasons = ?q.problems.iter().map(|p| p.reason.as_str()).collect::<Vec<_>>(), "quarantined");
    }
    info!(
        messages = outcome.messages,
        accepted = outcome.accepted,
        duplicates = outcome.duplicates,
        quarantined = outcome.quarantined.len(),
        failed = outcome.failed.len(),
        elapsed_ms,
        "batch ingested"
    );
    if deps.emit_metrics {
        for line in metrics::ingest_batch_lines(FUNCTION, &outcome, elapsed_ms, now) {
            println!("{line}");
        }
    }
    outcome
}

#[cfg(test)]
mod tests;
