//! Simulated devices: deterministic, realistic telemetry (as the IoT rule delivers it) for
//! benchmarks, cost reports, load tests and demos. A small xorshift generator keeps it
//! reproducible without a randomness dependency.

use serde_json::{json, Value};

use super::OwnedInbound;

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
        json!({"v":1,"seq":seq,"boot":boot,"ts":ts_ms,"fw":"1.4.2","m":{"temp_c":temp,"hum_pct":hum,"pressure_hpa":1013.2},
               "bat":bat,"up_s":seq * 10,"test":false})
    } else {
        json!({"v":2,"seq":seq,"boot":boot,"bt":ts_ms,"fw":"2.0.1",
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

/// One simulated device's next message as the rule delivers it.
pub fn message_body(device: usize, seq: u64, rx_ms: i64, rng: &mut Rng) -> Vec<u8> {
    let ts = rx_ms - 50 - (rng.unit() * 200.0) as i64;
    let battery = 100.0 - (seq / 50 % 100) as f64;
    let sensors = Sensors::random(rng);
    rule_output(device_payload(device, 3, seq, ts, battery, &sensors), &thing_name(device), rx_ms)
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
        }
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
        }
        self.seq += 1;
        self.battery = (self.battery - 0.01).max(1.0);
        self.sensors.step(&mut self.rng);
        let payload = device_payload(self.index, self.boot, self.seq, now_ms, self.battery, &self.sensors);
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

    /// A message held back for out-of-order delivery, if any (publish it before stopping).
    pub fn flush(&mut self) -> Option<Vec<u8>> {
        self.held.take()
    }
}

/// A batch of `messages` valid messages spread round-robin over `devices` devices.
pub fn fleet_batch(devices: usize, messages: usize, rx_ms: i64, seed: u64) -> Vec<OwnedInbound> {
    let mut rng = Rng::new(seed);
    (0..messages)
        .map(|n| {
            let device = n % devices;
            let seq = (n / devices) as u64 + 1;
            let rx = rx_ms + n as i64;
            OwnedInbound::new(format!("msg-{n:08}"), rx + 20, message_body(device, seq, rx, &mut rng))
        })
        .collect()
}

/// `readings` readings of `device` as one v2 pack (records at `t` = 0, 1000, 2000, ... ms after
/// `bt`), as the rule delivers it. The pack's `seq` is its first reading's; the readings take
/// `seq`, `seq + 1`, ...
pub fn pack_body(device: usize, seq: u64, readings: usize, rx_ms: i64, rng: &mut Rng) -> Vec<u8> {
    let bt = rx_ms - 50 - 1_000 * readings as i64;
    let mut e = Vec::with_capacity(readings * 3);
    for i in 0..readings {
        let s = Sensors::random(rng);
        let t = 1_000 * i as i64;
        e.push(json!({"n":"temp_c","v":round1(s.temp_c),"t":t}));
        e.push(json!({"n":"hum_pct","v":round1(s.hum_pct),"t":t}));
        e.push(json!({"n":"co2_ppm","v":s.co2_ppm.round(),"t":t}));
    }
    let payload = json!({"v":2,"seq":seq,"boot":3,"bt":bt,"fw":"2.0.1","e":e,"bat":90.0,"up_s":seq * 10});
    rule_output(payload, &thing_name(device), rx_ms)
}

/// A batch of `messages` v2 packs of `readings` readings each, round-robin over `devices`.
pub fn pack_batch(
    devices: usize,
    messages: usize,
    readings: usize,
    rx_ms: i64,
    seed: u64,
) -> Vec<OwnedInbound> {
    let mut rng = Rng::new(seed);
    (0..messages)
        .map(|n| {
            let device = n % devices;
            let seq = (n / devices * readings) as u64 + 1;
            let rx = rx_ms + n as i64;
            OwnedInbound::new(format!("pack-{n:08}"), rx + 20, pack_body(device, seq, readings, rx, &mut rng))
        })
        .collect()
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
}
