#!/usr/bin/env python3
"""Medians from run-load.sh's results.tsv (as produced by sweep.sh).

    perf/scripts/summarize.py $OUT/results.tsv [TAG_PREFIX ...]

Groups rows by tag without the "-repN" suffix. For each group:
  * max clean rate per repetition (clean: PASS, retrans <= 0.1% of calls, sustained
    median 1-s rate >= 95% of target), then the median over repetitions;
  * per target rate: medians of server us/request, sustained rate, SIPp CPU %, outside
    CPU, over the repetitions that ran that step (clean or not).
"""
import csv
import re
import statistics
import sys
from collections import defaultdict


def clean(r):
    return (r["verdict"] == "PASS" and int(r["retrans"]) <= int(r["calls"]) / 1000
            and float(r["rate_p50"]) >= 0.95 * int(r["target_rate"]))


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def main():
    path = sys.argv[1]
    prefixes = sys.argv[2:]
    rows = list(csv.DictReader(open(path), delimiter="\t"))
    groups = defaultdict(list)
    for r in rows:
        m = re.match(r"(.*)-rep(\d+)$", r["tag"])
        if not m:
            continue
        if prefixes and not any(m.group(1).startswith(p) for p in prefixes):
            continue
        r["_rep"] = int(m.group(2))
        groups[m.group(1)].append(r)
    for g, rs in groups.items():
        reps = sorted({r["_rep"] for r in rs})
        best = []
        for rep in reps:
            ok = [r for r in rs if r["_rep"] == rep and clean(r)]
            b = max(ok, key=lambda r: int(r["target_rate"]), default=None)
            best.append(b)
        print(f"## {g}  ({rs[0]['mode']}, server {rs[0]['server']}, backend {rs[0]['backend']},"
              f" {rs[0]['workers']} workers, pin={rs[0]['pin']}, {rs[0]['sipp_n']} SIPp)")
        desc = ", ".join(
            f"rep{rep}: {int(b['target_rate']) // 1000}k (p50 {int(b['rate_p50'])}/s)" if b else f"rep{rep}: none"
            for rep, b in zip(reps, best))
        print(f"max clean target rate per rep: {desc}")
        print(f"median max clean rate: target {med([int(b['target_rate']) for b in best if b]):.0f}/s,"
              f" sustained {med([float(b['rate_p50']) for b in best if b]):.0f}/s")
        print("| target/s | runs (clean) | sustained/s (median) | fail | retrans (median) "
              "| server µs/req | server CPU s | SIPp CPU % (max inst.) | other CPU s |")
        print("|---|---|---|---|---|---|---|---|---|")
        by_rate = defaultdict(list)
        for r in rs:
            by_rate[int(r["target_rate"])].append(r)
        for rate in sorted(by_rate):
            x = by_rate[rate]
            nclean = sum(clean(r) for r in x)
            print(f"| {rate} | {len(x)} ({nclean}) | {med([float(r['rate_p50']) for r in x]):.0f} "
                  f"| {sum(int(r['fail']) + int(r['incomplete']) for r in x)} "
                  f"| {med([int(r['retrans']) for r in x]):.0f} "
                  f"| {med([float(r['srv_us_req']) for r in x]):.2f} "
                  f"| {med([float(r['srv_cpu_s']) for r in x]):.2f} "
                  f"| {med([float(r['sipp_cpu_pct_max']) for r in x]):.0f} "
                  f"| {med([float(r['other_cpu_s']) for r in x]):.2f} |")
        print()


if __name__ == "__main__":
    main()
