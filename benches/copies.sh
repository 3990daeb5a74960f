#!/usr/bin/env bash
# Counts the bytes the proxy copies (memcpy/memmove) per payload byte it forwards, with
# valgrind's DHAT in copy mode: a proxy under DHAT, 16 echo streams of 4 MiB through it
# (64 MiB each way), then the copied total divided by the payload, grouped by call site.
# TRANSPORT=quic: the agent dials QUIC. CLIENT=quic: the clients log in over QUIC too (else SSH).
set -euo pipefail
# shellcheck source=benches/lib/bench-proxy.sh
source "$(dirname "$0")/lib/bench-proxy.sh"
VALGRIND_ARGS="--tool=dhat --mode=copy --dhat-out-file=$DIR/dhat.json"
proxy_start
# shellcheck disable=SC2086
"$BIN/postern-loadtest" --tunnel "127.0.0.1:$TUNNEL" --ca-dir ca --cluster bench --agents 1 --sessions 1 \
    --concurrency 4 --streams 16 --bytes 4194304 --duration 300 $QUIC_FLAG 2>/dev/null | grep -E "streams ok|errors"
proxy_stop
python3 - "$DIR/dhat.json" "$LIB" <<'PY'
import collections, json, sys
sys.path.insert(0, sys.argv[2]); from dhat_sites import site
d = json.load(open(sys.argv[1])); ftbl = d["ftbl"]; payload = 2 * 16 * 4194304
by_site = collections.Counter()
for p in d["pps"]:
    by_site[site(p, ftbl)] += p["tb"]
total = sum(by_site.values())
env = __import__('os').environ
print(f"agent transport {env.get('TRANSPORT', 'ssh')}, client transport {env.get('CLIENT', 'ssh')}: bytes copied per payload byte forwarded: {total / payload:.2f}")
for k, v in by_site.most_common(int(__import__("os").environ.get("COPIES_SITES", "6"))):
    print(f"  {v / payload:5.2f}  {k}")
PY
