//! The SLO ledger: per cohort, the cumulative count of everything since the beginning, one
//! row per minute it changed. What happened in any window is the difference of two rows (the
//! newest, and the newest at or before the window's start), so a burn rate over 5 minutes
//! or 28 days costs the same two reads, whatever the fleet's size.
//!
//! Every minute fleet-health closes the minute that just ended ([`close_minute`]): it adds the
//! minute's counters (messages, reboots, commands, ...) and samples the levels (devices fresh,
//! active, connected) as device-minutes, for each base cohort (class/region/firmware), then
//! recomputes the aggregates (the fleet `*/*/*`, and each class in each region
//! `class/region/*`) as sums of their base cohorts. [`evaluate`] turns two rows into SLIs,
//! burn rates and alert states.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::slo::{p95_ms, Catalog, Events};
use super::tally::{counter, Cohort, Tally};
use crate::ports::LedgerRow;

/// What fleet-health reads to close one minute.
#[derive(Debug, Clone, Default)]
pub struct MinuteReads {
    /// The minute being closed (Unix minute).
    pub minute: i64,
    /// That minute's counters, by base cohort.
    pub counters: BTreeMap<Cohort, Tally>,
    /// The previous minute's `latest`, by base cohort (fresh = data in the last 2 minutes).
    pub previous_latest: BTreeMap<Cohort, i64>,
    /// The next minute's `latest` (the minute in progress when this one is closed: a device
    /// that reported in it has moved its newest data there, and it was fresh at the close).
    pub next_latest: BTreeMap<Cohort, i64>,
    /// `latest` summed over the hour buckets of the last 24 hours, by base cohort.
    pub active: BTreeMap<Cohort, i64>,
    /// The gauges now (devices connected), by base cohort.
    pub gauges: BTreeMap<Cohort, Tally>,
    /// Whether the levels (devices fresh, active, connected) are sampled for this minute.
    /// Only when it is closed on time: the buckets and gauges say where devices are *now*, so
    /// a minute closed late (a run catching up) would be booked with today's levels; it keeps
    /// its counted events and no level sample.
    pub sample_levels: bool,
}

/// Counters that are levels, not events: sampled, never summed into the ledger as they are.
const LEVELS: [&str; 2] = [counter::LATEST, counter::CONNECTED];

/// Close `reads.minute`: add it to the cumulative `heads` (each cohort's newest row and its
/// minute: base cohorts and aggregates) and return the rows that changed, to be written for
/// that minute. A base cohort whose head is already at that minute (a run that stopped after
/// writing it) is not added to twice.
pub fn close_minute(heads: &mut BTreeMap<Cohort, LedgerRow>, reads: &MinuteReads) -> Vec<(Cohort, Tally)> {
    let mut cohorts: BTreeSet<&Cohort> = BTreeSet::new();
    cohorts.extend(reads.counters.keys());
    cohorts.extend(reads.previous_latest.keys());
    cohorts.extend(reads.next_latest.keys());
    cohorts.extend(reads.active.keys());
    cohorts.extend(reads.gauges.keys());

    let mut minutes: BTreeMap<Cohort, Tally> = BTreeMap::new();
    // Connectivity is counted per class and region (a device's firmware is often not known
    // yet when it connects): connected from the gauge of `class/region/-`, against the devices
    // active in the class and region whatever their firmware.
    let mut by_class_region: BTreeMap<Cohort, (i64, i64)> = BTreeMap::new();
    for &cohort in &cohorts {
        if cohort.is_aggregate() {
            continue; // writers count base cohorts only
        }
        let mut minute = Tally::default();
        if let Some(t) = reads.counters.get(cohort) {
            for (k, v) in &t.0 {
                if !LEVELS.contains(&k.as_str()) {
                    minute.add(k, *v);
                }
            }
        }
        let latest_now = reads.counters.get(cohort).map_or(0, |t| t.get(counter::LATEST));
        let around = |m: &BTreeMap<Cohort, i64>| m.get(cohort).copied().unwrap_or(0);
        let fresh = (latest_now + around(&reads.previous_latest) + around(&reads.next_latest)).max(0);
        let active = reads.active.get(cohort).copied().unwrap_or(0).max(fresh);
        if reads.sample_levels {
            minute.add(counter::FRESH_MINUTES, fresh);
            minute.add(counter::ACTIVE_MINUTES, active);
        }
        let group = by_class_region.entry(cohort.without_fw()).or_default();
        group.0 += active;
        group.1 += reads.gauges.get(cohort).map_or(0, |g| g.get(counter::CONNECTED));
        minutes.insert(cohort.clone(), minute);
    }
    for (group, (active, connected)) in by_class_region.into_iter().filter(|_| reads.sample_levels) {
        let connected = connected.max(0);
        let minute = minutes.entry(group).or_default();
        minute.add(counter::CONNECTED_MINUTES, connected);
        minute.add(counter::CONNECTIVITY_MINUTES, active.max(connected));
    }

    let mut changed: BTreeSet<Cohort> = BTreeSet::new();
    for (cohort, minute) in minutes {
        if minute.is_empty() || heads.get(&cohort).is_some_and(|(m, _)| *m >= reads.minute) {
            continue; // nothing counted, or closed already by a run that stopped after writing it
        }
        let head = heads.entry(cohort.clone()).or_default();
        head.0 = reads.minute;
        head.1.add_all(&minute);
        changed.insert(cohort);
    }

    // Aggregates: sums of their base cohorts, rewritten when one of those changed.
    let touched: BTreeSet<Cohort> = changed.iter().flat_map(|c| c.aggregates()).collect();
    for agg in touched {
        let sum = heads.iter().filter(|(c, _)| !c.is_aggregate() && agg.includes(c)).fold(
            Tally::default(),
            |mut acc, (_, (_, t))| {
                acc.add_all(t);
                acc
            },
        );
        heads.insert(agg.clone(), (reads.minute, sum));
        changed.insert(agg);
    }
    changed.into_iter().map(|c| (c.clone(), heads[&c].1.clone())).collect()
}

/// One SLO's state for one cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SloStatus {
    pub slo: String,
    pub objective: f64,
    /// The SLI over the SLO's window (`None`: no events).
    pub sli: Option<f64>,
    /// Good and total events over the SLO's window.
    pub good: i64,
    pub total: i64,
    /// Share of the error budget left over the SLO's window (negative: overspent).
    pub budget_remaining: f64,
    /// Burn rate per window (minutes), shortest first.
    pub burn_rates: Vec<(i64, Option<f64>)>,
    /// Alerts firing (by severity).
    pub firing: Vec<String>,
}

/// Indicators that are not SLOs, over the last hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Indicators {
    pub devices_active: i64,
    pub devices_fresh: i64,
    pub devices_connected: i64,
    /// Quarantined / received.
    pub ingest_error_rate: Option<f64>,
    /// Boot changes per device-hour.
    pub reboots_per_device_hour: Option<f64>,
    /// Mean battery discharge, percent per hour (positive: discharging).
    pub battery_discharge_pct_per_hour: Option<f64>,
    pub command_latency_p95_ms: Option<i64>,
    pub duplicate_clientid: i64,
    pub ota_success_rate: Option<f64>,
}

/// A cohort's health at a minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CohortHealth {
    pub cohort: Cohort,
    pub minute: i64,
    pub slos: Vec<SloStatus>,
    pub last_hour: Indicators,
}

/// The window of `minutes` ending with the head: `head - row at or before (now - minutes)`.
pub fn window(head: &Tally, at_start: Option<&Tally>) -> Tally {
    at_start.map_or_else(|| head.clone(), |s| head.since(s))
}

/// Evaluate a cohort: `head` is its cumulative row at `minute`, `start(w)` its row at or
/// before `minute - w` (`None`: before its first row). `levels` is the last minute's sample
/// (its own counts, for the gauges shown).
pub fn evaluate(
    catalog: &Catalog,
    cohort: &Cohort,
    minute: i64,
    head: &Tally,
    start: &dyn Fn(i64) -> Option<Tally>,
    last_minute: &Tally,
) -> CohortHealth {
    let windows: BTreeMap<i64, Tally> =
        catalog.windows().into_iter().map(|w| (w, window(head, start(w).as_ref()))).collect();
    let over = |w: i64| &windows[&w];
    let slos = catalog
        .slos
        .iter()
        .map(|slo| {
            let whole = slo.events(over(catalog.window_minutes()));
            let burn_rates: Vec<(i64, Option<f64>)> =
                windows.iter().map(|(w, t)| (*w, slo.burn_rate(slo.events(t)))).collect();
            let rate = |w: i64| burn_rates.iter().find(|(x, _)| *x == w).and_then(|(_, r)| *r);
            let firing = catalog
                .alerts
                .iter()
                .filter(|a| a.fires(rate(a.long_minutes), rate(a.short_minutes)))
                .map(|a| a.severity.clone())
                .collect();
            SloStatus {
                slo: slo.name.clone(),
                objective: slo.objective,
                sli: whole.ratio(),
                good: whole.good,
                total: whole.total,
                budget_remaining: slo.budget_remaining(whole),
                burn_rates,
                firing,
            }
        })
        .collect();
    let hour = window(head, start(60).as_ref());
    let ratio = |a: i64, b: i64| (b > 0).then(|| a as f64 / b as f64);
    let ota_ok = hour.get(counter::OTA_SUCCEEDED);
    let last_hour = Indicators {
        devices_active: last_minute.get(counter::ACTIVE_MINUTES),
        devices_fresh: last_minute.get(counter::FRESH_MINUTES),
        devices_connected: last_minute.get(counter::CONNECTED_MINUTES),
        ingest_error_rate: ratio(hour.get(counter::QUARANTINED), hour.get(counter::RECEIVED)),
        reboots_per_device_hour: ratio(hour.get(counter::BOOTS) * 60, hour.get(counter::ACTIVE_MINUTES)),
        battery_discharge_pct_per_hour: ratio(
            hour.get(counter::BATTERY_RATE),
            hour.get(counter::BATTERY_N) * 1000,
        ),
        command_latency_p95_ms: p95_ms(&hour.latency_histogram()),
        duplicate_clientid: hour.get(counter::DUPLICATE_CLIENTID),
        ota_success_rate: ratio(ota_ok, ota_ok + hour.get(counter::OTA_FAILED)),
    };
    CohortHealth { cohort: cohort.clone(), minute, slos, last_hour }
}

/// Events of an SLO in a window, from the window's two rows (the gate's question: "how is
/// SLO S doing for cohort C over window W").
pub fn events_between(
    catalog: &Catalog,
    slo: &str,
    head: &Tally,
    at_start: Option<&Tally>,
) -> Option<Events> {
    catalog.slo(slo).map(|s| s.events(&window(head, at_start)))
}

/// What fleet-health stored after its last run: every evaluated cohort's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The last minute closed.
    pub minute: i64,
    pub computed_at_ms: i64,
    pub cohorts: Vec<CohortHealth>,
}

#[cfg(test)]
mod tests;
