#!/usr/bin/env bash
# The NAT lab: network namespaces, veth pairs and nftables routers (see README.md). Needs root.
#
#   tests/natlab/run.sh                    # everything
#   tests/natlab/run.sh -k symmetric -x    # arguments go to pytest
#   NATLAB_PYTHON=/path/to/python tests/natlab/run.sh   # a Python that has pytest already
#   NATLAB_REQUIRED=1 tests/natlab/run.sh  # fail instead of skipping where the lab cannot run
#
# Installs what is missing: Debian's iproute2 and nftables with apt-get (as root), and pytest
# and pytest-timeout in the virtualenv the interoperability suite uses, target/interop-venv
# (these two are a subset of its packages), or with pip --user where no virtualenv can be made.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/interop-venv"  # shared with tests/interop/run.sh
py_requirements=("pytest>=8" "pytest-timeout>=2")

log() { echo "natlab: $*" >&2; }

# shellcheck source=../../scripts/lib/pyenv.sh
source "$root/scripts/lib/pyenv.sh"

# --- ip and nft ------------------------------------------------------------------------------
# Without root the suite skips itself (conftest.py says why), so only root installs them.
if [ "$(id -u)" -eq 0 ]; then
    command -v ip >/dev/null || { log "installing iproute2"; apt_install iproute2; }
    command -v nft >/dev/null || { log "installing nftables"; apt_install nftables; }
fi

# --- Python packages -----------------------------------------------------------------------
if [ -n "${NATLAB_PYTHON:-}" ]; then
    python="$NATLAB_PYTHON"
    "$python" -c 'import pytest, pytest_timeout' 2>/dev/null ||
        { log "$python lacks pytest or pytest-timeout"; exit 1; }
else
    find_python "$venv" 'import pytest, pytest_timeout' "${py_requirements[@]}"
fi

cd "$here"
exec "$python" -m pytest -p no:cacheprovider "$@"
