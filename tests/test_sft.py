"""The SFT baselines (train_sft.py): the traces each method keeps, judged again here by the oracle from
their text; no evaluation or tuning problem collected from; the loss on the second attempt's tokens only,
against a hand-written example and the naive log-softmax."""
import json
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import reward
import train_sft
from model import GPT, GPTConfig
from test_real_path import qwen  # noqa: F401 (a fixture)
from train_sft import sft_step


def test_keep_by_hand():
    """Two problems of k = 4 samples; rewards (r1, r2) per row written out, the kept traces listed by hand."""
    ro = SimpleNamespace(r=torch.tensor([[0.0, 1, 0, 1, 0, 0, 0, 0], [1.0, 1, 0, 0, 1, 0, 1, 1]]))
    rng = random.Random(0)
    assert train_sft.keep(ro, 4, "star", False, rng) == [(0, 0, 2), (4, 4, 2), (6, 6, 2), (7, 7, 2)]
    assert train_sft.keep(ro, 4, "star", True, rng) == [(0, 0, 2), (1, 1, 2), (4, 4, 2), (6, 6, 2), (7, 7, 2)]
    pairs = train_sft.keep(ro, 4, "pair", False, rng)  # group 1 has no right first attempt: nothing to pair
    assert [(i, turn) for i, _, turn in pairs] == [(0, 1), (2, 1)] and all(j in (1, 3) for _, j, _ in pairs)
    plus = train_sft.keep(ro, 4, "pair", True, rng)
    assert [i for i, _, _ in plus] == [0, 1, 2, 3] and dict((i, j) for i, j, _ in plus)[1] == 3
    assert dict((i, j) for i, j, _ in plus)[3] == 1  # a right attempt is paired with another sample, never itself


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A demo base trained briefly: it answers, often wrongly, so every kind of trace occurs."""
    import train_base
    d = tmp_path_factory.mktemp("sft") / "base"
    train_base.main(["--out", str(d), "--max-steps", "150", "--eval-every", "150", "--eval-n", "8", "--threads", "1",
                     "--dtype", "fp32"])
    return d


@pytest.mark.parametrize("method", ["star", "pair"])
def test_traces_are_what_the_method_says(base, tmp_path, method, capsys):
    out = tmp_path / method
    train_sft.main(["--method", method, "--base", str(base), "--out", str(out), "--problems", "96", "--epochs", "1",
                    "--threads", "1", "--dtype", "fp32", "--k", "4", "--gen-batch", "128", "--tensorboard", str(tmp_path / "tb")])
    # the collection says how far it is, at what rate, and when it ends: a line per chunk of 128 / 4 problems
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("collected ")]
    assert [x.split()[1] for x in lines] == ["32/96", "64/96", "96/96"]
    assert all(re.search(r"\| \d+\.\d\d problems/s \| ETA \d+m\d\ds$", x) for x in lines), lines
    assert lines[-1].endswith("ETA 0m00s")
    # TensorBoard got log.jsonl's records (float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(r["step"], float(np.float32(r["loss"]))) for r in log]
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert len(traces) >= 3
    for t in traces:
        numbers = [int(x) for x in t["problem"].split(":")[1].split()]
        target = int(t["problem"].split()[1].rstrip(":"))
        assert data.demo_split(numbers, target) == "train"  # never a tuning or evaluation problem
        assert not reward.pair_sum_equal(t["y1"], numbers, target)  # the oracle again, from the text
        assert reward.pair_sum_equal(t["y2"], numbers, target)
        i, j = t["rows"]
        if method == "star":  # the rollout's own second attempt
            assert i == j and t["second_from_turn"] == 2
        else:  # another sample of the same problem, drawn independently of y1
            assert i != j and i // 4 == j // 4 and t["second_from_turn"] == 1
    assert GPT.from_pretrained(out / "ckpt") is not None and data.task_info(out / "ckpt")["task"] == "demo"
    with pytest.raises(SystemExit, match="already holds a run"):
        train_sft.main(["--method", method, "--base", str(base), "--out", str(out), "--problems", "8"])


def test_the_loss_is_on_the_second_attempt_only():
    prompt, y1, followup, y2, eot = [1, 2, 3], [4, 5], [7, 8], [10, 11, 9], 9
    ids, mask = train_sft.second_attempt_example(prompt, y1, y2, followup, eot)
    assert ids == [1, 2, 3, 4, 5, 9, 7, 8, 10, 11, 9]  # y1 closed by the end of turn, then p1, then y2
    assert [t for t, m in enumerate(mask) if m] == [7, 8, 9]  # the positions that predict 10, 11 and 9
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32,
                          max_seq_len=32)).init_weights(std=0.3)
    naive = -torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)[[7, 8, 9], [10, 11, 9]].mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    assert abs(sft_step(model, opt, [(ids, mask)], "fp32") - naive.item()) < 1e-6


def test_the_math_preset_from_a_bf16_qwen2(qwen, tmp_path, monkeypatch):
    """--preset math on the tiny bf16 Qwen2 of tests/test_real_path.py, with an oracle it can pass (an even
    length is right: its math earns nothing): MATH's chat layout and p1, a checkpoint that evaluate.py reads."""
    monkeypatch.setattr(data, "rewards", lambda problems, texts, timeout=10.0: [float(len(t) % 2 == 0) for t in texts])
    out = tmp_path / "pair"
    train_sft.main(["--preset", "math", "--method", "pair", "--plus", "--base", str(qwen["base"]), "--data",
                    str(qwen["math"]), "--out", str(out), "--problems", "8", "--max-new-tokens", "8", "--batch", "4",
                    "--device", "cpu", "--threads", "1", "--dtype", "bf16"])
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert traces and all(len(t["y2"]) % 2 == 0 for t in traces)
    assert data.task_info(out / "ckpt") == {"task": "math", "p1": data.P1, "max_new_tokens": 8}
    state = torch.load(out / "ckpt" / "model.pt", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float32}  # fp32 masters from a bf16 checkpoint


@pytest.mark.parametrize("flags,message", [
    (["--problems", "0"], "--problems must be at least 1 (got 0)"),
    (["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
    (["--micro-batch", "0"], "--micro-batch must be at least 1 (got 0)"),
    (["--gen-batch", "-3"], "--gen-batch must be at least 1 (got -3)"),
    (["--threads", "-1"], "--threads must be at least 0 (got -1)"),
    (["--lr", "nan"], "--lr must be a positive number (got nan)"),
    (["--method", "pair", "--k", "1"],
     "--method pair pairs a sample with another sample of the same problem: --k must be at least 2")])
def test_a_bad_flag_is_one_line(capsys, flags, message):
    """train_sft.py's numeric flags are checked by the stages' rules (rl.check_numbers): one line naming the flag."""
    with pytest.raises(SystemExit) as e:
        train_sft.get_args(["--method", "star", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.endswith(f": error: {message}\n"), err
