"""
The tasks. Each Problem carries its prompt x (the user message, asking for the answer format),
its reference and its oracle (`kind` picks the checker in reward.py). Readers take the published
formats; a malformed row is an error naming the file and the line.

    MATH      per-problem JSON files {problem, solution, ...} in a directory tree, or a JSONL with
              problem and answer (or solution); MATH500 is such a JSONL
    MBPP      JSONL rows {text, test_list, test_setup_code, ...}
    HumanEval JSONL or .jsonl.gz rows {task_id, prompt, test, entry_point, ...}
    demo      built in, generated from a seed: name two numbers of a list that sum to a target
"""
import gzip
import json
import os
import random
from dataclasses import dataclass, field

import reward

# The paper's self-correction instruction p1, appended as a user turn after the first attempt.
P1 = ("There might be an error in the solution above because of lack of understanding of the question. "
      "Please correct the error, if any, and rewrite the solution.")
# The demo's byte-level model pays one token per character, so its preset uses a shorter p1.
DEMO_P1 = "There might be an error in the solution above. Please correct it, if any."


def instruction(task):
    """The self-correction instruction p1 used for a task (training and evaluation alike)."""
    return DEMO_P1 if task == "demo" else P1


@dataclass
class Problem:
    prompt: str                 # x, the user message
    reference: str              # math: the answer; code: the test source; demo: one correct pair "a+b"
    kind: str                   # "math" | "code" | "demo"
    meta: dict = field(default_factory=dict)  # demo: numbers, target; code: entry_point


class DataError(ValueError):
    pass


# ------------------------------------------------------------------------------- demo task
DEMO_EVAL_SEED = 777_777  # evaluation problems; training uses other seeds (train_base: 1.., RL: --seed)

def make_demo(n, seed, size=6, lo=1, hi=99):
    """n problems: `size` distinct numbers in [lo, hi], exactly one pair of which sums to the target.
    Finding the pair means searching all pairs; checking a proposed pair is one addition."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        nums = rng.sample(range(lo, hi + 1), size)
        i, j = sorted(rng.sample(range(size), 2))
        target = nums[i] + nums[j]
        if sum(nums[a] + nums[b] == target for a in range(size) for b in range(a + 1, size)) != 1:
            continue
        prompt = f"sum {target}: {' '.join(map(str, nums))}"
        out.append(Problem(prompt, f"{nums[i]}+{nums[j]}", "demo", {"numbers": nums, "target": target}))
    return out


# ------------------------------------------------------------------------------- readers
MATH_FORMAT = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_FORMAT = "\nWrite your solution as a complete Python program in a ```python code block."


def _read_jsonl(path):
    """Yield (line_number, row dict) from a .jsonl or .jsonl.gz file; bad JSON names file and line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _need(row, keys, where):
    for k in keys:
        if k not in row:
            raise DataError(f"{where}: missing field {k!r} (has {sorted(row)})")
        if k != "test_list" and not isinstance(row[k], str):
            raise DataError(f"{where}: field {k!r} should be a string, got {type(row[k]).__name__}")


def _math_problem(row, where):
    _need(row, ["problem"], where)
    if "answer" in row:
        answer = str(row["answer"])
    else:
        _need(row, ["solution"], where)
        answer = reward.extract_boxed(row["solution"])
        if answer is None:
            raise DataError(f"{where}: the solution has no \\boxed{{}} answer")
    return Problem(row["problem"] + MATH_FORMAT, answer, "math")


def load_math(path, limit=None):
    """MATH: a directory of per-problem JSON files (MATH/train/<subject>/<id>.json), or a JSONL
    (MATH500: problem, answer) file."""
    out = []
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".json"))
        if not files:
            raise DataError(f"{path}: no .json problem files found")
        for fn in files[:limit]:
            with open(fn, encoding="utf-8") as f:
                try:
                    row = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{fn}:{e.lineno}: not valid JSON ({e.msg})") from None
            out.append(_math_problem(row, fn))
    else:
        for n, row in _read_jsonl(path):
            out.append(_math_problem(row, f"{path}:{n}"))
            if limit and len(out) == limit:
                break
    return out


def load_mbpp(path, limit=None):
    """MBPP JSONL: text, test_list (assert lines), test_setup_code. The prompt shows the tests,
    as the MBPP paper's prompt does; the oracle runs setup code then the asserts."""
    out = []
    for n, row in _read_jsonl(path):
        where = f"{path}:{n}"
        _need(row, ["text", "test_list"], where)
        if not isinstance(row["test_list"], list) or not all(isinstance(t, str) for t in row["test_list"]):
            raise DataError(f"{where}: test_list should be a list of strings")
        setup = row.get("test_setup_code") or ""
        tests = "\n".join([setup] + row["test_list"]) if setup else "\n".join(row["test_list"])
        prompt = f"{row['text']}\nYour code should pass these tests:\n" + "\n".join(row["test_list"]) + CODE_FORMAT
        out.append(Problem(prompt, tests, "code"))
        if limit and len(out) == limit:
            break
    return out


def load_humaneval(path, limit=None):
    """HumanEval JSONL(.gz): the prompt is the function signature and docstring to complete; the
    oracle runs the data set's test code then check(entry_point)."""
    out = []
    for n, row in _read_jsonl(path):
        where = f"{path}:{n}"
        _need(row, ["prompt", "test", "entry_point"], where)
        prompt = ("Complete the following Python function.\n```python\n" + row["prompt"] + "```" + CODE_FORMAT)
        tests = row["test"] + f"\ncheck({row['entry_point']})\n"
        out.append(Problem(prompt, tests, "code", {"entry_point": row["entry_point"], "header": row["prompt"]}))
        if limit and len(out) == limit:
            break
    return out


def load_task(name, path=None, n=None, seed=0):
    """Problems of a task by name: demo (generated: n problems from seed), math, mbpp, humaneval (read from path)."""
    if name == "demo":
        return make_demo(n or 500, seed)
    if path is None:
        raise DataError(f"task {name!r} needs a data path (--data)")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    loaders = {"math": load_math, "mbpp": load_mbpp, "humaneval": load_humaneval}
    if name not in loaders:
        raise DataError(f"unknown task {name!r}: choose demo, math, mbpp or humaneval")
    return loaders[name](path, limit=n)


# ------------------------------------------------------------------------------- oracles
def program_of(problem, response):
    """The program to run for a code answer: the last ```python block; for HumanEval, a block that
    only gives the body's continuation gets the header prepended."""
    code = reward.extract_code(response)
    if code is None:
        return None
    entry = problem.meta.get("entry_point")
    if entry and f"def {entry}" not in code:
        code = problem.meta["header"] + code
    return code


def answer_of(problem, response):
    """The final answer a response gives, as a comparable string (None if it gives none): used to
    tell whether the answer changed between turns, and for majority voting."""
    if problem.kind == "demo":
        pair = reward.extract_pair(response)
        return None if pair is None else "+".join(map(str, sorted(pair)))
    if problem.kind == "math":
        box = reward.extract_boxed(response)
        return None if box is None else "".join(box.split())
    code = reward.extract_code(response)
    return None if code is None else code.strip()


def rewards(problems, responses, timeout=10.0):
    """Oracle reward r(y) in {0, 1} for each (problem, response text); code runs in parallel."""
    out = [0.0] * len(problems)
    jobs, where = [], []
    for i, (p, y) in enumerate(zip(problems, responses)):
        if p.kind == "demo":
            out[i] = float(reward.pair_sum_equal(y, p.meta["numbers"], p.meta["target"]))
        elif p.kind == "math":
            out[i] = reward.math_reward(y, p.reference)
        else:
            prog = program_of(p, y)
            if prog is not None:
                jobs.append((prog, p.reference))
                where.append(i)
    for i, ok in zip(where, reward.run_code_batch(jobs, timeout=timeout) if jobs else []):
        out[i] = float(ok)
    return out
