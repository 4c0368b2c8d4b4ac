#!/usr/bin/env bash
# A 3-node mqttd cluster on loopback against a single node: throughput, failover, memory.
#
# Every node is a release mqttd with its defaults (persistence on, `durability = "sync"`), its
# own data directory, `tcp://` and `http://` listeners on port 0 (read back from its "mqttd
# listening on" lines) and, for the cluster, a `[cluster]` section on a UDP port picked free at
# run time, the two others as seeds, and certificates made here with `openssl`.
#
#  (a) throughput, in alternation (single node, cluster, single node, ...), each round on
#      freshly started brokers, MQTT 5, 64-byte payloads, `mqttd bench` as the load generator:
#        fanin0      8 publishers -> 1 wildcard subscriber, QoS 0, clean sessions
#        fanout0     1 publisher -> 8 subscribers, QoS 0, clean sessions
#        pairs1p     8 publisher/subscriber pairs, QoS 1, the subscribers' sessions persistent
#                    (clean start false, session expiry 3600 s): in a cluster they live in Raft
#        xpairs0     8 pairs, QoS 0, clean sessions, publishers on node 1 and subscribers on
#                    node 2 (`--sub-port`): every message forwarded over the cluster link
#        xpairs1     the same at QoS 1
#        xlat0       xpairs0 at a fixed LAT_RATE msg/s in all: latency below saturation
#        xlat1       the same at QoS 1
#      On the single node every client connects to it; in the cluster fanin0, fanout0 and
#      pairs1p connect to node 1 (the cost of being in a cluster), x* across nodes.
#  (b) failover: FAILOVER_SESSIONS persistent QoS 1 sessions connected to the leader; the
#      leader killed with SIGKILL; the time until a client resuming one of them on a survivor
#      gets CONNACK with session present (and, apart, until a survivor says it leads). The
#      killed node is started again on its data directory between runs.
#  (c) memory: RSS (`VmRSS`) of each node idle after starting (the cluster: formed), then
#      with MEM_SESSIONS persistent sessions (made on node 1, left offline) holding
#      MEM_QUEUED QoS 1 messages each.
#
# Brokers run on BROKER_CPUS (all three cluster nodes share it), the load generator on
# CLIENT_CPUS (`taskset`). Raw results go to target/bench/cluster/<stamp>/; a Markdown summary
# is written to bench/out/cluster.md and standard output. Not part of CI; about 10 minutes with
# the defaults. Only ever targets 127.0.0.1; everything it starts is stopped on exit.
#
#   bench/cluster.sh                      # everything, 3 rounds
#   bench/cluster.sh --quick              # 1 round, 3 s runs, 2 failovers, 200 sessions
#   bench/cluster.sh --report-only DIR    # rewrite bench/out/cluster.md from earlier results
#
# Other options: --rounds N, --duration S, --parts throughput,failover,memory,
# --scenarios a,b,..., --lat-rate N, --failovers N, --failover-sessions N, --mem-sessions N,
# --mem-queued N, --broker-cpus LIST, --client-cpus LIST, --out FILE, --no-build.
# NODE_LOG sets the nodes' RUST_LOG (default warn; their logs are in the results' logs/).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=3
DURATION=5
DRAIN=1
FAN=8
SCENARIOS=fanin0,fanout0,xpairs0,xpairs1,pairs1p,xlat0,xlat1
LAT_RATE=2000
PARTS=throughput,failover,memory
FAILOVERS=5
FAILOVER_SESSIONS=100
MEM_SESSIONS=1000
MEM_QUEUED=100
BROKER_CPUS=1
CLIENT_CPUS=0
BUILD=1
REPORT_ONLY=
OUT=$ROOT/bench/out/cluster.md
HOST=127.0.0.1

usage() { sed -n '2,42p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --parts) PARTS=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --lat-rate) LAT_RATE=$2; shift ;;
        --failovers) FAILOVERS=$2; shift ;;
        --failover-sessions) FAILOVER_SESSIONS=$2; shift ;;
        --mem-sessions) MEM_SESSIONS=$2; shift ;;
        --mem-queued) MEM_QUEUED=$2; shift ;;
        --broker-cpus) BROKER_CPUS=$2; shift ;;
        --client-cpus) CLIENT_CPUS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        --report-only) REPORT_ONLY=$2; shift ;;
        --quick) ROUNDS=1; DURATION=3; FAILOVERS=2; MEM_SESSIONS=200 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
has_part() { [[ ",$PARTS," == *",$1,"* ]]; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

report() { write_report "$ROOT/bench/cluster_report.py" "$1"; }

if [[ -n $REPORT_ONLY ]]; then
    report "$REPORT_ONLY"
    exit 0
fi
# Wait at most this long for a quiet machine before each part (other work may share it: the
# summary gives the machine's load during every run).
QUIET_WAIT=${QUIET_WAIT:-10}

for tool in taskset openssl jq curl python3 ss; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done

MQTTD=$ROOT/target/release/mqttd
if ((BUILD)); then
    log "building mqttd (release)"
    cargo build --release --locked -p mqttd
fi
[[ -x $MQTTD ]] || { echo "no $MQTTD: build it or drop --no-build" >&2; exit 1; }

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN=$ROOT/target/bench/cluster/$STAMP
mkdir -p "$RUN/conf" "$RUN/runs" "$RUN/logs" "$RUN/certs"
log "results in $RUN"
ulimit -n "$(ulimit -Hn)"

# --- nodes ----------------------------------------------------------------------------------

# By node: 0 is the single node, 1-3 the cluster's.
declare -A PID=() PORT=() HTTP=() CPORT=()

cleanup() {
    local i
    if [[ -n ${BENCH_PID:-} ]]; then kill -KILL "$BENCH_PID" 2>/dev/null || true; fi
    for i in "${!PID[@]}"; do
        kill -KILL "${PID[$i]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The cluster's certificates: a CA and, per node, a certificate naming it (as tests/clusterlab).
make_certs() {
    local d=$RUN/certs name
    (
        cd "$d"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
            -out ca.pem -days 2 -subj "/CN=mqttd bench CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        for i in 1 2 3; do
            name=node-$i
            printf '%s\n' "subjectAltName=DNS:$name" "basicConstraints=critical,CA:FALSE" \
                "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" \
                >"$name.ext"
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$name.key" \
                -out "$name.csr" -subj "/CN=$name" 2>/dev/null
            openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
                -out "$name.pem" -days 2 -extfile "$name.ext" 2>/dev/null
            chmod 600 "$name.key"
        done
    )
}

# Free UDP ports on 127.0.0.1, all held at once (so distinct), then released.
free_udp_ports() {
    python3 -c 'import socket, sys
socks = [socket.socket(type=socket.SOCK_DGRAM) for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

write_configs() {
    local i j seeds
    cat >"$RUN/conf/node-0.toml" <<EOF
# The single node: mqttd's defaults (persistence on, durability "sync").
listen = ["tcp://$HOST:0", "http://$HOST:0"]
data_dir = "$RUN/data/node-0"
allow_anonymous = true
EOF
    for i in 1 2 3; do
        seeds=()
        for j in 1 2 3; do
            ((j == i)) || seeds+=("{ id = $j, name = \"node-$j\", addr = \"$HOST:${CPORT[$j]}\" }")
        done
        cat >"$RUN/conf/node-$i.toml" <<EOF
# Cluster node $i: mqttd's defaults, and the cluster.
listen = ["tcp://$HOST:0", "http://$HOST:0"]
data_dir = "$RUN/data/node-$i"
allow_anonymous = true

[cluster]
node_id = $i
name = "node-$i"
listen = "$HOST:${CPORT[$i]}"
seeds = [$(IFS=,; echo "${seeds[*]}")]
ca = "$RUN/certs/ca.pem"
cert = "$RUN/certs/node-$i.pem"
key = "$RUN/certs/node-$i.key"
EOF
    done
}

# start_node I: starts node I (on its data directory as it is) and waits for its listeners.
start_node() {
    local i=$1 out=$RUN/logs/node-$1.$EPOCHREALTIME.stdout line
    RUST_LOG=${NODE_LOG:-warn} taskset -c "$BROKER_CPUS" "$MQTTD" --config "$RUN/conf/node-$i.toml" \
        >"$out" 2>>"$RUN/logs/node-$i.log" &
    PID[$i]=$!
    PORT[$i]='' HTTP[$i]=''
    for _ in $(seq 300); do
        line=$(grep -m1 '^mqttd listening on tcp://' "$out" || true)
        PORT[$i]=${line##*:}
        line=$(grep -m1 '^mqttd listening on http://' "$out" || true)
        HTTP[$i]=${line##*:}
        [[ -n ${PORT[$i]} && -n ${HTTP[$i]} ]] && return 0
        kill -0 "${PID[$i]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "node $i did not start:" >&2
    tail -20 "$RUN/logs/node-$i.log" >&2
    return 1
}

stop_node() {
    local i=$1
    [[ -n ${PID[$i]:-} ]] || return 0
    stop_pid "${PID[$i]}"
    unset "PID[$i]"
}

metric() { # metric NODE NAME: its value, empty when the node does not answer
    curl -sf --max-time 2 "http://$HOST:${HTTP[$1]}/metrics" 2>/dev/null |
        awk -v m="$2" '$1 == m {v = $2} END {if (v != "") print v}'
}

# Waits until every running cluster node counts 3 voters and knows a leader; prints the
# leader's node id (the one whose is_leader is 1).
wait_formed() {
    local deadline=$((SECONDS + ${1:-60})) i ok leader
    while ((SECONDS < deadline)); do
        ok=1 leader=
        for i in 1 2 3; do
            [[ -n ${PID[$i]:-} ]] || continue
            [[ $(metric "$i" mqttd_cluster_voters) == 3 && $(metric "$i" mqttd_cluster_has_leader) == 1 ]] || ok=0
            [[ $(metric "$i" mqttd_cluster_is_leader) == 1 ]] && leader=$i
        done
        if ((ok)) && [[ -n $leader ]]; then
            echo "$leader"
            return 0
        fi
        sleep 0.2
    done
    log "the cluster did not form within ${1:-60} s"
    return 1
}

start_single() { rm -rf "$RUN/data/node-0"; start_node 0; sleep 1; }
stop_single() { stop_node 0; sleep 1; }

start_cluster() {
    local i
    rm -rf "$RUN/data/node-1" "$RUN/data/node-2" "$RUN/data/node-3"
    read -r 'CPORT[1]' 'CPORT[2]' 'CPORT[3]' < <(free_udp_ports 3)
    write_configs
    for i in 1 2 3; do start_node "$i"; done
    FORM_T0=$EPOCHREALTIME
    LEADER=$(wait_formed 60)
    FORMED_S=$(awk -v a="$FORM_T0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.2f", b - a}')
    log "cluster formed in $FORMED_S s, leader node $LEADER"
    # Let it finish starting (announcements, timers) before measuring anything.
    sleep 2
}
stop_cluster() { local i; for i in 1 2 3; do stop_node "$i"; done; sleep 1; }

# --- throughput -----------------------------------------------------------------------------

PERSISTENT=(--session-clients sub --clean-start false --session-expiry 3600)

# bench_args SCENARIO ROUND: the bench's arguments, without host and ports. Topics differ by
# scenario and round, so that sessions one run leaves behind receive nothing from the next.
bench_args() {
    local t="$1/r$2/%i" common=(--size 64 -V 5 --duration "$DURATION" --drain "$DRAIN" --json --quiet)
    case $1 in
        fanin0) echo fanin --count $FAN --qos 0 -t "$t" "${common[@]}" ;;
        fanout0) echo fanout --count $FAN --qos 0 -t "$t" "${common[@]}" ;;
        pairs1p) echo pairs --count $FAN --qos 1 -t "$t" --client-id-prefix "$1-r$2" \
            "${PERSISTENT[@]}" "${common[@]}" ;;
        xpairs0) echo pairs --count $FAN --qos 0 -t "$t" "${common[@]}" ;;
        xpairs1) echo pairs --count $FAN --qos 1 -t "$t" "${common[@]}" ;;
        xlat0) echo pairs --count $FAN --qos 0 --total-rate "$LAT_RATE" -t "$t" "${common[@]}" ;;
        xlat1) echo pairs --count $FAN --qos 1 --total-rate "$LAT_RATE" -t "$t" "${common[@]}" ;;
    esac
}

# The ports a scenario's clients use: "--port P" or "--port P --sub-port Q".
ports_of() {
    local setup=$1 scenario=$2
    if [[ $setup == single ]]; then
        echo "--port ${PORT[0]}"
    elif [[ $scenario == x* ]]; then
        echo "--port ${PORT[1]} --sub-port ${PORT[2]}"
    else
        echo "--port ${PORT[1]}"
    fi
}

nodes_of() { if [[ $1 == single ]]; then echo 0; else echo 1 2 3; fi; }

run_bench() {
    local setup=$1 scenario=$2 round=$3 tag=$1.$2.$3 args ports status=0 i t0 t1
    local -A cpu0=() cpu1=()
    read -r -a args <<<"$(bench_args "$scenario" "$round")"
    read -r -a ports <<<"$(ports_of "$setup" "$scenario")"
    for i in $(nodes_of "$setup"); do cpu0[$i]=$(cpu_ticks "${PID[$i]}"); done
    local idle0 total0 idle1 total1
    read -r idle0 total0 < <(machine_ticks)
    t0=$EPOCHREALTIME
    timeout $((DURATION + DRAIN + 60)) taskset -c "$CLIENT_CPUS" \
        "$MQTTD" bench "${args[@]}" "${ports[@]}" \
        >"$RUN/runs/$tag.json" 2>"$RUN/logs/$tag.bench.err" || status=$?
    t1=$EPOCHREALTIME
    read -r idle1 total1 < <(machine_ticks)
    local cpus="{" sep="" rss="{"
    for i in $(nodes_of "$setup"); do
        cpu1[$i]=$(cpu_ticks "${PID[$i]}" 2>/dev/null || echo "${cpu0[$i]}")
        cpus+="$sep\"$i\": $(awk -v a="${cpu0[$i]}" -v b="${cpu1[$i]}" -v t="$CLK_TCK" 'BEGIN {print (b - a) / t}')"
        rss+="$sep\"$i\": $(rss_kb "${PID[$i]}" 2>/dev/null || echo 0)"
        sep=", "
    done
    jq -n --arg setup "$setup" --arg scenario "$scenario" --argjson round "$round" \
        --argjson exit "$status" --argjson cpus "$cpus}" --argjson rss "$rss}" \
        --argjson wall "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" \
        --argjson busy "$(awk -v i0="$idle0" -v t0="$total0" -v i1="$idle1" -v t1="$total1" \
            'BEGIN {print 1 - (i1 - i0) / (t1 - t0)}')" \
        --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
        --arg command "mqttd bench ${args[*]} ${ports[*]}" \
        '{setup: $setup, scenario: $scenario, round: $round, exit: $exit,
          broker_cpu_s: $cpus, rss_kb: $rss, wall_s: $wall, machine_busy: $busy,
          loadavg: $load, command: $command}' >"$RUN/runs/$tag.meta.json"
    log "$tag: exit $status, $(jq -c '{received_per_sec, latency_ms}' "$RUN/runs/$tag.json" \
        2>/dev/null || echo 'no summary') $(tail -c 300 "$RUN/logs/$tag.bench.err" | grep -m1 -i error || true)"
    sleep 1
}

throughput() {
    local round scenario setup
    IFS=, read -r -a scenario_list <<<"$SCENARIOS"
    for round in $(seq "$ROUNDS"); do
        for setup in single cluster; do
            wait_quiet
            if [[ $setup == single ]]; then start_single; else start_cluster; fi
            for scenario in "${scenario_list[@]}"; do
                # Across nodes means nothing for one node: its xpairs are plain pairs.
                run_bench "$setup" "$scenario" "$round"
            done
            if [[ $setup == single ]]; then stop_single; else stop_cluster; fi
        done
    done
}

# --- failover -------------------------------------------------------------------------------

# probe KILL_PID PORT HTTP_PORTS CLIENT_ID: kills KILL_PID with SIGKILL, then connects CLIENT_ID
# (MQTT 5, clean start false, session expiry 3600) to 127.0.0.1:PORT again and again until a
# CONNACK accepts it with session present; meanwhile polls the survivors' /metrics for a
# leader. Prints JSON: seconds from the kill to that CONNACK and to the first leader, and what
# the attempts before it got.
PROBE=$(
    cat <<'EOF'
import json, os, signal, socket, struct, sys, threading, time, urllib.request

kill_pid, port, http_ports, client_id = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
LIMIT = 60.0

def varint(n):
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (128 if n else 0)])
        if not n:
            return out

def connect_packet():
    cid = client_id.encode()
    props = b"\x11" + struct.pack(">I", 3600)  # session expiry interval
    body = (b"\x00\x04MQTT\x05" + b"\x00"  # connect flags: clean start 0
            + struct.pack(">H", 60) + varint(len(props)) + props
            + struct.pack(">H", len(cid)) + cid)
    return b"\x10" + varint(len(body)) + body

def read_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data

def attempt():
    """(session_present, reason) of one CONNECT, or an error string."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.settimeout(15)
        s.sendall(connect_packet())
        head = read_exact(s, 2)
        if head[0] != 0x20:
            return f"packet {head[0]:#x}"
        flags, reason = read_exact(s, 2)
        if reason == 0 and flags & 1:
            s.sendall(b"\xe0\x00")  # DISCONNECT, normal: the session stays
            return (1, 0)
        return (flags & 1, reason)

leader_at = [None]
def watch_leader(t0):
    ports = [int(p) for p in http_ports.split(",")]
    while leader_at[0] is None and time.monotonic() - t0 < LIMIT:
        for p in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=1) as r:
                    for line in r.read().decode().splitlines():
                        if line.startswith("mqttd_cluster_is_leader ") and line.split()[1] == "1":
                            leader_at[0] = time.monotonic() - t0
            except OSError:
                pass
        time.sleep(0.01)

t0 = time.monotonic()
os.kill(kill_pid, signal.SIGKILL)
threading.Thread(target=watch_leader, args=(t0,), daemon=True).start()
attempts = []
done = None
while time.monotonic() - t0 < LIMIT:
    start = time.monotonic() - t0
    try:
        got = attempt()
    except OSError as e:
        got = type(e).__name__
    end = time.monotonic() - t0
    attempts.append({"start": round(start, 3), "end": round(end, 3), "got": got})
    if got == (1, 0):
        done = end
        break
    time.sleep(0.02)
deadline = time.monotonic() + 5
while leader_at[0] is None and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({"session_present_s": done, "leader_s": leader_at[0],
                  "attempts": len(attempts), "first": attempts[:3], "last": attempts[-1:]}))
EOF
)

failover() {
    local run leader survivor other sub_pid result
    start_cluster
    for run in $(seq "$FAILOVERS"); do
        leader=$(wait_formed 60) || break
        survivor=$((leader % 3 + 1))
        other=$((survivor % 3 + 1))
        # Persistent sessions, connected to the leader, subscribed, until the end.
        taskset -c "$CLIENT_CPUS" "$MQTTD" bench sub --count "$FAILOVER_SESSIONS" \
            --client-id-prefix "fo$run" --clean-start false --session-expiry 3600 --qos 1 \
            -t "fo/$run/%i" -V 5 --duration 120 --port "${PORT[$leader]}" --json --quiet \
            >"$RUN/runs/failover.$run.sub.json" 2>"$RUN/logs/failover.$run.sub.err" &
        sub_pid=$!
        BENCH_PID=$sub_pid
        sleep 3
        log "failover $run: killing leader node $leader; probing node $survivor"
        result=$(taskset -c "$CLIENT_CPUS" python3 -c "$PROBE" "${PID[$leader]}" \
            "${PORT[$survivor]}" "${HTTP[$survivor]},${HTTP[$other]}" "fo$run-sub-0")
        wait "${PID[$leader]}" 2>/dev/null || true
        kill -KILL "$sub_pid" 2>/dev/null || true
        wait "$sub_pid" 2>/dev/null || true
        BENCH_PID=
        jq -n --argjson run "$run" --argjson killed "$leader" --argjson probed "$survivor" \
            --argjson sessions "$FAILOVER_SESSIONS" --argjson r "$result" \
            --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
            '{run: $run, killed: $killed, probed: $probed, sessions: $sessions, loadavg: $load} + $r' \
            >"$RUN/runs/failover.$run.json"
        log "failover $run: $(jq -c '{session_present_s, leader_s, attempts}' "$RUN/runs/failover.$run.json")"
        # The killed node back, on its data directory; the cluster whole again.
        start_node "$leader"
        sleep 2
    done
    stop_cluster
}

# --- memory ---------------------------------------------------------------------------------

rss_json() { # rss_json NODES...: {"node": kB, ...}
    local out="{" sep="" i
    for i in "$@"; do out+="$sep\"$i\": $(rss_kb "${PID[$i]}")"; sep=", "; done
    echo "$out}"
}

memory() {
    local setup idle held nodes sub_port
    for setup in single cluster; do
        wait_quiet
        if [[ $setup == single ]]; then start_single; nodes=(0); else start_cluster; nodes=(1 2 3); fi
        sleep 3
        idle=$(rss_json "${nodes[@]}")
        sub_port=${PORT[${nodes[0]}]}
        # MEM_SESSIONS persistent sessions subscribed to mem/#, left offline ...
        taskset -c "$CLIENT_CPUS" "$MQTTD" bench sub --count "$MEM_SESSIONS" --connect-rate 1000 \
            --client-id-prefix mem --clean-start false --session-expiry 3600 --qos 1 \
            -t 'mem/#' -V 5 --duration 0 --port "$sub_port" --json --quiet \
            >"$RUN/runs/memory.$setup.sub.json" 2>"$RUN/logs/memory.$setup.sub.err" || true
        # ... and MEM_QUEUED QoS 1 messages of 64 bytes queued in each.
        taskset -c "$CLIENT_CPUS" "$MQTTD" bench pub --count 1 --messages "$MEM_QUEUED" --qos 1 \
            --size 64 -t mem/x -V 5 --duration 60 --drain 2 --port "$sub_port" --json --quiet \
            >"$RUN/runs/memory.$setup.pub.json" 2>"$RUN/logs/memory.$setup.pub.err" || true
        sleep 3
        held=$(rss_json "${nodes[@]}")
        jq -n --arg setup "$setup" --argjson idle "$idle" --argjson held "$held" \
            --argjson sessions "$MEM_SESSIONS" --argjson queued "$MEM_QUEUED" \
            --slurpfile sub "$RUN/runs/memory.$setup.sub.json" \
            --slurpfile pub "$RUN/runs/memory.$setup.pub.json" \
            '{setup: $setup, sessions: $sessions, queued_each: $queued, idle_rss_kb: $idle,
              held_rss_kb: $held, sub: ($sub[0] | {connected, errors}),
              pub: ($pub[0] | {sent, acked, errors, duration_secs})}' \
            >"$RUN/runs/memory.$setup.json" || true
        log "memory $setup: idle $idle kB, with $MEM_SESSIONS sessions x $MEM_QUEUED queued $held kB"
        if [[ $setup == single ]]; then stop_single; else stop_cluster; fi
    done
}

# --- what was measured, on what -------------------------------------------------------------

jq -n \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --argjson nproc "$(nproc)" \
    --arg cpu "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
    --argjson mem_total_kb "$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)" \
    --arg kernel "$(uname -sr)" --arg fs "$(df -T "$RUN" | awk 'NR == 2 {print $2 " on " $1}')" \
    --arg mqttd "$("$MQTTD" --version) ($(git describe --always --dirty --abbrev=12))" \
    --arg rustc "$(rustc --version)" --argjson rounds "$ROUNDS" --argjson duration "$DURATION" \
    --arg broker_cpus "$BROKER_CPUS" --arg client_cpus "$CLIENT_CPUS" \
    --arg loadavg "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --arg top "$(top -bn1 | sed -n '8,14p')" \
    --argjson lat_rate "$LAT_RATE" --argjson failover_sessions "$FAILOVER_SESSIONS" --argjson mem_sessions "$MEM_SESSIONS" \
    --argjson mem_queued "$MEM_QUEUED" \
    '{date: $date, nproc: $nproc, cpu: $cpu, mem_total_kb: $mem_total_kb, kernel: $kernel,
      filesystem: $fs, mqttd: $mqttd, rustc: $rustc, profile: "release", rounds: $rounds,
      duration_s: $duration, broker_cpus: $broker_cpus, client_cpus: $client_cpus,
      loadavg_before: $loadavg, top_before: $top, lat_rate: $lat_rate, failover_sessions: $failover_sessions,
      mem_sessions: $mem_sessions, mem_queued: $mem_queued}' >"$RUN/machine.json"

make_certs
read -r 'CPORT[1]' 'CPORT[2]' 'CPORT[3]' < <(free_udp_ports 3)
write_configs

if has_part throughput; then throughput; fi
if has_part failover; then failover; fi
if has_part memory; then memory; fi

jq --arg loadavg "$(cut -d' ' -f1-3 /proc/loadavg)" '. + {loadavg_after: $loadavg}' \
    "$RUN/machine.json" >"$RUN/machine.json.tmp" && mv "$RUN/machine.json.tmp" "$RUN/machine.json"
log "done: $RUN"
report "$RUN"
