#!/usr/bin/env bash
# SCoRe trained for three attempts on the demo (docs/RESULTS.md): from `bash run.sh`'s bases and Stage I (its OUT,
# default out/demo), (a) Stage II with --turns 3 from the two-attempt Stage I at step s1 = 300, (b) both stages with
# --turns 3, 300 steps each; then the tuning problems (never "eval") on three attempts beside SCoRe, over the 3 seeds.
#   bash docs/sweep_turns3.sh [RUN_SH_OUT [OUT_DIR]]
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-out/demo}; R=${2:-out/turns3}; mkdir -p "$R"
lane() {  # the seeds given, one after the other (run.sh's settings: --threads 1, two lanes)
  for seed in "$@"; do
    c="--preset demo --base $D/seed$seed/base --seed $seed --threads 1 --dtype auto --turns 3"
    [ -f $R/seed$seed/s2t3/ckpt/model.pt ] || python train_stage2.py $c --init $D/seed$seed/stage1/step_000300 \
      --out $R/seed$seed/s2t3 --steps 300 --label "Stage II T=3 ($seed)" > $R/seed$seed.s2t3.log
    [ -f $R/seed$seed/stage1_t3/ckpt/model.pt ] || python train_stage1.py $c --init $D/seed$seed/base \
      --out $R/seed$seed/stage1_t3 --steps 300 --label "Stage I T=3 ($seed)" > $R/seed$seed.s1t3.log
    [ -f $R/seed$seed/t3/ckpt/model.pt ] || python train_stage2.py $c --init $R/seed$seed/stage1_t3/ckpt \
      --out $R/seed$seed/t3 --steps 300 --label "both T=3 ($seed)" > $R/seed$seed.t3.log
  done
}
lane 0 2 & lane 1 & wait
ev=()
for s in 0 1 2; do
  ev+=(--ckpt $D/seed$s/base --name "base@$s" --ckpt $D/seed$s/stage1/step_000300 --name "Stage I (T=2) step 300@$s"
       --ckpt $D/seed$s/score/ckpt --name "SCoRe@$s" --ckpt $R/seed$s/s2t3/ckpt --name "SCoRe, Stage II T=3@$s"
       --ckpt $R/seed$s/stage1_t3/ckpt --name "Stage I T=3@$s" --ckpt $R/seed$s/t3/ckpt --name "SCoRe, both stages T=3@$s")
done
python evaluate.py --task demo --split tune --n 2000 --turns 3 --seeds SCoRe "${ev[@]}" --out $R/tune3.json --markdown $R/tune3.md
