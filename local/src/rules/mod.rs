//! The rules engine: every publish the broker admits is evaluated against every topic rule of
//! the template ([`sql`] is the SQL subset), and each rule's output goes to its actions: a
//! local queue (SQS action) or a direct function invocation (Lambda action).

pub mod sql;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

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

/// What one rule makes of one publish: the action payload, or `None` when the rule does not
/// select it.
pub fn evaluate(
    rule: &Rule,
    topic: &str,
    payload: &[u8],
    json: Option<&Value>,
    client_id: Option<&str>,
    now_ms: i64,
) -> Option<String> {
    match json {
        Some(v) => {
            let m = sql::Message { topic, payload: v, client_id, now_ms };
            rule.statement.apply(&m).map(|out| Value::Object(out).to_string())
        }
        // IoT Core evaluates SQL on JSON payloads; a non-JSON payload reaches `SELECT *`
        // actions unchanged, so the function sees (and quarantines) the original bytes.
        None if rule.statement.filter.is_none() && sql::topic_matches(&rule.statement.from, topic) => {
            Some(String::from_utf8_lossy(payload).into_owned())
        }
        None => None,
    }
}

pub struct Engine {
    pub rules: Vec<Rule>,
    pub queues: HashMap<String, QueueSender>,
    pub functions: Arc<Functions>,
    pub stats: Arc<Stats>,
}

impl Engine {
    /// Evaluate every rule on one publish and hand the outputs to their actions.
    pub async fn route(&self, inbound: &Inbound) {
        let now = time::now_ms();
        let json: Option<Value> = serde_json::from_slice(&inbound.payload).ok();
        let mut routed = false;
        for rule in &self.rules {
            let Some(body) = evaluate(
                rule,
                &inbound.topic,
                &inbound.payload,
                json.as_ref(),
                inbound.client_id.as_deref(),
                now,
            ) else {
                continue;
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
