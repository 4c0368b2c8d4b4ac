#!/usr/bin/env bash
# mqttd side by side with Mosquitto, rumqttd and rmqtt, on loopback.
#
# Installs what is missing, then runs every scenario against every broker in alternation
# (A, B, C, D, A, B, ...), one broker at a time, each run against a freshly started broker on
# 127.0.0.1, and writes the raw results under target/bench/results/<stamp>/. Unless --no-report
# is given, bench/report.py then turns them into docs/benchmarks.md and docs/benchmarks-*.png.
#
# This is a measurement tool, not a test: it is not part of CI and takes about 40 minutes
# with the default settings. Everything it starts is stopped on exit. It only ever targets
# 127.0.0.0/8.
#
#   bench/compare.sh                      # the full comparison (3 rounds)
#   bench/compare.sh --skip-rmqtt         # without rmqtt (its install takes ~25 min)
#   bench/compare.sh --quick              # 1 round, short runs, small memory test: a smoke test
#   bench/compare.sh --mqttd-rev HEAD     # benchmark a commit (exported, built on its own)
#   bench/compare.sh --report-only DIR    # rewrite the doc from earlier results
#   bench/compare.sh --pin on             # throughput with the broker on core 0, the load
#                                         # generator on core 1 (default: both, unpinned too)
#
# Other options: --rounds N, --duration S, --brokers a,b,..., --scenarios a,b,...
# (fanin0, fanout0, fanin1, latency, memory), --mem-counts N,N, --pin off|on|both,
# --broker-cpus LIST, --client-cpus LIST (taskset lists), --no-install, --no-report.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ROUNDS=3
DURATION=10
DRAIN=1
LATENCY_DURATION=15
LATENCY_PAIRS=100
LATENCY_RATE=20000
FAN=8
MEM_COUNTS=10000,19000
CONNECT_RATE=2000
BROKERS=mosquitto,rumqttd,rmqtt,mqttd
SCENARIOS=fanin0,fanout0,fanin1,latency,memory
SKIP_RMQTT=0
INSTALL=1
REPORT=1
MQTTD_REV=
REPORT_ONLY=
# Throughput scenarios run unpinned (broker and generator share both cores, as a deployment
# would), pinned (every broker on BROKER_CPUS, the generator on CLIENT_CPUS, so that the
# figures measure the broker), or both.
PIN=both
BROKER_CPUS=0
CLIENT_CPUS=1
# MQTT 3.1.1 everywhere: the version every broker here implements most completely.
PROTOCOL=311
# mqttd's defaults, written into every broker's configuration.
MAX_QUEUED=1000
MAX_INFLIGHT=64

HOST=127.0.0.1
PORT_MOSQUITTO=18831
PORT_RUMQTTD=18832
PORT_RUMQTTD_V5=18842
PORT_RMQTT=18833
PORT_RMQTT_RPC=18843
PORT_RMQTT_INTERNAL=18853
PORT_MQTTD=18834
# Source addresses for the memory test, so that 19,000 connections need no more than
# ~2,400 ephemeral ports each.
BIND=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --skip-rmqtt) SKIP_RMQTT=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; LATENCY_DURATION=$2; shift ;;
        --brokers) BROKERS=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --mem-counts) MEM_COUNTS=$2; shift ;;
        --mqttd-rev) MQTTD_REV=$2; shift ;;
        --no-install) INSTALL=0 ;;
        --no-report) REPORT=0 ;;
        --report-only) REPORT_ONLY=$2; shift ;;
        --pin) PIN=$2; shift ;;
        --broker-cpus) BROKER_CPUS=$2; shift ;;
        --client-cpus) CLIENT_CPUS=$2; shift ;;
        --quick) ROUNDS=1; DURATION=3; LATENCY_DURATION=3; MEM_COUNTS=1000,2000 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done


BENCH_DIR=$ROOT/target/bench
VENV=$BENCH_DIR/venv

report() {
    local results=$1
    if [[ ! -x $VENV/bin/python ]]; then
        python3 -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
        "$VENV/bin/pip" install --quiet matplotlib
    fi
    "$VENV/bin/python" "$ROOT/bench/report.py" "$results" "$ROOT/docs"
}

if [[ -n $REPORT_ONLY ]]; then
    report "$REPORT_ONLY"
    exit 0
fi

if ((SKIP_RMQTT)); then
    BROKERS=$(tr ',' '\n' <<<"$BROKERS" | grep -vx rmqtt | paste -sd, -)
fi
IFS=, read -r -a BROKER_LIST <<<"$BROKERS"
IFS=, read -r -a SCENARIO_LIST <<<"$SCENARIOS"
IFS=, read -r -a MEM_COUNT_LIST <<<"$MEM_COUNTS"
case $PIN in
    off) PIN_LIST=("") ;;
    on) PIN_LIST=(-pinned) ;;
    both) PIN_LIST=("" -pinned) ;;
    *) echo "--pin takes off, on or both" >&2; exit 2 ;;
esac
if [[ $PIN != off ]] && ! command -v taskset >/dev/null; then
    echo "--pin $PIN needs taskset (util-linux)" >&2
    exit 2
fi
# Scenarios that run pinned as well; the others (latency, memory) always run unpinned.
pinnable() { [[ $1 == fanin0 || $1 == fanout0 || $1 == fanin1 ]]; }
has_broker() { [[ ",$BROKERS," == *",$1,"* ]]; }

# --- installation -------------------------------------------------------------------------


CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
RUMQTTD=$CARGO_BIN/rumqttd
RMQTTD=$CARGO_BIN/rmqttd
MQTTD=$ROOT/target/release/mqttd

if ((INSTALL)); then
    apt_install procps iproute2 jq linux-perf
    if has_broker mosquitto; then apt_install mosquitto; fi
    if has_broker rumqttd && [[ $("$RUMQTTD" --version 2>/dev/null) != "rumqttd 0.20.0" ]]; then
        log "installing rumqttd 0.20.0"
        cargo install rumqttd --version 0.20.0 --locked
    fi
    if has_broker rmqtt && ! "$RMQTTD" -V 2>/dev/null | grep -q '0\.24\.0'; then
        log "installing rmqttd 0.24.0 (about 25 minutes on 2 cores)"
        apt_install cmake protobuf-compiler
        cargo install rmqttd --version 0.24.0 --locked
    fi
fi

if has_broker mqttd; then
    if [[ -n $MQTTD_REV ]]; then
        # Benchmark a commit, not the work tree: export it and build it in a target directory
        # of its own, so that neither disturbs the other.
        rev=$(git rev-parse --verify "$MQTTD_REV^{commit}")
        src=$BENCH_DIR/src-$rev
        if [[ ! -f $src/Cargo.toml ]]; then
            mkdir -p "$src"
            git archive "$rev" | tar -x -C "$src"
        fi
        log "building mqttd at $rev"
        cargo build --release --locked -p mqttd --manifest-path "$src/Cargo.toml" \
            --target-dir "$BENCH_DIR/mqttd-target"
        MQTTD=$BENCH_DIR/mqttd-target/release/mqttd
        MQTTD_DESC=$rev
    else
        log "building mqttd (work tree)"
        cargo build --release --locked -p mqttd
        MQTTD_DESC=$(git describe --always --dirty --abbrev=40)
    fi
fi
# The load generator is always the work tree's `mqttd bench`, so every broker faces the same
# client.
if [[ ! -x $ROOT/target/release/mqttd ]]; then
    cargo build --release --locked -p mqttd
fi
BENCH_BIN=$ROOT/target/release/mqttd

# --- run directory, configurations ------------------------------------------------------

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN=$BENCH_DIR/results/$STAMP
mkdir -p "$RUN/conf" "$RUN/runs" "$RUN/logs"
log "results in $RUN"

# Brokers may hold 19,000 sockets; the bench client as many again.
ulimit -n "$(ulimit -Hn)"

cat >"$RUN/conf/mosquitto.conf" <<EOF
# Mosquitto: loopback listener, anonymous, no persistence, queue limits equal to mqttd's.
listener $PORT_MOSQUITTO $HOST
allow_anonymous true
set_tcp_nodelay true
max_queued_messages $MAX_QUEUED
max_inflight_messages $MAX_INFLIGHT
max_connections -1
persistence false
log_dest stderr
log_type error
log_type warning
EOF

cat >"$RUN/conf/rumqttd.toml" <<EOF
# rumqttd 0.20: a v4 and a v5 listener on loopback, room for 25,000 connections, a 100 MB
# commit log segment (x10) per filter, outgoing in-flight window equal to mqttd's.
id = 0

[router]
id = 0
max_connections = 25000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "$HOST:$PORT_RUMQTTD"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = $MAX_INFLIGHT
    dynamic_filters = true

[v5.1]
name = "v5-1"
listen = "$HOST:$PORT_RUMQTTD_V5"
next_connection_delay_ms = 0
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = $MAX_INFLIGHT
EOF

cat >"$RUN/conf/rmqtt.toml" <<EOF
# rmqtt 0.24: one TCP listener on loopback, TCP_NODELAY, no rate limit on the message queue,
# queue and in-flight limits equal to mqttd's. Plugins that are not needed to route messages
# are off (the ACL plugin, the counter and the HTTP API, which would listen on 0.0.0.0).
node.id = 1
rpc.server_addr = "$HOST:$PORT_RMQTT_RPC"
log.to = "console"
log.level = "warn"
plugins.dir = "$RUN/conf/rmqtt-plugins/"
plugins.default_startups = []
plugins.disabled_default_startups = ["rmqtt-acl", "rmqtt-counter", "rmqtt-http-api"]

listener.tcp.external.addr = "$HOST:$PORT_RMQTT"
listener.tcp.external.max_connections = 1024000
listener.tcp.external.max_handshaking_limit = 5000
listener.tcp.external.backlog = 4096
listener.tcp.external.nodelay = true
listener.tcp.external.allow_anonymous = true
listener.tcp.external.max_inflight = $MAX_INFLIGHT
listener.tcp.external.max_mqueue_len = $MAX_QUEUED
listener.tcp.external.mqueue_rate_limit = "4294967295,1s"
listener.tcp.external.max_packet_size = "1MB"
# rmqtt requires the internal listener's address even when it is off.
listener.tcp.internal.enable = false
listener.tcp.internal.addr = "127.0.0.1:$PORT_RMQTT_INTERNAL"
EOF
mkdir -p "$RUN/conf/rmqtt-plugins"

cat >"$RUN/conf/mqttd.toml" <<EOF
# mqttd: its defaults, spelled out.
listen = ["tcp://$HOST:$PORT_MQTTD"]
data_dir = "$RUN/mqttd-data"
allow_anonymous = true
max_queued_messages = $MAX_QUEUED
max_inflight_messages = $MAX_INFLIGHT
EOF

port_of() {
    case $1 in
        mosquitto) echo $PORT_MOSQUITTO ;;
        rumqttd) echo $PORT_RUMQTTD ;;
        rmqtt) echo $PORT_RMQTT ;;
        mqttd) echo $PORT_MQTTD ;;
    esac
}

for b in "${BROKER_LIST[@]}"; do
    port=$(port_of "$b")
    [[ -n $port ]] || { echo "unknown broker $b" >&2; exit 2; }
    if [[ -n $(ss -Hltn "sport = :$port") ]]; then
        echo "port $port (for $b) is already in use" >&2
        exit 1
    fi
done

# --- broker lifecycle -----------------------------------------------------------------------

cleanup() {
    [[ -n $BENCH_PID ]] && kill -KILL "$BENCH_PID" 2>/dev/null || true
    stop_broker
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_broker() { launch_broker "$@"; }

established() { ss -Htn state established "( sport = :$1 )" | wc -l; }

# Waits (up to QUIET_WAIT seconds, default 600) for the machine to be quiet (less than
# QUIET_THRESHOLD of the CPU busy, default 0.10), so that nothing else (a build, a test suite, a
# fuzzer) takes CPU from the run, and sets QUIET_BUSY to the share that was busy just before.

# --- scenarios ----------------------------------------------------------------------------

# The bench arguments of each scenario, without the port (`-pinned` variants take the same).
bench_args() {
    local common=(--size 64 -V "$PROTOCOL" --json --quiet)
    case ${1%-pinned} in
        fanin0) echo fanin --count $FAN --qos 0 --duration "$DURATION" --drain "$DRAIN" "${common[@]}" ;;
        fanout0) echo fanout --count $FAN --qos 0 --duration "$DURATION" --drain "$DRAIN" "${common[@]}" ;;
        fanin1) echo fanin --count $FAN --qos 1 --duration "$DURATION" --drain "$DRAIN" "${common[@]}" ;;
        latency) echo pairs --count $LATENCY_PAIRS --total-rate $LATENCY_RATE --qos 0 \
            --duration "$LATENCY_DURATION" --drain "$DRAIN" "${common[@]}" ;;
        memory-*)
            local n=${1#memory-}
            # Long enough to open every connection at CONNECT_RATE and then hold them.
            local hold=$((n / CONNECT_RATE + 15))
            echo conn --count "$n" --connect-rate $CONNECT_RATE --bind $BIND --qos 0 \
                --duration $hold --drain 0 "${common[@]}" ;;
    esac
}



run_memory() {
    local n=$1 broker=$2 round=$3 port tag args scenario=memory-$1
    port=$(port_of "$broker")
    tag=$scenario.$broker.$round
    read -r -a args <<<"$(bench_args "$scenario")"
    wait_quiet
    start_broker "$broker" "$tag" || return 0
    local rss0 rss1 conns=0 status=0 deadline
    sleep 1
    rss0=$(rss_kb "$BROKER_PID")
    "$BENCH_BIN" bench "${args[@]}" --port "$port" \
        >"$RUN/runs/$tag.json" 2>"$RUN/logs/$tag.bench.err" &
    BENCH_PID=$!
    deadline=$((SECONDS + n / CONNECT_RATE + 10))
    while ((SECONDS < deadline)) && kill -0 "$BENCH_PID" 2>/dev/null; do
        conns=$(established "$port")
        ((conns >= n)) && break
        sleep 0.5
    done
    # Held and idle: let the broker finish the handshakes' work and the allocator settle.
    sleep 3
    conns=$(established "$port")
    rss1=$(rss_kb "$BROKER_PID" 2>/dev/null || echo 0)
    wait "$BENCH_PID" || status=$?
    BENCH_PID=
    stop_broker
    json_meta scenario "\"$scenario\"" broker "\"$broker\"" round "$round" exit "$status" \
        busy_before "$QUIET_BUSY" connections "$n" held "$conns" rss_before_kb "$rss0" rss_held_kb "$rss1" \
        >"$RUN/runs/$tag.meta.json"
    log "$tag: $conns held, RSS $rss0 -> $rss1 kB," \
        "$(((rss1 - rss0) * 1024 / (conns > 0 ? conns : 1))) B per connection"
}

# --- what was measured, on what -------------------------------------------------------------


{
    echo "{"
    echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
    echo "  \"nproc\": $(nproc),"
    echo "  \"cpu\": $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' | jq -R .),"
    echo "  \"mem_total_kb\": $(awk '/^MemTotal:/ {print $2}' /proc/meminfo),"
    echo "  \"kernel\": \"$(uname -sr)\","
    echo "  \"os\": $( (. /etc/os-release && echo "$PRETTY_NAME") | jq -R .),"
    echo "  \"nofile_hard\": $(ulimit -Hn),"
    echo "  \"rounds\": $ROUNDS, \"duration_s\": $DURATION, \"latency_duration_s\": $LATENCY_DURATION,"
    echo "  \"drain_s\": $DRAIN, \"protocol\": \"$PROTOCOL\", \"connect_rate\": $CONNECT_RATE,"
    echo "  \"skip_rmqtt\": $SKIP_RMQTT,"
    echo "  \"broker_cpus\": \"$BROKER_CPUS\", \"client_cpus\": \"$CLIENT_CPUS\","
    echo "  \"brokers\": $(printf '%s\n' "${BROKER_LIST[@]}" | jq -R . | jq -s -c .),"
    echo "  \"versions\": {"
    sep=""
    for b in "${BROKER_LIST[@]}"; do
        printf '%s    "%s": %s' "$sep" "$b" "$(version_of "$b" | jq -R .)"
        sep=$',\n'
    done
    echo
    echo "  },"
    echo "  \"rustc\": $(rustc --version | jq -R .),"
    echo "  \"bench_client\": $(echo "mqttd bench, $(git describe --always --dirty --abbrev=12)" | jq -R .),"
    echo "  \"commands\": {"
    sep=""
    for s in "${SCENARIO_LIST[@]}"; do
        if [[ $s == memory ]]; then
            for n in "${MEM_COUNT_LIST[@]}"; do
                printf '%s    "memory-%s": %s' "$sep" "$n" \
                    "$(echo "mqttd bench $(bench_args "memory-$n") --port PORT" | jq -R .)"
                sep=$',\n'
            done
        else
            for pin in "${PIN_LIST[@]}"; do
                if [[ -z $pin ]] || pinnable "$s"; then
                    prefix=
                    [[ -z $pin ]] || prefix="taskset -c $CLIENT_CPUS "
                    printf '%s    "%s%s": %s' "$sep" "$s" "$pin" \
                        "$(echo "${prefix}mqttd bench $(bench_args "$s") --port PORT" | jq -R .)"
                    sep=$',\n'
                fi
            done
        fi
    done
    echo
    echo "  }"
    echo "}"
} >"$RUN/machine.json"
jq . "$RUN/machine.json" >/dev/null

# --- the runs -------------------------------------------------------------------------------

for scenario in "${SCENARIO_LIST[@]}"; do
    if [[ $scenario == memory ]]; then
        for n in "${MEM_COUNT_LIST[@]}"; do
            for round in $(seq "$ROUNDS"); do
                for broker in "${BROKER_LIST[@]}"; do
                    run_memory "$n" "$broker" "$round"
                done
            done
        done
    else
        for pin in "${PIN_LIST[@]}"; do
            [[ -z $pin ]] || pinnable "$scenario" || continue
            if [[ -n $pin ]]; then
                PIN_BROKER=$BROKER_CPUS PIN_CLIENT=$CLIENT_CPUS
            else
                PIN_BROKER= PIN_CLIENT=
            fi
            for round in $(seq "$ROUNDS"); do
                for broker in "${BROKER_LIST[@]}"; do
                    run_traffic "$scenario$pin" "$broker" "$round"
                done
            done
        done
        PIN_BROKER= PIN_CLIENT=
    fi
done

log "done: $RUN"
if ((REPORT)); then
    report "$RUN"
fi
