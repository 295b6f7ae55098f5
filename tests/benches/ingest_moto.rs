//! `bash scripts/bench-moto.sh` (starts moto on loopback, then
//! `cargo bench -p fleet-tests --bench ingest_moto`).
//!
//! The ingest function's real handler on the AWS adapters against the moto server: 10 SQS
//! batches of 1,000 messages from 100 devices (after one warm-up batch), with Timestream as
//! the hot store and without. Prints the AWS requests per batch by operation and per 1,000
//! messages (target <= 25), and the handler's CPU per message (process CPU time on a
//! single-threaded runtime; moto runs in its own process) against the in-memory pipeline's
//! on the same batches, measured right after the handler took each (target <= 3x).

use std::time::Instant;

use fleet_tests::load::{ingest_on_moto, Load};

const DEVICES: usize = 100;
const MESSAGES: usize = 1_000;
const BATCHES: usize = 10;
const REQUEST_TARGET: f64 = 25.0;
const CPU_RATIO_TARGET: f64 = 3.0;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let check = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!("ingest handler on moto: {BATCHES} SQS batches of {MESSAGES} messages from {DEVICES} devices");
    for timestream in [true, false] {
        let started = Instant::now();
        let figures = ingest_on_moto(Load {
            devices: DEVICES,
            messages_per_batch: MESSAGES,
            batches: BATCHES,
            timestream,
        })
        .await?;
        println!("\nHotStore={}", if timestream { "timestream" } else { "none" });
        for (op, n) in &figures.requests {
            println!("  {op:<40} {:>6.1} per batch", *n as f64 / BATCHES as f64);
        }
        let per_k = figures.requests_per_1000_messages();
        println!(
            "  AWS requests per 1,000 messages              {per_k:>8.1}   target <= {REQUEST_TARGET}  {}",
            check(per_k <= REQUEST_TARGET)
        );
        let (cpu, reference) = (figures.cpu_per_message(), figures.in_memory_cpu_per_message());
        let ratio = cpu.as_secs_f64() / reference.as_secs_f64();
        println!(
            "  in-memory pipeline on the same batches        {:>8.1} us/message",
            reference.as_secs_f64() * 1e6
        );
        println!(
            "  handler CPU                                   {:>8.1} us/message = {ratio:.2}x   target <= {CPU_RATIO_TARGET}x  {}",
            cpu.as_secs_f64() * 1e6,
            check(ratio <= CPU_RATIO_TARGET)
        );
        println!("  (wall time for the run, moto included: {:.1} s)", started.elapsed().as_secs_f64());
    }
    Ok(())
}
