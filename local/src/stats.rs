//! Counters the local IoT Core keeps while it runs: what arrived, how it was routed and
//! delivered, how fast, how late, and the functions' own metrics (summed by name, as
//! CloudWatch would from their EMF lines). Nothing here knows what a function does.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use fleet_shared::metrics::MetricSet;
use serde::Serialize;

/// Latency buckets (1 ms each); the last one collects everything slower.
const LATENCY_BUCKETS: usize = 10_001;

#[derive(Default)]
pub struct Stats {
    /// Publishes that matched a rule and were handed to its target.
    pub routed: AtomicU64,
    /// Publishes on topics no rule reads.
    pub unrouted: AtomicU64,
    /// Connects, publishes and subscribes the device policy refused.
    pub refused_by_policy: AtomicU64,
    /// Publishes whose payload is over IoT Core's 128 KiB limit: dropped before any rule.
    pub payload_too_large: AtomicU64,
    /// Queue messages a function handled (not counting redeliveries).
    pub delivered: AtomicU64,
    /// Deliveries that failed transiently and were queued again.
    pub retried: AtomicU64,
    /// Messages that kept failing and went to the (local) dead-letter queue.
    pub dead_lettered: AtomicU64,
    /// Publishes a rule matched but could not deliver (IoT Core's error action): kept in the
    /// quarantine with their original bytes.
    pub rule_errors: AtomicU64,
    /// Every metric the functions emitted, summed by name, and by name and dimension value.
    metrics: Mutex<Metrics>,
    /// Latency histogram: one bucket per millisecond up to `LATENCY_BUCKETS - 1`, the last
    /// bucket for anything slower. Bounded memory however long the stack runs.
    latency_hist: Mutex<Vec<u64>>,
    /// `(ms, delivered)` samples for a messages/s rate.
    samples: Mutex<VecDeque<(i64, u64)>>,
}

#[derive(Default, Clone)]
struct Metrics {
    totals: BTreeMap<String, u64>,
    by_dimension: BTreeMap<String, BTreeMap<String, u64>>,
}

/// A point-in-time copy, for the API and reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    pub routed: u64,
    pub unrouted: u64,
    pub refused_by_policy: u64,
    pub payload_too_large: u64,
    pub delivered: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub rule_errors: u64,
    /// The functions' metrics by name (e.g. `Accepted`, `Quarantined`), summed.
    pub metrics: BTreeMap<String, u64>,
    /// Metrics with a dimension besides `Function`, by name and that dimension's value
    /// (e.g. `QuarantinedByReason` → `malformed_json` → 3).
    pub metrics_by_dimension: BTreeMap<String, BTreeMap<String, u64>>,
    pub messages_per_s: f64,
    pub latency_p50_ms: Option<u32>,
    pub latency_p99_ms: Option<u32>,
}

impl Snapshot {
    /// A metric's sum so far (0 when never emitted).
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics.get(name).copied().unwrap_or(0)
    }
}

impl Stats {
    /// A metric's sum so far (0 when never emitted).
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics.lock().unwrap_or_else(|p| p.into_inner()).totals.get(name).copied().unwrap_or(0)
    }

    /// Count what a function reported in its metrics, as CloudWatch would from its EMF lines.
    pub fn record_metrics(&self, set: &MetricSet) {
        let dimension = set.dimensions.iter().find(|(k, _)| *k != "Function").map(|(_, v)| v.as_str());
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        for (name, value, _) in &set.values {
            let n = value.max(0.0) as u64;
            *m.totals.entry((*name).to_owned()).or_default() += n;
            if let Some(d) = dimension {
                *m.by_dimension.entry((*name).to_owned()).or_default().entry(d.to_owned()).or_default() += n;
            }
        }
    }

    /// Latencies of settled deliveries, and a sample for the messages/s rate.
    pub fn record_latencies(&self, latencies_ms: impl IntoIterator<Item = u32>, now_ms: i64) {
        {
            let mut hist = self.latency_hist.lock().unwrap_or_else(|p| p.into_inner());
            if hist.is_empty() {
                hist.resize(LATENCY_BUCKETS, 0);
            }
            for ms in latencies_ms {
                hist[(ms as usize).min(LATENCY_BUCKETS - 1)] += 1;
            }
        }
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((now_ms, self.delivered.load(Relaxed) + self.dead_lettered.load(Relaxed)));
        while samples.front().is_some_and(|(t, _)| *t < now_ms - 10_000) {
            samples.pop_front();
        }
    }

    /// Queue messages settled (handled or dead-lettered) per second over the last 10 s.
    pub fn rate(&self, now_ms: i64) -> f64 {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        match (samples.front(), samples.back()) {
            (Some((t0, n0)), Some((_, n1))) if now_ms > *t0 => {
                (n1 - n0) as f64 * 1000.0 / (now_ms - t0) as f64
            }
            _ => 0.0,
        }
    }

    pub fn snapshot(&self, now_ms: i64) -> Snapshot {
        let hist = self.latency_hist.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let total: u64 = hist.iter().sum();
        // The smallest latency at or below which a share `p` of the messages settled.
        let pct = |p: f64| {
            let rank = ((total as f64 * p).ceil() as u64).max(1);
            let mut seen = 0;
            (total > 0).then(|| {
                hist.iter()
                    .position(|n| {
                        seen += n;
                        seen >= rank
                    })
                    .map_or(0, |i| i as u32)
            })
        };
        let metrics = self.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Snapshot {
            routed: self.routed.load(Relaxed),
            unrouted: self.unrouted.load(Relaxed),
            refused_by_policy: self.refused_by_policy.load(Relaxed),
            payload_too_large: self.payload_too_large.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            retried: self.retried.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            rule_errors: self.rule_errors.load(Relaxed),
            metrics: metrics.totals,
            metrics_by_dimension: metrics.by_dimension,
            messages_per_s: self.rate(now_ms),
            latency_p50_ms: pct(0.50),
            latency_p99_ms: pct(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let stats = Stats::default();
        stats.record_latencies((1..=100).map(|ms| ms as u32), 0);
        let s = stats.snapshot(0);
        assert_eq!((s.latency_p50_ms, s.latency_p99_ms), (Some(50), Some(99)));
        stats.record_latencies([60_000], 0);
        assert_eq!(stats.snapshot(0).latency_p99_ms, Some(100), "slow outliers land in the last bucket");
        assert_eq!(Stats::default().snapshot(0).latency_p50_ms, None);
    }

    #[test]
    fn counts_come_from_the_functions_metrics() {
        use fleet_shared::metrics::Unit;
        let stats = Stats::default();
        stats.record_metrics(&MetricSet {
            timestamp_ms: 0,
            dimensions: vec![("Function", "f".into())],
            values: vec![
                ("Accepted", 3.0, Unit::Count),
                ("Quarantined", 1.0, Unit::Count),
                ("Other", 9.0, Unit::Count),
            ],
        });
        stats.record_metrics(&MetricSet {
            timestamp_ms: 0,
            dimensions: vec![("Function", "f".into()), ("Reason", "malformed_json".into())],
            values: vec![("QuarantinedByReason", 1.0, Unit::Count)],
        });
        let s = stats.snapshot(0);
        assert_eq!((s.metric("Accepted"), s.metric("Quarantined"), s.metric("Duplicates")), (3, 1, 0));
        assert_eq!(s.metric("Other"), 9);
        assert_eq!(s.metrics_by_dimension["QuarantinedByReason"].get("malformed_json"), Some(&1));
    }
}
