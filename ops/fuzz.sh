#!/usr/bin/env bash
# Fuzzes every decoder of bytes from outside for a bounded time
# (REWIND_FUZZ_SECONDS each, default 15): the wire decoders, the NBD option
# and request parsers, whole NBD sessions against the real server, and the
# NBD client's reply parsers (what a backup source sends), a backup's
# inputs (compressed appends, --changed-areas files), with
# cargo fuzz (libFuzzer + AddressSanitizer). The toolchain
# here is stable; RUSTC_BOOTSTRAP lets cargo fuzz pass its -Z sanitizer flag.
# A crash fails the run and leaves its input under wire/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/env.sh
secs="${REWIND_FUZZ_SECONDS:-15}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "ops/fuzz.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2 --quiet
fi
cd wire/fuzz
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR}-fuzz"
log=$(mktemp)
for target in decode_request decode_response decode_record decode_archive nbd_options nbd_request nbd_session nbd_client backup_input; do
  mkdir -p "corpus/$target"
  echo "ops/fuzz.sh: $target for ${secs}s"
  rc=0
  # Seeds (a whole NBD session) start the search past the magic numbers.
  seeds=()
  [ -d "seeds/$target" ] && seeds=("seeds/$target")
  cargo fuzz run "$target" "corpus/$target" "${seeds[@]}" -- -max_total_time="$secs" -max_len=65536 -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)" "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -60 "$log"
    echo "ops/fuzz.sh: $target failed (exit $rc)" >&2
    exit 1
  fi
done
rm -f "$log"
