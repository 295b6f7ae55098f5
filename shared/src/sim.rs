//! Simulated devices: deterministic, realistic telemetry (as the IoT rule delivers it) for
//! benchmarks, cost reports, load tests and demos. A small xorshift generator keeps it
//! reproducible without a randomness dependency.

use serde_json::json;

use crate::ingest::OwnedInbound;

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

/// One simulated device's next message body (rule output: payload + thing, rx_ms, client_id).
/// Even devices speak envelope v1, odd ones v2 (SenML).
pub fn message_body(device: usize, seq: u64, rx_ms: i64, rng: &mut Rng) -> Vec<u8> {
    let thing = thing_name(device);
    let ts = rx_ms - 50 - (rng.unit() * 200.0) as i64;
    let temp = (200.0 + rng.unit() * 80.0).round() / 10.0;
    let hum = (350.0 + rng.unit() * 200.0).round() / 10.0;
    let bat = 100 - (seq / 50 % 100) as i64;
    let body = if device.is_multiple_of(2) {
        json!({"v":1,"seq":seq,"boot":3,"ts":ts,"fw":"1.4.2","m":{"temp_c":temp,"hum_pct":hum,"pressure_hpa":1013.2},
               "bat":bat,"up_s":seq * 10,"test":false,"thing":thing,"rx_ms":rx_ms,"client_id":thing})
    } else {
        json!({"v":2,"seq":seq,"boot":3,"bt":ts,"fw":"2.0.1",
               "e":[{"n":"temp_c","v":temp,"u":"Cel"},{"n":"hum_pct","v":hum,"u":"%RH"},{"n":"co2_ppm","v":600,"u":"ppm"}],
               "bat":bat,"up_s":seq * 10,"thing":thing,"rx_ms":rx_ms,"client_id":thing})
    };
    serde_json::to_vec(&body).expect("JSON values serialise")
}

/// A batch of `messages` valid messages spread round-robin over `devices` devices.
pub fn fleet_batch(devices: usize, messages: usize, rx_ms: i64, seed: u64) -> Vec<OwnedInbound> {
    let mut rng = Rng::new(seed);
    (0..messages)
        .map(|n| {
            let device = n % devices;
            let seq = (n / devices) as u64 + 1;
            let rx = rx_ms + n as i64;
            OwnedInbound {
                message_id: format!("msg-{n:08}"),
                received_ms: rx + 20,
                body: message_body(device, seq, rx, &mut rng),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{plan, IngestPolicy};

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
