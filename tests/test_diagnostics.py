"""The paper's diagnostics in evaluate.py: the edit-distance ratio between the attempts (Figure 4a), against
values computed by hand and a naive recursive edit distance; --first-from (Figure 5), against a plain
evaluation and against attempts generated here one problem at a time by sample.generate from contexts
built by hand; and the progress lines of every path evaluate.main takes. Tiny byte-level models."""
import functools
import json
import random
import re
import time

import pytest
import torch

import data
import evaluate
from model import GPT, GPTConfig
from sample import generate
from tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for this file


def make_ckpt(d, seed):
    torch.manual_seed(seed)
    tok = Tokenizer.byte_level()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                    max_seq_len=256, tie_embeddings=True)
    GPT(cfg).init_weights(std=0.3).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("a"), 0), make_ckpt(tmp_path_factory.mktemp("b"), 1)


# ----------------------------------------------------------------------------- edit distance
def naive(a, b):
    """The definition, recursively: the cheapest of deleting, inserting or substituting the first character."""
    @functools.lru_cache(maxsize=None)
    def d(i, j):
        if i == len(a) or j == len(b):
            return len(a) - i + len(b) - j
        return min(d(i + 1, j) + 1, d(i, j + 1) + 1, d(i + 1, j + 1) + (a[i] != b[j]))
    return d(0, 0)


def test_edit_ratio_by_hand():
    assert evaluate.levenshtein("kitten", "sitting") == 3  # k->s, e->i, insert g
    assert evaluate.edit_ratio("kitten", "sitting") == pytest.approx(3 / 7)
    assert evaluate.edit_ratio("", "") == 0.0 and evaluate.edit_ratio("abc", "abc") == 0.0
    assert evaluate.edit_ratio("", "abcd") == 1.0 and evaluate.edit_ratio("abc", "xyz") == 1.0
    assert evaluate.edit_ratio("flaw", "lawn") == pytest.approx(2 / 4)  # delete f, insert n
    # the metric is the mean over problems: 2+5 -> 5+2 is 2 substitutions of 3 characters, x -> x is 0
    probs = [data.Problem("sum 7: 1 2 4 5 9", "2+5", "demo", {"numbers": [1, 2, 4, 5, 9], "target": 7})] * 2
    assert evaluate.metrics(probs, [["2+5", "x"], ["5+2", "x"]])["edit_ratio"] == pytest.approx((2 / 3 + 0) / 2)


def test_levenshtein_against_the_recursion():
    rng = random.Random(0)
    for _ in range(2000):  # small alphabets: many matches, the cases a bit-vector carry gets wrong
        a = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 12)))
        assert evaluate.levenshtein(a, b) == naive(a, b) == evaluate.levenshtein(b, a), (a, b)
    for _ in range(20):  # longer than a machine word: bits carried across many limbs
        a = "".join(rng.choice("abcdé\n") for _ in range(rng.randint(60, 150)))
        b = a[:rng.randint(0, 60)] + "".join(rng.choice("abcdé\n") for _ in range(rng.randint(0, 40))) + a[70:]
        assert evaluate.levenshtein(a, b) == naive(a, b), (a, b)


def test_levenshtein_is_fast_on_long_attempts():
    """500 problems of ~3,000 characters must not dominate an evaluation: well under 0.1 s a pair."""
    rng = random.Random(1)
    a = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz \\{}0123456789") for _ in range(3000))
    b = a[:1000] + "".join(rng.choice("xyz ") for _ in range(500)) + a[1400:]
    t = time.perf_counter()
    evaluate.levenshtein(a, b)
    assert time.perf_counter() - t < 0.1


# ----------------------------------------------------------------------------- --first-from
def report(capsys, tmp_path, argv, name="r.json"):
    out = tmp_path / name
    evaluate.main(argv + ["--out", str(out)])
    capsys.readouterr()
    return json.loads(out.read_text())


BASIC = ["--task", "demo", "--n", "6", "--batch", "4", "--dtype", "fp32"]


def test_first_from_itself_is_a_plain_evaluation(ckpts, tmp_path, capsys):
    """The given-first path (first attempts teacher-forced into the cache) against the sampled one."""
    a, _ = ckpts
    plain = report(capsys, tmp_path, ["--ckpt", a, *BASIC])
    own = report(capsys, tmp_path, ["--ckpt", a, *BASIC, "--first-from", a], "own.json")
    assert own.pop("first_from") == a and "first_from" not in plain
    assert own == plain  # every metric, and each problem's edit ratio (the texts of both turns)
    assert 0 < plain["edit_ratio"] < 1  # a random model: something to compare


def texts_by_hand(first_ckpt, ckpt, problems, max_new=16):
    """Turn 1 from first_ckpt, turn 2 from ckpt, one problem at a time: sample.generate (greedy) on the context
    written out here: chat(x), y1, the end of turn unless y1 ends with it, p1's user turn, the assistant."""
    out = ([], [])
    for path, turn in ((first_ckpt, 0), (ckpt, 1)):
        tok, model = Tokenizer.from_pretrained(path), GPT.from_pretrained(path, dtype=torch.float32).eval()
        for i, p in enumerate(problems):
            x = tok.render([{"role": "user", "content": p.prompt}])
            if turn == 0:
                out[0].append(generate(model, [x], max_new, temperature=0.0, stop_ids=tok.stop_ids)[0])
                continue
            y1 = out[0][i]
            ctx = x + y1 + ([] if y1 and y1[-1] == tok.eot_id else [tok.eot_id]) + \
                tok.render_followup([{"role": "user", "content": data.DEMO_P1}])
            out[1].append(generate(model, [ctx], max_new, temperature=0.0, stop_ids=tok.stop_ids)[0])
    text = lambda y: tok.decode([t for t in y if t not in tok.stop_ids])
    return [text(y) for y in out[0]], [text(y) for y in out[1]]


def test_first_from_another_model(ckpts, tmp_path, capsys):
    a, b = ckpts
    plain_a = report(capsys, tmp_path, ["--ckpt", a, *BASIC], "a.json")
    plain_b = report(capsys, tmp_path, ["--ckpt", b, *BASIC], "b.json")
    mixed = report(capsys, tmp_path, ["--ckpt", a, "--name", "A", "--ckpt", b, "--name", "B", *BASIC,
                                      "--first-from", b], "mixed.json")
    assert [r["first_from"] for r in mixed] == [b, b]
    a_on_b, b_on_b = mixed
    assert a_on_b["acc_t1"] == plain_b["acc_t1"]  # turn 1 is b's, whoever answers turn 2
    assert b_on_b["edit_ratios"] == plain_b["edit_ratios"]  # b on its own first attempts: its plain evaluation
    # each problem's two texts, generated here: the report's edit ratios are theirs, and turn 2 is a's own
    y1, y2 = texts_by_hand(b, a, data.make_demo(6, data.DEMO_EVAL_SEED, "eval"))
    assert a_on_b["edit_ratios"] == pytest.approx([evaluate.edit_ratio(u, v) for u, v in zip(y1, y2)], abs=0)
    assert a_on_b["edit_ratios"] != plain_a["edit_ratios"]  # a corrects b's attempts, not its own


def test_first_from_given_as_text_when_the_tokenizers_differ(ckpts):
    """A first attempt from a model with another vocabulary reaches the evaluated model as its own tokens."""
    tok = Tokenizer.from_pretrained(ckpts[0])
    other = Tokenizer.byte_level(["sum", " 5"])
    ids = other.encode("sum 5+ 2") + [other.eot_id]
    assert evaluate.given_first([ids], tok, tok)[0] is ids
    assert evaluate.given_first([ids], other, tok) == [tok.encode("sum 5+ 2")]


def test_first_from_bad_checkpoint_is_one_line(ckpts, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", ckpts[0], *BASIC, "--first-from", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"error: --first-from {tmp_path}: not a checkpoint (no config.json and model.pt, or LoRA "
                        "adapters, there)") and "\n" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------- progress
def test_every_path_prints_progress(ckpts, tmp_path, capsys):
    """Plain, --first-from and --scaling: a line per batch with the count, the rate and the ETA (stderr)."""
    a, b = ckpts
    evaluate.main(["--ckpt", a, "--name", "A", *BASIC, "--first-from", b, "--scaling", "2"])
    err = capsys.readouterr().err.splitlines()
    line = r"{}: (\d+)/6 problems, \d+\.\d\d/s, ETA \d+m\d\ds"
    for label in (f"{re.escape(b)}: turn 1 for --first-from", "A", "A, 2 samples corrected once",
                  "A, 4 parallel samples"):
        done = [int(m.group(1)) for m in (re.fullmatch(line.format(label), x) for x in err) if m]
        assert done[-1] == 6 and done == sorted(done), (label, err)
    evaluate.main(["--ckpt", a, "--name", "A", *BASIC, "--batch", "64"])  # one batch: still a line
    assert re.fullmatch(line.format("A"), capsys.readouterr().err.strip().splitlines()[-1])
