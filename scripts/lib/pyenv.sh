# Shared by the Python test suites' run.sh scripts (tests/interop, tests/natlab): installing
# Debian packages and finding or making a Python that has the suite's packages. Source it after
# defining `log` (a function printing to stderr with the suite's prefix).
#
#   apt_install PACKAGE...          apt-get install, as root or through sudo
#   find_python VENV CHECK REQ...   sets `python` to a Python where the Python code CHECK runs
#                                   (it imports and checks versions): VENV's if it passes,
#                                   else VENV made (or refreshed) and REQ... pip-installed into
#                                   it, else the system Python with pip --user. Fails if CHECK
#                                   still does not pass.

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root for: $*"; return 1
    fi
}

apt_install() {
    # Try without refreshing the package lists first; refresh only if that fails.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
        as_root apt-get update -q >/dev/null
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
    }
}

_pyenv_has() { "$1" -c "$_pyenv_check" 2>/dev/null; }

find_python() {
    local venv=$1
    _pyenv_check=$2
    shift 2
    python=""
    if [ -x "$venv/bin/python" ] && _pyenv_has "$venv/bin/python"; then
        python="$venv/bin/python"
        return 0
    fi
    local sys_python
    sys_python="$(command -v python3)"
    if [ ! -x "$venv/bin/python" ]; then
        rm -rf "$venv"
        mkdir -p "$(dirname "$venv")"
        if ! "$sys_python" -m venv "$venv" >/dev/null 2>&1; then
            # Debian's python3 needs python3-venv for ensurepip.
            rm -rf "$venv"
            log "installing python3-venv"
            apt_install python3-venv || true
            "$sys_python" -m venv "$venv" >/dev/null 2>&1 || rm -rf "$venv"
        fi
    fi
    if [ -x "$venv/bin/python" ]; then
        log "installing $* into $venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
        python="$venv/bin/python"
    else
        log "no virtualenv; installing $* with pip --user"
        "$sys_python" -m pip install -q --user "$@" 2>/dev/null ||
            "$sys_python" -m pip install -q --user --break-system-packages "$@"
        python="$sys_python"
    fi
    _pyenv_has "$python" || { log "still missing after installing: $*"; return 1; }
}
