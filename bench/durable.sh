#!/usr/bin/env bash
# Durable sessions on loopback: mqttd with `durability = "sync"` against Mosquitto in memory.
#
#  (a) QoS 1 fan-in into persistent sessions: 8 publishers -> 1 persistent subscriber, and
#      8 publisher/persistent-subscriber pairs, on mqttd and on Mosquitto; with the clean-session
#      fan-in of bench/compare.sh (fanin1) on both as the reference, all in alternation.
#  (b) restart with 100,000 stored messages: a persistent session is left offline, 100,000
#      QoS 1 messages of 64 bytes are published into it, mqttd is stopped (SIGTERM, and in
#      separate runs SIGKILL) and started again on the same data directory; measured from the
#      start to the "mqttd listening on" line and to the resumed subscriber's 100,000th message.
#  (c) disk per stored message, from the same runs: the store directory with 100,000 messages
#      stored minus with the session alone, divided by 100,000.
#
# Raw results go to target/bench/durable/<stamp>/; bench/durable_report.py turns them into a
# Markdown section, written to bench/out/durable.md and standard output. Not part of CI; about
# 8 minutes with the defaults. Only ever targets 127.0.0.1; everything it starts is stopped on
# exit. A build without the durable store still runs every step (nothing survives the restart,
# and the report says so).
#
#   bench/durable.sh                       # everything, 3 rounds
#   bench/durable.sh --quick               # 1 round, 3 s runs, 10,000 stored messages
#   bench/durable.sh --report-only DIR     # rewrite bench/out/durable.md from earlier results
#
# Other options: --rounds N, --duration S, --stored N, --durability sync|batch|none,
# --parts fanin,restart, --protocol 311|5, --out FILE, --no-build, --no-install, and
# --mqttd BIN to measure another mqttd binary (the load generator stays the work tree's).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=3
DURATION=10
DRAIN=1
FAN=8
STORED=100000
DURABILITY=sync
PARTS=fanin,restart
# MQTT 3.1.1 as in bench/compare.sh; a persistent session is then clean session 0 (no expiry,
# on mqttd as on Mosquitto). With 5, sessions ask for a one-hour expiry.
PROTOCOL=311
INSTALL=1
BUILD=1
REPORT_ONLY=
MQTTD_BIN=
OUT=$ROOT/bench/out/durable.md
# As in bench/compare.sh (mqttd's defaults).
MAX_QUEUED=1000
MAX_INFLIGHT=64
# Longest a restarted broker may take to print its listener, and a resumed subscriber to drain.
RESTART_TIMEOUT=120

HOST=127.0.0.1
PORT_MOSQUITTO=18851
PORT_MQTTD=18854

usage() { sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --stored) STORED=$2; shift ;;
        --durability) DURABILITY=$2; shift ;;
        --parts) PARTS=$2; shift ;;
        --protocol) PROTOCOL=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        --mqttd) MQTTD_BIN=$(realpath "$2"); shift ;;
        --no-install) INSTALL=0 ;;
        --report-only) REPORT_ONLY=$2; shift ;;
        --quick) ROUNDS=1; DURATION=3; STORED=10000 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case $DURABILITY in
    sync | batch | none) ;;
    *) echo "--durability: sync, batch or none" >&2; exit 2 ;;
esac
case $PROTOCOL in
    311 | 5) ;;
    *) echo "--protocol: 311 or 5" >&2; exit 2 ;;
esac
has_part() { [[ ",$PARTS," == *",$1,"* ]]; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

report() { write_report "$ROOT/bench/durable_report.py" "$1"; }

if [[ -n $REPORT_ONLY ]]; then
    report "$REPORT_ONLY"
    exit 0
fi

# --- what is shared with bench/compare.sh ---------------------------------------------------

# What those functions read that this script does not otherwise set.
# shellcheck disable=SC2034
LATENCY_DURATION=0

port_of() {
    case $1 in
        mosquitto) echo $PORT_MOSQUITTO ;;
        mqttd) echo $PORT_MQTTD ;;
    esac
}

# Every run starts on an empty data directory.
start_broker() {
    rm -rf "$RUN/mqttd-data"
    launch_broker "$@"
}

cleanup() {
    if [[ -n $BENCH_PID ]]; then kill -KILL "$BENCH_PID" 2>/dev/null || true; fi
    stop_broker
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- installation and build -----------------------------------------------------------------

if ((INSTALL)); then
    apt_install procps iproute2 jq mosquitto
fi
# The load generator is always the work tree's `mqttd bench`.
BENCH_BIN=$ROOT/target/release/mqttd
if ((BUILD)); then
    log "building mqttd (work tree)"
    cargo build --release --locked -p mqttd
fi
[[ -x $BENCH_BIN ]] || { echo "no $BENCH_BIN: build it or drop --no-build" >&2; exit 1; }
MQTTD=${MQTTD_BIN:-$BENCH_BIN}
# shellcheck disable=SC2034 # for version_of
if [[ -n $MQTTD_BIN ]]; then
    MQTTD_DESC=$MQTTD_BIN
else
    MQTTD_DESC=$(git describe --always --dirty --abbrev=40)
fi

for b in mosquitto mqttd; do
    if [[ -n $(ss -Hltn "sport = :$(port_of $b)") ]]; then
        echo "port $(port_of $b) (for $b) is already in use" >&2
        exit 1
    fi
done

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN=$ROOT/target/bench/durable/$STAMP
mkdir -p "$RUN/conf" "$RUN/runs" "$RUN/logs"
log "results in $RUN"

# --- configurations -------------------------------------------------------------------------

# Does this build know the durable store's settings? Unknown keys are an error, so a build
# from before it refuses them: then the runs go on without them (and without persistence).
cat >"$RUN/conf/probe.toml" <<EOF
listen = ["tcp://$HOST:0"]
data_dir = "$RUN/probe-data"
allow_anonymous = true
persistence = true
durability = "$DURABILITY"
EOF
probe_durable_keys() {
    local pid status=1
    "$MQTTD" --config "$RUN/conf/probe.toml" >"$RUN/logs/probe.stdout" 2>"$RUN/logs/probe.log" &
    pid=$!
    for _ in $(seq 100); do
        if grep -q '^mqttd listening on' "$RUN/logs/probe.stdout"; then
            status=0
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$RUN/probe-data"
    return $status
}
DURABLE_KEYS=0
if probe_durable_keys; then
    DURABLE_KEYS=1
else
    log "this mqttd refuses persistence/durability" \
        "($(grep -m1 -i error "$RUN/logs/probe.log" || true)): running with its defaults instead"
fi

# mqttd_config QUEUED: an mqttd configuration with `max_queued_messages = QUEUED`.
mqttd_config() {
    cat <<EOF
listen = ["tcp://$HOST:$PORT_MQTTD"]
data_dir = "$RUN/mqttd-data"
allow_anonymous = true
max_queued_messages = $1
max_inflight_messages = $MAX_INFLIGHT
EOF
    if ((DURABLE_KEYS)); then
        printf 'persistence = true\ndurability = "%s"\n' "$DURABILITY"
    fi
}
{
    echo "# mqttd for the fan-in runs: bench/compare.sh's settings, plus the durable store."
    mqttd_config $MAX_QUEUED
} >"$RUN/conf/mqttd.toml"
{
    echo "# mqttd for the restart runs: room for every stored message in one session."
    mqttd_config $((STORED + MAX_QUEUED))
    echo "max_queued_bytes = 0"
} >"$RUN/conf/mqttd-restart.toml"

cat >"$RUN/conf/mosquitto.conf" <<EOF
# Mosquitto as in bench/compare.sh: loopback, anonymous, queue limits equal to mqttd's, no
# persistence: its persistent sessions live in memory (it only writes them out every
# autosave_interval, and at exit, when persistence is on).
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

# --- scenarios ------------------------------------------------------------------------------

# Session options that make a client's session persistent, for $PROTOCOL.
SESSION_ARGS=(--clean-start false)
if [[ $PROTOCOL == 5 ]]; then SESSION_ARGS+=(--session-expiry 3600); fi

# The bench arguments of each fan-in scenario, without the port (run_traffic's interface).
bench_args() {
    local common=(--size 64 -V "$PROTOCOL" --json --quiet)
    local persistent=(--client-id-prefix durable --session-clients sub "${SESSION_ARGS[@]}")
    case $1 in
        fanin1) echo fanin --count $FAN --qos 1 --duration "$DURATION" --drain "$DRAIN" \
            "${common[@]}" ;;
        fanin1-persistent) echo fanin --count $FAN --qos 1 --duration "$DURATION" --drain "$DRAIN" \
            "${persistent[@]}" "${common[@]}" ;;
        pairs1-persistent) echo pairs --count $FAN --qos 1 --duration "$DURATION" --drain "$DRAIN" \
            "${persistent[@]}" "${common[@]}" ;;
    esac
}
FANIN_SCENARIOS=(fanin1 fanin1-persistent pairs1-persistent)

# The restart runs' publishers: STORED QoS 1 messages of 64 bytes, in FAN equal shares.
RESTART_PUBS=$FAN
((STORED % RESTART_PUBS == 0)) || RESTART_PUBS=1
FILL_ARGS=(pub --count "$RESTART_PUBS" --messages $((STORED / RESTART_PUBS)) --qos 1 --size 64
    --duration 600 --drain 60 -V "$PROTOCOL" --json --quiet)
SUBSCRIBE_ARGS=(sub --client-id-prefix durable-restart "${SESSION_ARGS[@]}" --qos 1
    --topic 'bench/#' -V "$PROTOCOL" --json --quiet)
# The resumed subscriber ends with the last stored message, or at once if there is no session.
DRAIN_ARGS=("${SUBSCRIBE_ARGS[@]}" --duration "$RESTART_TIMEOUT" --expect "$STORED"
    --require-session)

# Allocated and apparent bytes under a directory (0 0 when it does not exist).
dir_bytes() {
    if [[ -d $1 ]]; then
        echo "$(du -s --block-size=1 "$1" | cut -f1) $(du -sb "$1" | cut -f1)"
    else
        echo "0 0"
    fi
}

# --- restart --------------------------------------------------------------------------------

RESTART_PID=
RESTART_T0=
# Starts mqttd with the restart configuration on the current data directory; standard output
# lines are stamped with the time they were read, so the listener line can be timed exactly.
start_mqttd_timed() {
    local tag=$1
    RESTART_T0=$EPOCHREALTIME
    RUST_LOG=info "$MQTTD" --config "$RUN/conf/mqttd-restart.toml" \
        2>"$RUN/logs/$tag.log" \
        > >(while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done \
            >"$RUN/logs/$tag.stdout") &
    RESTART_PID=$!
    BROKER_PID=$RESTART_PID
}

# Waits for the listener line; prints the seconds from the start to it (empty on failure).
wait_listening() {
    local tag=$1 deadline=$((SECONDS + RESTART_TIMEOUT)) at
    while ((SECONDS < deadline)); do
        at=$(awk '$2 == "mqttd" && $3 == "listening" && $5 ~ /^tcp:/ {print $1; exit}' \
            "$RUN/logs/$tag.stdout" 2>/dev/null)
        if [[ -n $at ]]; then
            awk -v a="$RESTART_T0" -v b="$at" 'BEGIN {printf "%.3f", b - a}'
            return 0
        fi
        kill -0 "$RESTART_PID" 2>/dev/null || break
        sleep 0.01
    done
    log "mqttd did not start: $(tail -3 "$RUN/logs/$tag.log")"
    return 1
}

# Stops the restart broker with SIGNAL; sets STOP_S to the seconds it took to exit (after 60,
# SIGKILL) and STOP_STATUS to its exit status.
STOP_S=
STOP_STATUS=
stop_with() {
    local signal=$1 t0 deadline=$((SECONDS + 60))
    t0=$EPOCHREALTIME
    STOP_STATUS=0
    # The shell reports a job killed by a signal on standard error as it reaps it: not news.
    {
        kill "-$signal" "$RESTART_PID" || true
        while kill -0 "$RESTART_PID"; do
            if ((SECONDS >= deadline)); then kill -KILL "$RESTART_PID" || true; fi
            sleep 0.005
        done
        STOP_S=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.3f", b - a}')
        wait "$RESTART_PID" || STOP_STATUS=$?
    } 2>/dev/null
    RESTART_PID=
    # shellcheck disable=SC2034 # for stop_broker
    BROKER_PID=
}

run_restart() {
    local signal=$1 round=$2 tag=restart.${1,,}.$2
    local cold listen=null stop_s stop_status drain_bench=null
    local empty full stopped drained=(0 0) fill
    wait_quiet
    rm -rf "$RUN/mqttd-data"
    start_mqttd_timed "$tag.first"
    if ! cold=$(wait_listening "$tag.first"); then
        stop_with KILL
        return 0
    fi
    # The session, subscribed to bench/#, left offline.
    "$BENCH_BIN" bench "${SUBSCRIBE_ARGS[@]}" --duration 0 --port "$PORT_MQTTD" \
        >"$RUN/runs/$tag.subscribe.json" 2>"$RUN/logs/$tag.subscribe.err" || true
    read -r -a empty < <(dir_bytes "$RUN/mqttd-data/store")
    # STORED QoS 1 messages into it, each one acknowledged.
    "$BENCH_BIN" bench "${FILL_ARGS[@]}" --port "$PORT_MQTTD" >"$RUN/runs/$tag.fill.json" \
        2>"$RUN/logs/$tag.fill.err" || true
    fill=$(jq -c '{acked, sent, duration_secs, errors}' "$RUN/runs/$tag.fill.json" 2>/dev/null ||
        echo null)
    read -r -a full < <(dir_bytes "$RUN/mqttd-data/store")
    stop_with "$signal"
    stop_s=$STOP_S stop_status=$STOP_STATUS
    read -r -a stopped < <(dir_bytes "$RUN/mqttd-data/store")
    # Start again on the same data directory; resume the session as soon as it listens.
    start_mqttd_timed "$tag.restart"
    if listen=$(wait_listening "$tag.restart"); then
        local bench_start
        bench_start=$(awk -v a="$RESTART_T0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.3f", b - a}')
        "$BENCH_BIN" bench "${DRAIN_ARGS[@]}" --port "$PORT_MQTTD" \
            >"$RUN/runs/$tag.drain.json" 2>"$RUN/logs/$tag.drain.err" || true
        drain_bench=$bench_start
        read -r -a drained < <(dir_bytes "$RUN/mqttd-data/store")
        stop_with TERM
    else
        listen=null
        stop_with KILL
    fi
    jq -n \
        --arg signal "$signal" --argjson round "$round" --argjson stored "$STORED" \
        --argjson cold "$cold" --argjson listen "${listen:-null}" \
        --argjson bench_start "$drain_bench" \
        --argjson fill "$fill" \
        --argjson stop_s "$stop_s" --argjson stop_status "$stop_status" \
        --argjson empty "[${empty[0]}, ${empty[1]}]" --argjson full "[${full[0]}, ${full[1]}]" \
        --argjson stopped "[${stopped[0]}, ${stopped[1]}]" \
        --argjson drained "[${drained[0]}, ${drained[1]}]" --argjson busy "$QUIET_BUSY" \
        --slurpfile drain <(jq . "$RUN/runs/$tag.drain.json" 2>/dev/null || echo null) \
        --arg drain_error "$(grep -m1 '^Error' "$RUN/logs/$tag.drain.err" 2>/dev/null || true)" \
        --arg recovered "$(grep -h -m1 'recovered' "$RUN/logs/$tag.restart.log" 2>/dev/null |
            sed 's/^[^ ]* *//' || true)" \
        '{signal: $signal, round: $round, stored: $stored, busy_before: $busy,
          cold_listen_s: $cold, fill: $fill, stop_s: $stop_s, stop_status: $stop_status,
          listen_s: $listen, bench_start_s: $bench_start, drain: $drain[0],
          drain_error: (if $drain_error == "" then null else $drain_error end),
          drained_s: (if $drain[0].expect_reached_secs == null or $bench_start == null then null
                      else $bench_start + $drain[0].expect_reached_secs end),
          store_bytes: {empty: $empty, full: $full, stopped: $stopped, drained: $drained},
          recovered_log: $recovered}' >"$RUN/runs/$tag.result.json"
    log "$tag: fill $fill; stop $stop_s s (status $stop_status); listening after ${listen} s;" \
        "$(jq -r '"received \(.drain.received // 0), session present \(.drain.session_present // 0),"
            + " drained after \(.drained_s // "-") s \(.drain_error // "")"' \
            "$RUN/runs/$tag.result.json")"
    sleep 1
}

# --- what was measured, on what -------------------------------------------------------------

# A command line, with the words a shell would need quoted in single quotes.
cmdline() {
    local word out=()
    for word in "$@"; do
        if [[ $word =~ ^[[:alnum:]_./:=,+-]+$ ]]; then out+=("$word"); else out+=("'$word'"); fi
    done
    echo "${out[*]}"
}

jq -n \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --argjson nproc "$(nproc)" \
    --arg cpu "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
    --argjson mem_total_kb "$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)" \
    --arg kernel "$(uname -sr)" --arg os "$(. /etc/os-release && echo "$PRETTY_NAME")" \
    --arg fs "$(df -T "$RUN" | awk 'NR == 2 {print $2 " on " $1}')" \
    --argjson rounds "$ROUNDS" --argjson duration_s "$DURATION" --argjson drain_s "$DRAIN" \
    --argjson stored "$STORED" --arg protocol "$PROTOCOL" --arg durability "$DURABILITY" \
    --argjson durable_keys "$DURABLE_KEYS" --arg parts "$PARTS" \
    --arg mosquitto "$(version_of mosquitto)" --arg mqttd "$(version_of mqttd)" \
    --arg rustc "$(rustc --version)" \
    --arg bench_client "mqttd bench, $(git describe --always --dirty --abbrev=12)" \
    --arg c_fanin1 "mqttd bench $(bench_args fanin1) --port PORT" \
    --arg c_fanin1p "mqttd bench $(bench_args fanin1-persistent) --port PORT" \
    --arg c_pairs1p "mqttd bench $(bench_args pairs1-persistent) --port PORT" \
    --arg c_subscribe "$(cmdline mqttd bench "${SUBSCRIBE_ARGS[@]}" --port PORT --duration 0)" \
    --arg c_fill "$(cmdline mqttd bench "${FILL_ARGS[@]}" --port PORT)" \
    --arg c_drain "$(cmdline mqttd bench "${DRAIN_ARGS[@]}" --port PORT)" \
    '{date: $date, nproc: $nproc, cpu: $cpu, mem_total_kb: $mem_total_kb, kernel: $kernel,
      os: $os, filesystem: $fs, rounds: $rounds, duration_s: $duration_s, drain_s: $drain_s,
      stored: $stored, protocol: $protocol, durability: $durability,
      durable_keys: ($durable_keys == 1), parts: ($parts | split(",")),
      versions: {mosquitto: $mosquitto, mqttd: $mqttd}, rustc: $rustc,
      bench_client: $bench_client,
      commands: {"fanin1": $c_fanin1, "fanin1-persistent": $c_fanin1p,
                 "pairs1-persistent": $c_pairs1p, subscribe: $c_subscribe, fill: $c_fill,
                 drain: $c_drain}}' >"$RUN/machine.json"

# --- the runs -------------------------------------------------------------------------------

if has_part fanin; then
    for scenario in "${FANIN_SCENARIOS[@]}"; do
        for round in $(seq "$ROUNDS"); do
            for broker in mosquitto mqttd; do
                run_traffic "$scenario" "$broker" "$round"
                if [[ $broker == mqttd ]]; then
                    read -r -a bytes < <(dir_bytes "$RUN/mqttd-data/store")
                    echo "{\"store_bytes\": ${bytes[0]}}" \
                        >"$RUN/runs/$scenario.mqttd.$round.store.json"
                fi
            done
        done
    done
fi

if has_part restart; then
    for round in $(seq "$ROUNDS"); do
        for signal in TERM KILL; do
            run_restart "$signal" "$round"
        done
    done
fi

log "done: $RUN"
report "$RUN"
