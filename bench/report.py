"""Markdown table from pytest-benchmark JSON: median time per implementation and the fused op's speed-up.

    python bench/report.py bench/results/cpu.json [more.json ...]
Medians over several JSON files (repeated runs) are combined by taking the median of medians.
"""

import json
import statistics
import sys
from collections import defaultdict


def main(paths):
    med = defaultdict(list)
    machine = None
    for p in paths:
        data = json.load(open(p))
        machine = machine or data.get("machine_info", {})
        for b in data["benchmarks"]:
            e = b["extra_info"]
            med[(e["op"], e["n"], e["dtype"], e["impl"])].append(b["stats"]["median"])
    rows = sorted({k[:3] for k in med}, key=lambda k: (k[0], k[2], k[1]))
    print(
        f"{len(paths)} run(s); machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"python {machine.get('python_version', '?')}\n"
    )
    print("| op | dtype | batch | fused (ms) | reference (ms) | compiled ref (ms) | vs reference | vs compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for op, n, dt in rows:
        t = {
            impl: statistics.median(med[(op, n, dt, impl)]) * 1e3
            for impl in ("fused", "reference", "compiled_reference")
            if (op, n, dt, impl) in med
        }
        f = t.get("fused")
        cell = lambda impl: f"{t[impl]:.2f}" if impl in t else "-"
        ratio = lambda impl: f"{t[impl] / f:.1f}x" if impl in t and f else "-"
        print(
            f"| {op} | {dt} | {n} | {cell('fused')} | {cell('reference')} | {cell('compiled_reference')} "
            f"| {ratio('reference')} | {ratio('compiled_reference')} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
