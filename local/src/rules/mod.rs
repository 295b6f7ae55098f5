//! The rules engine: every publish the broker admits is evaluated against every topic rule of
//! the template ([`sql`] is the SQL subset), and each rule's output goes to its actions: a
//! local queue (SQS action) or a direct function invocation (Lambda action).

pub mod sql;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::ingest::archive::content_id;
use fleet_shared::ingest::{strict, Problem, QuarantineLine, Reason};
use fleet_shared::ports::Quarantine;
use fleet_shared::time;
use serde_json::value::RawValue;
use serde_json::Value;
use tracing::warn;

use crate::broker::Inbound;
use crate::functions::Functions;
use crate::queue::QueueSender;
use crate::stats::Stats;
use crate::template::{Rule, Target};

/// Lambda retries a failed asynchronous invocation twice.
const DIRECT_ATTEMPTS: u32 = 3;

/// What one rule makes of one publish it selects.
#[derive(Debug, Clone, PartialEq)]
pub enum Forward {
    /// The action payload.
    Body(String),
    /// A payload no action can carry: not UTF-8, so neither an SQS message body nor a Lambda
    /// event. IoT Core hands such a message to the rule's error action (base64-encoded).
    Undeliverable,
}

/// What one rule makes of one publish, or `None` when the rule does not select it. `json` is
/// the payload as JSON when it is JSON the ingest decoder would read the same way
/// ([`strict::check`]: UTF-8, unique keys, bounded nesting).
pub fn evaluate(
    rule: &Rule,
    topic: &str,
    payload: &[u8],
    json: Option<&Value>,
    client_id: Option<&str>,
    now_ms: i64,
) -> Option<Forward> {
    match json {
        Some(v) => {
            let m = sql::Message { topic, payload: v, client_id, now_ms };
            rule.statement.apply(&m).map(|out| Forward::Body(Value::Object(out).to_string()))
        }
        // IoT Core evaluates SQL on JSON payloads; any other payload reaches `SELECT *` actions
        // unchanged, so the function sees and quarantines the original bytes.
        None if rule.statement.filter.is_none() && sql::topic_matches(&rule.statement.from, topic) => {
            let Ok(text) = std::str::from_utf8(payload) else { return Some(Forward::Undeliverable) };
            Some(Forward::Body(match ambiguous_object(text) {
                // A JSON object the decoder would refuse (a repeated key, too deep): the
                // device's text as it is, so the function sees exactly what was sent, with the
                // fields the rule adds (those that do not read the payload) after it.
                Some(inner) => {
                    let added = Value::Object(added_fields(rule, topic, client_id, now_ms)).to_string();
                    let added = &added[1..added.len() - 1];
                    match (inner.trim().is_empty(), added.is_empty()) {
                        (_, true) => text.to_owned(),
                        (true, false) => format!("{{{added}}}"),
                        (false, false) => format!("{{{inner},{added}}}"),
                    }
                }
                None => text.to_owned(),
            }))
        }
        None => None,
    }
}

/// IoT Core's reserved prefix for Basic Ingest: publishing to `$aws/rules/<rule>/<topic>`
/// hands the message to that rule directly (no subscriber sees it, and it is not billed as
/// messaging); the rule's SQL sees `<topic>`.
pub const BASIC_INGEST_PREFIX: &str = "$aws/rules/";

/// `(rule name, topic the rule sees)` of a Basic Ingest topic.
pub fn basic_ingest(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(BASIC_INGEST_PREFIX)?;
    let (rule, topic) = rest.split_once('/')?;
    (!rule.is_empty() && !topic.is_empty()).then_some((rule, topic))
}

/// The fields a rule adds that do not read the payload (`topic(3) AS thing`, `timestamp()`,
/// `clientid()`, ...): its SQL applied to an empty object.
fn added_fields(
    rule: &Rule,
    topic: &str,
    client_id: Option<&str>,
    now_ms: i64,
) -> serde_json::Map<String, Value> {
    let empty = Value::Object(serde_json::Map::new());
    rule.statement.apply(&sql::Message { topic, payload: &empty, client_id, now_ms }).unwrap_or_default()
}

/// The inside of a payload that is one syntactically valid JSON object (repeated keys and any
/// depth allowed), without its outer braces.
fn ambiguous_object(text: &str) -> Option<&str> {
    let trimmed = text.trim();
    let inner = trimmed.strip_prefix('{')?.strip_suffix('}')?;
    serde_json::from_str::<serde::de::IgnoredAny>(trimmed).ok()?;
    Some(inner)
}

pub struct Engine {
    pub rules: Vec<Rule>,
    pub queues: HashMap<String, QueueSender>,
    pub functions: Arc<Functions>,
    pub stats: Arc<Stats>,
    /// The rules' error action. On IoT Core it receives what a rule could not deliver, with
    /// the payload base64-encoded; here that message is quarantined with its original bytes.
    pub errors: SqliteStore,
}

impl Engine {
    /// Evaluate every rule on one publish and hand the outputs to their actions.
    pub async fn route(&self, inbound: &Inbound) {
        let now = time::now_ms();
        let json: Option<Value> = match strict::check(&inbound.payload) {
            Ok(()) => serde_json::from_slice(&inbound.payload).ok(),
            Err(_) => None,
        };
        let mut routed = false;
        // Basic Ingest: `$aws/rules/<rule>/<topic>` goes to that rule alone, which sees `<topic>`.
        let (topic, only) = match basic_ingest(&inbound.topic) {
            Some((rule, topic)) => (topic, Some(rule)),
            None => (&*inbound.topic, None),
        };
        for rule in &self.rules {
            if only.is_some_and(|name| name != rule.deployed_name) {
                continue;
            }
            let forward =
                evaluate(rule, topic, &inbound.payload, json.as_ref(), inbound.client_id.as_deref(), now);
            let body = match forward {
                None => continue,
                Some(Forward::Body(body)) => body,
                Some(Forward::Undeliverable) => {
                    routed = true;
                    self.error_action(rule, inbound, topic, now).await;
                    continue;
                }
            };
            routed = true;
            for target in &rule.targets {
                match target {
                    Target::Queue { queue, .. } => match self.queues.get(queue) {
                        Some(q) => q.send(body.clone(), now),
                        None => warn!(queue, rule = rule.name, "no local queue"),
                    },
                    Target::Function { function } => self.invoke_direct(&rule.name, function, &body).await,
                }
            }
        }
        let counter = if routed { &self.stats.routed } else { &self.stats.unrouted };
        counter.fetch_add(1, Relaxed);
    }

    /// A publish the rule cannot deliver: quarantined with its original bytes (base64), the
    /// topic, and the thing the rule's SQL names for that topic.
    async fn error_action(&self, rule: &Rule, inbound: &Inbound, topic: &str, now: i64) {
        let n = self.stats.rule_errors.fetch_add(1, Relaxed);
        let added = added_fields(rule, topic, inbound.client_id.as_deref(), now);
        let thing = added.get("thing").and_then(Value::as_str).map(str::to_owned);
        let problem = Problem::new(
            Reason::InvalidUtf8,
            None,
            format!(
                "rule {}: the payload is not UTF-8, so no action can carry it (IoT Core sends it to the rule's error action)",
                rule.name
            ),
        );
        // One row per publish: two devices sending the same bytes, or one sending them twice,
        // are two rule errors (the error action receives each).
        let mut key =
            format!("{}\0{}\0{now}\0{n}\0", inbound.topic, inbound.client_id.as_deref().unwrap_or(""))
                .into_bytes();
        key.extend_from_slice(&inbound.payload);
        let id = format!("rule-error-{}", content_id(&key));
        let line = QuarantineLine::new(&id, now, thing, vec![problem], &inbound.payload)
            .with_topic(Some(inbound.topic.to_string()));
        if let Err(e) = self.errors.put_quarantined(&[line], now).await {
            warn!(rule = rule.name, error = %e, "rule error not recorded");
        }
    }

    /// A Lambda action: an asynchronous invocation, retried as Lambda retries one.
    async fn invoke_direct(&self, rule: &str, function: &str, body: &str) {
        let Ok(event) = RawValue::from_string(body.to_owned()) else {
            warn!(rule, function, "a Lambda action needs a JSON payload; this one is not JSON: dropped");
            self.stats.dead_lettered.fetch_add(1, Relaxed);
            return;
        };
        for attempt in 1..=DIRECT_ATTEMPTS {
            match self.functions.invoke_raw(function, event.clone()).await {
                Ok(_) => return,
                Err(e) => {
                    warn!(attempt, function, error = %e, "direct invocation failed");
                    if attempt < DIRECT_ATTEMPTS {
                        self.stats.retried.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        self.stats.dead_lettered.fetch_add(1, Relaxed);
    }
}
