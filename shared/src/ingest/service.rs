//! The ingest use case: plan a batch, then enrich, archive, store and record device state
//! through the ports, and quarantine what cannot be stored. Every message ends in exactly one
//! bucket of [`BatchOutcome`]: accepted, duplicate, quarantined (with reason codes) or failed
//! (transient: retry). A store's refusal is typed: transient → failed, permanent →
//! `store_rejected`, conflict → `conflict`; one refused reading never takes its neighbours down.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tracing::{info_span, warn, Instrument};

use super::archive::{raw_object, rule_fields, QuarantineLine};
use super::batch::{plan, Inbound, Plan};
use super::envelope::{claimed_fw, IngestPolicy};
use super::reason::{Problem, Reason};
use crate::error::{ErrorKind, StoreError};
use crate::health::signals;
use crate::health::tally::{Cohort, HealthDelta};
use crate::model::{Device, DeviceState, MessageId, Reading, StoredReading, ThingName, UNREGISTERED_CLASS};
use crate::ports::{DeviceRegistry, Quarantine, RawArchive, TelemetrySink, WriteStatus};

/// The ports one ingest run uses.
pub struct IngestPorts<'a, R, S, A, Q> {
    pub registry: &'a R,
    pub sink: &'a S,
    pub archive: &'a A,
    pub quarantine: &'a Q,
}

// Only references: copyable whatever the ports are (a derive would demand `R: Copy`, ...).
impl<R, S, A, Q> Clone for IngestPorts<'_, R, S, A, Q> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R, S, A, Q> Copy for IngestPorts<'_, R, S, A, Q> {}

#[derive(Debug, Clone, PartialEq)]
pub struct QuarantinedMessage {
    pub message_id: String,
    pub thing: Option<String>,
    /// The firmware the payload says it runs, when it says so readably: the cohort fleet
    /// health counts the quarantine in (else the device's stored firmware, which only stored
    /// messages move: a firmware whose every message is refused would otherwise never be
    /// blamed for it).
    pub fw: Option<String>,
    pub problems: Vec<Problem>,
}

/// A message not stored because a downstream store failed transiently: retry it.
#[derive(Debug, Clone)]
pub struct FailedMessage {
    pub message_id: String,
    pub error: Arc<StoreError>,
}

/// What happened to each message of a batch.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    pub messages: usize,
    /// Messages newly stored (at least one of their readings): in the hot store, or
    /// archive-only when `late`.
    pub accepted: usize,
    /// Readings newly stored (a v2 pack message carries several).
    pub readings: usize,
    /// Repeats of a message already stored or already in this batch.
    pub duplicates: usize,
    /// Of `readings`: older than the hot store accepts, kept in the archive only.
    pub late: usize,
    /// Of `readings`: device clock ahead of arrival, stored at `rx_ms`.
    pub skew_corrected: usize,
    /// Of `readings`: from things the registry does not know (`class=unregistered`).
    pub unregistered: usize,
    /// Distinct unregistered things seen in this batch.
    pub unknown_devices: usize,
    /// Of `readings`: `"test": true` traffic.
    pub test: usize,
    pub quarantined: Vec<QuarantinedMessage>,
    /// Not stored because of a transient downstream failure: retry these.
    pub failed: Vec<FailedMessage>,
    /// What fleet health counts of this batch (messages settled and quarantined per cohort,
    /// devices' newest data, reboots, battery): the caller adds it to the health counters.
    pub health: HealthDelta,
}

impl BatchOutcome {
    /// Every message is in exactly one bucket.
    pub fn reconciles(&self) -> bool {
        self.accepted + self.duplicates + self.quarantined.len() + self.failed.len() == self.messages
    }
}

/// What happened to one message's readings.
#[derive(Default)]
struct MessageFate {
    /// At least one of its readings was newly stored.
    stored_new: bool,
    /// One of its readings failed transiently: retry the message.
    transient: Option<Arc<StoreError>>,
    /// Why a store refused its readings for good.
    refused: Vec<Problem>,
    thing: Option<String>,
    /// One of its readings (they share a thing).
    of: Option<usize>,
}

impl MessageFate {
    /// Message `m`'s fate in `fates` (by message index), started when it has none yet.
    fn at(fates: &mut [Option<MessageFate>], m: usize) -> &mut MessageFate {
        fates[m].get_or_insert_with(MessageFate::default)
    }
}

/// A message on its way to the quarantine.
struct ToQuarantine {
    index: usize,
    thing: Option<String>,
    problems: Vec<Problem>,
}

/// The quarantine reason for a store's refusal.
fn refusal_problem(e: &StoreError) -> Problem {
    let reason = if e.kind == ErrorKind::Conflict { Reason::Conflict } else { Reason::StoreRejected };
    Problem::new(reason, None, e.to_string())
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
    let mut out = BatchOutcome { messages: messages.len(), ..BatchOutcome::default() };
    let mut to_quarantine: Vec<ToQuarantine> = std::mem::take(&mut plan.quarantined)
        .into_iter()
        .map(|q| ToQuarantine { index: q.index, thing: q.thing, problems: q.problems })
        .collect();

    let mut readings = std::mem::take(&mut plan.readings);
    let mut devices: HashMap<ThingName, Device> = HashMap::new();
    let mut settled: Vec<&ThingName> = Vec::new();
    if !readings.is_empty() {
        let span = info_span!("store", readings = readings.len());
        let (fates, stored, known) =
            store(&ports, &mut readings, &plan, messages, policy, now_ms, &mut out.health)
                .instrument(span)
                .await;
        devices = known;
        let mut unknown: HashSet<&ThingName> = HashSet::new();
        // A message's fate is its readings' (a v2 pack carries several): retried if any failed
        // transiently, quarantined if any was refused for good, accepted if any was newly
        // stored, a duplicate when all were already there. (By message index.)
        let mut per_message: Vec<Option<MessageFate>> = Vec::new();
        per_message.resize_with(messages.len(), || None);
        let repeats = plan.repeats();
        for (r, fate) in fates.iter().enumerate() {
            let origin = plan.origin[r];
            let carriers = || std::iter::once(origin).chain(repeats[r].iter().copied());
            match fate {
                WriteStatus::Written | WriteStatus::TooLate => {
                    let reading = &readings[r];
                    out.readings += 1;
                    out.late += usize::from(matches!(fate, WriteStatus::TooLate));
                    out.skew_corrected += usize::from(reading.flags.skew_corrected);
                    out.test += usize::from(reading.test);
                    if stored.get(r).is_some_and(|s| !s.is_registered()) {
                        out.unregistered += 1;
                        unknown.insert(&reading.id.thing);
                    }
                    MessageFate::at(&mut per_message, origin).stored_new = true;
                    carriers().for_each(|m| MessageFate::at(&mut per_message, m).of = Some(r));
                }
                WriteStatus::Duplicate => carriers().for_each(|m| {
                    MessageFate::at(&mut per_message, m).of = Some(r);
                }),
                WriteStatus::Refused(e) if e.is_transient() => carriers().for_each(|m| {
                    MessageFate::at(&mut per_message, m).transient = Some(Arc::clone(e));
                }),
                WriteStatus::Refused(e) => carriers().for_each(|m| {
                    let f = MessageFate::at(&mut per_message, m);
                    f.thing = Some(readings[r].id.thing.as_str().to_owned());
                    let problem = refusal_problem(e);
                    if !f.refused.contains(&problem) {
                        f.refused.push(problem);
                    }
                }),
            }
        }
        for (index, f) in per_message.into_iter().enumerate().filter_map(|(i, f)| Some((i, f?))) {
            if let Some(error) = f.transient {
                out.failed.push(FailedMessage { message_id: messages[index].message_id.to_owned(), error });
            } else if !f.refused.is_empty() {
                to_quarantine.push(ToQuarantine { index, thing: f.thing, problems: f.refused });
            } else if f.stored_new {
                out.accepted += 1;
                settled.extend(f.of.map(|r| &readings[r].id.thing));
            } else {
                out.duplicates += 1;
                settled.extend(f.of.map(|r| &readings[r].id.thing));
            }
        }
        out.unknown_devices = unknown.len();
    }

    // Quarantine everything that will not be stored, in one put, with its original bytes.
    if !to_quarantine.is_empty() {
        to_quarantine.sort_by_key(|q| q.index);
        let lines: Vec<QuarantineLine> = to_quarantine
            .iter()
            .map(|q| {
                let m = &messages[q.index];
                // The thing and topic the rule added, when they can be read at all.
                let (thing, topic) = rule_fields(m.body);
                QuarantineLine::new(
                    m.message_id,
                    m.received_ms,
                    q.thing.clone().or(thing),
                    q.problems.clone(),
                    m.body,
                )
                .with_topic(topic)
            })
            .collect();
        let received_ms = messages.iter().map(|m| m.received_ms).min().unwrap_or(now_ms);
        match ports.quarantine.put_quarantined(&lines, received_ms).await {
            Ok(()) => out.quarantined.extend(to_quarantine.into_iter().zip(lines).map(|(q, l)| {
                let fw = l.body.as_deref().and_then(|b| claimed_fw(b.as_bytes()));
                QuarantinedMessage { message_id: l.message_id, thing: l.thing, fw, problems: q.problems }
            })),
            Err(e) => {
                warn!(error = %e, messages = lines.len(), "quarantine not written; those messages will be retried");
                let e = Arc::new(e);
                out.failed.extend(
                    lines
                        .into_iter()
                        .map(|l| FailedMessage { message_id: l.message_id, error: Arc::clone(&e) }),
                );
            }
        }
    }
    count_settled(ports.registry, &mut out, &settled, devices, now_ms).await;
    debug_assert!(out.reconciles(), "{out:?}");
    out
}

/// Count the batch's settled messages per cohort: `settled` are the things of the messages
/// stored or found duplicate, and the quarantined ones count as received and quarantined
/// (messages to retry count when they settle). Things only quarantined are looked up once
/// more; if that fails they count as unregistered.
async fn count_settled<R: DeviceRegistry>(
    registry: &R,
    out: &mut BatchOutcome,
    settled: &[&ThingName],
    mut devices: HashMap<ThingName, Device>,
    now_ms: i64,
) {
    let quarantined: Vec<(Option<ThingName>, Option<&str>)> = out
        .quarantined
        .iter()
        .map(|q| (q.thing.as_deref().and_then(|t| ThingName::parse(t).ok()), q.fw.as_deref()))
        .collect();
    let mut missing: Vec<ThingName> = quarantined
        .iter()
        .filter_map(|(t, _)| t.as_ref())
        .filter(|t| !devices.contains_key(*t))
        .cloned()
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        match registry.get_many(&missing).await {
            Ok(more) => devices.extend(more),
            Err(e) => {
                warn!(error = %e, "quarantined messages' devices not looked up; counted as unregistered")
            }
        }
    }
    // Counted per thing first (and the firmware a quarantined message claimed): a thing's
    // cohort is looked up once, not once per message. Values: (received, quarantined).
    type Who<'a> = (Option<&'a ThingName>, Option<&'a str>);
    let mut per_thing: HashMap<Who<'_>, (i64, i64)> = HashMap::new();
    for &thing in settled {
        per_thing.entry((Some(thing), None)).or_default().0 += 1;
    }
    for (thing, fw) in &quarantined {
        let c = per_thing.entry((thing.as_ref(), *fw)).or_default();
        c.0 += 1;
        c.1 += 1;
    }
    let mut counts: std::collections::BTreeMap<Cohort, (i64, i64)> = Default::default();
    for ((thing, fw), (rx, bad)) in per_thing {
        let c = counts.entry(Cohort::of(thing.and_then(|t| devices.get(t)), fw)).or_default();
        c.0 += rx;
        c.1 += bad;
    }
    for (c, (rx, bad)) in counts {
        signals::received(&mut out.health, now_ms, &c, rx, bad);
    }
}

/// Enrich, pin skew-corrected messages to their first arrival, archive, write the hot store
/// and record device state: one fate per reading, and the enriched readings (empty when
/// enrichment failed).
async fn store<R, S, A, Q>(
    ports: &IngestPorts<'_, R, S, A, Q>,
    readings: &mut [Reading],
    plan: &Plan,
    messages: &[Inbound<'_>],
    policy: &IngestPolicy,
    now_ms: i64,
    health: &mut HealthDelta,
) -> (Vec<WriteStatus>, Vec<StoredReading>, HashMap<ThingName, Device>)
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
{
    let n = readings.len();
    let all = |e: StoreError| {
        warn!(error = %e, readings = n, "batch not stored");
        vec![WriteStatus::Refused(Arc::new(e)); n]
    };

    // 1. Enrich from the registry (one batched lookup) and, at the same time, pin each
    // skew-corrected message to its first arrival (only when the batch has such messages).
    // 2. Meanwhile, the archive: it is the source of truth replays read, so nothing reaches the
    // hot store or the devices' state before it is written, and it needs nothing from the
    // registry. It holds every valid message that arrived, whatever the stores then make of it
    // (a lookup that fails, like a hot store that refuses, leaves the message archived and
    // retried or quarantined; objects are named by their content, so a redelivery writes the
    // same one again). Its failure fails the batch with its own kind: transient (S3 throttling)
    // is retried, permanent (access denied) quarantined. Filed under the batch's latest
    // arrival, so every message in it arrived no later than its partition's hour ends: a reader
    // of "since T" finds it at T's hour or later. The two requests wait together: one round
    // trip instead of two.
    let mut things: Vec<&ThingName> = readings.iter().map(|r| &r.id.thing).collect();
    things.sort_unstable();
    things.dedup();
    let things: Vec<ThingName> = things.into_iter().cloned().collect();
    let (pins, pin_of) = skew_pins(readings, &plan.origin);
    let pinning = async {
        if pins.is_empty() {
            Vec::new()
        } else {
            ports.registry.first_arrivals(&pins).await
        }
    };
    let archive = async {
        let received_ms = plan.origin.iter().map(|&i| messages[i].received_ms).max().unwrap_or(now_ms);
        match raw_object(plan.origin.iter().map(|&i| messages[i].body), received_ms) {
            Some(object) => ports.archive.put_raw(&object).await,
            None => Ok(()),
        }
    };
    let (devices, pinned, archived) = futures_util::join!(ports.registry.get_many(&things), pinning, archive);
    let devices = match devices {
        Ok(d) => d,
        Err(e) => {
            if let Err(a) = &archived {
                warn!(error = %a, "archive not written either");
            }
            return (all(e), Vec::new(), HashMap::new());
        }
    };
    let mut unpinned: HashMap<usize, Arc<StoreError>> = HashMap::new();
    let pinned: Vec<Result<i64, Arc<StoreError>>> = pinned.into_iter().map(|p| p.map_err(Arc::new)).collect();
    for (r, reading) in readings.iter_mut().enumerate() {
        match pin_of[r].map(|p| &pinned[p]) {
            Some(Ok(first_rx)) => {
                reading.time_ms = *first_rx;
                reading.flags.late = *first_rx < now_ms - policy.hot_window_ms;
            }
            Some(Err(e)) => {
                unpinned.insert(r, Arc::clone(e));
            }
            None => {}
        }
    }
    let readings = &*readings;
    let stored: Vec<StoredReading> = readings.iter().map(|r| enrich(r, devices.get(&r.id.thing))).collect();
    if let Err(e) = archived {
        return (all(e), stored, devices);
    }

    // 3. Hot store, for what is not too old for it (and not left unpinned).
    let mut fates: Vec<WriteStatus> = stored
        .iter()
        .enumerate()
        .map(|(i, s)| match unpinned.get(&i) {
            Some(e) => WriteStatus::Refused(Arc::clone(e)),
            None if s.reading.flags.late => WriteStatus::TooLate,
            None => WriteStatus::Written,
        })
        .collect();
    let hot: Vec<usize> = (0..stored.len()).filter(|&i| matches!(fates[i], WriteStatus::Written)).collect();
    if !hot.is_empty() {
        let statuses = if hot.len() == stored.len() {
            ports.sink.write(&stored).await
        } else {
            let subset: Vec<StoredReading> = hot.iter().map(|&i| stored[i].clone()).collect();
            ports.sink.write(&subset).await
        };
        if statuses.len() == hot.len() {
            for (&i, s) in hot.iter().zip(statuses) {
                fates[i] = s;
            }
        } else {
            let e = Arc::new(StoreError::transient(
                "telemetry sink",
                format!("{} statuses for {} readings", statuses.len(), hot.len()),
            ));
            for &i in &hot {
                fates[i] = WriteStatus::Refused(Arc::clone(&e));
            }
        }
    }

    // 4. Device state: one coalesced write per device, from its newest stored reading.
    let mut newest: HashMap<&ThingName, &Reading> = HashMap::new();
    for (r, f) in readings.iter().zip(&fates) {
        if f.is_stored() {
            let e = newest.entry(&r.id.thing).or_insert(r);
            if order_key(r) > order_key(e) {
                *e = r;
            }
        }
    }
    let states: Vec<(ThingName, DeviceState)> = newest
        .into_values()
        .map(|r| {
            let state = DeviceState {
                last_ts_ms: r.time_ms,
                last_rx_ms: r.rx_ms,
                boot: r.id.boot,
                seq: r.id.seq,
                battery_pct: r.battery_pct,
                fw: r.fw.clone(),
            };
            (r.id.thing.clone(), state)
        })
        .collect();
    let mut failed: Vec<ThingName> = Vec::new();
    for (thing, e) in ports.registry.record_states(&states).await {
        warn!(thing = %thing, error = %e, "device state not recorded");
        let e = Arc::new(e);
        for (r, f) in readings.iter().zip(fates.iter_mut()) {
            if r.id.thing == thing && f.is_stored() {
                *f = WriteStatus::Refused(Arc::clone(&e));
            }
        }
        failed.push(thing);
    }
    // Health: each recorded state that is newer than the one read moves its device's newest
    // data (an older one was not written: a newer state is stored).
    for (thing, state) in &states {
        let before = devices.get(thing);
        let newer = before.and_then(|d| d.state.as_ref()).is_none_or(|s| state.last_ts_ms > s.last_ts_ms);
        if newer && !failed.contains(thing) {
            signals::telemetry(health, before, state);
        }
    }
    (fates, stored, devices)
}

/// The messages to pin to their first arrival: for each message with skew-corrected readings,
/// the id of its first such reading and the message's arrival (its readings share both the
/// arrival and the pin); and for each reading, its message's pin.
fn skew_pins(readings: &[Reading], origin: &[usize]) -> (Vec<(MessageId, i64)>, Vec<Option<usize>>) {
    let mut pins = Vec::new();
    let mut of_message: HashMap<usize, usize> = HashMap::new();
    let pin_of = readings
        .iter()
        .zip(origin)
        .map(|(r, &message)| {
            r.flags.skew_corrected.then(|| {
                *of_message.entry(message).or_insert_with(|| {
                    pins.push((r.id.clone(), r.rx_ms));
                    pins.len() - 1
                })
            })
        })
        .collect();
    (pins, pin_of)
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
        enrichment_version: registration.map_or(1, |reg| reg.registered_at_ms.max(1)),
    }
}
