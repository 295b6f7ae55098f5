//! Handler tests: every event of `events/twin-sync/` through the handler, over the embedded
//! (SQLite, in-memory) Twins store; a failing store for the retry paths.

use anyhow::{anyhow, Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::lambda::ErrorType;
use fleet_shared::model::{ShadowName, ThingName, Twin};
use lambda_runtime::{Context, LambdaEvent};

use super::*;

const CLASSIC: &str = include_str!("../../../../events/twin-sync/documents-classic.json");
const NAMED: &str = include_str!("../../../../events/twin-sync/documents-named.json");
const DELETE: &str = include_str!("../../../../events/twin-sync/delete-classic.json");
const OUT_OF_ORDER: &str = include_str!("../../../../events/twin-sync/sqs-out-of-order.json");
const SWEEP: &str = include_str!("../../../../events/twin-sync/scheduled-sweep.json");

/// The events happen at 2025-11-24T16:00:00Z and a few minutes after.
fn fixed_clock() -> i64 {
    1_764_000_400_000
}

fn deps() -> Result<EmbeddedDeps> {
    Ok(Deps { twins: SqliteStore::in_memory()?, shadows: None, clock: fixed_clock, metrics: MetricsOut::Off })
}

async fn invoke<T: TwinStore + TwinPolicies>(deps: &Deps<T>, event: &str) -> Result<Response, Retryable> {
    let payload = RawValue::from_string(event.to_owned()).expect("JSON");
    handle(deps, LambdaEvent::new(payload, Context::default())).await
}

async fn twin(deps: &EmbeddedDeps, thing: &str, shadow: &str) -> Result<Twin> {
    deps.twins
        .twin(&ThingName::parse(thing)?, &ShadowName::parse(shadow)?)
        .await?
        .ok_or_else(|| anyhow!("no twin"))
}

fn direct(r: Response) -> Result<DirectResponse> {
    match r {
        Response::Direct(d) => Ok(d),
        other => Err(anyhow!("expected a direct response, got {other:?}")),
    }
}

#[tokio::test]
async fn a_documents_event_mirrors_the_shadow_with_its_drift() -> Result<()> {
    let deps = deps()?;
    let r = direct(invoke(&deps, CLASSIC).await?)?;
    assert_eq!(r, DirectResponse { applied: 1, stale: 0, rejected: vec![] });
    let t = twin(&deps, "sensor-001", "").await?;
    assert_eq!(
        (t.version, t.drift_keys(), t.drift_since_ms),
        (1, vec!["fw".to_owned()], Some(1_764_000_000_000))
    );
    assert_eq!(t.reported["bat"], 81);
    // the same event again changes nothing
    assert_eq!(
        direct(invoke(&deps, CLASSIC).await?)?,
        DirectResponse { applied: 0, stale: 1, rejected: vec![] }
    );
    Ok(())
}

#[tokio::test]
async fn a_named_shadow_is_its_own_twin() -> Result<()> {
    let deps = deps()?;
    direct(invoke(&deps, NAMED).await?)?;
    let t = twin(&deps, "sensor-002", "config").await?;
    assert_eq!((t.version, t.drift_keys()), (7, vec!["rate_s".to_owned()]));
    assert!(deps.twins.twin(&ThingName::parse("sensor-002")?, &ShadowName::classic()).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn an_out_of_order_batch_with_a_duplicate_ends_at_the_highest_version_and_rejects_the_unreadable(
) -> Result<()> {
    let deps = deps()?;
    let Response::Sqs(r) = invoke(&deps, OUT_OF_ORDER).await? else { return Err(anyhow!("expected SQS")) };
    assert!(r.batch_item_failures.is_empty(), "an unreadable event is rejected, not retried");
    let t = twin(&deps, "sensor-001", "").await?;
    assert_eq!((t.version, t.drift_since_ms, t.delta.is_empty()), (3, None, true), "{t:?}");
    let messages = fleet_shared::ingest::messages_from_event(OUT_OF_ORDER, fixed_clock());
    let outcome = run(&deps, fixed_clock(), &messages).await;
    assert_eq!(
        (outcome.applied, outcome.stale, outcome.rejected.len()),
        (0, 4, 1),
        "a redelivery is all stale"
    );
    assert!(outcome.rejected[0].1.contains("thing"), "{:?}", outcome.rejected);
    Ok(())
}

#[tokio::test]
async fn a_delete_is_mirrored() -> Result<()> {
    let deps = deps()?;
    invoke(&deps, CLASSIC).await?;
    assert_eq!(direct(invoke(&deps, DELETE).await?)?.applied, 1);
    let t = twin(&deps, "sensor-001", "").await?;
    assert!(t.deleted && t.desired.is_empty() && t.drift_since_ms.is_none(), "{t:?}");
    Ok(())
}

#[tokio::test]
async fn the_scheduled_sweep_reports_the_fleet_drift_as_metrics() -> Result<()> {
    // GIVEN sensor-001 drifting on fw since 16:00:00 and sensor-002's config since its event
    let collected = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&collected);
    let mut deps = deps()?;
    deps.metrics = MetricsOut::Collect(Arc::new(move |set: &MetricSet| {
        sink.lock().expect("lock").push(set.clone());
    }));
    invoke(&deps, CLASSIC).await?;
    invoke(&deps, NAMED).await?;
    // WHEN the scheduled event comes
    let Response::Sweep(r) = invoke(&deps, SWEEP).await? else { return Err(anyhow!("expected a sweep")) };
    // THEN two twins drift, the oldest since 16:00:00, 400 s before the fixed clock
    assert_eq!(r, SweepResponse { drifting: 2, oldest_drift_age_s: 400, ..SweepResponse::default() });
    let sets = collected.lock().expect("lock").clone();
    let sweep = sets.last().context("no metrics")?;
    let value = |name: &str| sweep.values.iter().find(|(n, _, _)| *n == name).map(|(_, v, _)| *v);
    assert_eq!((value("DevicesDrifting"), value("OldestDriftAge")), (Some(2.0), Some(400.0)));
    Ok(())
}

#[tokio::test]
async fn a_sweep_on_a_busy_store_fails_retryable() -> Result<()> {
    let deps =
        Deps { twins: Busy, shadows: None::<NoShadowService>, clock: fixed_clock, metrics: MetricsOut::Off };
    let err = invoke(&deps, SWEEP).await.err().context("a busy store must fail the sweep")?;
    assert_eq!(err.error_type(), "Retryable");
    Ok(())
}

#[tokio::test]
async fn the_sweep_marks_keys_drifting_past_their_policy_once_and_counts_releases_it_cannot_make(
) -> Result<()> {
    use fleet_shared::model::StaleAction;
    use fleet_shared::twin::policy::StalePolicy;
    // GIVEN sensor-001 drifting on fw since 16:00:00 (400 s before the clock), sensor-002's
    // config on rate_s, a report policy on fw after 5 minutes and a release policy on rate_s
    let deps = deps()?;
    invoke(&deps, CLASSIC).await?;
    invoke(&deps, NAMED).await?;
    deps.twins.set_policy(&StalePolicy::new("fw", 300_000, StaleAction::Report)?).await?;
    deps.twins.set_policy(&StalePolicy::new("rate_s", 300_000, StaleAction::Release)?).await?;
    // WHEN the sweep runs twice
    let Response::Sweep(first) = invoke(&deps, SWEEP).await? else { return Err(anyhow!("expected a sweep")) };
    let Response::Sweep(second) = invoke(&deps, SWEEP).await? else {
        return Err(anyhow!("expected a sweep"));
    };
    // THEN both keys are marked once; the release has no shadow service here, each time
    assert_eq!((first.diverged, first.released, first.release_failed), (2, 0, 1));
    assert_eq!((second.diverged, second.released, second.release_failed), (0, 0, 1));
    let fw = twin(&deps, "sensor-001", "").await?.diverged.remove("fw").context("fw not marked")?;
    assert_eq!(
        (fw.since_ms, fw.marked_ms, fw.action),
        (1_764_000_000_000, fixed_clock(), StaleAction::Report)
    );
    assert_eq!((fw.desired, fw.reported), (serde_json::json!("1.5.0"), Some(serde_json::json!("1.4.2"))));
    let rate =
        twin(&deps, "sensor-002", "config").await?.diverged.remove("rate_s").context("rate_s not marked")?;
    assert!(!rate.released, "nothing released it");
    Ok(())
}

/// A Twins store that is always busy.
struct Busy;

impl TwinStore for Busy {
    async fn twin(&self, _: &ThingName, _: &ShadowName) -> Result<Option<Twin>, StoreError> {
        Err(StoreError::transient("twin get", "throttled"))
    }
    async fn put_twin(&self, _: &Twin) -> Result<bool, StoreError> {
        Err(StoreError::transient("twin put", "throttled"))
    }
    async fn drift_summary(&self) -> Result<fleet_shared::model::DriftSummary, StoreError> {
        Err(StoreError::transient("twins drift summary", "throttled"))
    }
    async fn drifting_page(
        &self,
        _: i64,
        _: Option<fleet_shared::ports::DriftCursor>,
        _: usize,
    ) -> Result<(Vec<Twin>, Option<fleet_shared::ports::DriftCursor>), StoreError> {
        Err(StoreError::transient("twins drifting", "throttled"))
    }
    async fn drifting_since(&self, _: i64, _: usize) -> Result<Vec<Twin>, StoreError> {
        Err(StoreError::transient("twins drifting", "throttled"))
    }
    async fn reporting_fw(&self, _: &str, _: usize) -> Result<Vec<Twin>, StoreError> {
        Err(StoreError::transient("twins by fw", "throttled"))
    }
}

#[tokio::test]
async fn a_busy_store_fails_exactly_the_readable_events_for_retry() -> Result<()> {
    let deps =
        Deps { twins: Busy, shadows: None::<NoShadowService>, clock: fixed_clock, metrics: MetricsOut::Off };
    let Response::Sqs(r) = invoke(&deps, OUT_OF_ORDER).await? else { return Err(anyhow!("expected SQS")) };
    let failed: Vec<&str> = r.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
    assert_eq!(failed, ["twin-0001", "twin-0002", "twin-0003", "twin-0004"]);
    let err = invoke(&deps, CLASSIC).await.expect_err("a direct invocation must fail to be retried");
    assert_eq!(err.error_type(), "Retryable");
    Ok(())
}

impl TwinPolicies for Busy {
    async fn policies(&self) -> Result<Vec<fleet_shared::twin::policy::StalePolicy>, StoreError> {
        Err(StoreError::transient("twin policies", "throttled"))
    }
    async fn set_policy(&self, _: &fleet_shared::twin::policy::StalePolicy) -> Result<(), StoreError> {
        Err(StoreError::transient("twin policy set", "throttled"))
    }
    async fn remove_policy(&self, _: &str) -> Result<bool, StoreError> {
        Err(StoreError::transient("twin policy remove", "throttled"))
    }
}
