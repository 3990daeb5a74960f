#!/bin/sh
# /bin/sh is dash in the Debian image: its ulimit has -H and -S (POSIX leaves them undefined).
# shellcheck disable=SC3045
#
# The image's entrypoint: raise the soft limit on open files to the hard limit, then run the
# command (a Postern binary) in place of this shell, so it is PID 1 and gets SIGTERM itself.
#
# Why: a full tunnel carries up to max_streams_per_tunnel (10,000) streams, one socket each (two
# in the Auth server), and the systemd units set LimitNOFILE=65536 for that. Kubernetes has no
# per-pod setting for it: containers inherit the container runtime's limits, and some runtimes
# (containerd 2.x under systemd's defaults) give a soft limit of 1,024 under a much higher hard
# limit. Raising soft to hard needs no privilege. The binaries do not raise it themselves yet.
set -eu
hard=$(ulimit -H -n)
if [ "$hard" != unlimited ]; then
  ulimit -S -n "$hard" 2>/dev/null || echo "postern-entrypoint: cannot raise the open-files limit to $hard; it stays $(ulimit -S -n)" >&2
fi
exec "$@"
