#!/usr/bin/env bash
# What one idle (parked) TCP connection holds on mqttd's heap, per allocation site.
#
# Runs a fresh broker under heaptrack (Debian package `heaptrack`) twice: holding N and then 2N
# idle MQTT 3.1.1 connections (`mqttd bench conn`, keep alive 300 s, from 127.0.0.2-9). Once
# they are all parked and the broker settled, the broker is killed with SIGKILL, so that its
# trace ends with the parked connections still live (a graceful shutdown would give every
# parked connection its task back to send DISCONNECT first). Only the broker is killed, not
# heaptrack's script, whose interpreter then reads the trace to its end.
# `heaptrack_print --print-leaks` lists what was live when the trace ended; the difference
# between the two runs, per allocation site, divided by N is what one more parked connection
# holds, without the broker's own baseline.
#
#   bench/heap-idle.sh                    # N = 2048, release build
#   bench/heap-idle.sh --count 5000
#   MQTTD_BIN=/tmp/mqttd-main bench/heap-idle.sh
#
# Prints the table (bytes per connection, allocations per connection, site) and keeps the
# traces in the directory it names. A measurement tool, not a test: not part of CI. It only
# ever targets 127.0.0.x.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COUNT=2048
RATE=2000
while (($#)); do
    case $1 in
        --count) COUNT=$2; shift ;;
        --rate) RATE=$2; shift ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done
MQTTD=${MQTTD_BIN:-$ROOT/target/release/mqttd}
RUN=$(mktemp -d /tmp/mqttd-heap.XXXXXX)
ulimit -n "$(ulimit -Hn)"
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
metric() {
    curl -sf "http://127.0.0.1:$P_HTTP/metrics" | awk -v m="$1" '$1 == m {v = $2} END {print v + 0}'
}

# trace N: holds N parked connections under heaptrack, kills the broker, writes $RUN/leaks.N.
trace() {
    local n=$1 hold_s=$(($1 / RATE + 120)) pid= deadline
    P_TCP=$(free_port); P_HTTP=$(free_port)
    cat >"$RUN/mqttd.toml" <<CONF
listen = ["tcp://127.0.0.1:$P_TCP", "http://127.0.0.1:$P_HTTP"]
data_dir = "$RUN/data.$n"
allow_anonymous = true
CONF
    RUST_LOG=warn heaptrack -o "$RUN/heap.$n" "$MQTTD" --config "$RUN/mqttd.toml" \
        >"$RUN/heaptrack.$n.log" 2>&1 &
    local script=$!
    for _ in $(seq 600); do
        pid=$(pgrep -P "$script" -f -- "--config $RUN/mqttd.toml" || true)
        [[ -n $pid ]] && curl -sf "http://127.0.0.1:$P_HTTP/health" >/dev/null && break
        sleep 0.1
    done
    [[ -n $pid ]] || { echo "the broker did not start: $RUN/heaptrack.$n.log" >&2; exit 1; }
    sleep 1
    "$MQTTD" bench conn --count "$n" --connect-rate "$RATE" --duration "$hold_s" --drain 0 \
        -V 311 --bind 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9 \
        --port "$P_TCP" --json --quiet >"$RUN/bench.$n.json" 2>&1 &
    local bench=$!
    deadline=$((SECONDS + hold_s - 5))
    while ((SECONDS < deadline)); do
        (($(metric mqttd_connections_parked) >= n)) && break
        sleep 0.5
    done
    sleep 3
    log "N=$n: $(metric mqttd_clients_connected) connected, $(metric mqttd_connections_parked) parked"
    kill -KILL "$pid"
    wait "$script" || true
    kill "$bench" 2>/dev/null || true
    wait "$bench" 2>/dev/null || true
    heaptrack_print -f "$RUN/heap.$n.zst" --print-leaks 1 --print-peaks 0 --print-allocators 0 \
        --print-temporary 0 --print-histogram '' --print-flamegraph '' --merge-backtraces 0 \
        --peak-limit 1000000 >"$RUN/leaks.$n.txt" 2>"$RUN/print.$n.err" || true
}

trace "$COUNT"
trace $((COUNT * 2))
python3 - "$RUN/leaks.$COUNT.txt" "$RUN/leaks.$((COUNT * 2)).txt" "$COUNT" <<'PY'
import re, sys
from collections import defaultdict

def parse(path):
    """Bytes and allocations live at the end of the trace, per allocation site."""
    text = open(path, errors="replace").read().split("MEMORY LEAKS", 1)[-1]
    sites = defaultdict(lambda: [0.0, 0])
    entry = None
    for line in text.splitlines():
        m = re.match(r"^([\d.]+)([KMG]?) leaked over (\d+) calls from", line)
        if m:
            if entry:
                add(sites, entry)
            size = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]
            entry = [size, int(m.group(3)), []]
        elif entry and line.startswith("    at "):
            if entry[2]:
                entry[2][-1][1] = line.strip()[3:]
        elif entry and line.startswith("  ") and not line.startswith("    "):
            entry[2].append([line.strip(), ""])
    if entry:
        add(sites, entry)
    return sites

def short(at):
    at = re.sub(r"^.*/registry/src/[^/]+/", "", at)
    return re.sub(r"^/rustc/[0-9a-f]+/library/", "std:", at)

def add(sites, entry):
    size, calls, frames = entry
    # The allocation's site: the first frame outside the standard library (a dependency or
    # ours), and the first of ours, if that is another.
    first = next((f for f in frames if f[1] and not f[1].startswith("/rustc/")), None)
    ours = next((f for f in frames if f[1].startswith("crates/")), None)
    parts = [f"{f[0]} ({short(f[1])})" for f in (first, ours) if f]
    if len(parts) == 2 and first is ours:
        parts = parts[:1]
    key = " <- ".join(parts) or (frames[0][0] if frames else "?")
    sites[key][0] += size
    sites[key][1] += calls

a = parse(sys.argv[1])
b = parse(sys.argv[2])
n = int(sys.argv[3])
rows = []
for k in set(a) | set(b):
    rows.append(((b.get(k, [0, 0])[0] - a.get(k, [0, 0])[0]) / n,
                 (b.get(k, [0, 0])[1] - a.get(k, [0, 0])[1]) / n, k))
rows.sort(reverse=True)
print("| bytes per connection | allocations per connection | allocated at |")
print("|--:|--:|---|")
for per, calls, k in rows:
    if abs(per) >= 4 or abs(calls) >= 0.05:
        print(f"| {per:,.0f} | {calls:.2f} | `{k}` |")
print(f"| **{sum(r[0] for r in rows):,.0f}** | **{sum(r[1] for r in rows):.2f}** | all sites |")
PY
log "traces in $RUN"
