//! Health counters: what ingest, presence and commands count as they work, per cohort and
//! bucket, so fleet-health never reads the fleet itself.
//!
//! A [`Tally`] is a sparse set of named integer counters; a [`HealthDelta`] adds tallies to
//! buckets ([`Bucket`]): the minute or hour of arrival, or the gauges. Stores add them
//! atomically (DynamoDB `ADD`, an SQLite upsert), so concurrent writers never lose a count.
//!
//! Freshness without a scan: the `latest` counter of minute `m` (and hour `h`) counts the
//! devices whose newest data arrived in `m` (in `h`). When a device's newest data moves from
//! minute `a` to minute `b`, its writer adds -1 at `a` and +1 at `b` (and the same for hours),
//! so "devices with data in the last 2 minutes" is the sum of two minute buckets and "devices
//! with data in the last 24 hours" the sum of 24 hour buckets, whatever the fleet's size.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{validate_label, Device, UNREGISTERED_CLASS};

/// The counters' names (stored as they are: DynamoDB attributes, JSON keys).
pub mod counter {
    /// Telemetry messages received (every message the ingest function took).
    pub const RECEIVED: &str = "rx";
    /// Of those, quarantined.
    pub const QUARANTINED: &str = "bad";
    /// Devices whose newest data arrived in this bucket (see the module doc).
    pub const LATEST: &str = "latest";
    /// Boot counter changes seen (a device rebooted).
    pub const BOOTS: &str = "boots";
    /// Battery discharge rates, summed, in thousandths of a percent per hour (positive:
    /// discharging), and how many rates were summed.
    pub const BATTERY_RATE: &str = "bat_rate";
    pub const BATTERY_N: &str = "bat_n";
    /// Connects and disconnects; disconnects because another connection took the client id.
    pub const CONNECTS: &str = "conn";
    pub const DISCONNECTS: &str = "disc";
    pub const DUPLICATE_CLIENTID: &str = "dup_cid";
    /// Devices connected now (a gauge).
    pub const CONNECTED: &str = "connected";
    /// Commands sent; acknowledged per latency bucket (`cmd_lat_<i>`,
    /// [`super::LATENCY_BOUNDS_MS`]); expired without an answer.
    pub const COMMANDS_SENT: &str = "cmd_sent";
    pub const COMMAND_LATENCY_PREFIX: &str = "cmd_lat_";
    pub const COMMANDS_EXPIRED: &str = "cmd_exp";
    /// OTA job executions finished: succeeded, failed.
    pub const OTA_SUCCEEDED: &str = "ota_ok";
    pub const OTA_FAILED: &str = "ota_fail";
    /// Sampled every minute by fleet-health (in the ledger only): device-minutes fresh, active,
    /// connected, and the connectivity SLI's total (the larger of active and connected).
    pub const FRESH_MINUTES: &str = "fresh_min";
    pub const ACTIVE_MINUTES: &str = "active_min";
    pub const CONNECTED_MINUTES: &str = "conn_min";
    pub const CONNECTIVITY_MINUTES: &str = "conn_total_min";
}

/// Upper bounds (inclusive) of the command latency buckets; the last bucket is everything
/// slower than the last bound.
pub const LATENCY_BOUNDS_MS: [i64; 9] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000];

/// The latency bucket of `ms` (`0..=LATENCY_BOUNDS_MS.len()`).
pub fn latency_bucket(ms: i64) -> usize {
    LATENCY_BOUNDS_MS.iter().position(|&b| ms <= b).unwrap_or(LATENCY_BOUNDS_MS.len())
}

pub fn latency_counter(bucket: usize) -> String {
    format!("{}{bucket}", counter::COMMAND_LATENCY_PREFIX)
}

/// A group of devices the SLIs are computed for: class, region and firmware. Aggregates use
/// `*` ([`Cohort::ANY`]) for any value: `*/*/*` is the whole fleet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cohort {
    pub class: String,
    pub region: String,
    pub fw: String,
}

/// A value a device has no label for (no region, no firmware reported).
pub const UNKNOWN: &str = "-";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cohort {0:?}: expected <class>/<region>/<firmware>, each a label, `-` or `*`")]
pub struct InvalidCohort(pub String);

impl Cohort {
    pub const ANY: &'static str = "*";

    pub fn new(class: &str, region: &str, fw: &str) -> Self {
        Self { class: class.to_owned(), region: region.to_owned(), fw: fw.to_owned() }
    }

    /// The whole fleet.
    pub fn fleet() -> Self {
        Self::new(Self::ANY, Self::ANY, Self::ANY)
    }

    /// A device's cohort: its registered class and region, and `fw` (the firmware it runs).
    pub fn of(device: Option<&Device>, fw: Option<&str>) -> Self {
        let reg = device.and_then(|d| d.registration.as_ref());
        let fw = fw.or_else(|| device.and_then(|d| d.state.as_ref()?.fw.as_deref()));
        Self::new(
            reg.map_or(UNREGISTERED_CLASS, |r| r.class.as_str()),
            reg.map_or(UNKNOWN, |r| r.region.as_str()),
            fw.filter(|f| validate_label("firmware", f).is_ok()).unwrap_or(UNKNOWN),
        )
    }

    /// Whether this cohort (an aggregate) includes `base`.
    pub fn includes(&self, base: &Cohort) -> bool {
        let part = |a: &str, b: &str| a == Self::ANY || a == b;
        part(&self.class, &base.class) && part(&self.region, &base.region) && part(&self.fw, &base.fw)
    }

    pub fn is_aggregate(&self) -> bool {
        [&self.class, &self.region, &self.fw].iter().any(|p| p.as_str() == Self::ANY)
    }

    /// The cohort of the same class and region, firmware unknown (`class/region/-`): where
    /// connectivity is counted.
    pub fn without_fw(&self) -> Cohort {
        Self::new(&self.class, &self.region, UNKNOWN)
    }

    /// The aggregates a base cohort counts in: the fleet, and its class in its region.
    pub fn aggregates(&self) -> [Cohort; 2] {
        [Self::fleet(), Self::new(&self.class, &self.region, Self::ANY)]
    }
}

impl fmt::Display for Cohort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.class, self.region, self.fw)
    }
}

impl std::str::FromStr for Cohort {
    type Err = InvalidCohort;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidCohort(s.to_owned());
        let mut parts = s.split('/');
        let mut next = || {
            let p = parts.next().ok_or_else(bad)?;
            let ok = p == Self::ANY || p == UNKNOWN || validate_label("cohort part", p).is_ok();
            if ok {
                Ok(p.to_owned())
            } else {
                Err(bad())
            }
        };
        let (class, region, fw) = (next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self { class, region, fw })
    }
}

impl TryFrom<String> for Cohort {
    type Error = InvalidCohort;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Cohort> for String {
    fn from(c: Cohort) -> Self {
        c.to_string()
    }
}

/// Named integer counters; absent is zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tally(pub BTreeMap<String, i64>);

impl Tally {
    pub fn get(&self, name: &str) -> i64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    pub fn add(&mut self, name: &str, n: i64) {
        if n != 0 {
            let v = self.0.entry(name.to_owned()).or_insert(0);
            *v += n;
            if *v == 0 {
                self.0.remove(name);
            }
        }
    }

    pub fn add_all(&mut self, other: &Tally) {
        for (k, v) in &other.0 {
            self.add(k, *v);
        }
    }

    /// `self - earlier`: what was counted between two cumulative tallies.
    pub fn since(&self, earlier: &Tally) -> Tally {
        let mut out = self.clone();
        for (k, v) in &earlier.0 {
            out.add(k, -v);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The command latency histogram.
    pub fn latency_histogram(&self) -> [i64; LATENCY_BOUNDS_MS.len() + 1] {
        std::array::from_fn(|i| self.get(&latency_counter(i)))
    }
}

/// Where a delta is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bucket {
    /// Unix minute of arrival (ms / 60,000).
    Minute(i64),
    /// Unix hour of arrival (ms / 3,600,000).
    Hour(i64),
    /// Levels that are not time-bucketed (devices connected now).
    Gauge,
}

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;

pub fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(MINUTE_MS)
}

pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
}

/// Tallies to add, by bucket and cohort.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthDelta(pub BTreeMap<(Bucket, Cohort), Tally>);

impl HealthDelta {
    pub fn add(&mut self, bucket: Bucket, cohort: &Cohort, name: &str, n: i64) {
        if n != 0 {
            self.0.entry((bucket, cohort.clone())).or_default().add(name, n);
            self.0.retain(|_, t| !t.is_empty());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A device's newest data moved from arrival time `from` (none: its first) to `to`, and
    /// from cohort `was` to `now` (firmware changes move it).
    pub fn move_latest(&mut self, from: Option<(i64, &Cohort)>, to: (i64, &Cohort)) {
        let (to_ms, now) = to;
        if let Some((from_ms, was)) = from {
            if was == now && minute_of(from_ms) == minute_of(to_ms) {
                return;
            }
            self.add(Bucket::Minute(minute_of(from_ms)), was, counter::LATEST, -1);
            self.add(Bucket::Hour(hour_of(from_ms)), was, counter::LATEST, -1);
        }
        self.add(Bucket::Minute(minute_of(to_ms)), now, counter::LATEST, 1);
        self.add(Bucket::Hour(hour_of(to_ms)), now, counter::LATEST, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cohorts_round_trip_and_refuse_bad_labels() {
        let c: Cohort = "sensor/eu-west-1/1.4.2".parse().unwrap();
        assert_eq!(c, Cohort::new("sensor", "eu-west-1", "1.4.2"));
        assert_eq!(c.to_string(), "sensor/eu-west-1/1.4.2");
        assert!("*/*/*".parse::<Cohort>().unwrap().includes(&c));
        assert!(!Cohort::new("sensor", "us-east-1", "*").includes(&c));
        for bad in ["", "a/b", "a/b/c/d", "a b/c/d", "a/\u{1b}/c"] {
            assert!(bad.parse::<Cohort>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_move_within_one_minute_and_cohort_adds_nothing() {
        let c = Cohort::new("sensor", "eu", "1.0");
        let mut d = HealthDelta::default();
        d.move_latest(Some((60_000, &c)), (119_999, &c));
        assert!(d.is_empty());
        d.move_latest(Some((60_000, &c)), (120_000, &c));
        assert_eq!(d.0[&(Bucket::Minute(1), c.clone())].get(counter::LATEST), -1);
        assert_eq!(d.0[&(Bucket::Minute(2), c.clone())].get(counter::LATEST), 1);
        // Same hour: the hour bucket's -1 and +1 cancel out.
        assert!(!d.0.contains_key(&(Bucket::Hour(0), c)));
    }

    #[test]
    fn latency_buckets_are_inclusive_upper_bounds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(100), 0);
        assert_eq!(latency_bucket(101), 1);
        assert_eq!(latency_bucket(60_000), 8);
        assert_eq!(latency_bucket(60_001), 9);
    }
}
