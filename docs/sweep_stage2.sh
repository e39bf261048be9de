#!/usr/bin/env bash
# Stage II's settings on the demo (docs/RESULTS.md): from one Stage I checkpoint, 240 steps of Stage II at
# lr 1e-4 and 3e-4, alpha 10 and 50, each kept step evaluated greedily on 2,000 tuning problems
# (data.demo_split's "tune"), never on "eval". Two runs at a time, one thread each.
#   bash docs/sweep_stage2.sh BASE_DIR STAGE1_CKPT OUT_DIR     e.g. out/demo/base out/demo/seed0/stage1/step_000100 out/sweep
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1; init=$2; out=$3; mkdir -p "$out"
run() { python train_stage2.py --base "$base" --init "$init" --out "$out/$1" --steps 240 --keep-every 60 --threads 1 \
          --label "$1" "${@:2}" > "$out/$1.log" 2>&1; }
(run lr1e4_a10 --lr 1e-4 --alpha 10; run lr1e4_a50 --lr 1e-4 --alpha 50) &
(run lr3e4_a10 --lr 3e-4 --alpha 10; run lr3e4_a50 --lr 3e-4 --alpha 50) &
wait
args=(--ckpt "$init" --name "Stage I (the start)")
for r in lr1e4_a10 lr1e4_a50 lr3e4_a10 lr3e4_a50; do
  for s in 060 120 180 240; do args+=(--ckpt "$out/$r/step_000$s" --name "$r@$s"); done
done
python evaluate.py --task demo --split tune --n 2000 "${args[@]}" --out "$out/tune.json" --markdown "$out/tune.md"
