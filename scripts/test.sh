#!/usr/bin/env bash
# The project's one test command; CI runs it through .ci/run on a fresh clone.
#
# It installs what it needs, then checks formatting, runs clippy with warnings denied, the test
# suite (doc tests, then cargo nextest), the interoperability suite, the dashboard in headless
# Chromium (screenshots in target/dashboard-screenshots/), the NAT lab (as root, with
# the mqttd binary those built), rustdoc with warnings denied, checks that the protocol core
# depends on no async runtime, replays the fuzz corpus and checks the fuzz seeds, and runs every
# fuzz target in fuzz/fuzz_targets/.
#
# Environment:
#   FUZZ_SECONDS  seconds each fuzz target runs (default 60; 0 skips fuzzing)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

started=$SECONDS
section_started=$SECONDS
section() {
    if [[ -n "${current_section:-}" ]]; then
        printf '    (%s: %ds)\n' "$current_section" $((SECONDS - section_started))
    fi
    current_section="$1"
    section_started=$SECONDS
    printf '\n==> %s\n' "$1"
}
fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Tools. Everything a check needs is installed here, idempotently, so that the script works on
# a fresh machine. Add new requirements in this section, with the helper for their registry.
# ---------------------------------------------------------------------------------------------

# need_cargo_tool BINARY CRATE: installs CRATE from crates.io unless BINARY is on the PATH.
need_cargo_tool() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "installing $2"
        cargo install "$2" --locked
    fi
}

# need_apt PACKAGE...: installs the Debian packages that are not installed yet.
need_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}"
        if [[ -z "${apt_updated:-}" ]]; then
            apt-get update -qq
            apt_updated=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

section "tools"
for component in cargo-fmt cargo-clippy; do
    command -v "$component" >/dev/null 2>&1 ||
        fail "$component is missing from the Rust toolchain"
done
need_cargo_tool cargo-nextest cargo-nextest
if ((FUZZ_SECONDS > 0)); then
    need_cargo_tool cargo-fuzz cargo-fuzz
fi
# Debian's Mosquitto broker and clients: `mqttd pub`/`mqttd sub` are tested against them
# (crates/mqttd/tests/cli_mosquitto.rs), and mosquitto_passwd writes password files.
need_apt mosquitto mosquitto-clients
# System packages (need_apt ...), Python packages (pip install ...) and npm packages
# (npm ci in their directory) that later checks need go here. The interoperability suite
# installs its own (mosquitto-clients, and paho-mqtt and pytest in target/interop-venv).
# The Rust TLS tests run mosquitto_pub/mosquitto_sub against the generated CA.
need_apt mosquitto-clients
# The dashboard's browser test (tests/dashboard) drives Debian's headless Chromium through
# chromium-driver; nothing is downloaded by the browser tooling at test time.
need_apt chromium chromium-driver
# ngtcp2's example HTTP/3 client (gtlsclient) fetches /health and /metrics from the QUIC
# listener, moving address and updating keys (crates/mqttd/tests/http3.rs).
need_apt ngtcp2-client
# systemd-analyze verifies dist/systemd/mqttd.service (crates/mqttd/tests/deploy.rs, part of
# the nextest run, about 2 s); with it installed, the test fails rather than skip.
need_apt systemd
export MQTTD_REQUIRE_SYSTEMD_ANALYZE=1
# The NAT lab (tests/natlab) builds its networks with `ip netns`, veth pairs and nftables. It
# needs root, like apt-get here; without root it is skipped below.
if ((EUID == 0)); then
    need_apt iproute2 nftables
fi
# The cluster lab makes its cluster's certificates with the openssl command.
need_apt openssl
cargo --version
cargo nextest --version | sed -n 1p

# ---------------------------------------------------------------------------------------------
# Static checks
# ---------------------------------------------------------------------------------------------

section "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check

section "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

section "mqttd-proto depends on no async runtime"
# The protocol core is sans-IO: no runtime may creep in, even through a dependency.
proto_deps=$(cargo tree -p mqttd-proto -e normal --target all --prefix none)
if grep -Eq '^tokio([- ]|$)' <<<"$proto_deps"; then
    cargo tree -p mqttd-proto -e normal --target all -i tokio || true
    fail "mqttd-proto depends on tokio"
fi
echo "ok: no tokio among $(sort -u <<<"$proto_deps" | wc -l) normal dependencies"

section "the broker's connection core has no runtime and no clock"
# crates/mqttd-broker/src/core/ is sans-IO too: time is passed in, the driver does the waiting.
if grep -rnE 'tokio|Instant::now|SystemTime::now|std::net|std::thread' \
    --include='*.rs' --exclude=tests.rs crates/mqttd-broker/src/core/; then
    fail "crates/mqttd-broker/src/core/ uses a runtime, a clock, sockets or threads"
fi
echo "ok: crates/mqttd-broker/src/core/ is sans-IO"

# ---------------------------------------------------------------------------------------------
# Tests and docs
# ---------------------------------------------------------------------------------------------

# Doc tests first, so that the run's closing test summary is nextest's.
section "doc tests"
cargo test --doc --workspace

section "cargo nextest run"
# Tests that need root (the full-disk test mounts a tmpfs) skip with a message without it; as
# root, a test that cannot do what it needs fails instead.
if ((EUID == 0)); then
    export MQTTD_REQUIRE_ROOT_TESTS=1
fi
cargo nextest run --workspace

section "interoperability with real clients (paho-mqtt, mosquitto-clients)"
# Installs Debian's mosquitto-clients and the Python packages it needs, builds the broker and
# runs the suite against a fresh broker per test.
bash tests/interop/run.sh

# About 270 s on the 2-core machine with a debug build (the randomised run alone about 60 s).
clusterlab_budget=330
section "cluster lab: histories and the checker (budget ${clusterlab_budget}s)"
# Publishers and persistent subscribers that log their histories, and a checker (lost,
# duplicate, order, session, late, phantom) that reads them afterwards: the checker against
# histories written by hand, then one real broker killed with SIGKILL mid-run, then (as root)
# the lab's network namespaces: partitions, and the workload from the clients' namespace across
# a SIGSTOP pause and a SIGKILL, and three real nodes as one cluster there (a leader killed, a
# partition, messages across nodes, persistent subscribers moving between nodes across a node
# killed, a 2/1 and a 1/1/1 partition, a node paused, the whole cluster killed, and 40 s of
# randomised faults from a printed seed; a leader killed and started again at once; connects
# and publications with one node down)
# (tests/clusterlab/README.md). Uses the debug broker built above; openssl makes the
# cluster's certificates.
if ((EUID == 0)); then
    export CLUSTERLAB_REQUIRED=1
fi
MQTTD_BIN="$PWD/target/debug/mqttd" bash tests/clusterlab/run.sh
clusterlab_took=$((SECONDS - section_started))
echo "cluster lab: ${clusterlab_took}s (budget ${clusterlab_budget}s)"
if ((clusterlab_took > clusterlab_budget)); then
    echo "warning: the cluster lab took ${clusterlab_took}s, over its ${clusterlab_budget}s budget"
fi

dashboard_budget=180
section "the dashboard in headless Chromium (budget ${dashboard_budget}s)"
# Against the debug broker built above: signs in (a wrong key refused), sees a client connected
# with mosquitto_sub appear and kicks it, deletes a retained message published with
# mosquitto_pub, looks at every page in light and dark and in a phone-sized window. A screenshot
# of each page is kept in target/dashboard-screenshots/, the run's artifact. It does not skip: a
# browser that cannot start fails the run.
bash tests/dashboard/run.sh
dashboard_took=$((SECONDS - section_started))
echo "dashboard: ${dashboard_took}s (budget ${dashboard_budget}s); screenshots in target/dashboard-screenshots/"
if ((dashboard_took > dashboard_budget)); then
    echo "warning: the dashboard test took ${dashboard_took}s, over its ${dashboard_budget}s budget"
fi

natlab_budget=300
section "NAT lab: router types, hole punching, and mqttd peer to peer in network namespaces (budget ${natlab_budget}s)"
# Namespaces, veth pairs and nftables routers: each NAT type classified from outside with
# plain UDP, a hole punch across all 16 pairs of types, then the real mqttd across the same 16
# pairs (a relay, a p2p:// broker, clients) and relay failover (tests/natlab/README.md). It
# runs after nextest and the interoperability suite, which built target/debug/mqttd (the build
# below is a no-op then); MQTTD_BIN names that binary. CI runs as root, where a lab that cannot
# be built (or a missing binary) must fail, not skip: hence NATLAB_REQUIRED=1.
if ((EUID != 0)); then
    echo "skipped: the NAT lab needs root (network namespaces and nftables)"
elif ! ip netns list >/dev/null 2>&1 || ! command -v nft >/dev/null 2>&1; then
    echo "skipped: the NAT lab needs \`ip netns\` (iproute2) and \`nft\` (nftables)"
else
    cargo build -q -p mqttd
    # The scale test has its own section and budget, below.
    MQTTD_BIN="$PWD/target/debug/mqttd" NATLAB_REQUIRED=1 bash tests/natlab/run.sh \
        --ignore=test_p2p_scale.py
    natlab_took=$((SECONDS - section_started))
    echo "NAT lab: ${natlab_took}s (budget ${natlab_budget}s)"
    if ((natlab_took > natlab_budget)); then
        echo "warning: the NAT lab took ${natlab_took}s, over its ${natlab_budget}s budget"
    fi
fi

natlab_scale_budget=900
section "NAT lab: 1,000 concurrent traversal attempts through one relay (budget ${natlab_scale_budget}s)"
# With a release build, which starts all 1,000 attempts at once (a debug build costs five
# times the CPU per attempt and cannot on two cores: docs/p2p.md); the build is the section's
# main cost. Prints the summary line (p50/p99 times, how many were under way at once, CPU
# seconds per process).
if ((EUID == 0)) && ip netns list >/dev/null 2>&1 && command -v nft >/dev/null 2>&1; then
    cargo build -q --release --locked -p mqttd
    echo "release build: $((SECONDS - section_started))s"
    MQTTD_BIN="$PWD/target/release/mqttd" NATLAB_REQUIRED=1 bash tests/natlab/run.sh \
        -s test_p2p_scale.py
    scale_took=$((SECONDS - section_started))
    echo "NAT lab scale test: ${scale_took}s (budget ${natlab_scale_budget}s)"
    if ((scale_took > natlab_scale_budget)); then
        echo "warning: the scale test took ${scale_took}s, over its ${natlab_scale_budget}s budget"
    fi
else
    echo "skipped: the NAT lab needs root, \`ip netns\` and \`nft\`"
fi

section "hostile clients against the release broker"
# The cases whose witness bound is set for a release broker (a debug one spends about ten
# times the CPU per packet): the debug test binaries, each starting target/release/mqttd.
cargo build -q --release --locked -p mqttd
MQTTD_TEST_BINARY="$PWD/target/release/mqttd" cargo nextest run -p mqttd --test hostile_limits \
    --run-ignored ignored-only --no-fail-fast

section "cargo doc -D warnings"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps

# ---------------------------------------------------------------------------------------------
# Fuzz corpus and seeds, on every run (FUZZ_SECONDS=0 included): the stable toolchain replays
# every committed input of every target through the code the target runs (fuzz/tests/corpus.rs),
# and the seed programs check that their seeds still get where they mean to.
# ---------------------------------------------------------------------------------------------

section "fuzz corpus replay and seed checks"
cargo test --manifest-path fuzz/Cargo.toml
seeds=$(mktemp -d)
cargo run -q --manifest-path fuzz/Cargo.toml --example session_seeds -- "$seeds/session" |
    tail -n 1
# The session seeds are deterministic: the committed ones must be what the program writes.
for seed in "$seeds"/session/*; do
    cmp -s "$seed" "fuzz/corpus/session/$(basename "$seed")" ||
        fail "fuzz/corpus/session/$(basename "$seed") is stale: rerun the session_seeds example"
done
cargo run -q --manifest-path fuzz/Cargo.toml --example store_record_seeds -- "$seeds/store_record" |
    tail -n 1
cargo run -q --manifest-path fuzz/Cargo.toml --example broker_seeds -- "$seeds/broker" | tail -n 1
for seed in "$seeds"/broker/*; do
    cmp -s "$seed" "fuzz/corpus/broker/$(basename "$seed")" ||
        fail "fuzz/corpus/broker/$(basename "$seed") is stale: rerun the broker_seeds example"
done
rm -rf "$seeds"

# ---------------------------------------------------------------------------------------------
# Fuzzing: every target in fuzz/fuzz_targets/ for FUZZ_SECONDS, starting from its seeds in
# fuzz/corpus/<target>/. New inputs go to a scratch directory, so the committed corpus only
# changes on purpose.
# ---------------------------------------------------------------------------------------------

if ((FUZZ_SECONDS > 0)); then
    section "fuzz targets: build"
    # cargo fuzz needs nightly features; without a nightly toolchain, RUSTC_BOOTSTRAP lets the
    # stable compiler accept them.
    if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        fuzz=(cargo +nightly fuzz)
    else
        fuzz=(env RUSTC_BOOTSTRAP=1 cargo fuzz)
    fi
    echo "using: ${fuzz[*]}"
    # Debug assertions turn integer overflow into a crash the fuzzer reports.
    "${fuzz[@]}" build --debug-assertions

    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    for file in fuzz/fuzz_targets/*.rs; do
        target=$(basename "$file" .rs)
        section "fuzz $target for ${FUZZ_SECONDS}s"
        corpus=("$scratch/$target")
        mkdir -p "${corpus[0]}"
        if [[ -d "fuzz/corpus/$target" ]]; then
            corpus+=("fuzz/corpus/$target")
        fi
        log="$scratch/$target.log"
        if ! "${fuzz[@]}" run --debug-assertions "$target" "${corpus[@]}" -- \
            -max_total_time="$FUZZ_SECONDS" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
            grep -m1 -A4 'panicked at' "$log" || true
            echo "..."
            tail -n 40 "$log"
            echo "crash inputs (reproduce with: cargo fuzz run $target <file>):"
            ls -1 "fuzz/artifacts/$target" 2>/dev/null || true
            fail "fuzz target $target crashed"
        fi
        grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|Done )' "$log" || true
    done
fi

section "done"
printf 'all checks passed in %ds\n' $((SECONDS - started))
