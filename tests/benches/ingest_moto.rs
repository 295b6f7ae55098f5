//! `bash scripts/bench-moto.sh` (starts moto on loopback, then
//! `cargo bench -p fleet-tests --features test-support --bench ingest_moto`).
//!
//! The ingest function's real handler on the AWS adapters against the moto server: 10 SQS
//! batches of 1,000 messages from 100 devices (after one warm-up batch), with Timestream as
//! the hot store and without. Prints the AWS requests per batch by operation and per 1,000
//! messages (target <= 25), and the handler's CPU per message (process CPU time on a
//! single-threaded runtime; moto runs in its own process) against the in-memory pipeline's
//! on the same batches, measured right after the handler took each (target <= 3x). Then the
//! same load with every SDK client answered in process (aws-smithy-mocks): what the handler
//! costs without sockets, i.e. how much of the figure is the requests' network path. And once
//! more with a pause of 10 ms before each request is answered: the same work, each request
//! resumed after an idle wait as against moto (the thread sleeps, so the pause itself costs no
//! CPU time; the sleep holds the runtime's only thread, so the requests go one at a time,
//! where against moto up to 8 wait together). The extra CPU time it shows is not the
//! handler's work, which is the same as in the run before: it is what resuming after a wait
//! costs on this machine (it grows with the pause; our reading is caches and predictors gone
//! cold while the vCPU idled), and the in-memory pipeline, never waiting, does not pay it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleet_tests::load::{ingest_on_mocks, ingest_on_moto, runtime, Load, LoadFigures};

const DEVICES: usize = 100;
const MESSAGES: usize = 1_000;
const BATCHES: usize = 10;
const REQUEST_TARGET: f64 = 25.0;
const CPU_RATIO_TARGET: f64 = 3.0;
/// How long the in-process answers wait in the last run.
const PAUSE: Duration = Duration::from_millis(10);

fn main() -> anyhow::Result<()> {
    let rt = runtime()?;
    println!("ingest handler: {BATCHES} SQS batches of {MESSAGES} messages from {DEVICES} devices");
    for timestream in [true, false] {
        let load = Load { devices: DEVICES, messages_per_batch: MESSAGES, batches: BATCHES, timestream };
        println!("\nHotStore={}", if timestream { "timestream" } else { "none" });
        let started = Instant::now();
        let figures = ingest_on_moto(&rt, load)?;
        for (op, n) in &figures.requests {
            println!("  {op:<40} {:>6.1} per batch", *n as f64 / BATCHES as f64);
        }
        let per_k = figures.requests_per_1000_messages();
        println!(
            "  AWS requests per 1,000 messages              {per_k:>8.1}   target <= {REQUEST_TARGET}  {}",
            check(per_k <= REQUEST_TARGET)
        );
        print_cpu("against moto", &figures, true);
        println!("  (wall time for the run, moto included: {:.1} s)", started.elapsed().as_secs_f64());
        // The same handler and adapters, the SDK clients answered in process: every request
        // is still built, serialised and signed, but none crosses a socket to a server.
        // Then once more after an idle pause before each request: the same work, resumed cold.
        let idle = format!(
            "AWS answered in process, {} ms idle before each request (the same work)",
            PAUSE.as_millis()
        );
        for (run, pause) in [("AWS answered in process (no socket)", Duration::ZERO), (idle.as_str(), PAUSE)]
        {
            let mocked = ingest_on_mocks(&rt, load, pause)?;
            anyhow::ensure!(
                same_requests(&mocked.requests, &figures.requests),
                "{run}: other requests than on moto: {:?}, on moto {:?}",
                mocked.requests,
                figures.requests
            );
            print_cpu(run, &mocked, false);
        }
    }
    Ok(())
}

/// Whether two runs made the same requests. The health counters' UpdateItem calls are one per
/// (bucket, cohort) a batch touches, so a batch that straddles a minute or an hour makes a few
/// more, whenever the run happens to take it: in all, those may differ by up to two per batch
/// (a run of ten batches straddles a minute once or twice).
fn same_requests(a: &BTreeMap<String, usize>, b: &BTreeMap<String, usize>) -> bool {
    a.keys().eq(b.keys())
        && a.iter()
            .zip(b.values())
            .all(|((op, &x), &y)| x == y || (op == "DynamoDB:UpdateItem" && x.abs_diff(y) <= 2 * BATCHES))
}

fn check(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn print_cpu(run: &str, figures: &LoadFigures, judged: bool) {
    let (cpu, reference) = (figures.cpu_per_message(), figures.in_memory_cpu_per_message());
    let ratio = cpu.as_secs_f64() / reference.as_secs_f64();
    let verdict = if judged {
        format!("target <= {CPU_RATIO_TARGET}x  {}", check(ratio <= CPU_RATIO_TARGET))
    } else {
        "(for comparison)".to_owned()
    };
    println!("  {run}:");
    println!(
        "    in-memory pipeline on the same batches      {:>8.1} us/message",
        reference.as_secs_f64() * 1e6
    );
    println!(
        "    handler CPU                                 {:>8.1} us/message = {ratio:.2}x   {verdict}",
        cpu.as_secs_f64() * 1e6
    );
}
