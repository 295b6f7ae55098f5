#!/usr/bin/env bash
# The ingest handler against moto on loopback: AWS requests per 1,000 messages and handler
# CPU per message (tests/benches/ingest_moto.rs). Installs the test tools like scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/moto.sh
test_venv
start_moto
cargo bench -p fleet-tests --bench ingest_moto --locked
