//! The Lambda entry point's event rule on any text, then batch planning: every message the
//! event yields ends in exactly one bucket (reading, in-batch duplicate, quarantined).
#![no_main]

use fleet_shared::ingest::{parse_event, plan, IngestPolicy, OwnedInbound, Trigger};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Lambda hands the function UTF-8 JSON text.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let now = 1_764_000_001_000;
    let messages = match parse_event(text, now) {
        Trigger::Sqs(m) => m,
        Trigger::Direct(m) => vec![m],
    };
    let inbound: Vec<_> = messages.iter().map(OwnedInbound::borrow).collect();
    let p = plan(&inbound, &IngestPolicy::default(), now);
    assert_eq!(p.readings.len() + p.duplicates.len() + p.quarantined.len(), messages.len());
    for q in &p.quarantined {
        assert!(!q.problems.is_empty());
    }
});
