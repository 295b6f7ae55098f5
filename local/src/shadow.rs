//! The Device Shadow service of the local IoT Core: classic and named shadows over MQTT, as
//! AWS serves them. A device publishes on `$aws/things/<t>/shadow[/name/<s>]/update|get|delete`;
//! the service answers on `…/accepted` or `…/rejected`, and after an accepted update publishes
//! `…/update/delta` (when desired differs from reported) and `…/update/documents` (previous
//! and current), which the rules engine sees like any other publish (that is how twin-sync
//! gets them, as in the cloud).
//!
//! Matches AWS: merge semantics (`null` deletes a key, objects merge, anything else replaces),
//! per-leaf metadata timestamps, versions (+1 per accepted update; `version` in a request must
//! equal the current one or the update is rejected with 409; a deleted shadow's next version
//! continues its numbering), `clientToken` echoed, error bodies `{code, message, timestamp,
//! clientToken}` with 400 (invalid JSON, missing `state`, a `state` node other than `desired`
//! and `reported`, a `version` that is no non-negative whole number, a `clientToken` that is
//! no string of at most 64 bytes, an array holding `null`, nesting deeper than 6), 404 (no
//! shadow), 409 (version conflict), 413 (desired + reported over 8 KB after the merge).
//! A shadow deleted less than 48 hours ago and created again continues its version numbers.
//! Shadows are kept in the local database (`local_shadows`), so they outlive a restart: every
//! change is numbered under the service's lock and stored before it is answered (a failed store
//! is logged; the change then lives in memory only), and a write never replaces a later change.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use fleet_shared::adapters::embedded::LocalShadow;
use fleet_shared::twin::write::{depth, MAX_CLIENT_TOKEN_BYTES, MAX_DEPTH, MAX_STATE_BYTES};

/// How long AWS remembers a deleted shadow's version: created again within this time, a shadow
/// continues its numbering; later, it starts again at 1.
pub const DELETED_VERSION_KEPT_S: i64 = 48 * 3600;

/// What a publish on a shadow topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowRequest {
    pub thing: String,
    /// `""` for the classic shadow.
    pub shadow: String,
    pub op: Op,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Update,
    Get,
    Delete,
}

impl ShadowRequest {
    /// `$aws/things/<t>/shadow/<op>` or `$aws/things/<t>/shadow/name/<s>/<op>`; response
    /// topics (`…/accepted`, `…/delta`, …) are not requests.
    pub fn parse(topic: &str) -> Option<Self> {
        let parts: Vec<&str> = topic.split('/').collect();
        let (thing, shadow, op) = match parts.as_slice() {
            ["$aws", "things", t, "shadow", op] => (*t, "", *op),
            ["$aws", "things", t, "shadow", "name", s, op] => (*t, *s, *op),
            _ => return None,
        };
        let op = match op {
            "update" => Op::Update,
            "get" => Op::Get,
            "delete" => Op::Delete,
            _ => return None,
        };
        Some(Self { thing: thing.to_owned(), shadow: shadow.to_owned(), op })
    }

    /// The topic prefix answers go under: `$aws/things/<t>/shadow[/name/<s>]/<op>`.
    fn base(&self) -> String {
        let op = match self.op {
            Op::Update => "update",
            Op::Get => "get",
            Op::Delete => "delete",
        };
        if self.shadow.is_empty() {
            format!("$aws/things/{}/shadow/{op}", self.thing)
        } else {
            format!("$aws/things/{}/shadow/name/{}/{op}", self.thing, self.shadow)
        }
    }
}

/// A shadow answer topic (`…/shadow[/name/<s>]/<op>/accepted|rejected|delta|documents`):
/// published by the service only.
pub fn is_answer_topic(topic: &str) -> bool {
    let parts: Vec<&str> = topic.split('/').collect();
    let tail = match parts.as_slice() {
        ["$aws", "things", _, "shadow", rest @ ..] => rest,
        _ => return false,
    };
    let tail = match tail {
        ["name", _, rest @ ..] => rest,
        rest => rest,
    };
    matches!(tail, [_, "accepted" | "rejected" | "delta" | "documents"])
}

#[derive(Debug, Clone, Default)]
struct Document {
    desired: Map<String, Value>,
    reported: Map<String, Value>,
    meta_desired: Map<String, Value>,
    meta_reported: Map<String, Value>,
    version: u64,
}

/// `{"desired": …, "reported": …}`, leaving out an empty section (as AWS's documents do).
fn sections(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for (name, section) in [("desired", desired), ("reported", reported)] {
        if !section.is_empty() {
            out.insert(name.into(), Value::Object(section.clone()));
        }
    }
    Value::Object(out)
}

impl Document {
    fn state(&self) -> Value {
        sections(&self.desired, &self.reported)
    }

    fn metadata(&self) -> Value {
        sections(&self.meta_desired, &self.meta_reported)
    }

    fn snapshot(&self) -> Value {
        json!({"state": self.state(), "metadata": self.metadata(), "version": self.version})
    }

    /// Back from a [`Document::snapshot`].
    fn from_snapshot(v: &Value) -> Self {
        let section = |outer: &str, name: &str| v[outer][name].as_object().cloned().unwrap_or_default();
        Document {
            desired: section("state", "desired"),
            reported: section("state", "reported"),
            meta_desired: section("metadata", "desired"),
            meta_reported: section("metadata", "reported"),
            version: v["version"].as_u64().unwrap_or(0),
        }
    }
}

/// Merge `patch` into `target` (AWS shadow semantics), stamping `meta` for every leaf written.
fn merge(
    target: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now_s: i64,
) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
                meta.remove(k);
            }
            Value::Object(p) => {
                let t = target.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !t.is_object() {
                    *t = Value::Object(Map::new());
                }
                let m = meta.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !m.is_object() || m.get("timestamp").is_some() {
                    *m = Value::Object(Map::new());
                }
                if let (Value::Object(t), Value::Object(m)) = (t, m) {
                    merge(t, m, p, now_s);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
                meta.insert(k.clone(), stamp(other, now_s));
            }
        }
    }
}

/// Metadata for a written leaf: `{"timestamp": t}`, or per element for an array.
fn stamp(v: &Value, now_s: i64) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.iter().map(|e| stamp(e, now_s)).collect()),
        _ => json!({"timestamp": now_s}),
    }
}

/// Metadata of the leaves `patch` writes (for the accepted and delta answers).
fn patch_metadata(patch: &Map<String, Value>, now_s: i64) -> Value {
    let mut out = Map::new();
    for (k, v) in patch {
        out.insert(
            k.clone(),
            match v {
                Value::Object(p) => patch_metadata(p, now_s),
                other => stamp(other, now_s),
            },
        );
    }
    Value::Object(out)
}

/// Delta metadata: the desired metadata of the delta's leaves.
fn delta_metadata(delta: &Map<String, Value>, meta: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for (k, v) in delta {
        let m = meta.get(k).cloned().unwrap_or(Value::Null);
        out.insert(
            k.clone(),
            match (v, &m) {
                (Value::Object(d), Value::Object(inner)) if !inner.contains_key("timestamp") => {
                    delta_metadata(d, inner)
                }
                _ => m,
            },
        );
    }
    Value::Object(out)
}

/// Whether an array anywhere in `v` has a `null` element (AWS refuses such a state: a `null`
/// deletes a key, and an array's elements have none).
fn holds_null_in_array(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.iter().any(|e| e.is_null() || holds_null_in_array(e)),
        Value::Object(m) => m.values().any(holds_null_in_array),
        _ => false,
    }
}

/// The shadows of the local IoT Core.
#[derive(Default)]
pub struct Shadows {
    docs: HashMap<(String, String), Document>,
    /// Deleted shadows: their last version and when (seconds), so a shadow created again
    /// within [`DELETED_VERSION_KEPT_S`] continues from it.
    deleted: HashMap<(String, String), (u64, i64)>,
    /// The change counter (continues across restarts, from the stored rows).
    seq: u64,
    /// Changes not yet handed out by [`Shadows::take_changes`], in order.
    changes: Vec<LocalShadow>,
}

/// One message the service publishes.
pub type Answer = (String, Vec<u8>);

fn rejected(base: &str, code: u16, message: &str, token: Option<&Value>, now_s: i64) -> Vec<Answer> {
    let mut body = json!({"code": code, "message": message, "timestamp": now_s});
    if let Some(t) = token {
        body["clientToken"] = t.clone();
    }
    vec![(format!("{base}/rejected"), body.to_string().into_bytes())]
}

fn with_token(mut v: Value, token: Option<&Value>) -> Vec<u8> {
    if let Some(t) = token {
        v["clientToken"] = t.clone();
    }
    v.to_string().into_bytes()
}

impl Shadows {
    /// The shadows a previous run left in the database. A row that does not read back as a
    /// document is skipped (and logged), never fatal.
    pub fn restore(rows: Vec<LocalShadow>) -> Self {
        let mut shadows = Shadows::default();
        for row in rows {
            shadows.seq = shadows.seq.max(row.seq);
            let key = (row.thing, row.shadow);
            match (row.document, row.deleted_at_ms) {
                (Some(text), _) => match serde_json::from_str::<Value>(&text) {
                    Ok(v) => {
                        shadows.docs.insert(key, Document::from_snapshot(&v));
                    }
                    Err(e) => {
                        tracing::warn!(thing = %key.0, shadow = %key.1, error = %e, "stored shadow unreadable, skipped")
                    }
                },
                (None, at_ms) => {
                    shadows.deleted.insert(key, (row.version, at_ms.unwrap_or(0) / 1000));
                }
            }
        }
        shadows
    }

    /// The changes made since the last call, in order, for the database.
    pub fn take_changes(&mut self) -> Vec<LocalShadow> {
        std::mem::take(&mut self.changes)
    }

    fn changed(&mut self, key: &(String, String), version: u64, document: Option<String>, now_s: i64) {
        self.seq += 1;
        let deleted_at_ms = document.is_none().then_some(now_s * 1000);
        self.changes.push(LocalShadow {
            thing: key.0.clone(),
            shadow: key.1.clone(),
            version,
            document,
            deleted_at_ms,
            seq: self.seq,
        });
    }

    /// Serve one request; what to publish, in order.
    pub fn handle(&mut self, req: &ShadowRequest, payload: &[u8], now_s: i64) -> Vec<Answer> {
        let base = req.base();
        let key = (req.thing.clone(), req.shadow.clone());
        let body: Value = if payload.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            match serde_json::from_slice(payload) {
                Ok(v @ Value::Object(_)) => v,
                _ => return rejected(&base, 400, "Payload contains invalid json", None, now_s),
            }
        };
        // `null` stands for no token; anything else must be a string of at most 64 bytes.
        let token = match body.get("clientToken") {
            None | Some(Value::Null) => None,
            Some(t @ Value::String(s)) if s.len() <= MAX_CLIENT_TOKEN_BYTES => Some(t),
            Some(_) => return rejected(&base, 400, "Invalid clientToken", None, now_s),
        };
        let missing = || {
            format!(
                "No shadow exists with name: '{}'",
                if req.shadow.is_empty() { &req.thing } else { &req.shadow }
            )
        };
        match req.op {
            Op::Get => match self.docs.get(&key) {
                None => rejected(&base, 404, &missing(), token, now_s),
                Some(d) => {
                    let mut state = d.state();
                    let delta = fleet_shared::twin::delta(&d.desired, &d.reported);
                    if !delta.is_empty() {
                        state["delta"] = Value::Object(delta);
                    }
                    let answer = json!({"state": state, "metadata": d.metadata(), "version": d.version, "timestamp": now_s});
                    vec![(format!("{base}/accepted"), with_token(answer, token))]
                }
            },
            Op::Delete => match self.docs.remove(&key) {
                None => rejected(&base, 404, &missing(), token, now_s),
                Some(d) => {
                    self.changed(&key, d.version, None, now_s);
                    self.deleted.insert(key, (d.version, now_s));
                    let answer = json!({"version": d.version, "timestamp": now_s});
                    vec![(format!("{base}/accepted"), with_token(answer, token))]
                }
            },
            Op::Update => self.update(&base, key, &body, token, now_s),
        }
    }

    fn update(
        &mut self,
        base: &str,
        key: (String, String),
        body: &Value,
        token: Option<&Value>,
        now_s: i64,
    ) -> Vec<Answer> {
        let Some(state) = body.get("state").and_then(Value::as_object) else {
            return rejected(base, 400, "Missing required node: state", token, now_s);
        };
        if let Some(node) = state.keys().find(|k| !matches!(k.as_str(), "desired" | "reported")) {
            return rejected(base, 400, &format!("State contains an invalid node: '{node}'"), token, now_s);
        }
        let section = |name: &str| match state.get(name) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::Object(m)) => Ok(Some(Some(m.clone()))),
            Some(_) => Err(format!("Invalid {name} state: must be an object or null")),
        };
        let (desired, reported) = match (section("desired"), section("reported")) {
            (Ok(d), Ok(r)) => (d, r),
            (Err(e), _) | (_, Err(e)) => return rejected(base, 400, &e, token, now_s),
        };
        // `null` stands for no version; anything else must be a non-negative whole number.
        let expected_version = match body.get("version") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) => Some(n),
                None => return rejected(base, 400, "Invalid version", token, now_s),
            },
        };
        if state.values().any(|v| depth(v) > MAX_DEPTH) {
            return rejected(
                base,
                400,
                "JSON contains too many levels of nesting; maximum is 6",
                token,
                now_s,
            );
        }
        if state.values().any(holds_null_in_array) {
            return rejected(base, 400, "Invalid JSON: arrays can't contain null", token, now_s);
        }
        let previous = self.docs.get(&key).cloned();
        let current_version = previous.as_ref().map(|d| d.version);
        // A request's version must be the shadow's current one (none for a new shadow: conflict).
        if expected_version.is_some_and(|v| Some(v) != current_version) {
            return rejected(base, 409, "Version conflict", token, now_s);
        }
        let mut doc = previous.clone().unwrap_or_default();
        match desired {
            Some(None) => {
                doc.desired.clear();
                doc.meta_desired.clear();
            }
            Some(Some(patch)) => merge(&mut doc.desired, &mut doc.meta_desired, &patch, now_s),
            None => {}
        }
        match reported {
            Some(None) => {
                doc.reported.clear();
                doc.meta_reported.clear();
            }
            Some(Some(patch)) => merge(&mut doc.reported, &mut doc.meta_reported, &patch, now_s),
            None => {}
        }
        let size = serde_json::to_vec(&doc.state()).map_or(usize::MAX, |b| b.len());
        if size > MAX_STATE_BYTES {
            return rejected(base, 413, "The payload exceeds the maximum size allowed", token, now_s);
        }
        doc.version = match current_version {
            Some(v) => v + 1,
            None => match self.deleted.get(&key) {
                Some(&(version, at_s)) if now_s - at_s < DELETED_VERSION_KEPT_S => version + 1,
                _ => 1,
            },
        };
        let request_state = Value::Object(state.clone());
        let mut accepted_meta = Map::new();
        for name in ["desired", "reported"] {
            if let Some(Value::Object(p)) = state.get(name) {
                accepted_meta.insert(name.into(), patch_metadata(p, now_s));
            }
        }
        let accepted = json!({"state": request_state, "metadata": accepted_meta, "version": doc.version, "timestamp": now_s});
        let mut out = vec![(format!("{base}/accepted"), with_token(accepted, token))];
        let delta = fleet_shared::twin::delta(&doc.desired, &doc.reported);
        if !delta.is_empty() {
            let answer = json!({"state": delta, "metadata": delta_metadata(&delta, &doc.meta_desired),
                                "version": doc.version, "timestamp": now_s});
            out.push((format!("{base}/delta"), with_token(answer, token)));
        }
        let documents = json!({"previous": previous.as_ref().map(Document::snapshot), "current": doc.snapshot(), "timestamp": now_s});
        out.push((format!("{base}/documents"), with_token(documents, token)));
        self.changed(&key, doc.version, Some(doc.snapshot().to_string()), now_s);
        self.deleted.remove(&key);
        self.docs.insert(key, doc);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(topic: &str) -> ShadowRequest {
        ShadowRequest::parse(topic).expect("a shadow request")
    }

    fn answers(s: &mut Shadows, topic: &str, body: Value) -> Vec<(String, Value)> {
        s.handle(&req(topic), body.to_string().as_bytes(), 100)
            .into_iter()
            .map(|(t, b)| (t, serde_json::from_slice(&b).expect("JSON")))
            .collect()
    }

    #[test]
    fn answer_topics_are_told_from_requests() {
        assert!(is_answer_topic("$aws/things/d1/shadow/update/documents"));
        assert!(is_answer_topic("$aws/things/d1/shadow/name/cfg/get/accepted"));
        assert!(!is_answer_topic("$aws/things/d1/shadow/update"));
        assert!(!is_answer_topic("dt/fleet/d1/telemetry"));
    }

    #[test]
    fn parses_only_request_topics() {
        assert_eq!(req("$aws/things/d1/shadow/update").op, Op::Update);
        let named = req("$aws/things/d1/shadow/name/config/get");
        assert_eq!((named.shadow.as_str(), named.op), ("config", Op::Get));
        for t in
            ["$aws/things/d1/shadow/update/accepted", "$aws/things/d1/shadow/list", "dt/fleet/d1/telemetry"]
        {
            assert!(ShadowRequest::parse(t).is_none(), "{t}");
        }
    }

    #[test]
    fn an_update_is_accepted_with_a_delta_and_documents_and_versions_grow() {
        let mut s = Shadows::default();
        let a = answers(
            &mut s,
            "$aws/things/d1/shadow/update",
            json!({"state":{"desired":{"fw":"2","cfg":{"a":1}}},"clientToken":"t1"}),
        );
        let topics: Vec<&str> = a.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            [
                "$aws/things/d1/shadow/update/accepted",
                "$aws/things/d1/shadow/update/delta",
                "$aws/things/d1/shadow/update/documents"
            ]
        );
        assert_eq!((a[0].1["version"].as_u64(), &a[0].1["clientToken"]), (Some(1), &json!("t1")));
        assert_eq!(a[0].1["metadata"]["desired"]["cfg"]["a"]["timestamp"], 100);
        assert_eq!(a[1].1["state"], json!({"fw":"2","cfg":{"a":1}}));
        assert_eq!(
            (a[2].1["previous"].clone(), a[2].1["current"]["version"].as_u64()),
            (Value::Null, Some(1))
        );
        // the device reports the firmware and removes nothing; the delta shrinks to cfg
        let a = answers(
            &mut s,
            "$aws/things/d1/shadow/update",
            json!({"state":{"reported":{"fw":"2","cfg":{"a":1,"b":2}}}}),
        );
        let topics: Vec<&str> = a.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            ["$aws/things/d1/shadow/update/accepted", "$aws/things/d1/shadow/update/documents"],
            "in sync: no delta"
        );
        assert_eq!(a[1].1["previous"]["version"], 1);
        assert_eq!(a[1].1["current"]["state"]["reported"]["cfg"], json!({"a":1,"b":2}));
        // null deletes a key
        answers(&mut s, "$aws/things/d1/shadow/update", json!({"state":{"desired":{"cfg":null}}}));
        let got = answers(&mut s, "$aws/things/d1/shadow/get", json!({}));
        assert_eq!(got[0].1["state"]["desired"], json!({"fw":"2"}));
        assert_eq!(got[0].1["version"], 3);
    }

    #[test]
    fn rejects_as_aws_does() {
        let mut s = Shadows::default();
        let code =
            |a: &[(String, Value)]| (a[0].0.rsplit('/').next().map(str::to_owned), a[0].1["code"].as_u64());
        let a = answers(&mut s, "$aws/things/d1/shadow/get", json!({"clientToken":"x"}));
        assert_eq!(code(&a), (Some("rejected".into()), Some(404)));
        assert_eq!(a[0].1["clientToken"], "x");
        let bad = s.handle(&req("$aws/things/d1/shadow/update"), b"{not json", 1);
        assert!(String::from_utf8_lossy(&bad[0].1).contains("\"code\":400"));
        assert_eq!(
            code(&answers(&mut s, "$aws/things/d1/shadow/update", json!({"desired":{}}))).1,
            Some(400)
        );
        let deep = json!({"state":{"desired":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}});
        assert_eq!(code(&answers(&mut s, "$aws/things/d1/shadow/update", deep)).1, Some(400));
        answers(&mut s, "$aws/things/d1/shadow/update", json!({"state":{"reported":{"x":1}}}));
        assert_eq!(
            code(&answers(
                &mut s,
                "$aws/things/d1/shadow/update",
                json!({"state":{"reported":{"x":2}},"version":7})
            ))
            .1,
            Some(409)
        );
        assert_eq!(
            code(&answers(
                &mut s,
                "$aws/things/d1/shadow/update",
                json!({"state":{"reported":{"x":2}},"version":1})
            ))
            .0,
            Some("accepted".into())
        );
        let big = json!({"state":{"reported":{"blob":"x".repeat(MAX_STATE_BYTES)}}});
        assert_eq!(code(&answers(&mut s, "$aws/things/d1/shadow/update", big)).1, Some(413));
    }

    #[test]
    fn rejects_with_400_what_aws_refuses_and_leaves_the_shadow_as_it_was() {
        // GIVEN a shadow at version 1
        let mut s = Shadows::default();
        let update = "$aws/things/d1/shadow/update";
        answers(&mut s, update, json!({"state":{"reported":{"x":1}}}));
        let refusals = [
            (
                json!({"state":{"reported":{"x":2},"delta":{"x":2}}}),
                "State contains an invalid node: 'delta'",
            ),
            (json!({"state":{"reportd":{"x":2}}}), "State contains an invalid node: 'reportd'"),
            (json!({"state":{"reported":{"x":2}},"version":"1"}), "Invalid version"),
            (json!({"state":{"reported":{"x":2}},"version":-1}), "Invalid version"),
            (json!({"state":{"reported":{"x":2}},"version":3.5}), "Invalid version"),
            (json!({"state":{"reported":{"x":2}},"clientToken":"t".repeat(65)}), "Invalid clientToken"),
            // 33 characters, 66 bytes: the limit is in bytes
            (json!({"state":{"reported":{"x":2}},"clientToken":"é".repeat(33)}), "Invalid clientToken"),
            (json!({"state":{"reported":{"x":2}},"clientToken":7}), "Invalid clientToken"),
            (json!({"state":{"reported":{"x":[1,null]}}}), "Invalid JSON: arrays can't contain null"),
            (json!({"state":{"desired":{"a":{"b":[[2,null]]}}}}), "Invalid JSON: arrays can't contain null"),
            (json!({"state":{"desired":{"a":[{"b":[null]}]}}}), "Invalid JSON: arrays can't contain null"),
        ];
        for (body, message) in refusals {
            // WHEN an update breaks one of AWS's rules
            let a = answers(&mut s, update, body.clone());
            // THEN it is rejected with 400 and AWS's message, and nothing else is published
            assert_eq!(a.len(), 1, "{body}");
            assert_eq!(a[0].0, "$aws/things/d1/shadow/update/rejected", "{body}");
            assert_eq!((&a[0].1["code"], &a[0].1["message"]), (&json!(400), &json!(message)), "{body}");
        }
        // AND a get or delete with an invalid token is rejected as well, the shadow kept
        let get = answers(&mut s, "$aws/things/d1/shadow/get", json!({"clientToken":"t".repeat(65)}));
        assert_eq!(
            (get[0].0.as_str(), &get[0].1["code"]),
            ("$aws/things/d1/shadow/get/rejected", &json!(400))
        );
        let del = answers(&mut s, "$aws/things/d1/shadow/delete", json!({"clientToken":["t"]}));
        assert_eq!(del[0].1["code"], 400);
        // AND the shadow is still at version 1; a 64-byte token and a `null` version are accepted
        let token = "t".repeat(64);
        let a = answers(
            &mut s,
            update,
            json!({"state":{"reported":{"x":[2]}},"clientToken":token,"version":null}),
        );
        assert_eq!(a[0].0, "$aws/things/d1/shadow/update/accepted");
        assert_eq!((a[0].1["version"].as_u64(), &a[0].1["clientToken"]), (Some(2), &json!(token)));
    }

    #[test]
    fn a_deleted_shadow_answers_404_and_continues_its_versions_when_recreated() {
        let mut s = Shadows::default();
        answers(&mut s, "$aws/things/d1/shadow/name/cfg/update", json!({"state":{"reported":{"x":1}}}));
        answers(&mut s, "$aws/things/d1/shadow/name/cfg/update", json!({"state":{"reported":{"x":2}}}));
        let d = answers(&mut s, "$aws/things/d1/shadow/name/cfg/delete", json!({}));
        assert_eq!(
            (d[0].0.as_str(), d[0].1["version"].as_u64()),
            ("$aws/things/d1/shadow/name/cfg/delete/accepted", Some(2))
        );
        assert_eq!(answers(&mut s, "$aws/things/d1/shadow/name/cfg/get", json!({}))[0].1["code"], 404);
        let a =
            answers(&mut s, "$aws/things/d1/shadow/name/cfg/update", json!({"state":{"reported":{"x":3}}}));
        assert_eq!(a[0].1["version"], 3);
    }

    fn answers_at(s: &mut Shadows, topic: &str, body: Value, now_s: i64) -> Vec<(String, Value)> {
        s.handle(&req(topic), body.to_string().as_bytes(), now_s)
            .into_iter()
            .map(|(t, b)| (t, serde_json::from_slice(&b).expect("JSON")))
            .collect()
    }

    #[test]
    fn a_shadow_deleted_more_than_48_hours_ago_starts_again_at_version_1() {
        // GIVEN a shadow at version 2, deleted at t = 100 s
        let mut s = Shadows::default();
        let update = "$aws/things/d1/shadow/update";
        answers_at(&mut s, update, json!({"state":{"reported":{"x":1}}}), 0);
        answers_at(&mut s, update, json!({"state":{"reported":{"x":2}}}), 0);
        answers_at(&mut s, "$aws/things/d1/shadow/delete", json!({}), 100);
        // WHEN it is created again just before and just after 48 hours
        let mut early = Shadows::restore(s.take_changes());
        let mut late = Shadows::restore(Vec::new());
        late.deleted = early.deleted.clone();
        let kept = DELETED_VERSION_KEPT_S;
        let a = answers_at(&mut early, update, json!({"state":{"reported":{"x":3}}}), 100 + kept - 1);
        let b = answers_at(&mut late, update, json!({"state":{"reported":{"x":3}}}), 100 + kept);
        // THEN the first continues at 3, the second starts at 1
        assert_eq!((a[0].1["version"].as_u64(), b[0].1["version"].as_u64()), (Some(3), Some(1)));
    }

    #[test]
    fn restored_shadows_answer_as_before_and_number_changes_after_the_stored_ones() {
        // GIVEN two shadows changed three times, and one deleted
        let mut s = Shadows::default();
        answers(
            &mut s,
            "$aws/things/d1/shadow/update",
            json!({"state":{"desired":{"mode":"eco"},"reported":{"mode":"on"}}}),
        );
        answers(&mut s, "$aws/things/d2/shadow/name/cfg/update", json!({"state":{"reported":{"x":1}}}));
        answers(&mut s, "$aws/things/d2/shadow/name/cfg/delete", json!({}));
        let rows = s.take_changes();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        // WHEN the service starts again from those rows (last row per shadow, as the table keeps them)
        let mut restored = Shadows::restore(vec![rows[0].clone(), rows[2].clone()]);
        // THEN a get answers the same document, delta included
        let g = answers(&mut restored, "$aws/things/d1/shadow/get", json!({}));
        assert_eq!(g[0].1["state"]["delta"], json!({"mode":"eco"}));
        assert_eq!(
            (g[0].1["version"].as_u64(), &g[0].1["metadata"]["desired"]["mode"]["timestamp"]),
            (Some(1), &json!(100))
        );
        // AND the deleted shadow is still gone, continues its numbering, and changes count on from 3
        assert_eq!(answers(&mut restored, "$aws/things/d2/shadow/name/cfg/get", json!({}))[0].1["code"], 404);
        let a = answers(
            &mut restored,
            "$aws/things/d2/shadow/name/cfg/update",
            json!({"state":{"reported":{"x":2}}}),
        );
        assert_eq!(a[0].1["version"], 2);
        assert_eq!(restored.take_changes().iter().map(|r| r.seq).collect::<Vec<_>>(), [4]);
    }
}
