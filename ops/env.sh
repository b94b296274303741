# Sourced by the ops scripts: one build profile, one target dir outside the
# checkout (a cache that survives fresh clones on the same machine).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/rewind-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
REWIND_BIN="$CARGO_TARGET_DIR/debug/rewind"
