#!/usr/bin/env bash
# One slow client must not stall the others (loopback only, release binaries): client B pings a
# 64-byte echo at 10 Hz, alone and then while client A downloads through the same tunnel at
# SLOW_KIB (default 128) KiB/s; prints B's p50/p99 in both phases and their ratio.
# The figure itself is postern_benches::isolation; benches/compare.sh prints it too, for the agent
# on SSH and on QUIC, in the same run as the throughput table. This script runs it alone against
# a proxy of its own, through postern-loadtest --isolation (its agent in-process).
#   benches/isolation.sh                 # 20 s per phase, agent on SSH
#   SECS=5 QUIC=1 benches/isolation.sh   # agent on QUIC
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-20} SLOW_KIB=${SLOW_KIB:-128}
TRANSPORT=(); [ "${QUIC:-0}" = 1 ] && TRANSPORT=(--quic)
cargo build --release --locked -p postern-proxy -p postern-loadtest >&2
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
DIR=$(mktemp -d)
PID=""
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$DIR"' EXIT
cd "$DIR"
"$BIN/postern-proxy" certs init --dir ca >/dev/null
"$BIN/postern-proxy" certs issue --ca ca/host_ca --kind proxy --principal 127.0.0.1 --out proxy/ssh_host_ed25519_key >/dev/null
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TUNNEL=$(port)
ALLOW_ROOT=false; [ "$(id -u)" = 0 ] && ALLOW_ROOT=true
cat > proxy.toml <<TOML
data_dir = "$DIR/proxy"
allow_root = $ALLOW_ROOT
[listen]
web = "127.0.0.1:$(port)"
tunnel = "127.0.0.1:$TUNNEL"
ops = "127.0.0.1:$(port)"
[[clusters]]
name = "iso"
host_ca = ["$(cat ca/host_ca.pub)"]
user_ca = ["$(cat ca/user_ca.pub)"]
# No Auth server here: every user of the cluster may reach every target.
policy = { source = "open" }
TOML
RUST_LOG=error "$BIN/postern-proxy" --config proxy.toml > proxy.log 2>&1 &
PID=$!
sleep 1
"$BIN/postern-loadtest" --tunnel "127.0.0.1:$TUNNEL" --ca-dir ca --cluster iso --agents 1 --sessions 2 \
    --isolation --slow-kib-per-s "$SLOW_KIB" --duration "$SECS" --proxy-pid "$PID" "${TRANSPORT[@]}"
