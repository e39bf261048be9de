"""The GPU check (bench.py --only gpu, bench_gpu.py) on the CPU: the whole command at toy shapes passes, and
each of its comparisons reports FAIL when the code it guards is broken (a comparison that cannot fail checks
nothing). On the CPU the device side runs the GPU's attention kernel (SDPA), so breaking that kernel must
show in the logits, the sampler and the gradients alike."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import bench_gpu  # noqa: E402
import model  # noqa: E402
import train_stage2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def results(c):
    return [r["result"] for r in c.rows if r["result"]]


def run_part(name, tmp_path):
    c = bench_gpu.Check("cpu", True, str(tmp_path))
    bench_gpu.PARTS[name][0](c)
    return c


def test_the_whole_command_on_the_cpu(tmp_path):
    """python bench.py --only gpu --device cpu --tiny --out DIR, as README shows it: every part runs, every
    comparison passes, and the report holds each part's rows."""
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "bench.py", "--only", "gpu", "--device", "cpu", "--tiny", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "gpu.json").read_text())
    assert list(rep["parts"]) == list(bench_gpu.PARTS)
    rows = [(p, row) for p, v in rep["parts"].items() for row in v["rows"]]
    bad = [(p, row) for p, row in rows if row["result"] in ("FAIL", "ERROR")]
    assert not bad, bad
    # the comparisons that must be there, each judged
    judged = {p: sum(row["result"] == "ok" for q, row in rows if q == p) for p in rep["parts"]}
    assert judged["logits"] == 4 and judged["sampler"] == 1 and judged["grads"] == 3, judged
    assert judged["entry"] == 6 and judged["runsh"] == 1, judged  # 2 x (moved, resume), evaluate, --to-hf; run.sh
    md = (out / "gpu.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == len(rows) + 1  # a row per check, the header
    assert "all checks passed" in r.stdout


def broken_sdpa(q, k, v, bias=None):
    """SDPA that forgets the mask: every query sees every key (the future too)."""
    B, H, T, D = q.shape
    G = k.shape[1]
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_a_broken_gpu_kernel_fails_the_logits_sampler_and_gradients(tmp_path, monkeypatch):
    for name in ("logits", "sampler", "grads"):
        assert "FAIL" not in results(run_part(name, tmp_path / f"ok_{name}")), name
    monkeypatch.setattr(model, "sdpa_attention", broken_sdpa)
    logits = results(run_part("logits", tmp_path / "logits"))
    assert logits[0] == "ok"  # the CPU's own attention against transformers does not use the broken kernel
    assert logits[1:] == ["FAIL"] * 3, logits
    assert results(run_part("sampler", tmp_path / "sampler")) == ["FAIL"]
    assert results(run_part("grads", tmp_path / "grads")) == ["FAIL"] * 3


def test_a_wrong_objective_fails_the_gradient_check(tmp_path, monkeypatch):
    """Stage II without its shaping bonus is not Eq. 4: the naive gradient written out in bench_gpu tells."""
    import rl
    monkeypatch.setattr(train_stage2, "objective",
                        lambda b, a: rl.reinforce(b, a, [(b.r1, a.beta1), (b.r2, a.beta1)]))
    assert results(run_part("grads", tmp_path)) == ["FAIL"] * 3


def test_a_wrong_head_fails_the_gradient_check(tmp_path, monkeypatch):
    """The chunked log-prob head at temperature 2 (a wrong softmax): the gradient check tells."""
    import rl
    real = rl.token_logprobs
    monkeypatch.setattr(rl, "token_logprobs", lambda h, w, t, temperature=1.0, **kw: real(h, w, t, 2.0, **kw))
    assert results(run_part("grads", tmp_path)) == ["FAIL"] * 3


def test_a_part_that_raises_is_one_error_row_and_the_next_part_runs(tmp_path, monkeypatch, capsys):
    def boom(c):
        c.row("a check before the failure", "1")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setitem(bench_gpu.PARTS, "boom", (boom, 1))
    done = bench_gpu.run("cpu", True, ["boom", "machine"], str(tmp_path))
    assert done["boom"]["rows"][-1]["result"] == "ERROR"
    assert "OutOfMemoryError: CUDA out of memory" in done["boom"]["rows"][-1]["measured"]
    assert done["machine"]["rows"][0]["check"] == "torch"
    assert "Traceback" in (tmp_path / "gpu_errors.txt").read_text()
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert list(saved["parts"]) == ["boom", "machine"]
    assert "1 row(s) FAIL or ERROR" in capsys.readouterr().out


def test_unknown_parts_and_a_missing_gpu_are_one_line(tmp_path):
    for argv, says in ((["--parts", "logits,nope"], "unknown part(s) nope"),
                       (["--device", "cuda"], "torch sees no GPU here")):
        if argv[1] == "cuda" and torch.cuda.is_available():
            continue
        r = subprocess.run([sys.executable, "bench.py", "--only", "gpu", *argv], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
