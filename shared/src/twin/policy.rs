//! Stale-desired policies: how long the fleet keeps asking a device for a desired value it
//! does not take, and what it does then, so fleets do not fight devices forever.
//!
//! A policy names a top-level desired key, a duration and an action. Once a twin has drifted
//! on that key for longer than the duration (the key's own drift start: the oldest version of
//! the run of versions that differ on it and reach the newest), twin-sync's scheduled sweep
//! marks the key *diverged* on the twin (`report`: listed by `fleetctl twin show|drift`,
//! counted as `Diverged`), and for `release` also removes the key from the shadow's desired
//! state, so the Device Shadow service stops sending the delta to the device.
//!
//! A divergence lasts while it still describes the twin ([`settle`], after every event): a
//! `report` mark ends when the device takes the value or an operator desires another one; a
//! `release` mark stays (as the record of what was given up) until desired names the key again.
//! A delete clears them all.

use serde_json::{json, Map, Value};

use crate::error::StoreError;
use crate::model::{Divergence, ShadowName, StaleAction, ThingName, Twin};
use crate::ports::{ShadowCallError, ShadowService};

use super::write::{ConflictBackoff, MAX_WRITE_ATTEMPTS};

/// The shortest divergence window a policy may set (shorter would fight every slow device).
pub const MIN_DIVERGE_AFTER_MS: i64 = 60_000;

/// One key's stale-desired policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StalePolicy {
    /// A top-level desired key (`mode`, `fw`): what a device is asked for as a whole.
    pub key: String,
    pub diverge_after_ms: i64,
    pub action: StaleAction,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPolicy {
    #[error("policy key {0:?}: expected a top-level desired key (1-128 characters, no '.', no control characters)")]
    Key(String),
    #[error("diverge after {0} ms: the shortest is 1 minute")]
    TooShort(i64),
    #[error("policy action {0:?}: expected report or release")]
    Action(String),
}

impl StalePolicy {
    /// A policy as a store keeps it, checked as [`StalePolicy::new`] checks it.
    pub fn stored(key: &str, diverge_after_ms: i64, action: &str) -> Result<Self, InvalidPolicy> {
        let action = match action {
            "report" => StaleAction::Report,
            "release" => StaleAction::Release,
            other => return Err(InvalidPolicy::Action(other.to_owned())),
        };
        Self::new(key, diverge_after_ms, action)
    }

    pub fn new(key: &str, diverge_after_ms: i64, action: StaleAction) -> Result<Self, InvalidPolicy> {
        if key.is_empty() || key.len() > 128 || key.contains('.') || key.chars().any(char::is_control) {
            return Err(InvalidPolicy::Key(key.to_owned()));
        }
        if diverge_after_ms < MIN_DIVERGE_AFTER_MS {
            return Err(InvalidPolicy::TooShort(diverge_after_ms));
        }
        Ok(Self { key: key.to_owned(), diverge_after_ms, action })
    }
}

/// The divergences `policies` call for on `twin` at `now_ms` that it does not carry yet.
pub fn due(twin: &Twin, policies: &[StalePolicy], now_ms: i64) -> Vec<(String, Divergence)> {
    if twin.deleted {
        return Vec::new();
    }
    policies
        .iter()
        .filter(|p| twin.delta.contains_key(&p.key) && !twin.diverged.contains_key(&p.key))
        .filter_map(|p| {
            // No fallback to the twin's own start: a history that cannot say when this value
            // started being refused marks late, never early.
            let since_ms = twin.history.key_drift_since_ms(&p.key)?;
            (now_ms - since_ms >= p.diverge_after_ms).then(|| {
                let divergence = Divergence {
                    since_ms,
                    marked_ms: now_ms,
                    desired: twin.desired.get(&p.key).cloned().unwrap_or(Value::Null),
                    reported: twin.reported.get(&p.key).cloned(),
                    action: p.action,
                    released: false,
                };
                (p.key.clone(), divergence)
            })
        })
        .collect()
}

/// Keep each divergence only while it still describes the twin (see the module doc); a
/// `release` whose key has left desired is marked released.
pub fn settle(twin: &mut Twin) {
    if twin.deleted {
        twin.diverged.clear();
        return;
    }
    let (desired, delta) = (&twin.desired, &twin.delta);
    twin.diverged.retain(|key, d| match desired.get(key) {
        // Still asked for the same value and still not taken; once released, any desired
        // value for the key is an operator asking again.
        Some(v) => !d.released && *v == d.desired && delta.contains_key(key),
        None if d.action == StaleAction::Release => {
            d.released = true;
            true
        }
        None => false,
    });
}

/// How a release ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The key is gone from desired: the shadow is at `version`.
    Released { version: u64 },
    /// Nothing to release: no shadow, desired no longer holds that value, or the device
    /// reports it now.
    NotNeeded,
    /// Every try met a newer version.
    GaveUp { attempts: usize },
    /// Refused by the service.
    Rejected { code: u16, message: String },
}

/// Remove `key` from the shadow's desired state if it still desires `expected` and the device
/// still does not report it. Each try carries the version it read; a conflict is read again
/// (the device may just have taken the value) and retried with bounded backoff.
pub async fn release<S: ShadowService>(
    svc: &S,
    thing: &ThingName,
    shadow: &ShadowName,
    key: &str,
    expected: &Value,
    client_token: &str,
) -> Result<ReleaseOutcome, StoreError> {
    let mut backoff = ConflictBackoff::new(client_token);
    for attempt in 1..=MAX_WRITE_ATTEMPTS {
        let Some(current) = svc.get_shadow(thing, shadow).await? else {
            return Ok(ReleaseOutcome::NotNeeded);
        };
        // Taken as the delta counts it (an object may be reported with more keys than desired).
        let wanted: Map<String, Value> = [(key.to_owned(), expected.clone())].into_iter().collect();
        if current.desired.get(key) != Some(expected) || super::delta(&wanted, &current.reported).is_empty() {
            return Ok(ReleaseOutcome::NotNeeded);
        }
        let mut desired = Map::new();
        desired.insert(key.to_owned(), Value::Null);
        let request =
            json!({"state": {"desired": desired}, "version": current.version, "clientToken": client_token});
        match svc.update_shadow(thing, shadow, &request).await {
            Ok(version) => return Ok(ReleaseOutcome::Released { version }),
            Err(ShadowCallError::Conflict) => backoff.wait(attempt).await,
            Err(ShadowCallError::Rejected { code, message }) => {
                return Ok(ReleaseOutcome::Rejected { code, message })
            }
            Err(ShadowCallError::Store(e)) => return Err(e),
        }
    }
    Ok(ReleaseOutcome::GaveUp { attempts: MAX_WRITE_ATTEMPTS })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twin::{apply, TwinEvent};

    const HOUR_MS: i64 = 3_600_000;

    /// A documents event for `thing`'s classic shadow at `version`, written at `at_s`.
    fn update(version: u64, desired: Value, reported: Value, at_s: i64) -> TwinEvent {
        let body = json!({
            "current": {"state": {"desired": desired, "reported": reported},
                        "metadata": {"desired": {}}, "version": version},
            "timestamp": at_s, "thing": "dev-1", "shadow": ""});
        TwinEvent::parse(body.to_string().as_bytes()).expect("event")
    }

    fn twin_of(events: &[TwinEvent]) -> Twin {
        events.iter().fold(None, |stored, e| Some(apply(stored, e).0)).expect("events")
    }

    fn policy(key: &str, hours: i64, action: StaleAction) -> StalePolicy {
        StalePolicy::new(key, hours * HOUR_MS, action).expect("policy")
    }

    #[test]
    fn a_key_diverges_after_its_own_drift_not_the_twins() {
        // GIVEN fw drifting since t0 and mode only since t0 + 5 h
        let t0 = 1_764_000_000;
        let twin = twin_of(&[
            update(1, json!({"fw": "2", "mode": "eco"}), json!({"fw": "1", "mode": "eco"}), t0),
            update(2, json!({"fw": "2", "mode": "off"}), json!({"fw": "1", "mode": "eco"}), t0 + 5 * 3600),
        ]);
        let policies = [policy("fw", 6, StaleAction::Report), policy("mode", 6, StaleAction::Release)];
        // WHEN the sweep runs 6 h after t0, then 6 h after mode started
        let early = due(&twin, &policies, (t0 + 6 * 3600) * 1000);
        let late = due(&twin, &policies, (t0 + 11 * 3600) * 1000);
        // THEN only fw is due first (since t0), then both, each with its own start
        assert_eq!(early.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["fw"]);
        assert_eq!(early[0].1.since_ms, t0 * 1000);
        assert_eq!((early[0].1.desired.clone(), early[0].1.reported.clone()), (json!("2"), Some(json!("1"))));
        let since: Vec<(&str, i64)> = late.iter().map(|(k, d)| (k.as_str(), d.since_ms)).collect();
        assert_eq!(since, [("fw", t0 * 1000), ("mode", (t0 + 5 * 3600) * 1000)]);
        assert_eq!(late[1].1.action, StaleAction::Release);
    }

    #[test]
    fn a_divergence_lasts_while_it_describes_the_twin() {
        let t0 = 1_764_000_000;
        let drifting = update(1, json!({"fw": "2", "mode": "off"}), json!({"fw": "1", "mode": "eco"}), t0);
        let mut twin = twin_of(std::slice::from_ref(&drifting));
        let policies = [policy("fw", 1, StaleAction::Report), policy("mode", 1, StaleAction::Release)];
        for (key, d) in due(&twin, &policies, (t0 + 7200) * 1000) {
            twin.diverged.insert(key, d);
        }
        // WHEN the device reports again without taking anything: both marks stay
        let (twin2, _) = apply(
            Some(twin.clone()),
            &update(2, json!({"fw": "2", "mode": "off"}), json!({"fw": "1", "mode": "eco"}), t0 + 7300),
        );
        assert_eq!(twin2.diverged.keys().collect::<Vec<_>>(), ["fw", "mode"]);
        // WHEN mode is released (desired loses it) and fw is desired at another value
        let (twin3, _) =
            apply(Some(twin2), &update(3, json!({"fw": "3"}), json!({"fw": "1", "mode": "eco"}), t0 + 7400));
        // THEN fw's mark ends (a new request), mode's stays as released
        assert_eq!(twin3.diverged.keys().collect::<Vec<_>>(), ["mode"]);
        assert!(twin3.diverged["mode"].released);
        // WHEN an operator desires mode again, that mark ends too; a delete clears everything
        let (twin4, _) = apply(
            Some(twin3.clone()),
            &update(4, json!({"fw": "3", "mode": "off"}), json!({"fw": "1"}), t0 + 7500),
        );
        assert!(twin4.diverged.is_empty());
        let deleted =
            TwinEvent::parse(br#"{"version":3,"timestamp":1764007600,"thing":"dev-1","shadow":""}"#)
                .expect("delete");
        let mut marked = twin3;
        marked.version = 2;
        assert!(apply(Some(marked), &deleted).0.diverged.is_empty());
    }

    #[test]
    fn policies_refuse_nested_keys_and_windows_under_a_minute() {
        assert!(matches!(StalePolicy::new("a.b", HOUR_MS, StaleAction::Report), Err(InvalidPolicy::Key(_))));
        assert!(matches!(StalePolicy::new("", HOUR_MS, StaleAction::Report), Err(InvalidPolicy::Key(_))));
        assert!(matches!(
            StalePolicy::new("mode", 59_999, StaleAction::Report),
            Err(InvalidPolicy::TooShort(_))
        ));
        assert!(StalePolicy::new("mode", 60_000, StaleAction::Release).is_ok());
    }

    /// A shadow service over one shadow, with scripted conflicts: before answering the first
    /// `conflicts` updates with 409, it applies `meanwhile` (another writer's change).
    struct Scripted {
        state: std::sync::Mutex<crate::ports::ShadowState>,
        conflicts: std::sync::atomic::AtomicUsize,
        meanwhile: fn(&mut crate::ports::ShadowState),
        reject: bool,
    }

    impl Scripted {
        fn new(
            desired: Value,
            reported: Value,
            conflicts: usize,
            meanwhile: fn(&mut crate::ports::ShadowState),
        ) -> Self {
            let obj = |v: Value| v.as_object().cloned().unwrap_or_default();
            let state =
                crate::ports::ShadowState { version: 4, desired: obj(desired), reported: obj(reported) };
            Self { state: state.into(), conflicts: conflicts.into(), meanwhile, reject: false }
        }
    }

    impl ShadowService for Scripted {
        async fn get_shadow(
            &self,
            _: &ThingName,
            _: &ShadowName,
        ) -> Result<Option<crate::ports::ShadowState>, StoreError> {
            Ok(Some(self.state.lock().expect("lock").clone()))
        }
        async fn update_shadow(
            &self,
            _: &ThingName,
            _: &ShadowName,
            request: &Value,
        ) -> Result<u64, ShadowCallError> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.reject {
                return Err(ShadowCallError::Rejected { code: 403, message: "not authorized".into() });
            }
            let mut state = self.state.lock().expect("lock");
            if self.conflicts.load(SeqCst) > 0 {
                self.conflicts.fetch_sub(1, SeqCst);
                (self.meanwhile)(&mut state);
                state.version += 1;
                return Err(ShadowCallError::Conflict);
            }
            assert_eq!(request["version"].as_u64(), Some(state.version), "carries the version it read");
            for (k, v) in request["state"]["desired"].as_object().cloned().unwrap_or_default() {
                if v.is_null() {
                    state.desired.remove(&k);
                }
            }
            state.version += 1;
            Ok(state.version)
        }
        async fn delete_shadow(&self, _: &ThingName, _: &ShadowName) -> Result<Option<u64>, StoreError> {
            Ok(None)
        }
    }

    async fn release_mode(svc: &Scripted) -> Result<ReleaseOutcome, StoreError> {
        let thing = ThingName::parse("dev-1").expect("thing");
        release(svc, &thing, &ShadowName::classic(), "mode", &json!("eco"), "t").await
    }

    #[tokio::test]
    async fn a_release_removes_the_key_with_the_version_it_read() -> Result<(), StoreError> {
        let svc = Scripted::new(json!({"mode": "eco", "fw": "2"}), json!({"mode": "on"}), 0, |_| {});
        assert_eq!(release_mode(&svc).await?, ReleaseOutcome::Released { version: 5 });
        let state = svc.state.lock().expect("lock").clone();
        assert!(!state.desired.contains_key("mode") && state.desired.contains_key("fw"), "{state:?}");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_conflict_it_reads_again_and_lets_a_device_that_took_the_value_be(
    ) -> Result<(), StoreError> {
        // the other writer: the device reports eco (with more keys than desired names)
        let svc = Scripted::new(json!({"mode": "eco"}), json!({"mode": "on"}), 1, |s| {
            s.reported.insert("mode".into(), json!("eco"));
        });
        assert_eq!(release_mode(&svc).await?, ReleaseOutcome::NotNeeded);
        // an operator who desires another value meanwhile is not overridden either
        let svc = Scripted::new(json!({"mode": "eco"}), json!({"mode": "on"}), 1, |s| {
            s.desired.insert("mode".into(), json!("off"));
        });
        assert_eq!(release_mode(&svc).await?, ReleaseOutcome::NotNeeded);
        assert_eq!(svc.state.lock().expect("lock").desired["mode"], "off");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn endless_conflicts_give_up_and_a_refusal_is_reported() -> Result<(), StoreError> {
        let svc = Scripted::new(json!({"mode": "eco"}), json!({"mode": "on"}), usize::MAX, |_| {});
        assert_eq!(release_mode(&svc).await?, ReleaseOutcome::GaveUp { attempts: MAX_WRITE_ATTEMPTS });
        let mut svc = Scripted::new(json!({"mode": "eco"}), json!({"mode": "on"}), 0, |_| {});
        svc.reject = true;
        assert!(matches!(release_mode(&svc).await?, ReleaseOutcome::Rejected { code: 403, .. }));
        // an object reported with more keys than desired counts as taken
        let svc = Scripted::new(json!({"mode": {"a": 1}}), json!({"mode": {"a": 1, "b": 2}}), 0, |_| {});
        let thing = ThingName::parse("dev-1").expect("thing");
        let out = release(&svc, &thing, &ShadowName::classic(), "mode", &json!({"a": 1}), "t").await?;
        assert_eq!(out, ReleaseOutcome::NotNeeded);
        Ok(())
    }
}
