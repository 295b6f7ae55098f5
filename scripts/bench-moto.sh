#!/usr/bin/env bash
# Handlers against moto on loopback: the ingest handler's AWS requests per 1,000 messages and
# CPU per message (tests/benches/ingest_moto.rs), and the provisioning hook's latency, embedded
# and on moto (tests/benches/hook_latency.rs), and the daily expiry check over 100,000
# certificates on SQLite (tests/benches/expiry_check.rs); and the ingest handler's instructions
# per message under callgrind (tests/benches/ingest_instructions.rs). Installs the test tools
# like scripts/test.sh, and Debian's valgrind when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/moto.sh
test_venv
if ! command -v valgrind >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi
start_moto
cargo bench -p fleet-tests --features test-support --bench ingest_moto --locked
cargo bench -p fleet-tests --features test-support --bench ingest_instructions --locked
cargo bench -p fleet-tests --bench hook_latency --locked
cargo bench -p fleet-tests --bench expiry_check --locked
