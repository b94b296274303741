#!/usr/bin/env bash
# The main job on the embedded default, narrated and timed:
#   a local 3-node site; a consistency group; `rewind tap` serving its disk
#   over NBD; qemu-io writing phase 1 through the tap; a reference copy of
#   the disk at that point; fio writing phase 2 while the leader is killed
#   with SIGKILL; the node restarted; every replica holding the same log;
#   a bookmark and a timestamp at the end of phase 1; replays of the disk to
#   that point by bookmark, by time and by LSN (each from another node),
#   compared with the reference; a replay of the latest point from the node
#   that was killed, compared with the live disk.
# Not built yet (see README): NBD exports of a past point (--serve).
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/env.sh
T0=$(date +%s.%N); step_start=$T0
say() { printf '\n== %s\n' "$*"; }
took() { local now; now=$(date +%s.%N); printf '   (%.1f s)\n' "$(echo "$now - $step_start" | bc)"; step_start=$now; }
json() { "$REWIND_BIN" status --json | python3 -c "import json,sys; d=json.load(sys.stdin); $1"; }

say "setup: system packages and build (the first build compiles RocksDB: 15-25 minutes)"
bash ops/setup-debian.sh
cargo build -p rewind-node --quiet
took

DIR=$(mktemp -d /tmp/rewind-demo.XXXXXX)
cleanup() {
  [ -n "${TAP_PID:-}" ] && kill "$TAP_PID" 2>/dev/null || true
  "$REWIND_BIN" dev down --dir "$DIR" >/dev/null 2>&1 || true
}
trap cleanup EXIT
say "start a local 3-node site in $DIR"
"$REWIND_BIN" dev up --dir "$DIR"
export REWIND_CONFIG="$DIR/client.toml"
took

say "create consistency group 'vm1' with a 256 MiB disk; serve it through the tap"
"$REWIND_BIN" group create vm1 --disk disk0:256M
"$REWIND_BIN" tap --group vm1 --disk disk0 --backing "$DIR/disk0.raw" --listen 127.0.0.1:0 > "$DIR/tap.out" 2> "$DIR/tap.log" &
TAP_PID=$!
for _ in $(seq 1 100); do grep -q "nbd://" "$DIR/tap.out" 2>/dev/null && break; sleep 0.1; done
URI=$(grep -o 'nbd://[^ ]*' "$DIR/tap.out")
echo "   $(cat "$DIR/tap.out")"
took

say "phase 1: qemu-io writes through the tap (patterns, zeroes, a discard, FUA, flush)"
qemu-io -f raw "$URI" -c "write -P 0x11 0 32M" -c "write -P 0x22 1M 4M" -c "write -z 8M 2M" \
  -c "discard 16M 1M" -c "write -P 0x33 -f 100M 8M" -c "flush" | grep -E "^wrote|^discard" | sed 's/^/   /'
LSN1=$("$REWIND_BIN" points vm1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["window"]["last_lsn"])')
cp --sparse=always "$DIR/disk0.raw" "$DIR/reference-phase1.raw"
T1=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
"$REWIND_BIN" bookmark vm1 end-of-phase-1 --app-consistent | sed 's/^/   /'
echo "   phase 1 ends at LSN $LSN1, time $T1; reference copy of the disk saved"
took

leader_pid=$(json 'print(next(n["pid"] for n in d["nodes"] if n.get("role")=="leader"))')
leader_id=$(json 'print(next(n["id"] for n in d["nodes"] if n.get("role")=="leader"))')
say "phase 2: fio random 4 KiB writes through the tap; the leader (node $leader_id) is killed with SIGKILL after 1 s"
fio --name=phase2 --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --size=256M --io_size=96M \
  --iodepth=16 --randseed=7 --refill_buffers=1 --output-format=normal > "$DIR/fio.out" 2>&1 &
FIO_PID=$!
sleep 1
kill -9 "$leader_pid"
echo "   killed node $leader_id"
if ! wait "$FIO_PID"; then
  cat "$DIR/fio.out"; echo "FAILED: fio saw an I/O error" >&2; exit 1
fi
grep -E "^\s+write:|err=" "$DIR/fio.out" | sed 's/^ */   /'
took

say "restart node $leader_id; wait until all three replicas hold the same log"
"$REWIND_BIN" dev start-node "$leader_id" --dir "$DIR"
LSN2=0
for _ in $(seq 1 600); do
  state=$(json '
g=[(x["last_lsn"],x["digest"]) for n in d["nodes"] if n.get("up") for x in (n.get("groups") or []) if x["name"]=="vm1"]
print("%d %s" % (g[0][0] if g else 0, "yes" if len(g)==3 and len(set(g))==1 else "no"))')
  LSN2=${state% *}
  [ "${state#* }" = yes ] && break
  sleep 0.2
done
[ "${state#* }" = yes ] || { echo "FAILED: the replicas do not agree" >&2; "$REWIND_BIN" status; exit 1; }
"$REWIND_BIN" status
took

say "what can be replayed"
"$REWIND_BIN" points vm1 | sed 's/^/   /'
took

say "replay disk0 to the end of phase 1 by bookmark, by time and by LSN, each from another node; compare with the reference copy"
node=1
for target in "--at-bookmark end-of-phase-1" "--at-time $T1" "--at $LSN1"; do
  # shellcheck disable=SC2086
  "$REWIND_BIN" replay vm1 --disk disk0 $target --node "$node" --out "$DIR/replay-phase1.raw" --force | sed 's/^/   /'
  qemu-img compare -f raw -F raw "$DIR/replay-phase1.raw" "$DIR/reference-phase1.raw" | sed 's/^/   /'
  node=$((node % 3 + 1))
done
took

say "replay disk0 at the latest LSN ($LSN2) from node $leader_id (the one that was killed) and compare with the live disk"
"$REWIND_BIN" replay vm1 --disk disk0 --latest --node "$leader_id" --out "$DIR/replay-latest.raw" | sed 's/^/   /'
qemu-img compare -f raw -F raw "$DIR/replay-latest.raw" "$DIR/disk0.raw" | sed 's/^/   /'
took

kill "$TAP_PID"; TAP_PID=""
"$REWIND_BIN" dev down --dir "$DIR" >/dev/null
trap - EXIT
rm -rf "$DIR"
printf '\nchecked: every write of qemu-io and fio was journaled in order on all three replicas through a leader crash;\n'
printf 'replays to the end of phase 1 (LSN %s) by bookmark, time and LSN equal the disk as it was then, and the latest replay equals the disk now. (%.0f s in all)\n' "$LSN1" "$(echo "$(date +%s.%N) - $T0" | bc)"
