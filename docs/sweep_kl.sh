#!/usr/bin/env bash
# The demo's estimator and precision comparisons (docs/RESULTS.md): Stage I and Stage II with the KL in the
# reward (RLOO, the default) and in the loss (k2), and Stage I in bf16 against fp32, three training
# seeds each, from one base, evaluated greedily on 2,000 tuning problems (data.demo_split's "tune"), never on "eval".
#   bash docs/sweep_kl.sh BASE_DIR OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1; out=$2; mkdir -p "$out"
ev() { python evaluate.py --task demo --n 2000 --split tune --ckpt "$1" --name "$2" --out "$1/tune.json" >/dev/null; }
for seed in 0 1 2; do
  for kl in reward loss; do
    python train_stage1.py --base "$base" --init "$base" --out "$out/s1_${kl}_$seed" --kl $kl --seed $seed >/dev/null
    ev "$out/s1_${kl}_$seed/ckpt" "Stage I, --kl $kl, seed $seed"
    python train_stage2.py --base "$base" --init "$out/s1_${kl}_$seed/ckpt" --out "$out/s2_${kl}_$seed" --kl $kl \
      --seed $seed >/dev/null
    ev "$out/s2_${kl}_$seed/ckpt" "SCoRe, --kl $kl, seed $seed"
  done
  python train_stage1.py --base "$base" --init "$base" --out "$out/s1_fp32_$seed" --dtype fp32 --seed $seed >/dev/null
  ev "$out/s1_fp32_$seed/ckpt" "Stage I, fp32, seed $seed"
done
python - "$out" <<'PY'
import json, math, sys, glob, os
out = sys.argv[1]
def stats(pattern):
    rs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, pattern, "ckpt", "tune.json")))]
    row = {}
    for k in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i"):
        v = [100 * r[k] for r in rs]
        m = sum(v) / len(v)
        se = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v)) if len(v) > 1 else float("nan")
        row[k] = f"{m:.1f} +- {se:.1f}"
    return len(rs), row
print("| run | seeds | acc_t1 | acc_t2 | delta | i->c | c->i |\n|---|---|---|---|---|---|---|")
for name, pat in (("Stage I, --kl reward (bf16)", "s1_reward_*"), ("Stage I, --kl loss (bf16)", "s1_loss_*"),
                  ("Stage I, --kl reward, fp32", "s1_fp32_*"), ("SCoRe, --kl reward", "s2_reward_*"),
                  ("SCoRe, --kl loss", "s2_loss_*")):
    n, r = stats(pat)
    print(f"| {name} | {n} | " + " | ".join(r.values()) + " |")
PY
