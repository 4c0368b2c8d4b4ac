#!/usr/bin/env bash
# The dashboard in a real browser: Debian's headless Chromium, driven by chromium-driver through
# Selenium, against a fresh mqttd with tcp:// and http:// listeners (tests/dashboard/README.md).
#
#   tests/dashboard/run.sh                 # everything
#   tests/dashboard/run.sh -k retained -x  # arguments go to pytest
#   MQTTD_BIN=/path/to/mqttd tests/dashboard/run.sh   # test that binary instead of building
#
# Installs what is missing: Debian's chromium, chromium-driver and mosquitto-clients with
# apt-get, and selenium, pytest and pytest-timeout in a virtualenv at target/dashboard-venv.
# Nothing is downloaded by the browser tooling at test time (Selenium is given the driver's
# path, so Selenium Manager stays unused). A screenshot of each page is left in
# target/dashboard-screenshots/. Nothing here skips: a browser that cannot start fails the run.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/dashboard-venv"
py_requirements=("selenium>=4.20,<5" "pytest>=8" "pytest-timeout>=2")

log() { echo "dashboard: $*" >&2; }

# shellcheck source=../../scripts/lib/pyenv.sh
source "$root/scripts/lib/pyenv.sh"

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    log "installing chromium and chromium-driver"
    apt_install chromium chromium-driver
fi
if ! command -v mosquitto_sub >/dev/null || ! command -v mosquitto_pub >/dev/null; then
    log "installing mosquitto-clients"
    apt_install mosquitto-clients
fi

find_python "$venv" '
import selenium, pytest, pytest_timeout
assert int(selenium.__version__.split(".")[0]) == 4
' "${py_requirements[@]}"

if [ -z "${MQTTD_BIN:-}" ]; then
    (cd "$root" && cargo build -q -p mqttd)
    MQTTD_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/mqttd"
fi
[ -x "$MQTTD_BIN" ] || { log "no broker binary at $MQTTD_BIN"; exit 1; }
export MQTTD_BIN
export DASHBOARD_SCREENSHOTS="${DASHBOARD_SCREENSHOTS:-${CARGO_TARGET_DIR:-$root/target}/dashboard-screenshots}"
rm -rf "$DASHBOARD_SCREENSHOTS"
mkdir -p "$DASHBOARD_SCREENSHOTS"
log "testing $MQTTD_BIN; screenshots in $DASHBOARD_SCREENSHOTS"

cd "$here"
"$python" -m pytest -p no:cacheprovider "$@"
log "screenshots: $(cd "$DASHBOARD_SCREENSHOTS" && ls | tr '\n' ' ')"
