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
SECS=${SECS:-20} SLOW_KIB=${SLOW_KIB:-128}
TRANSPORT=ssh; [ "${QUIC:-0}" = 1 ] && TRANSPORT=quic
# shellcheck source=benches/lib/bench-proxy.sh
source "$(dirname "$0")/lib/bench-proxy.sh"
proxy_start
# shellcheck disable=SC2086
"$BIN/postern-loadtest" --tunnel "127.0.0.1:$TUNNEL" --ca-dir ca --cluster bench --agents 1 --sessions 2 \
    --isolation --slow-kib-per-s "$SLOW_KIB" --duration "$SECS" --proxy-pid "$PID" $QUIC_FLAG
