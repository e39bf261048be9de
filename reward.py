"""
The oracles: the reward r(y) in {0, 1} that SCoRe trains on (and that evaluation reports).
An oracle that is lenient gets gamed, one that crashes or hangs stops training, and one that runs
model-written code carelessly endangers the machine. So each oracle here is strict, bounded in
time, never raises, and never evaluates an answer as Python.

    math   extract_boxed(text), math_equal(pred, ref), math_reward(response, ref)
    code   extract_code(text), run_code(program, tests), run_code_batch(jobs)
    demo   extract_pair(text), pair_sum_equal(text, numbers, target)

This file imports nothing from the project (stdlib + sympy, imported at the first symbolic comparison:
the demo and code tasks never load it) and runs on Linux (it forks). The sandbox's child program is a file
of its own, sandbox_harness.py, which this file reads when imported: copy the two together.
"""
import marshal
import math
import os
import random
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

sympy = None  # the module, once _load_sympy has run (about 0.6 s of every start otherwise)

# ------------------------------------------------------------------------------- math: extraction

def extract_boxed(text):
    """The content of the last complete \\boxed{...} (or \\fbox{...}) in text, nested braces
    included; `\\boxed 5` gives "5". None when there is none."""
    if not isinstance(text, str):
        return None
    close, stack = {}, []  # one linear pass pairs every brace, so any input costs O(len)
    for i, c in enumerate(text):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            close[stack.pop()] = i
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])", text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            if i in close:
                return text[i + 1:close[i]].strip()
        elif i > m.end():  # "\boxed 5": up to the next space or $
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                return word.group(0)
    return None


# ------------------------------------------------------------------------------- math: normalization
# The usual MATH normalizations (Hendrycks et al. 2021, PRM800K), as plain string rewrites.

MATH_TIMEOUT = 1.0    # seconds for the symbolic comparison, in a forked child killed on overrun
MAX_ANSWER = 1000     # longer answers are compared as exact text only
_LHS = re.compile(r"^([a-zA-Z](?:_\{?\w+\}?)?)\s*=(?!=)\s*(?=[^=]*$)")
_UNITS = (r"(?:(?:square|sq|cubic)\s+)?(?:units?|cm|centimeters?|mm|millimeters?|m|meters?|km|kilometers?"
          r"|in|inch(?:es)?|ft|feet|foot|yards?|yd|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|s"
          r"|days?|weeks?|months?|years?|degrees?|radians?|dollars?|cents?|pounds?|lbs?|ounces?|oz"
          r"|grams?|g|kg|kilograms?|liters?|L|ml|gallons?|points?|people|persons?|students?|ways)")
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname|boldsymbol)"
_REPLACE = [("\\displaystyle", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\dbinom", "\\binom"),
            ("\\tbinom", "\\binom"), ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("°", ""),
            ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("~", " "),
            ("\\qquad", " "), ("\\quad", " "), ("{,}", ","), ("\\langle", "("), ("\\rangle", ")"),
            ("\\varnothing", "\\emptyset"), ("\\infinity", "\\infty"), ("\\degree", "")]


def _normalize(s):
    """Rewrite an answer so that equal answers written differently mostly become the same string."""
    for a, b in _REPLACE:
        s = s.replace(a, b)
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # a "\ " space, but not the "\\" of a matrix row
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])\.?", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ", "", s)  # degrees
    unit = re.sub(_TEXT_CMD + r"\{\s*" + _UNITS + r"\s*\}(?:\^\{?[23]\}?)?", "", s)  # 5\text{ cm}^2
    s = unit if unit.strip() else s
    for _ in range(3):  # \text{...} and friends: keep the content
        s = re.sub(_TEXT_CMD + r"\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    unit = re.sub(r"(?<=\S)\s+" + _UNITS + r"(?:\^\{?[23]\}?)?$", "", s)  # 5 cm
    s = unit if unit else s
    s = re.sub(r"\s+(?:or|and)\s+", ", ", s)  # "x = 1 or x = 2"
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d{1,3}(?: \d{3})+", s):  # 1,000 and 1\,000
        s = s.replace(",", "").replace(" ", "")
    s = re.sub(r"(?<![a-zA-Z\\])inf(?:inity)?(?![a-zA-Z])", r"\\infty", s)
    s = re.sub(r"^\(([A-Z])\)$", r"\1", s)  # multiple choice: (B) -> B
    s = re.sub(r"(\d)_\{(\d+)\}", r"\1_\2", s)  # a base: 101_{2} -> 101_2
    s = _LHS.sub("", s)  # a leading "x =" (when it is the only =)
    return s.strip()


def _number(s):
    """s as an exact Fraction when it is a plain integer, decimal, a/b, \\frac{a}{b} or a mixed
    number 2\\frac{1}{2}; else None. The in-process fast path: no sympy."""
    if len(s) > 200:
        return None
    s = s.replace(" ", "")
    if re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)", s):
        return Fraction(s)
    m = (re.fullmatch(r"([+-]?)(\d+)/(\d+)", s) or re.fullmatch(r"([+-]?)\\frac\{(\d+)\}\{(\d+)\}", s)
         or re.fullmatch(r"([+-]?)\\frac(\d)(\d)", s))
    if m and int(m.group(3)):
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) == "-" else 1)
    m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m and int(m.group(4)):
        return (int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))) * (-1 if m.group(1) else 1)
    return None


# ------------------------------------------------------------------------------- math: LaTeX -> sympy
# A small recursive-descent parser that builds sympy objects node by node. sympify / parse_expr
# would call eval on the text: never on a model's answer.

_TOKENS = re.compile(r"\d+\.?\d*|\.\d+|\\[a-zA-Z]+|\\.|\S")
_FUNCS = {"sin": "sin", "cos": "cos", "tan": "tan", "sec": "sec", "csc": "csc", "cot": "cot",  # sympy's names
          "arcsin": "asin", "arccos": "acos", "arctan": "atan", "ln": "log", "log": "log", "exp": "exp"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
          "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
          "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
_MAX_BITS = 100_000   # a number literal or a power of numbers bigger than this is not an answer


def _num(tok):
    if sum(c.isdigit() for c in tok) > 200:
        raise ValueError("number too long")
    f = Fraction(tok)
    return sympy.Rational(f.numerator, f.denominator)


def _pow(base, exp):
    """base ** exp, refusing powers of numbers too big to compute (9^{9^{9^9}})."""
    if base.is_number and exp.is_Rational and base not in (0, 1, -1):
        size = abs(exp.p) // exp.q
        if base.is_Rational:
            size *= max(abs(base.p).bit_length(), base.q.bit_length())
        if size > _MAX_BITS:
            raise ValueError("power too large")
    return sympy.Pow(base, exp)


def _factorial(n):
    if n.is_number and not (n.is_Integer and 0 <= n <= 1000):
        raise ValueError("factorial out of range")
    return sympy.factorial(n)


def _binom(n, k):
    if n.is_number and not (n.is_Integer and abs(n) <= 1000):
        raise ValueError("binomial out of range")
    return sympy.binomial(n, k)


def _parse(s):
    """A LaTeX expression -> a sympy expression: numbers, + - * / ^, \\frac, \\sqrt, \\sqrt[n],
    \\pi, e, i, \\infty, implicit multiplication, letters (with subscripts), greek letters,
    parentheses, |x|, n!, \\binom, \\cdot, \\times, \\div, and a few functions. ValueError if not."""
    toks = _TOKENS.findall(s)
    if not toks or len(toks) > 400:
        raise ValueError("empty or too long")
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take(want=None):
        nonlocal pos
        t = peek()
        if t is None or (want is not None and t != want):
            raise ValueError(f"expected {want!r} at token {pos}, got {t!r}")
        pos += 1
        return t

    def starts_atom(t):
        return (t[0].isdigit() or t[0] == "." or t.isalpha() or t in ("(", "{")
                or t[1:] in _FUNCS or t[1:] in _GREEK or t in ("\\frac", "\\sqrt", "\\pi", "\\infty", "\\binom"))

    def expr():  # a sum of terms
        node = term()
        while peek() in ("+", "-"):
            node = node + term() if take() == "+" else node - term()
        return node

    def term():  # a product, explicit or implicit (2x, 3\sqrt{2}, x(x+1))
        node = unary()
        while (t := peek()) is not None:
            if t in ("*", "\\cdot", "\\times"):
                take()
                node = node * unary()
            elif t in ("/", "\\div"):
                take()
                node = node / unary()
            elif starts_atom(t):
                node = node * power()
            else:
                break
        return node

    def unary():
        if peek() in ("-", "+"):
            return -unary() if take() == "-" else unary()
        return power()

    def power():  # x^2, x^{n+1}, x^-1
        node = atom()
        while peek() == "!":
            take()
            node = _factorial(node)
        if peek() == "^":
            take()
            node = _pow(node, -arg() if peek() == "-" and take() else arg())
        return node

    def arg():  # a macro argument: {group} or one character (\frac12, x^23 = x^2 * 3)
        t = peek()
        if t == "{":
            take()
            node = expr()
            take("}")
            return node
        if t is not None and t[0].isdigit() and len(t) > 1:
            toks[pos] = t[1:]
            return _num(t[0])
        return atom()

    def name():  # a letter with an optional subscript: x, x_1, a_{n+1}
        t = take()
        if peek() != "_":
            return t
        take()
        if peek() != "{":
            sub = take()
            if sub[0].isdigit() and len(sub) > 1:
                toks.insert(pos, sub[1:])
                sub = sub[0]
            return f"{t}_{sub}"
        take()
        sub = []
        while peek() != "}":
            sub.append(take())
        take("}")
        return f"{t}_{''.join(sub)}"

    def atom():
        t = peek()
        if t is None:
            raise ValueError("unexpected end")
        if t[0].isdigit() or t[0] == ".":
            return _num(take())
        if t.isalpha():
            n = name()
            return {"e": sympy.E, "i": sympy.I}.get(n) or sympy.Symbol(n)
        take()
        if t in ("(", "[", "{"):
            node = expr()
            take({"(": ")", "[": "]", "{": "}"}[t])
            return node
        if t == "|":
            node = expr()
            take("|")
            return sympy.Abs(node)
        if t == "\\frac":
            num = arg()
            return num / arg()
        if t == "\\sqrt":
            if peek() == "[":
                take()
                n = expr()
                take("]")
                return sympy.root(arg(), n)
            return sympy.sqrt(arg())
        if t == "\\binom":
            n = arg()
            return _binom(n, arg())
        if t == "\\pi":
            return sympy.pi
        if t == "\\infty":
            return sympy.oo
        if t[1:] in _GREEK:
            return sympy.Symbol(t[1:])
        if t[1:] in _FUNCS:  # \sin x, \sin^2 x, \log_2 8, \ln(x)
            base = exp = None
            if t == "\\log" and peek() == "_":
                take()
                base = arg()
            if peek() == "^":
                take()
                exp = arg()
            x = power()
            node = getattr(sympy, _FUNCS[t[1:]])(x) if base is None else sympy.log(x, base)
            return node if exp is None else _pow(node, exp)
        raise ValueError(f"unknown token {t!r}")

    node = expr()
    if pos != len(toks):
        raise ValueError(f"unexpected {toks[pos]!r}")
    return node


# ------------------------------------------------------------------------------- math: structure
# An answer is an expression, or a structure of them:
#   ("expr", e)                 an expression
#   ("tuple", "(]", items)      ordered: points, vectors, intervals; brackets must match exactly
#   ("set", items)              unordered, compared as multisets: \{1, 2\}, and a bare list of
#                               solutions "1, 2" (the reference's "1, 2" accepts "2, 1")
#   ("union", items)            intervals joined by \cup, unordered
#   ("matrix", rows)            pmatrix / bmatrix, shape and entries
#   ("eq", [lhs, rhs])          an equation that is not a leading "x =" (e.g. a plane), side by side
#   ("text", word)              a word answer (Monday), case-insensitive

def _split(s, sep=","):
    """Split s at each sep that lies outside all brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i].strip())
            i += len(sep)
            start = i
            continue
        i += 1
    return parts + [s[start:].strip()]


def _encloses(s):
    """Whether the bracket that opens s closes at its very end: (1, 2] yes, (1)(2) no."""
    depth = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0 and i != len(s) - 1:
                return False
    return depth == 0


def _structure(s):
    s = s.strip()
    if s.count("\\pm") == 1:
        return ("set", [_structure(s.replace("\\pm", "+")), _structure(s.replace("\\pm", "-"))])
    m = re.fullmatch(r"\\begin\{([pbBvV]?matrix)\}(.*)\\end\{\1\}", s, re.S)
    if m:
        rows = [r for r in m.group(2).split("\\\\") if r.strip()]
        return ("matrix", [[_structure(c) for c in r.split("&")] for r in rows])
    parts = _split(s, "\\cup")
    if len(parts) > 1:
        return ("union", [_structure(p) for p in parts])
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s):
        inner = s[2:-2].strip()
        return ("set", [_structure(p) for p in _split(inner)] if inner else [])
    if s == "\\emptyset":
        return ("set", [])
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and _encloses(s):
        items = _split(s[1:-1])
        if len(items) > 1:
            return ("tuple", s[0] + s[-1], [_structure(p) for p in items])
    items = _split(s)
    if len(items) > 1:  # "x = 1, x = 2" is the list 1, 2; "a = 1, b = 2" stays a list of equations
        names = {m.group(1) if (m := _LHS.match(p)) else None for p in items}
        if len(names) == 1 and None not in names:
            items = [_LHS.sub("", p) for p in items]
        return ("set", [_structure(p) for p in items])
    sides = _split(s, "=")
    if len(sides) == 2:
        return ("eq", [_structure(p) for p in sides])
    if re.fullmatch(r"[A-Za-z][A-Za-z ]{2,}", s):
        return ("text", s.lower().replace(" ", ""))
    return ("expr", _parse(s))


def _value(e, subs):
    """e as a finite Python complex at the point subs, or None."""
    try:
        v = complex(e.evalf(30, subs=subs))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None
    return v if math.isfinite(v.real) and math.isfinite(v.imag) else None


def _expr_equal(a, b):
    """Exact for rationals; otherwise numerically at 30 digits (relative 1e-9), at four fixed
    random points of both signs when there are variables."""
    if a.has(sympy.nan, sympy.zoo) or b.has(sympy.nan, sympy.zoo):  # 1/0 is no answer
        return False
    if a == b:
        return True
    if a.is_Rational and b.is_Rational:
        return False
    syms = sorted(a.free_symbols | b.free_symbols, key=str)
    rng = random.Random(0)
    checked = 0
    for k in range(4 if syms else 1):  # all positive, all negative, then mixed signs
        subs = {x: sympy.Float((1, -1, rng.choice((-1, 1)), rng.choice((-1, 1)))[k] * rng.uniform(0.5, 3), 30)
                for x in syms}
        va, vb = _value(a, subs), _value(b, subs)
        if va is None or vb is None:
            continue
        if abs(va - vb) > 1e-9 * max(abs(va), abs(vb)) + 1e-20:
            return False
        checked += 1
    return checked > 0


def _same(u, v):
    (ku, *xu), (kv, *xv) = u, v
    if ku == "expr" and kv == "expr":
        return _expr_equal(xu[0], xv[0])
    if ku == "set" and kv == "set" or ku == kv == "union":
        left = list(xv[0])
        if len(left) != len(xu[0]):
            return False
        for x in xu[0]:
            j = next((j for j, y in enumerate(left) if _same(x, y)), None)
            if j is None:
                return False
            del left[j]
        return True
    if ku == kv == "tuple":
        return xu[0] == xv[0] and len(xu[1]) == len(xv[1]) and all(map(_same, xu[1], xv[1]))
    if ku == kv == "eq":
        return all(map(_same, xu[0], xv[0]))
    if ku == kv == "matrix":
        return ([len(r) for r in xu[0]] == [len(r) for r in xv[0]]
                and all(_same(x, y) for ru, rv in zip(xu[0], xv[0]) for x, y in zip(ru, rv)))
    return ku == kv == "text" and xu[0] == xv[0]


def _load_sympy():
    global sympy
    if sympy is None:
        import sympy as module
        sympy = module


def _symbolic_equal(a, b):
    _load_sympy()  # math_equal has it loaded before it forks a child to run this
    depth = max_depth = 0
    for c in a + b:
        depth += (c in "([{") - (c in ")]}")
        max_depth = max(max_depth, depth)
    if max_depth > 50:  # thousands of nested braces: not an answer
        return False
    try:
        return _same(_structure(a), _structure(b))
    except (ValueError, TypeError, ArithmeticError, RecursionError, AttributeError):  # not parsed: not equal
        return False


# ------------------------------------------------------------------------------- math: the deadline

def _limit_memory(extra=2 << 30):
    """Cap this process's address space at its current size plus `extra` bytes (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (OSError, ValueError):
        pass


def _bounded(fn, a, b, timeout):
    """fn(a, b) -> bool, run in a forked child that is killed at the timeout: sympy cannot be
    interrupted from inside (a huge integer power is one C call), a process can. None on overrun."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack
        try:
            os.close(r)
            _limit_memory()
            os.write(w, b"1" if fn(a, b) else b"0")
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    try:
        sel = selectors.DefaultSelector()
        sel.register(r, selectors.EVENT_READ)
        if sel.select(timeout):
            out = os.read(r, 1)
        sel.close()
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):  # already reaped (SIGCHLD ignored)
            pass
    return {b"1": True, b"0": False}.get(out)


_warm = []


def math_equal(pred, ref, timeout=MATH_TIMEOUT):
    """Whether the answer pred equals the reference answer ref (MATH style). Normalizes both, then
    exact text, then exact fractions, then a symbolic comparison in a child process that is killed
    after `timeout` seconds (-> False). Never raises; returns within about timeout + 0.1 s."""
    try:
        if not isinstance(pred, str) or not isinstance(ref, str):
            return False
        if len(pred) > MAX_ANSWER or len(ref) > MAX_ANSWER:
            return pred.strip() == ref.strip()
        a, b = _normalize(pred), _normalize(ref)
        if not a or not b:
            return False
        if a.replace(" ", "") == b.replace(" ", ""):
            return True
        x, y = _number(a), _number(b)
        if x is not None and y is not None:
            return x == y
        if not _warm:  # sympy fills caches and imports lazily: once here, not in every child
            _warm.append(_symbolic_equal("\\sqrt{x^2}+3+4i+\\frac{1}{2}", "|x|+4i+\\frac{7}{2}"))
        return _bounded(_symbolic_equal, a, b, timeout) is True
    except Exception:
        return False


def math_reward(response, ref):
    """1.0 if the last \\boxed{} answer of the response equals ref, else 0.0."""
    pred = extract_boxed(response)
    return float(pred is not None and math_equal(pred, ref))


# ------------------------------------------------------------------------------- code: the sandbox
# run_code runs a program, then its tests, in a child Python (`-I -S`: no PYTHON* variables, no
# user site, no .pth files) in a fresh empty working directory, with a minimal environment, its
# own session (process group), and limits on CPU time, memory, file size, processes and open
# files. The parent kills the whole group at the timeout and after completion, and keeps only the
# tail of the output. The harness below defends the verdict:
# - a pass is the parent's random nonce, written to a pipe only after the tests ran to their
#   end. It arrives on stdin (an unnamed file) and lives only in a local of main(); an audit hook
#   (permanent once added) denies reading other frames (sys._getframe, tb_frame, gi_frame, gc,
#   ctypes, /proc/self/mem, tracing). Exiting early or raising anything yields no nonce, and
#   whatever the program prints or writes to any fd cannot equal it;
# - the tests get their own namespace: the program's names that shadow builtins are dropped, its
#   functions and classes are called through guard(), which fails the run unless what they return
#   (and the arguments after the call) is built-in data (no __eq__ of the program's) and the
#   builtins, the preloaded modules, their classes and sys.modules are unchanged;
# - the hook also denies processes, signals, sockets, os.kill, setrlimit, chdir, writes outside
#   the working directory and reads outside the standard library and site-packages.
# What it cannot stop is in README.md: run untrusted training inside a container.

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_harness.py")) as _f:
    _HARNESS = _f.read()  # the child's program, a file of its own to be read as one (copy it with reward.py)
_SITE = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
OUTPUT_CAP = 1 << 14  # bytes of the child's output kept (its tail)


def sandbox_run(program, tests, timeout=10.0, memory_mb=1024):
    """Run program then tests in the sandbox; (passed, the tail of the child's stdout + stderr)."""
    nonce = secrets.token_hex(16)
    home = tempfile.mkdtemp(prefix="score-sandbox-")
    r, w = os.pipe()
    job = {"program": program, "tests": tests, "nonce": nonce, "fd": w, "dir": home, "path": _SITE,
           "cpu": math.ceil(timeout) + 1, "mem": memory_mb << 20, "fsize": 16 << 20}
    proc, out, verdict = None, bytearray(), bytearray()
    try:
        with tempfile.TemporaryFile() as stdin:  # unnamed: only the child's fd 0 can read it
            stdin.write(marshal.dumps(job))
            stdin.seek(0)
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HARNESS, f"parent={os.getpid()}"],
                                    stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=home,
                                    env={"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home},
                                    pass_fds=(w,), start_new_session=True)
        os.close(w)
        w = -1
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(r, selectors.EVENT_READ, verdict)
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data is out:
                    out += chunk
                    del out[:-OUTPUT_CAP]
                elif len(verdict) < 1024:
                    verdict += chunk
        sel.close()
    finally:
        if proc is not None:
            for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):  # the group, then itself
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
            proc.stdout.close()
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(home, ignore_errors=True)
    passed = proc.returncode == 0 and bytes(verdict) == nonce.encode()
    return passed, out.decode("utf-8", "replace")


def run_code(program, tests, timeout=10.0):
    """True only when every test ran to its end and passed. tests is Python source run after the
    program: MBPP's asserts (setup code first), or HumanEval's test code then check(entry_point)."""
    try:
        return sandbox_run(program, tests, timeout)[0]
    except Exception:
        return False


def run_code_batch(jobs, timeout=10.0, workers=None):
    """run_code over a list of (program, tests), several child processes at a time."""
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run_code(job[0], job[1], timeout), jobs))


def extract_code(text):
    """The last complete ```python (or untagged ```) block of a response; None if there is none."""
    if not isinstance(text, str):
        return None
    blocks = re.findall(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", text, re.S)
    code = [body for lang, body in blocks if lang.lower() in ("", "python", "py", "python3")]
    return code[-1] if code else None


# ------------------------------------------------------------------------------- demo: two-sum

def extract_pair(text):
    """The last "a+b" (digits, optional spaces around +) in text as (a, b); None if there is none
    or it has more than 12 digits on a side."""
    if not isinstance(text, str):
        return None
    last = None
    for last in re.finditer(r"(?<!\d)(?=(\d++)\s*+\+\s*+(\d++))", text):  # overlapping, linear time
        pass
    if last is None or len(last.group(1)) > 12 or len(last.group(2)) > 12:
        return None
    return int(last.group(1)), int(last.group(2))


def pair_sum_equal(text, numbers, target):
    """Whether the response is exactly one pair a+b (spaces around the numbers and the + aside, nothing
    else: the task's answer is one pair, so a pair among junk, such as " 20 9+ 13" or " 4+ 8+ 2", is
    wrong) that names two distinct entries of numbers (a == b needs the value twice) summing to target."""
    try:
        pair = re.fullmatch(r"\s*+(\d{1,12})\s*+\+\s*+(\d{1,12})\s*+", text)
        if pair is None:
            return False
        a, b = map(int, pair.groups())
        count = Counter(numbers)
        return a + b == target and count[a] >= 1 + (a == b) and count[b] >= 1
    except Exception:
        return False
