//! The two fuzz cases, shared by the libFuzzer targets (`fuzz_targets/`, feature `fuzzing`) and
//! by the corpus replay test that runs in CI.

use fleet_shared::ingest::envelope::{MAX_FW_LEN, MAX_METRICS, MAX_READINGS_PER_MESSAGE};
use fleet_shared::ingest::{decode, parse_event, plan, strict, IngestPolicy, OwnedInbound, Trigger};

const NOW_MS: i64 = 1_764_000_001_000;

/// The envelope decoder on any bytes: a reading that keeps the envelope's promises, or at
/// least one reason; never a panic, never an unbounded recursion.
pub fn decode_case(data: &[u8]) {
    match decode(data, &IngestPolicy::default(), NOW_MS) {
        Ok(readings) => {
            assert!(strict::check(data).is_ok(), "stored a payload the structural check refuses");
            assert!(!readings.is_empty() && readings.len() <= MAX_READINGS_PER_MESSAGE);
            for r in &readings {
                assert!(!r.metrics.is_empty() && r.metrics.len() <= MAX_METRICS);
                assert!(r.metrics.iter().all(|m| m.value.is_finite()));
                assert!(r.fw.as_deref().is_none_or(|fw| {
                    fw.len() <= MAX_FW_LEN && fleet_shared::model::validate_label("fw", fw).is_ok()
                }));
                assert!(r.uptime_s.is_none_or(|u| u <= i64::MAX as u64) && r.id.seq <= i64::MAX as u64);
            }
        }
        Err(rejection) => assert!(!rejection.problems.is_empty()),
    }
}

/// The Lambda entry point's event rule on any text, then batch planning: every message the
/// event yields ends in exactly one bucket (reading, in-batch duplicate, quarantined).
pub fn sqs_event_case(data: &[u8]) {
    // Lambda hands the function UTF-8 JSON text.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let messages = match parse_event(text, NOW_MS) {
        Trigger::Sqs(m) => m,
        Trigger::Direct(m) => vec![m],
    };
    let inbound: Vec<_> = messages.iter().map(OwnedInbound::borrow).collect();
    let p = plan(&inbound, &IngestPolicy::default(), NOW_MS);
    assert!(p.accounts_for(messages.len()), "a message in no bucket or in two");
    assert!(p.quarantined.iter().all(|q| !q.problems.is_empty()));
}
