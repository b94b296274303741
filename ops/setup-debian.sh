#!/usr/bin/env bash
# Installs what rewind needs to build and test on Debian 12, as root (or with
# sudo). Safe to run again: it only installs what is missing.
set -euo pipefail
# systemd: systemd-analyze checks the units in ops/systemd; util-linux: setpriv
# runs fio as nobody in the netns tests.
pkgs=(libclang-dev clang qemu-utils libnbd-bin nbdkit fio iproute2 procps python3 bc systemd util-linux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "ops/setup-debian.sh: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "ops/setup-debian.sh: cargo not found; install the Rust toolchain first (rustup)" >&2; exit 1; }
