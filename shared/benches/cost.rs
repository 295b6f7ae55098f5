//! `cargo bench -p fleet-shared --features test-support,sim --bench cost`
//!
//! Pushes one SQS batch of 1,000 messages from 100 devices (as the template configures it)
//! through the real AWS adapters behind a call-counting layer: once with one reading per
//! message, once with v2 packs of 10 readings per message. Prints the API calls against the
//! targets, meters the Timestream writes of the requests the adapter built the way Timestream
//! meters them, and models the cost per 1 M readings from the us-east-1 list prices below
//! (on-demand, no free tier), next to IoT Core's own Timestream rule action on the same
//! readings (which takes one reading per message).

use fleet_shared::adapters::aws::counting::{ApiCalls, CountingAws};
use fleet_shared::adapters::aws::timestream::native_action_write_units;
use fleet_shared::ingest::{decode, sim, IngestPolicy, OwnedInbound};

const DEVICES: usize = 100;
const MESSAGES: usize = 1_000;
const PACK: usize = 10;
const NOW_MS: i64 = 1_764_000_020_000;

// us-east-1 list prices assumed (USD).
const IOT_MESSAGE_PER_M: f64 = 1.00; // IoT Core messaging, per million messages (≤ 5 KB)
const IOT_RULE_PER_M: f64 = 0.15; // rules triggered, per million
const IOT_ACTION_PER_M: f64 = 0.15; // rule actions executed, per million
const SQS_REQUEST_PER_M: f64 = 0.40; // standard queue requests, per million
const LAMBDA_REQUEST_PER_M: f64 = 0.20;
const LAMBDA_ARM_GB_SECOND: f64 = 0.000_013_333_4;
const LAMBDA_MEMORY_GB: f64 = 0.25; // MemorySize 256 in the template
const LAMBDA_SECONDS_PER_1000_READINGS: f64 = 0.25; // assumed wall time per 1,000 readings handled
const TIMESTREAM_WRITE_PER_M: f64 = 0.50; // per million 1 KiB write units
const DYNAMODB_WRU_PER_M: f64 = 0.625; // on-demand write request units
const DYNAMODB_RRU_PER_M: f64 = 0.125; // on-demand read request units
const S3_PUT_PER_K: f64 = 0.005;

/// One batch through the counted adapters: its calls and how many readings it stored.
async fn run(batch: &[OwnedInbound]) -> (ApiCalls, usize) {
    let aws = CountingAws::new((0..DEVICES).map(sim::thing_name).collect());
    let outcome = aws.ingest(batch, NOW_MS).await;
    assert_eq!(outcome.accepted, batch.len(), "{outcome:?}");
    (aws.calls(), outcome.readings)
}

fn requests(c: &ApiCalls) -> usize {
    c.write_records + c.put_object + c.batch_execute_statement + c.batch_write_item + c.batch_get_item
}

/// Fleetline's cost per 1 M readings for a batch that stored `readings` readings.
fn fleetline_per_m(c: &ApiCalls, readings: usize, basic_ingest: bool, timestream: bool) -> f64 {
    let batches = 1e6 / readings as f64;
    let messages = batches * MESSAGES as f64;
    let messaging = if basic_ingest { 0.0 } else { messages / 1e6 * IOT_MESSAGE_PER_M };
    let rule_and_action = messages / 1e6 * (IOT_RULE_PER_M + IOT_ACTION_PER_M);
    // SendMessage per message; Lambda's poller receives and deletes in batches of 10.
    let sqs = messages * 1.2 / 1e6 * SQS_REQUEST_PER_M;
    let lambda = batches / 1e6 * LAMBDA_REQUEST_PER_M
        + 1e3 * LAMBDA_SECONDS_PER_1000_READINGS * LAMBDA_MEMORY_GB * LAMBDA_ARM_GB_SECOND;
    let hot = if timestream {
        batches * c.timestream_write_units as f64 / 1e6 * TIMESTREAM_WRITE_PER_M
    } else {
        0.0
    };
    let dynamodb = batches * c.state_statements as f64 / 1e6 * DYNAMODB_WRU_PER_M
        + batches * (DEVICES * 2) as f64 * 0.5 / 1e6 * DYNAMODB_RRU_PER_M;
    let s3 = batches * c.put_object as f64 / 1e3 * S3_PUT_PER_K;
    messaging + rule_and_action + sqs + lambda + hot + dynamodb + s3
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let check = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let single = sim::fleet_batch(DEVICES, MESSAGES, 1_764_000_000_000, 1);
    let packs = sim::pack_batch(DEVICES, MESSAGES, PACK, 1_764_000_000_000, 1);
    let (c1, r1) = run(&single).await;
    let (cp, rp) = run(&packs).await;

    println!("API calls for one SQS batch of {MESSAGES} messages from {DEVICES} devices:");
    println!("                                  1 reading/msg   {PACK} readings/msg (v2 pack)");
    for (name, a, b) in [
        ("readings stored", r1, rp),
        ("timestream:WriteRecords", c1.write_records, cp.write_records),
        ("s3:PutObject", c1.put_object, cp.put_object),
        ("dynamodb:BatchExecuteStatement", c1.batch_execute_statement, cp.batch_execute_statement),
        ("dynamodb:BatchWriteItem", c1.batch_write_item, cp.batch_write_item),
        ("dynamodb:BatchGetItem", c1.batch_get_item, cp.batch_get_item),
    ] {
        println!("  {name:<30} {a:>12}   {b:>12}");
    }
    println!(
        "  Timestream write units         {:>12}   {:>12}   (1 KiB units per request, common attributes once)",
        c1.timestream_write_units, cp.timestream_write_units
    );
    let per_k = |c: &ApiCalls, readings: usize| requests(c) as f64 * 1_000.0 / readings as f64;
    println!(
        "  AWS requests per 1,000 readings {:>11.1}   {:>12.1}   target <= 25 per 1,000 messages: {}",
        per_k(&c1, r1),
        per_k(&cp, rp),
        check(requests(&c1) <= 25)
    );
    println!("  (per-message dedupe writes: {} {})", c1.batch_write_item, check(c1.batch_write_item == 0));

    // IoT Core's own Timestream action on the same readings: one message per reading, one
    // request per message, one single-measure record per value.
    let native_units: u64 = single
        .iter()
        .flat_map(|m| decode(&m.body, &IngestPolicy::default(), NOW_MS).expect("valid"))
        .map(|r| native_action_write_units(&r))
        .sum();
    let native_per_m = |basic_ingest: bool| {
        let messaging = if basic_ingest { 0.0 } else { IOT_MESSAGE_PER_M };
        messaging
            + IOT_RULE_PER_M
            + IOT_ACTION_PER_M
            + native_units as f64 / MESSAGES as f64 * TIMESTREAM_WRITE_PER_M
    };

    println!("\nModelled cost per 1,000,000 readings (us-east-1 list prices, storage excluded):");
    let rows = [
        ("Fleetline, 1 reading/msg, HotStore=timestream", fleetline_per_m(&c1, r1, false, true)),
        ("Fleetline, 1 reading/msg, Basic Ingest", fleetline_per_m(&c1, r1, true, true)),
        ("Fleetline, packs of 10, Basic Ingest", fleetline_per_m(&cp, rp, true, true)),
        ("Fleetline, packs of 10, Basic Ingest, HotStore=none", fleetline_per_m(&cp, rp, true, false)),
        ("IoT Core Timestream action", native_per_m(false)),
        ("IoT Core Timestream action, Basic Ingest", native_per_m(true)),
    ];
    for (name, usd) in rows {
        println!("  {name:<52} ${usd:>8.4}");
    }
    println!(
        "  (the native action writes {native_units} units per {MESSAGES} readings; Fleetline {} with packs of {PACK} per {rp})",
        cp.timestream_write_units
    );
    let ratio = fleetline_per_m(&cp, rp, true, true) / native_per_m(true);
    println!(
        "  Fleetline (packs of {PACK}) / native, both with Basic Ingest  {:>5.0}%   target <= 25%   {}",
        ratio * 100.0,
        check(ratio <= 0.25)
    );
    let pack_bytes = packs[0].body.len();
    println!(
        "  (IoT Core meters messages in 5 KB units: a pack of {PACK} readings with 3 metrics is {pack_bytes} bytes"
    );
    println!(
        "   with the rule's fields, so about {} such readings fit one unit. Lambda duration assumes {LAMBDA_SECONDS_PER_1000_READINGS} s per 1,000 readings.)",
        5 * 1024 * PACK / pack_bytes
    );
}
