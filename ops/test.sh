#!/usr/bin/env bash
# The whole test suite: clippy with warnings as errors, unit, property,
# storage-suite and integration tests against real node processes and real
# NBD clients, then the fuzzers for a bounded time. Installs what it needs
# first. Ends with one line of totals.
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/env.sh
bash ops/setup-debian.sh
# The peers the benchmarks compare with (their smoke test runs below).
bash ops/setup-peers.sh
# Lints first: warnings are errors, and clippy.toml's bans (direct spawns
# and clocks in the core crates) hold.
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
# Integration tests each run a 3-node site; one at a time on a 2-core machine.
set +e
cargo test --workspace --no-fail-fast -- --test-threads=1 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(awk '/^test result:/ {s += $4} END {print s + 0}' "$log")
failed=$(awk '/^test result:/ {s += $6} END {print s + 0}' "$log")
rm -f "$log"
if [ "$status" -ne 0 ]; then
  echo "tests: $passed passed, $failed failed"
  exit "$status"
fi
# Every decoder of bytes from outside, fuzzed for a bounded time.
bash ops/fuzz.sh
echo "tests: $passed passed, $failed failed"
