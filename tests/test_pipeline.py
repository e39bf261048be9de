"""CI's smoke run of the whole demo pipeline (a few steps of every stage), so the scripts cannot rot."""
import json
import os
import subprocess


def test_run_sh_quick(tmp_path):
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(["bash", "run.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [r["name"] for r in reports] == ["base", "Stage I", "SCoRe (Stage II)", "ablation: no Stage I, alpha 0"]
    for r in reports:
        for key in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed"):
            assert 0.0 <= abs(r[key]) <= 1.0
        # transitions and accuracies come from the same per-problem rewards: they must agree
        assert abs((r["acc_t2"] - r["acc_t1"]) - (r["delta_i2c"] - r["delta_c2i"])) < 1e-9
    table = (tmp_path / "demo" / "table.md").read_text()
    for r in reports:  # the markdown table shows the report's numbers, in percent (the quick run's figures are
        # mostly 0, so here this checks the rows and columns more than the scaling)
        row = next(line for line in table.splitlines() if line.startswith(f"| {r['name']} |"))
        cells = [float(c) for c in row.strip("|").split("|")[1:7]]
        assert all(abs(c - 100 * r[k]) < 0.051 for c, k in
                   zip(cells, ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed"))), (row, r)
    # each stage wrote a whole checkpoint: fp32 masters, and the task and p1 that evaluate.py defaults to
    import torch
    import data
    for ckpt in ("stage1/ckpt", "stage2/ckpt", "ablation/ckpt", "stage2/best"):
        state = torch.load(tmp_path / "demo" / ckpt / "model.pt", weights_only=True)
        assert {t.dtype for t in state.values()} == {torch.float32}, ckpt
        assert data.task_info(tmp_path / "demo" / ckpt) == {"task": "demo", "p1": data.DEMO_P1, "max_new_tokens": 16}
    stages = [line for line in res.stderr.splitlines() if line.startswith("===== run.sh: stage")]
    assert [line.split()[3] for line in stages] == ["1", "2", "3", "4", "5"], stages
    assert "ablation: done" in res.stdout and "Stage II: done" in res.stdout
    for stage in ("stage1", "stage2", "ablation"):
        log = (tmp_path / "demo" / stage / "log.jsonl").read_text().splitlines()
        assert len(log) == (4 if stage == "ablation" else 2)
        for rec in map(json.loads, log):  # the sampled rollouts' i->c and c->i account for the change in accuracy
            assert abs((rec["acc_t2"] - rec["acc_t1"]) - (rec["delta_i2c"] - rec["delta_c2i"])) < 1e-9
