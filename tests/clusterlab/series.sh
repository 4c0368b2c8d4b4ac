#!/usr/bin/env bash
# The cluster lab's long series: RUNS randomised runs of MINUTES minutes of faults each (kill -9
# and restart, 2/1 and 1/1/1 partitions, pauses), each with a seed of its own, one line per run
# appended to a results file, and a summary at the end (README.md, "The long series").
#
#   tests/clusterlab/series.sh                   # 20 runs of 5 minutes (root; about 2 hours)
#   tests/clusterlab/series.sh -n 2 -m 1         # 2 runs of 1 minute
#   tests/clusterlab/series.sh -o results.txt    # append there (default: under the work dir)
#   LAB_SEED=123 tests/clusterlab/run.sh -k randomised   # replay one run's schedule
#
# Each run is `run.sh -k randomised` with LAB_SEED, LAB_DURATION and LAB_RESULTS set, its
# pytest temporary directory (history.jsonl, node logs) under the work dir (-d, default
# /tmp/clusterlab-series-<pid>), and its output in run-<k>.log there. A run that dies before
# writing its line (a crash, a timeout) gets one from here with its exit code.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
runs=20
minutes=5
dir="/tmp/clusterlab-series-$$"
results=""

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while getopts "n:m:o:d:h" opt; do
    case "$opt" in
        n) runs="$OPTARG" ;;
        m) minutes="$OPTARG" ;;
        o) results="$OPTARG" ;;
        d) dir="$OPTARG" ;;
        h) usage 0 ;;
        *) usage 2 ;;
    esac
done
mkdir -p "$dir"
results="${results:-$dir/results.txt}"
touch "$results"
results="$(cd "$(dirname "$results")" && pwd)/$(basename "$results")"
duration=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 }')

if [ -z "${MQTTD_BIN:-}" ]; then
    (cd "$root" && nice cargo build -q -p mqttd) || exit 1
    export MQTTD_BIN="$root/target/debug/mqttd"
fi
export CLUSTERLAB_REQUIRED="${CLUSTERLAB_REQUIRED:-1}"
# The nodes' session moves in their logs, to diagnose a failed run.
export LAB_LOG="${LAB_LOG:-warn,mqttd_broker::cluster_sessions=debug}"

echo "series: $runs runs of ${duration}s of faults; results in $results; runs in $dir"
first_line=$(($(wc -l <"$results") + 1))
for k in $(seq 1 "$runs"); do
    seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    seed=$((seed % 2147483647 + 1))
    base="$dir/run-$k"
    before=$(wc -l <"$results")
    started=$SECONDS
    echo "series: run $k/$runs, LAB_SEED=$seed"
    LAB_SEED="$seed" LAB_DURATION="$duration" LAB_RESULTS="$results" \
        bash "$here/run.sh" -k randomised -s --basetemp="$base" >"$dir/run-$k.log" 2>&1
    rc=$?
    if (($(wc -l <"$results") == before)); then
        echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) seed=$seed duration=$duration faults=\"?\"" \
            "ok=- fail=- delivered=- verdict=\"error: exit $rc, no result (see $dir/run-$k.log)\"" \
            "basetemp=$base" >>"$results"
    fi
    echo "series: run $k: $((SECONDS - started))s: $(tail -n 1 "$results")"
done

# The summary of this series' lines.
tail -n +"$first_line" "$results" | awk '
    { total++ }
    /verdict="pass"/ { pass++; next }
    { failed++; print "  not passed: " $0 }
    END { printf "series: %d of %d runs passed, %d did not\n", pass, total, failed }'
