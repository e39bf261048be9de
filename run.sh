#!/usr/bin/env bash
# The whole SCoRe pipeline in one command.
#
#   bash run.sh                 # the CPU demo: the paper's Table 4 (SCoRe, its ablations, STaR, Pair-SFT) over 3 seeds
#   bash run.sh demo1           # the same with one training seed (an anecdote, for a reader in a hurry)
#   bash run.sh math            # preset math: a converted model in out/math/base, MATH in data/ (see README.md)
#   bash run.sh code            # preset code: MBPP for training, HumanEval for evaluation
#
# Environment: OUT (default out) is where runs go. Demo: QUICK=1 runs a few steps of everything (CI's smoke
# run); DTYPE=fp32 (or bf16) overrides --dtype auto (bf16 on a CPU with bf16 units). Math and code:
# RL_ARGS and EVAL_ARGS add flags to the training scripts and to evaluate.py, EVAL_DATA replaces the
# evaluation file. An interrupted run.sh, run again, picks up where it stopped: a finished
# base or SFT run is kept and each RL run continues from its last checkpoint (--resume: exactly the weights
# of an uninterrupted run; a finished run does no more steps). Runs made with other settings (QUICK, DTYPE) are
# never deleted: run.sh refuses, naming both; FRESH=1 starts over (a converted base stays), or choose another OUT.
# TURNS3=1 adds to the demo the row "SCoRe, trained on 3 attempts" (both stages --turns 3; about 10 more minutes),
# in the same OUT: a finished run picks it up.
# A failed job or Ctrl-C stops every process run.sh started, with one line that says how to continue.
# PYTHON names the interpreter (default: python, else python3, as on GPU images that ship python3 alone).
set -euo pipefail
case "${1:-}" in -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")"
preset=${1:-demo}
OUT=${OUT:-out}/$preset
QUICK=${QUICK:-0}
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}  # the interpreter every command below runs
t_run=$SECONDS
if [ "${FRESH:-0}" = 1 ]; then  # the demo's bases too; a converted base stays
  rm -rf "$OUT/settings" "$OUT"/seed* "$OUT/stage1" "$OUT/stage2" "$OUT/report.json" "$OUT/table.md" "$OUT"/*.png
fi
lanes=""  # the process groups run.sh started (the demo's two lanes of jobs, or one command): each holds its python
stop_all() {  # stop every process run.sh started: each group whole (its python too), then reap them
  set +m; for l in $lanes; do kill -TERM -- "-$l" 2>/dev/null || true; done; lanes=""; wait 2>/dev/null || true
}
own_group() {  # run a command in a process group of its own and wait for it: a signal to run.sh alone stops it too
  set -m; "$@" & local pid=$! rc=0; set +m
  lanes="$lanes $pid"; wait $pid || rc=$?
  lanes=${lanes% $pid}; return $rc  # a finished group's id is never signalled: it may be another's by then
}
began=0  # 1 once training begins: from then on, a stop says how to continue
trap 'rc=$?; trap - EXIT; stop_all; [ $rc = 0 ] || [ $began = 0 ] || echo "run.sh: stopped; finished runs are kept:'\
' run the same command again to continue (FRESH=1 starts over)" >&2; exit $rc' EXIT
trap 'exit 130' INT   # through the EXIT trap: the lanes stop too, and one line says how to continue
trap 'exit 143' TERM
train() {  # train SCRIPT OUT ARGS...: python SCRIPT --out OUT ARGS, with --resume where OUT has a checkpoint
  local script=$1 out=$2 resume=""; shift 2
  if [ -f "$out/ckpt/state.pt" ] || [ -f "$out/ckpt.old/state.pt" ]; then resume=--resume; fi
  "$PY" "$script" --out "$out" $resume "$@"
}
stage() {  # stage N of M: what, the time since run.sh started, and ($4, seconds) an estimate of what is left
  local eta=""
  [ -n "${4:-}" ] && eta=", about $(( ($4 + 30) / 60 )) min left"
  echo "===== run.sh: stage $1 of $2: $3 ($(( (SECONDS - t_run) / 60 )) min $(( (SECONDS - t_run) % 60 )) s so far$eta) =====" >&2
}

if [ "$preset" = demo ] || [ "$preset" = demo1 ]; then
  # The paper's Table 4 on the demo, and its Section 4 baselines. Each training seed trains its own base
  # (so the spread includes the base's draw), then from it, each with the same budget of s1 + s2 RL steps
  # (of 32 problems each) or, for the SFT rows, as many problems:
  #   Stage I only               Stage I for s1 + s2 steps (its step s1 is SCoRe's Stage I)
  #   SCoRe                      Stage I (s1 steps), then Stage II (s2 steps)
  #   w/o multi-turn training    single-turn RL on the first attempt (train_single_turn.py), evaluated with two turns
  #   w/o Stage I                Stage II from the base for s1 + s2 steps
  #   w/o reward shaping         Stage I (s1 steps), then Stage II with alpha = 0 (s2 steps)
  #   STaR, Pair-SFT             supervised fine-tuning on the base's own corrections (train_sft.py)
  #   SCoRe, 3 attempts (TURNS3=1) Stage I (s1 steps) then Stage II (s2 steps), both with --turns 3
  # All are evaluated greedily on 2,000 held-out problems. DTYPE (default auto: bf16 on a CPU with bf16
  # units, else fp32) sets every script's --dtype.
  seeds="0 1 2"; [ "$preset" = demo1 ] && seeds="0"
  dtype=${DTYPE:-auto}
  if [ "$QUICK" = 1 ]; then
    base_args="--max-steps 150 --eval-every 50 --eval-n 50"
    rl_args="--batch 8 --k 2 --micro-batch 8 --n-train 50 --save-every 1 --eval-every 0"
    s1=2; s2=2; eval_n=50; seeds="0"; sft_args="--problems 16 --epochs 1"
  else
    base_args=""
    rl_args=""
    s1=300; s2=300; eval_n=2000  # rl.PRESETS['demo']: Stage I's steps, Stage II's steps
    sft_args="--problems $(( (s1 + s2) * 32 ))"  # as many problems as an RL row sees (32 per step)
  fi
  settings="base: $base_args; runs: $rl_args, s1 $s1, s2 $s2; sft: $sft_args; dtype $dtype"  # what $OUT may continue
  if [ -f "$OUT/settings" ] && [ "$(cat "$OUT/settings")" = "$settings" ]; then
    echo "run.sh: continuing in $OUT: its bases and finished runs are kept (FRESH=1 bash run.sh starts over)" >&2
  elif [ -f "$OUT/settings" ] || compgen -G "$OUT/seed*" > /dev/null; then  # never delete finished work
    old=$(cat "$OUT/settings" 2>/dev/null || echo "unknown (no $OUT/settings)")
    echo "run.sh: $OUT holds runs made with other settings ($old), not these ($settings): nothing was deleted;"\
      "FRESH=1 bash run.sh $preset replaces them, or OUT=another_folder keeps them" >&2
    exit 1
  else
    mkdir -p "$OUT"; echo "$settings" > "$OUT/settings"
  fi
  # The jobs, longest first where they may (each one thread, two at a time: 1.3x the throughput of one
  # run on two threads at the demo's size, and each run stays deterministic): NAME|DEPENDENCY|COST|COMMAND,
  # the cost in steps of Stage I (measured shares), for the ETA.
  # Stage I runs s1 steps, which SCoRe and w/o reward shaping start from, then continues to s1 + s2
  # (--resume: the weights of an uninterrupted run) as Stage I only.
  jobs=()
  for seed in $seeds; do
    jobs+=("base@$seed||200|[ -f $OUT/seed$seed/base.done ] || { rm -rf $OUT/seed$seed/base; $PY train_base.py \
--out $OUT/seed$seed/base --seed $seed --threads 1 --dtype $dtype $base_args && touch $OUT/seed$seed/base.done; }")
  done
  rows3=""; [ "${TURNS3:-0}" = 1 ] && rows3="stage1_t3 score_t3"
  for what in stage1 no_stage1 single_turn stage1_only score no_shaping star pair $rows3; do
    for seed in $seeds; do
      d=$OUT/seed$seed
      common="--preset demo --base $d/base --seed $seed --threads 1 --dtype $dtype $rl_args"
      s1ckpt=$d/stage1/step_$(printf %06d $s1)
      stage1="train train_stage1.py $d/stage1 $common --init $d/base --keep-every $s1 --label 'Stage I (seed $seed)'"
      case $what in
        stage1) jobs+=("stage1@$seed|base@$seed|$s1|$stage1 --steps $s1") ;;
        stage1_only) jobs+=("stage1_only@$seed|stage1@$seed|$s2|$stage1 --steps $(( s1 + s2 ))") ;;
        no_stage1) jobs+=("no_stage1@$seed|base@$seed|$(( s1 + s2 ))|train train_stage2.py $d/no_stage1 $common --init $d/base \
--steps $(( s1 + s2 )) --label 'w/o Stage I (seed $seed)'") ;;
        single_turn) jobs+=("single_turn@$seed|base@$seed|$(( (s1 + s2) * 2 / 3 ))|train train_single_turn.py $d/single_turn $common \
--init $d/base --steps $(( s1 + s2 )) --label 'w/o multi-turn training (seed $seed)'") ;;
        score) jobs+=("score@$seed|stage1@$seed|$s2|train train_stage2.py $d/score $common --init $s1ckpt --steps $s2 \
--label 'SCoRe (seed $seed)'") ;;
        no_shaping) jobs+=("no_shaping@$seed|stage1@$seed|$s2|train train_stage2.py $d/no_shaping $common --init $s1ckpt \
--steps $s2 --alpha 0 --label 'w/o reward shaping (seed $seed)'") ;;
        stage1_t3) jobs+=("stage1_t3@$seed|base@$seed|$(( s1 * 3 / 2 ))|train train_stage1.py $d/stage1_t3 $common \
--init $d/base --turns 3 --steps $s1 --label 'Stage I, 3 attempts (seed $seed)'") ;;
        score_t3) jobs+=("score_t3@$seed|stage1_t3@$seed|$(( s2 * 3 / 2 ))|train train_stage2.py $d/score_t3 $common \
--init $d/stage1_t3/ckpt --turns 3 --steps $s2 --label 'SCoRe, 3 attempts (seed $seed)'") ;;
        star|pair) jobs+=("$what@$seed|base@$seed|$(( (s1 + s2) / 3 ))|[ -f $d/$what/ckpt/model.pt ] || { rm -rf $d/$what; $PY train_sft.py \
--method $what --base $d/base --out $d/$what --seed $seed --threads 1 --dtype $dtype $sft_args; }") ;;
      esac
    done
  done
  Q=$OUT/.jobs; rm -rf "$Q"; mkdir -p "$Q"; n_jobs=${#jobs[@]}
  worker() {  # take the first job not taken whose dependency is done, until none is left
    while true; do
      [ -n "$(ls "$Q" | grep '\.failed$')" ] && return 1
      local pick="" left=0 j name dep cost cmd left_cost=0 worked=0 worked_cost=0 took
      for j in "${jobs[@]}"; do
        IFS='|' read -r name dep cost cmd <<< "$j"
        if [ -e "$Q/$name.done" ]; then  # it holds the seconds the job ran: a finished run, continued, takes a few
          took=$(cat "$Q/$name.done"); [ "${took:-0}" -ge 10 ] && worked=$(( worked + took )) && worked_cost=$(( worked_cost + cost ))
        else left=1; left_cost=$(( left_cost + cost )); fi
        [ -z "$pick" ] || continue
        [ -e "$Q/$name.taken" ] && continue
        [ -z "$dep" ] || [ -e "$Q/$dep.done" ] || continue
        mkdir "$Q/$name.taken" 2>/dev/null && pick=$j
      done
      if [ -z "$pick" ]; then [ $left = 0 ] && return 0; sleep 1; continue; fi
      IFS='|' read -r name dep cost cmd <<< "$pick"
      local started=1 elapsed=$(( SECONDS - t_run )) eta="" t0=$SECONDS
      until mkdir "$Q/start.$started" 2>/dev/null; do started=$(( started + 1 )); done  # atomic: one number per job
      # the seconds per unit of cost of the jobs that ran this time, over the cost left, on two lanes
      [ "$worked_cost" -gt 0 ] && eta=", about $(( (worked * left_cost / worked_cost / 2 + 30) / 60 )) min left"
      echo "===== run.sh: job $started of $n_jobs: $name ($(( elapsed / 60 )) min $(( elapsed % 60 )) s so far$eta) =====" >&2
      if eval "$cmd"; then echo $(( SECONDS - t0 )) > "$Q/$name.done"
      else touch "$Q/$name.failed"; echo "run.sh: $name failed (its lines above say why)" >&2; return 1; fi
    done
  }
  began=1
  set -m  # each lane a process group of its own, which stop_all stops whole (the EXIT trap)
  worker & lanes=$!
  worker & lanes+=" $!"
  set +m
  for _ in $lanes; do wait -n || exit 1; done  # the first failure stops the other lane
  lanes=""
  evals=()
  for seed in $seeds; do
    d=$OUT/seed$seed
    evals+=(--ckpt "$d/base" --name "base@$seed" --ckpt "$d/stage1/ckpt" --name "Stage I only@$seed"
            --ckpt "$d/score/ckpt" --name "SCoRe@$seed" --ckpt "$d/single_turn/ckpt" --name "w/o multi-turn training@$seed"
            --ckpt "$d/no_stage1/ckpt" --name "w/o Stage I@$seed" --ckpt "$d/no_shaping/ckpt" --name "w/o reward shaping@$seed"
            --ckpt "$d/star/ckpt" --name "STaR@$seed" --ckpt "$d/pair/ckpt" --name "Pair-SFT@$seed")
    if [ -n "$rows3" ]; then evals+=(--ckpt "$d/score_t3/ckpt" --name "SCoRe, trained on 3 attempts@$seed"); fi
  done
  echo "===== run.sh: greedy evaluation on $eval_n held-out problems ($(( (SECONDS - t_run) / 60 )) min so far) =====" >&2
  # three attempts (the paper's A.1): attempts 1 and 2 are the table's, the third says whether a gain goes on
  own_group "$PY" evaluate.py --task demo --n $eval_n --turns 3 "${evals[@]}" --seeds SCoRe --out "$OUT/report.json" \
    --markdown "$OUT/table.md"
  # a picture of each run of the first seed (matplotlib is optional: without it plot.py says so in one line)
  set -- $seeds
  for run in stage1 score no_stage1; do "$PY" plot.py "$OUT/seed$1/$run" || true; done
  "$PY" plot.py --table "$OUT/report.json" || true  # Delta per row with its standard error: delta.png
  echo "run.sh: done in $(( (SECONDS - t_run) / 60 )) min $(( (SECONDS - t_run) % 60 )) s" >&2
elif [ "$preset" = math ] || [ "$preset" = code ]; then
  if [ "$preset" = math ]; then eval_task=math; eval_data=${EVAL_DATA:-data/MATH500.jsonl}
  else eval_task=humaneval; eval_data=${EVAL_DATA:-data/HumanEval.jsonl.gz}; fi
  [ -f "$OUT/base/config.json" ] || { echo "run.sh: no model in $OUT/base: convert one first, e.g."\
    "python download.py model Qwen/Qwen2.5-Math-1.5B-Instruct $OUT/base (see README.md)" >&2; exit 1; }
  # e.g. RL_ARGS="--micro-batch 2 --gen-batch 128" bash run.sh math   (a 48 GB card: README)
  began=1
  stage 1 3 "Stage I (train_stage1.py)"
  own_group train train_stage1.py "$OUT/stage1" --preset "$preset" --base "$OUT/base" --init "$OUT/base" ${RL_ARGS:-}
  stage 2 3 "Stage II from Stage I (train_stage2.py)"
  own_group train train_stage2.py "$OUT/stage2" --preset "$preset" --base "$OUT/base" --init "$OUT/stage1/ckpt" ${RL_ARGS:-}
  stage 3 3 "greedy evaluation on $eval_data"
  own_group "$PY" evaluate.py --task $eval_task --data "$eval_data" \
    --ckpt "$OUT/base" --name base --ckpt "$OUT/stage1/ckpt" --name "Stage I" --ckpt "$OUT/stage2/ckpt" --name SCoRe \
    --out "$OUT/report.json" --markdown "$OUT/table.md" ${EVAL_ARGS:-}
else
  echo "run.sh: unknown preset '$preset': choose demo, demo1, math or code (bash run.sh --help)" >&2
  exit 2
fi
