//! `cargo bench -p fleet-shared --features test-support --bench cost`
//!
//! Pushes 1,000 messages from 100 devices (one SQS batch, as the template configures it)
//! through the real AWS adapters behind a call-counting layer, prints the API calls per
//! 1,000 messages against the targets, and models the cost per 1 M messages from the
//! us-east-1 list prices below (on-demand, no free tier).

use fleet_shared::adapters::aws::counting::CountingAws;
use fleet_shared::ingest::sim;

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

    // Per 1 M messages.
    let batches = 1_000_000.0 / MESSAGES as f64;
    let per_batch = |n: usize| n as f64 * batches;
    let lines = [
        ("IoT Core messages", IOT_MESSAGE_PER_M),
        ("IoT rule + SQS action", IOT_RULE_PER_M + IOT_ACTION_PER_M),
        // SendMessage per message; Lambda's poller receives and deletes in batches of 10.
        ("SQS requests", SQS_REQUEST_PER_M * 1.2),
        ("Lambda requests", LAMBDA_REQUEST_PER_M * batches / 1e6),
        (
            "Lambda duration (arm64, 256 MB)",
            batches * LAMBDA_SECONDS_PER_BATCH * LAMBDA_MEMORY_GB * LAMBDA_ARM_GB_SECOND,
        ),
        ("Timestream writes (1 record/message)", TIMESTREAM_WRITE_PER_M),
        ("DynamoDB state writes", per_batch(c.update_item) / 1e6 * DYNAMODB_WRU_PER_M),
        ("DynamoDB enrichment reads", per_batch(DEVICES * 2) * 0.5 / 1e6 * DYNAMODB_RRU_PER_M),
        ("S3 archive PUTs", per_batch(c.put_object) / 1e3 * S3_PUT_PER_K),
    ];
    println!("\nModelled cost per 1,000,000 messages (us-east-1 list prices, storage excluded):");
    let mut total = 0.0;
    for (name, usd) in lines {
        total += usd;
        println!("  {name:<38} ${usd:>8.4}");
    }
    println!("  {:<38} ${total:>8.4}", "total");
    println!("  (Lambda duration assumes {LAMBDA_SECONDS_PER_BATCH} s per {MESSAGES}-message batch.)");
}
