#!/usr/bin/env bash
# The nemesis test on a netns site of real processes, for as long as asked:
#   bash ops/nemesis.sh --minutes 10 [--seed S]
# Needs root. Prints the faults injected by kind and what the checker
# verified; exits non-zero if any acknowledged write was lost, a replica
# differs, the guest saw an error, or a replay differs from the disk.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=2; seed=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "nemesis.sh: unknown argument $1 (--minutes N, --seed S)" >&2; exit 2 ;;
  esac
done
[[ "$minutes" =~ ^[0-9]+$ ]] && [ "$minutes" -ge 1 ] && [ "$minutes" -le 600 ] || { echo "nemesis.sh: --minutes must be 1-600" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "nemesis.sh: needs root (network namespaces)" >&2; exit 1; }
. ops/env.sh
export REWIND_NEMESIS_SECONDS=$((minutes * 60))
[ -n "$seed" ] && export REWIND_NEMESIS_SEED=$seed
exec cargo test -p rewind-node --test netns nemesis -- --nocapture --test-threads=1
