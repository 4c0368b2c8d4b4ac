#!/usr/bin/env bash
# What mqttd holds per idle connection, per transport, and per subscription, on loopback.
#
# For each transport (tcp, tls, ws, quic) it starts a fresh broker (release build, its
# defaults, a generated certificate), opens COUNT idle MQTT 3.1.1 connections with
# `mqttd bench conn` (keep alive 300 s, no subscriptions) at RATE per second, waits until
# `/metrics` counts them all, lets the broker settle for 3 s and reads its RSS (`VmRSS`).
# Memory per connection is the RSS growth over the connections held, as in bench/compare.sh.
#
# Then, over TCP, SUB_CLIENTS connections with SUBS subscriptions each (distinct exact
# filters, 100 per SUBSCRIBE): memory per subscription is the RSS growth beyond what the same
# number of idle connections held, divided by the subscriptions held.
#
#   bench/memory.sh                                  # everything, one round
#   bench/memory.sh --rounds 3 --transports tcp,tls  # some
#   bench/memory.sh --count 2000 --sub-clients 1000  # quicker
#   MQTTD_BIN=/tmp/mqttd-main bench/memory.sh --no-build  # another build of mqttd (a before)
#
# Prints one line of JSON per measurement. A measurement tool, not a test: not part of CI. It
# only ever targets 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ROUNDS=1
COUNT=10000
RATE=2000
TRANSPORTS=tcp,tls,ws,quic
SUB_CLIENTS=10000
SUBS=100
BUILD=1
while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --count) COUNT=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --transports) TRANSPORTS=$2; shift ;;
        --sub-clients) SUB_CLIENTS=$2; shift ;;
        --subs-per-client) SUBS=$2; shift ;;
        --no-build) BUILD=0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

((BUILD)) && cargo build --release --locked -p mqttd >&2
MQTTD=${MQTTD_BIN:-$ROOT/target/release/mqttd}
RUN=$(mktemp -d /tmp/mqttd-memory.XXXXXX)
BROKER_PID=
BENCH_PID=
cleanup() {
    [[ -n $BENCH_PID ]] && kill "$BENCH_PID" 2>/dev/null || true
    [[ -n $BROKER_PID ]] && kill "$BROKER_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
need=$((COUNT > SUB_CLIENTS ? COUNT : SUB_CLIENTS))
if (($(ulimit -n) < need + 1000)); then
    echo "open-file limit $(ulimit -n) is below $need connections plus room" >&2
    exit 1
fi

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
free_port() { # free_port tcp|udp
    python3 -c 'import socket, sys
s = socket.socket(type=socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' "$1"
}
P_TCP=$(free_port tcp); P_TLS=$(free_port tcp); P_WS=$(free_port tcp)
P_QUIC=$(free_port udp); P_HTTP=$(free_port tcp)
cat >"$RUN/mqttd.toml" <<CONF
# mqttd: its defaults, one listener per transport, and /metrics.
listen = ["tcp://127.0.0.1:$P_TCP", "tls://127.0.0.1:$P_TLS", "ws://127.0.0.1:$P_WS",
          "quic://127.0.0.1:$P_QUIC", "http://127.0.0.1:$P_HTTP"]
data_dir = "$RUN/data"
allow_anonymous = true
CONF
CA=$RUN/data/tls/ca.pem

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# The anonymous part of the RSS: without the pages of the binary itself, which the kernel maps
# in as they are first touched (and more of them at once when the file is in the page cache,
# as a freshly built one is), so that they can move the RSS by megabytes between builds.
anon_kb() { awk '/^RssAnon:/ {print $2}' "/proc/$1/status"; }
metric() {
    curl -sf "http://127.0.0.1:$P_HTTP/metrics" | awk -v m="$1" '$1 == m {v = $2} END {print v + 0}'
}
start_broker() {
    rm -rf "$RUN/data/store"
    RUST_LOG=warn "$MQTTD" --config "$RUN/mqttd.toml" >/dev/null 2>"$RUN/mqttd.log" &
    BROKER_PID=$!
    for _ in $(seq 300); do
        [[ -f $CA ]] && curl -sf "http://127.0.0.1:$P_HTTP/health" >/dev/null && break
        sleep 0.1
    done
    # Let it finish starting (timers, thread pools) before measuring anything.
    sleep 1
}
stop_broker() {
    kill -TERM "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=
    sleep 1
}
port_of() {
    case $1 in tcp) echo "$P_TCP" ;; tls) echo "$P_TLS" ;; ws) echo "$P_WS" ;; quic) echo "$P_QUIC" ;; esac
}

# hold TRANSPORT N SUBS: opens N connections with SUBS subscriptions each and waits until the
# broker holds them all; prints "held subscriptions rss_before_kb rss_held_kb anon_before_kb
# anon_held_kb".
hold() {
    local transport=$1 n=$2 subs=$3 before after anon0 anon held=0 subscribed=0 deadline
    local hold_s=$((n / RATE + 20 + n * subs / 100000))
    start_broker
    before=$(rss_kb "$BROKER_PID")
    anon0=$(anon_kb "$BROKER_PID")
    "$MQTTD" bench conn --count "$n" --connect-rate "$RATE" --duration "$hold_s" --drain 0 \
        -V 311 --subs-per-client "$subs" --transport "$transport" --port "$(port_of "$transport")" \
        --cafile "$CA" --json --quiet >"$RUN/bench.json" 2>"$RUN/bench.err" &
    BENCH_PID=$!
    deadline=$((SECONDS + hold_s - 5))
    while ((SECONDS < deadline)); do
        held=$(metric mqttd_clients_connected)
        subscribed=$(metric mqttd_subscriptions)
        ((held >= n && subscribed >= n * subs)) && break
        sleep 0.5
    done
    # Held and idle: let the broker finish the handshakes' work and the allocator settle.
    sleep 3
    held=$(metric mqttd_clients_connected)
    subscribed=$(metric mqttd_subscriptions)
    after=$(rss_kb "$BROKER_PID")
    anon=$(anon_kb "$BROKER_PID")
    kill "$BENCH_PID" 2>/dev/null || true
    wait "$BENCH_PID" 2>/dev/null || true
    BENCH_PID=
    stop_broker
    echo "$held $subscribed $before $after $anon0 $anon"
}

for round in $(seq "$ROUNDS"); do
    for transport in ${TRANSPORTS//,/ }; do
        read -r held _ before after anon0 anon < <(hold "$transport" "$COUNT" 0)
        per=$(((after - before) * 1024 / (held > 0 ? held : 1)))
        anon_per=$(((anon - anon0) * 1024 / (held > 0 ? held : 1)))
        log "idle $transport, round $round: $held held, RSS $before -> $after kB, $per B per connection" \
            "(anonymous $anon0 -> $anon kB, $anon_per B)"
        jq -nc --arg t "$transport" --argjson r "$round" --argjson held "$held" \
            --argjson before "$before" --argjson after "$after" --argjson per "$per" \
            --argjson anon0 "$anon0" --argjson anon "$anon" --argjson anon_per "$anon_per" \
            '{scenario:"idle", transport:$t, round:$r, held:$held, rss_before_kb:$before,
              rss_held_kb:$after, bytes_per_connection:$per, anon_before_kb:$anon0,
              anon_held_kb:$anon, anon_bytes_per_connection:$anon_per}'
    done
    if ((SUB_CLIENTS > 0 && SUBS > 0)); then
        read -r held0 _ before0 after0 _ < <(hold tcp "$SUB_CLIENTS" 0)
        read -r held subs before after _ < <(hold tcp "$SUB_CLIENTS" "$SUBS")
        # The idle connections' share, scaled to the clients held in the second run.
        conns_kb=$(((after0 - before0) * held / (held0 > 0 ? held0 : 1)))
        per=$((((after - before) - conns_kb) * 1024 / (subs > 0 ? subs : 1)))
        log "subscriptions, round $round: $held clients, $subs subscriptions," \
            "RSS $before -> $after kB ($conns_kb kB for the connections), $per B per subscription"
        jq -nc --argjson r "$round" --argjson held "$held" --argjson subs "$subs" \
            --argjson before "$before" --argjson after "$after" --argjson conns "$conns_kb" \
            --argjson per "$per" \
            '{scenario:"subscriptions", transport:"tcp", round:$r, held:$held, subscriptions:$subs,
              rss_before_kb:$before, rss_held_kb:$after, connections_kb:$conns,
              bytes_per_subscription:$per}'
    fi
done
