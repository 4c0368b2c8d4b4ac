#!/usr/bin/env bash
# The cluster lab: clients that log their history, a checker that reads it (README.md).
#
#   tests/clusterlab/run.sh                # everything
#   tests/clusterlab/run.sh -k checker -x  # arguments go to pytest
#   MQTTD_BIN=/path/to/mqttd tests/clusterlab/run.sh   # that binary, not target/debug/mqttd
#   CLUSTERLAB_REQUIRED=1 tests/clusterlab/run.sh       # fail instead of skipping without root
#
# Installs what is missing (paho-mqtt, pytest and pytest-timeout) in the virtualenv the
# interoperability suite uses, target/interop-venv (these are a subset of its packages).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/interop-venv"  # shared with tests/interop/run.sh
py_requirements=("paho-mqtt>=2,<3" "pytest>=8" "pytest-timeout>=2")

log() { echo "clusterlab: $*" >&2; }

# shellcheck source=../../scripts/lib/pyenv.sh
source "$root/scripts/lib/pyenv.sh"

# The network tests (namespaces, partitions) need root, iproute2 and nftables.
if [ "$(id -u)" -eq 0 ]; then
    command -v ip >/dev/null || { log "installing iproute2"; apt_install iproute2; }
    command -v nft >/dev/null || { log "installing nftables"; apt_install nftables; }
fi

find_python "$venv" '
import paho.mqtt, pytest, pytest_timeout
assert int(paho.mqtt.__version__.split(".")[0]) >= 2
' "${py_requirements[@]}"

if [ -z "${MQTTD_BIN:-}" ]; then
    (cd "$root" && cargo build -q -p mqttd)
fi

cd "$here"
exec "$python" -m pytest -p no:cacheprovider "$@"
