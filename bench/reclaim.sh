#!/usr/bin/env bash
# Disk reclaim on loopback: how much disk the durable store gives back once messages that passed
# through a persistent queue were drained.
#
# mqttd (release build) with the durable store; a persistent session subscribed to bench/# is
# left offline, MESSAGES QoS 1 messages of SIZE bytes are published into it (8 publishers), the
# session is resumed and drains them all. The store directory's allocated size (du) is sampled
# every half second throughout. Reported: the empty store (the session alone), the peak, the
# size when the last message arrived, and the time from then until the store was back within
# twice the empty store's size, counted whole and besides the journal being written (fjall
# starts a new journal only once the current one passed 64 MB; see docs/benchmarks.md).
#
# Raw results go to target/bench/reclaim/<stamp>/ (samples.tsv, result.json, logs). Not part of
# CI; about a minute per 1,000,000 messages on top of the build. Only ever targets 127.0.0.1;
# the broker it starts is stopped on exit.
#
#   bench/reclaim.sh                        # 1,000,000 messages of 64 bytes
#   bench/reclaim.sh --messages 100000      # smaller
#
# Other options: --size BYTES, --durability sync|batch|none, --deadline SECONDS (how long to
# wait for the reclaim after the drain, 120), --no-build, --mqttd BIN.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

MESSAGES=1000000
SIZE=64
PUBS=8
DURABILITY=batch
DEADLINE=120
BUILD=1
MQTTD=$ROOT/target/release/mqttd
HOST=127.0.0.1
PORT=18858

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --messages) MESSAGES=$2; shift ;;
        --size) SIZE=$2; shift ;;
        --durability) DURABILITY=$2; shift ;;
        --deadline) DEADLINE=$2; shift ;;
        --no-build) BUILD=0 ;;
        --mqttd) MQTTD=$(realpath "$2"); BUILD=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
((MESSAGES % PUBS == 0)) || PUBS=1

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if ((BUILD)); then
    log "building mqttd"
    nice cargo build --release --locked -p mqttd
fi
[[ -x $MQTTD ]] || { echo "no $MQTTD: build it or drop --no-build" >&2; exit 1; }

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN=$ROOT/target/bench/reclaim/$STAMP
mkdir -p "$RUN"
log "results in $RUN"
STORE=$RUN/data/store

cat >"$RUN/mqttd.toml" <<EOF
listen = ["tcp://$HOST:$PORT"]
data_dir = "$RUN/data"
allow_anonymous = true
persistence = true
durability = "$DURABILITY"
max_queued_messages = $((MESSAGES + 1000))
max_queued_bytes = 0
max_inflight_messages = 64
EOF

BROKER_PID=
SAMPLER_PID=
cleanup() {
    if [[ -n $SAMPLER_PID ]]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
    if [[ -n $BROKER_PID ]]; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

RUST_LOG=info "$MQTTD" --config "$RUN/mqttd.toml" >"$RUN/mqttd.stdout" 2>"$RUN/mqttd.log" &
BROKER_PID=$!
for _ in $(seq 300); do
    grep -q '^mqttd listening on' "$RUN/mqttd.stdout" && break
    kill -0 "$BROKER_PID" 2>/dev/null || { cat "$RUN/mqttd.log" >&2; exit 1; }
    sleep 0.1
done

# Allocated bytes of the store, and of its journal being written (the highest-numbered one).
allocated() { du -s --block-size=1 "$STORE" 2>/dev/null | cut -f1; }
active_journal() {
    local last
    last=$(find "$STORE" -maxdepth 1 -name '*.jnl' -printf '%f\n' 2>/dev/null | sort -n | tail -1)
    if [[ -n $last ]]; then du --block-size=1 "$STORE/$last" 2>/dev/null | cut -f1; else echo 0; fi
}
sample() { printf '%s\t%s\t%s\n' "$EPOCHREALTIME" "$(allocated)" "$(active_journal)"; }

SESSION=(--client-id-prefix reclaim --clean-start false --qos 1 --topic 'bench/#' -V 311 --json
    --quiet)
"$MQTTD" bench sub "${SESSION[@]}" --duration 0 --port "$PORT" >"$RUN/session.json"
sleep 3
read -r _ EMPTY EMPTY_JOURNAL < <(sample)
log "empty store: $EMPTY B allocated (journal being written: $EMPTY_JOURNAL B)"

(while :; do sample; sleep 0.5; done) >"$RUN/samples.tsv" &
SAMPLER_PID=$!

T_FILL=$EPOCHREALTIME
log "publishing $MESSAGES messages of $SIZE bytes into the offline session"
"$MQTTD" bench pub --count "$PUBS" --messages $((MESSAGES / PUBS)) --qos 1 --size "$SIZE" \
    --duration 1200 --drain 60 -V 311 --json --quiet --port "$PORT" >"$RUN/fill.json"
read -r _ FULL FULL_JOURNAL < <(sample)
T_DRAIN=$EPOCHREALTIME
log "stored: $FULL B allocated; draining"
"$MQTTD" bench sub "${SESSION[@]}" --duration 1200 --expect "$MESSAGES" --require-session \
    --port "$PORT" >"$RUN/drain.json"
T_DRAINED=$EPOCHREALTIME
read -r _ DRAINED DRAINED_JOURNAL < <(sample)
log "drained: $DRAINED B allocated (journal being written: $DRAINED_JOURNAL B)"

# Seconds after the drain until the store was within twice the empty store: whole, and besides
# the journal being written.
WHOLE_S=null
REST_S=null
FINAL=$DRAINED
FINAL_JOURNAL=$DRAINED_JOURNAL
while :; do
    read -r t FINAL FINAL_JOURNAL < <(sample)
    since=$(awk -v a="$t" -v b="$T_DRAINED" 'BEGIN { printf "%.1f", a - b }')
    if [[ $REST_S == null ]] && ((FINAL - FINAL_JOURNAL <= 2 * EMPTY)); then REST_S=$since; fi
    if [[ $WHOLE_S == null ]] && ((FINAL <= 2 * EMPTY)); then WHOLE_S=$since; fi
    [[ $WHOLE_S != null ]] && break
    awk -v s="$since" -v d="$DEADLINE" 'BEGIN { exit !(s >= d) }' && break
    sleep 0.5
done
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=
PEAK=$(awk -F'\t' 'BEGIN { m = 0 } $2 > m { m = $2 } END { print m }' "$RUN/samples.tsv")
PEAK=$((PEAK > FULL ? PEAK : FULL))
RECLAIMS=$(grep -c 'reclaimed the disk space' "$RUN/mqttd.log" || true)

cat >"$RUN/result.json" <<EOF
{"messages": $MESSAGES, "size": $SIZE, "durability": "$DURABILITY",
 "empty": $EMPTY, "empty_journal": $EMPTY_JOURNAL, "peak": $PEAK,
 "full": $FULL, "full_journal": $FULL_JOURNAL,
 "drained": $DRAINED, "drained_journal": $DRAINED_JOURNAL,
 "final": $FINAL, "final_journal": $FINAL_JOURNAL,
 "fill_s": $(awk -v a="$T_DRAIN" -v b="$T_FILL" 'BEGIN { printf "%.1f", a - b }'),
 "drain_s": $(awk -v a="$T_DRAINED" -v b="$T_DRAIN" 'BEGIN { printf "%.1f", a - b }'),
 "within_2x_besides_journal_s": $REST_S, "within_2x_whole_s": $WHOLE_S,
 "deadline_s": $DEADLINE, "reclaims_logged": $RECLAIMS}
EOF
cat "$RUN/result.json"
