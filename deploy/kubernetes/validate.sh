#!/usr/bin/env bash
# Validates every manifest in deploy/kubernetes offline (validate.py says what is checked):
# against the Kubernetes schemas bundled in the kubernetes-validate package from PyPI, plus the
# checks a schema cannot make, plus `kubectl kustomize` where kubectl is installed.
#
# Installs what it needs when missing: python3-pip (apt-get, as root or through sudo), then
# kubernetes-validate (pip; --break-system-packages on a Debian Python that refuses otherwise).
#   deploy/kubernetes/validate.sh                 # install if needed, then validate
#   deploy/kubernetes/validate.sh --install-only  # install if needed (.ci/run does this first)
# The Rust test proxy/tests/deploy_kubernetes.rs runs it as part of scripts/test.
set -euo pipefail
cd "$(dirname "$0")"

# The schemas bundled by this release cover Kubernetes 1.25 to 1.37.
PACKAGE="kubernetes-validate==1.37.0"

die() { echo "validate.sh: $*" >&2; exit 1; }

command -v python3 >/dev/null 2>&1 ||
  die "python3 is missing: install it (Debian: apt-get install python3 python3-pip)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "python3 $(python3 -c 'import platform; print(platform.python_version())') is too old: validate.py needs 3.11 (tomllib)"

if ! python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 ||
      die "pip is missing for $(command -v python3) and apt-get is not here: install pip, then $PACKAGE"
    echo "validate.sh: installing python3-pip (apt-get)" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip >/dev/null
    python3 -m pip --version >/dev/null 2>&1 ||
      die "python3-pip is installed but $(command -v python3) has no pip: install pip for that Python"
  fi
  echo "validate.sh: installing $PACKAGE (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "$PACKAGE" ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$PACKAGE" ||
    die "could not install $PACKAGE with pip"
  python3 -c 'import kubernetes_validate, yaml' ||
    die "$PACKAGE installed, but python3 cannot import it"
fi

if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
exec python3 validate.py "$@"
