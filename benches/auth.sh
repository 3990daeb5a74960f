#!/usr/bin/env bash
# Auth API calls per second (GetRole, UpsertRole) on SQLite and PostgreSQL, direct and through
# the tunnel, in one run and one table. Starts a throwaway PostgreSQL server (Debian's package,
# installed if missing) in a temp dir on a loopback port, and stops and removes it at the end.
#   benches/auth.sh                         # 5 s per cell, 16 calls in flight
#   benches/auth.sh --secs 10 --concurrency 64
#   PROFILE=dev benches/auth.sh             # the debug build (dependencies at opt-level 2)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    echo "installing postgresql" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

tmp=$(mktemp -d /tmp/postern-auth-bench-XXXXXX)
as=()
if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses to run as root.
    chown postgres:postgres "$tmp"
    as=(runuser -u postgres --)
fi
stop() {
    "${as[@]}" "$bin/pg_ctl" -D "$tmp/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap stop EXIT

umask 077
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$tmp/password"
[ ${#as[@]} -gt 0 ] && chown postgres:postgres "$tmp/password"
"${as[@]}" "$bin/initdb" -D "$tmp/data" -U postern --auth-host=scram-sha-256 --auth-local=trust \
    --pwfile="$tmp/password" -E UTF8 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Durable like the SQLite backend (synchronous=FULL): fsync and synchronous_commit stay on.
"${as[@]}" "$bin/pg_ctl" -D "$tmp/data" -l "$tmp/log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $tmp -c max_connections=100" start >/dev/null

profile=${PROFILE:-release}
dir=$profile; [ "$profile" = dev ] && dir=debug
cargo build --profile "$profile" --locked -p postern-benches --bin postern-auth-bench >&2
"${CARGO_TARGET_DIR:-target}/$dir/postern-auth-bench" \
    --postgres-url "postgres://postern@127.0.0.1:$port/postgres" \
    --postgres-password-file "$tmp/password" "$@"
