#!/usr/bin/env bash
# The end-to-end comparison in one command: direct loopback vs Postern vs an OpenSSH -R/-L chain,
# each cipher, one table. Loopback only; bounded by the sizes given (defaults: 1 GiB x 3 runs,
# 64 streams, 10,000 idle streams, 1,000 agents, 5 s of latency samples per system and cipher).
#   benches/compare.sh                      # full run
#   benches/compare.sh --mib 256 --runs 1 --idle-streams 1000 --agents 200   # quick
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
exec target/release/postern-e2e --bin-dir target/release "$@"
