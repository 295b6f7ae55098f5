#!/usr/bin/env bash
# Fuzzes the ingest decoder (`decode`), the SQS-event entry point (`sqs_event`), PEM
# certificates (`cert_pem`) and the provisioning hook's store-free checks (`hook_request`) for
# a bounded time each, then prints the figures. The corpus lives in fuzz/corpus/<target> (kept
# in the repository, minimised), seeded from events/ and real certificates. Needs the nightly
# toolchain; installs cargo-fuzz from crates.io when missing.
# Usage: scripts/fuzz.sh [seconds per target, default 60]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
mkdir -p target
for t in decode sqs_event cert_pem hook_request; do
  corpus=fuzz/corpus/$t
  mkdir -p "$corpus"
  log=target/fuzz-$t.log
  (cd fuzz && cargo +nightly fuzz run --features fuzzing "$t" "../$corpus" -- -max_total_time="$secs" -print_final_stats=1) >"$log" 2>&1 || {
    echo "$t: the fuzzer found a failure (see $log and fuzz/artifacts/$t/)" >&2
    tail -40 "$log" >&2
    exit 1
  }
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  (cd fuzz && cargo +nightly fuzz cmin --features fuzzing "$t" "../$corpus") >>"$log" 2>&1
  echo "$t: $runs executions in ${secs}s, 0 crashes, corpus $(ls "$corpus" | wc -l) inputs"
done
