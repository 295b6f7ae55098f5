//! `cargo bench -p fleet-shared --bench ingest`
//!
//! ns/message of the full in-memory ingest pipeline — decode → validate → upcast → in-batch
//! dedupe → enrich → encode the Timestream record and the archive line — next to
//! `serde_json` parsing the same bytes into a `Value` and nothing else, and their ratio
//! (target ≤ 2.0). Also printed: the per-message share of gzip + SHA-256 of the batch's
//! archive object. Best of several rounds, so a busy machine inflates neither side.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use fleet_shared::ingest::sim;
use fleet_shared::ingest::{raw_object, IngestPolicy};
use fleet_shared::model::{Device, ThingName};

const DEVICES: usize = 100;
const MESSAGES: usize = 1_000;
const ROUNDS: usize = 30;
const TARGET_RATIO: f64 = 2.0;
const RX: i64 = 1_764_000_000_000;

/// Best time per message of each workload, the workloads interleaved round by round so
/// neither gets a warmer cache or allocator than the other.
fn best_ns_per_message<const N: usize>(mut work: [&mut dyn FnMut(); N]) -> [f64; N] {
    let mut best = [Duration::MAX; N];
    for _ in 0..ROUNDS {
        for (f, b) in work.iter_mut().zip(best.iter_mut()) {
            let start = Instant::now();
            f();
            *b = (*b).min(start.elapsed());
        }
    }
    best.map(|b| b.as_nanos() as f64 / MESSAGES as f64)
}

fn main() {
    let batch = sim::fleet_batch(DEVICES, MESSAGES, RX, 42);
    let bytes: usize = batch.iter().map(|m| m.body.len()).sum();
    let devices: HashMap<ThingName, Device> = sim::registrations(DEVICES)
        .into_iter()
        .map(|(thing, registration)| {
            (thing.clone(), Device { thing, registration: Some(registration), state: None })
        })
        .collect();
    let policy = IngestPolicy::default();

    let mut parse_only = || {
        for m in &batch {
            black_box(serde_json::from_slice::<serde_json::Value>(black_box(&m.body)).expect("valid JSON"));
        }
    };

    let mut pipeline = || {
        assert_eq!(sim::in_memory_pipeline(&batch, &devices, &policy, RX + 5_000), MESSAGES);
    };

    let mut archive_object = || {
        black_box(raw_object(batch.iter().map(|m| m.body.as_slice()), RX).expect("non-empty"));
    };

    let [parse_only, pipeline, archive_object] =
        best_ns_per_message([&mut parse_only, &mut pipeline, &mut archive_object]);

    let ratio = pipeline / parse_only;
    println!(
        "ingest pipeline, {MESSAGES} messages from {DEVICES} devices (v1 and v2), {} bytes/message",
        bytes / MESSAGES
    );
    println!("  serde_json parse only (Value)        {parse_only:>9.0} ns/message");
    println!("  full pipeline (decode..record+line)  {pipeline:>9.0} ns/message");
    println!(
        "  ratio                                {ratio:>9.2}   (target <= {TARGET_RATIO:.1}) {}",
        if ratio <= TARGET_RATIO { "PASS" } else { "FAIL" }
    );
    println!(
        "  + archive object (gzip + sha256)     {archive_object:>9.0} ns/message (once per batch, amortised)"
    );
}
