# shellcheck shell=bash
# Sourced by benches/copies.sh, stalled-heap.sh and isolation.sh: builds the proxy and the load
# tool, makes a CA and a proxy config (cluster `bench`, open policy: no Auth server here) in a
# temporary directory. `proxy_start` then starts the proxy, under valgrind with the tool and flags
# in $VALGRIND_ARGS when they are set, and waits for its ops listener; `proxy_stop` stops it
# (SIGTERM) and waits. Sets LIB (this folder), BIN, DIR, TUNNEL, PID and
# QUIC_FLAG (the load tool's transport flags from TRANSPORT and CLIENT, each `ssh` or `quic`);
# the directory goes at exit.
export TRANSPORT=${TRANSPORT:-ssh} CLIENT=${CLIENT:-ssh}
QUIC_FLAG=""; [ "$TRANSPORT" = quic ] && QUIC_FLAG="--quic"
[ "$CLIENT" = quic ] && QUIC_FLAG="$QUIC_FLAG --client-quic"
LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$LIB/../.." || exit 1
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --locked -p postern-proxy -p postern-loadtest >&2
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
DIR=$(mktemp -d)
PID=""
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; [ -n "${KEEP_DIR:-}" ] || rm -rf "$DIR"' EXIT
cd "$DIR" || exit 1
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
name = "bench"
host_ca = ["$(cat ca/host_ca.pub)"]
user_ca = ["$(cat ca/user_ca.pub)"]
policy = { source = "open" }
TOML
proxy_start() {
    if [ -n "${VALGRIND_ARGS:-}" ]; then
        # shellcheck disable=SC2086
        RUST_LOG=error valgrind $VALGRIND_ARGS "$BIN/postern-proxy" --config proxy.toml > proxy.log 2>&1 &
    else
        RUST_LOG=error "$BIN/postern-proxy" --config proxy.toml > proxy.log 2>&1 &
    fi
    PID=$!
    for _ in $(seq 1 120); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$OPS))" 2>/dev/null && break; sleep 0.5; done
}
proxy_stop() {
    kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
    PID=""
}
