//! SLOs: the catalog (`infra/slos.json`, read here at build time and by the template's
//! generated alarms), what each SLI counts as good and total, burn rates and the
//! multi-window alert rule.
//!
//! An SLI over a window is `good / total` events counted in it. An SLO says what share must
//! be good over its window (e.g. freshness ≥ 95 % over 28 days); `1 - objective` is the error
//! budget. The burn rate over a window `W` is the bad share in `W` divided by the budget: at
//! 1 the budget lasts exactly the SLO's window, at 14.4 a 28-day budget's 2 % is gone in an
//! hour. An alert fires when both its long and short windows burn faster than its rate (SRE
//! workbook, ch. 5): the long window says enough budget is gone, the short one that it is
//! still burning, so the alert stops soon after the outage does.

use serde::Deserialize;

use super::tally::{counter, latency_bucket, Tally, LATENCY_BOUNDS_MS};

/// The catalog every Fleetline component reads.
pub const CATALOG_JSON: &str = include_str!("../../../infra/slos.json");

/// What an SLI counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SliKind {
    /// Device-minutes with data in the last 2 minutes / active device-minutes.
    Freshness,
    /// Connected device-minutes / active (or connected) device-minutes.
    Connectivity,
    /// Messages not quarantined / messages received.
    IngestSuccess,
    /// Commands acknowledged within the threshold / commands acknowledged.
    CommandLatency,
    /// OTA executions succeeded / finished.
    OtaSuccess,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    pub name: String,
    pub sli: SliKind,
    /// Share of events that must be good, in (0, 1).
    pub objective: f64,
    /// For `command_latency`: the latency that counts as good (one of the bucket bounds).
    #[serde(default)]
    pub threshold_ms: Option<i64>,
    pub description: String,
}

/// A multi-window burn-rate alert.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurnAlert {
    pub severity: String,
    pub long_minutes: i64,
    pub short_minutes: i64,
    pub burn_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(default, rename = "comment")]
    _comment: Option<String>,
    pub window_days: i64,
    pub alerts: Vec<BurnAlert>,
    pub slos: Vec<Slo>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SLO catalog: {0}")]
pub struct CatalogError(pub String);

impl Catalog {
    /// The catalog built into this binary (`infra/slos.json`).
    pub fn builtin() -> Self {
        // Checked by `builtin_catalog_is_valid` below: a build with a broken catalog fails its tests.
        Self::parse(CATALOG_JSON).expect("infra/slos.json is valid (tested)")
    }

    pub fn parse(json: &str) -> Result<Self, CatalogError> {
        let c: Catalog = serde_json::from_str(json).map_err(|e| CatalogError(e.to_string()))?;
        let bad = |m: String| Err(CatalogError(m));
        if !(1..=90).contains(&c.window_days) {
            return bad(format!("window_days {} is not 1-90", c.window_days));
        }
        let mut names = std::collections::BTreeSet::new();
        for s in &c.slos {
            let ok_name = !s.name.is_empty()
                && s.name.len() <= 32
                && s.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok_name || !names.insert(s.name.as_str()) {
                return bad(format!("SLO name {:?} is not unique [a-z0-9-]{{1,32}}", s.name));
            }
            if !(s.objective > 0.0 && s.objective < 1.0) {
                return bad(format!("{}: objective {} is not in (0, 1)", s.name, s.objective));
            }
            match (s.sli, s.threshold_ms) {
                (SliKind::CommandLatency, Some(t)) if LATENCY_BOUNDS_MS.contains(&t) => {}
                (SliKind::CommandLatency, t) => {
                    return bad(format!("{}: threshold_ms {t:?} is not one of {LATENCY_BOUNDS_MS:?}", s.name))
                }
                (_, Some(_)) => {
                    return bad(format!("{}: threshold_ms applies to command_latency only", s.name))
                }
                (_, None) => {}
            }
        }
        for a in &c.alerts {
            if !(a.short_minutes >= 1 && a.short_minutes < a.long_minutes && a.long_minutes <= 24 * 60) {
                return bad(format!(
                    "alert {}: windows {} / {} min",
                    a.severity, a.long_minutes, a.short_minutes
                ));
            }
            if a.burn_rate <= 0.0 {
                return bad(format!("alert {}: burn rate {}", a.severity, a.burn_rate));
            }
        }
        Ok(c)
    }

    pub fn slo(&self, name: &str) -> Option<&Slo> {
        self.slos.iter().find(|s| s.name == name)
    }

    pub fn window_minutes(&self) -> i64 {
        self.window_days * 24 * 60
    }

    /// Every window the SLOs are evaluated over, shortest first: the alerts' and the SLO window.
    pub fn windows(&self) -> Vec<i64> {
        let mut w: Vec<i64> = self.alerts.iter().flat_map(|a| [a.short_minutes, a.long_minutes]).collect();
        w.push(self.window_minutes());
        w.sort_unstable();
        w.dedup();
        w
    }
}

/// Good and total events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Events {
    pub good: i64,
    pub total: i64,
}

impl Events {
    /// The SLI (share good), `None` without events.
    pub fn ratio(&self) -> Option<f64> {
        (self.total > 0).then(|| self.good as f64 / self.total as f64)
    }
}

impl Slo {
    /// Good and total events in what a tally counted.
    pub fn events(&self, t: &Tally) -> Events {
        let (good, total) = match self.sli {
            SliKind::Freshness => (t.get(counter::FRESH_MINUTES), t.get(counter::ACTIVE_MINUTES)),
            SliKind::Connectivity => {
                (t.get(counter::CONNECTED_MINUTES), t.get(counter::CONNECTIVITY_MINUTES))
            }
            SliKind::IngestSuccess => {
                let rx = t.get(counter::RECEIVED);
                (rx - t.get(counter::QUARANTINED), rx)
            }
            SliKind::CommandLatency => {
                let h = t.latency_histogram();
                let limit = latency_bucket(self.threshold_ms.unwrap_or(i64::MAX));
                (h[..=limit.min(h.len() - 1)].iter().sum(), h.iter().sum())
            }
            SliKind::OtaSuccess => {
                let ok = t.get(counter::OTA_SUCCEEDED);
                (ok, ok + t.get(counter::OTA_FAILED))
            }
        };
        // Counters raced by concurrent writers may be off by a little; never past the bounds.
        let total = total.max(0);
        Events { good: good.clamp(0, total), total }
    }

    pub fn error_budget(&self) -> f64 {
        1.0 - self.objective
    }

    /// How fast the budget burns in a window with these events; `None` without events.
    pub fn burn_rate(&self, e: Events) -> Option<f64> {
        e.ratio().map(|r| (1.0 - r) / self.error_budget())
    }

    /// The share of the budget left after the SLO window's events (negative: overspent);
    /// the whole budget without events.
    pub fn budget_remaining(&self, e: Events) -> f64 {
        self.burn_rate(e).map_or(1.0, |b| 1.0 - b)
    }
}

impl BurnAlert {
    /// Whether the alert fires for these burn rates (no events: it does not).
    pub fn fires(&self, long: Option<f64>, short: Option<f64>) -> bool {
        matches!((long, short), (Some(l), Some(s)) if l > self.burn_rate && s > self.burn_rate)
    }
}

/// The p95 of a command latency histogram: the upper bound of the bucket holding it, the last
/// bound for the overflow bucket ("at least"); `None` without samples.
pub fn p95_ms(histogram: &[i64]) -> Option<i64> {
    let n: i64 = histogram.iter().sum();
    if n <= 0 {
        return None;
    }
    let rank = (n * 95 + 99) / 100; // ceil(0.95 n)
    let mut seen = 0;
    for (i, c) in histogram.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(LATENCY_BOUNDS_MS[i.min(LATENCY_BOUNDS_MS.len() - 1)]);
        }
    }
    LATENCY_BOUNDS_MS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::tally::latency_counter;

    #[test]
    fn builtin_catalog_is_valid() {
        let c = Catalog::parse(CATALOG_JSON).unwrap();
        assert!(c.slo("freshness").is_some());
        assert_eq!(c.windows(), vec![5, 30, 60, 360, 28 * 24 * 60]);
    }

    #[test]
    fn refuses_catalogs_that_cannot_be_evaluated() {
        let base = |slo: &str| {
            format!(
                r#"{{"window_days":28,"alerts":[{{"severity":"page","long_minutes":60,"short_minutes":5,"burn_rate":14.4}}],"slos":[{slo}]}}"#
            )
        };
        for bad in [
            r#"{"name":"a","sli":"freshness","objective":1.0,"description":""}"#,
            r#"{"name":"A","sli":"freshness","objective":0.9,"description":""}"#,
            r#"{"name":"a","sli":"command_latency","objective":0.9,"threshold_ms":4000,"description":""}"#,
            r#"{"name":"a","sli":"freshness","objective":0.9,"threshold_ms":5000,"description":""}"#,
            r#"{"name":"a","sli":"nope","objective":0.9,"description":""}"#,
        ] {
            assert!(Catalog::parse(&base(bad)).is_err(), "{bad}");
        }
        let two = r#"{"name":"a","sli":"freshness","objective":0.9,"description":""},{"name":"a","sli":"ingest_success","objective":0.9,"description":""}"#;
        assert!(Catalog::parse(&base(two)).is_err());
    }

    #[test]
    fn burn_rate_is_the_bad_share_over_the_budget() {
        // GIVEN freshness >= 95 % and a window with 900 of 1,000 device-minutes fresh
        let c = Catalog::builtin();
        let slo = c.slo("freshness").unwrap();
        let mut t = Tally::default();
        t.add(counter::FRESH_MINUTES, 900);
        t.add(counter::ACTIVE_MINUTES, 1_000);
        // THEN 10 % bad burns a 5 % budget twice as fast as it may
        let e = slo.events(&t);
        assert_eq!(e, Events { good: 900, total: 1_000 });
        assert!((slo.burn_rate(e).unwrap() - 2.0).abs() < 1e-9);
        assert!((slo.budget_remaining(e) + 1.0).abs() < 1e-9);
        assert_eq!(slo.burn_rate(Events::default()), None);
        assert_eq!(slo.budget_remaining(Events::default()), 1.0);
    }

    #[test]
    fn command_latency_counts_buckets_up_to_the_threshold() {
        let c = Catalog::builtin();
        let slo = c.slo("command-latency").unwrap();
        let mut t = Tally::default();
        t.add(&latency_counter(latency_bucket(40)), 10); // <= 100 ms
        t.add(&latency_counter(latency_bucket(5_000)), 5); // <= 5 s: good
        t.add(&latency_counter(latency_bucket(5_001)), 5); // <= 10 s: bad
        assert_eq!(slo.events(&t), Events { good: 15, total: 20 });
        assert_eq!(p95_ms(&t.latency_histogram()), Some(10_000));
        assert_eq!(p95_ms(&[0; 10]), None);
        // 19 fast, 1 slow: the 95th percentile is the 19th sample, still fast.
        assert_eq!(p95_ms(&[19, 0, 0, 0, 0, 0, 0, 0, 0, 1]), Some(100));
        assert_eq!(p95_ms(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 3]), Some(60_000));
    }

    #[test]
    fn an_alert_needs_both_windows_burning() {
        let a = &Catalog::builtin().alerts[0];
        assert!(a.fires(Some(20.0), Some(15.0)));
        assert!(!a.fires(Some(20.0), Some(1.0)), "the outage is over");
        assert!(!a.fires(Some(2.0), Some(50.0)), "too little budget gone yet");
        assert!(!a.fires(None, Some(50.0)));
    }
}
