//! Operator writes to a device shadow that never lose an update: each write carries the
//! version it read; a version conflict (409) is read again and retried with bounded, jittered
//! backoff; the outcome says which happened. Writes AWS would refuse are refused before any
//! call, with the limit they break (AWS checks 8 KB on the merged document, so the merge is
//! computed here the way the service computes it).

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::error::StoreError;
use crate::model::{ShadowName, ThingName};
use crate::ports::{ShadowCallError, ShadowService, ShadowState as Current};

/// AWS: desired + reported at most 8 KB, nesting at most 6 levels, clientToken at most 64 bytes.
pub const MAX_STATE_BYTES: usize = 8 * 1024;
pub const MAX_DEPTH: usize = 6;
pub const MAX_CLIENT_TOKEN_BYTES: usize = 64;
/// Attempts before a write that keeps meeting newer versions gives up.
pub const MAX_WRITE_ATTEMPTS: usize = 8;

/// How an operator write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Applied: the shadow is now at `version`, after `attempts` tries.
    Applied { version: u64, attempts: usize },
    /// Every try met a newer version: not applied.
    GaveUp { attempts: usize },
    /// Refused, by the service (its HTTP code and message) or before calling (code 400/413).
    Rejected { code: u16, message: String },
}

/// Merge `patch` into `target` as the shadow service does (`null` deletes, objects merge).
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let t = target.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !t.is_object() {
                    *t = Value::Object(Map::new());
                }
                if let Value::Object(t) = t {
                    merge(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Levels of objects, counting `v` itself.
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Why AWS would refuse `desired` on top of `current`, before any call.
pub fn check_limits(
    current: Option<&Current>,
    desired: &Map<String, Value>,
    client_token: &str,
) -> Result<(), WriteOutcome> {
    let refuse = |code, message: String| Err(WriteOutcome::Rejected { code, message });
    if client_token.len() > MAX_CLIENT_TOKEN_BYTES {
        return refuse(
            400,
            format!("clientToken is {} bytes > {MAX_CLIENT_TOKEN_BYTES}", client_token.len()),
        );
    }
    if depth(&Value::Object(desired.clone())) > MAX_DEPTH {
        return refuse(400, format!("desired nests deeper than {MAX_DEPTH} levels"));
    }
    let mut merged = current.map(|c| c.desired.clone()).unwrap_or_default();
    merge(&mut merged, desired);
    let reported = current.map(|c| c.reported.clone()).unwrap_or_default();
    let bytes =
        serde_json::to_vec(&json!({"desired": merged, "reported": reported})).map_or(usize::MAX, |b| b.len());
    if bytes > MAX_STATE_BYTES {
        return refuse(413, format!("the merged document would be {bytes} bytes > {MAX_STATE_BYTES}"));
    }
    Ok(())
}

/// Backoff before retry `attempt` (1-based) after a conflict: 20 ms doubling to 640 ms, jittered.
fn conflict_backoff(attempt: usize, jitter: u64) -> Duration {
    let base = 20u64 << attempt.min(5);
    Duration::from_millis(base / 2 + jitter % (base / 2 + 1))
}

/// The waits between conflicting writes of one writer: jitter seeded by its client token, so
/// writers that collided once spread out.
pub(crate) struct ConflictBackoff(u64);

impl ConflictBackoff {
    pub(crate) fn new(client_token: &str) -> Self {
        Self(client_token.bytes().fold(0x9e37_79b9u64, |h, b| h.rotate_left(5) ^ u64::from(b)))
    }

    pub(crate) async fn wait(&mut self, attempt: usize) {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        tokio::time::sleep(conflict_backoff(attempt, self.0 >> 33)).await;
    }
}

/// Write `desired` (a merge patch: `null` deletes a key) to a shadow, retrying on conflicts.
pub async fn set_desired<S: ShadowService>(
    svc: &S,
    thing: &ThingName,
    shadow: &ShadowName,
    desired: &Map<String, Value>,
    client_token: &str,
) -> Result<WriteOutcome, StoreError> {
    let mut backoff = ConflictBackoff::new(client_token);
    for attempt in 1..=MAX_WRITE_ATTEMPTS {
        let current = svc.get_shadow(thing, shadow).await?;
        if let Err(refused) = check_limits(current.as_ref(), desired, client_token) {
            return Ok(refused);
        }
        let mut request = json!({"state": {"desired": desired}, "clientToken": client_token});
        if let Some(c) = &current {
            request["version"] = c.version.into();
        }
        match svc.update_shadow(thing, shadow, &request).await {
            Ok(version) => return Ok(WriteOutcome::Applied { version, attempts: attempt }),
            Err(ShadowCallError::Conflict) => backoff.wait(attempt).await,
            Err(ShadowCallError::Rejected { code, message }) => {
                return Ok(WriteOutcome::Rejected { code, message })
            }
            Err(ShadowCallError::Store(e)) => return Err(e),
        }
    }
    Ok(WriteOutcome::GaveUp { attempts: MAX_WRITE_ATTEMPTS })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn limits_are_checked_on_the_merged_document() {
        let current = Current {
            version: 3,
            desired: obj(json!({"blob": "x".repeat(5_000)})),
            reported: obj(json!({"blob": "y".repeat(3_000)})),
        };
        // small on its own, over 8 KB once merged with what is there
        let add = obj(json!({"more": "z".repeat(500)}));
        assert!(matches!(
            check_limits(Some(&current), &add, "t"),
            Err(WriteOutcome::Rejected { code: 413, .. })
        ));
        // deleting the big key makes room
        let replace = obj(json!({"blob": null, "more": "z".repeat(500)}));
        assert_eq!(check_limits(Some(&current), &replace, "t"), Ok(()));
        let deep = obj(json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}));
        assert!(matches!(check_limits(None, &deep, "t"), Err(WriteOutcome::Rejected { code: 400, .. })));
        assert!(matches!(
            check_limits(None, &add, &"t".repeat(65)),
            Err(WriteOutcome::Rejected { code: 400, .. })
        ));
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 1..=MAX_WRITE_ATTEMPTS {
            for jitter in [0, 7, u64::MAX] {
                assert!(conflict_backoff(attempt, jitter) <= Duration::from_millis(640), "{attempt}");
            }
        }
    }
}
