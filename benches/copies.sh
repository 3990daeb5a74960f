#!/usr/bin/env bash
# Counts the bytes the proxy copies (memcpy/memmove) per payload byte it forwards, with
# valgrind's DHAT in copy mode: a proxy under DHAT, 16 echo streams of 4 MiB through it
# (64 MiB each way), then the copied total divided by the payload, grouped by call site.
# TRANSPORT=quic: the agent dials QUIC. CLIENT=quic: the clients log in over QUIC too (else SSH).
set -euo pipefail
export TRANSPORT=${TRANSPORT:-ssh} CLIENT=${CLIENT:-ssh}
QUIC_FLAG=""; [ "$TRANSPORT" = quic ] && QUIC_FLAG="--quic"
[ "$CLIENT" = quic ] && QUIC_FLAG="$QUIC_FLAG --client-quic"
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --locked -p postern-proxy -p postern-loadtest >&2
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
DIR=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
cd "$DIR"
"$BIN/postern-proxy" certs init --dir ca >/dev/null
"$BIN/postern-proxy" certs issue --ca ca/host_ca --kind proxy --principal 127.0.0.1 --out proxy/ssh_host_ed25519_key >/dev/null
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TUNNEL=$(port) OPS=$(port)
ALLOW_ROOT=false; [ "$(id -u)" = 0 ] && ALLOW_ROOT=true
cat > proxy.toml <<TOML
data_dir = "$DIR/proxy"
allow_root = $ALLOW_ROOT
[listen]
web = "127.0.0.1:$(port)"
tunnel = "127.0.0.1:$TUNNEL"
ops = "127.0.0.1:$OPS"
[[clusters]]
name = "copies"
host_ca = ["$(cat ca/host_ca.pub)"]
user_ca = ["$(cat ca/user_ca.pub)"]
policy = { source = "open" }
TOML
RUST_LOG=error valgrind --tool=dhat --mode=copy --dhat-out-file="$DIR/dhat.json" "$BIN/postern-proxy" --config proxy.toml > dhat.log 2>&1 &
PID=$!
for _ in $(seq 1 120); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$OPS))" 2>/dev/null && break; sleep 0.5; done
"$BIN/postern-loadtest" --tunnel "127.0.0.1:$TUNNEL" --ca-dir ca --cluster copies --agents 1 --sessions 1 \
    --concurrency 4 --streams 16 --bytes 4194304 --duration 300 $QUIC_FLAG 2>/dev/null | grep -E "streams ok|errors"
kill -TERM $PID; wait $PID 2>/dev/null || true
python3 - "$DIR/dhat.json" <<'PY'
import collections, json, re, sys
d = json.load(open(sys.argv[1])); ftbl = d["ftbl"]; payload = 2 * 16 * 4194304
by_site = collections.Counter()
for p in d["pps"]:
    key = "?"
    for f in (ftbl[i] for i in p["fs"][1:]):
        m = re.search(r": (.*?) \((.*?)\)$", f)
        if m and not any(x in m.group(2) for x in ["library/core", "library/alloc", "reader.rs", "writer.rs", "decode.rs", "encode.rs"]):
            key = f"{m.group(1)[:80]} ({m.group(2)[-40:]})"; break
    by_site[key] += p["tb"]
total = sum(by_site.values())
env = __import__('os').environ
print(f"agent transport {env.get('TRANSPORT', 'ssh')}, client transport {env.get('CLIENT', 'ssh')}: bytes copied per payload byte forwarded: {total / payload:.2f}")
for k, v in by_site.most_common(int(__import__("os").environ.get("COPIES_SITES", "6"))):
    print(f"  {v / payload:5.2f}  {k}")
PY
