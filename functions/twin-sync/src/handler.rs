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

use fleet_shared::adapters::aws::{IotDataShadows, TwinsTable};
use fleet_shared::ingest::{parse_event, OwnedInbound, Trigger};
use fleet_shared::lambda::{self, AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::model::{StaleAction, Twin};
use fleet_shared::ports::{NoShadowService, ShadowService, TwinPolicies, TwinStore};
use fleet_shared::twin::policy::{self, ReleaseOutcome, StalePolicy};
use fleet_shared::twin::{sync, TwinChange, TwinEvent};
use fleet_shared::{time, StoreError};
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{info, warn};

pub const FUNCTION: &str = "twin-sync";

/// Everything the handler needs, built once per cold start.
pub struct Deps<T, S = NoShadowService> {
    /// Twins table: read and conditional write, the drift index, the stale-desired policies.
    pub twins: T,
    /// The Device Shadow service, for `release` policies; `None` where none is reachable
    /// (such releases are then counted as `ReleaseUnavailable` and the keys stay marked).
    pub shadows: Option<S>,
    /// Milliseconds since the epoch; tests pass a fixed clock.
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

impl Deps<TwinsTable, IotDataShadows> {
    /// On AWS: the Twins table (`FLEET_TWINS_TABLE`), and iot-data when the deployment names
    /// its endpoint (`FLEET_IOT_DATA_ENDPOINT`).
    pub fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        Ok(Self {
            twins: TwinsTable::from_env(&aws.sdk, &aws.env)?,
            shadows: IotDataShadows::configured(&aws.sdk, &aws.env)?,
            clock: time::now_ms,
            metrics: MetricsOut::stdout(&aws.env)?,
        })
    }
}

#[cfg(feature = "embedded")]
pub type EmbeddedDeps<S = NoShadowService> = Deps<fleet_shared::adapters::embedded::SqliteStore, S>;

#[cfg(feature = "embedded")]
impl EmbeddedDeps {
    /// On the embedded backend: the one SQLite database; the stage is `local`. No shadow
    /// service (the local IoT Core gives its own, see `fleet_local::catalog`).
    pub fn on_embedded(e: &lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        Ok(Self {
            twins: e.db.clone(),
            shadows: None,
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

/// The answer to a scheduled invocation: the fleet's drift, and what the stale-desired
/// policies did.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SweepResponse {
    pub drifting: u64,
    pub oldest_drift_age_s: i64,
    /// Keys newly marked diverged.
    pub diverged: usize,
    /// Keys removed from a shadow's desired state (`release`).
    pub released: usize,
    /// Releases that failed (retried at the next sweep) or had no shadow service.
    pub release_failed: usize,
    /// The time budget ran out before every long-drifting twin was read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unfinished: bool,
}

/// Twins per page of the drift index the sweep reads.
pub const SWEEP_PAGE: usize = 500;
/// Wall time one sweep may spend on the policies (the function times out at 30 s); what it
/// did not reach it reaches at the next sweep, which starts from the oldest drift again.
pub const SWEEP_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

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

/// The scheduled sweep: the fleet's drift from the drift index, and the stale-desired
/// policies applied to the twins drifting longer than the shortest policy window; as metrics.
pub async fn sweep<T, S>(deps: &Deps<T, S>, now: i64) -> Result<SweepResponse, Retryable>
where
    T: TwinStore + TwinPolicies,
    S: ShadowService,
{
    let retry = |what| move |e| Retryable { what, source: Arc::new(e) };
    let summary = deps.twins.drift_summary().await.map_err(retry("drift not summarised"))?;
    let mut out = SweepResponse {
        drifting: summary.drifting,
        oldest_drift_age_s: summary.oldest_age_ms(now) / 1000,
        ..SweepResponse::default()
    };
    let policies = deps.twins.policies().await.map_err(retry("stale-desired policies not read"))?;
    if let Some(shortest) = policies.iter().map(|p| p.diverge_after_ms).min() {
        // Every twin drifting longer than the shortest policy, page by page, within the budget.
        let started = Instant::now();
        let mut cursor = None;
        loop {
            let (page, next) = deps
                .twins
                .drifting_page(now - shortest, cursor, SWEEP_PAGE)
                .await
                .map_err(retry("drifting twins not read"))?;
            for twin in page {
                apply_policies(deps, &policies, twin, now, &mut out).await;
            }
            cursor = next;
            if cursor.is_none() {
                break;
            }
            if started.elapsed() > SWEEP_BUDGET {
                warn!(
                    budget_s = SWEEP_BUDGET.as_secs(),
                    "sweep budget spent; the rest waits for the next sweep"
                );
                out.unfinished = true;
                break;
            }
        }
    }
    info!(
        drifting = out.drifting,
        oldest_drift_age_s = out.oldest_drift_age_s,
        diverged = out.diverged,
        released = out.released,
        release_failed = out.release_failed,
        "fleet drift"
    );
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: now,
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![
            ("DevicesDrifting", out.drifting as f64, Unit::Count),
            ("OldestDriftAge", out.oldest_drift_age_s as f64, Unit::Seconds),
            ("Diverged", out.diverged as f64, Unit::Count),
            ("Released", out.released as f64, Unit::Count),
            ("ReleaseFailed", out.release_failed as f64, Unit::Count),
        ],
    }]);
    Ok(out)
}

/// Mark the divergences due on one twin (conditional write, re-read on a race), then release
/// every `release` key not released yet. Failures are logged and counted; the next sweep
/// tries again.
async fn apply_policies<T, S>(
    deps: &Deps<T, S>,
    policies: &[StalePolicy],
    twin: Twin,
    now: i64,
    out: &mut SweepResponse,
) where
    T: TwinStore + TwinPolicies,
    S: ShadowService,
{
    let (thing, shadow) = (twin.thing.clone(), twin.shadow.clone());
    let twin = match mark_due(&deps.twins, policies, twin, now).await {
        Ok((twin, marked)) => {
            out.diverged += marked;
            twin
        }
        Err(e) => {
            warn!(%thing, %shadow, error = %e, "divergence not marked");
            return;
        }
    };
    for (key, d) in twin.diverged.iter().filter(|(_, d)| d.action == StaleAction::Release && !d.released) {
        let Some(svc) = &deps.shadows else {
            warn!(%thing, %shadow, key, "release policy, but no shadow service is configured (FLEET_IOT_DATA_ENDPOINT)");
            out.release_failed += 1;
            continue;
        };
        let token = release_token(&twin, key, now);
        match policy::release(svc, &thing, &shadow, key, &d.desired, &token).await {
            Ok(ReleaseOutcome::Released { version }) => {
                info!(%thing, %shadow, key, version, "desired key released");
                out.released += 1;
            }
            Ok(ReleaseOutcome::NotNeeded) => {}
            Ok(other) => {
                warn!(%thing, %shadow, key, outcome = ?other, "desired key not released");
                out.release_failed += 1;
            }
            Err(e) => {
                warn!(%thing, %shadow, key, error = %e, "desired key not released");
                out.release_failed += 1;
            }
        }
    }
}

/// Write the divergences due on `twin`, conditioned on its revision; on a race, read it again
/// (the index copy may be behind) and decide again. The twin as stored, and how many keys
/// were marked.
async fn mark_due<T: TwinStore>(
    twins: &T,
    policies: &[StalePolicy],
    mut twin: Twin,
    now: i64,
) -> Result<(Twin, usize), StoreError> {
    for _ in 0..fleet_shared::twin::MAX_SYNC_ATTEMPTS {
        let due = policy::due(&twin, policies, now);
        if due.is_empty() {
            return Ok((twin, 0));
        }
        let marked = due.len();
        let mut next = twin.clone();
        next.diverged.extend(due);
        next.revision += 1;
        if twins.put_twin(&next).await? {
            return Ok((next, marked));
        }
        match twins.twin(&twin.thing, &twin.shadow).await? {
            Some(stored) => twin = stored,
            None => return Ok((twin, 0)),
        }
    }
    Err(StoreError::transient("twin divergence mark", "the twin kept changing underneath"))
}

/// A clientToken (at most 64 bytes) naming this release by this sweep, the same on every try.
fn release_token(twin: &Twin, key: &str, now: i64) -> String {
    let text = format!("{}/{}/{key}", twin.thing, twin.shadow.as_str());
    let h = fleet_shared::hash::fnv1a64(text.as_bytes());
    format!("fleetline-release-{h:016x}-{now}")
}

pub async fn handle<T: TwinStore + TwinPolicies, S: ShadowService>(
    deps: &Deps<T, S>,
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
pub async fn run<T: TwinStore, S>(deps: &Deps<T, S>, now: i64, messages: &[OwnedInbound]) -> SyncOutcome {
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
