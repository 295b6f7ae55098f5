//! A function's `Schedule` event: a timer that invokes it with the event EventBridge sends (the
//! schedule's `Input` when it has one, as AWS sends it, else the scheduled event).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use fleet_shared::time;
use serde_json::json;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::functions::Functions;
use crate::stats::Stats;
use crate::template::Schedule;

/// EventBridge's scheduled event, as a scheduled function receives it.
pub fn scheduled_event(rule: &str, now_ms: i64) -> serde_json::Value {
    json!({
        "version": "0",
        "id": format!("local-{now_ms:x}"),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": time::rfc3339_ms(now_ms),
        "region": "local",
        "resources": [format!("arn:aws:events:local:000000000000:rule/{rule}")],
        "detail": {}
    })
}

/// Invoke `schedule.function` every `schedule.every`, the first time one period after start.
pub fn spawn(schedule: Schedule, functions: Arc<Functions>, stats: Arc<Stats>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + schedule.every, schedule.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let event =
                schedule.input.clone().unwrap_or_else(|| scheduled_event(&schedule.function, time::now_ms()));
            if let Err(e) = functions.invoke(&schedule.function, &event).await {
                warn!(function = schedule.function, error = %e, "scheduled invocation failed");
                stats.dead_lettered.fetch_add(1, Relaxed);
            }
        }
    })
}
