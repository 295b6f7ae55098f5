//! Device twins (pure): the shadow events twin-sync receives, AWS's delta semantics, and how
//! an event changes a stored twin so that duplicates and any delivery order converge to the
//! highest version, with the drift start that version's history implies.
//!
//! Events, as the topic rules deliver them (the rule adds `thing` and `shadow` from the
//! topic; the classic shadow has `shadow = ""`):
//! - `$aws/things/<t>/shadow[/name/<s>]/update/documents`: `{"previous": doc | null,
//!   "current": doc, "timestamp": s}`, a doc being `{"state": {"desired", "reported"},
//!   "metadata": {...}, "version": n}`;
//! - `.../delete/accepted`: `{"version": n, "timestamp": s}`.

pub mod policy;
pub mod write;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::StoreError;
use crate::model::{fingerprint, DriftHistory, Heard, ShadowName, ThingName, Twin, VersionDrift};
use crate::ports::TwinStore;

/// Desired values that reported does not match, as AWS computes a shadow's delta: only keys
/// in desired count (keys only in reported are ignored), objects are compared key by key,
/// anything else (arrays included) as a whole. A `null` in desired is a deletion and an empty
/// object desires nothing: neither is a difference.
pub fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, want) in desired {
        match (want, reported.get(k)) {
            // `null` deletes; an empty object desires nothing.
            (Value::Null, _) => {}
            (Value::Object(w), _) if w.is_empty() => {}
            (Value::Object(w), Some(Value::Object(r))) => {
                let inner = delta(w, r);
                if !inner.is_empty() {
                    out.insert(k.clone(), Value::Object(inner));
                }
            }
            (w, Some(r)) if w == r => {}
            (w, _) => {
                out.insert(k.clone(), w.clone());
            }
        }
    }
    out
}

/// One shadow document (`previous` or `current`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ShadowDocument {
    #[serde(default)]
    pub state: DocumentState,
    #[serde(default)]
    pub metadata: Value,
    pub version: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DocumentState {
    #[serde(default, deserialize_with = "object_or_empty")]
    pub desired: Map<String, Value>,
    #[serde(default, deserialize_with = "object_or_empty")]
    pub reported: Map<String, Value>,
}

/// `null` (a section that was removed) reads as empty.
fn object_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(d)?.unwrap_or_default())
}

impl ShadowDocument {
    /// When this version was written: the newest metadata timestamp (AWS stamps every leaf an
    /// update touches with the update's time, in seconds), in ms.
    pub fn written_ms(&self) -> Option<i64> {
        fn newest(v: &Value) -> Option<i64> {
            match v {
                Value::Object(m) => {
                    m.iter().filter_map(|(k, v)| if k == "timestamp" { v.as_i64() } else { newest(v) }).max()
                }
                Value::Array(a) => a.iter().filter_map(newest).max(),
                _ => None,
            }
        }
        newest(&self.metadata).map(|s| s * 1000)
    }

    fn drift(&self, at_ms: i64) -> VersionDrift {
        let keys = delta(&self.state.desired, &self.state.reported)
            .into_iter()
            .map(|(k, _)| {
                let value = fingerprint(self.state.desired.get(&k).unwrap_or(&Value::Null));
                (k, value)
            })
            .collect();
        VersionDrift::new(at_ms, keys)
    }
}

/// What twin-sync is told about one shadow.
#[derive(Debug, Clone, PartialEq)]
pub enum ShadowEvent {
    /// A shadow was updated: its document before and after, and when (ms).
    Updated { previous: Option<Box<ShadowDocument>>, current: Box<ShadowDocument>, at_ms: i64 },
    /// A shadow was deleted at `version`.
    Deleted { version: u64, at_ms: i64 },
}

/// A shadow event with the thing and shadow it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinEvent {
    pub thing: ThingName,
    pub shadow: ShadowName,
    pub event: ShadowEvent,
}

/// Why an event could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadTwinEvent(pub String);

#[derive(Deserialize)]
struct RawEvent {
    thing: String,
    #[serde(default)]
    shadow: String,
    timestamp: i64,
    #[serde(default)]
    previous: Option<ShadowDocument>,
    #[serde(default)]
    current: Option<ShadowDocument>,
    #[serde(default)]
    version: Option<u64>,
}

impl TwinEvent {
    /// Read one rule payload: a documents event (has `current`) or a delete (has `version`).
    pub fn parse(payload: &[u8]) -> Result<Self, BadTwinEvent> {
        let raw: RawEvent =
            serde_json::from_slice(payload).map_err(|e| BadTwinEvent(format!("not a shadow event: {e}")))?;
        let thing = ThingName::parse(&raw.thing).map_err(|e| BadTwinEvent(e.to_string()))?;
        let shadow = ShadowName::parse(&raw.shadow).map_err(|e| BadTwinEvent(e.to_string()))?;
        let at_ms =
            raw.timestamp.checked_mul(1000).ok_or_else(|| BadTwinEvent("timestamp out of range".into()))?;
        let event = match (raw.current, raw.version) {
            (Some(current), _) => {
                if raw.previous.as_ref().is_some_and(|p| p.version >= current.version) {
                    return Err(BadTwinEvent("previous version is not below current".into()));
                }
                ShadowEvent::Updated {
                    previous: raw.previous.map(Box::new),
                    current: Box::new(current),
                    at_ms,
                }
            }
            (None, Some(version)) => ShadowEvent::Deleted { version, at_ms },
            (None, None) => {
                return Err(BadTwinEvent("neither `current` (documents) nor `version` (delete)".into()))
            }
        };
        Ok(Self { thing, shadow, event })
    }
}

/// What an event did to the twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinChange {
    /// A newer version (or a deletion) was mirrored.
    Applied,
    /// Not newer than the stored version: the document changed nothing (it may still have
    /// told when the drift started).
    Stale,
}

/// The twin after `event`, given what is stored (`None`: never seen). The result depends
/// only on the set of events applied, never on their order or repetition.
pub fn apply(stored: Option<Twin>, event: &TwinEvent) -> (Twin, TwinChange) {
    let mut twin = stored.unwrap_or_else(|| Twin {
        thing: event.thing.clone(),
        shadow: event.shadow.clone(),
        version: 0,
        desired: Map::new(),
        reported: Map::new(),
        metadata: Value::Null,
        updated_ms: 0,
        delta: Map::new(),
        drift_since_ms: None,
        deleted: true,
        history: DriftHistory::default(),
        diverged: Default::default(),
        revision: 0,
    });
    let change = match &event.event {
        ShadowEvent::Updated { previous, current, at_ms } => {
            if let Some(p) = previous {
                let at = p.written_ms().unwrap_or(*at_ms);
                twin.history.learn(p.version, p.drift(at), Heard::Previous);
            }
            let linked = previous.as_ref().is_some_and(|p| p.version + 1 == current.version);
            twin.history.learn(current.version, current.drift(*at_ms), Heard::Own { linked });
            if current.version > twin.version {
                twin.version = current.version;
                twin.desired = current.state.desired.clone();
                twin.reported = current.state.reported.clone();
                twin.metadata = current.metadata.clone();
                twin.updated_ms = *at_ms;
                twin.delta = delta(&twin.desired, &twin.reported);
                twin.deleted = false;
                TwinChange::Applied
            } else {
                TwinChange::Stale
            }
        }
        ShadowEvent::Deleted { version, at_ms } => {
            // A deleted shadow has nothing to drift from.
            twin.history.deleted(*version);
            if *version >= twin.version && !(twin.deleted && *version == twin.version) {
                twin.version = *version;
                twin.desired = Map::new();
                twin.reported = Map::new();
                twin.metadata = Value::Null;
                twin.updated_ms = *at_ms;
                twin.delta = Map::new();
                twin.deleted = true;
                TwinChange::Applied
            } else {
                TwinChange::Stale
            }
        }
    };
    twin.drift_since_ms = if twin.deleted { None } else { twin.history.drift_since_ms() };
    policy::settle(&mut twin);
    (twin, change)
}

/// Conditional-write attempts before a twin that keeps changing underneath is reported as a
/// transient failure (the event is then retried by its trigger).
pub const MAX_SYNC_ATTEMPTS: usize = 8;

/// Mirror one event into the store: read, [`apply`], write conditionally on the revision read;
/// a concurrent writer makes it read again. An event that changes nothing is not written.
pub async fn sync<S: TwinStore>(store: &S, event: &TwinEvent) -> Result<TwinChange, StoreError> {
    for _ in 0..MAX_SYNC_ATTEMPTS {
        let stored = store.twin(&event.thing, &event.shadow).await?;
        let revision = stored.as_ref().map_or(0, |t| t.revision);
        let (mut twin, change) = apply(stored.clone(), event);
        if stored.is_some_and(|s| s == twin) {
            return Ok(change);
        }
        twin.revision = revision + 1;
        if store.put_twin(&twin).await? {
            return Ok(change);
        }
    }
    Err(StoreError::transient(
        "twin sync",
        format!(
            "the twin of {} / {} kept changing during {MAX_SYNC_ATTEMPTS} attempts",
            event.thing, event.shadow
        ),
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn delta_follows_aws_semantics() {
        let desired =
            obj(json!({"fw":"1.5.0","mode":"eco","cfg":{"rate":5,"led":true},"tags":[1,2],"gone":null}));
        let reported =
            obj(json!({"fw":"1.4.2","mode":"eco","cfg":{"rate":5,"led":false},"tags":[2,1],"extra":9}));
        assert_eq!(
            Value::Object(delta(&desired, &reported)),
            json!({"fw":"1.5.0","cfg":{"led":true},"tags":[1,2]})
        );
        assert!(delta(&obj(json!({"a":{"b":1}})), &obj(json!({"a":{"b":1,"c":2}}))).is_empty());
        assert!(
            delta(&obj(json!({"cfg":{}})), &obj(json!({}))).is_empty(),
            "an emptied object desires nothing"
        );
        assert_eq!(
            Value::Object(delta(&obj(json!({"a":{"b":1}})), &obj(json!({"a":3})))),
            json!({"a":{"b":1}})
        );
    }

    fn doc(version: u64, desired: Value, reported: Value, ts_s: i64) -> Value {
        json!({"state":{"desired":desired,"reported":reported},
               "metadata":{"desired":{"fw":{"timestamp":ts_s}},"reported":{"fw":{"timestamp":ts_s}}},
               "version":version})
    }

    #[test]
    fn reads_documents_and_delete_events_as_the_rules_deliver_them() {
        let documents = json!({"thing":"dev-1","shadow":"config","timestamp":1_764_000_100,
            "previous":doc(1, json!({"fw":"1"}), json!({"fw":"1"}), 1_764_000_000),
            "current":doc(2, json!({"fw":"2"}), json!({"fw":"1"}), 1_764_000_100)});
        let e = TwinEvent::parse(documents.to_string().as_bytes()).expect("documents");
        assert_eq!((e.thing.as_str(), e.shadow.as_str()), ("dev-1", "config"));
        let ShadowEvent::Updated { previous: Some(p), current, at_ms } = &e.event else { panic!("{e:?}") };
        assert_eq!((p.version, current.version, *at_ms), (1, 2, 1_764_000_100_000));
        assert_eq!(p.written_ms(), Some(1_764_000_000_000));
        let delete = json!({"thing":"dev-1","shadow":"","version":7,"timestamp":1_764_000_200});
        let e = TwinEvent::parse(delete.to_string().as_bytes()).expect("delete");
        assert!(e.shadow.is_classic());
        assert_eq!(e.event, ShadowEvent::Deleted { version: 7, at_ms: 1_764_000_200_000 });
        for bad in [
            json!({"shadow":"","timestamp":1,"version":1}),
            json!({"thing":"a/b","timestamp":1,"version":1}),
            json!({"thing":"d","timestamp":1}),
            json!({"thing":"d","timestamp":1,"previous":doc(3, json!({}), json!({}), 1),"current":doc(2, json!({}), json!({}), 1)}),
        ] {
            assert!(TwinEvent::parse(bad.to_string().as_bytes()).is_err(), "{bad}");
        }
    }

    fn updated(previous: Option<Value>, current: Value, at_s: i64) -> TwinEvent {
        let p = previous.map(|p| serde_json::from_value(p).expect("doc"));
        TwinEvent {
            thing: ThingName::parse("dev-1").expect("thing"),
            shadow: ShadowName::classic(),
            event: ShadowEvent::Updated {
                previous: p,
                current: serde_json::from_value(current).expect("doc"),
                at_ms: at_s * 1000,
            },
        }
    }

    #[test]
    fn a_stale_document_changes_nothing_and_drift_clears_when_reported_catches_up() {
        let v1 = doc(1, json!({"fw":"2"}), json!({"fw":"1"}), 100);
        let v2 = doc(2, json!({"fw":"2"}), json!({"fw":"1","bat":80}), 200);
        let v3 = doc(3, json!({"fw":"2"}), json!({"fw":"2"}), 300);
        let (t, c) = apply(None, &updated(None, v1.clone(), 100));
        assert_eq!(
            (c, t.version, t.drift_since_ms, t.drift_keys()),
            (TwinChange::Applied, 1, Some(100_000), vec!["fw".to_owned()])
        );
        let (t, _) = apply(Some(t), &updated(Some(v1.clone()), v2.clone(), 200));
        assert_eq!((t.version, t.drift_since_ms), (2, Some(100_000)), "drift kept while it persists");
        let (t2, c) = apply(Some(t.clone()), &updated(None, v1, 100));
        assert_eq!((c, &t2), (TwinChange::Stale, &t));
        let (t, _) = apply(Some(t), &updated(Some(v2), v3, 300));
        assert_eq!((t.version, t.drift_since_ms, t.delta.is_empty()), (3, None, true));
    }

    #[test]
    fn a_delete_is_mirrored_and_a_recreated_shadow_continues_its_versions() {
        let (t, _) = apply(None, &updated(None, doc(4, json!({"fw":"2"}), json!({"fw":"1"}), 100), 100));
        let delete = TwinEvent {
            thing: t.thing.clone(),
            shadow: t.shadow.clone(),
            event: ShadowEvent::Deleted { version: 4, at_ms: 150_000 },
        };
        let (t, c) = apply(Some(t), &delete);
        assert_eq!(
            (c, t.deleted, t.drift_since_ms, t.desired.is_empty()),
            (TwinChange::Applied, true, None, true)
        );
        let (t, c) = apply(Some(t), &delete);
        assert_eq!(c, TwinChange::Stale, "a repeated delete");
        let (t, c) = apply(Some(t), &updated(None, doc(5, json!({}), json!({"fw":"1"}), 200), 200));
        assert_eq!((c, t.deleted, t.version), (TwinChange::Applied, false, 5));
    }
}
