#!/usr/bin/env bash
# The whole SCoRe pipeline in one command.
#
#   bash run.sh                 # the CPU demo: base model, Stage I, Stage II, the ablation, the paper's table
#   bash run.sh math            # preset math: a converted model in out/math/base, MATH in data/ (see README.md)
#   bash run.sh code            # preset code: MBPP for training, HumanEval for evaluation
#
# Environment: OUT (default out) is where runs go; QUICK=1 runs a few steps of everything (CI's smoke run).
set -euo pipefail
cd "$(dirname "$0")"
preset=${1:-demo}
OUT=${OUT:-out}/$preset
QUICK=${QUICK:-0}
t_run=$SECONDS
stage() {  # stage N of M: what, the time since run.sh started, and ($4, seconds) an estimate of what is left
  local eta=""
  [ -n "${4:-}" ] && eta=", about $(( ($4 + 30) / 60 )) min left"
  echo "===== run.sh: stage $1 of $2: $3 ($(( (SECONDS - t_run) / 60 )) min $(( (SECONDS - t_run) % 60 )) s so far$eta) =====" >&2
}

if [ "$preset" = demo ]; then
  if [ "$QUICK" = 1 ]; then
    base_args="--max-steps 3 --eval-every 3 --eval-n 8"
    rl_args="--batch 8 --k 2 --micro-batch 8 --n-train 50 --save-every 1"
    s1=2; s2=2; eval_n=8
  else
    base_args=""
    rl_args=""
    s1=120; s2=80; eval_n=2000
  fi
  stage 1 5 "the base model (train_base.py)"
  python train_base.py --out "$OUT/base" $base_args
  stage 2 5 "Stage I from the base"
  t_s1=$SECONDS
  python train_stage1.py --preset demo --base "$OUT/base" --init "$OUT/base" --out "$OUT/stage1" --steps $s1 $rl_args
  # the demo preset's Stage II (rl.PRESETS) draws half of its first attempts from the base model
  # (paper 5.3): turn 2 keeps practising on the base's mistakes while turn 1 improves
  # what is left, from Stage I's pace: the RL steps still to run, and the evaluation (about a tenth of Stage I)
  t1=$(( SECONDS - t_s1 )); left=$(( t1 * (s2 + s1 + s2) / s1 + t1 / 10 ))
  stage 3 5 "Stage II from Stage I (SCoRe)" $left
  python train_stage2.py --preset demo --base "$OUT/base" --init "$OUT/stage1/ckpt" --out "$OUT/stage2" \
    --steps $s2 $rl_args
  # ablation on the same RL budget: Stage II's recipe without Stage I (it starts from the base) and
  # without the bonus (alpha = 0)
  stage 4 5 "the ablation: Stage II from the base, alpha 0" $(( t1 * (s1 + s2) / s1 + t1 / 10 ))
  python train_stage2.py --preset demo --base "$OUT/base" --init "$OUT/base" --out "$OUT/ablation" \
    --steps $((s1 + s2)) --alpha 0 --label "ablation" $rl_args
  stage 5 5 "greedy evaluation on held-out problems"
  python evaluate.py --task demo --n $eval_n \
    --ckpt "$OUT/base" --name base --ckpt "$OUT/stage1/ckpt" --name "Stage I" \
    --ckpt "$OUT/stage2/ckpt" --name "SCoRe (Stage II)" --ckpt "$OUT/ablation/ckpt" --name "ablation: no Stage I, alpha 0" \
    --out "$OUT/report.json" --markdown "$OUT/table.md"
  # a picture of each run (matplotlib is optional: without it plot.py says so in one line)
  for run in stage1 stage2 ablation; do python plot.py "$OUT/$run" || true; done
  echo "run.sh: done in $(( (SECONDS - t_run) / 60 )) min $(( (SECONDS - t_run) % 60 )) s" >&2
elif [ "$preset" = math ] || [ "$preset" = code ]; then
  if [ "$preset" = math ]; then eval_task=math; eval_data=${EVAL_DATA:-data/MATH500.jsonl}
  else eval_task=humaneval; eval_data=${EVAL_DATA:-data/HumanEval.jsonl.gz}; fi
  [ -f "$OUT/base/config.json" ] || { echo "run.sh: no model in $OUT/base: convert one first, e.g."\
    "python convert.py --download Qwen/Qwen2.5-Math-1.5B-Instruct $OUT/base (see README.md)" >&2; exit 1; }
  python train_stage1.py --preset "$preset" --base "$OUT/base" --out "$OUT/stage1"
  python train_stage2.py --preset "$preset" --base "$OUT/base" --init "$OUT/stage1/ckpt" --out "$OUT/stage2"
  python evaluate.py --task $eval_task --data "$eval_data" \
    --ckpt "$OUT/base" --name base --ckpt "$OUT/stage1/ckpt" --name "Stage I" --ckpt "$OUT/stage2/ckpt" --name SCoRe \
    --out "$OUT/report.json" --markdown "$OUT/table.md"
else
  echo "run.sh: unknown preset '$preset': choose demo, math or code" >&2
  exit 2
fi
