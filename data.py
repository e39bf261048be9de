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
import collections
import functools
import gzip
import hashlib
import itertools
import json
import os
import random
import re
from dataclasses import dataclass, field

import reward
from sample import max_new_that_fits

TASKS = ("demo", "math", "mbpp", "humaneval")

# The paper's self-correction instructions p1 (its appendix), appended as a user turn after the
# first attempt: one for math, one for code.
P1 = ("There might be an error in the solution above because of lack of understanding of the question. "
      "Please correct the error, if any, and rewrite the solution.")
P1_CODE = ("There might be an error in the code above because of lack of understanding of the question. "
           "Please correct the error, if any, and rewrite the solution. Only output the final correct Python program!")
# The demo's model is small and its tokenizer small, so its preset uses a shorter p1.
DEMO_P1 = "There might be an error above. Correct it, if any."
# The words the demo's tokenizer makes single tokens (tokenizer.Tokenizer.byte_level): the chat roles, the
# prompt's word and numbers, the words of its p1; then, as phrases, each role with its line break and the
# whole p1. A rollout is then ~30 tokens instead of ~125 characters, the p1 turn 9 of them.
DEMO_WORDS = ["user", "assistant", "sum", *(f" {i}" for i in range(1, 30)), *re.findall(r" ?[A-Za-z]+", DEMO_P1),
              ("user", "\n"), ("assistant", "\n"), tuple(re.findall(r" ?[A-Za-z]+|[.,]", DEMO_P1))]


def instruction(task):
    """The self-correction instruction p1 used for a task (training and evaluation alike)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: choose {', '.join(TASKS)}")
    return {"demo": DEMO_P1, "math": P1}.get(task, P1_CODE)


def save_task_info(ckpt_dir, task, p1, max_new_tokens):
    """Record in a checkpoint the task, p1 and max_new_tokens it was trained with (ckpt_dir/task.json),
    so that sample.py and evaluate.py default to them. Written atomically."""
    path = os.path.join(ckpt_dir, "task.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"task": task, "p1": p1, "max_new_tokens": max_new_tokens}, f, indent=2)
    os.replace(path + ".tmp", path)


def task_info(ckpt_dir):
    """What save_task_info recorded: {task, p1, max_new_tokens}; {} when the checkpoint has no task.json
    (a converted model). A malformed file is a DataError naming it."""
    path = os.path.join(ckpt_dir, "task.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(info).__name__}")
    for key, ok in (("task", lambda v: v in TASKS), ("p1", lambda v: isinstance(v, str) and v),
                    ("max_new_tokens", lambda v: type(v) is int and v > 0)):
        if key in info and not ok(info[key]):
            raise DataError(f"{path}: bad {key} {info[key]!r}")
    return info


@dataclass
class Problem:
    prompt: str                 # x, the user message
    reference: str              # math: the answer; code: the test source; demo: one correct pair "a+b"
    kind: str                   # "math" | "code" | "demo"
    meta: dict = field(default_factory=dict)  # demo: numbers, target; humaneval: entry_point; mbpp: task_id


class DataError(ValueError):
    pass


# ------------------------------------------------------------------------------- demo task
DEMO_EVAL_SEED = 2026  # the order in which evaluation problems are drawn (any seed draws only "eval" problems)
DEMO_SPLITS = ("train", "tune", "eval")


def demo_split(numbers, target):
    """Which split a demo problem belongs to, a property of the problem itself: a hash of its numbers
    (as a set: their order is only presentation) and its target. 10% "eval", 10% "tune", 80% "train",
    so no training stream of any seed or rank can draw a problem that tuning or evaluation uses."""
    key = f"{target}:{','.join(map(str, sorted(numbers)))}"
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10
    return "eval" if h == 0 else "tune" if h == 1 else "train"


@functools.lru_cache
def demo_split_size(split, size=5, lo=1, hi=15):
    """How many distinct demo problems (up to order) `split` holds: every set of numbers and target counted."""
    count = 0
    for nums in itertools.combinations(range(lo, hi + 1), size):
        sums = collections.Counter(a + b for a, b in itertools.combinations(nums, 2))
        count += sum(demo_split(nums, t) == split for t, c in sums.items() if c == 1)
    return count


def make_demo(n, seed, split="train", size=5, lo=1, hi=15):
    """n problems of `split`: `size` distinct numbers in [lo, hi], exactly one pair of which sums to the
    target (25,564 such problems up to order, so ~2,500 each for tuning and evaluation). Finding the pair
    means searching all pairs; checking a proposed pair is one addition. "tune" and "eval" problems are
    distinct (up to order); "train" problems repeat, as training streams do."""
    if split not in DEMO_SPLITS:
        raise DataError(f"unknown demo split {split!r}: choose {', '.join(DEMO_SPLITS)}")
    if split != "train" and n > demo_split_size(split, size, lo, hi):  # said at once, not after a long search
        raise DataError(f"the demo's {split} split has {demo_split_size(split, size, lo, hi)} distinct problems; "
                        f"asked for {n}")
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(200 * n + 100_000):
        if len(out) == n:
            return out
        nums = rng.sample(range(lo, hi + 1), size)
        i, j = sorted(rng.sample(range(size), 2))
        target = nums[i] + nums[j]
        if sum(nums[a] + nums[b] == target for a in range(size) for b in range(a + 1, size)) != 1:
            continue
        if demo_split(nums, target) != split:
            continue
        key = (target, tuple(sorted(nums)))
        if split != "train":
            if key in seen:
                continue
            seen.add(key)
        prompt = f"sum {target}: {' '.join(map(str, nums))}"
        out.append(Problem(prompt, f"{nums[i]}+{nums[j]}", "demo", {"numbers": nums, "target": target}))
    if len(out) < n:
        raise DataError(f"the demo's {split} split has only about {len(out)} distinct problems; asked for {n}")
    return out


# ------------------------------------------------------------------------------- readers
MATH_FORMAT = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_FORMAT = "\nWrite your solution as a complete Python program in a ```python code block."


def read_jsonl(path):
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
        for n, row in read_jsonl(path):
            out.append(_math_problem(row, f"{path}:{n}"))
            if limit and len(out) == limit:
                break
    return out


# MBPP's split by task_id, as its README gives it (1-10 were the paper's few-shot prompts)
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}


def load_mbpp(path, limit=None):
    """MBPP JSONL: text, test_list (assert lines), test_setup_code. The prompt shows the tests,
    as the MBPP paper's prompt does; the oracle runs setup code then the asserts."""
    out = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        _need(row, ["text", "test_list"], where)
        if not isinstance(row["test_list"], list) or not all(isinstance(t, str) for t in row["test_list"]):
            raise DataError(f"{where}: test_list should be a list of strings")
        setup = row.get("test_setup_code") or ""
        tests = "\n".join([setup] + row["test_list"]) if setup else "\n".join(row["test_list"])
        prompt = f"{row['text']}\nYour code should pass these tests:\n" + "\n".join(row["test_list"]) + CODE_FORMAT
        out.append(Problem(prompt, tests, "code", {"task_id": row["task_id"]} if "task_id" in row else {}))
        if limit and len(out) == limit:
            break
    return out


def load_humaneval(path, limit=None):
    """HumanEval JSONL(.gz): the prompt is the function signature and docstring to complete; the
    oracle runs the data set's test code then check(entry_point)."""
    out = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        _need(row, ["prompt", "test", "entry_point"], where)
        prompt = ("Complete the following Python function.\n```python\n" + row["prompt"] + "```" + CODE_FORMAT)
        tests = row["test"] + f"\ncheck({row['entry_point']})\n"
        out.append(Problem(prompt, tests, "code", {"entry_point": row["entry_point"], "header": row["prompt"]}))
        if limit and len(out) == limit:
            break
    return out


def load_task(name, path=None, n=None, seed=0, split="train"):
    """Problems of a task by name: demo (generated: n problems of `split` from seed), math, mbpp, humaneval
    (read from path)."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}: choose {', '.join(TASKS)}")
    if name == "demo":
        if path is not None:  # never silently ignored
            raise DataError(f"the demo task generates its problems, it reads no file (--data {path})")
        return make_demo(n or 500, seed, split)
    if path is None:
        raise DataError(f"task {name!r} needs a data path (--data)")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    problems = {"math": load_math, "mbpp": load_mbpp, "humaneval": load_humaneval}[name](path, limit=n)
    if not problems:
        raise DataError(f"{path}: no problems found")
    return problems


# ------------------------------------------------------------------------------- held-out problems
# Training-time evaluation needs problems the run never trains on, and never the test set. MATH: 1 in 25 of the
# training file, by a hash of the problem statement (a property of the problem, as the demo's split is): ~300 of
# MATH's 7,500 training problems (~480 of the 12,000 of PRM800K's split), enough for a standard error of about
# 3 points on an accuracy near 50%, at a cost of 4% of the training data. MATH500 stays the test set. MBPP: its
# validation task ids. The demo: its "tune" split, which its training draws exclude by construction.
MATH_VALIDATION_SHARE = 25  # one problem in this many


def math_statement(problem):
    """The statement of a MATH problem as the data set gives it (the prompt without the answer format)."""
    p = problem.prompt
    return p[:-len(MATH_FORMAT)] if p.endswith(MATH_FORMAT) else p


def is_validation(task, problem):
    """Whether training must never see this problem because training-time evaluation uses it: MATH, when the
    first 8 bytes of sha256(statement), big-endian, are 0 modulo MATH_VALIDATION_SHARE; MBPP, when its task id is
    in MBPP_SPLITS["validation"] (511-600); the demo, never (its training draws hold no "tune" problem)."""
    if task == "math":
        h = hashlib.sha256(math_statement(problem).encode("utf-8")).digest()
        return int.from_bytes(h[:8], "big") % MATH_VALIDATION_SHARE == 0
    if task == "mbpp":
        lo, hi = MBPP_SPLITS["validation"]
        return lo <= problem.meta.get("task_id", 0) <= hi
    return False


def load_validation(task, path, n, seed=0):
    """The first n held-out problems for training-time evaluation: the demo's "tune" split (drawn from seed);
    for math and mbpp, the training file's problems that is_validation marks, in the file's order."""
    if task == "demo":
        return make_demo(n, seed=seed, split="tune")
    if task not in ("math", "mbpp"):
        raise DataError(f"task {task!r} has no validation problems (it is not trained on)")
    held = [p for p in load_task(task, path) if is_validation(task, p)][:n]
    if not held:
        which = (f"1 in {MATH_VALIDATION_SHARE} MATH problems, by a hash of the statement" if task == "math"
                 else "MBPP task ids {}-{}".format(*MBPP_SPLITS["validation"]))
        raise DataError(f"{path}: none of its problems is a validation problem ({which})")
    return held


def fits(tok, problem, p1, max_new_tokens, turns, max_len):
    """Whether `turns` attempts of max_new_tokens at `problem`, p1 before each after the first, fit a context of
    max_len positions (sample.max_new_that_fits)."""
    followup = len(tok.render_followup([{"role": "user", "content": p1}]))
    prompt = len(tok.render([{"role": "user", "content": problem.prompt}]))
    return max_new_tokens <= max_new_that_fits(max_len, prompt, followup, turns)


def training_problems(args, tok, max_len, say):
    """A training script's problems (args: task, data, n_train, seed, p1, max_new_tokens, turns): the task's, minus
    MBPP's test split (task ids 11-510), minus the validation problems training-time evaluation uses
    (is_validation), minus those whose attempts cannot fit the model's context of max_len positions (each with
    a count, said through `say`): never a crash mid-run."""
    try:
        # the files' tasks: the first --n-train problems once the held-out ones are out (the demo draws its n)
        problems = load_task(args.task, args.data, n=args.n_train if args.task == "demo" else None, seed=args.seed)
    except DataError as e:
        raise SystemExit(f"{args.task}: {e}") from None
    if args.task == "mbpp":
        lo, hi = MBPP_SPLITS["test"]
        kept = [p for p in problems if not lo <= p.meta.get("task_id", 0) <= hi]
        if len(kept) < len(problems):
            say(f"dropped {len(problems) - len(kept)} MBPP test-split problems (task ids {lo}-{hi}): never trained on")
        problems = kept
    held = sum(is_validation(args.task, p) for p in problems)
    if held:  # what --eval-every evaluates on, whether it is on or not: the split is the file's, fixed
        problems = [p for p in problems if not is_validation(args.task, p)]
        which = (f"1 in {MATH_VALIDATION_SHARE} by a hash of the statement" if args.task == "math" else
                 "task ids {}-{}".format(*MBPP_SPLITS["validation"]))
        say(f"held out {held} validation problems ({which}): never trained on")
    turns = max(2, getattr(args, "turns", 2))  # every row is evaluated on two attempts at least (single-turn RL too)
    kept = [p for p in problems if fits(tok, p, args.p1, args.max_new_tokens, turns, max_len)]
    if len(kept) < len(problems):
        say(f"dropped {len(problems) - len(kept)} of {len(problems)} problems whose {turns} turns of "
            f"{args.max_new_tokens} new tokens do not fit the context of {max_len} positions")
    if not kept:
        raise SystemExit(f"{args.task}: no problem left to train on")
    return kept if args.task == "demo" else kept[:args.n_train]


# ------------------------------------------------------------------------------- oracles
def program_of(problem, response):
    """The program to run for a code answer: the last ```python block. For HumanEval the prompt runs first
    in any case, as common harnesses run it: a block that only gives the body's continuation gets the
    whole prompt (the header) prepended; one that defines the entry point gets the prompt's code before
    that definition (its imports, such as `from typing import List`, and any helper it defines). "Defines" is
    one pattern for both: a line `def ENTRY(`, not a helper whose name starts with ENTRY."""
    code = reward.extract_code(response)
    if code is None:
        return None
    entry = problem.meta.get("entry_point")
    if not entry:
        return code
    header, defines = problem.meta["header"], re.compile(rf"^def\s+{re.escape(entry)}\s*\(", re.M)  # not a prefix
    if not defines.search(code):
        return header + code
    start = defines.search(header)
    return (header[:start.start()] if start else "") + code


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

