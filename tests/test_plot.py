"""plot.py: the pictures hold the log's numbers, are valid PNGs of the stated size, and every bad input
(no matplotlib, a broken log, a bad table) is one line, not a traceback. Expected values are written
out by hand from the log below."""
import json
import math
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = "plot.py: matplotlib is not installed (pip install matplotlib); no picture written"

# five steps; grad_norm is missing at step 1 (a log from before it was logged), len_y* are present,
# the timing fields are absent: 6 panels (accuracy, changes, KL, loss, grad norm, length)
LOG = [
    dict(step=1, acc_t1=0.10, acc_t2=0.20, delta_i2c=0.10, delta_c2i=0.00, kl_t1=0.0, kl_t2=0.0, loss=0.5,
         len_y1=10, len_y2=20, tokens=100, seconds=1.0),
    dict(step=2, acc_t1=0.20, acc_t2=0.20, delta_i2c=0.05, delta_c2i=0.05, kl_t1=0.1, kl_t2=0.2, loss=0.4,
         grad_norm=1.0, len_y1=12, len_y2=22, tokens=100, seconds=1.0),
    dict(step=3, acc_t1=0.40, acc_t2=0.50, delta_i2c=0.20, delta_c2i=0.10, kl_t1=0.2, kl_t2=0.4, loss=0.3,
         grad_norm=2.0, len_y1=14, len_y2=24, tokens=100, seconds=1.0),
    dict(step=4, acc_t1=0.40, acc_t2=0.60, delta_i2c=0.25, delta_c2i=0.05, kl_t1=0.3, kl_t2=0.6, loss=0.2,
         grad_norm=3.0, len_y1=16, len_y2=26, tokens=100, seconds=1.0),
    dict(step=5, acc_t1=0.70, acc_t2=0.90, delta_i2c=0.20, delta_c2i=0.00, kl_t1=0.4, kl_t2=0.8, loss=0.1,
         grad_norm=4.0, len_y1=18, len_y2=28, tokens=100, seconds=1.0),
]


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the signature, the IHDR CRC and the IEND end."""
    with open(path, "rb") as f:
        b = f.read()
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", b[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", b[29:33])[0] == zlib.crc32(b[12:29])
    assert b[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return struct.unpack(">II", b[16:24])


def write_run(tmp_path, log=LOG):
    run = tmp_path / "stage2"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return run


def test_curves_draw_the_log_and_the_greedy_evaluation(tmp_path, monkeypatch):
    run = write_run(tmp_path)
    # run.sh's report beside the runs: only the entry whose ckpt lies in the run is drawn on it
    (tmp_path / "report.json").write_text(json.dumps([
        dict(name="base", ckpt=str(tmp_path / "base"), acc_t1=0.3, acc_t2=0.25, delta_i2c=0.01, delta_c2i=0.06),
        dict(name="SCoRe", ckpt=str(run / "ckpt"), acc_t1=0.55, acc_t2=0.61, delta_i2c=0.08, delta_c2i=0.02)]))
    out = tmp_path / "c.png"
    reports = plot.find_reports([str(run)], [])[str(run)]
    drawn = plot.curves({"stage2": plot.read_log(str(run / "log.jsonl"))}, str(out), {"stage2": reports}, window=3)
    drawn = drawn["stage2"]
    assert png_size(out) == (1500, 800)  # 3 panels a row at 500 x 400 pixels, 6 panels
    np.testing.assert_allclose(drawn["step"], [1, 2, 3, 4, 5])
    np.testing.assert_allclose(drawn["acc_t1"], [10, 20, 40, 40, 70])  # percent
    np.testing.assert_allclose(drawn["acc_t2"], [20, 20, 50, 60, 90])
    np.testing.assert_allclose(drawn["delta_c2i"], [0, 5, 10, 5, 0], atol=1e-12)
    np.testing.assert_allclose(drawn["kl_t2"], [0.0, 0.2, 0.4, 0.6, 0.8])  # not in percent
    # centred mean over 3 steps, 2 at the ends: (10+20)/2, (10+20+40)/3, (20+40+40)/3, (40+40+70)/3, (40+70)/2
    np.testing.assert_allclose(drawn["acc_t1 smooth"], [15, 70 / 3, 100 / 3, 50, 55])
    np.testing.assert_allclose(drawn["loss smooth"], [0.45, 0.4, 0.3, 0.2, 0.15])
    # an even window holds as many steps as it says: one more after the step than before it
    np.testing.assert_allclose(plot.smooth(np.array([10, 20, 40, 40, 70.0]), 4), [70 / 3, 27.5, 42.5, 50, 55])
    # grad_norm missing at step 1: no dot there, and the mean skips it
    assert math.isnan(drawn["grad_norm"][0])
    np.testing.assert_allclose(drawn["grad_norm smooth"], [1.0, 1.5, 2.0, 3.0, 3.5])
    np.testing.assert_allclose(drawn["len_y2"], [20, 22, 24, 26, 28])
    assert "t_sample" not in drawn and "cut" not in drawn
    # greedy markers: SCoRe's only, in percent
    np.testing.assert_allclose(drawn["greedy acc_t1"], [55])
    np.testing.assert_allclose(drawn["greedy acc_t2"], [61])
    np.testing.assert_allclose(drawn["greedy delta_i2c"], [8])
    np.testing.assert_allclose(drawn["greedy delta_c2i"], [2])

    # a ckpt path relative to where evaluate.py ran (run.sh: the repository root, here tmp_path's parent)
    # is found from another directory too
    (tmp_path / "report.json").write_text(json.dumps([
        dict(name="base", ckpt=f"{tmp_path.name}/base", acc_t1=0.3, acc_t2=0.25),
        dict(name="SCoRe", ckpt=f"{tmp_path.name}/stage2/ckpt", acc_t1=0.5, acc_t2=0.6)]))
    (tmp_path / "base").mkdir()
    (run / "ckpt").mkdir()
    monkeypatch.chdir(run)
    assert [r["name"] for r in plot.find_reports([str(run)], [])[str(run)]] == ["SCoRe"]
    # the command line: default output RUN_DIR/curves.png
    monkeypatch.chdir(tmp_path)
    plot.main(["stage2"])
    assert png_size(run / "curves.png") == (1500, 800)


def test_curves_report_option_and_several_runs(tmp_path):
    run = write_run(tmp_path)
    other = tmp_path / "ablation"
    other.mkdir()
    (other / "log.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("step", "acc_t1", "acc_t2")}) + "\n"
                                             for r in LOG[:3]))
    # a report of checkpoints that were moved elsewhere: it is about every run given
    rep = tmp_path / "elsewhere.json"
    rep.write_text(json.dumps(dict(name="moved", ckpt="/nowhere/ckpt", acc_t1=0.42, acc_t2=0.47)))
    reports = plot.find_reports([str(run), str(other)], [str(rep)])
    assert [r["name"] for r in reports[str(run)]] == ["moved"] and [r["name"] for r in reports[str(other)]] == ["moved"]
    drawn = plot.curves({"stage2": plot.read_log(str(run / "log.jsonl")),
                         "ablation": plot.read_log(str(other / "log.jsonl"))}, str(tmp_path / "both.png"), reports={
                        "stage2": reports[str(run)], "ablation": reports[str(other)]}, window=1)
    np.testing.assert_allclose(drawn["ablation"]["acc_t2"], [20, 20, 50])
    np.testing.assert_allclose(drawn["ablation"]["acc_t2 smooth"], [20, 20, 50])  # window 1: the points
    np.testing.assert_allclose(drawn["stage2"]["greedy acc_t2"], [47])
    assert "kl_t1" not in drawn["ablation"] and "kl_t1" in drawn["stage2"]
    with pytest.raises(SystemExit) as e:  # one picture for several runs must be named
        plot.main([str(run), str(other)])
    assert e.value.code == 2


def test_delta_bars(tmp_path):
    rows = [dict(name="base", delta_mean=0.025, delta_se=0.012),
            dict(name="SCoRe", delta_mean=0.042, delta_se=0.009),
            dict(name="ablation", delta_mean=-0.004, delta_se=0.011),
            dict(name="paper base", delta=-0.112, acc_t1=0.526, acc_t2=0.414)]  # a plain report: no error bar
    drawn = plot.delta_bars(rows, str(tmp_path / "d.png"))
    np.testing.assert_allclose(drawn["delta"], [2.5, 4.2, -0.4, -11.2])  # percentage points
    np.testing.assert_allclose(drawn["se"][:3], [1.2, 0.9, 1.1])
    assert math.isnan(drawn["se"][3])
    assert png_size(tmp_path / "d.png") == (800, 330)  # 8 x (1.3 + 0.5 per row) inches at 100 dpi
    # the command line, with evaluate.py's report list (no error bars at all)
    (tmp_path / "report.json").write_text(json.dumps([dict(name="a", delta=0.01), dict(name="b", delta=0.03)]))
    plot.main(["--table", str(tmp_path / "report.json")])
    assert png_size(tmp_path / "delta.png") == (800, 230)


def test_delta_bars_from_the_table_over_seeds(tmp_path):
    """evaluate.py --seeds's report: each row's Delta over its seeds with the standard error, by hand."""
    seeds = {"abl@0": 0.01, "abl@1": 0.04, "abl@2": 0.04, "SCoRe@0": 0.05, "SCoRe@1": 0.07, "SCoRe@2": 0.09,
             "base": -0.2}
    report = {"rows": [{"row": row, "seeds": [], "delta": {"mean": m, "se": se, "n": 3}}
                       for row, m, se in (("base", -0.2, None), ("SCoRe", 0.07, 0.02 / 3 ** 0.5),
                                          ("abl", 0.03, 0.01))],
              "targets": [], "checkpoints": [{"name": n, "delta": d, "acc_t1": 0.5, "acc_t2": 0.5 + d}
                                             for n, d in seeds.items()]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    drawn = plot.delta_bars(plot.table_rows(report), str(tmp_path / "d.png"))
    np.testing.assert_allclose(drawn["delta"], [-20.0, 7.0, 3.0])
    np.testing.assert_allclose(drawn["se"][1:], [2 / 3 ** 0.5, 1.0])
    assert math.isnan(drawn["se"][0])
    plot.main(["--table", str(tmp_path / "report.json")])
    assert png_size(tmp_path / "delta.png") == (800, 280)
    assert [r["name"] for r in plot.report_entries(str(tmp_path / "report.json"))] == list(seeds)


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for argv in ([str(run)], ["--table", str(tmp_path / "t.json")]):
        (tmp_path / "t.json").write_text(json.dumps([dict(name="a", delta=0.01)]))
        with pytest.raises(SystemExit) as e:
            plot.main(argv)
        assert e.value.code == MISSING
    assert not (run / "curves.png").exists() and not (tmp_path / "delta.png").exists()
    # as a command: exactly that line on stderr, exit status 1, no traceback
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', sys.argv[1]]; "
            "runpy.run_path('plot.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code, str(run)], cwd=ROOT, capture_output=True, text=True)
    assert (p.returncode, p.stderr, p.stdout) == (1, MISSING + "\n", "")


def test_core_never_imports_matplotlib():
    code = ("import sys; import model, tokenizer, sample, reward, data, rl, evaluate, train_stage1, train_stage2; "
            "print([m for m in sys.modules if m.startswith('matplotlib')])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


@pytest.mark.parametrize("lines, where, says", [
    (['{"step": 1, "acc_t1": 0.1}', '{"step": 2, "acc_t1": 0.2', '{"step": 3}'], ":2:", "not valid JSON"),
    (['{"step": 1, "acc_t1": 0.1}', '', '{"acc_t1": 0.2}'], ":3:", "integer 'step'"),
    (['{"step": 1, "acc_t1": "0.1"}'], ":1:", "acc_t1 is '0.1', not a number"),
    (['[1, 2]'], ":1:", "expected a JSON object, got list"),
    ([''], ":", "no steps logged"),
])
def test_bad_log_is_one_line_naming_file_and_line(tmp_path, lines, where, says):
    run = tmp_path / "r"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        plot.main([str(run)])
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg
    assert msg.startswith(f"plot.py: {run / 'log.jsonl'}{where}") and says in msg
    assert not (run / "curves.png").exists()


def test_bad_inputs_are_one_line(tmp_path):
    def fails(argv):
        with pytest.raises(SystemExit) as e:
            plot.main(argv)
        assert isinstance(e.value.code, str) and "\n" not in e.value.code
        return e.value.code
    assert fails([str(tmp_path / "nope")]) == f"plot.py: {tmp_path / 'nope' / 'log.jsonl'}: no such file " \
                                              "(RUN_DIR is a training run's --out)"
    run = write_run(tmp_path)
    (tmp_path / "r.json").write_text('[{"name": "a", "acc_t1": 0.1}]')
    assert fails([str(run), "--report", str(tmp_path / "r.json")]).startswith(f"plot.py: report {tmp_path / 'r.json'}:")
    (tmp_path / "t.json").write_text('[{"name": "a", "delta_mean": 0.1, "delta_se": 0.01}, {"name": "b", "delta_mean": 4.2}]')
    assert "row 1" in fails(["--table", str(tmp_path / "t.json")])  # 4.2 points written as a fraction would be 420%
    (tmp_path / "t.json").write_text('[{"name": "a", "delta_mean": 0.1, "delta_se": -0.01}]')
    assert "row 0" in fails(["--table", str(tmp_path / "t.json")])
    (tmp_path / "t.json").write_text('[{"name": "a",\n "delta": }]')
    assert fails(["--table", str(tmp_path / "t.json")]).startswith(f"plot.py: table {tmp_path / 't.json'}:2: not JSON")


def test_out_is_the_file_written(tmp_path, capsys):
    """--out names the picture that is written: a folder gets the usual name in it, a name without .png gets
    the .png that matplotlib adds, and a missing folder is one line before anything is drawn."""
    (tmp_path / "report.json").write_text(json.dumps([dict(name="a", delta=0.01)]))
    table = ["--table", str(tmp_path / "report.json")]
    (tmp_path / "pics").mkdir()
    for out, written in (("pics", "pics/delta.png"), ("d", "d.png"), ("e.png", "e.png")):
        plot.main([*table, "--out", str(tmp_path / out)])
        assert capsys.readouterr().out == f"plot.py: wrote {tmp_path / written}\n"
        assert png_size(tmp_path / written)[0] == 800
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "e.png", "pics", "report.json"]
    with pytest.raises(SystemExit) as e:
        plot.main([*table, "--out", str(tmp_path / "nowhere" / "x.png")])
    assert e.value.code == f"plot.py: --out {tmp_path / 'nowhere' / 'x.png'}: its folder {tmp_path / 'nowhere'} does not exist"


# ----------------------------------------------------------------------------- held-out evaluations, changed
def test_curves_with_held_out_evaluations_and_changed(tmp_path):
    """Evaluation records interleaved with the steps: the training panels are the steps' alone (their means
    too), the held-out panel has one point per evaluation, and "changed" has its panel (Figure 6b)."""
    log = [dict(r, changed=c) for r, c in zip(LOG, (0.5, 0.4, 0.3, 0.2, 0.1))]
    ev = lambda s, a1, a2: dict(step=s, eval_n=64, eval_acc_t1=a1, eval_acc_t2=a2, eval_delta=a2 - a1,
                                eval_delta_i2c=0.1, eval_delta_c2i=0.05, eval_changed=0.2, eval_seconds=3.0)
    log = [ev(0, 0.25, 0.125)] + log[:2] + [ev(2, 0.375, 0.5)] + log[2:4] + [ev(4, 0.5, 0.75)] + log[4:]
    run = write_run(tmp_path, log)
    out = tmp_path / "c.png"
    drawn = plot.curves({"stage2": plot.read_log(str(run / "log.jsonl"))}, str(out), window=3)["stage2"]
    assert png_size(out) == (1500, 1200)  # 8 panels: the 6 of LOG, held-out, changed
    np.testing.assert_allclose(drawn["step"], [1, 2, 3, 4, 5])  # the training records only
    np.testing.assert_allclose(drawn["acc_t1"], [10, 20, 40, 40, 70])
    np.testing.assert_allclose(drawn["acc_t1 smooth"], [15, 70 / 3, 100 / 3, 50, 55])  # as without evaluations
    np.testing.assert_allclose(drawn["changed"], [50, 40, 30, 20, 10])
    np.testing.assert_allclose(drawn["changed smooth"], [45, 40, 30, 20, 15])
    np.testing.assert_allclose(drawn["eval step"], [0, 2, 4])
    np.testing.assert_allclose(drawn["eval_acc_t1"], [25, 37.5, 50])
    np.testing.assert_allclose(drawn["eval_acc_t2"], [12.5, 50, 75])
    np.testing.assert_allclose(drawn["eval_delta"], [-12.5, 12.5, 25])
    # an old log (no eval records, no changed): neither panel
    old = plot.curves({"s": LOG}, str(tmp_path / "old.png"))["s"]
    assert "eval_acc_t1" not in old and "changed" not in old and png_size(tmp_path / "old.png") == (1500, 800)


def test_bad_eval_field_is_one_line(tmp_path):
    run = write_run(tmp_path, LOG[:2] + [dict(step=2, eval_n=8, eval_acc_t1="high")])
    with pytest.raises(SystemExit) as e:
        plot.read_log(str(run / "log.jsonl"))
    assert str(e.value) == f"plot.py: {run / 'log.jsonl'}:3: eval_acc_t1 is 'high', not a number"


# ----------------------------------------------------------------------------- edit-distance histogram
def test_edit_hist_per_row(tmp_path, capsys):
    """evaluate.py --seeds's report: a row's seeds pooled; shares per bin of 0.05 and the mean, by hand."""
    ck = lambda name, ratios: dict(name=name, acc_t1=0.5, acc_t2=0.5, edit_ratios=ratios)
    report = {"rows": [], "checkpoints": [ck("base", [0.0, 0.0, 0.02, 1.0]), ck("SCoRe@0", [0.5, 0.52]),
                                          ck("SCoRe@1", [0.97, 0.3])]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert plot.edit_rows(str(path)) == {"base": [0.0, 0.0, 0.02, 1.0], "SCoRe": [0.5, 0.52, 0.97, 0.3]}
    plot.main(["--edit-hist", str(path)])
    out = tmp_path / "edit_hist.png"
    assert capsys.readouterr().out.strip() == f"plot.py: wrote {out}" and png_size(out) == (1000, 400)
    drawn = plot.edit_hist(plot.edit_rows(str(path)), str(tmp_path / "e.png"))
    base, score = np.zeros(20), np.zeros(20)
    base[0], base[19] = 75, 25  # 0, 0, 0.02 in [0, 0.05); 1.0 in the last bin
    score[[10, 19, 6]] = [50, 25, 25]  # 0.5 and 0.52 in [0.5, 0.55); 0.97; 0.3 in [0.3, 0.35)
    np.testing.assert_allclose(drawn["base"]["share"], base)
    np.testing.assert_allclose(drawn["SCoRe"]["share"], score)
    assert drawn["base"]["mean"] == pytest.approx(1.02 / 4) and drawn["SCoRe"]["mean"] == pytest.approx(2.29 / 4)
    # a report from before edit_ratios: one line
    path.write_text(json.dumps([dict(name="old", acc_t1=0.5, acc_t2=0.5)]))
    with pytest.raises(SystemExit) as e:
        plot.main(["--edit-hist", str(path)])
    assert str(e.value).startswith(f"plot.py: report {path}: entry 'old' has no per-problem edit_ratios")
