#!/usr/bin/env bash
# The local ingest demo on the embedded backend: a fresh SQLite file, three registered devices,
# every sample event in events/ingest-telemetry/ fed through the real ingest pipeline, then
# what was stored. No AWS account needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export FLEET_DB="${FLEET_DB:-target/demo.sqlite}"
rm -f "$FLEET_DB" "$FLEET_DB-wal" "$FLEET_DB-shm"
cargo build --quiet -p fleetctl
fleetctl=target/debug/fleetctl

echo "== registering devices ($FLEET_DB)"
$fleetctl devices register sensor-001 --class env-sensor --region eu-west --fw 1.4.0 >/dev/null
$fleetctl devices register sensor-002 --class env-sensor --region us-east --fw 1.4.0 >/dev/null
$fleetctl devices register sensor-003 --class air-quality --region eu-west --fw 2.0.0 >/dev/null

echo; echo "== ingesting events/ingest-telemetry/*.json"
$fleetctl ingest events/ingest-telemetry/*.json

echo; echo "== devices"
$fleetctl devices list
echo; echo "== telemetry of sensor-001"
$fleetctl telemetry sensor-001
echo; echo "== quarantine"
$fleetctl quarantine list
