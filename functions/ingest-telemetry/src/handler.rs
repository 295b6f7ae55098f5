//! Event → ingest use case → response.
//!
//! Two triggers feed this function (told apart by `fleet_shared::ingest::parse_event`):
//! - SQS (the topic rule's queue): the answer is an `SqsBatchResponse` naming exactly the
//!   messages that failed transiently. Quarantined messages are not retried.
//! - A direct IoT rule → Lambda action: one JSON object; the answer is
//!   `{"accepted":n,"duplicates":n,"quarantined":[{"reason":..}]}`, and a transient failure is
//!   an error (`errorType: Retryable`) so Lambda retries the invocation.

use std::time::Instant;

use aws_lambda_events::event::sqs::SqsBatchResponse;
use fleet_shared::adapters::aws::{
    registration_cache_ttl, DevicesTable, HealthTable, HotStore, HotStoreKind, S3Archive,
};
use fleet_shared::ingest::metrics::ingest_batch_metrics;
use fleet_shared::ingest::{
    ingest_batch, parse_event, BatchOutcome, IngestPolicy, IngestPorts, OwnedInbound, Problem, Trigger,
};
use fleet_shared::lambda::{self, AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::MetricsOut;
use fleet_shared::ports::{DeviceRegistry, HealthCounters, Quarantine, RawArchive, TelemetrySink};
use fleet_shared::time;
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{info, warn};

pub const FUNCTION: &str = "ingest-telemetry";

/// Everything the handler needs, built once per cold start: one field per port (the
/// template grants exactly these), the time rules, the clock and where metrics go.
pub struct Deps<R, S, A, Q, H> {
    /// Devices table: enrichment lookup + last-seen state.
    pub registry: R,
    /// Hot store.
    pub sink: S,
    /// Raw archive (`raw/`).
    pub archive: A,
    /// Quarantine (`quarantine/`).
    pub quarantine: Q,
    /// Health counters (Health table): messages and devices' newest data per cohort.
    pub health: H,
    pub policy: IngestPolicy,
    /// Milliseconds since the epoch; tests pass a fixed clock.
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

impl Deps<DevicesTable, HotStore, S3Archive, S3Archive, HealthTable> {
    /// On AWS: the Devices table, the archive bucket and the hot store the deployment chose
    /// (`FLEET_HOT_STORE`: Timestream, or none), each from its own variables, all from the one
    /// `SdkConfig`.
    pub async fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        let archive = S3Archive::from_env(&aws.sdk, &aws.env)?;
        let hot = HotStoreKind::from_env(&aws.env)?;
        Ok(Self {
            registry: DevicesTable::from_env(&aws.sdk, &aws.env)?
                .caching_registrations(registration_cache_ttl(&aws.env)?),
            sink: HotStore::from_env(&aws.sdk, &aws.env).await?,
            quarantine: archive.clone(),
            archive,
            health: HealthTable::from_env(&aws.sdk, &aws.env)?,
            policy: hot.policy(IngestPolicy::from_env(&aws.env, &fleet_shared::BackendKind::Aws)?),
            clock: time::now_ms,
            metrics: MetricsOut::stdout(&aws.env)?,
        })
    }
}

#[cfg(feature = "embedded")]
pub type EmbeddedDeps = Deps<
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
>;

#[cfg(feature = "embedded")]
impl EmbeddedDeps {
    /// On the embedded backend: every port on the one SQLite database.
    pub fn on_embedded(e: &lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        let kind = fleet_shared::BackendKind::Embedded { db_path: Default::default() };
        // The embedded backend is its own stage: `local`.
        let metrics = MetricsOut::Stdout { stage: "local".to_owned() };
        Ok(Self::embedded(e.db.clone(), IngestPolicy::from_env(&e.env, &kind)?, metrics))
    }

    pub fn embedded(
        db: fleet_shared::adapters::embedded::SqliteStore,
        policy: IngestPolicy,
        metrics: MetricsOut,
    ) -> Self {
        Self {
            registry: db.clone(),
            sink: db.clone(),
            archive: db.clone(),
            quarantine: db.clone(),
            health: db,
            policy,
            clock: time::now_ms,
            metrics,
        }
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

pub async fn handle<R, S, A, Q, H>(
    deps: &Deps<R, S, A, Q, H>,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<Response, Retryable>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
    H: HealthCounters,
{
    let now = (deps.clock)();
    match parse_event(event.payload.get(), now) {
        Trigger::Sqs(messages) => {
            let outcome = run(deps, now, &messages).await;
            Ok(Response::Sqs(lambda::batch_response(outcome.failed.iter().map(|f| f.message_id.as_str()))))
        }
        Trigger::Direct(message) => direct(deps, now, message).await.map(Response::Direct),
    }
}

async fn direct<R, S, A, Q, H>(
    deps: &Deps<R, S, A, Q, H>,
    now: i64,
    message: OwnedInbound,
) -> Result<DirectResponse, Retryable>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
    H: HealthCounters,
{
    let outcome = run(deps, now, std::slice::from_ref(&message)).await;
    if let Some(f) = outcome.failed.into_iter().next() {
        return Err(Retryable { what: "telemetry not stored", source: f.error });
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

/// One batch of messages through the ingest use case, logged and measured.
pub async fn run<R, S, A, Q, H>(
    deps: &Deps<R, S, A, Q, H>,
    now: i64,
    messages: &[OwnedInbound],
) -> BatchOutcome
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
    H: HealthCounters,
{
    let started = Instant::now();
    let inbound: Vec<_> = messages.iter().map(OwnedInbound::borrow).collect();
    let ports = IngestPorts {
        registry: &deps.registry,
        sink: &deps.sink,
        archive: &deps.archive,
        quarantine: &deps.quarantine,
    };
    let outcome = ingest_batch(ports, &deps.policy, now, &inbound).await;
    // The batch is stored: a count that fails is logged, not retried (a retry would store
    // nothing new and count the batch twice).
    let health_failed = match deps.health.add_health(&outcome.health).await {
        Ok(()) => false,
        Err(e) => {
            warn!(error = %e, "health counters not updated");
            true
        }
    };
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    for q in &outcome.quarantined {
        warn!(message_id = %q.message_id, thing = q.thing.as_deref().unwrap_or("?"),
              reasons = ?q.problems.iter().map(|p| p.reason.as_str()).collect::<Vec<_>>(), "quarantined");
    }
    for f in &outcome.failed {
        warn!(message_id = %f.message_id, error = %f.error, "not stored; will be retried");
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
    let mut metrics = ingest_batch_metrics(FUNCTION, &outcome, elapsed_ms, now);
    if let Some(first) = metrics.first_mut() {
        first.values.push((
            "HealthNotCounted",
            f64::from(u8::from(health_failed)),
            fleet_shared::metrics::Unit::Count,
        ));
    }
    deps.metrics.emit(&metrics);
    outcome
}

#[cfg(test)]
mod tests;
