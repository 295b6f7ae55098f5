#!/usr/bin/env bash
# Runs every Fleetline test, on a fresh machine too. It installs what the tests need: into
# .venv (pinned in scripts/requirements-test.txt and requirements-deploy.txt, from PyPI:
# aws-sam-cli, cargo-lambda, moto[server], cfn-lint) and, when missing, Debian's
# mosquitto-clients and chromium; starts a moto server on a free loopback port; runs
# formatting, lint, the SAM template checks, the deploy build and all four test tiers; and
# stops what it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Each step says when it starts, in seconds since the run began (what grew, when a run slows).
step() { printf '\n==> %s (+%ss)\n' "$*" "$SECONDS"; }

# Disk: a clean run must fit a machine with a few GB free. Incremental compilation caches are
# of no use to a one-off build (2.4 GB of the 7.2 GB a run took before they were turned off).
export CARGO_INCREMENTAL=0

step "disk (a clean run takes about 4 GB: 3 GB under target/, 1 GB in .venv)"
df -h . | tail -1
# Checked first, so a full disk is named here instead of failing a build minutes in. What a
# previous run left under target/ and .venv counts towards it.
need_mb=5120
have_mb=$({ du -smc target .venv 2>/dev/null || true; } | tail -1 | cut -f1)
free_mb=$(df -Pm . | awk 'NR == 2 { print $4 }')
if [ $((free_mb + have_mb)) -lt "$need_mb" ]; then
  echo "error: not enough disk space: a run needs about $((need_mb / 1024)) GB here, ${free_mb} MB are free (and ${have_mb} MB already under target/ and .venv); free some space and run again" >&2
  exit 1
fi

step "test tools (.venv from scripts/requirements-test.txt)"
source scripts/moto.sh
test_venv
export SAM_CLI_TELEMETRY=0
cargo lambda --version
sam --version

step "system tools (mosquitto_pub, chromium)"
missing=()
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v mosquitto_pub chromium

step "moto server on loopback"
start_moto

step "format"
cargo fmt --all -- --check

step "lint (clippy, warnings are errors)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "SAM template (cfn-lint, sam validate --lint)"
cfn-lint infra/template.yaml
# Offline: the SAM transform and cfn-lint run locally; the credentials are never used.
AWS_ACCESS_KEY_ID=offline AWS_SECRET_ACCESS_KEY=offline \
  sam validate --lint --template infra/template.yaml --region us-east-1

step "deploy build (every function, cargo lambda --release, clean target directory)"
bash scripts/deploy-build.sh target/deploy-build
# Checked: only the bootstraps are kept, not the ~1 GB of release objects behind them.
find target/deploy-build -mindepth 1 -maxdepth 1 ! -name lambda -exec rm -rf {} +

step "tests: domain, handler, adapter (moto + mocks), end-to-end (cargo lambda, fleetctl local, chromium)"
cargo test --workspace --features fleet-shared/test-support --locked -- --include-ignored

step "all passed"
