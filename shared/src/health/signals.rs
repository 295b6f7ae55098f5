//! What each function counts for fleet health as it works: the deltas ingest, presence and
//! commands add to the health counters ([`super::tally`]), from what they already read and
//! write (no extra reads).

use super::presence::Presence;
use super::tally::{counter, latency_bucket, latency_counter, minute_of, Bucket, Cohort, HealthDelta};
use crate::model::{Device, DeviceState};

/// A device's newest state moved from `before` (its stored device, as ingest read it) to
/// `after` (just written): freshness, reboots, battery trend, in `after`'s arrival minute.
pub fn telemetry(delta: &mut HealthDelta, before: Option<&Device>, after: &DeviceState) {
    let prev = before.and_then(|d| d.state.as_ref());
    let was = prev.map(|p| Cohort::of(before, p.fw.as_deref()));
    let now = Cohort::of(before, after.fw.as_deref());
    delta.move_latest(prev.zip(was.as_ref()).map(|(p, c)| (p.last_rx_ms, c)), (after.last_rx_ms, &now));
    let Some(prev) = prev else { return };
    let minute = Bucket::Minute(minute_of(after.last_rx_ms));
    if after.boot > prev.boot {
        delta.add(minute, &now, counter::BOOTS, 1);
    }
    // Battery: the rate between two readings of one boot at least a minute apart.
    if let (Some(b0), Some(b1)) = (prev.battery_pct, after.battery_pct) {
        let hours = (after.last_ts_ms - prev.last_ts_ms) as f64 / 3_600_000.0;
        if after.boot == prev.boot && hours >= 1.0 / 60.0 {
            let milli_pct_per_hour = ((b0 - b1) / hours * 1000.0).round();
            if milli_pct_per_hour.is_finite() && milli_pct_per_hour.abs() < 1e12 {
                delta.add(minute, &now, counter::BATTERY_RATE, milli_pct_per_hour as i64);
                delta.add(minute, &now, counter::BATTERY_N, 1);
            }
        }
    }
}

/// Messages received (and of them quarantined) from a cohort at `now_ms`.
pub fn received(delta: &mut HealthDelta, now_ms: i64, cohort: &Cohort, messages: i64, quarantined: i64) {
    let minute = Bucket::Minute(minute_of(now_ms));
    delta.add(minute, cohort, counter::RECEIVED, messages);
    delta.add(minute, cohort, counter::QUARANTINED, quarantined);
}

/// A device's presence moved from `before` to `after` (whose `counted_in` is already set to
/// the cohort it is counted in while connected): the connected gauge, and the connects and
/// disconnects of the events seen at `now_ms`.
pub fn presence(delta: &mut HealthDelta, before: Option<&Presence>, after: &Presence) {
    let was = before.and_then(|p| p.counted_in.as_ref());
    let now = after.counted_in.as_ref();
    if was != now {
        if let Some(c) = was {
            delta.add(Bucket::Gauge, c, counter::CONNECTED, -1);
        }
        if let Some(c) = now {
            delta.add(Bucket::Gauge, c, counter::CONNECTED, 1);
        }
    }
}

/// Lifecycle events seen at `now_ms` from a cohort.
pub fn lifecycle(
    delta: &mut HealthDelta,
    now_ms: i64,
    cohort: &Cohort,
    connects: i64,
    disconnects: i64,
    duplicate_clientid: i64,
) {
    let minute = Bucket::Minute(minute_of(now_ms));
    delta.add(minute, cohort, counter::CONNECTS, connects);
    delta.add(minute, cohort, counter::DISCONNECTS, disconnects);
    delta.add(minute, cohort, counter::DUPLICATE_CLIENTID, duplicate_clientid);
}

/// A command acknowledged `latency_ms` after it was issued.
pub fn command_acked(delta: &mut HealthDelta, now_ms: i64, cohort: &Cohort, latency_ms: i64) {
    delta.add(Bucket::Minute(minute_of(now_ms)), cohort, &latency_counter(latency_bucket(latency_ms)), 1);
}

/// A command sent / expired without an answer.
pub fn command(delta: &mut HealthDelta, now_ms: i64, cohort: &Cohort, name: &str) {
    delta.add(Bucket::Minute(minute_of(now_ms)), cohort, name, 1);
}
