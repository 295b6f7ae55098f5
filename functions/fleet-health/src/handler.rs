//! Every minute (an EventBridge schedule): close the minutes that ended into the SLO ledger,
//! evaluate every SLO of `infra/slos.json` for the fleet and each class in each region, emit
//! SLIs, burn rates and error budgets as EMF, and store the evaluation (dashboards, `fleetctl
//! health`).
//!
//! It never reads the fleet: the functions that see devices (ingest-telemetry, presence,
//! command-ack) add to health counters per cohort and minute as they work
//! (`fleet_shared::health::tally`), and closing a minute reads O(cohorts) items: the minute's,
//! the previous and the next minute's counters (devices fresh at the close: newest data in the
//! last two minutes and the one in progress), 24 hour buckets (devices active in the last
//! day), the gauges, and the ledger's heads (`fleet_shared::health::ledger`).
//!
//! A minute is closed [`GRACE_MS`] after it ends (what was in flight has landed). Minutes missed
//! (the function was failing) are closed on the next run, at most [`MAX_CATCH_UP`] a run; older
//! ones are skipped and counted (`MinutesSkipped`). A minute closed late keeps its counted
//! events (messages, reboots, commands) but no level sample (devices fresh, active, connected:
//! the buckets only say where devices are now). A run that finds nothing to close changes
//! nothing. The template runs one at a time (reserved concurrency 1); a rerun of a minute whose
//! rows were written adds nothing twice (a cohort's head already at that minute is skipped).
//!
//! Metrics (dimensions `Stage`, and):
//! - `Slo`, `Cohort`, `Window`: `BurnRate` (windows `5m`, `30m`, `1h`, `6h`, `28d`);
//! - `Slo`, `Cohort`: `Sli`, `ErrorBudgetRemaining` (over the SLO's window);
//! - `Cohort`: `DevicesActive`, `DevicesFresh`, `DevicesConnected`, `IngestErrorRate`,
//!   `RebootsPerDeviceHour`, `BatteryDischargePctPerHour`, `CommandLatencyP95`,
//!   `DuplicateClientId`, `OtaSuccessRate` (over the last hour; absent without data);
//! - `Function`: `MinutesClosed`, `MinutesSkipped`, `Cohorts`.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleet_shared::adapters::aws::HealthTable;
use fleet_shared::health::ledger::{close_minute, evaluate, window, CohortHealth, HealthReport, MinuteReads};
use fleet_shared::health::slo::Catalog;
use fleet_shared::health::tally::{counter, minute_of, Bucket, Cohort, Tally, MINUTE_MS};
use fleet_shared::lambda::{AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::ports::{HealthLedger, LedgerRow};
use fleet_shared::{time, StoreError};
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{info, warn};

pub const FUNCTION: &str = "fleet-health";

/// A minute is closed this long after it ends.
pub const GRACE_MS: i64 = 10_000;
/// Minutes one run closes at most (an hour of backlog after an outage of this function).
pub const MAX_CATCH_UP: i64 = 60;
/// A cohort active again after this long has its last row renewed. On AWS rows expire 30 days
/// after their minute and windows reach 28 days back, so a row must be renewed when its cohort
/// resumes within 2 days of it falling quiet or later; one day leaves a margin.
pub const RENEW_AFTER_QUIET_MINUTES: i64 = 24 * 60;

/// Everything the handler needs, built once per cold start.
pub struct Deps<L> {
    /// Health table: counters, ledger, cursor, report.
    pub ledger: L,
    pub catalog: Catalog,
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

impl Deps<HealthTable> {
    /// On AWS: the Health table (`FLEET_HEALTH_TABLE`).
    pub fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        Ok(Self {
            ledger: HealthTable::from_env(&aws.sdk, &aws.env)?,
            catalog: Catalog::builtin(),
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
    pub fn on_embedded(e: &fleet_shared::lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        Ok(Self {
            ledger: e.db.clone(),
            catalog: Catalog::builtin(),
            clock: time::now_ms,
            metrics: MetricsOut::Stdout { stage: "local".to_owned() },
        })
    }
}

/// What one run did (the invocation's answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The last minute closed (Unix minute), if any.
    pub closed_through: Option<i64>,
    pub minutes_closed: i64,
    pub minutes_skipped: i64,
    /// Alerts firing: `<slo> <severity> <cohort>`.
    pub firing: Vec<String>,
}

pub async fn handle<L: HealthLedger>(
    deps: &Deps<L>,
    _event: LambdaEvent<Box<RawValue>>,
) -> Result<Answer, Retryable> {
    // Any event is a tick: the schedule's, `cargo lambda invoke`'s, the local stack's.
    run(deps, (deps.clock)())
        .await
        .map_err(|e| Retryable { what: "fleet health not evaluated", source: Arc::new(e) })
}

/// The newest rows of the cohorts in `rows` that were quiet for [`RENEW_AFTER_QUIET_MINUTES`]
/// or more before `minute`: renewed before `minute` is written (see
/// [`HealthLedger::renew_rows`]).
fn quiet_rows(
    before: &BTreeMap<Cohort, LedgerRow>,
    rows: &[(Cohort, Tally)],
    minute: i64,
) -> Vec<(Cohort, LedgerRow)> {
    rows.iter()
        .filter_map(|(cohort, _)| {
            let head = before.get(cohort)?;
            (head.0 <= minute - RENEW_AFTER_QUIET_MINUTES).then(|| (cohort.clone(), head.clone()))
        })
        .collect()
}

/// Close every minute that ended, evaluate, emit and store.
pub async fn run<L: HealthLedger>(deps: &Deps<L>, now: i64) -> Result<Answer, StoreError> {
    let last = minute_of(now - GRACE_MS) - 1;
    let closed = deps.ledger.closed_through().await?;
    let first = closed.map_or(last, |c| c + 1);
    let from = first.max(last - MAX_CATCH_UP + 1);
    let skipped = from - first;
    if skipped > 0 {
        warn!(skipped, from, "minutes too far behind to close; skipped");
    }
    let mut heads = deps.ledger.heads().await?;
    let mut minutes_closed = 0;
    let mut last_minute: BTreeMap<Cohort, Tally> = BTreeMap::new();
    for minute in from..=last {
        // Levels are sampled for the minute that just ended only (see `MinuteReads`).
        let reads = minute_reads(&deps.ledger, minute, minute == last).await?;
        let before = heads.clone();
        let rows = close_minute(&mut heads, &reads);
        let renewed = quiet_rows(&before, &rows, minute);
        if !renewed.is_empty() {
            deps.ledger.renew_rows(minute, &renewed).await?;
        }
        deps.ledger.close_minute(minute, &rows).await?;
        minutes_closed += 1;
        if minute == last {
            last_minute =
                rows.iter().map(|(c, t)| (c.clone(), window(t, before.get(c).map(|(_, t)| t)))).collect();
        }
    }
    if minutes_closed == 0 {
        // A second tick in the same minute: the stored evaluation stands.
        return Ok(Answer { closed_through: closed, minutes_closed, minutes_skipped: 0, firing: vec![] });
    }
    let minute = last;

    // Evaluate the aggregates: the fleet and each class in each region.
    let mut cohorts = Vec::new();
    for (cohort, (_, head)) in heads.iter().filter(|(c, _)| c.is_aggregate()) {
        let mut starts = BTreeMap::new();
        // The catalog's windows, and the last hour (the indicators').
        let windows = deps.catalog.windows().into_iter().chain([60]);
        for w in windows {
            starts.insert(w, deps.ledger.row_at(cohort, minute - w).await?.map(|(_, t)| t));
        }
        let sample = last_minute.get(cohort).cloned().unwrap_or_default();
        let start = |w: i64| starts.get(&w).cloned().flatten();
        cohorts.push(evaluate(&deps.catalog, cohort, minute, head, &start, &sample));
    }
    let firing: Vec<String> = cohorts
        .iter()
        .flat_map(|h| {
            h.slos
                .iter()
                .flat_map(move |s| s.firing.iter().map(move |a| format!("{} {a} {}", s.slo, h.cohort)))
        })
        .collect();
    let report = HealthReport { minute, computed_at_ms: now, cohorts };
    deps.ledger.put_health(&report).await?;
    let mut sets = metrics(&report);
    sets.push(MetricSet {
        timestamp_ms: now,
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![
            ("MinutesClosed", minutes_closed as f64, Unit::Count),
            ("MinutesSkipped", skipped.max(0) as f64, Unit::Count),
            ("Cohorts", heads.keys().filter(|c| !c.is_aggregate()).count() as f64, Unit::Count),
        ],
    });
    deps.metrics.emit(&sets);
    info!(minute, minutes_closed, cohorts = report.cohorts.len(), firing = ?firing, "fleet health evaluated");
    Ok(Answer { closed_through: Some(minute), minutes_closed, minutes_skipped: skipped.max(0), firing })
}

/// What closing `minute` reads: its counters, the previous and the next (in progress)
/// minute's, the hour buckets of the last 24 hours (and the next minute's hour, where devices
/// that reported since moved their newest data), the gauges.
async fn minute_reads<L: HealthLedger>(
    ledger: &L,
    minute: i64,
    sample_levels: bool,
) -> Result<MinuteReads, StoreError> {
    let hour_of = |m: i64| m * MINUTE_MS / fleet_shared::health::tally::HOUR_MS;
    let (first_hour, last_hour) = (hour_of(minute) - 23, hour_of(minute + 1));
    let mut buckets =
        vec![Bucket::Minute(minute), Bucket::Minute(minute - 1), Bucket::Minute(minute + 1), Bucket::Gauge];
    buckets.extend((first_hour..=last_hour).map(Bucket::Hour));
    let mut got = ledger.buckets(&buckets).await?;
    let latest = |t: BTreeMap<Cohort, Tally>| -> BTreeMap<Cohort, i64> {
        t.into_iter().map(|(c, t)| (c, t.get(counter::LATEST))).collect()
    };
    let mut active: BTreeMap<Cohort, i64> = BTreeMap::new();
    for h in first_hour..=last_hour {
        for (c, n) in latest(got.remove(&Bucket::Hour(h)).unwrap_or_default()) {
            *active.entry(c).or_default() += n;
        }
    }
    Ok(MinuteReads {
        minute,
        counters: got.remove(&Bucket::Minute(minute)).unwrap_or_default(),
        previous_latest: latest(got.remove(&Bucket::Minute(minute - 1)).unwrap_or_default()),
        next_latest: latest(got.remove(&Bucket::Minute(minute + 1)).unwrap_or_default()),
        active,
        gauges: got.remove(&Bucket::Gauge).unwrap_or_default(),
        sample_levels,
    })
}

/// `5m`, `1h`, `28d`: a window's name in metrics and alarms.
pub fn window_name(minutes: i64) -> String {
    match minutes {
        m if m % (24 * 60) == 0 => format!("{}d", m / (24 * 60)),
        m if m % 60 == 0 => format!("{}h", m / 60),
        m => format!("{m}m"),
    }
}

/// The EMF metric sets of an evaluation.
pub fn metrics(report: &HealthReport) -> Vec<MetricSet> {
    let at = (report.minute + 1) * MINUTE_MS;
    let mut sets = Vec::new();
    for h in &report.cohorts {
        sets.extend(cohort_metrics(at, h));
    }
    sets
}

fn cohort_metrics(at: i64, h: &CohortHealth) -> Vec<MetricSet> {
    let cohort = h.cohort.to_string();
    let mut sets = Vec::new();
    for s in &h.slos {
        for (w, rate) in &s.burn_rates {
            if let Some(rate) = rate {
                sets.push(MetricSet {
                    timestamp_ms: at,
                    dimensions: vec![
                        ("Slo", s.slo.clone()),
                        ("Cohort", cohort.clone()),
                        ("Window", window_name(*w)),
                    ],
                    values: vec![("BurnRate", *rate, Unit::Count)],
                });
            }
        }
        let mut values = vec![("ErrorBudgetRemaining", s.budget_remaining, Unit::Count)];
        values.extend(s.sli.map(|v| ("Sli", v, Unit::Count)));
        sets.push(MetricSet {
            timestamp_ms: at,
            dimensions: vec![("Slo", s.slo.clone()), ("Cohort", cohort.clone())],
            values,
        });
    }
    let i = &h.last_hour;
    let mut values = vec![
        ("DevicesActive", i.devices_active as f64, Unit::Count),
        ("DevicesFresh", i.devices_fresh as f64, Unit::Count),
        ("DevicesConnected", i.devices_connected as f64, Unit::Count),
        ("DuplicateClientId", i.duplicate_clientid as f64, Unit::Count),
    ];
    let optional = [
        ("IngestErrorRate", i.ingest_error_rate, Unit::Count),
        ("RebootsPerDeviceHour", i.reboots_per_device_hour, Unit::Count),
        ("BatteryDischargePctPerHour", i.battery_discharge_pct_per_hour, Unit::Count),
        ("CommandLatencyP95", i.command_latency_p95_ms.map(|v| v as f64), Unit::Milliseconds),
        ("OtaSuccessRate", i.ota_success_rate, Unit::Count),
    ];
    values.extend(optional.into_iter().filter_map(|(n, v, u)| v.map(|v| (n, v, u))));
    sets.push(MetricSet { timestamp_ms: at, dimensions: vec![("Cohort", cohort)], values });
    sets
}

#[cfg(test)]
mod tests;
