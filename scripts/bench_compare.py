"""Compares criterion's latest estimates with bench/baseline.json (see scripts/bench-compare).

Each bench is kept as its median time per iteration and its throughput (elements per
iteration), so the table shows both the time and events/s per core. Exit status 1 when a
bench is slower than the baseline by more than the threshold.
"""

import argparse
import json
import os
import platform
import statistics
import sys

# Benches that time third-party code only (the log's codecs on a fixed frame): when they
# moved as much as the rest, the host changed, not the code.
HOST_PROBES = "codec/"


def read_runs(root):
    """{full_id: (median_ns, elements or None)} from criterion's `new` estimates."""
    runs = {}
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
            continue
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            estimates = json.load(f)
        throughput = bench.get("throughput") or {}
        elements = throughput.get("Elements") if isinstance(throughput, dict) else None
        runs[bench["full_id"]] = (estimates["median"]["point_estimate"], elements)
    return runs


def per_second(ns, elements):
    if not elements:
        return ""
    rate = elements * 1e9 / ns
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.2f} {unit}/s"
    return f"{rate:.0f} /s"


def time(ns):
    for unit, scale in (("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f} {unit}"
    return f"{ns:.0f} ns"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--criterion", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--threshold", type=float, default=10.0, help="per cent slower to flag")
    p.add_argument("--save", action="store_true", help="write these figures as the baseline")
    a = p.parse_args()

    runs = read_runs(a.criterion)
    if not runs:
        sys.exit(f"no criterion estimates under {a.criterion}: run the benches first")
    if a.save:
        doc = {
            "note": "medians per iteration from scripts/bench-compare --save; "
            "compare on the machine that made them",
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "benches": {
                k: {"median_ns": round(ns, 1), "elements": el}
                for k, (ns, el) in sorted(runs.items())
            },
        }
        with open(a.baseline, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"saved {len(runs)} benches to {a.baseline}")
        return 0

    try:
        with open(a.baseline) as f:
            baseline = json.load(f)["benches"]
    except FileNotFoundError:
        sys.exit(f"no baseline at {a.baseline}: run with --save first")

    slower = []
    rows = [("bench", "baseline", "now", "change", "now per core", "")]
    for k in sorted(set(runs) | set(baseline)):
        if k not in runs:
            rows.append((k, time(baseline[k]["median_ns"]), "not run", "", "", ""))
            continue
        ns, el = runs[k]
        if k not in baseline:
            rows.append((k, "new", time(ns), "", per_second(ns, el), ""))
            continue
        base = baseline[k]["median_ns"]
        change = (ns - base) / base * 100
        flag = ""
        if change > a.threshold:
            flag = "SLOWER"
            slower.append(k)
        elif change < -a.threshold:
            flag = "faster"
        rows.append((k, time(base), time(ns), f"{change:+.1f}%", per_second(ns, el), flag))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    probes = [runs[k][0] / baseline[k]["median_ns"]
              for k in runs if k.startswith(HOST_PROBES) and k in baseline]
    if probes:
        host = statistics.median(probes)
        if abs(host - 1) * 100 > a.threshold:
            print(f"\nthe host is not the baseline's: the {HOST_PROBES}* benches, which time "
                  f"only third-party code, take {host:.2f}x their baseline time (median of "
                  f"{len(probes)}). Compare on one host: --save at the old commit here, "
                  "then run the new one.")
    if slower:
        print(f"\n{len(slower)} bench(es) more than {a.threshold:g}% slower than the baseline: "
              + ", ".join(slower))
        return 1
    print(f"\nno bench more than {a.threshold:g}% slower than the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
