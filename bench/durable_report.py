#!/usr/bin/env python3
"""Turns the results of bench/durable.sh into a Markdown section for docs/durability.md.

    durable_report.py RESULTS_DIR > bench/out/durable.md

Standard library only. Rates are counts divided by the publishing window (--duration), as in
bench/report.py; sizes come from du: *allocated* is the blocks in use (du --block-size=1),
*apparent* the file lengths (du -sb).
"""

import json
import sys
from pathlib import Path

from stats import med, spread

NAMES = {"mosquitto": "Mosquitto", "mqttd": "mqttd"}
BROKERS = ["mosquitto", "mqttd"]
FANIN = {
    "fanin1": "Fan-in, clean sessions (bench/compare.sh's fanin1)",
    "fanin1-persistent": "Fan-in into one persistent session",
    "pairs1-persistent": "Pairs: each publisher into its own persistent session",
}
RESTART_GOAL_S = 2.0
RESTART_GOAL_STORED = 100_000
# Share of the CPU in use before a run above which the machine was not quiet (bench/compare.sh's
# QUIET_THRESHOLD default).
BUSY = 0.10


def load(results: Path):
    machine = json.loads((results / "machine.json").read_text())
    traffic, restarts = [], []
    for meta_path in sorted((results / "runs").glob("*.meta.json")):
        meta = json.loads(meta_path.read_text())
        base = meta_path.name.removesuffix(".meta.json")
        for key, name in (("summary", f"{base}.json"), ("store", f"{base}.store.json")):
            try:
                meta[key] = json.loads((results / "runs" / name).read_text())
            except (OSError, ValueError):
                meta[key] = None
        traffic.append(meta)
    for path in sorted((results / "runs").glob("restart.*.result.json")):
        restarts.append(json.loads(path.read_text()))
    return machine, traffic, restarts


def k(v):
    return "—" if v is None else f"{v / 1000:,.1f} k"


def num(v, digits=0):
    return "—" if v is None else f"{v:,.{digits}f}"


def secs(v):
    return "—" if v is None else f"{v:.3f} s"


def mib(v):
    return "—" if v is None else f"{v / 1048576:,.1f} MiB"


def plural(n, word):
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def pct(v):
    return "—" if v is None else f"{v * 100:.0f} %"


def traffic_stats(machine, runs, scenario, broker):
    window = machine["duration_s"]
    rows, failed = [], 0
    for r in runs:
        if r["scenario"] != scenario or r["broker"] != broker:
            continue
        s = r["summary"]
        if not s or r["exit"] != 0:
            failed += 1
            continue
        latency = s.get("latency_ms") or {}
        rows.append(
            {
                "received": s["received"] / window,
                "sent": s["sent"] / window,
                "acked": s["acked"] / window,
                "delivered": s["received"] / s["sent"] if s["sent"] else None,
                "p50": latency.get("p50"),
                "p99": latency.get("p99"),
                "broker_cpu": r["broker_cpu_s"] / r["wall_s"],
                "client_cpu": r.get("client_cpu_s", 0) / r["wall_s"],
                "store": (r.get("store") or {}).get("store_bytes"),
            }
        )
    if not rows:
        return None, failed
    return {key: [row[key] for row in rows] for key in rows[0]}, failed


def fanin_section(machine, runs):
    out = ["### QoS 1 fan-in into persistent sessions", ""]
    out.append(
        f"{plural(machine['rounds'], 'round')} of {machine['duration_s']} s per scenario and "
        "broker, in "
        "alternation, each against a freshly started broker (mqttd on an empty data directory). "
        "8 publishers, QoS 1, at most 1,000 unacknowledged messages each, 64-byte payloads, "
        f"MQTT {'3.1.1' if machine['protocol'] == '311' else '5'}. Publishers use clean "
        "sessions; subscribers in the *persistent* scenarios do not ("
        + ("clean session 0" if machine["protocol"] == "311" else "session expiry 3,600 s")
        + "), so mqttd must have each message they get on disk before it acknowledges it. "
        "*Received* is the throughput figure; *acknowledged* is what the publishers got PUBACK "
        "for, which includes messages dropped when a subscriber's queue (1,000 messages) was full."
    )
    out.append("")
    out.append(
        "| scenario | broker | received msg/s (median) | min – max | acknowledged msg/s | "
        "delivered | latency p50 / p99 ms | broker CPU | client CPU | store at the end |"
    )
    out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for scenario, title in FANIN.items():
        for b in BROKERS:
            st, failed = traffic_stats(machine, runs, scenario, b)
            name = NAMES[b] + (f" ({failed} failed)" if failed else "")
            if st is None:
                if failed:
                    out.append(f"| {title} | {name} | failed | | | | | | | |")
                continue
            lo, hi = spread(st["received"])
            store = mib(med(st["store"])) if b == "mqttd" else "—"
            out.append(
                f"| {title} | {name} | **{k(med(st['received']))}** | {k(lo)} – {k(hi)} "
                f"| {k(med(st['acked']))} | {pct(med(st['delivered']))} "
                f"| {num(med(st['p50']), 1)} / {num(med(st['p99']), 1)} "
                f"| {pct(med(st['broker_cpu']))} | {pct(med(st['client_cpu']))} | {store} |"
            )
    out.append("")
    return out


def restart_rows(restarts, signal):
    return [r for r in restarts if r["signal"] == signal]


def drain_received(r):
    return (r.get("drain") or {}).get("received")


def restart_section(results, machine, restarts):
    stored = machine["stored"]
    out = [f"### Restart with {stored:,} stored messages", ""]
    out.append(
        "A persistent session subscribes to `bench/#` and disconnects; 8 publishers send it "
        f"{stored:,} QoS 1 messages of 64 bytes, every one acknowledged; mqttd is stopped "
        "(SIGTERM: graceful; SIGKILL: a crash) and started again on the same data directory. "
        "*Listening* is the time from starting the process to its `mqttd listening on tcp://` "
        "line; *drained* is the time from starting it until the resumed subscriber (connecting "
        "as soon as that line appears, without subscribing again) has received the last stored "
        "message. Times are medians, with the spread."
    )
    out.append("")
    out.append(
        "| stop | stop took | listening after | min – max | drained after | min – max | "
        "drain rate | received | session present |"
    )
    out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for signal in ("TERM", "KILL"):
        rows = restart_rows(restarts, signal)
        if not rows:
            continue
        listen = [r["listen_s"] for r in rows]
        drained = [r["drained_s"] for r in rows]
        rates = [
            stored / r["drain"]["expect_reached_secs"]
            for r in rows
            if r.get("drain") and r["drain"].get("expect_reached_secs")
        ]
        received = [drain_received(r) for r in rows]
        present = [(r.get("drain") or {}).get("session_present") for r in rows]
        lo, hi = spread(listen)
        dlo, dhi = spread(drained)
        out.append(
            f"| SIG{signal} | {secs(med([r['stop_s'] for r in rows]))} "
            f"| **{secs(med(listen))}** | {secs(lo)} – {secs(hi)} "
            f"| **{secs(med(drained))}** | {secs(dlo)} – {secs(dhi)} "
            f"| {k(med(rates))}{'' if not rates else ' msg/s'} "
            f"| {num(min((x for x in received if x is not None), default=None))} of {stored:,} "
            f"| {sum(1 for p in present if p)} of {plural(len(rows), 'run')} |"
        )
    out.append("")
    term = restart_rows(restarts, "TERM")
    unclean = [r for r in term if r["stop_status"] != 0]
    if unclean:
        out.append(
            f"**In {len(unclean)} of {plural(len(term), 'SIGTERM run')} mqttd did not exit "
            f"cleanly** (exit status {', '.join(str(r['stop_status']) for r in unclean)}, after "
            f"{', '.join(secs(r['stop_s']) for r in unclean)}; the script sends SIGKILL after "
            "60 s): see `logs/restart.term.ROUND.first.log` for round "
            f"{', '.join(str(r['round']) for r in unclean)}."
        )
        out.append("")
    errors = sorted({r["drain_error"] for r in restarts if r.get("drain_error")})
    for error in errors:
        out.append(f"The resumed subscriber failed: `{error}`.")
    if errors:
        out.append("")
    cold = [r["cold_listen_s"] for r in restarts if r.get("cold_listen_s") is not None]
    if cold:
        out.append(
            f"For comparison, the first start of each run, on an empty data directory, printed "
            f"its listener after {secs(med(cold))} (median)."
        )
    fills = [r["fill"] for r in restarts if r.get("fill")]
    if fills:
        rates = [f["acked"] / f["duration_secs"] for f in fills if f.get("duration_secs")]
        short = [f for f in fills if f["acked"] != stored]
        out.append(
            f"Filling the session took a median {secs(med([f['duration_secs'] for f in fills]))} "
            f"({k(med(rates))} msg/s acknowledged)"
            + (f"; {len(short)} fills were not fully acknowledged." if short else ".")
        )
    logs = [r["recovered_log"] for r in restarts if r.get("recovered_log")]
    if logs:
        out += ["", "What mqttd logged when it recovered (first run):", ""]
        out += ["```text", logs[0].replace(str(results), "$RUN"), "```"]
    out.append("")
    return out


def disk_section(machine, restarts):
    stored = machine["stored"]
    out = ["### Disk per stored message", ""]
    out.append(
        f"`data_dir/store` in the restart runs: with the session alone (*empty*), with "
        f"{stored:,} messages stored while mqttd runs (*full*), after it stopped, and after the "
        "resumed subscriber drained it. Per message: (*full* − *empty*) / "
        f"{stored:,}. *Allocated* is what the files occupy on disk (du --block-size=1), "
        "*apparent* their lengths (du -sb); preallocated or sparse files make the two differ."
    )
    out.append("")
    out.append("| | allocated (median) | apparent (median) |")
    out.append("|---|--:|--:|")

    def sizes(rows, state, i):
        return med([r["store_bytes"][state][i] for r in rows])

    for state, label in (("empty", "empty (session only)"), ("full", f"{stored:,} stored")):
        out.append(
            f"| {label} | {mib(sizes(restarts, state, 0))} | {mib(sizes(restarts, state, 1))} |"
        )
    for signal in ("TERM", "KILL"):
        rows = restart_rows(restarts, signal)
        if rows:
            out.append(
                f"| {stored:,} stored, after SIG{signal} | {mib(sizes(rows, 'stopped', 0))} "
                f"| {mib(sizes(rows, 'stopped', 1))} |"
            )
    out.append(
        f"| drained, broker running | {mib(sizes(restarts, 'drained', 0))} "
        f"| {mib(sizes(restarts, 'drained', 1))} |"
    )

    def per_message(rows, state, i):
        growth = [r["store_bytes"][state][i] - r["store_bytes"]["empty"][i] for r in rows]
        return med([g / stored for g in growth])

    out.append(
        f"| **bytes per stored message** | **{num(per_message(restarts, 'full', 0))}** "
        f"| **{num(per_message(restarts, 'full', 1))}** |"
    )
    term = restart_rows(restarts, "TERM")
    if term:
        out.append(
            f"| bytes per stored message, after SIGTERM | {num(per_message(term, 'stopped', 0))} "
            f"| {num(per_message(term, 'stopped', 1))} |"
        )
    out += ["", "Each message carries a 64-byte payload and a 7-byte topic (`bench/N`)."]
    empty_allocated, empty_apparent = sizes(restarts, "empty", 0), sizes(restarts, "empty", 1)
    if empty_allocated and empty_apparent and empty_apparent > 10 * empty_allocated:
        out.append(
            f"The apparent sizes are dominated by preallocated space ({mib(empty_apparent)} "
            f"apparent, {mib(empty_allocated)} allocated with no message stored): the allocated "
            "figure is the one to read."
        )
    out.append("")
    return out


def targets_section(machine, runs, restarts):
    out = ["### Against the goals of issue 5", ""]
    out.append("| goal | mqttd | reference | verdict |")
    out.append("|---|--:|--:|---|")

    def received(scenario, broker):
        st, _ = traffic_stats(machine, runs, scenario, broker)
        return med(st["received"]) if st else None

    mine = received("fanin1-persistent", "mqttd")
    for ref_scenario, ref_label in (
        ("fanin1", "Mosquitto in memory, clean sessions"),
        ("fanin1-persistent", "Mosquitto in memory, persistent session"),
    ):
        ref = received(ref_scenario, "mosquitto")
        if mine is None or ref is None:
            verdict = "not measured"
        else:
            verdict = "met" if mine >= ref else f"missed ({mine / ref:.2f} of it)"
        out.append(
            f"| QoS 1 fan-in into a persistent session, `durability = \"{machine['durability']}\"` "
            f"≥ {ref_label} | {k(mine)} | {k(ref)} | {verdict} |"
        )
    for signal in ("TERM", "KILL"):
        rows = restart_rows(restarts, signal)
        if not rows:
            continue
        complete = all(drain_received(r) == machine["stored"] for r in rows)
        for key, until in (("listen_s", "listening"), ("drained_s", "all delivered")):
            value = med([r[key] for r in rows])
            if value is None:
                verdict = "failed"
            elif not complete:
                verdict = "not measured: the stored messages did not survive"
            elif machine["stored"] != RESTART_GOAL_STORED:
                verdict = f"— (the goal is for {RESTART_GOAL_STORED:,})"
            else:
                verdict = "met" if value < RESTART_GOAL_S else "missed"
            out.append(
                f"| restart after SIG{signal} with {machine['stored']:,} stored, until {until}: "
                f"< {RESTART_GOAL_S:g} s | {secs(value)} | {RESTART_GOAL_S:g} s | {verdict} |"
            )
    out.append("")
    return out


def main():
    results = Path(sys.argv[1]).resolve()
    machine, runs, restarts = load(results)
    out = ["## Benchmarks", ""]
    out.append(
        f"Made by `bench/durable.sh` on {machine['date']} (raw results in "
        f"`target/bench/durable/{results.name}`, not committed); re-run it to refresh this "
        "section."
    )
    out.append("")
    if not machine["durable_keys"]:
        out += [
            "**This build of mqttd refused the `persistence` and `durability` settings**: it "
            "ran with its defaults, so the durability figures below are not those of "
            f"`durability = \"{machine['durability']}\"`.",
            "",
        ]
    resumed = [r for r in restarts if (r.get("drain") or {}).get("session_present")]
    if restarts and not resumed:
        out += [
            "**Nothing survived a restart in this run** (no resumed subscriber found its "
            "session): this build does not persist sessions, so the restart and disk figures "
            "only show that the script works.",
            "",
        ]
    v = machine["versions"]
    out += [
        f"- Machine: {machine['cpu']}, `nproc` = {machine['nproc']}, "
        f"{machine['mem_total_kb'] / 1048576:.1f} GiB RAM; {machine['kernel']}; {machine['os']}; "
        f"data directory on {machine['filesystem']}",
        f"- {v['mqttd']} with `durability = \"{machine['durability']}\"`; {v['mosquitto']}; "
        f"load generator: {machine['bench_client']} ({machine['rustc']})",
        "- Broker and load generator share the machine's cores, as in docs/benchmarks.md.",
        "",
    ]
    busy = [r for r in runs + restarts if (r.get("busy_before") or 0) >= BUSY]
    if busy:
        out += [
            f"**The machine was not idle**: other work used {BUSY * 100:.0f} % of the CPU or "
            f"more just before {len(busy)} of the {len(runs) + len(restarts)} runs (the script "
            "waits for quiet only up to `QUIET_WAIT` seconds, as bench/compare.sh does), so "
            "those figures understate what both brokers reach.",
            "",
        ]
    if runs or restarts:
        out += targets_section(machine, runs, restarts)
    if runs:
        out += fanin_section(machine, runs)
    if restarts:
        out += restart_section(results, machine, restarts)
        out += disk_section(machine, restarts)
    out += ["### Commands and configurations", "", "```sh"]
    for name, command in machine["commands"].items():
        out += [f"# {name}", command]
    out += ["```", ""]
    conf = results / "conf"
    for name, lang in (
        ("mqttd.toml", "toml"),
        ("mqttd-restart.toml", "toml"),
        ("mosquitto.conf", "text"),
    ):
        path = conf / name
        if path.exists():
            text = path.read_text().replace(str(results), "$RUN")
            out += [f"`{name}`:", "", f"```{lang}", text.rstrip(), "```", ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
