#!/usr/bin/env bash
# MQTT over QUIC against MQTT over TLS (and rmqtt's QUIC listener), side by side.
#
# Each broker runs pinned to core 0 and the load generator (`mqttd bench`) to core 1, one
# broker at a time, with the same certificate (an ECDSA P-256 one from mqttd's generated local
# CA) and mqttd's queue limits. It measures, for mqttd's `quic://` listener against its
# `tls://` one:
#
#   fan       fan-in and fan-out QoS 0 (8 clients, 10 s), also against rmqtt 0.24's QUIC
#             listener; received msg/s, broker and generator CPU
#   connect   5,000 new MQTT connections, at most 256 being set up at a time (a listen backlog
#             for both; the generator spreads QUIC clients over UDP sockets as devices would),
#             handshake included: how many per second, and the broker's and the generator's
#             CPU time per connection
#   idle      10,000 idle connections held: broker RSS growth per connection
#   loss      p50/p99 latency of QoS 0 at a modest fixed rate (100 publisher/subscriber pairs,
#             2,000 msg/s in all) with no loss and with 1 % of the packets dropped in each
#             direction (iptables `statistic` in a network namespace: the broker in one, the
#             generator in the other, over a veth pair; the same rule for TCP and UDP)
#
# Prints one line of JSON per measurement and a table at the end.
#
#   bench/quic.sh                       # everything, 3 rounds
#   bench/quic.sh --rounds 1            # quicker
#   bench/quic.sh --skip-rmqtt          # without rmqtt (cargo install rmqttd --version 0.24.0)
#   bench/quic.sh --scenarios fan,loss  # some of fan, connect, idle, loss
#
# Other options: --duration S (throughput runs, 10), --idle-count N (10000), --loss P (0.01),
# --loss-rate MSG/S (2000), --loss-duration S (15), --keep DIR (keep the raw results there).
#
# A measurement tool, not a test: not part of CI. It needs root (network namespaces,
# iptables); it only ever targets 127.0.0.1 and the namespaces it creates, which it removes on
# exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ROUNDS=3
SKIP_RMQTT=0
SCENARIOS=fan,connect,idle,loss
DURATION=10
FAN=8
CONNECT_COUNT=5000
CONNECT_AT_ONCE=256
IDLE_COUNT=10000
IDLE_RATE=2000
LOSS=0.01
LOSS_PAIRS=100
LOSS_RATE=2000
LOSS_DURATION=15
KEEP=
MAX_QUEUED=1000
MAX_INFLIGHT=64

usage() { sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --skip-rmqtt) SKIP_RMQTT=1 ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --idle-count) IDLE_COUNT=$2; shift ;;
        --loss) LOSS=$2; shift ;;
        --loss-rate) LOSS_RATE=$2; shift ;;
        --loss-duration) LOSS_DURATION=$2; shift ;;
        --keep) KEEP=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
has_scenario() { [[ ",$SCENARIOS," == *",$1,"* ]]; }

((EUID == 0)) || { echo "needs root (network namespaces, iptables)" >&2; exit 1; }
apt_install jq iproute2 iptables curl
RMQTTD=${CARGO_HOME:-$HOME/.cargo}/bin/rmqttd
if ((!SKIP_RMQTT)) && ! "$RMQTTD" -V 2>/dev/null | grep -q '0\.24\.'; then
    echo "rmqttd 0.24 not found at $RMQTTD: cargo install rmqttd --version 0.24.0 --locked," \
        "or --skip-rmqtt" >&2
    exit 1
fi
cargo build --release --locked -p mqttd >&2
MQTTD=${CARGO_TARGET_DIR:-$ROOT/target}/release/mqttd
RUN=$(mktemp -d /tmp/mqttd-quic-bench.XXXXXX)
# 10,000 connections on each side, TLS ones a socket each (the hard limit here is 20,000).
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < IDLE_COUNT + 1000)); then
    echo "open-file limit $(ulimit -n) is below --idle-count $IDLE_COUNT plus room" >&2
    exit 1
fi

# The namespaces of the loss runs: broker side (B) and generator side (G), a veth pair between.
NS_B=mqttd-qb$$-b
NS_G=mqttd-qb$$-g
VETH_B=qb$$b
VETH_G=qb$$g
NS_ADDR_B=10.231.0.1
NS_ADDR_G=10.231.0.2
NETNS_UP=0

cleanup() {
    [[ -n $BENCH_PID ]] && kill -KILL "$BENCH_PID" 2>/dev/null || true
    stop_broker
    if ((NETNS_UP)); then
        ip netns del "$NS_B" 2>/dev/null || true
        ip netns del "$NS_G" 2>/dev/null || true
    fi
    if [[ -n $KEEP ]]; then
        mkdir -p "$KEEP"
        cp -r "$RUN"/. "$KEEP"/
    fi
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { # free_port tcp|udp
    python3 -c 'import socket, sys
s = socket.socket(type=socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' "$1"
}
P_TLS=$(free_port tcp); P_QUIC=$(free_port udp); P_HTTP=$(free_port tcp)
P_RMQTT_QUIC=$(free_port udp); P_RMQTT_TCP=$(free_port tcp); P_RMQTT_RPC=$(free_port tcp)
P_RMQTT_INTERNAL=$(free_port tcp)

# The certificate: mqttd's generated local CA and server certificate (valid for localhost,
# 127.0.0.1 and the broker's namespace address), used by every broker.
mqttd_conf() { # mqttd_conf HOST: mqttd on HOST with a TLS, a QUIC and a metrics listener
    cat <<CONF
# mqttd: its defaults, a TLS and a QUIC listener on the same certificate, and /metrics.
listen = ["tls://$1:$P_TLS", "quic://$1:$P_QUIC", "http://$1:$P_HTTP"]
data_dir = "$RUN/data"
allow_anonymous = true
max_queued_messages = $MAX_QUEUED
max_inflight_messages = $MAX_INFLIGHT

[tls]
hostnames = ["$NS_ADDR_B"]
CONF
}
mqttd_conf 127.0.0.1 >"$RUN/mqttd.toml"
mqttd_conf "$NS_ADDR_B" >"$RUN/mqttd-ns.toml"
"$MQTTD" --config "$RUN/mqttd.toml" >/dev/null 2>&1 &
for _ in $(seq 100); do
    [[ -f $RUN/data/tls/cert.pem && -n $(ss -Hltn "sport = :$P_TLS") ]] && break
    sleep 0.1
done
kill $!; wait $! 2>/dev/null || true
CA=$RUN/data/tls/ca.pem
[[ -f $CA ]] || { echo "mqttd generated no certificate" >&2; exit 1; }

cat >"$RUN/rmqtt.toml" <<CONF
# rmqtt 0.24: a QUIC listener on loopback with mqttd's certificate (its TCP listener, which it
# needs, unused), no rate limit on the message queue, queue and in-flight limits equal to
# mqttd's. Plugins that are not needed to route messages are off.
node.id = 1
rpc.server_addr = "127.0.0.1:$P_RMQTT_RPC"
log.to = "console"
log.level = "warn"
plugins.dir = "$RUN/rmqtt-plugins/"
plugins.default_startups = []
plugins.disabled_default_startups = ["rmqtt-acl", "rmqtt-counter", "rmqtt-http-api"]

listener.tcp.external.addr = "127.0.0.1:$P_RMQTT_TCP"
listener.tcp.external.allow_anonymous = true
listener.tcp.internal.enable = false
listener.tcp.internal.addr = "127.0.0.1:$P_RMQTT_INTERNAL"

listener.quic.external.addr = "127.0.0.1:$P_RMQTT_QUIC"
listener.quic.external.cert = "$RUN/data/tls/cert.pem"
listener.quic.external.key = "$RUN/data/tls/key.pem"
listener.quic.external.max_connections = 1024000
listener.quic.external.max_handshaking_limit = 5000
listener.quic.external.allow_anonymous = true
listener.quic.external.max_inflight = $MAX_INFLIGHT
listener.quic.external.max_mqueue_len = $MAX_QUEUED
listener.quic.external.mqueue_rate_limit = "4294967295,1s"
listener.quic.external.max_packet_size = "1MB"
CONF
mkdir -p "$RUN/rmqtt-plugins" "$RUN/runs" "$RUN/logs"

# --- brokers --------------------------------------------------------------------------------

# NETNS: empty on loopback, else the broker's namespace.
NETNS=
in_ns() { if [[ -n $NETNS ]]; then exec ip netns exec "$NETNS" "$@"; else exec "$@"; fi; }

start_broker() { # start_broker mqttd|rmqtt TAG: starts it pinned to core 0; sets BROKER_PID
    local logf=$RUN/logs/$2.log conf=$RUN/mqttd.toml
    [[ -n $NETNS ]] && conf=$RUN/mqttd-ns.toml
    case $1 in
        # In a subshell that execs: $! is the broker itself.
        mqttd) (RUST_LOG=warn in_ns taskset -c 0 "$MQTTD" --config "$conf") >"$logf" 2>&1 & ;;
        # rmqtt also reads ./rmqtt.toml: start it where there is none.
        rmqtt) (cd "$RUN/rmqtt-plugins" && exec taskset -c 0 "$RMQTTD" -f "$RUN/rmqtt.toml") \
            >"$logf" 2>&1 & ;;
    esac
    BROKER_PID=$!
    local udp=$P_QUIC tcp=$P_TLS
    [[ $1 == rmqtt ]] && udp=$P_RMQTT_QUIC tcp=$P_RMQTT_TCP
    for _ in $(seq 300); do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            echo "$1 exited at startup:" >&2
            tail -20 "$logf" >&2
            BROKER_PID=
            return 1
        fi
        [[ -n $( (in_ns ss -Hlun "sport = :$udp")) && -n $( (in_ns ss -Hltn "sport = :$tcp")) ]] && break
        sleep 0.1
    done
    # Let it finish starting (timers, thread pools) before measuring anything.
    sleep 1
}

# A gauge or counter from mqttd's /metrics (0 when absent).
metric() {
    local host=127.0.0.1
    [[ -n $NETNS ]] && host=$NS_ADDR_B
    (in_ns curl -sf "http://$host:$P_HTTP/metrics") |
        awk -v m="$1" '$1 == m {v = $2} END {print v + 0}'
}

# --- one bench run --------------------------------------------------------------------------

# bench_run TAG BROKER TRANSPORT [bench args...]: runs `mqttd bench` pinned to core 1 (in the
# generator's namespace during the loss runs) against the running broker, into
# $RUN/runs/TAG.json; its CPU time goes to $RUN/runs/TAG.client_cpu.
bench_run() {
    local tag=$1 broker=$2 transport=$3 host=127.0.0.1 port
    shift 3
    case $broker/$transport in
        mqttd/quic) port=$P_QUIC ;;
        mqttd/tls) port=$P_TLS ;;
        rmqtt/quic) port=$P_RMQTT_QUIC ;;
    esac
    local gen=()
    if [[ -n $NETNS ]]; then
        host=$NS_ADDR_B
        gen=(ip netns exec "$NS_G")
    fi
    local status=0
    times >"$RUN/times.before"
    "${gen[@]}" taskset -c 1 "$MQTTD" bench "$@" --transport "$transport" --cafile "$CA" \
        -H "$host" --port "$port" -V 311 --json --quiet --broker-pid "$BROKER_PID" \
        >"$RUN/runs/$tag.json" 2>"$RUN/logs/$tag.bench.err" || status=$?
    times >"$RUN/times.after"
    awk -v a="$(children_cpu_s "$RUN/times.before")" -v b="$(children_cpu_s "$RUN/times.after")" \
        'BEGIN {print b - a}' >"$RUN/runs/$tag.client_cpu"
    if ((status)) || ! jq -e . "$RUN/runs/$tag.json" >/dev/null 2>&1; then
        log "$tag: bench failed ($status): $(tail -3 "$RUN/logs/$tag.bench.err")"
        echo '{}' >"$RUN/runs/$tag.json"
    fi
}

results=$RUN/results.jsonl
emit() { tee -a "$results"; }

# Columns: mqttd over QUIC, mqttd over TLS, rmqtt over QUIC (throughput only).
COLUMNS=(mqttd/quic mqttd/tls)
((SKIP_RMQTT)) || COLUMNS+=(rmqtt/quic)

run_fan() { # run_fan ROUND
    local col broker transport scenario tag
    for scenario in fanin fanout; do
        for col in "${COLUMNS[@]}"; do
            broker=${col%/*} transport=${col#*/}
            tag=$scenario.$broker-$transport.$1
            start_broker "$broker" "$tag" || continue
            bench_run "$tag" "$broker" "$transport" "$scenario" --count "$FAN" --qos 0 \
                --duration "$DURATION" --drain 1
            stop_broker
            jq -c --arg b "$broker" --arg t "$transport" --arg s "$scenario" --argjson r "$1" \
                --argjson client "$(cat "$RUN/runs/$tag.client_cpu")" --argjson d "$DURATION" \
                '{broker:$b, transport:$t, scenario:$s, round:$r, received_per_sec,
                  received, errors, broker_cpu_secs, client_cpu_secs:$client,
                  broker_cpu_us_per_msg:(if .received > 0 then .broker_cpu_secs * 1e6 / .received else null end),
                  broker_cpu_share:(if .broker_cpu_secs then .broker_cpu_secs / ($d + 1) else null end),
                  client_cpu_share:($client / ($d + 1))}' "$RUN/runs/$tag.json" | emit
        done
    done
}

# Datagrams the kernel dropped, machine-wide, because a UDP socket's receive buffer was full.
udp_rcvbuf_errors() {
    awk '/^Udp:/ {if (h) {print $(c); exit} for (i = 1; i <= NF; i++) if ($i == "RcvbufErrors") c = i; h = 1}' \
        /proc/net/snmp
}

run_connect() { # run_connect ROUND
    local transport tag
    for transport in quic tls; do
        tag=connect.mqttd-$transport.$1
        start_broker mqttd "$tag" || continue
        local retries0 retries1 drops0 drops1
        retries0=$(metric mqttd_quic_retries_total)
        drops0=$(udp_rcvbuf_errors)
        bench_run "$tag" mqttd "$transport" conn --count "$CONNECT_COUNT" --connect-rate 0 \
            --max-handshakes "$CONNECT_AT_ONCE" --duration 1 --drain 0
        drops1=$(udp_rcvbuf_errors)
        retries1=$(metric mqttd_quic_retries_total)
        stop_broker
        jq -c --arg t "$transport" --argjson r "$1" \
            --argjson client "$(cat "$RUN/runs/$tag.client_cpu")" \
            --argjson retries "$((retries1 - retries0))" --argjson drops "$((drops1 - drops0))" \
            '{broker:"mqttd", transport:$t, scenario:"connect", round:$r, connect_per_sec,
              connected, errors, broker_cpu_secs, client_cpu_secs:$client, quic_retries:$retries,
              udp_rcvbuf_drops:$drops,
              cpu_us_per_connection:(if .connected > 0 then .broker_cpu_secs * 1e6 / .connected | floor else null end),
              client_cpu_us_per_connection:(if .connected > 0 then $client * 1e6 / .connected | floor else null end)}' \
            "$RUN/runs/$tag.json" | emit
    done
}

run_idle() { # run_idle ROUND
    local transport tag n=$IDLE_COUNT
    # Long enough to open every connection at IDLE_RATE, then hold them while measuring.
    local hold=$((n / IDLE_RATE + 15))
    for transport in quic tls; do
        tag=idle.mqttd-$transport.$1
        start_broker mqttd "$tag" || continue
        local before after held=0 deadline
        before=$(rss_kb "$BROKER_PID")
        bench_run "$tag" mqttd "$transport" conn --count "$n" --connect-rate "$IDLE_RATE" \
            --duration "$hold" --drain 0 &
        BENCH_PID=$!
        deadline=$((SECONDS + hold - 4))
        while ((SECONDS < deadline)); do
            held=$(metric mqttd_clients_connected)
            ((held >= n)) && break
            sleep 0.5
        done
        # Held and idle: let the broker finish the handshakes' work and the allocator settle.
        sleep 3
        held=$(metric mqttd_clients_connected)
        after=$(rss_kb "$BROKER_PID")
        wait "$BENCH_PID" || true
        BENCH_PID=
        stop_broker
        jq -nc --arg t "$transport" --argjson r "$1" --argjson before "$before" \
            --argjson after "$after" --argjson held "$held" --slurpfile c "$RUN/runs/$tag.json" \
            '{broker:"mqttd", transport:$t, scenario:"idle", round:$r, connected:$c[0].connected,
              held:$held, rss_before_kb:$before, rss_held_kb:$after,
              bytes_per_connection:(if $held > 0 then (($after - $before) * 1024) / $held | floor else null end)}' |
            emit
    done
}

netns_up() {
    ip netns add "$NS_B"
    ip netns add "$NS_G"
    NETNS_UP=1
    ip link add "$VETH_B" type veth peer name "$VETH_G"
    ip link set "$VETH_B" netns "$NS_B"
    ip link set "$VETH_G" netns "$NS_G"
    ip -n "$NS_B" addr add "$NS_ADDR_B/30" dev "$VETH_B"
    ip -n "$NS_G" addr add "$NS_ADDR_G/30" dev "$VETH_G"
    local ns
    for ns in "$NS_B" "$NS_G"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_B" link set "$VETH_B" up
    ip -n "$NS_G" link set "$VETH_G" up
}

set_loss() { # set_loss P: drop P of the packets each way on the broker's side (0: none)
    ip netns exec "$NS_B" iptables -F
    if [[ $1 != 0 ]]; then
        ip netns exec "$NS_B" iptables -A INPUT -i "$VETH_B" \
            -m statistic --mode random --probability "$1" -j DROP
        ip netns exec "$NS_B" iptables -A OUTPUT -o "$VETH_B" \
            -m statistic --mode random --probability "$1" -j DROP
    fi
}

dropped_packets() {
    ip netns exec "$NS_B" iptables -L -v -n -x | awk '$3 == "DROP" {s += $1} END {print s + 0}'
}

run_loss() { # run_loss ROUND
    local loss transport tag
    for loss in 0 "$LOSS"; do
        for transport in quic tls; do
            tag=loss-$loss.mqttd-$transport.$1
            NETNS=$NS_B
            set_loss 0
            start_broker mqttd "$tag" || { NETNS=; continue; }
            set_loss "$loss"
            bench_run "$tag" mqttd "$transport" pairs --count "$LOSS_PAIRS" \
                --total-rate "$LOSS_RATE" --qos 0 --duration "$LOSS_DURATION" --drain 2
            local dropped
            dropped=$(dropped_packets)
            set_loss 0
            stop_broker
            NETNS=
            jq -c --arg t "$transport" --argjson r "$1" --argjson loss "$loss" \
                --argjson dropped "$dropped" \
                '{broker:"mqttd", transport:$t, scenario:"loss", loss:$loss, round:$r, sent, received,
                  errors, p50_ms:.latency_ms.p50, p99_ms:.latency_ms.p99, max_ms:.latency_ms.max,
                  samples:.latency_ms.samples, packets_dropped:$dropped}' \
                "$RUN/runs/$tag.json" | emit
        done
    done
}

# --- the runs -------------------------------------------------------------------------------

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), nproc $(nproc)"
    echo "kernel: $(uname -sr); open-file limit $(ulimit -n)"
    echo "mqttd: $("$MQTTD" --version) ($(git describe --always --dirty --abbrev=12))"
    ((SKIP_RMQTT)) || echo "rmqtt: $("$RMQTTD" -V | head -1)"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$RUN/machine.txt" >&2

has_scenario loss && netns_up
for round in $(seq "$ROUNDS"); do
    has_scenario fan && run_fan "$round"
    has_scenario connect && run_connect "$round"
    has_scenario idle && run_idle "$round"
    has_scenario loss && run_loss "$round"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$RUN/machine.txt" >&2

echo
python3 - "$results" "$LOSS" "$SKIP_RMQTT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
loss, skip_rmqtt = float(sys.argv[2]), sys.argv[3] == "1"
def vals(broker, transport, scenario, key, **kw):
    return [r[key] for r in rows
            if r["broker"] == broker and r["transport"] == transport and r["scenario"] == scenario
            and all(r.get(k) == v for k, v in kw.items()) and r.get(key) is not None]
def cell(v, fmt):
    if not v:
        return "-"
    m = statistics.median(v)
    if len(v) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(min(v))} – {fmt(max(v))})"
k = lambda x: f"{x / 1000:,.1f} k"
n = lambda x: f"{x:,.0f}"
f2 = lambda x: f"{x:.2f}"
pct = lambda x: f"{x * 100:.0f} %"
cols = [("mqttd", "quic"), ("mqttd", "tls")] + ([] if skip_rmqtt else [("rmqtt", "quic")])
head = ["mqttd QUIC", "mqttd TLS"] + ([] if skip_rmqtt else ["rmqtt QUIC"])
print("| measurement | " + " | ".join(head) + " | QUIC / TLS |")
print("|---|" + "--:|" * len(head) + "--:|")
lossy = {"loss": loss}
clean = {"loss": 0}
for scenario, key, label, fmt, kw in [
    ("fanin", "received_per_sec", "fan-in QoS 0, received msg/s", k, {}),
    ("fanin", "broker_cpu_us_per_msg", "fan-in: broker CPU per message, µs", f2, {}),
    ("fanin", "broker_cpu_share", "fan-in: broker CPU (core 0)", pct, {}),
    ("fanin", "client_cpu_share", "fan-in: generator CPU (core 1)", pct, {}),
    ("fanout", "received_per_sec", "fan-out QoS 0, received msg/s", k, {}),
    ("fanout", "broker_cpu_us_per_msg", "fan-out: broker CPU per message, µs", f2, {}),
    ("fanout", "broker_cpu_share", "fan-out: broker CPU (core 0)", pct, {}),
    ("fanout", "client_cpu_share", "fan-out: generator CPU (core 1)", pct, {}),
    ("connect", "connect_per_sec", "new connections per second (5,000, 256 at a time)", n, {}),
    ("connect", "cpu_us_per_connection", "broker CPU per new connection, µs", n, {}),
    ("connect", "client_cpu_us_per_connection", "generator CPU per new connection, µs", n, {}),
    ("connect", "quic_retries", "QUIC Retries sent (above 256 handshakes at once)", n, {}),
    ("connect", "udp_rcvbuf_drops", "datagrams dropped, UDP receive buffers full", n, {}),
    ("idle", "held", "idle connections held", n, {}),
    ("idle", "bytes_per_connection", "memory per idle connection, bytes", n, {}),
    ("loss", "p50_ms", "p50 latency, no loss, ms", f2, clean),
    ("loss", "p99_ms", "p99 latency, no loss, ms", f2, clean),
    ("loss", "p50_ms", f"p50 latency, {loss:.0%} loss each way, ms", f2, lossy),
    ("loss", "p99_ms", f"p99 latency, {loss:.0%} loss each way, ms", f2, lossy),
    ("loss", "max_ms", f"max latency, {loss:.0%} loss each way, ms", f2, lossy),
]:
    v = [vals(b, t, scenario, key, **kw) for b, t in cols]
    if not any(v):
        continue
    ratio = "-"
    if v[0] and v[1] and statistics.median(v[1]):
        ratio = f"{statistics.median(v[0]) / statistics.median(v[1]):.2f}x"
    print(f"| {label} | " + " | ".join(cell(x, fmt) for x in v) + f" | {ratio} |")
PY
