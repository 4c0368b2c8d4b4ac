#!/usr/bin/env bash
# mqttd and Mosquitto over TLS (and mqttd over WebSocket) side by side, on loopback.
#
# Each broker runs pinned to core 0 and the load generator (`mqttd bench`) to core 1, one
# broker at a time, with the same certificate (an ECDSA P-256 one from mqttd's generated local
# CA) and mqttd's queue limits. For each broker it measures fan-in and fan-out QoS 0 over TLS
# (8 clients, 10 s), new MQTT connections over TLS (handshake included) with 5,000 clients
# connecting at once: how many per second, and the broker's CPU time per connection (the
# generator verifies every certificate on one core, so the rate is partly its own), and the
# memory each idle connection holds (RSS growth over 5,000 connections, per transport). Prints one line of JSON per measurement and a table at the end.
#
#   bench/tls.sh                 # everything, 3 rounds
#   bench/tls.sh --rounds 1      # quicker
#
# A measurement tool, not a test: not part of CI. It only ever targets 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ROUNDS=3
while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

command -v mosquitto >/dev/null || { echo "needs Debian's mosquitto" >&2; exit 1; }
cargo build --release --locked -p mqttd >&2
MQTTD=$ROOT/target/release/mqttd
RUN=$(mktemp -d /tmp/mqttd-tls-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$RUN"' EXIT
ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "port $1 never opened" >&2
    return 1
}

# The certificate: mqttd's generated local CA and server certificate, used by both brokers.
P_TLS=$(free_port)
"$MQTTD" --listen "tls://127.0.0.1:$P_TLS" --data-dir "$RUN/certs" >/dev/null 2>&1 &
wait_port "$P_TLS"
kill %1; wait %1 2>/dev/null || true
CA=$RUN/certs/tls/ca.pem

P_TCP=$(free_port); P_TLS=$(free_port); P_WS=$(free_port); P_WSS=$(free_port); P_MOSQ=$(free_port)
cat >"$RUN/mqttd.toml" <<CONF
listen = ["tcp://127.0.0.1:$P_TCP", "tls://127.0.0.1:$P_TLS", "ws://127.0.0.1:$P_WS", "wss://127.0.0.1:$P_WSS"]
data_dir = "$RUN/certs"
allow_anonymous = true
max_queued_messages = 1000
max_inflight_messages = 64
CONF
cat >"$RUN/mosquitto.conf" <<CONF
# Mosquitto 2 over TLS with the same certificate and queue limits; no persistence.
user root
listener $P_MOSQ 127.0.0.1
certfile $RUN/certs/tls/cert.pem
keyfile $RUN/certs/tls/key.pem
allow_anonymous true
set_tcp_nodelay true
max_queued_messages 1000
max_inflight_messages 64
CONF

start_broker() { # start_broker NAME: starts it pinned to core 0; sets PID
    case $1 in
        mqttd) taskset -c 0 "$MQTTD" --config "$RUN/mqttd.toml" >/dev/null 2>"$RUN/mqttd.log" &
            PID=$!; wait_port "$P_TLS" ;;
        mosquitto) taskset -c 0 mosquitto -c "$RUN/mosquitto.conf" 2>"$RUN/mosquitto.log" &
            PID=$!; wait_port "$P_MOSQ" ;;
    esac
}
stop_broker() { kill "$PID"; wait "$PID" 2>/dev/null || true; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
bench() { taskset -c 1 "$MQTTD" bench "$@" --json --broker-pid "$PID" 2>/dev/null; }

results=$RUN/results.jsonl
for round in $(seq "$ROUNDS"); do
    for broker in mosquitto mqttd; do
        port=$([[ $broker == mqttd ]] && echo "$P_TLS" || echo "$P_MOSQ")
        tls=(--transport tls --cafile "$CA" -H localhost --port "$port")
        for scenario in fanin fanout; do
            start_broker $broker
            out=$(bench $scenario --count 8 --qos 0 --duration 10 --drain 1 "${tls[@]}")
            stop_broker
            jq -c --arg b $broker --arg s "tls-$scenario" --argjson r "$round" \
                '{broker:$b, scenario:$s, round:$r, received_per_sec, broker_cpu_secs}' <<<"$out" |
                tee -a "$results"
        done
        start_broker $broker
        out=$(bench conn --count 5000 --connect-rate 0 --duration 1 --drain 0 "${tls[@]}")
        stop_broker
        jq -c --arg b $broker --argjson r "$round" \
            '{broker:$b, scenario:"tls-connect", round:$r, connect_per_sec, connected, broker_cpu_secs,
              cpu_us_per_connection:(.broker_cpu_secs * 1000000 / .connected | floor)}' \
            <<<"$out" | tee -a "$results"
        transports=(tls)
        [[ $broker == mqttd ]] && transports=(tcp tls ws wss)
        for t in "${transports[@]}"; do
            case $t in
                tcp) args=(--port "$P_TCP") ;;
                tls) args=("${tls[@]}") ;;
                ws) args=(--transport ws --port "$P_WS") ;;
                wss) args=(--transport wss --cafile "$CA" -H localhost --port "$P_WSS") ;;
            esac
            start_broker $broker
            sleep 0.5
            before=$(rss_kb "$PID")
            taskset -c 1 "$MQTTD" bench conn --count 5000 --connect-rate 2000 --duration 6 \
                --drain 0 "${args[@]}" --json >"$RUN/conn.json" 2>/dev/null &
            sleep 5.5
            after=$(rss_kb "$PID")
            wait $!
            stop_broker
            jq -nc --arg b $broker --arg t "$t" --argjson r "$round" --argjson before "$before" \
                --argjson after "$after" --slurpfile c "$RUN/conn.json" \
                '{broker:$b, scenario:("idle-memory-" + $t), round:$r, connected:$c[0].connected,
                  bytes_per_connection:((($after - $before) * 1024) / $c[0].connected | floor)}' |
                tee -a "$results"
        done
    done
done

echo
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(broker, scenario, key):
    v = [r[key] for r in rows if r["broker"] == broker and r["scenario"] == scenario and r.get(key) is not None]
    return statistics.median(v) if v else None
print("| measurement | Mosquitto | mqttd |")
print("|---|--:|--:|")
for scenario, key, label in [
    ("tls-fanin", "received_per_sec", "TLS fan-in QoS 0, received msg/s"),
    ("tls-fanout", "received_per_sec", "TLS fan-out QoS 0, received msg/s"),
    ("tls-connect", "connect_per_sec", "new MQTT connections over TLS per second"),
    ("tls-connect", "cpu_us_per_connection", "broker CPU per new TLS connection, µs"),
    ("idle-memory-tls", "bytes_per_connection", "memory per idle TLS connection, bytes"),
    ("idle-memory-tcp", "bytes_per_connection", "memory per idle TCP connection, bytes"),
    ("idle-memory-ws", "bytes_per_connection", "memory per idle WebSocket connection, bytes"),
    ("idle-memory-wss", "bytes_per_connection", "memory per idle WebSocket-over-TLS connection, bytes"),
]:
    m, q = med("mosquitto", scenario, key), med("mqttd", scenario, key)
    f = lambda x: "-" if x is None else f"{x:,.0f}"
    print(f"| {label} | {f(m)} | {f(q)} |")
PY
