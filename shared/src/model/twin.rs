//! The twin: Fleetline's mirror of one device shadow (classic or named), with what the device
//! reports that differs from what is desired (the delta) and since when it has drifted.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ThingName;

/// Longest shadow name AWS IoT accepts.
pub const MAX_SHADOW_NAME_LEN: usize = 64;

/// A shadow's name: empty for the classic (unnamed) shadow, else 1–64 characters of
/// `[a-zA-Z0-9:_-]`, as AWS IoT allows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShadowName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid shadow name {0:?}: expected at most 64 characters of [a-zA-Z0-9:_-] (empty = classic shadow)"
)]
pub struct InvalidShadowName(pub String);

impl ShadowName {
    /// The classic shadow.
    pub fn classic() -> Self {
        Self(String::new())
    }

    pub fn parse(s: &str) -> Result<Self, InvalidShadowName> {
        Self::try_from(s.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_classic(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<String> for ShadowName {
    type Error = InvalidShadowName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let valid = s.len() <= MAX_SHADOW_NAME_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
        if valid {
            Ok(Self(s))
        } else {
            Err(InvalidShadowName(s))
        }
    }
}

impl From<ShadowName> for String {
    fn from(s: ShadowName) -> Self {
        s.0
    }
}

impl fmt::Display for ShadowName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "(classic)" } else { &self.0 })
    }
}

/// What is known about one shadow version: whether desired and reported differed in it, on
/// which top-level desired keys, and when it was written (ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionDrift {
    pub drifting: bool,
    pub at_ms: i64,
    /// The top-level desired keys that differ (empty in twins stored before keys were kept:
    /// such a version counts as drifting on every key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
}

impl VersionDrift {
    fn drifts_on(&self, key: &str) -> bool {
        self.drifting && (self.keys.is_empty() || self.keys.iter().any(|k| k == key))
    }
}

/// The versions a twin's drift start depends on: the newest known version, the contiguous
/// run of drifting versions below it, and the first version known not to drift below that
/// run. Anything older cannot change when the drift started, so it is dropped. Documents can
/// arrive in any order; each tells about its version and the one before (`previous`). A
/// delete ends any drift: versions up to the deleted one never extend a later run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftHistory {
    pub versions: BTreeMap<u64, VersionDrift>,
    /// The highest version a delete was accepted at.
    pub deleted_at: Option<u64>,
}

impl DriftHistory {
    /// Record what a document says about `version`: as the `current` document of its own
    /// event (`own`, authoritative), or as another event's `previous` (kept only if nothing
    /// better is known), so the result does not depend on arrival order.
    pub fn learn(&mut self, version: u64, drift: VersionDrift, own: bool) {
        if own {
            self.versions.insert(version, drift);
        } else {
            self.versions.entry(version).or_insert(drift);
        }
        self.prune();
    }

    /// Record a delete accepted at `version`.
    pub fn deleted(&mut self, version: u64) {
        self.deleted_at = self.deleted_at.max(Some(version));
        self.prune();
    }

    /// Forget what cannot matter: versions up to a delete, and every version below the newest
    /// non-drifting one (that one is kept as the boundary).
    fn prune(&mut self) {
        if let Some(d) = self.deleted_at {
            self.versions = self.versions.split_off(&(d + 1));
        }
        let floor = self.versions.iter().rev().find(|(_, d)| !d.drifting).map(|(&v, _)| v);
        if let Some(floor) = floor {
            self.versions = self.versions.split_off(&floor);
        }
    }

    /// When the newest version's drift started: the time of the oldest version of the
    /// contiguous drifting run ending at the newest version, or `None` if it does not drift.
    pub fn drift_since_ms(&self) -> Option<i64> {
        self.run_start(|d| d.drifting)
    }

    /// When the newest version's drift on the top-level desired `key` started: the same run,
    /// of versions drifting on that key (a stale-desired policy's clock).
    pub fn key_drift_since_ms(&self, key: &str) -> Option<i64> {
        self.run_start(|d| d.drifts_on(key))
    }

    fn run_start(&self, drifting: impl Fn(&VersionDrift) -> bool) -> Option<i64> {
        let mut iter = self.versions.iter().rev();
        let (&newest, d) = iter.next()?;
        if !drifting(d) {
            return None;
        }
        let (mut start, mut since) = (newest, d.at_ms);
        for (&v, d) in iter {
            if v + 1 != start || !drifting(d) {
                break;
            }
            (start, since) = (v, d.at_ms);
        }
        Some(since)
    }
}

/// The fleet's drift at a glance: how many twins drift, and since when the oldest drift.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftSummary {
    pub drifting: u64,
    pub oldest_since_ms: Option<i64>,
}

impl DriftSummary {
    /// Add another part of the fleet (an index shard).
    pub fn merge(self, other: DriftSummary) -> DriftSummary {
        let oldest_since_ms = match (self.oldest_since_ms, other.oldest_since_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        DriftSummary { drifting: self.drifting + other.drifting, oldest_since_ms }
    }

    /// Age of the oldest drift at `now_ms` (0 when nothing drifts).
    pub fn oldest_age_ms(&self, now_ms: i64) -> i64 {
        self.oldest_since_ms.map_or(0, |since| (now_ms - since).max(0))
    }
}

/// A mirrored shadow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Twin {
    pub thing: ThingName,
    pub shadow: ShadowName,
    /// The shadow's version (AWS's; continues after a delete within AWS's 48 h).
    pub version: u64,
    /// `state.desired` and `state.reported` (objects; empty when absent).
    pub desired: Map<String, Value>,
    pub reported: Map<String, Value>,
    /// The shadow's `metadata` as AWS sent it (per-leaf update timestamps).
    pub metadata: Value,
    /// When this version was written (ms).
    pub updated_ms: i64,
    /// Desired values the device has not reported (AWS delta semantics); empty = in sync.
    pub delta: Map<String, Value>,
    /// When the current drift started; `None` when in sync.
    pub drift_since_ms: Option<i64>,
    /// The shadow was deleted at `version`.
    pub deleted: bool,
    pub history: DriftHistory,
    /// Desired keys the fleet stopped insisting on for this device (stale-desired policies),
    /// by top-level key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub diverged: BTreeMap<String, Divergence>,
    /// Store revision: every write increments it; writes are conditional on it.
    pub revision: u64,
}

/// What a stale-desired policy does once a key has drifted for longer than it allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StaleAction {
    /// Mark the device as diverged on that key (listed, counted); the desired value stays.
    Report,
    /// Also remove the key from the shadow's desired state, so the service stops sending the
    /// delta to the device (the fleet stops re-asserting it).
    Release,
}

impl StaleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            StaleAction::Report => "report",
            StaleAction::Release => "release",
        }
    }
}

/// A desired key a device has not taken for longer than its policy allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// When the key started drifting (in the run of versions that reached the marked one).
    pub since_ms: i64,
    /// When the sweep marked it.
    pub marked_ms: i64,
    /// The desired value the device did not take, and what it reported instead (if anything).
    pub desired: Value,
    pub reported: Option<Value>,
    pub action: StaleAction,
    /// `Release` only: the key is gone from the shadow's desired state.
    #[serde(default)]
    pub released: bool,
}

impl Twin {
    /// The reported firmware (`reported.fw`), the key fleet queries index. Strings as they
    /// are, other values as JSON text.
    pub fn reported_fw(&self) -> Option<String> {
        match self.reported.get("fw")? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    /// Dotted paths of the desired leaves that differ from reported (`fw`, `config.mode`).
    pub fn drift_keys(&self) -> Vec<String> {
        fn walk(prefix: &str, m: &Map<String, Value>, out: &mut Vec<String>) {
            for (k, v) in m {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match v {
                    Value::Object(inner) if !inner.is_empty() => walk(&path, inner, out),
                    _ => out.push(path),
                }
            }
        }
        let mut out = Vec::new();
        walk("", &self.delta, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_names_follow_aws() {
        assert!(ShadowName::parse("").is_ok_and(|s| s.is_classic()));
        assert!(ShadowName::parse("config:v2_a-b").is_ok());
        assert!(ShadowName::parse(&"a".repeat(64)).is_ok());
        assert!(ShadowName::parse(&"a".repeat(65)).is_err());
        assert!(ShadowName::parse("a/b").is_err());
        assert!(ShadowName::parse("+").is_err());
    }

    #[test]
    fn drift_starts_at_the_oldest_version_of_the_run_that_reaches_the_newest() {
        let d = |drifting, at_ms| VersionDrift { drifting, at_ms, keys: Vec::new() };
        let mut h = DriftHistory::default();
        h.learn(5, d(true, 500), true);
        assert_eq!(h.drift_since_ms(), Some(500));
        h.learn(3, d(true, 300), true); // a gap at 4: the run known to reach 5 starts at 5
        assert_eq!(h.drift_since_ms(), Some(500));
        h.learn(4, d(true, 400), false);
        assert_eq!(h.drift_since_ms(), Some(300));
        h.learn(2, d(false, 200), true);
        assert_eq!(h.drift_since_ms(), Some(300));
        h.learn(1, d(true, 100), true); // below a version in sync: cannot matter, dropped
        assert_eq!(h.versions.keys().copied().collect::<Vec<_>>(), [2, 3, 4, 5]);
        h.deleted(3);
        assert_eq!(h.drift_since_ms(), Some(400), "a delete ends the run");
        h.learn(6, d(false, 600), true);
        assert_eq!((h.drift_since_ms(), h.versions.len()), (None, 1));
    }
}
