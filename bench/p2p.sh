#!/usr/bin/env bash
# MQTT over a direct peer-to-peer link (p2p://) against MQTT over QUIC (quic://), side by side.
#
# One mqttd with a quic:// and a p2p:// listener runs pinned to core 0, the load generator
# (`mqttd bench`) pinned to core 1; a fresh broker per run. The p2p clients dial the broker's
# node id at its direct address (--peer-addr, no relay): the path a hole punch ends on. Both
# transports are QUIC on the same stack (noq); p2p adds iroh's endpoint (raw-public-key TLS,
# path management) and the node's own socket handling.
#
#   fanin     8 publishers to 1 subscriber, QoS 0 and QoS 1, 10 s: received msg/s, broker CPU
#   latency   100 publisher/subscriber pairs, 2,000 msg/s in all, QoS 0 and QoS 1, 15 s:
#             p50/p99/max end-to-end latency
#
#   bench/p2p.sh                 # 3 rounds
#   bench/p2p.sh --rounds 1 --duration 5
#   MQTTD_BIN=path/to/mqttd bench/p2p.sh   # that binary, not a fresh release build
#
# Prints one line of JSON per run and a table at the end. A measurement tool, not a test: not
# part of CI. Everything stays on 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ROUNDS=3
DURATION=10
LAT_DURATION=15
while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        -h | --help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

apt_install jq
if [[ -n ${MQTTD_BIN:-} ]]; then
    MQTTD=$MQTTD_BIN
else
    cargo build --release --locked -p mqttd >&2
    MQTTD=${CARGO_TARGET_DIR:-$ROOT/target}/release/mqttd
fi
RUN=$(mktemp -d /tmp/mqttd-p2p-bench.XXXXXX)
BROKER_PID=
trap 'stop_broker; rm -rf "$RUN"' EXIT
trap 'exit 130' INT TERM
mkdir -p "$RUN/runs" "$RUN/logs"

free_udp() {
    python3 -c 'import socket; s = socket.socket(type=socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
P_QUIC=$(free_udp)
P_P2P=$(free_udp)
cat >"$RUN/mqttd.toml" <<CONF
listen = ["quic://127.0.0.1:$P_QUIC", "p2p://127.0.0.1:$P_P2P"]
data_dir = "$RUN/data"
allow_anonymous = true
CONF

start() { # start TAG: a fresh broker on core 0; sets BROKER_PID and NODE_ID
    rm -rf "$RUN/data/sessions" "$RUN/data/store"* 2>/dev/null || true
    : >"$RUN/logs/$1.log"
    (RUST_LOG=warn exec taskset -c 0 "$MQTTD" --config "$RUN/mqttd.toml") >"$RUN/logs/$1.log" 2>&1 &
    BROKER_PID=$!
    NODE_ID=
    for _ in $(seq 300); do
        NODE_ID=$(sed -n 's|^mqttd listening on p2p://\([0-9a-f]*\).*|\1|p' "$RUN/logs/$1.log")
        [[ -n $NODE_ID && -n $(ss -Hlun "sport = :$P_QUIC") ]] && break
        kill -0 "$BROKER_PID" 2>/dev/null || { tail "$RUN/logs/$1.log" >&2; exit 1; }
        sleep 0.1
    done
    sleep 1
}

run() { # run TAG TRANSPORT bench-args...: one bench on core 1 into runs/TAG.json
    local tag=$1 transport=$2
    shift 2
    start "$tag"
    local target=(--transport quic -H 127.0.0.1 --port "$P_QUIC" --cafile "$RUN/data/tls/ca.pem")
    [[ $transport == p2p ]] && target=(-L "p2p://$NODE_ID" --peer-addr "127.0.0.1:$P_P2P")
    taskset -c 1 "$MQTTD" bench "$@" "${target[@]}" -V 311 --json --quiet \
        --broker-pid "$BROKER_PID" >"$RUN/runs/$tag.json" 2>"$RUN/logs/$tag.err" ||
        { log "$tag failed: $(tail -3 "$RUN/logs/$tag.err")"; echo '{}' >"$RUN/runs/$tag.json"; }
    stop_broker
}

results=$RUN/results.jsonl
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), nproc $(nproc)"
    echo "mqttd: $("$MQTTD" --version) ($(git describe --always --dirty --abbrev=12))"
} >&2
for round in $(seq "$ROUNDS"); do
    for qos in 0 1; do
        for t in quic p2p; do
            tag=fanin.q$qos.$t.$round
            run "$tag" "$t" fanin --count 8 --qos "$qos" --duration "$DURATION" --drain 1
            jq -c --arg t "$t" --argjson q "$qos" --argjson r "$round" \
                '{scenario:"fanin", transport:$t, qos:$q, round:$r, received_per_sec, errors,
                  broker_cpu_us_per_msg:(if (.received // 0) > 0 then .broker_cpu_secs * 1e6 / .received else null end)}' \
                "$RUN/runs/$tag.json" | tee -a "$results"
            tag=latency.q$qos.$t.$round
            run "$tag" "$t" pairs --count 100 --total-rate 2000 --qos "$qos" \
                --duration "$LAT_DURATION" --drain 2
            jq -c --arg t "$t" --argjson q "$qos" --argjson r "$round" \
                '{scenario:"latency", transport:$t, qos:$q, round:$r, sent, received, errors,
                  p50_ms:.latency_ms.p50, p99_ms:.latency_ms.p99, max_ms:.latency_ms.max}' \
                "$RUN/runs/$tag.json" | tee -a "$results"
        done
    done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def cell(scenario, t, q, key, fmt):
    v = [r[key] for r in rows if r["scenario"] == scenario and r["transport"] == t
         and r["qos"] == q and r.get(key) is not None]
    if not v:
        return "-"
    m = statistics.median(v)
    return fmt(m) if len(v) == 1 else f"{fmt(m)} ({fmt(min(v))} – {fmt(max(v))})"
k = lambda x: f"{x / 1000:,.1f} k"
f2 = lambda x: f"{x:.2f}"
print("| measurement | quic:// | p2p:// (direct) |")
print("|---|--:|--:|")
for q in (0, 1):
    for scenario, key, label, fmt in [
        ("fanin", "received_per_sec", f"fan-in QoS {q}, received msg/s", k),
        ("fanin", "broker_cpu_us_per_msg", f"fan-in QoS {q}: broker CPU per message, µs", f2),
        ("latency", "p50_ms", f"p50 latency QoS {q}, 2,000 msg/s, ms", f2),
        ("latency", "p99_ms", f"p99 latency QoS {q}, 2,000 msg/s, ms", f2),
        ("latency", "max_ms", f"max latency QoS {q}, ms", f2),
    ]:
        print(f"| {label} | {cell(scenario, 'quic', q, key, fmt)} | {cell(scenario, 'p2p', q, key, fmt)} |")
PY
