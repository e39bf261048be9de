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
        assert abs(r["delta"] - (r["acc_t2"] - r["acc_t1"])) < 1e-9
        assert abs(r["delta"] - (r["delta_i2c"] - r["delta_c2i"])) < 1e-9
    table = (tmp_path / "demo" / "table.md").read_text()
    assert "| SCoRe (Stage II) |" in table
    for stage in ("stage1", "stage2", "ablation"):
        log = (tmp_path / "demo" / stage / "log.jsonl").read_text().splitlines()
        assert len(log) == (4 if stage == "ablation" else 2)
        for rec in map(json.loads, log):  # the sampled rollouts' i->c and c->i account for the change in accuracy
            assert abs((rec["acc_t2"] - rec["acc_t1"]) - (rec["delta_i2c"] - rec["delta_c2i"])) < 1e-9
