#!/usr/bin/env bash
# Builds every function as `sam build` would (cargo lambda, release) into a target directory
# emptied first, so an output left by an earlier build can never pass for this one, and
# checks each bootstrap is a fresh Linux executable for the architecture it says. arm64 (what
# the template deploys) when the aarch64 target is installed, otherwise x86_64: it never
# downloads a toolchain target (`rustup target add aarch64-unknown-linux-gnu` enables arm64).
# Usage: scripts/deploy-build.sh [target-dir]   (default target/deploy-build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${1:-target/deploy-build}

# FLEET_DEPLOY_ARCH=arm64 insists on the architecture the template deploys (a release pipeline
# should set it); by default x86_64 stands in when the aarch64 target is not installed.
installed=$(rustup target list --installed 2>/dev/null || true)
if grep -qx aarch64-unknown-linux-gnu <<<"$installed"; then
  arch=arm64 flag=--arm64 machine=183 # EM_AARCH64
elif [ "${FLEET_DEPLOY_ARCH:-}" = arm64 ]; then
  echo "FLEET_DEPLOY_ARCH=arm64 but the aarch64-unknown-linux-gnu target is not installed:" >&2
  echo "  rustup target add aarch64-unknown-linux-gnu" >&2
  exit 1
else
  arch=x86_64 flag=--x86-64 machine=62 # EM_X86_64
fi
# Every function the template builds with cargo-lambda: its BuildProperties.Binary.
functions=$(grep -A3 'BuildMethod: rust-cargolambda' infra/template.yaml | sed -n 's/^ *Binary: *//p' || true)
[ -n "$functions" ] || { echo "no rust-cargolambda function in infra/template.yaml" >&2; exit 1; }
packages=()
for f in $functions; do packages+=(--package "$f"); done

echo "building for $arch: $(echo $functions)"
rm -rf "$dir"
started=$(date +%s)
CARGO_TARGET_DIR="$dir" cargo lambda build --release "$flag" --locked "${packages[@]}"

for f in $functions; do
  bin="$dir/lambda/$f/bootstrap"
  [ -f "$bin" ] || { echo "$bin was not built" >&2; exit 1; }
  [ "$(stat -c %Y "$bin")" -ge "$started" ] || { echo "$bin is older than this build" >&2; exit 1; }
  # ELF magic, then e_machine (2 bytes, little-endian, at offset 18).
  magic=$(od -An -tx1 -N4 "$bin" | tr -d ' ')
  got=$(od -An -tu2 -j18 -N2 "$bin" | tr -d ' ')
  if [ "$magic" != 7f454c46 ] || [ "$got" != "$machine" ]; then
    echo "$bin is not a Linux $arch executable (magic $magic, machine $got)" >&2
    exit 1
  fi
  echo "$bin: $arch, $(du -h "$bin" | cut -f1)"
done
