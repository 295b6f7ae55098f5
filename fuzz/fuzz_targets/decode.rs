//! The envelope decoder on any bytes: a reading that keeps the envelope's promises, or at
//! least one reason; never a panic, never an unbounded recursion.
#![no_main]

use fleet_shared::ingest::envelope::{MAX_FW_LEN, MAX_METRICS};
use fleet_shared::ingest::{decode, strict, IngestPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = 1_764_000_001_000;
    match decode(data, &IngestPolicy::default(), now) {
        Ok(r) => {
            // What is stored is what the rules promise.
            assert!(strict::check(data).is_ok());
            assert!(!r.metrics.is_empty() && r.metrics.len() <= MAX_METRICS);
            assert!(r.metrics.iter().all(|m| m.value.is_finite()));
            assert!(r.fw.as_deref().is_none_or(|fw| fw.len() <= MAX_FW_LEN && fleet_shared::model::validate_label("fw", fw).is_ok()));
            assert!(r.uptime_s.is_none_or(|u| u <= i64::MAX as u64) && r.id.seq <= i64::MAX as u64);
        }
        Err(rejection) => assert!(!rejection.problems.is_empty()),
    }
});
