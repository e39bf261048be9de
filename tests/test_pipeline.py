"""CI's smoke run of the whole demo pipeline (a few steps of every row of the table, one seed), so the
scripts cannot rot."""
import json
import os
import subprocess

import pytest
import torch

import data

ROWS = ["base", "Stage I only", "SCoRe", "w/o multi-turn training", "w/o Stage I", "w/o reward shaping"]
RUNS = {"stage1": 4, "score": 2, "no_shaping": 2, "no_stage1": 4, "single_turn": 4}  # steps: s1 + s2 or s2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_sh_quick(tmp_path, recount):
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path)}
    res = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "demo"
    result = json.loads((out / "report.json").read_text())
    assert [r["row"] for r in result["rows"]] == ROWS
    assert [r["seeds"] for r in result["rows"]] == [[]] + [["0"]] * 5
    assert [c["name"] for c in result["checkpoints"]] == ["base"] + [f"{r}@0" for r in ROWS[1:]]
    # each checkpoint's numbers against its greedy attempts on the same 8 held-out problems, counted here
    problems = data.load_task("demo", n=8, seed=data.DEMO_EVAL_SEED, split="eval")
    for r in result["checkpoints"]:
        want = recount(r["ckpt"], problems, r["p1"], r["max_new_tokens"])
        assert {key: r[key] for key in want} == pytest.approx(want, abs=1e-12), r["name"]
        assert 0.0 <= r["changed"] <= 1.0
    # one seed has no standard error, so no paired difference can be told from noise: neither met nor missed
    assert len(result["targets"]) == 10 and [t["met"] for t in result["targets"][1:-1:2]] == [None] * 4
    table = (out / "table.md").read_text()
    assert table.startswith("| row | seeds |") and "| target | measured |" in table and "Each checkpoint:" in table
    assert table.count("| not measured |") == 4
    # each run wrote a whole checkpoint: fp32 masters, and the task and p1 that evaluate.py defaults to
    for ckpt in [f"seed0/{run}/ckpt" for run in RUNS] + ["seed0/stage1/step_000002", "seed0/score/best"]:
        state = torch.load(out / ckpt / "model.pt", weights_only=True)
        assert {t.dtype for t in state.values()} == {torch.float32}, ckpt
        assert data.task_info(out / ckpt) == {"task": "demo", "p1": data.DEMO_P1, "max_new_tokens": 16}
    # SCoRe and the run without reward shaping start from Stage I's step s1, which Stage I only runs past
    inits = {run: torch.load(out / "seed0" / run / "ckpt" / "state.pt", weights_only=False)["args"]["init"]
             for run in RUNS}
    assert inits == {"stage1": f"{out}/base", "score": f"{out}/seed0/stage1/step_000002",
                     "no_shaping": f"{out}/seed0/stage1/step_000002", "no_stage1": f"{out}/base",
                     "single_turn": f"{out}/base"}
    assert torch.load(out / "seed0" / "no_shaping" / "ckpt" / "state.pt", weights_only=False)["args"]["alpha"] == 0
    stages = [line for line in res.stderr.splitlines() if line.startswith("===== run.sh: stage")]
    assert [line.split()[3:6] for line in stages] == [["1", "of", "3:"], ["2", "of", "3:"], ["3", "of", "3:"]], stages
    for label in ("Stage I (seed 0)", "SCoRe (seed 0)", "w/o reward shaping (seed 0)", "w/o Stage I (seed 0)",
                  "w/o multi-turn training (seed 0)"):
        assert f"{label}: done" in res.stdout, label
    for run, steps in RUNS.items():  # (tests/test_rl.py checks each record against the step's rollouts)
        assert len((out / "seed0" / run / "log.jsonl").read_text().splitlines()) == steps, run
    # run again, as after an interruption before the last run started: the base and the finished runs are
    # kept (no step is redone), the missing run is trained, and the table is the same to the last digit
    first = json.loads((out / "report.json").read_text())
    kept = {p: (out / p).stat().st_mtime_ns
            for p in ["base/model.pt"] + [f"seed0/{r}/ckpt/model.pt" for r in RUNS if r != "no_shaping"]}
    subprocess.run(["rm", "-r", str(out / "seed0" / "no_shaping")], check=True)
    again = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"run.sh: continuing in {out}" in again.stderr and "greedy acc" not in again.stdout
    steps = [ln.split(" |")[0] for ln in again.stdout.splitlines() if ": step " in ln]
    assert steps == ["w/o reward shaping (seed 0): step 1/2", "w/o reward shaping (seed 0): step 2/2"], steps
    assert kept == {p: (out / p).stat().st_mtime_ns for p in kept}
    assert json.loads((out / "report.json").read_text()) == first
    # a base made with other settings (here: written by hand) is not continued from: FRESH=1 and a changed
    # setting start over
    (out / "base.done").write_text("base: --max-steps 1; runs: other\n")
    moved = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert moved.returncode == 0 and "continuing in" not in moved.stderr
    assert "Stage I (seed 0): step 1/4" in moved.stdout and json.loads((out / "report.json").read_text()) == first


def test_run_sh_help_and_a_bad_preset():
    helped = subprocess.run(["bash", "run.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("The whole SCoRe pipeline in one command.")
    assert "bash run.sh demo1" in helped.stdout and "FRESH=1" in helped.stdout and "set -euo" not in helped.stdout
    bad = subprocess.run(["bash", "run.sh", "mtah"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == ("run.sh: unknown preset 'mtah': choose demo, demo1, math "
                                                          "or code (bash run.sh --help)")
