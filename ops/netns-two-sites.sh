#!/usr/bin/env bash
# Two sites of separate hosts on one machine, joined by a WAN, for
# cross-site DR: each site is a site of `ops/netns-site.sh` (three node
# hosts on a bridge, its own CA and certificates); a router namespace
# between the two bridges forwards between them, and its two interfaces
# are the WAN link, where a cut, a rate cap and netem apply. Nothing in the
# root namespace forwards, and no sysctl outside the router's namespace
# changes.
#
#   ops/netns-two-sites.sh up --dir DIR [--bin PATH] [--raft-ms H,MIN,MAX]
#       Sites in DIR/a and DIR/b (each as netns-site.sh makes one), the
#       router, and a route on each node host to the other site. Also a
#       `--role peer` identity per site (DIR/a/peer.toml, DIR/b/peer.toml)
#       for `rewind dr link`; prints the command that links a group.
#   ops/netns-two-sites.sh cut --dir DIR        take the WAN down, both ways
#   ops/netns-two-sites.sh heal --dir DIR       bring it back up
#   ops/netns-two-sites.sh wan --dir DIR [--rate R] [--delay D] [--loss P] | --clear
#       Shape the WAN, the same each way: a rate cap with tc htb (e.g.
#       100mbit), and one-way delay and random loss with tc netem (e.g.
#       --delay 20ms --loss 0.1% makes a 40 ms round trip). Exits 3, saying
#       so, where the kernel has no netem (rate still applies).
#   ops/netns-two-sites.sh site --dir DIR a|b -- NETNS-SITE-ARGS...
#       Any netns-site.sh command on one site: add-host, exec, kill, ...
#   ops/netns-two-sites.sh down --dir DIR       both sites and the router
#
# Needs root (ip netns, veth, tc). Addresses: each site's 10.213.ID.0/24;
# the router is .253 on each.
set -euo pipefail

die() { echo "netns-two-sites: $*" >&2; exit 1; }
say() { echo "netns-two-sites: $*" >&2; }

SITE_SCRIPT="$(cd "$(dirname "$0")" && pwd)/netns-site.sh"
[ $# -ge 1 ] || { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
cmd=$1; shift
DIR=""; BIN=""; RAFT_MS=""; RATE=""; DELAY=""; LOSS=""; CLEAR=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --raft-ms) RAFT_MS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --delay) DELAY=$2; shift 2 ;;
    --loss) LOSS=$2; shift 2 ;;
    --clear) CLEAR=1; shift ;;
    --) shift; args+=("$@"); break ;;
    -*) die "unknown flag $1" ;;
    *) args+=("$1"); shift ;;
  esac
done
[ -n "$DIR" ] || die "--dir DIR is required"
[ "$(id -u)" = 0 ] || die "needs root (ip netns, veth, tc); run it as root"

STATE="$DIR/two-sites.env"
load() {
  [ -f "$STATE" ] || die "no two sites in $DIR (no $STATE); run: $0 up --dir $DIR"
  # shellcheck disable=SC1090
  . "$STATE"
}
site_id() { sed -n 's/^ID=//p' "$DIR/$1/netns.env"; }
site_nodes() { sed -n 's/^NODES=//p' "$DIR/$1/netns.env"; }
# The router's interface towards site a is `wa`, towards b `wb`.
wan_ifs() { echo wa wb; }

# Shapes one router interface's egress: htb for the rate, netem under it.
shape() {
  local dev=$1 spec=()
  tc -n "$ROUTER" qdisc del dev "$dev" root 2>/dev/null || true
  [ "$CLEAR" = 1 ] && return 0
  [ -n "$DELAY" ] && spec+=(delay "$DELAY")
  [ -n "$LOSS" ] && spec+=(loss "$LOSS")
  if [ -n "$RATE" ]; then
    tc -n "$ROUTER" qdisc add dev "$dev" root handle 1: htb default 10
    tc -n "$ROUTER" class add dev "$dev" parent 1: classid 1:10 htb rate "$RATE"
    if [ ${#spec[@]} -gt 0 ]; then
      tc -n "$ROUTER" qdisc add dev "$dev" parent 1:10 handle 10: netem "${spec[@]}" limit 100000 2>/dev/null || return 3
    else
      tc -n "$ROUTER" qdisc add dev "$dev" parent 1:10 handle 10: pfifo limit 256
    fi
  elif [ ${#spec[@]} -gt 0 ]; then
    tc -n "$ROUTER" qdisc add dev "$dev" root netem "${spec[@]}" limit 100000 2>/dev/null || return 3
  fi
}

case "$cmd" in
  up)
    [ ! -f "$STATE" ] || die "$DIR already holds two sites; run: $0 down --dir $DIR"
    mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
    up_args=()
    [ -n "$BIN" ] && up_args+=(--bin "$BIN")
    [ -n "$RAFT_MS" ] && up_args+=(--raft-ms "$RAFT_MS")
    for s in a b; do
      bash "$SITE_SCRIPT" up --dir "$DIR/$s" "${up_args[@]}" || { bash "$SITE_SCRIPT" down --dir "$DIR/a" 2>/dev/null || true; die "site $s did not come up"; }
    done
    IDA=$(site_id a); IDB=$(site_id b)
    ROUTER="rwr$IDA-$IDB"
    printf 'IDA=%s\nIDB=%s\nROUTER=%s\n' "$IDA" "$IDB" "$ROUTER" > "$STATE"
    ip netns add "$ROUTER"
    ip -n "$ROUTER" link set lo up
    for pair in "a $IDA wa" "b $IDB wb"; do
      read -r s id dev <<< "$pair"
      ip link add "rwr${id}x" type veth peer name "$dev" netns "$ROUTER"
      ip link set "rwr${id}x" master "rwb$id" up
      ip -n "$ROUTER" addr add "10.213.$id.253/24" dev "$dev"
      ip -n "$ROUTER" link set "$dev" up
    done
    ip netns exec "$ROUTER" sysctl -qw net.ipv4.ip_forward=1
    for i in $(seq 1 "$(site_nodes a)"); do ip -n "rw$IDA-n$i" route add "10.213.$IDB.0/24" via "10.213.$IDA.253"; done
    for i in $(seq 1 "$(site_nodes b)"); do ip -n "rw$IDB-n$i" route add "10.213.$IDA.0/24" via "10.213.$IDB.253"; done
    # A peer identity per site: what the other site's nodes present when
    # they pull (a `peer` certificate can do no more than that).
    REWIND_BIN=$(sed -n 's/^REWIND_BIN=//p' "$DIR/a/netns.env")
    REWIND_BIN=$(eval echo "$REWIND_BIN")
    for s in a b; do
      "$REWIND_BIN" certs --dir "$DIR/$s/pki" --name peer --role peer >/dev/null
      sed -e 's#pki/admin.pem#pki/peer.pem#' -e 's#pki/admin.key#pki/peer.key#' "$DIR/$s/client.toml" > "$DIR/$s/peer.toml"
    done
    say "up: site a at 10.213.$IDA.0/24, site b at 10.213.$IDB.0/24, WAN through namespace $ROUTER"
    say "link a group: rewind dr link GROUP --config $DIR/a/client.toml --remote-config $DIR/b/client.toml --peer-identity-there $DIR/b/peer.toml --peer-identity-here $DIR/a/peer.toml --name-here a --name-there b"
    ;;
  cut)
    load
    for dev in $(wan_ifs); do ip -n "$ROUTER" link set "$dev" down; done
    say "WAN cut"
    ;;
  heal)
    load
    for dev in $(wan_ifs); do ip -n "$ROUTER" link set "$dev" up; done
    say "WAN up"
    ;;
  wan)
    load
    command -v tc >/dev/null || die "needs tc (apt-get install -y iproute2)"
    [ "$CLEAR" = 1 ] || [ -n "$RATE$DELAY$LOSS" ] || die "wan needs --rate, --delay and/or --loss, or --clear"
    status=0
    for dev in $(wan_ifs); do shape "$dev" || status=$?; done
    if [ "$status" = 3 ]; then
      # netem failed: keep the rate alone, and say why.
      DELAY=""; LOSS=""
      for dev in $(wan_ifs); do shape "$dev"; done
      echo "netns-two-sites: this kernel has no netem qdisc (sch_netem not built in, and modules cannot load): delay and random loss cannot be emulated here${RATE:+; the rate cap $RATE applies}" >&2
      exit 3
    fi
    if [ "$CLEAR" = 1 ]; then say "WAN shaping cleared"; else say "WAN each way: rate ${RATE:-uncapped}, delay ${DELAY:-0}, loss ${LOSS:-0}"; fi
    ;;
  site)
    load
    [ ${#args[@]} -ge 2 ] || die "site takes a|b -- NETNS-SITE-ARGS..."
    s=${args[0]}; [ "$s" = a ] || [ "$s" = b ] || die "site is a or b, not $s"
    sub=${args[1]}
    exec bash "$SITE_SCRIPT" "$sub" --dir "$DIR/$s" "${args[@]:2}"
    ;;
  down)
    if [ -f "$STATE" ]; then
      load
      ip netns del "$ROUTER" 2>/dev/null || true
      rm -f "$STATE"
    fi
    for s in a b; do [ -d "$DIR/$s" ] && bash "$SITE_SCRIPT" down --dir "$DIR/$s" || true; done
    say "down (data and logs stay in $DIR)"
    ;;
  *) die "unknown command $cmd (up, cut, heal, wan, site, down)" ;;
esac
