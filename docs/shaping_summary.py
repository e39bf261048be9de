"""
The tables of docs/RESULTS.md's "Why shaping costs turn 1 on the demo": from evaluate.py's report over seeds
(rows named ROW@SEED) and the runs' log.jsonl, per row the mean +- standard error over seeds of the evaluation's
metrics, the paired differences of acc_t1, delta and acc_t2 between rows, and, for each ROW=DIR given, training's
log (kl_t1, acc_t1, ...) averaged over steps 1-100 and 201-300.

    python docs/shaping_summary.py REPORT.json ROW=DIR_WITH_{seed} ...   e.g. SCoRe=/work/demo_run/demo/seed{seed}/score
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from evaluate import mean_se  # noqa: E402

cell = lambda s, scale=100: f"{scale * s['mean']:.1f} ± {scale * s['se']:.1f}"
report, runs = json.load(open(sys.argv[1])), dict(a.split("=", 1) for a in sys.argv[2:])
by = {}  # row -> seed -> report
for r in report["checkpoints"]:
    row, _, seed = r["name"].rpartition("@")
    by.setdefault(row, {})[seed] = r
seeds = sorted(next(iter(by.values())))
metrics = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed")
print("| row | " + " | ".join(metrics) + " |\n|---" * 1 + "|---" * len(metrics) + "|")
for row, rs in by.items():
    print(f"| {row} | " + " | ".join(cell(mean_se([rs[s][m] for s in seeds])) for m in metrics) + " |")
print("\n| paired (over seeds) | acc_t1 | delta | acc_t2 |\n|---|---|---|---|")
for i, a in enumerate(by):
    for b in list(by)[i + 1:]:
        print(f"| {a} - {b} | " + " | ".join(cell(mean_se([by[a][s][m] - by[b][s][m] for s in seeds]))
                                          for m in ("acc_t1", "delta", "acc_t2")) + " |")
fields = ("kl_t1", "kl_t2", "acc_t1", "acc_t2", "delta_i2c", "delta_c2i", "grad_norm")
for lo, hi in ((1, 100), (201, 300)):
    print(f"\n| training, steps {lo}-{hi} (mean over steps) | " + " | ".join(fields) + " |\n|---" + "|---" * len(fields) + "|")
    for row in runs:
        per_seed = []
        for s in seeds:
            log = [json.loads(x) for x in open(os.path.join(runs[row].format(seed=s), "log.jsonl"))]
            log = [x for x in log if "kl_t1" in x and lo <= x["step"] <= hi]
            per_seed.append({f: sum(x[f] for x in log) / len(log) for f in fields})
        scale = {f: 1 if f.startswith(("kl", "grad")) else 100 for f in fields}
        print(f"| {row} | " + " | ".join(f"{scale[f] * mean_se([p[f] for p in per_seed])['mean']:.{3 if scale[f] == 1 else 1}f}"
                                         f" ± {scale[f] * mean_se([p[f] for p in per_seed])['se']:.{3 if scale[f] == 1 else 1}f}"
                                         for f in fields) + " |")
