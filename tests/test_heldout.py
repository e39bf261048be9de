"""The demo's problems are held out by construction: whether a problem is for evaluation, for tuning or
for training is a property of the problem (its numbers as a set, and its target), so no training stream
of any seed can draw a tuning or evaluation problem. Checked against an exact enumeration of the task
and against every generator the scripts use."""
import itertools
import random

import pytest

import data
import evaluate
import rl
import train_base


def key(p):
    return p.meta["target"], tuple(sorted(p.meta["numbers"]))


@pytest.fixture(scope="module")
def every_problem():
    """All demo problems up to order, enumerated: 5 distinct numbers of 1..15 and a target that exactly
    one pair reaches."""
    out = []
    for nums in itertools.combinations(range(1, 16), 5):
        sums = [a + b for a, b in itertools.combinations(nums, 2)]
        out += [(t, nums) for t in set(sums) if sums.count(t) == 1]
    return out


def test_split_is_a_property_of_the_problem(every_problem):
    assert len(every_problem) == 25564
    splits = [data.demo_split(list(n), t) for t, n in every_problem]
    counts = {s: splits.count(s) for s in data.DEMO_SPLITS}
    assert counts["eval"] > 2400 and counts["tune"] > 2400 and counts["train"] > 19000, counts
    rng = random.Random(0)
    for t, n in every_problem[::97]:  # the order of the numbers is presentation only
        shuffled = rng.sample(n, len(n))
        assert data.demo_split(shuffled, t) == data.demo_split(list(n), t)


def test_generators_draw_only_their_split(every_problem):
    split_of = {(t, n): data.demo_split(list(n), t) for t, n in every_problem}
    evaluation = data.make_demo(2000, data.DEMO_EVAL_SEED, "eval")
    tuning = data.make_demo(2000, 777, "tune")
    assert len({key(p) for p in evaluation}) == 2000 and len({key(p) for p in tuning}) == 2000  # distinct
    assert all(split_of[key(p)] == "eval" for p in evaluation)
    assert all(split_of[key(p)] == "tune" for p in tuning)
    held_out = {key(p) for p in evaluation + tuning}
    for seed in range(4):  # RL's problems (data.training_problems -> data.load_task), any seed
        train = data.load_task("demo", n=20000, seed=seed)
        assert not held_out & {key(p) for p in train}
        assert all(split_of[key(p)] == "train" for p in train)
    for seed in range(3):  # the base's batches: seeds seed * 1_000_003 + step
        for step in range(1, 400, 7):
            assert not held_out & {key(p) for p in data.make_demo(64, seed * 1_000_003 + step)}
    # more than a split holds is refused at once, with the split's size, counted here over every problem
    n_eval = sum(s == "eval" for s in split_of.values())
    with pytest.raises(data.DataError, match=f"the demo's eval split has {n_eval} distinct problems; asked for 3000"):
        data.make_demo(3000, 1, "eval")


def test_the_scripts_ask_for_their_splits(tmp_path, monkeypatch):
    """train_base trains on "train" and stops on "tune"; rl trains on "train"; evaluate reports "eval"
    and tunes on "tune" when asked."""
    asked = []
    real = data.make_demo
    monkeypatch.setattr(data, "make_demo", lambda n, seed, split="train", **kw: asked.append(split) or real(n, seed, split, **kw))
    train_base.main(["--out", str(tmp_path / "base"), "--max-steps", "2", "--eval-every", "2", "--eval-n", "4",
                     "--threads", "1"])
    assert set(asked) == {"train", "tune"} and asked.count("tune") == 1
    asked.clear()
    args = rl.get_args(1, ["--base", str(tmp_path / "base"), "--init", str(tmp_path / "base"), "--out", str(tmp_path / "s1"),
                           "--n-train", "50"])
    from tokenizer import Tokenizer
    data.training_problems(args, Tokenizer.from_pretrained(tmp_path / "base"), 512, lambda *a, **k: None)
    assert asked == ["train"]
    for argv, want in (([], "eval"), (["--split", "tune"], "tune")):
        asked.clear()
        evaluate.main(["--task", "demo", "--n", "4", "--ckpt", str(tmp_path / "base"), *argv])
        assert asked == [want]
