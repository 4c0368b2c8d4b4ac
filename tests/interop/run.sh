#!/usr/bin/env bash
# Real-client interoperability tests: paho-mqtt, the Mosquitto command-line clients, MQTT.js
# (Node, over WebSocket) and aioquic (MQTT over QUIC) against a freshly started mqttd per test.
#
#   tests/interop/run.sh                 # everything
#   tests/interop/run.sh -k retained -x  # arguments go to pytest
#   MQTTD_BIN=/path/to/mqttd tests/interop/run.sh   # test that binary instead of building
#
# Installs what is missing: Debian's mosquitto-clients and mosquitto (for mosquitto_passwd) with
# apt-get, paho-mqtt >= 2, pytest, pytest-timeout and aioquic 1.x in a virtualenv at
# target/interop-venv (or, failing that, with pip --user), Debian's nodejs and npm with apt-get,
# and MQTT.js with `npm ci` from tests/interop/mqttjs/package-lock.json.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/interop-venv"
py_requirements=("paho-mqtt>=2,<3" "pytest>=8" "pytest-timeout>=2" "aioquic>=1.2,<2")

log() { echo "interop: $*" >&2; }

# shellcheck source=../../scripts/lib/pyenv.sh
source "$root/scripts/lib/pyenv.sh"

# --- Mosquitto clients ---------------------------------------------------------------------
if ! command -v mosquitto_sub >/dev/null || ! command -v mosquitto_pub >/dev/null; then
    log "installing mosquitto-clients"
    apt_install mosquitto-clients
fi
# mosquitto_passwd (password files in Mosquitto's format) comes with the broker package.
if ! command -v mosquitto_passwd >/dev/null; then
    log "installing mosquitto (for mosquitto_passwd)"
    apt_install mosquitto
fi

# --- Python packages -----------------------------------------------------------------------
find_python "$venv" '
import paho.mqtt, pytest, pytest_timeout, aioquic
assert int(paho.mqtt.__version__.split(".")[0]) >= 2
assert (1, 2) <= tuple(int(x) for x in aioquic.__version__.split(".")[:2]) < (2, 0)
' "${py_requirements[@]}"

# --- MQTT.js ---------------------------------------------------------------------------------
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "installing nodejs and npm"
    apt_install nodejs npm
fi
if [ ! -d "$here/mqttjs/node_modules/mqtt" ]; then
    log "installing MQTT.js (npm ci in tests/interop/mqttjs)"
    (cd "$here/mqttjs" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

# --- the broker ----------------------------------------------------------------------------
if [ -z "${MQTTD_BIN:-}" ]; then
    (cd "$root" && cargo build -q -p mqttd)
    MQTTD_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/mqttd"
fi
[ -x "$MQTTD_BIN" ] || { log "no broker binary at $MQTTD_BIN"; exit 1; }
export MQTTD_BIN
log "testing $MQTTD_BIN"

cd "$here"
exec "$python" -m pytest -p no:cacheprovider "$@"
