#!/usr/bin/env bash
# Handlers against moto on loopback: the ingest handler's AWS requests per 1,000 messages and
# CPU per message (tests/benches/ingest_moto.rs), and the provisioning hook's latency, embedded
# and on moto (tests/benches/hook_latency.rs), and the daily expiry check over 100,000
# certificates on SQLite (tests/benches/expiry_check.rs). Installs the test tools like scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/moto.sh
test_venv
start_moto
cargo bench -p fleet-tests --features test-support --bench ingest_moto --locked
cargo bench -p fleet-tests --bench hook_latency --locked
cargo bench -p fleet-tests --bench expiry_check --locked
