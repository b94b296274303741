#!/usr/bin/env bash
# A site of separate hosts on one machine: each host is a network namespace
# with its own address, joined to the others by a veth pair on a bridge.
# Each node host runs one `rewind node` from an ordinary config file, made
# the way the README's "Deploy on three hosts" makes it (rewind certs, a
# node.toml per host, rewind cluster init); nothing of `rewind dev` is used.
#
#   ops/netns-site.sh up --dir DIR [--nodes N] [--bin PATH] [--raft-ms H,MIN,MAX]
#       Build N hosts (default 3), start a node on each, init the site.
#       Writes DIR/client.toml (an admin's config that reaches the site
#       from the root namespace), DIR/pki (the CA and certificates),
#       DIR/nK/node.toml, DIR/nK/node.log, DIR/netns.env.
#   ops/netns-site.sh add-host --dir DIR NAME
#       One more host with no node (for a tap, a replay, a client); prints
#       its address.
#   ops/netns-site.sh exec --dir DIR HOST -- COMMAND...
#       Run a command inside a host's namespace (HOST: n1, n2, ... or NAME).
#   ops/netns-site.sh addr --dir DIR HOST       print a host's address
#   ops/netns-site.sh partition --dir DIR GROUP GROUP...
#       Cut the network between groups of hosts, e.g. `n1 n2,n3` isolates n1;
#       hosts within a group still talk. The root namespace (clients) still
#       reaches every host.
#   ops/netns-site.sh one-way --dir DIR FROM TO
#       Drop every packet FROM sends to TO (TO's packets still arrive).
#   ops/netns-site.sh heal --dir DIR            undo every partition and one-way cut
#   ops/netns-site.sh netem --dir DIR [--host H] (--delay D [--jitter J] [--loss P] | --clear)
#       tc netem on the host's link (default: every host), egress, e.g.
#       --delay 0.5ms on each host makes a 1 ms round trip between hosts.
#   ops/netns-site.sh rate --dir DIR [--host H] BANDWIDTH|off
#       Limit the host's egress (tc htb), e.g. 100mbit.
#   ops/netns-site.sh kill|stop|cont|start --dir DIR nK
#       SIGKILL, SIGSTOP, SIGCONT a node, or start it again.
#   ops/netns-site.sh down --dir DIR            stop the nodes, remove hosts and bridge
#
# Needs root (ip netns, veth, tc). Addresses: 10.213.ID.0/24, where ID is
# picked free at `up` and kept in DIR/netns.env; the root namespace is .254.
set -euo pipefail

die() { echo "netns-site: $*" >&2; exit 1; }
say() { echo "netns-site: $*" >&2; }

[ $# -ge 1 ] || { sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
cmd=$1; shift
DIR=""; NODES=3; BIN=""; HOST=""; DELAY=""; JITTER=""; LOSS=""; CLEAR=0; RAFT_MS=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --delay) DELAY=$2; shift 2 ;;
    --jitter) JITTER=$2; shift 2 ;;
    --loss) LOSS=$2; shift 2 ;;
    --clear) CLEAR=1; shift ;;
    --raft-ms) RAFT_MS=$2; shift 2 ;;
    --) shift; args+=("$@"); break ;;
    -*) die "unknown flag $1" ;;
    *) args+=("$1"); shift ;;
  esac
done
[ -n "$DIR" ] || die "--dir DIR is required"
[ "$(id -u)" = 0 ] || die "needs root (ip netns, veth, tc); run it as root"
command -v ip >/dev/null || die "needs iproute2's ip (apt-get install -y iproute2)"

STATE="$DIR/netns.env"
load() {
  [ -f "$STATE" ] || die "no site in $DIR (no $STATE); run: $0 up --dir $DIR"
  # shellcheck disable=SC1090
  . "$STATE"
}
ns() { echo "rw${ID}-$1"; }
host_ip() {
  local h=$1 i
  case "$h" in
    n[0-9]*) i=${h#n} ;;
    *) i=$(sed -n "s/^HOST_$h=//p" "$DIR/hosts" 2>/dev/null | head -1); [ -n "$i" ] || die "no host $h in $DIR" ;;
  esac
  echo "10.213.$ID.$i"
}
all_hosts() { for i in $(seq 1 "$NODES"); do echo "n$i"; done; sed -n 's/^HOST_\([^=]*\)=.*/\1/p' "$DIR/hosts" 2>/dev/null || true; }

make_host() {
  local name=$1 index=$2 n veth
  n=$(ns "$name"); veth="rw${ID}h${index}"
  ip netns add "$n"
  ip link add "$veth" type veth peer name eth0 netns "$n"
  ip link set "$veth" master "rwb$ID" up
  ip -n "$n" addr add "10.213.$ID.$index/24" dev eth0
  ip -n "$n" link set eth0 up
  ip -n "$n" link set lo up
}

find_bin() {
  if [ -n "$BIN" ]; then echo "$BIN"; return; fi
  if command -v rewind >/dev/null; then command -v rewind; return; fi
  local t=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/debug/rewind
  [ -x "$t" ] || die "no rewind binary: give --bin PATH or build it (cargo build -p rewind-node)"
  echo "$t"
}

start_node() {
  local i=$1 n log
  n=$(ns "n$i"); log="$DIR/n$i/node.log"
  # setsid: the node is its own session, so the caller's signals and
  # terminal do not reach it; it is stopped through its pid file.
  ip netns exec "$n" setsid "$REWIND_BIN" node --config "$DIR/n$i/node.toml" >>"$log" 2>&1 < /dev/null &
  echo $! > "$DIR/n$i/pid"
}

node_pid() { cat "$DIR/$1/pid" 2>/dev/null || die "no pid file for $1"; }
# Running: the process exists and is not a zombie waiting to be reaped.
running() { local st; st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }
netem_works() {
  # The kernel must have sch_netem; some (a microVM's, built without it and
  # without modules) do not.
  local n; n=$(ns "$1")
  if tc -n "$n" qdisc replace dev eth0 root netem delay 0ms 2>/dev/null; then
    tc -n "$n" qdisc del dev eth0 root 2>/dev/null || true
    return 0
  fi
  return 1
}

case "$cmd" in
  up)
    [ ! -f "$DIR/netns.env" ] || die "$DIR already holds a site; run: $0 down --dir $DIR"
    [[ "$NODES" =~ ^[1-7]$ ]] || die "--nodes must be from 1 to 7"
    REWIND_BIN=$(find_bin)
    mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
    ID=""
    for c in $(seq 1 250); do
      if ! ip link show "rwb$c" >/dev/null 2>&1 && ! ip netns list | grep -q "^rw$c-"; then ID=$c; break; fi
    done
    [ -n "$ID" ] || die "no free site id (250 sites up?)"
    printf 'ID=%s\nNODES=%s\nREWIND_BIN=%q\n' "$ID" "$NODES" "$REWIND_BIN" > "$STATE"
    : > "$DIR/hosts"
    say "site $ID: bridge rwb$ID, 10.213.$ID.0/24, $NODES node hosts"
    ip link add "rwb$ID" type bridge
    ip addr add "10.213.$ID.254/24" dev "rwb$ID"
    ip link set "rwb$ID" up
    for i in $(seq 1 "$NODES"); do make_host "n$i" "$i"; done

    # The README's deployment steps, one host at a time: a certificate
    # naming the host's address, a node.toml, the node.
    pki="$DIR/pki"
    "$REWIND_BIN" certs --dir "$pki" --name admin --role admin --san "10.213.$ID.254" >/dev/null
    hb=100; emin=500; emax=1000
    if [ -n "$RAFT_MS" ]; then IFS=, read -r hb emin emax <<< "$RAFT_MS"; fi
    nodes_toml=""
    for i in $(seq 1 "$NODES"); do
      ip_i="10.213.$ID.$i"
      mkdir -p "$DIR/n$i"
      "$REWIND_BIN" certs --dir "$pki" --name "node-$i" --role node --san "$ip_i" >/dev/null
      cat > "$DIR/n$i/node.toml" <<EOF
id = $i
listen = "$ip_i:7101"
advertise = "$ip_i:7101"
data_dir = "data"
metrics_listen = "$ip_i:9101"

[tls]
ca = "../pki/ca.pem"
cert = "../pki/node-$i.pem"
key = "../pki/node-$i.key"

[raft]
heartbeat_ms = $hb
election_timeout_min_ms = $emin
election_timeout_max_ms = $emax
EOF
      nodes_toml+=$'\n'"[[nodes]]"$'\n'"id = $i"$'\n'"addr = \"$ip_i:7101\""$'\n'
      start_node "$i"
    done
    cat > "$DIR/client.toml" <<EOF
$nodes_toml
[tls]
ca = "pki/ca.pem"
cert = "pki/admin.pem"
key = "pki/admin.key"
EOF
    # Wait for every node to answer, then form the site.
    for _ in $(seq 1 100); do
      if "$REWIND_BIN" status --config "$DIR/client.toml" >/dev/null 2>&1; then break; fi
      sleep 0.2
    done
    up=0
    for _ in $(seq 1 100); do
      up=$("$REWIND_BIN" status --json --config "$DIR/client.toml" 2>/dev/null | grep -o '"up": *true' | wc -l || true)
      [ "$up" -ge "$NODES" ] && break
      sleep 0.2
    done
    [ "$up" -ge "$NODES" ] || { tail -n 5 "$DIR"/n*/node.log >&2; die "only $up of $NODES nodes answer"; }
    "$REWIND_BIN" cluster init --config "$DIR/client.toml" >&2
    say "up: $NODES nodes at 10.213.$ID.1-$NODES:7101; client config $DIR/client.toml"
    ;;
  add-host)
    load
    [ ${#args[@]} -eq 1 ] || die "add-host takes one NAME"
    name=${args[0]}
    [[ "$name" =~ ^[a-z][a-z0-9]{0,7}$ ]] && [[ ! "$name" =~ ^n[0-9]+$ ]] || die "host name $name: 1-8 of a-z 0-9, starting with a letter, not nK"
    ! grep -q "^HOST_$name=" "$DIR/hosts" || die "host $name exists"
    index=$((100 + $(wc -l < "$DIR/hosts")))
    [ "$index" -le 200 ] || die "too many extra hosts"
    echo "HOST_$name=$index" >> "$DIR/hosts"
    make_host "$name" "$index"
    echo "10.213.$ID.$index"
    ;;
  addr)
    load; [ ${#args[@]} -eq 1 ] || die "addr takes one HOST"; host_ip "${args[0]}" ;;
  exec)
    load
    [ ${#args[@]} -ge 2 ] || die "exec takes HOST -- COMMAND..."
    h=${args[0]}; host_ip "$h" >/dev/null
    exec ip netns exec "$(ns "$h")" "${args[@]:1}"
    ;;
  partition)
    load
    [ ${#args[@]} -ge 2 ] || die "partition takes two or more groups of hosts, e.g. n1 n2,n3"
    for g in "${args[@]}"; do
      for h in ${g//,/ }; do
        for other in "${args[@]}"; do
          [ "$other" = "$g" ] && continue
          for o in ${other//,/ }; do
            ip -n "$(ns "$h")" route replace blackhole "$(host_ip "$o")/32"
          done
        done
      done
    done
    say "partitioned: ${args[*]}"
    ;;
  one-way)
    load
    [ ${#args[@]} -eq 2 ] || die "one-way takes FROM TO"
    ip -n "$(ns "${args[0]}")" route replace blackhole "$(host_ip "${args[1]}")/32"
    say "one-way: ${args[0]} -> ${args[1]} dropped"
    ;;
  heal)
    load
    for h in $(all_hosts); do
      ip -n "$(ns "$h")" route show type blackhole 2>/dev/null | awk '{print $2}' | while read -r dst; do
        ip -n "$(ns "$h")" route del blackhole "$dst" || true
      done
    done
    say "healed"
    ;;
  netem)
    load
    command -v tc >/dev/null || die "needs tc (apt-get install -y iproute2)"
    targets=$HOST; [ -n "$targets" ] || targets=$(all_hosts)
    first=$(echo $targets | cut -d' ' -f1)
    if [ "$CLEAR" != 1 ] && ! netem_works "$first"; then
      echo "netns-site: this kernel has no netem qdisc (sch_netem not built in, and modules cannot load): delay and random loss cannot be emulated here; partition, one-way and rate still work" >&2
      exit 3
    fi
    for h in $targets; do
      if [ "$CLEAR" = 1 ]; then
        tc -n "$(ns "$h")" qdisc del dev eth0 root 2>/dev/null || true
      else
        [ -n "$DELAY$LOSS" ] || die "netem needs --delay and/or --loss, or --clear"
        spec=()
        [ -n "$DELAY" ] && spec+=(delay "$DELAY") && [ -n "$JITTER" ] && spec+=("$JITTER")
        [ -n "$LOSS" ] && spec+=(loss "$LOSS")
        [ -n "$DELAY" ] || spec=(delay 0ms "${spec[@]}")
        tc -n "$(ns "$h")" qdisc replace dev eth0 root netem "${spec[@]}" limit 100000
      fi
    done
    say "netem ${CLEAR:+}$([ "$CLEAR" = 1 ] && echo cleared || echo "delay=${DELAY:-0} jitter=${JITTER:-0} loss=${LOSS:-0}") on: $(echo $targets)"
    ;;
  rate)
    load
    [ ${#args[@]} -eq 1 ] || die "rate takes one bandwidth (e.g. 100mbit), or 'off'"
    targets=$HOST; [ -n "$targets" ] || targets=$(all_hosts)
    for h in $targets; do
      tc -n "$(ns "$h")" qdisc del dev eth0 root 2>/dev/null || true
      if [ "${args[0]}" != off ]; then
        tc -n "$(ns "$h")" qdisc add dev eth0 root handle 1: htb default 10
        tc -n "$(ns "$h")" class add dev eth0 parent 1: classid 1:10 htb rate "${args[0]}" 2>/dev/null
        # A short queue: a thin link drops what it cannot carry rather than
        # holding seconds of packets (the interface's 1000 would).
        tc -n "$(ns "$h")" qdisc add dev eth0 parent 1:10 handle 10: pfifo limit 64
      fi
    done
    say "rate ${args[0]} on: $(echo $targets)"
    ;;
  kill|stop|cont)
    load
    [ ${#args[@]} -eq 1 ] || die "$cmd takes one node host (nK)"
    sig=KILL; [ "$cmd" = stop ] && sig=STOP; [ "$cmd" = cont ] && sig=CONT
    p=$(node_pid "${args[0]}")
    running "$p" || die "node ${args[0]} is not running"
    kill -s "$sig" "$p"
    if [ "$sig" = KILL ]; then
      for _ in $(seq 1 100); do running "$p" || break; sleep 0.05; done
    fi
    ;;
  start)
    load
    [ ${#args[@]} -eq 1 ] || die "start takes one node host (nK)"
    h=${args[0]}; i=${h#n}
    [ -f "$DIR/$h/node.toml" ] || die "no node $h"
    if running "$(node_pid "$h")"; then die "node $h is running"; fi
    start_node "$i"
    ;;
  down)
    [ -f "$STATE" ] || { say "no site in $DIR"; exit 0; }
    load
    for i in $(seq 1 "$NODES"); do
      p=$(cat "$DIR/n$i/pid" 2>/dev/null || true)
      [ -n "$p" ] && kill -CONT "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 50); do
      alive=0
      for i in $(seq 1 "$NODES"); do p=$(cat "$DIR/n$i/pid" 2>/dev/null || true); [ -n "$p" ] && kill -0 "$p" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break
      sleep 0.2
    done
    for i in $(seq 1 "$NODES"); do p=$(cat "$DIR/n$i/pid" 2>/dev/null || true); [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true; done
    for h in $(all_hosts); do ip netns del "$(ns "$h")" 2>/dev/null || true; done
    ip link del "rwb$ID" 2>/dev/null || true
    rm -f "$STATE"
    say "down: site $ID removed (data and logs stay in $DIR)"
    ;;
  *) die "unknown command $cmd (up, add-host, addr, exec, partition, one-way, heal, netem, rate, kill, stop, cont, start, down)" ;;
esac
