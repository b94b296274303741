#!/usr/bin/env bash
# Installs the peers the benchmarks compare rewind with, from Debian 12's
# packages, as root (or with sudo): nats-server (JetStream), etcd-server,
# restic. Only what is missing is installed. The benchmarks never install
# anything themselves; they say which peer is missing and point here.
# The benchmarks start their own servers on 127.0.0.1 (free ports, their own
# data folders) and stop them; a packaged service that runs is left alone.
set -euo pipefail
pkgs=(nats-server etcd-server etcd-client restic)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
if [ ${#missing[@]} -gt 0 ]; then
  echo "ops/setup-peers.sh: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "ops/setup-peers.sh: $(nats-server --version 2>&1 | head -1); etcd $(etcd --version 2>&1 | head -1 | awk '{print $3}'); $(restic version 2>&1 | head -1)"
