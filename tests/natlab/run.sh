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

apt_install() {
    # Try without refreshing the package lists first; refresh only if that fails.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
    }
}

# --- ip and nft ------------------------------------------------------------------------------
# Without root the suite skips itself (conftest.py says why), so only root installs them.
if [ "$(id -u)" -eq 0 ]; then
    command -v ip >/dev/null || { log "installing iproute2"; apt_install iproute2; }
    command -v nft >/dev/null || { log "installing nftables"; apt_install nftables; }
fi

# --- Python packages -----------------------------------------------------------------------
have_packages() {
    "$1" -c 'import pytest, pytest_timeout' 2>/dev/null
}

if [ -n "${NATLAB_PYTHON:-}" ]; then
    python="$NATLAB_PYTHON"
    have_packages "$python" || { log "$python lacks pytest or pytest-timeout"; exit 1; }
elif [ -x "$venv/bin/python" ] && have_packages "$venv/bin/python"; then
    python="$venv/bin/python"
else
    sys_python="$(command -v python3)"
    if [ ! -x "$venv/bin/python" ]; then
        rm -rf "$venv"
        mkdir -p "$(dirname "$venv")"
        if ! "$sys_python" -m venv "$venv" >/dev/null 2>&1; then
            # Debian's python3 needs python3-venv for ensurepip.
            rm -rf "$venv"
            if [ "$(id -u)" -eq 0 ]; then
                log "installing python3-venv"
                apt_install python3-venv || true
            fi
            "$sys_python" -m venv "$venv" >/dev/null 2>&1 || rm -rf "$venv"
        fi
    fi
    if [ -x "$venv/bin/python" ]; then
        log "installing ${py_requirements[*]} into $venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "${py_requirements[@]}"
        python="$venv/bin/python"
    else
        log "no virtualenv; installing ${py_requirements[*]} with pip --user"
        "$sys_python" -m pip install -q --user "${py_requirements[@]}" 2>/dev/null ||
            "$sys_python" -m pip install -q --user --break-system-packages "${py_requirements[@]}"
        python="$sys_python"
    fi
    have_packages "$python" || { log "pytest or pytest-timeout is still missing"; exit 1; }
fi

cd "$here"
exec "$python" -m pytest -p no:cacheprovider "$@"
