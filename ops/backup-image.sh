#!/usr/bin/env bash
# One backup of a qcow2 image into a rewind group, with dirty-bitmap
# rotation: the first run adds bitmap rewind-1 and takes a full backup;
# each later run adds the next bitmap, backs up the changes recorded in the
# previous one (`rewind backup --bitmap`), and removes it once the backup
# is committed. Run it from a timer (ops/systemd/rewind-backup@.timer).
#
#   ops/backup-image.sh --image /srv/vm1.qcow2 --group vm1 --disk disk0 \
#       [--config /etc/rewind/backup-vm1.toml] [--state /var/lib/rewind-backup]
#
# The image must not be open read-write elsewhere (a stopped VM, or one
# whose disk is a snapshot): qemu-img edits its bitmaps. For a running VM,
# rotate bitmaps over QMP (block-dirty-bitmap-add / -remove) and point
# `rewind backup --from` at QEMU's own NBD export with the bitmap instead.
#
# Safe to rerun at any point: a cut-off backup is resumed (--resume); a
# failed run keeps the previous bitmap, which still records every change
# since the last committed backup; a bitmap qemu refuses as inconsistent
# (qemu-nbd killed, host crash) falls back to reading every allocated
# extent, sending only the blocks that differ (--fallback-full).
#
# Exit status: rewind backup's (0 committed, 1 failed, 3 no usable bitmap
# and no fallback, 4 cut off: rerun), or 2 for bad usage.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
die() { echo "backup-image: $*" >&2; exit 1; }

image= group= disk= config= state=/var/lib/rewind-backup rewind=${REWIND:-rewind}
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image=$2; shift 2 ;;
    --group) group=$2; shift 2 ;;
    --disk) disk=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --state) state=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "backup-image: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$image" ] && [ -n "$group" ] && [ -n "$disk" ] || usage
[ -f "$image" ] || die "no image at $image"
for tool in qemu-img qemu-nbd "$rewind"; do
  command -v "$tool" >/dev/null || die "needs $tool (apt-get install -y qemu-utils)"
done
config_args=()
[ -n "$config" ] && config_args=(--config "$config")

dir="$state/$group-$disk"
mkdir -p -m 0700 "$dir"
exec 9>"$dir/lock"
flock -n 9 || die "another backup of $group/$disk is running"
current_file="$dir/bitmap"

run_dir=$(mktemp -d)
nbd_pid=
cleanup() {
  if [ -n "$nbd_pid" ]; then kill "$nbd_pid" 2>/dev/null || true; fi
  rm -rf "$run_dir"
}
trap cleanup EXIT

# Serves the image read-only on a socket (with bitmap $1 if given).
serve() {
  local sock="$run_dir/nbd.sock" pidf="$run_dir/nbd.pid"
  rm -f "$sock" "$pidf"
  qemu-nbd --read-only -f qcow2 --persistent --fork --pid-file "$pidf" -k "$sock" ${1:+-B "$1"} "$image" || return 1
  nbd_pid=$(cat "$pidf")
  uri="nbd+unix:///?socket=$sock"
}

stop_serving() {
  if [ -n "$nbd_pid" ]; then
    kill "$nbd_pid" 2>/dev/null || true
    while kill -0 "$nbd_pid" 2>/dev/null; do sleep 0.1; done
    nbd_pid=
  fi
}

has_bitmap() { qemu-img info --output=json "$image" | grep -q "\"name\": \"$1\""; }

if [ ! -s "$current_file" ]; then
  # First run: start recording, then take the full backup.
  has_bitmap rewind-1 || qemu-img bitmap --add "$image" rewind-1
  serve "" || die "qemu-nbd could not serve $image"
  "$rewind" backup "${config_args[@]}" --group "$group" --disk "$disk" --from "$uri" --full --resume
  stop_serving
  echo rewind-1 > "$current_file"
  exit 0
fi

prev=$(cat "$current_file")
n=${prev#rewind-}
next="rewind-$((n + 1))"
has_bitmap "$next" || qemu-img bitmap --add "$image" "$next"
if serve "$prev"; then
  status=0
  "$rewind" backup "${config_args[@]}" --group "$group" --disk "$disk" --from "$uri" --bitmap "$prev" --resume || status=$?
else
  # qemu-nbd refuses an inconsistent bitmap: read everything instead.
  echo "backup-image: qemu-nbd refused bitmap $prev; reading every allocated extent" >&2
  serve "" || die "qemu-nbd could not serve $image"
  status=0
  "$rewind" backup "${config_args[@]}" --group "$group" --disk "$disk" --from "$uri" --bitmap "$prev" --fallback-full --resume || status=$?
fi
stop_serving
if [ "$status" -ne 0 ]; then
  # Keep $prev (it still holds every change since the last backup); the
  # next run adds $next again if it went.
  qemu-img bitmap --remove "$image" "$next" 2>/dev/null || true
  exit "$status"
fi
qemu-img bitmap --remove "$image" "$prev"
echo "$next" > "$current_file"
