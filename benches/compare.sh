#!/usr/bin/env bash
# The end-to-end comparison in one command: direct loopback vs Postern (the agent on SSH, and on
# QUIC) vs an OpenSSH -R/-L chain, each cipher, one table. Loopback only; bounded by the sizes
# given (defaults: 1 GiB x 3 runs, 64 streams, 10,000 idle streams, 1,000 agents, 5 s of latency
# samples per system and cipher).
# In one phase only (--quic-phase, default aes128-gcm@openssh.com; QUIC's TLS does not follow
# the SSH cipher) it also runs, from the same run:
#   - the row "Postern (Rust client, agent on QUIC)" (agent forced to QUIC, checked on the
#     proxy's postern_tunnels_connected{transport="quic"}); --no-quic skips it;
#   - isolation, agent on SSH and on QUIC: B's 64-byte echo p99 at 10 Hz alone vs while A reads
#     the same tunnel at --slow-kib-per-s (128) KiB/s, --isolation-secs (20) s each; 0 skips it;
#   - the proxy's RSS held by one fully stalled stream, next to the SSH credit window and the
#     QUIC stream_receive_window;
#   - the QUIC knobs in effect (windows, UDP buffers, GSO/GRO, congestion controller).
#   benches/compare.sh                      # full run
#   benches/compare.sh --mib 256 --runs 1 --idle-streams 1000 --agents 200 --isolation-secs 5   # quick
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ssh >/dev/null || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi

# 10,000 idle streams need ~3 descriptors each across the processes.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release --locked -p postern-proxy -p postern-agent -p postern-benches --bins >&2
BIN=${CARGO_TARGET_DIR:-target}/release
exec "$BIN/postern-e2e" --bin-dir "$BIN" "$@"
