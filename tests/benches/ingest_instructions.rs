//! `bash scripts/bench-moto.sh` (starts moto on loopback and installs valgrind when missing,
//! then `cargo bench -p fleet-tests --features test-support --bench ingest_instructions`).
//!
//! Issue 8's CPU target (handler <= 3x the in-memory pipeline per message) counted in
//! instructions instead of CPU seconds. `ingest_moto` prints CPU time, but on a shared VM the
//! same work's CPU time varies by tens of percent from run to run, and more when the handler
//! interleaves with moto on the other vCPU; instruction counts do not vary. The bench runs
//! itself under `valgrind --tool=callgrind`, counting only inside `load::handler_turn` (one
//! invocation: the current-thread runtime runs only there, so the SDK's connection tasks, the
//! HTTP exchange with moto and the response parsing are in it) and `load::pipeline_turn` (the
//! in-memory pipeline on the same batch), on the same load as `ingest_moto`: 10 SQS batches of
//! 1,000 messages from 100 devices after a warm-up batch, the real handler on the AWS adapters
//! against moto. It prints both per message and their ratio.
//!
//! Valgrind does not emulate SHA-NI, so under it sha2 computes SHA-256 (request signing, the
//! archive's name) in software, at many times the instructions the native SHA-NI path
//! takes: the bench also prints the handler without that part, for comparison. The ratio it
//! judges is the one with software SHA-256, i.e. the handler's count overstated.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use fleet_tests::load::{ingest_on_moto, runtime, Load};

const DEVICES: usize = 100;
const MESSAGES: usize = 1_000;
const BATCHES: usize = 10;
const RATIO_TARGET: f64 = 3.0;
/// Set in the child that valgrind runs: the hot store to run with.
const CHILD: &str = "FLEET_INSTRUCTIONS_CHILD";
/// The two functions counted, as callgrind names them (`fleet_tests::load::handler_turn<…>`).
const HANDLER: &str = "handler_turn";
const PIPELINE: &str = "pipeline_turn";
/// sha2's SHA-256 block function: its software path under valgrind (see the docs).
const SOFT_SHA: &str = "sha2::sha256::compress256";

fn main() -> Result<()> {
    match std::env::var(CHILD) {
        Ok(store) => child(&store),
        Err(_) => parent(),
    }
}

/// Under valgrind: the load, with nothing printed but the messages measured. The endpoint must
/// be an IP address: a name would be resolved on a blocking thread, whose instructions callgrind
/// counts apart from the handler's. The requests must be those `ingest_moto` makes: a retry
/// (valgrind slows the handler down) would add to the handler's count unseen.
fn child(store: &str) -> Result<()> {
    let endpoint = fleet_tests::moto::endpoint()?;
    let host = endpoint.trim_start_matches("http://").rsplit_once(':').map_or(endpoint.as_str(), |(h, _)| h);
    ensure!(host.parse::<std::net::IpAddr>().is_ok(), "{endpoint}: give moto's address as an IP");
    let timestream = store == "timestream";
    let load = Load { devices: DEVICES, messages_per_batch: MESSAGES, batches: BATCHES, timestream };
    let figures = ingest_on_moto(&runtime()?, load)?;
    let per_batch = |op: &str| figures.requests.get(op).copied().unwrap_or(0) as f64 / BATCHES as f64;
    let mut expected =
        vec![("DynamoDB:BatchGetItem", 1.0), ("DynamoDB:BatchExecuteStatement", 4.0), ("S3:PutObject", 1.0)];
    if timestream {
        expected.push(("Timestream Write:WriteRecords", 10.0));
    }
    for (op, n) in expected {
        ensure!(
            per_batch(op) == n,
            "{op}: {} per batch, expected {n}: {:?}",
            per_batch(op),
            figures.requests
        );
    }
    println!("messages={}", figures.messages);
    Ok(())
}

fn parent() -> Result<()> {
    for tool in ["valgrind", "callgrind_annotate"] {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} not found: install Debian's valgrind (scripts/bench-moto.sh does)"
        );
    }
    println!(
        "ingest handler, instructions under callgrind: {BATCHES} SQS batches of {MESSAGES} messages from {DEVICES} devices, against moto"
    );
    for store in ["timestream", "none"] {
        let counts = count(store)?;
        let per = |n: u64| n as f64 / counts.messages as f64;
        let ratio = counts.handler as f64 / counts.pipeline as f64;
        let native = (counts.handler - counts.soft_sha) as f64 / counts.pipeline as f64;
        println!("\nHotStore={store}");
        println!(
            "  in-memory pipeline on the same batches   {:>9.0} instructions/message",
            per(counts.pipeline)
        );
        println!(
            "  handler                                  {:>9.0} instructions/message = {ratio:.2}x   target <= {RATIO_TARGET}x  {}",
            per(counts.handler),
            if ratio <= RATIO_TARGET { "PASS" } else { "FAIL" }
        );
        println!(
            "    of which software SHA-256              {:>9.0} (SHA-NI natively); without it {native:.2}x",
            per(counts.soft_sha)
        );
    }
    Ok(())
}

struct Counts {
    messages: usize,
    handler: u64,
    pipeline: u64,
    soft_sha: u64,
}

/// Runs the child under callgrind and reads the inclusive counts of the two functions.
fn count(store: &str) -> Result<Counts> {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ingest-{store}.callgrind"));
    let exe = std::env::current_exe()?;
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(format!("--toggle-collect=*{HANDLER}*"))
        .arg(format!("--toggle-collect=*{PIPELINE}*"))
        .arg(&exe)
        .env(CHILD, store)
        .output()
        .context("running valgrind")?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    if !run.status.success() {
        bail!("the child failed under valgrind: {stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    }
    let messages = stdout
        .lines()
        .find_map(|l| l.strip_prefix("messages="))
        .context("the child printed no message count")?
        .parse()?;
    let annotated = annotate(&out)?;
    // Every function of that name (two crate versions may each have one), without the
    // recursive entries (`f'2`), which the outermost one includes.
    let inclusive =
        |name: &str| -> u64 { annotated.iter().filter(|(f, _)| f.ends_with(name)).map(|(_, n)| *n).sum() };
    let counts = Counts {
        messages,
        handler: inclusive(HANDLER),
        pipeline: inclusive(PIPELINE),
        soft_sha: inclusive(SOFT_SHA),
    };
    ensure!(
        counts.handler > 0 && counts.pipeline > 0 && counts.soft_sha > 0,
        "callgrind counted nothing in {HANDLER}, {PIPELINE} or {SOFT_SHA}"
    );
    Ok(counts)
}

/// `callgrind_annotate --inclusive=yes`: each function (its name without the file) with its
/// inclusive instruction count.
fn annotate(out: &Path) -> Result<Vec<(String, u64)>> {
    let run = Command::new("callgrind_annotate").arg("--inclusive=yes").arg(out).output()?;
    ensure!(run.status.success(), "callgrind_annotate: {}", String::from_utf8_lossy(&run.stderr));
    let text = String::from_utf8(run.stdout)?;
    // "1,234,567 (12.34%)  file:function [binary]"
    Ok(text
        .lines()
        .filter_map(|l| {
            let (count, rest) = l.trim_start().split_once(' ')?;
            let n: u64 = count.replace(',', "").parse().ok()?;
            let (_, rest) = rest.trim_start().strip_prefix('(')?.split_once(')')?;
            let located = rest.trim_start().split(" [").next()?;
            let function = located.split_once(':').map_or(located, |(_, f)| f);
            Some((function.to_owned(), n))
        })
        .collect())
}
