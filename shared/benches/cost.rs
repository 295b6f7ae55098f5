//! `cargo bench -p fleet-shared --features test-support --bench cost`
//!
//! Pushes 1,000 messages from 100 devices (one SQS batch, as the template configures it)
//! through the real AWS adapters behind a call-counting layer, prints the API calls per
//! 1,000 messages against the targets, meters the Timestream writes of the requests the
//! adapter built the way Timestream meters them, and models the cost per 1 M readings from
//! the us-east-1 list prices below (on-demand, no free tier), next to IoT Core's own
//! Timestream rule action on the same readings.

use fleet_shared::adapters::aws::counting::CountingAws;
use fleet_shared::adapters::aws::timestream::native_action_write_units;
use fleet_shared::ingest::{decode, sim, IngestPolicy};

const DEVICES: usize = 100;
const MESSAGES: usize = 1_000;

// us-east-1 list prices assumed (USD).
const IOT_MESSAGE_PER_M: f64 = 1.00; // IoT Core messaging, per million messages (≤ 5 KB)
const IOT_RULE_PER_M: f64 = 0.15; // rules triggered, per million
const IOT_ACTION_PER_M: f64 = 0.15; // rule actions executed, per million
const SQS_REQUEST_PER_M: f64 = 0.40; // standard queue requests, per million
const LAMBDA_REQUEST_PER_M: f64 = 0.20;
const LAMBDA_ARM_GB_SECOND: f64 = 0.000_013_333_4;
const LAMBDA_MEMORY_GB: f64 = 0.25; // MemorySize 256 in the template
const LAMBDA_SECONDS_PER_BATCH: f64 = 0.25; // assumed wall time of one 1,000-message batch
const TIMESTREAM_WRITE_PER_M: f64 = 0.50; // per million 1 KB writes
const DYNAMODB_WRU_PER_M: f64 = 0.625; // on-demand write request units
const DYNAMODB_RRU_PER_M: f64 = 0.125; // on-demand read request units
const S3_PUT_PER_K: f64 = 0.005;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let aws = CountingAws::new((0..DEVICES).map(sim::thing_name).collect());
    let batch = sim::fleet_batch(DEVICES, MESSAGES, 1_764_000_000_000, 1);
    let outcome = aws.ingest(&batch, 1_764_000_002_000).await;
    assert_eq!(outcome.accepted, MESSAGES, "{outcome:?}");
    let c = aws.calls();

    let check = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!("API calls for {MESSAGES} messages from {DEVICES} devices (one SQS batch):");
    println!(
        "  timestream:WriteRecords   {:>5}   target <= 10          {}",
        c.write_records,
        check(c.write_records <= 10)
    );
    println!(
        "  s3:PutObject              {:>5}   target 1              {}",
        c.put_object,
        check(c.put_object == 1)
    );
    println!(
        "  dynamodb:UpdateItem       {:>5}   target <= 1/device    {}",
        c.update_item,
        check(c.update_item <= DEVICES)
    );
    println!(
        "  dynamodb:BatchWriteItem   {:>5}   (per-message dedupe writes: 0) {}",
        c.batch_write_item,
        check(c.batch_write_item == 0)
    );
    println!(
        "  dynamodb:BatchGetItem     {:>5}   (enrichment, 2 keys/device, 100 keys/request)",
        c.batch_get_item
    );

    let requests = c.write_records + c.put_object + c.update_item + c.batch_write_item + c.batch_get_item;
    println!("  AWS requests in all       {:>5}   target <= 25          {}", requests, check(requests <= 25));
    println!(
        "  Timestream write units    {:>5}   (metered: 1 KiB units per request, common attributes once)",
        c.timestream_write_units
    );

    // The same readings through IoT Core's own Timestream rule action: one request per message,
    // one single-measure record per value.
    let native_units: u64 = batch
        .iter()
        .map(|m| decode(&m.body, &IngestPolicy::default(), 1_764_000_002_000).expect("valid"))
        .map(|r| native_action_write_units(&r))
        .sum();

    // Per 1 M readings (one reading per message here).
    let batches = 1_000_000.0 / MESSAGES as f64;
    let per_m = |per_batch: f64| per_batch * batches;
    let iot_messaging = IOT_MESSAGE_PER_M;
    let rule_and_action = IOT_RULE_PER_M + IOT_ACTION_PER_M;
    // SendMessage per message; Lambda's poller receives and deletes in batches of 10.
    let sqs = SQS_REQUEST_PER_M * 1.2;
    let lambda = LAMBDA_REQUEST_PER_M * batches / 1e6
        + batches * LAMBDA_SECONDS_PER_BATCH * LAMBDA_MEMORY_GB * LAMBDA_ARM_GB_SECOND;
    let timestream = per_m(c.timestream_write_units as f64) / 1e6 * TIMESTREAM_WRITE_PER_M;
    let dynamodb = per_m(c.update_item as f64) / 1e6 * DYNAMODB_WRU_PER_M
        + per_m((DEVICES * 2) as f64) * 0.5 / 1e6 * DYNAMODB_RRU_PER_M;
    let s3 = per_m(c.put_object as f64) / 1e3 * S3_PUT_PER_K;
    let native_timestream = per_m(native_units as f64) / 1e6 * TIMESTREAM_WRITE_PER_M;

    let fleetline =
        |messaging: f64, hot: f64| messaging + rule_and_action + sqs + lambda + hot + dynamodb + s3;
    let native = |messaging: f64| messaging + rule_and_action + native_timestream;
    let rows = [
        ("Fleetline, HotStore=timestream", fleetline(iot_messaging, timestream)),
        ("Fleetline, HotStore=timestream, Basic Ingest", fleetline(0.0, timestream)),
        ("Fleetline, HotStore=none, Basic Ingest", fleetline(0.0, 0.0)),
        ("IoT Core Timestream action", native(iot_messaging)),
        ("IoT Core Timestream action, Basic Ingest", native(0.0)),
    ];
    println!("\nModelled cost per 1,000,000 readings (us-east-1 list prices, storage excluded):");
    println!("  parts of the Fleetline path: IoT messaging ${iot_messaging:.4}, rule + SQS action ${rule_and_action:.4},");
    println!("    SQS ${sqs:.4}, Lambda ${lambda:.4}, Timestream ${timestream:.4} ({} units per {MESSAGES} readings),", c.timestream_write_units);
    println!("    DynamoDB ${dynamodb:.4}, S3 ${s3:.4}");
    println!(
        "  the native action writes {native_units} units per {MESSAGES} readings: ${native_timestream:.4}"
    );
    for (name, usd) in rows {
        println!("  {name:<48} ${usd:>8.4}");
    }
    let ratio = fleetline(0.0, timestream) / native(0.0);
    println!(
        "  Fleetline / native, both with Basic Ingest      {:>8.0}%   target <= 25%   {}",
        ratio * 100.0,
        check(ratio <= 0.25)
    );
    println!("  (one reading per message: per-message charges (rule, action, SQS) dominate; packs of many");
    println!("   readings per message divide them. Lambda duration assumes {LAMBDA_SECONDS_PER_BATCH} s per {MESSAGES}-message batch.)");
}
