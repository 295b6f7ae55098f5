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

/// What is known about one shadow version (or a run of consecutive versions in the same
/// state): whether desired and reported differed, on which top-level desired keys and for
/// which desired value, and when it was written (ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionDrift {
    pub drifting: bool,
    /// When the (first) version was written.
    pub at_ms: i64,
    /// The top-level desired keys that differ → a fingerprint of the value desired ([`fingerprint`]):
    /// a new desired value starts a new run for its key. Empty in versions stored before keys
    /// were kept: those extend no key's run.
    #[serde(default, rename = "kd", skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, u64>,
    /// The last version this entry stands for (consecutive versions, each learned from its own
    /// document, in the same state); 0 = only the entry's own version.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub through: u64,
    /// Learned from the version's own document (authoritative), not another's `previous`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own: bool,
    /// Its own document said the version before it was `version - 1` (no delete between):
    /// only then may it join the entry below.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub linked: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A stable fingerprint of a desired value (FNV-1a over its JSON text).
pub fn fingerprint(v: &Value) -> u64 {
    crate::hash::fnv1a64(v.to_string().as_bytes())
}

impl VersionDrift {
    /// A version as a document shows it; `keys` maps each drifting top-level key to the
    /// fingerprint of its desired value.
    pub fn new(at_ms: i64, keys: BTreeMap<String, u64>) -> Self {
        Self { drifting: !keys.is_empty(), at_ms, keys, through: 0, own: false, linked: false }
    }

    fn same_state(&self, other: &VersionDrift) -> bool {
        self.drifting == other.drifting && self.keys == other.keys
    }
}

/// Where [`DriftHistory::learn`] heard about a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// The version's own (`current`) document; `linked`: its `previous` was the version before.
    Own { linked: bool },
    /// Another event's `previous` document.
    Previous,
}

/// The versions a twin's drift start depends on: the newest known version, the contiguous
/// run of drifting versions below it, and the first version known not to drift below that
/// run. Anything older cannot change when the drift started, so it is dropped. Documents can
/// arrive in any order; each tells about its version and the one before (`previous`). A
/// delete ends any drift: versions up to the deleted one never extend a later run.
///
/// Consecutive versions in the same state, each from its own document and linked to the one
/// before, are kept as one entry (`through`), so a device that reports every minute while it
/// drifts does not grow its twin: the history grows with changes of drift, not with updates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftHistory {
    pub versions: BTreeMap<u64, VersionDrift>,
    /// The highest version a delete was accepted at.
    pub deleted_at: Option<u64>,
}

fn end(v: u64, d: &VersionDrift) -> u64 {
    v.max(d.through)
}

impl DriftHistory {
    /// Record what a document says about `version`: from its own event (authoritative), or
    /// from another event's `previous` (kept only if nothing better is known), so the result
    /// does not depend on arrival order.
    pub fn learn(&mut self, version: u64, drift: VersionDrift, heard: Heard) {
        let covering = self.versions.range(..=version).next_back().filter(|(&s, d)| end(s, d) >= version);
        match (heard, covering) {
            // Known already from its own document (a duplicate), or a `previous` adds nothing.
            (_, Some((_, d))) if d.own => {}
            (Heard::Previous, Some(_)) => {}
            (Heard::Previous, None) => {
                self.versions
                    .insert(version, VersionDrift { through: 0, own: false, linked: false, ..drift });
            }
            (Heard::Own { linked }, _) => {
                self.versions.insert(version, VersionDrift { through: 0, own: true, linked, ..drift });
                self.join(version);
            }
        }
        self.prune();
    }

    /// Join the entry at `version` with its neighbours where nothing can tell them apart.
    fn join(&mut self, version: u64) {
        let mut start = version;
        if let Some((&below, _)) = self.versions.range(..version).next_back() {
            if self.joinable(below, version) {
                let upper = self.versions.remove(&version).map_or(version, |d| end(version, &d));
                if let Some(d) = self.versions.get_mut(&below) {
                    d.through = upper;
                }
                start = below;
            }
        }
        let upper = self.versions.get(&start).map_or(start, |d| end(start, d));
        if self.versions.contains_key(&(upper + 1)) && self.joinable(start, upper + 1) {
            let above = self.versions.remove(&(upper + 1)).map_or(upper + 1, |d| end(upper + 1, &d));
            if let Some(d) = self.versions.get_mut(&start) {
                d.through = above;
            }
        }
    }

    /// Whether the entry at `upper` continues the entry at `lower` with nothing between.
    fn joinable(&self, lower: u64, upper: u64) -> bool {
        match (self.versions.get(&lower), self.versions.get(&upper)) {
            (Some(l), Some(u)) => l.own && u.own && u.linked && end(lower, l) + 1 == upper && l.same_state(u),
            _ => false,
        }
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
        self.run_start(|d, _| d.drifting)
    }

    /// When the newest version's drift on the top-level desired `key`, for the value desired
    /// now, started: the run of versions that differ on that key with that desired value (a
    /// stale-desired policy's clock). `None` when the newest version does not drift on it, or
    /// its history does not say (twins stored before keys were kept).
    pub fn key_drift_since_ms(&self, key: &str) -> Option<i64> {
        let (_, newest) = self.versions.iter().next_back()?;
        let want = *newest.keys.get(key)?;
        self.run_start(|d, _| d.keys.get(key) == Some(&want))
    }

    fn run_start(&self, drifting: impl Fn(&VersionDrift, u64) -> bool) -> Option<i64> {
        let mut iter = self.versions.iter().rev();
        let (&newest, d) = iter.next()?;
        if !drifting(d, newest) {
            return None;
        }
        let (mut start, mut since) = (newest, d.at_ms);
        for (&v, d) in iter {
            if end(v, d) + 1 != start || !drifting(d, v) {
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
        let d = |drifting: bool, at_ms| {
            let keys = if drifting { BTreeMap::from([("fw".to_owned(), 1)]) } else { BTreeMap::new() };
            VersionDrift::new(at_ms, keys)
        };
        let own = Heard::Own { linked: false };
        let mut h = DriftHistory::default();
        h.learn(5, d(true, 500), own);
        assert_eq!(h.drift_since_ms(), Some(500));
        h.learn(3, d(true, 300), own); // a gap at 4: the run known to reach 5 starts at 5
        assert_eq!(h.drift_since_ms(), Some(500));
        h.learn(4, d(true, 400), Heard::Previous);
        assert_eq!(h.drift_since_ms(), Some(300));
        h.learn(2, d(false, 200), own);
        assert_eq!(h.drift_since_ms(), Some(300));
        h.learn(1, d(true, 100), own); // below a version in sync: cannot matter, dropped
        assert_eq!(h.versions.keys().copied().collect::<Vec<_>>(), [2, 3, 4, 5]);
        h.deleted(3);
        assert_eq!(h.drift_since_ms(), Some(400), "a delete ends the run");
        h.learn(6, d(false, 600), own);
        assert_eq!((h.drift_since_ms(), h.versions.len()), (None, 1));
    }

    #[test]
    fn a_device_reporting_the_same_drift_every_minute_keeps_one_entry_and_its_start() {
        let keys = |v: u64| BTreeMap::from([("fw".to_owned(), v)]);
        let mut h = DriftHistory::default();
        // GIVEN version 1 in sync, then a thousand linked updates drifting on fw=2
        h.learn(1, VersionDrift::new(0, BTreeMap::new()), Heard::Own { linked: false });
        for v in 2..=1_001u64 {
            h.learn(v, VersionDrift::new(v as i64 * 60_000, keys(2)), Heard::Own { linked: true });
        }
        // THEN two entries: the in-sync floor and one run, which started at version 2
        assert_eq!(h.versions.len(), 2);
        assert_eq!((h.drift_since_ms(), h.key_drift_since_ms("fw")), (Some(120_000), Some(120_000)));
        // WHEN fw is desired at another value: its key clock restarts, the twin's does not
        h.learn(1_002, VersionDrift::new(9_000_000, keys(3)), Heard::Own { linked: true });
        assert_eq!((h.drift_since_ms(), h.key_drift_since_ms("fw")), (Some(120_000), Some(9_000_000)));
        assert_eq!(h.key_drift_since_ms("mode"), None);
    }
}
