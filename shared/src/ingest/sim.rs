//! Simulated devices: deterministic, realistic telemetry (as the IoT rule delivers it) for
//! benchmarks, cost reports, load tests and demos. A small xorshift generator keeps it
//! reproducible without a randomness dependency.

use serde_json::{json, Value};

use super::OwnedInbound;
use crate::model::{Device, DeviceRegistration, ThingName};

/// Deterministic pseudo-random numbers (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Thing name of simulated device `i`.
pub fn thing_name(i: usize) -> String {
    format!("sim-{i:05}")
}

/// What a device's sensors read: a noisy random walk around a per-device baseline.
#[derive(Debug, Clone, Copy)]
pub struct Sensors {
    pub temp_c: f64,
    pub hum_pct: f64,
    pub co2_ppm: f64,
}

impl Sensors {
    pub fn random(rng: &mut Rng) -> Self {
        Self {
            temp_c: 18.0 + rng.unit() * 8.0,
            hum_pct: 35.0 + rng.unit() * 20.0,
            co2_ppm: 420.0 + rng.unit() * 400.0,
        }
    }

    /// One step: drift plus noise, pulled back towards plausible ranges.
    pub fn step(&mut self, rng: &mut Rng) {
        let mut walk = |v: &mut f64, noise: f64, lo: f64, hi: f64| {
            *v += (rng.unit() - 0.5) * noise;
            *v = v.clamp(lo, hi);
        };
        walk(&mut self.temp_c, 0.3, -20.0, 60.0);
        walk(&mut self.hum_pct, 1.0, 5.0, 95.0);
        walk(&mut self.co2_ppm, 15.0, 380.0, 5000.0);
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// The firmware simulated device `device` runs: v1 devices (even) `1.4.2`, v2 devices `2.0.1`.
pub fn firmware(device: usize) -> &'static str {
    if device.is_multiple_of(2) {
        "1.4.2"
    } else {
        "2.0.1"
    }
}

/// What one simulated device publishes (no rule fields). Even devices speak envelope v1,
/// odd ones v2 (SenML).
pub fn device_payload(
    device: usize,
    boot: u32,
    seq: u64,
    ts_ms: i64,
    battery: f64,
    sensors: &Sensors,
) -> Value {
    let (temp, hum, co2) = (round1(sensors.temp_c), round1(sensors.hum_pct), sensors.co2_ppm.round());
    let bat = round1(battery);
    if device.is_multiple_of(2) {
        json!({"v":1,"seq":seq,"boot":boot,"ts":ts_ms,"fw":firmware(device),"m":{"temp_c":temp,"hum_pct":hum,"pressure_hpa":1013.2},
               "bat":bat,"up_s":seq * 10,"test":false})
    } else {
        json!({"v":2,"seq":seq,"boot":boot,"bt":ts_ms,"fw":firmware(device),
               "e":[{"n":"temp_c","v":temp,"u":"Cel"},{"n":"hum_pct","v":hum,"u":"%RH"},{"n":"co2_ppm","v":co2,"u":"ppm"}],
               "bat":bat,"up_s":seq * 10})
    }
}

/// What the telemetry rule adds to a payload: `thing`, `rx_ms`, `client_id`.
pub fn rule_output(mut payload: Value, thing: &str, rx_ms: i64) -> Vec<u8> {
    if let Value::Object(o) = &mut payload {
        o.insert("thing".into(), thing.into());
        o.insert("rx_ms".into(), rx_ms.into());
        o.insert("client_id".into(), thing.into());
    }
    serde_json::to_vec(&payload).expect("JSON values serialise")
}

/// The boot counter of [`message_body`]'s devices.
pub const BOOT: u32 = 3;

/// One simulated device's next message as the rule delivers it.
pub fn message_body(device: usize, seq: u64, rx_ms: i64, rng: &mut Rng) -> Vec<u8> {
    let ts = rx_ms - 50 - (rng.unit() * 200.0) as i64;
    let battery = 100.0 - (seq / 50 % 100) as f64;
    let sensors = Sensors::random(rng);
    rule_output(device_payload(device, BOOT, seq, ts, battery, &sensors), &thing_name(device), rx_ms)
}

/// Malformed payload kinds a misbehaving device sends.
const MALFORMED: [&str; 5] = [
    r#"{"v":1,"seq":1,"boot":1,"ts":17640"#,
    r#"{"v":1,"seq":1,"boot":1,"ts":1764000000000,"m":{"temp_c":NaN}}"#,
    r#"{"v":1,"boot":1,"ts":1764000000000,"m":{"temp_c":"warm"}}"#,
    r#"{"v":7,"seq":1,"boot":1,"ts":1764000000000,"m":{"temp_c":1}}"#,
    r#"{"v":2,"seq":1,"boot":1,"bt":1764000000000,"e":[{"n":"temp c","v":1}]}"#,
];

/// How often a simulated device misbehaves, per message.
#[derive(Debug, Clone, Copy)]
pub struct Quirks {
    pub reboot: f64,
    pub duplicate: f64,
    pub out_of_order: f64,
    pub malformed: f64,
}

impl Default for Quirks {
    fn default() -> Self {
        Self { reboot: 0.002, duplicate: 0.01, out_of_order: 0.01, malformed: 0.005 }
    }
}

/// A simulated device: boots, sequence numbers, battery drain, and the quirks of real ones
/// (reboots, redelivered duplicates, out-of-order delivery, malformed payloads).
#[derive(Debug, Clone)]
pub struct DeviceSim {
    pub index: usize,
    pub thing: String,
    boot: u32,
    seq: u64,
    battery: f64,
    sensors: Sensors,
    quirks: Quirks,
    rng: Rng,
    last: Option<Vec<u8>>,
    held: Option<Vec<u8>>,
    /// Samples per message: above 1, samples wait in `pending` and go out as one v2 pack.
    pack: usize,
    pending: Vec<(u64, i64, Sensors)>,
}

impl DeviceSim {
    pub fn new(index: usize, quirks: Quirks, seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let battery = 60.0 + rng.unit() * 40.0;
        let sensors = Sensors::random(&mut rng);
        Self {
            index,
            thing: thing_name(index),
            boot: 1,
            seq: 0,
            battery,
            sensors,
            quirks,
            rng,
            last: None,
            held: None,
            pack: 1,
            pending: Vec::new(),
        }
    }

    /// Publish every `samples` samples as one v2 pack (at most the decoder's 100 readings per
    /// message; 1 = one message per sample).
    pub fn packing(mut self, samples: usize) -> Self {
        self.pack = samples.clamp(1, super::envelope::MAX_READINGS_PER_MESSAGE);
        self
    }

    /// The payloads to publish at this tick, in order (usually one).
    pub fn tick(&mut self, now_ms: i64) -> Vec<Vec<u8>> {
        let q = self.quirks;
        if self.rng.unit() < q.malformed {
            let kind = (self.rng.next_u64() % MALFORMED.len() as u64) as usize;
            return vec![MALFORMED[kind].as_bytes().to_vec()];
        }
        if self.last.is_some() && self.rng.unit() < q.duplicate {
            return self.last.clone().into_iter().collect();
        }
        if self.rng.unit() < q.reboot {
            self.boot += 1;
            self.seq = 0;
            // Samples not yet sent are lost with the device's memory.
            self.pending.clear();
        }
        self.seq += 1;
        self.battery = (self.battery - 0.01).max(1.0);
        self.sensors.step(&mut self.rng);
        let payload = if self.pack > 1 {
            self.pending.push((self.seq, now_ms, self.sensors));
            if self.pending.len() < self.pack {
                return Vec::new();
            }
            pack_payload(self.boot, &std::mem::take(&mut self.pending), self.battery)
        } else {
            device_payload(self.index, self.boot, self.seq, now_ms, self.battery, &self.sensors)
        };
        let bytes = serde_json::to_vec(&payload).expect("JSON values serialise");
        self.last = Some(bytes.clone());
        if let Some(held) = self.held.take() {
            return vec![bytes, held];
        }
        if self.rng.unit() < q.out_of_order {
            self.held = Some(bytes);
            return Vec::new();
        }
        vec![bytes]
    }

    /// Reboot now (a command asked for it): a new boot, its sequence from the start, samples
    /// not yet sent lost.
    pub fn reboot(&mut self) {
        self.boot += 1;
        self.seq = 0;
        self.pending.clear();
    }

    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// A message held back for out-of-order delivery, if any (publish it before stopping).
    pub fn flush(&mut self) -> Option<Vec<u8>> {
        self.held.take()
    }
}

/// A batch of `messages` valid messages spread round-robin over `devices` devices.
pub fn fleet_batch(devices: usize, messages: usize, rx_ms: i64, seed: u64) -> Vec<OwnedInbound> {
    fleet_batch_from(devices, messages, 1, rx_ms, seed)
}

/// Like [`fleet_batch`], each device's messages numbered from `first_seq` (for a sequence of
/// batches that are not redeliveries of each other).
pub fn fleet_batch_from(
    devices: usize,
    messages: usize,
    first_seq: u64,
    rx_ms: i64,
    seed: u64,
) -> Vec<OwnedInbound> {
    round_robin(devices, messages, rx_ms, seed, "msg", |device, nth, rx, rng| {
        message_body(device, nth + first_seq, rx, rng)
    })
}

/// `messages` messages round-robin over `devices`, arriving 1 ms apart from `rx_ms`; `body`
/// makes the `nth` (from 0) message of a device.
fn round_robin(
    devices: usize,
    messages: usize,
    rx_ms: i64,
    seed: u64,
    id: &str,
    mut body: impl FnMut(usize, u64, i64, &mut Rng) -> Vec<u8>,
) -> Vec<OwnedInbound> {
    let mut rng = Rng::new(seed);
    (0..messages)
        .map(|n| {
            let rx = rx_ms + n as i64;
            let payload = body(n % devices, (n / devices) as u64, rx, &mut rng);
            OwnedInbound::new(format!("{id}-{n:08}"), rx + 20, payload)
        })
        .collect()
}

/// One v2 pack of `samples` (seq, device time, sensors) taken since boot `boot`: base time and
/// seq are the first sample's, each record carries its time offset `t`; the decoder gives the
/// readings `seq`, `seq + 1`, ... in time order.
pub fn pack_payload(boot: u32, samples: &[(u64, i64, Sensors)], battery: f64) -> Value {
    let (seq, bt) = samples.first().map_or((1, 0), |&(seq, ts, _)| (seq, ts));
    let mut e = Vec::with_capacity(samples.len() * 3);
    for (_, ts, s) in samples {
        let t = ts - bt;
        e.push(json!({"n":"temp_c","v":round1(s.temp_c),"t":t}));
        e.push(json!({"n":"hum_pct","v":round1(s.hum_pct),"t":t}));
        e.push(json!({"n":"co2_ppm","v":s.co2_ppm.round(),"t":t}));
    }
    json!({"v":2,"seq":seq,"boot":boot,"bt":bt,"fw":"2.0.1","e":e,"bat":round1(battery),"up_s":seq * 10})
}

/// `readings` readings of `device` as one v2 pack (records at `t` = 0, 1000, 2000, ... ms after
/// `bt`), as the rule delivers it. The pack's `seq` is its first reading's; the readings take
/// `seq`, `seq + 1`, ...
pub fn pack_body(device: usize, seq: u64, readings: usize, rx_ms: i64, rng: &mut Rng) -> Vec<u8> {
    let bt = rx_ms - 50 - 1_000 * readings as i64;
    let samples: Vec<_> =
        (0..readings).map(|i| (seq + i as u64, bt + 1_000 * i as i64, Sensors::random(rng))).collect();
    rule_output(pack_payload(3, &samples, 90.0), &thing_name(device), rx_ms)
}

/// A batch of `messages` v2 packs of `readings` readings each, round-robin over `devices`.
pub fn pack_batch(
    devices: usize,
    messages: usize,
    readings: usize,
    rx_ms: i64,
    seed: u64,
) -> Vec<OwnedInbound> {
    round_robin(devices, messages, rx_ms, seed, "pack", |device, nth, rx, rng| {
        pack_body(device, nth * readings as u64 + 1, readings, rx, rng)
    })
}

/// `devices` simulated devices as an operator registers them (class `env-sensor`).
pub fn registrations(devices: usize) -> Vec<(ThingName, DeviceRegistration)> {
    (0..devices)
        .map(|i| {
            let thing = ThingName::parse(&thing_name(i)).expect("simulated names are valid");
            let registration = DeviceRegistration {
                class: "env-sensor".into(),
                region: "eu-west".into(),
                fw: "1.4.0".into(),
                // A minute apart, as a fleet is registered over time: each device's records
                // carry their own version (the registration time).
                registered_at_ms: 1_700_000_000_000 + i as i64 * 60_000,
            };
            (thing, registration)
        })
        .collect()
}

/// The ingest pipeline in memory, as the ingest bench times it: plan (decode, validate,
/// upcast, dedupe), enrich from `devices`, encode each Timestream record and archive line.
/// Returns how many readings it planned. The reference the handler's CPU is compared with.
#[cfg(feature = "aws")]
pub fn in_memory_pipeline(
    batch: &[OwnedInbound],
    devices: &std::collections::HashMap<ThingName, Device>,
    policy: &super::IngestPolicy,
    now_ms: i64,
) -> usize {
    use std::hint::black_box;
    let inbound: Vec<_> = batch.iter().map(OwnedInbound::borrow).collect();
    let p = super::plan(black_box(&inbound), policy, now_ms);
    for (r, &origin) in p.readings.iter().zip(&p.origin) {
        let stored = super::service::enrich(r, devices.get(&r.id.thing));
        black_box(crate::adapters::aws::timestream::record_for(&stored));
        black_box(super::archive::one_line(inbound[origin].body));
    }
    p.readings.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{plan, IngestPolicy};

    #[test]
    fn a_quirky_device_sends_each_kind_of_trouble_and_nothing_else() {
        let quirks = Quirks { reboot: 0.05, duplicate: 0.05, out_of_order: 0.05, malformed: 0.05 };
        let mut d = DeviceSim::new(1, quirks, 9);
        let mut sent: Vec<Vec<u8>> = (0..2_000).flat_map(|i| d.tick(1_764_000_000_000 + i)).collect();
        sent.extend(d.flush());
        let bodies: Vec<Vec<u8>> = sent
            .iter()
            .map(|p| {
                let v: Value = serde_json::from_slice(p).unwrap_or(Value::Null);
                rule_output(v, &d.thing, 1_764_000_010_000)
            })
            .collect();
        let inbound: Vec<OwnedInbound> =
            bodies.iter().enumerate().map(|(i, b)| OwnedInbound::new(i.to_string(), 0, b.clone())).collect();
        let borrowed: Vec<_> = inbound.iter().map(OwnedInbound::borrow).collect();
        let p = plan(&borrowed, &IngestPolicy::default(), 1_764_000_010_000);
        assert!(!p.quarantined.is_empty() && !p.duplicates.is_empty());
        assert_eq!(p.readings.len() + p.duplicates.len() + p.quarantined.len(), sent.len());
        assert!(p.readings.iter().any(|r| r.id.boot > 1), "reboots");
        let seqs: Vec<(u32, u64)> = p.readings.iter().map(|r| (r.id.boot, r.id.seq)).collect();
        assert!(seqs.windows(2).any(|w| w[1] < w[0]), "out of order");
    }

    #[test]
    fn simulated_batches_are_valid_distinct_and_reproducible() {
        let a = fleet_batch(10, 100, 1_764_000_000_000, 7);
        assert_eq!(a, fleet_batch(10, 100, 1_764_000_000_000, 7));
        let inbound: Vec<_> = a.iter().map(OwnedInbound::borrow).collect();
        let p = plan(&inbound, &IngestPolicy::default(), 1_764_000_001_000);
        assert!(p.quarantined.is_empty(), "{:?}", p.quarantined);
        assert_eq!((p.readings.len(), p.duplicates.len()), (100, 0));
        assert_eq!(p.readings.iter().filter(|r| r.schema_version == 2).count(), 50);
    }

    #[test]
    fn a_packing_device_sends_one_pack_per_n_samples_each_reading_with_its_own_seq() {
        let quiet = Quirks { reboot: 0.0, duplicate: 0.0, out_of_order: 0.0, malformed: 0.0 };
        let mut d = DeviceSim::new(2, quiet, 3).packing(5);
        let sent: Vec<Vec<u8>> = (0..12).flat_map(|i| d.tick(1_764_000_000_000 + i * 1_000)).collect();
        assert_eq!(sent.len(), 2, "12 samples are two packs of 5, two samples still waiting");
        let bodies: Vec<OwnedInbound> = sent
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let v: Value = serde_json::from_slice(p).expect("JSON");
                OwnedInbound::new(i.to_string(), 0, rule_output(v, &d.thing, 1_764_000_020_000))
            })
            .collect();
        let borrowed: Vec<_> = bodies.iter().map(OwnedInbound::borrow).collect();
        let p = plan(&borrowed, &IngestPolicy::default(), 1_764_000_020_000);
        assert!(p.quarantined.is_empty(), "{:?}", p.quarantined);
        let seqs: Vec<u64> = p.readings.iter().map(|r| r.id.seq).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<u64>>());
        let times: Vec<i64> = p.readings.iter().map(|r| r.time_ms - 1_764_000_000_000).collect();
        assert_eq!(times, (0..10).map(|i| i * 1_000).collect::<Vec<i64>>());
    }
}
