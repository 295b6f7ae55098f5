//! Counters the local stack keeps while it runs: what arrived, how it ended, how fast, how late.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use fleet_shared::ingest::{BatchOutcome, Reason};
use serde::Serialize;

#[derive(Default)]
pub struct Stats {
    /// Publishes that matched a rule and were handed to its target.
    pub routed: AtomicU64,
    /// Publishes on topics no rule reads.
    pub unrouted: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub quarantined: AtomicU64,
    /// Deliveries that failed transiently and were queued again.
    pub retried: AtomicU64,
    /// Messages that kept failing and went to the (local) dead-letter queue.
    pub dead_lettered: AtomicU64,
    by_reason: Mutex<BTreeMap<Reason, u64>>,
    latencies_ms: Mutex<Vec<u32>>,
    /// `(ms, settled)` samples for a messages/s rate.
    samples: Mutex<VecDeque<(i64, u64)>>,
}

/// A point-in-time copy, for the API and reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    pub routed: u64,
    pub unrouted: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub quarantined: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub quarantined_by_reason: BTreeMap<String, u64>,
    pub messages_per_s: f64,
    pub latency_p50_ms: Option<u32>,
    pub latency_p99_ms: Option<u32>,
}

impl Stats {
    /// Messages that reached a final state (stored, duplicate, quarantined or dead-lettered).
    pub fn settled(&self) -> u64 {
        self.stored.load(Relaxed)
            + self.duplicates.load(Relaxed)
            + self.quarantined.load(Relaxed)
            + self.dead_lettered.load(Relaxed)
    }

    pub fn record(&self, outcome: &BatchOutcome, latencies_ms: impl IntoIterator<Item = u32>, now_ms: i64) {
        self.stored.fetch_add(outcome.accepted as u64, Relaxed);
        self.duplicates.fetch_add(outcome.duplicates as u64, Relaxed);
        self.quarantined.fetch_add(outcome.quarantined.len() as u64, Relaxed);
        {
            let mut by_reason = self.by_reason.lock().unwrap_or_else(|p| p.into_inner());
            for q in &outcome.quarantined {
                if let Some(p) = q.problems.first() {
                    *by_reason.entry(p.reason).or_default() += 1;
                }
            }
        }
        self.latencies_ms.lock().unwrap_or_else(|p| p.into_inner()).extend(latencies_ms);
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((now_ms, self.settled()));
        while samples.front().is_some_and(|(t, _)| *t < now_ms - 10_000) {
            samples.pop_front();
        }
    }

    /// Settled messages per second over the last 10 s.
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
        let mut lat = self.latencies_ms.lock().unwrap_or_else(|p| p.into_inner()).clone();
        lat.sort_unstable();
        let pct = |p: f64| (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * p).round() as usize]);
        Snapshot {
            routed: self.routed.load(Relaxed),
            unrouted: self.unrouted.load(Relaxed),
            stored: self.stored.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            quarantined: self.quarantined.load(Relaxed),
            retried: self.retried.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            quarantined_by_reason: self
                .by_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(r, n)| (r.to_string(), *n))
                .collect(),
            messages_per_s: self.rate(now_ms),
            latency_p50_ms: pct(0.50),
            latency_p99_ms: pct(0.99),
        }
    }
}
