"""CI's smoke run of the whole demo pipeline (a few steps of every row of the table, one seed), so the
scripts cannot rot."""
import json
import os
import subprocess

import pytest
import torch

import data

ROWS = ["base", "Stage I only", "SCoRe", "w/o multi-turn training", "w/o Stage I", "w/o reward shaping", "STaR",
        "Pair-SFT"]
RUNS = {"stage1": 4, "score": 2, "no_shaping": 2, "no_stage1": 4, "single_turn": 4}  # steps: s1 + s2 or s2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_sh_quick(tmp_path, recount):
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path)}
    res = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "demo"
    result = json.loads((out / "report.json").read_text())
    assert [r["row"] for r in result["rows"]] == ROWS
    assert [r["seeds"] for r in result["rows"]] == [["0"]] * 8  # each seed trains its own base
    assert [c["name"] for c in result["checkpoints"]] == [f"{r}@0" for r in ROWS]
    # each checkpoint's numbers against its greedy attempts on the same 50 held-out problems, counted here
    problems = data.load_task("demo", n=50, seed=data.DEMO_EVAL_SEED, split="eval")
    for r in result["checkpoints"]:
        want = recount(r["ckpt"], problems, r["p1"], r["max_new_tokens"])
        assert {key: r[key] for key in want} == pytest.approx(want, abs=1e-12), r["name"]
        assert 0.0 <= r["changed"] <= 1.0
    # the table's rows are the checkpoints' numbers (one seed: the mean is the number), and they are not all 0
    by_row = {r["row"]: r for r in result["rows"]}
    for c in result["checkpoints"]:
        row = by_row[c["name"].rpartition("@")[0]]
        assert {m: row[m]["mean"] for m in ("acc_t1", "acc_t2", "delta", "changed")} == \
            {m: c[m] for m in ("acc_t1", "acc_t2", "delta", "changed")}
        if row["row"] != "SCoRe":
            assert row["paired"]["acc_t2"]["mean"] == pytest.approx(by_row["SCoRe"]["acc_t2"]["mean"] - c["acc_t2"])
    assert all(c["acc_t1"] > 0 for c in result["checkpoints"])  # after 150 steps the base answers some
    # one seed has no standard error, so no paired difference can be told from noise: neither met nor missed
    met = {t["target"]: t["met"] for t in result["targets"]}
    unmeasured = [t for t, ok in met.items() if ok is None]
    assert len(unmeasured) == 6 and all("standard error" in t for t in unmeasured), unmeasured
    table = (out / "table.md").read_text()
    assert table.startswith("| row | seeds |") and "| target | measured |" in table and "Each checkpoint:" in table
    assert table.count("| not measured |") == 6
    # each run wrote a whole checkpoint: fp32 masters, and the task and p1 that evaluate.py defaults to
    for ckpt in [f"seed0/{run}/ckpt" for run in (*RUNS, "star", "pair")] + ["seed0/stage1/step_000002",
                                                                          "seed0/score/best"]:
        state = torch.load(out / ckpt / "model.pt", weights_only=True)
        assert {t.dtype for t in state.values()} == {torch.float32}, ckpt
        assert data.task_info(out / ckpt) == {"task": "demo", "p1": data.DEMO_P1, "max_new_tokens": 16}
    # SCoRe and the run without reward shaping start from Stage I's step s1, which Stage I only runs past
    inits = {run: torch.load(out / "seed0" / run / "ckpt" / "state.pt", weights_only=False)["args"]["init"]
             for run in RUNS}
    base = f"{out}/seed0/base"
    assert inits == {"stage1": base, "score": f"{out}/seed0/stage1/step_000002",
                     "no_shaping": f"{out}/seed0/stage1/step_000002", "no_stage1": base, "single_turn": base}
    assert torch.load(out / "seed0" / "no_shaping" / "ckpt" / "state.pt", weights_only=False)["args"]["alpha"] == 0
    jobs = [line.split()[3:7] for line in res.stderr.splitlines() if line.startswith("===== run.sh: job")]
    assert sorted(j[3] for j in jobs) == sorted(f"{r}@0" for r in ("base", *RUNS, "stage1_only", "star", "pair")), jobs
    assert [j[:3] for j in jobs] == [[str(i), "of", "9:"] for i in range(1, 10)] and jobs[0][3] == "base@0"
    # Stage I's steps 1 to s1, then (Stage I only) the same run continued; SCoRe starts after the first
    order = [j[3] for j in jobs]
    assert order.index("stage1@0") < min(order.index("score@0"), order.index("stage1_only@0"))
    for label in ("Stage I (seed 0)", "SCoRe (seed 0)", "w/o reward shaping (seed 0)", "w/o Stage I (seed 0)",
                  "w/o multi-turn training (seed 0)"):
        assert f"{label}: done" in res.stdout, label
    for run, steps in RUNS.items():  # (tests/test_rl.py checks each record against the step's rollouts)
        assert len((out / "seed0" / run / "log.jsonl").read_text().splitlines()) == steps, run
    # run again, as after an interruption before the last run started: the base and the finished runs are
    # kept (no step is redone), the missing run is trained, and the table is the same to the last digit
    first = json.loads((out / "report.json").read_text())
    kept = {p: (out / p).stat().st_mtime_ns
            for p in ["seed0/base/model.pt", "seed0/star/ckpt/model.pt"]
            + [f"seed0/{r}/ckpt/model.pt" for r in RUNS if r != "no_shaping"]}
    subprocess.run(["rm", "-r", str(out / "seed0" / "no_shaping")], check=True)
    again = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"run.sh: continuing in {out}" in again.stderr and "greedy acc" not in again.stdout
    steps = [ln.split(" |")[0] for ln in again.stdout.splitlines() if ": step " in ln]
    assert steps == ["w/o reward shaping (seed 0): step 1/2", "w/o reward shaping (seed 0): step 2/2"], steps
    assert kept == {p: (out / p).stat().st_mtime_ns for p in kept}
    assert json.loads((out / "report.json").read_text()) == first
    # runs made with other settings are refused, never deleted: tests/test_run_sh.py


def test_run_sh_help_and_a_bad_preset():
    helped = subprocess.run(["bash", "run.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("The whole SCoRe pipeline in one command.")
    assert "bash run.sh demo1" in helped.stdout and "FRESH=1" in helped.stdout and "set -euo" not in helped.stdout
    bad = subprocess.run(["bash", "run.sh", "mtah"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == ("run.sh: unknown preset 'mtah': choose demo, demo1, math "
                                                          "or code (bash run.sh --help)")
