#!/usr/bin/env bash
# The whole SCoRe pipeline in one command.
#
#   bash run.sh                 # the CPU demo: the paper's Table 4 (SCoRe and its ablations) over 3 training seeds
#   bash run.sh demo1           # the same with one training seed (an anecdote, for a reader in a hurry)
#   bash run.sh math            # preset math: a converted model in out/math/base, MATH in data/ (see README.md)
#   bash run.sh code            # preset code: MBPP for training, HumanEval for evaluation
#
# Environment: OUT (default out) is where runs go. Demo: QUICK=1 runs a few steps of everything (CI's smoke
# run). Math and code: RL_ARGS and EVAL_ARGS add flags to the training scripts and to evaluate.py, EVAL_DATA
# replaces the evaluation file. An interrupted run.sh, run again, picks up where it stopped: a finished
# base is kept and each RL run continues from its last checkpoint (--resume: exactly the weights of an
# uninterrupted run; a finished run does no more steps). FRESH=1 starts over (the converted base stays).
set -euo pipefail
case "${1:-}" in -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")"
preset=${1:-demo}
OUT=${OUT:-out}/$preset
QUICK=${QUICK:-0}
t_run=$SECONDS
if [ "${FRESH:-0}" = 1 ]; then rm -rf "$OUT/base.done" "$OUT/stage1" "$OUT/stage2"; fi  # the demo's runs go with its base
train() {  # train SCRIPT OUT ARGS...: python SCRIPT --out OUT ARGS, with --resume where OUT has a checkpoint
  local script=$1 out=$2 resume=""; shift 2
  if [ -f "$out/ckpt/state.pt" ] || [ -f "$out/ckpt.old/state.pt" ]; then resume=--resume; fi
  python "$script" --out "$out" $resume "$@"
}
stage() {  # stage N of M: what, the time since run.sh started, and ($4, seconds) an estimate of what is left
  local eta=""
  [ -n "${4:-}" ] && eta=", about $(( ($4 + 30) / 60 )) min left"
  echo "===== run.sh: stage $1 of $2: $3 ($(( (SECONDS - t_run) / 60 )) min $(( (SECONDS - t_run) % 60 )) s so far$eta) =====" >&2
}

if [ "$preset" = demo ] || [ "$preset" = demo1 ]; then
  # The paper's Table 4 on the demo. Every RL row starts from the same base and runs the same budget of
  # RL steps (s1 + s2), once per training seed; all are evaluated greedily on 2,000 held-out problems.
  #   Stage I only               Stage I for s1 + s2 steps (its step s1 is SCoRe's Stage I)
  #   SCoRe                      Stage I (s1 steps), then Stage II (s2 steps)
  #   w/o multi-turn training    single-turn RL on the first attempt (train_single_turn.py), evaluated with two turns
  #   w/o Stage I                Stage II from the base for s1 + s2 steps
  #   w/o reward shaping         Stage I (s1 steps), then Stage II with alpha = 0 (s2 steps)
  seeds="0 1 2"; [ "$preset" = demo1 ] && seeds="0"
  if [ "$QUICK" = 1 ]; then
    base_args="--max-steps 3 --eval-every 3 --eval-n 8"
    rl_args="--batch 8 --k 2 --micro-batch 8 --n-train 50 --save-every 1"
    s1=2; s2=2; eval_n=8; seeds="0"
  else
    base_args=""
    rl_args=""
    s1=100; s2=60; eval_n=2000  # rl.PRESETS['demo']: Stage I's steps, Stage II's steps
  fi
  trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failed run stops the one beside it too
  set -- $seeds; n_seeds=$#; M=$(( 2 + n_seeds ))
  stage 1 $M "the base model (train_base.py)"
  settings="base: $base_args; runs: $rl_args, s1 $s1, s2 $s2"  # what a run in $OUT may continue with
  if [ -f "$OUT/base.done" ] && [ "$(cat "$OUT/base.done")" = "$settings" ]; then
    echo "run.sh: continuing in $OUT: its base and finished runs are kept (FRESH=1 bash run.sh starts over)" >&2
  else  # a new base (or other settings): runs trained from an earlier one would not match it
    rm -rf "$OUT/base" "$OUT/base.done" "$OUT"/seed*
    python train_base.py --out "$OUT/base" $base_args
    echo "$settings" > "$OUT/base.done"
  fi
  evals=(--ckpt "$OUT/base" --name base)
  i=0; t_rl=$SECONDS
  for seed in $seeds; do
    d=$OUT/seed$seed; i=$(( i + 1 )); left=""
    [ $i -gt 1 ] && left=$(( (SECONDS - t_rl) * (n_seeds - i + 1) / (i - 1) + 60 ))
    stage $(( i + 1 )) $M "training seed $seed: Stage I, SCoRe and the three ablations, two runs at a time" $left
    # two runs at a time on one thread each: 1.3x the throughput of one run on two threads at the demo's
    # size (small operations do not split well over threads); each run stays deterministic
    common=(--preset demo --base "$OUT/base" --seed $seed --threads 1 $rl_args)
    s1ckpt=$d/stage1/step_$(printf %06d $s1)
    (
      train train_stage1.py "$d/stage1" "${common[@]}" --init "$OUT/base" --steps $(( s1 + s2 )) --keep-every $s1 \
        --label "Stage I (seed $seed)"
      # the demo preset's Stage II (rl.PRESETS) draws half of its first attempts from the base (paper 5.3)
      train train_stage2.py "$d/score" "${common[@]}" --init "$s1ckpt" --steps $s2 --label "SCoRe (seed $seed)"
      train train_stage2.py "$d/no_shaping" "${common[@]}" --init "$s1ckpt" --steps $s2 --alpha 0 \
        --label "w/o reward shaping (seed $seed)"
    ) & lane=$!
    train train_stage2.py "$d/no_stage1" "${common[@]}" --init "$OUT/base" --steps $(( s1 + s2 )) \
      --label "w/o Stage I (seed $seed)"
    train train_single_turn.py "$d/single_turn" "${common[@]}" --init "$OUT/base" --steps $(( s1 + s2 )) \
      --label "w/o multi-turn training (seed $seed)"
    wait $lane || { echo "run.sh: a run of seed $seed failed (its lines above say which)" >&2; exit 1; }
    evals+=(--ckpt "$d/stage1/ckpt" --name "Stage I only@$seed" --ckpt "$d/score/ckpt" --name "SCoRe@$seed"
            --ckpt "$d/single_turn/ckpt" --name "w/o multi-turn training@$seed"
            --ckpt "$d/no_stage1/ckpt" --name "w/o Stage I@$seed" --ckpt "$d/no_shaping/ckpt" --name "w/o reward shaping@$seed")
  done
  stage $M $M "greedy evaluation on $eval_n held-out problems"
  python evaluate.py --task demo --n $eval_n "${evals[@]}" --seeds SCoRe --out "$OUT/report.json" --markdown "$OUT/table.md"
  # a picture of each run of the first seed (matplotlib is optional: without it plot.py says so in one line)
  set -- $seeds
  for run in stage1 score no_stage1; do python plot.py "$OUT/seed$1/$run" || true; done
  python plot.py --table "$OUT/report.json" || true  # Delta per row with its standard error: delta.png
  echo "run.sh: done in $(( (SECONDS - t_run) / 60 )) min $(( (SECONDS - t_run) % 60 )) s" >&2
elif [ "$preset" = math ] || [ "$preset" = code ]; then
  if [ "$preset" = math ]; then eval_task=math; eval_data=${EVAL_DATA:-data/MATH500.jsonl}
  else eval_task=humaneval; eval_data=${EVAL_DATA:-data/HumanEval.jsonl.gz}; fi
  [ -f "$OUT/base/config.json" ] || { echo "run.sh: no model in $OUT/base: convert one first, e.g."\
    "python download.py model Qwen/Qwen2.5-Math-1.5B-Instruct $OUT/base (see README.md)" >&2; exit 1; }
  # e.g. RL_ARGS="--micro-batch 2 --gen-batch 128" bash run.sh math   (a 48 GB card: README)
  stage 1 3 "Stage I (train_stage1.py)"
  train train_stage1.py "$OUT/stage1" --preset "$preset" --base "$OUT/base" --init "$OUT/base" ${RL_ARGS:-}
  stage 2 3 "Stage II from Stage I (train_stage2.py)"
  train train_stage2.py "$OUT/stage2" --preset "$preset" --base "$OUT/base" --init "$OUT/stage1/ckpt" ${RL_ARGS:-}
  stage 3 3 "greedy evaluation on $eval_data"
  python evaluate.py --task $eval_task --data "$eval_data" \
    --ckpt "$OUT/base" --name base --ckpt "$OUT/stage1/ckpt" --name "Stage I" --ckpt "$OUT/stage2/ckpt" --name SCoRe \
    --out "$OUT/report.json" --markdown "$OUT/table.md" ${EVAL_ARGS:-}
else
  echo "run.sh: unknown preset '$preset': choose demo, demo1, math or code (bash run.sh --help)" >&2
  exit 2
fi
