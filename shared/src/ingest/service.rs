//! The ingest use case: plan a batch, then quarantine, enrich, archive, store and record
//! device state through the ports. Every message ends in exactly one bucket of
//! [`BatchOutcome`]: accepted, duplicate, quarantined or failed (retryable).

use std::collections::{HashMap, HashSet};

use tracing::{info_span, warn, Instrument};

use super::archive::{raw_object, QuarantineLine};
use super::batch::{plan, Inbound};
use super::envelope::IngestPolicy;
use super::reason::Problem;
use crate::error::StoreError;
use crate::model::{Device, DeviceState, Reading, StoredReading, ThingName, UNREGISTERED_CLASS};
use crate::ports::{DeviceRegistry, Quarantine, RawArchive, TelemetrySink, WriteStatus};

/// The ports one ingest run uses.
pub struct IngestPorts<'a, R, S, A, Q> {
    pub registry: &'a R,
    pub sink: &'a S,
    pub archive: &'a A,
    pub quarantine: &'a Q,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuarantinedMessage {
    pub message_id: String,
    pub thing: Option<String>,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FailedMessage {
    pub message_id: String,
    pub error: String,
}

/// What happened to each message of a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    pub messages: usize,
    /// Newly stored: in the hot store, or archive-only when `late`.
    pub accepted: usize,
    /// Repeats of a message already stored or already in this batch.
    pub duplicates: usize,
    /// Of `accepted`: older than the hot store accepts, kept in the archive only.
    pub late: usize,
    /// Of `accepted`: device clock ahead of arrival, stored at `rx_ms`.
    pub skew_corrected: usize,
    /// Of `accepted`: from things the registry does not know (`class=unregistered`).
    pub unregistered: usize,
    /// Distinct unregistered things seen in this batch.
    pub unknown_devices: usize,
    /// Of `accepted`: `"test": true` traffic.
    pub test: usize,
    pub quarantined: Vec<QuarantinedMessage>,
    /// Not stored because of a downstream failure: retry these.
    pub failed: Vec<FailedMessage>,
}

impl BatchOutcome {
    /// Every message is in exactly one bucket.
    pub fn reconciles(&self) -> bool {
        self.accepted + self.duplicates + self.quarantined.len() + self.failed.len() == self.messages
    }
}

/// Per-reading fate while the batch is worked through.
#[derive(Debug, Clone)]
enum Fate {
    Pending,
    Stored(WriteStatus),
    Failed(String),
}

pub async fn ingest_batch<R, S, A, Q>(
    ports: IngestPorts<'_, R, S, A, Q>,
    policy: &IngestPolicy,
    now_ms: i64,
    messages: &[Inbound<'_>],
) -> BatchOutcome
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
{
    let mut plan = plan(messages, policy, now_ms);
    let received_ms = messages.iter().map(|m| m.received_ms).min().unwrap_or(now_ms);
    let mut out = BatchOutcome { messages: messages.len(), ..BatchOutcome::default() };

    // 1. Quarantine what cannot be stored, with its reasons and original bytes.
    if !plan.quarantined.is_empty() {
        let lines: Vec<QuarantineLine> = plan
            .quarantined
            .iter()
            .map(|q| {
                let m = &messages[q.index];
                QuarantineLine::new(m.message_id, m.received_ms, q.thing.clone(), q.problems.clone(), m.body)
            })
            .collect();
        let result = ports.quarantine.put_quarantined(&lines, received_ms).await;
        for (q, line) in plan.quarantined.iter().zip(lines) {
            match &result {
                Ok(()) => out.quarantined.push(QuarantinedMessage {
                    message_id: line.message_id,
                    thing: line.thing,
                    problems: q.problems.clone(),
                }),
                Err(e) => {
                    out.failed.push(FailedMessage { message_id: line.message_id, error: e.to_string() })
                }
            }
        }
    }

    let readings = std::mem::take(&mut plan.readings);
    let mut fate = vec![Fate::Pending; readings.len()];
    if !readings.is_empty() {
        let stored = store(&ports, &readings, &plan, messages, &mut fate, now_ms)
            .instrument(info_span!("store", readings = readings.len()))
            .await;
        let mut unknown: HashSet<&ThingName> = HashSet::new();
        for (r, f) in fate.iter().enumerate() {
            let carriers = plan.messages_of(r).count();
            match f {
                Fate::Stored(WriteStatus::Written | WriteStatus::TooLate) => {
                    let reading = &readings[r];
                    out.accepted += 1;
                    out.duplicates += carriers - 1;
                    out.late += usize::from(matches!(f, Fate::Stored(WriteStatus::TooLate)));
                    out.skew_corrected += usize::from(reading.flags.skew_corrected);
                    out.test += usize::from(reading.test);
                    if stored.get(r).is_some_and(|s| !s.is_registered()) {
                        out.unregistered += 1;
                        unknown.insert(&reading.id.thing);
                    }
                }
                Fate::Stored(WriteStatus::Duplicate) => out.duplicates += carriers,
                Fate::Stored(WriteStatus::Failed(e)) | Fate::Failed(e) => {
                    out.failed.extend(plan.messages_of(r).map(|i| FailedMessage {
                        message_id: messages[i].message_id.to_owned(),
                        error: e.clone(),
                    }))
                }
                Fate::Pending => unreachable!("store() settles every reading"),
            }
        }
        out.unknown_devices = unknown.len();
    }
    debug_assert!(out.reconciles(), "{out:?}");
    out
}

/// Enrich, archive, write the hot store and record device state; settles every `fate`.
/// Returns the enriched readings (empty when enrichment failed).
async fn store<R, S, A, Q>(
    ports: &IngestPorts<'_, R, S, A, Q>,
    readings: &[Reading],
    plan: &super::batch::Plan,
    messages: &[Inbound<'_>],
    fate: &mut [Fate],
    now_ms: i64,
) -> Vec<StoredReading>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
{
    let fail_all = |fate: &mut [Fate], e: &StoreError| {
        warn!(error = %e, readings = fate.len(), "batch not stored; will be retried");
        fate.fill(Fate::Failed(e.to_string()));
    };

    // 2. Enrich from the registry (one batched lookup).
    let mut things: Vec<ThingName> = readings.iter().map(|r| r.id.thing.clone()).collect();
    things.sort_unstable();
    things.dedup();
    let devices = match ports.registry.get_many(&things).await {
        Ok(d) => d,
        Err(e) => {
            fail_all(fate, &e);
            return Vec::new();
        }
    };
    let stored: Vec<StoredReading> = readings.iter().map(|r| enrich(r, devices.get(&r.id.thing))).collect();

    // 3. Archive first: it is the source of truth replays read.
    let received_ms = plan.origin.iter().map(|&i| messages[i].received_ms).min().unwrap_or(now_ms);
    if let Some(object) = raw_object(plan.origin.iter().map(|&i| messages[i].body), received_ms) {
        if let Err(e) = ports.archive.put_raw(&object).await {
            fail_all(fate, &e);
            return stored;
        }
    }

    // 4. Hot store, for what is not too old for it.
    let hot: Vec<usize> = (0..stored.len()).filter(|&i| !stored[i].reading.flags.late).collect();
    for (i, f) in fate.iter_mut().enumerate() {
        if stored[i].reading.flags.late {
            *f = Fate::Stored(WriteStatus::TooLate);
        }
    }
    if !hot.is_empty() {
        let result = if hot.len() == stored.len() {
            ports.sink.write(&stored).await
        } else {
            let subset: Vec<StoredReading> = hot.iter().map(|&i| stored[i].clone()).collect();
            ports.sink.write(&subset).await
        };
        match result {
            Ok(statuses) if statuses.len() == hot.len() => {
                for (&i, s) in hot.iter().zip(statuses) {
                    fate[i] = Fate::Stored(s);
                }
            }
            Ok(statuses) => {
                let e = format!("sink returned {} statuses for {} readings", statuses.len(), hot.len());
                for &i in &hot {
                    fate[i] = Fate::Failed(e.clone());
                }
            }
            Err(e) => {
                warn!(error = %e, readings = hot.len(), "hot store write failed; will be retried");
                for &i in &hot {
                    fate[i] = Fate::Failed(e.to_string());
                }
            }
        }
    }

    // 5. Device state: one coalesced write per device, from its newest stored reading.
    let mut newest: HashMap<&ThingName, &Reading> = HashMap::new();
    for (r, f) in readings.iter().zip(fate.iter()) {
        if matches!(f, Fate::Stored(WriteStatus::Written | WriteStatus::Duplicate | WriteStatus::TooLate)) {
            let e = newest.entry(&r.id.thing).or_insert(r);
            if order_key(r) > order_key(e) {
                *e = r;
            }
        }
    }
    let states: Vec<(ThingName, DeviceState)> = newest
        .into_values()
        .map(|r| {
            (
                r.id.thing.clone(),
                DeviceState {
                    last_ts_ms: r.time_ms,
                    last_rx_ms: r.rx_ms,
                    boot: r.id.boot,
                    seq: r.id.seq,
                    battery_pct: r.battery_pct,
                    fw: r.fw.clone(),
                },
            )
        })
        .collect();
    for (thing, e) in ports.registry.record_states(&states).await {
        warn!(thing = %thing, error = %e, "device state not recorded; its readings will be retried");
        for (r, f) in readings.iter().zip(fate.iter_mut()) {
            if r.id.thing == thing {
                *f = Fate::Failed(e.to_string());
            }
        }
    }
    stored
}

/// Newest first by stored time, then by boot and seq.
fn order_key(r: &Reading) -> (i64, u32, u64) {
    (r.time_ms, r.id.boot, r.id.seq)
}

/// A reading as stored: tagged with its device's class and region, or `unregistered`.
pub fn enrich(r: &Reading, device: Option<&Device>) -> StoredReading {
    let registration = device.and_then(|d| d.registration.as_ref());
    StoredReading {
        reading: r.clone(),
        class: registration.map_or_else(|| UNREGISTERED_CLASS.to_owned(), |reg| reg.class.clone()),
        region: registration.map(|reg| reg.region.clone()),
    }
}
