#!/usr/bin/env bash
# The whole test suite: unit, property, storage-suite and integration tests
# against real node processes. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/env.sh
bash ops/setup-debian.sh
# Integration tests each run a 3-node site; one at a time on a 2-core machine.
cargo test --workspace --no-fail-fast -- --test-threads=1
# Every decoder of bytes from outside, fuzzed for a bounded time.
bash ops/fuzz.sh
