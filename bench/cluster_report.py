"""bench/cluster.sh's raw results -> a Markdown summary on standard output.

    python3 bench/cluster_report.py target/bench/cluster/<stamp>
"""

import json
import sys
from pathlib import Path

from stats import med, spread

SCENARIOS = {
    "fanin0": "fan-in: 8 publishers -> 1 subscriber, QoS 0",
    "fanout0": "fan-out: 1 publisher -> 8 subscribers, QoS 0",
    "xpairs0": "8 pairs, QoS 0, clean (cluster: publisher on node 1, subscriber on node 2)",
    "xpairs1": "8 pairs, QoS 1, clean (cluster: publisher on node 1, subscriber on node 2)",
    "pairs1p": "8 pairs, QoS 1, persistent subscribers (cluster: all on node 1)",
    "xlat0": "8 pairs, QoS 0, clean, {rate:,} msg/s in all (cluster: across nodes)",
    "xlat1": "8 pairs, QoS 1, clean, {rate:,} msg/s in all (cluster: across nodes)",
}


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(value, digits=0):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def fmt_range(values, digits=0):
    lo, hi = spread(values)
    if lo is None:
        return "-"
    return f"{fmt(med(values), digits)} ({fmt(lo, digits)}-{fmt(hi, digits)})"


def throughput(run, out, rate):
    rows = {}
    for meta_path in sorted(run.glob("runs/*.meta.json")):
        meta = load(meta_path)
        if meta is None:
            continue
        result = load(meta_path.with_name(meta_path.name.replace(".meta.json", ".json")))
        rows.setdefault((meta["scenario"], meta["setup"]), []).append((meta, result))
    if not rows:
        return
    out.append("| scenario | setup | delivered msg/s, median (min-max) | latency p50 / p99 ms "
               "(median) | broker CPU s per node | machine busy | rounds |")
    out.append("|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        for setup in ("single", "cluster"):
            runs = rows.get((scenario, setup))
            if not runs:
                continue
            ok = [(m, r) for m, r in runs if r]
            rates = [r.get("received_per_sec") for _, r in ok]
            p50 = [(r.get("latency_ms") or {}).get("p50") for _, r in ok]
            p99 = [(r.get("latency_ms") or {}).get("p99") for _, r in ok]
            nodes = sorted({n for m, _ in runs for n in m["broker_cpu_s"]})
            cpu = " / ".join(fmt(med([m["broker_cpu_s"].get(n) for m, _ in runs]), 1)
                             for n in nodes)
            busy = fmt(med([m["machine_busy"] for m, _ in runs]), 2)
            failed = [m for m, r in runs if m["exit"] != 0 or not r]
            note = f" ({len(failed)} failed)" if failed else ""
            label = SCENARIOS[scenario].format(rate=rate)
            out.append(f"| {label} | {setup} | {fmt_range(rates)} | "
                       f"{fmt(med(p50), 2)} / {fmt(med(p99), 2)} | {cpu} | {busy} | "
                       f"{len(runs)}{note} |")
    out.append("")
    out.append("Commands (round 1; PORT is node 1's, or the single node's, SUB_PORT node 2's):")
    out.append("")
    out.append("```sh")
    for scenario in SCENARIOS:
        for setup in ("single", "cluster"):
            runs = rows.get((scenario, setup))
            if runs:
                command = runs[0][0]["command"]
                words = []
                skip = None
                for word in command.split():
                    if skip:
                        words.append(skip)
                        skip = None
                    elif word in ("--port", "--sub-port"):
                        words.append(word)
                        skip = "PORT" if word == "--port" else "SUB_PORT"
                    else:
                        words.append(word)
                out.append(f"# {scenario}, {setup}")
                out.append(" ".join(words))
    out.append("```")
    out.append("")


def failover(run, out):
    runs = [load(p) for p in sorted(run.glob("runs/failover.*.json"))]
    runs = [r for r in runs if r and "session_present_s" in r]
    if not runs:
        return
    present = [r["session_present_s"] for r in runs]
    leader = [r["leader_s"] for r in runs]
    out.append(f"Failover, {len(runs)} runs ({runs[0]['sessions']} persistent sessions "
               "connected to the leader, the leader killed with SIGKILL):")
    out.append("")
    out.append("| from the kill to | min | median | max |")
    out.append("|---|---|---|---|")
    lo, hi = spread(leader)
    out.append(f"| a survivor's `mqttd_cluster_is_leader` 1 | {fmt(lo, 2)} s | "
               f"{fmt(med(leader), 2)} s | {fmt(hi, 2)} s |")
    lo, hi = spread(present)
    out.append(f"| CONNACK with session present on a survivor | {fmt(lo, 2)} s | "
               f"{fmt(med(present), 2)} s | {fmt(hi, 2)} s |")
    missing = sum(1 for p in present if p is None)
    if missing:
        out.append(f"\n{missing} runs never got session present within 60 s.")
    out.append("")
    out.append("Attempts per run: " + ", ".join(str(r["attempts"]) for r in runs) + "; first "
               "attempt's answer: " + ", ".join(json.dumps(r["first"][0]["got"]) if r["first"]
                                              else "-" for r in runs) + ".")
    out.append("")


def memory(run, out):
    rows = [load(run / "runs" / f"memory.{s}.json") for s in ("single", "cluster")]
    rows = [r for r in rows if r]
    if not rows:
        return
    out.append("| setup | node | RSS idle | RSS with sessions | growth | per session |")
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        for node, idle in r["idle_rss_kb"].items():
            held = r["held_rss_kb"].get(node)
            growth = held - idle if held is not None else None
            per = growth * 1024 / r["sessions"] if growth is not None else None
            out.append(f"| {r['setup']} | {node} | {fmt(idle / 1024, 1)} MiB | "
                       f"{fmt(held / 1024, 1) if held else '-'} MiB | "
                       f"{fmt(growth / 1024, 1) if growth is not None else '-'} MiB | "
                       f"{fmt(per)} B |")
    r = rows[0]
    out.append("")
    out.append(f"Sessions: {r['sessions']} (made on node 1), each holding {r['queued_each']} "
               "QoS 1 messages of 64 bytes. Subscribers connected / publisher acked: " +
               "; ".join(f"{x['setup']}: {x['sub'].get('connected')} / {x['pub'].get('acked')}"
                         f" in {fmt(x['pub'].get('duration_secs'), 1)} s" for x in rows) + ".")
    out.append("")


def main():
    run = Path(sys.argv[1])
    machine = load(run / "machine.json") or {}
    out = [f"Run {run.name}: {machine.get('date')}, {machine.get('mqttd')}, "
           f"{machine.get('profile')} build, {machine.get('nproc')} x {machine.get('cpu')}, "
           f"{machine.get('kernel')}, {machine.get('filesystem')}; brokers on CPU "
           f"{machine.get('broker_cpus')} (the three nodes share it), load generator on CPU "
           f"{machine.get('client_cpus')}; load average before {machine.get('loadavg_before')},"
           f" after {machine.get('loadavg_after')}.", ""]
    throughput(run, out, machine.get("lat_rate", 2000))
    failover(run, out)
    memory(run, out)
    print("\n".join(out))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
