"""Held-out problems for training-time evaluation (data.is_validation, data.load_validation): MATH's carve-out
is a function of the problem statement alone (its hash recomputed here by hand) at the stated share; MBPP's is
its validation task ids; load_validation returns exactly the problems is_validation marks, in the file's order."""
import hashlib
import json

import pytest

import data


def statement(i):
    return f"What is ${i} + {i * 7 % 13}$? Give the answer as a reduced fraction of {i % 9 + 2}."


def by_hand(text):
    """sha256 of the statement's UTF-8 bytes, the first 8 bytes as a big-endian integer, 0 modulo 25."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) % 25 == 0


@pytest.fixture
def math_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"problem": statement(i), "answer": str(i)}) + "\n" for i in range(5000)))
    return path


def test_math_carve_out_is_the_hash_of_the_statement(math_file):
    problems = data.load_task("math", str(math_file))
    marked = [data.is_validation("math", p) for p in problems]
    assert marked == [by_hand(statement(i)) for i in range(5000)]
    assert abs(sum(marked) / 5000 - 1 / 25) < 0.01  # 200 expected: 3 standard errors is ~0.008
    # a property of the statement: the same problem read another way (its answer in a solution) agrees
    p = data._math_problem({"problem": statement(7), "solution": "so \\boxed{7}"}, "x")
    assert data.is_validation("math", p) == by_hand(statement(7))


def test_load_validation_is_what_is_validation_marks(math_file, tmp_path):
    problems = data.load_task("math", str(math_file))
    want = [p.prompt for p in problems if by_hand(data.math_statement(p))]
    assert [p.prompt for p in data.load_validation("math", str(math_file), n=10_000)] == want
    assert [p.prompt for p in data.load_validation("math", str(math_file), n=5)] == want[:5]
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text("".join(json.dumps({"task_id": t, "text": f"task {t}", "test_list": ["assert True"]}) + "\n"
                            for t in range(1, 975)))
    got = data.load_validation("mbpp", str(mbpp), n=1000)
    assert [p.meta["task_id"] for p in got] == list(range(511, 601))
    assert [p.meta["task_id"] for p in data.load_task("mbpp", str(mbpp)) if data.is_validation("mbpp", p)] == \
        list(range(511, 601))


def test_demo_validation_is_the_tune_split():
    got = data.load_validation("demo", None, n=20, seed=3)
    assert [p.prompt for p in got] == [p.prompt for p in data.make_demo(20, seed=3, split="tune")]
    assert all(data.demo_split(p.meta["numbers"], p.meta["target"]) == "tune" for p in got)
    assert not any(data.is_validation("demo", p) for p in data.make_demo(50, seed=0))  # train draws hold none


def test_no_validation_problem_is_one_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"problem": statement(0), "answer": "0"}) + "\n")  # not in the 1 in 25
    assert not by_hand(statement(0))
    with pytest.raises(data.DataError, match=r"m\.jsonl: none of its problems is a validation problem \(1 in 25"):
        data.load_validation("math", str(path), n=5)
    with pytest.raises(data.DataError, match="humaneval"):
        data.load_validation("humaneval", str(path), n=5)
