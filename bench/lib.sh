# shellcheck shell=bash
# Helpers shared by bench/compare.sh, bench/durable.sh and bench/cluster.sh: starting, stopping and measuring
# brokers the same way. Sourced, not run. The including script defines `port_of`,
# `start_broker` (usually a call of `launch_broker`), `bench_args` and the settings these read
# (RUN, MQTTD, BENCH_BIN, ports, DURATION, ...).

APT_UPDATED=0
QUIET_BUSY=0
BROKER_PID=
# taskset CPU lists for the broker and the load generator; empty: not pinned.
PIN_BROKER=
PIN_CLIENT=
# Read by the including scripts' cleanup.
# shellcheck disable=SC2034
BENCH_PID=
CLK_TCK=$(getconf CLK_TCK)

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if ((!APT_UPDATED)); then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

launch_broker() {
    local name=$1 tag=$2 port
    port=$(port_of "$name")
    local logf=$RUN/logs/$tag.log
    local pin=()
    [[ -z $PIN_BROKER ]] || pin=(taskset -c "$PIN_BROKER")
    case $name in
        mosquitto) "${pin[@]}" mosquitto -c "$RUN/conf/mosquitto.conf" >"$logf" 2>&1 & ;;
        rumqttd) "${pin[@]}" "$RUMQTTD" -q -c "$RUN/conf/rumqttd.toml" >"$logf" 2>&1 & ;;
        # rmqtt also reads ./rmqtt.toml: start it where there is none.
        rmqtt) (cd "$RUN/conf" && exec "${pin[@]}" "$RMQTTD" -f "$RUN/conf/rmqtt.toml") >"$logf" 2>&1 & ;;
        mqttd) RUST_LOG=warn "${pin[@]}" "$MQTTD" --config "$RUN/conf/mqttd.toml" >"$logf" 2>&1 & ;;
    esac
    BROKER_PID=$!
    for _ in $(seq 300); do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            echo "$name exited at startup:" >&2
            tail -20 "$logf" >&2
            BROKER_PID=
            return 1
        fi
        [[ -n $(ss -Hltn "sport = :$port") ]] && break
        sleep 0.1
    done
    # Let it finish starting (timers, thread pools) before measuring anything.
    sleep 1
}

# stop_pid PID: SIGTERM, up to 10 s to exit, then SIGKILL.
stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# write_report SCRIPT RESULTS: SCRIPT's summary of RESULTS into $OUT, and on stdout.
write_report() {
    mkdir -p "$(dirname "$OUT")"
    python3 "$1" "$2" >"$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
    cat "$OUT"
    echo "written to $OUT" >&2
}

stop_broker() {
    [[ -n $BROKER_PID ]] || return 0
    stop_pid "$BROKER_PID"
    BROKER_PID=
    # Let sockets in TIME_WAIT and the kernel's memory settle between runs.
    sleep 1
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# User plus system CPU time of a process and all its threads, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# CPU seconds (user + system) of this shell's waited-for children (the bench), from the output
# of `times`, which must run in this shell itself, not in a command substitution's subshell.
children_cpu_s() {
    awk 'NR == 2 {
        s = 0
        for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); s += a[1] * 60 + a[2] }
        print s
    }' "$1"
}

# Idle and total jiffies of the whole machine.
machine_ticks() { awk '/^cpu / {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }

wait_quiet() {
    local i idle0 total0 idle1 total1
    for i in $(seq "${QUIET_WAIT:-600}"); do
        read -r idle0 total0 < <(machine_ticks)
        sleep 1
        read -r idle1 total1 < <(machine_ticks)
        QUIET_BUSY=$(awk -v i0="$idle0" -v t0="$total0" -v i1="$idle1" -v t1="$total1" \
            'BEGIN {printf "%.3f", 1 - (i1 - i0) / (t1 - t0)}')
        awk -v b="$QUIET_BUSY" -v max="${QUIET_THRESHOLD:-0.10}" 'BEGIN {exit !(b < max)}' && return 0
        if ((i % 30 == 1)); then log "machine busy ($QUIET_BUSY of the CPU), waiting"; fi
    done
    log "machine still busy ($QUIET_BUSY of the CPU): running anyway"
}

json_meta() {
    # key value pairs -> one JSON object (values are numbers or JSON strings already quoted).
    local out="{" sep=""
    while (($#)); do
        out+="$sep\"$1\": $2"
        sep=", "
        shift 2
    done
    echo "$out}"
}

run_traffic() {
    local scenario=$1 broker=$2 round=$3 port tag args
    port=$(port_of "$broker")
    tag=$scenario.$broker.$round
    read -r -a args <<<"$(bench_args "$scenario")"
    wait_quiet
    start_broker "$broker" "$tag" || return 0
    local cpu0 cpu1 rss0 rss1 hwm status=0 t0 t1 ccpu0 ccpu1 idle0 total0 idle1 total1
    cpu0=$(cpu_ticks "$BROKER_PID")
    rss0=$(rss_kb "$BROKER_PID")
    times >"$RUN/times.before"
    read -r idle0 total0 < <(machine_ticks)
    t0=$(date +%s.%N)
    local pin=()
    [[ -z $PIN_CLIENT ]] || pin=(taskset -c "$PIN_CLIENT")
    timeout $((${DURATION%.*} + ${LATENCY_DURATION%.*} + 120)) \
        "${pin[@]}" "$BENCH_BIN" bench "${args[@]}" --port "$port" \
        >"$RUN/runs/$tag.json" 2>"$RUN/logs/$tag.bench.err" || status=$?
    t1=$(date +%s.%N)
    read -r idle1 total1 < <(machine_ticks)
    times >"$RUN/times.after"
    ccpu0=$(children_cpu_s "$RUN/times.before")
    ccpu1=$(children_cpu_s "$RUN/times.after")
    if kill -0 "$BROKER_PID" 2>/dev/null; then
        cpu1=$(cpu_ticks "$BROKER_PID")
        rss1=$(rss_kb "$BROKER_PID")
        hwm=$(hwm_kb "$BROKER_PID")
    else
        cpu1=$cpu0 rss1=0 hwm=0
        ((status)) || status=99
        log "$broker died during $scenario"
    fi
    stop_broker
    json_meta scenario "\"$scenario\"" broker "\"$broker\"" round "$round" exit "$status" \
        busy_before "$QUIET_BUSY" broker_cpu_s "$(awk -v a="$cpu0" -v b="$cpu1" -v t="$CLK_TCK" 'BEGIN {print (b - a) / t}')" \
        wall_s "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" \
        client_cpu_s "$(awk -v a="$ccpu0" -v b="$ccpu1" 'BEGIN {print b - a}')" \
        machine_busy "$(awk -v i0="$idle0" -v t0="$total0" -v i1="$idle1" -v t1="$total1" \
            'BEGIN {print 1 - (i1 - i0) / (t1 - t0)}')" \
        rss_before_kb "$rss0" rss_after_kb "$rss1" rss_peak_kb "$hwm" \
        broker_cpus "\"$PIN_BROKER\"" client_cpus "\"$PIN_CLIENT\"" \
        >"$RUN/runs/$tag.meta.json"
    log "$tag: exit $status, $(jq -c '{sent_per_sec, received_per_sec, latency_ms}' \
        "$RUN/runs/$tag.json" 2>/dev/null || echo 'no summary')"
}

version_of() {
    case $1 in
        mosquitto) mosquitto -h 2>/dev/null | head -1 | sed 's/^mosquitto version /Mosquitto /' ;;
        rumqttd) "$RUMQTTD" --version ;;
        rmqtt) "$RMQTTD" -V | head -1 ;;
        mqttd) echo "mqttd $("$MQTTD" --version | awk '{print $2}') ($MQTTD_DESC)" ;;
    esac
}
