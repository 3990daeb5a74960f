#!/usr/bin/env bash
# The proxy's heap held by one fully stalled stream, counted by valgrind's massif rather than read
# off the RSS (which also keeps what the allocator holds after a free). Two runs of a proxy under
# massif, each with one agent and one client session and one stream: in the first the stream's
# service writes nothing; in the second it writes as fast as it is let to a client that never
# reads. After SETTLE_SECS (15) seconds (every window on the way full long before), a massif
# snapshot of each; the stream's heap is the difference.
# TRANSPORT=quic: the agent dials QUIC. CLIENT=quic: the client logs in over QUIC too.
set -euo pipefail
# shellcheck source=benches/lib/bench-proxy.sh
source "$(dirname "$0")/lib/bench-proxy.sh"
SETTLE=${SETTLE_SECS:-15}
for mib in 0 256; do
    VALGRIND_ARGS="--tool=massif --vgdb=yes --massif-out-file=$DIR/massif-$mib.out"
    proxy_start
    # shellcheck disable=SC2086
    "$BIN/postern-loadtest" --tunnel "127.0.0.1:$TUNNEL" --ca-dir ca --cluster bench --agents 1 --sessions 1 \
        --slow-consumer-mib "$mib" --duration "$((SETTLE + 10))" --proxy-pid "$PID" $QUIC_FLAG >"$DIR/load-$mib.log" 2>&1 &
    LOAD=$!
    # The load tool's set-up (agent login, client login) takes a few seconds under valgrind.
    sleep "$((SETTLE + 5))"
    vgdb --pid="$PID" detailed_snapshot "$DIR/snap-$mib.txt" >/dev/null
    wait $LOAD
    grep -E "slow consumer" "$DIR/load-$mib.log" | sed 's/; proxy RSS.*//'
    proxy_stop
done
python3 - "$DIR/snap-0.txt" "$DIR/snap-256.txt" "$LIB" <<'PY'
import os, sys
sys.path.insert(0, sys.argv[3]); from massif_sites import heap, difference
(b, bx), (s, sx) = heap(sys.argv[1]), heap(sys.argv[2])
mib = lambda v: f"{v / 1048576:.2f} MiB"
print(f"agent transport {os.environ['TRANSPORT']}, client transport {os.environ['CLIENT']}: proxy heap "
      f"{mib(b)} with an idle stream, {mib(s)} with a stalled one: the stalled stream holds {mib(s - b)} "
      f"(the allocator's own overhead: {mib(bx)} and {mib(sx)})")
for site, v in difference(sys.argv[1], sys.argv[2])[: int(os.environ.get("HEAP_SITES", "5"))]:
    print(f"  {mib(v):>10}  {site}")
PY
