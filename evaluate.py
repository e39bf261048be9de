"""
The paper's metrics, greedy, with no feedback at test time: the model answers (turn 1), is shown
only the instruction p1, and answers again (turn 2).

    acc_t1, acc_t2   accuracy of the first and second attempt
    delta            acc_t2 - acc_t1
    delta_i2c        fraction of problems wrong at turn 1 and right at turn 2
    delta_c2i        fraction of problems right at turn 1 and wrong at turn 2
    changed          fraction of problems whose final answer changed between the turns (answers compared
                     by the task's equivalence, as majority voting compares them: 0.5 and 1/2 are one)
    verbatim         fraction of problems whose second attempt is the first one's text again (whitespace
                     at the ends aside): the edit that SFT on corrections collapses into (paper Section 4)
    edit_ratio       mean over problems of the character-level edit distance between the first and second
                     attempts over the longer one's length (0: the same text; 1: nothing shared; paper Figure 4a);
                     the JSON report also lists each problem's as edit_ratios (plot.py --edit-hist draws them)
    acc_t3, ...      with --turns N, the accuracy after each further round of p1
    scaling          with --scaling K: K samples each corrected once, majority vote, against 2K
                     independent samples, majority vote (the paper's Figure 1, right; temperature 0.7)

    python evaluate.py --ckpt out/demo1/seed0/score/ckpt --task demo --out report.json   # bash run.sh demo1's SCoRe
    python evaluate.py --ckpt A --name base --ckpt B --name SCoRe --task math --data MATH500.jsonl --markdown t.md
    torchrun --nproc_per_node=8 evaluate.py --ckpt A --task math --data MATH500.jsonl    # problems split over GPUs
    python evaluate.py --ckpt SCoRe --ckpt STaR --first-from BASE --task demo   # turn 2 on the base's first attempts (Figure 5)

p1 and max_new_tokens default to what each checkpoint was trained with (its task.json), else to
the task's. With one --ckpt the JSON report is that model's flat dict of metrics; with several, a
list of them.
"""
import argparse
import json
import sys
import time

import torch
import torch.distributed as dist

import data
import reward
import shard
from model import GPT, auto_dtype, device_error, merge_lora, warn_if_emulated, write_error
from sample import HelpFormatter, generate_turns, is_checkpoint, max_new_that_fits, seed_of
from tokenizer import Tokenizer

DEFAULT_MAX_NEW = {"demo": 16, "math": 1024, "mbpp": 1024, "humaneval": 1024}


def attempts(model, tok, problems, turns, p1, max_new_tokens, batch, k=1, temperature=0.0, seed=None,
             progress=None, first=None, ids=False):
    """Texts of each turn: a list over turns of lists over rows (problem-major, k rows per problem).
    Under torchrun each rank generates for its share of the problems and every rank gets all texts.
    progress: a label; rank 0 then prints a line per batch (problems done, rate, ETA) to stderr.
    seed: None (greedy), or an int or a tuple, the key of the sampling's randomness: each rank's chunk draws
    from a stream of its own (sample.seed_of).
    first: None, or one token list per problem (tok's ids): its first attempt, given instead of sampled
    (evaluate.py --first-from); the later turns are conditioned on it. k must then be 1.
    ids: return token lists (stop tokens kept, as generated) instead of texts."""
    if first is not None and (k != 1 or len(first) != len(problems)):
        raise ValueError(f"attempts: first needs k = 1 and one entry per problem ({len(first)} for {len(problems)})")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = problems[rank::world]
    mine_first = None if first is None else first[rank::world]
    followup = tok.render_followup([{"role": "user", "content": p1}])
    out = [[] for _ in range(turns)]
    t0 = time.time()
    for i in range(0, len(mine), batch):
        prompts = [tok.render([{"role": "user", "content": p.prompt}]) for p in mine[i:i + batch]]
        ys = generate_turns(model, prompts, followup, max_new_tokens, turns=turns, k=k, temperature=temperature,
                            stop_ids=tok.stop_ids, eot_id=tok.eot_id,
                            seed=None if seed is None else seed_of(seed, rank, i),
                            first=None if first is None else mine_first[i:i + batch])
        for t in range(turns):
            out[t] += [list(y) if ids else tok.decode([x for x in y if x not in tok.stop_ids]) for y in ys[t]]
        if progress and rank == 0:
            done, dt = min(i + batch, len(mine)), time.time() - t0
            eta = dt / done * (len(mine) - done)
            print(f"{progress}: {done}/{len(mine)} problems{' (rank 0)' if world > 1 else ''}, "
                  f"{done / dt:.2f}/s, ETA {eta // 60:.0f}m{eta % 60:02.0f}s", file=sys.stderr, flush=True)
    if world == 1:
        return out
    everyone = [None] * world  # each rank's texts, grouped per problem, back in the problems' order
    dist.all_gather_object(everyone, [[out[t][i * k:(i + 1) * k] for t in range(turns)] for i in range(len(mine))])
    return [[y for i in range(len(problems)) for y in everyone[i % world][i // world][t]] for t in range(turns)]


def levenshtein(a, b):
    """Character-level edit distance (insertions, deletions, substitutions, each 1) between two strings.
    Bit-parallel (Myers 1999, in Hyyro's form for the global distance): column j of the dynamic programme
    is held as two bit vectors of vertical +1/-1 steps, one Python integer each, so a pass over `a` costs
    len(a) big-integer operations of len(b) bits instead of len(a) * len(b) steps (~10 ms for two texts of
    3,000 characters, against ~2 s for the two-row loop)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq = {}  # character -> bit i set where b[i] is that character
    for i, c in enumerate(b):
        peq[c] = peq.get(c, 0) | (1 << i)
    mask, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, dist_ = mask, 0, m  # vertical +1 everywhere: the column of a = "" is 0, 1, ..., m
    for c in a:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)  # horizontal +1 steps (negative ints: bits above m are ignored below)
        mh = pv & xh          # horizontal -1 steps
        if ph & top:
            dist_ += 1
        elif mh & top:
            dist_ -= 1
        ph = (ph << 1) | 1    # row 0 grows by one per character of a: a +1 step enters at the bottom
        mh <<= 1
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv & mask
    return dist_


def edit_ratio(a, b):
    """Edit distance between two attempts over the longer one's length (paper Figure 4a): 0 for the same
    text, 1 for nothing in common; two empty texts 0."""
    return levenshtein(a, b) / max(len(a), len(b)) if a or b else 0.0


def metrics(problems, texts):
    """The paper's table from the texts of each turn (greedy: one row per problem)."""
    right = [data.rewards(problems, ts) for ts in texts]  # (turns, n) in {0, 1}
    n = len(problems)
    a1, a2 = right[0], right[1]
    ans1 = [data.answer_of(p, y) for p, y in zip(problems, texts[0])]
    ans2 = [data.answer_of(p, y) for p, y in zip(problems, texts[1])]
    rep = {f"acc_t{t + 1}": sum(r) / n for t, r in enumerate(right)}
    rep.update(delta=rep["acc_t2"] - rep["acc_t1"],
               delta_i2c=sum(x == 0 and y == 1 for x, y in zip(a1, a2)) / n,
               delta_c2i=sum(x == 1 and y == 0 for x, y in zip(a1, a2)) / n,
               changed=sum(changed(p, x, y) for p, x, y in zip(problems, ans1, ans2)) / n,
               verbatim=sum(x.strip() == y.strip() for x, y in zip(texts[0], texts[1])) / n,
               edit_ratio=sum(edit_ratio(x, y) for x, y in zip(texts[0], texts[1])) / n, n=n)
    for t in range(2, len(texts)):  # the paper's A.1: what each further attempt gains over the one before
        rep[f"delta_t{t}_t{t + 1}"] = rep[f"acc_t{t + 1}"] - rep[f"acc_t{t}"]
    return rep


def same_answer(problem, a, b):
    """Whether two extracted answers (data.answer_of) are the same answer: math by reward.math_equal
    (so \\frac12, 1/2 and 0.5 agree); the demo's are canonical already (the sorted pair)."""
    return reward.math_equal(a, b) if problem.kind == "math" else a == b


def changed(problem, a, b):
    """Whether the answer changed between two attempts (a, b: data.answer_of's, None for no answer): one
    gives an answer and the other none, or both give answers that are not the same answer (the
    equivalence majority voting uses: \\boxed{0.5} then \\boxed{\\frac{1}{2}} is no change)."""
    if a is None or b is None:
        return (a is None) != (b is None)
    return not same_answer(problem, a, b)


def majority_correct(problems, texts, k):
    """Accuracy of the majority answer among each problem's k texts (problem-major), voting by
    equivalence: each answer joins the first class whose representative (its first member) it
    equals, else opens a new class. Texts without an answer do not vote; a problem with no answer
    at all counts as wrong. Ties: the class whose first member appears first wins. The winning
    class is scored by its first member's text."""
    if problems and problems[0].kind == "code":
        raise ValueError("majority voting compares answers; a vote by the text of programs is meaningless")
    correct = 0.0
    for i, p in enumerate(problems):
        group = texts[i * k:(i + 1) * k]
        classes = []  # [representative answer, votes, index of its first text], in order of appearance
        for j, y in enumerate(group):
            a = data.answer_of(p, y)
            if a is None:
                continue
            for c in classes:
                if same_answer(p, a, c[0]):
                    c[1] += 1
                    break
            else:
                classes.append([a, 1, j])
        if classes:
            best = max(classes, key=lambda c: c[1])  # max keeps the first of equal counts
            correct += data.rewards([p], [group[best[2]]])[0]
    return correct / len(problems)


def scaling(model, tok, problems, K, p1, max_new_tokens, batch, seed, temperature=0.7, progress=None):
    """Paper Figure 1 (right), at its temperature 0.7: K samples each corrected once (2K generations,
    majority vote over the K second attempts) against 2K parallel first attempts (majority vote)."""
    label = lambda s: progress and f"{progress}, {s}"
    seq = attempts(model, tok, problems, 2, p1, max_new_tokens, max(1, batch // K), k=K, temperature=temperature,
                   seed=(seed, "corrected once"), progress=label(f"{K} samples corrected once"))
    par = attempts(model, tok, problems, 1, p1, max_new_tokens, max(1, batch // (2 * K)), k=2 * K,
                   temperature=temperature, seed=(seed, "parallel"), progress=label(f"{2 * K} parallel samples"))
    return {f"maj@{K}_self_corrected": majority_correct(problems, seq[1], K),
            f"maj@{2 * K}_parallel": majority_correct(problems, par[0], 2 * K)}


# ------------------------------------------------------------------------------- during training (rl.py)
def held_out(model, tok, problems, args, step, say):
    """The held-out evaluation of --eval-every: evaluate.py's greedy attempts and metrics (its batch of 64, never
    above --gen-batch; two attempts or --turns) on problems the run never trains on, as a log record: every metric
    prefixed eval_, and eval_seconds. Under torchrun the problems are split over the ranks and every rank gets every
    text, so the numbers are those one process would compute."""
    t0, turns = time.time(), max(2, args.turns)  # single-turn RL is evaluated on two attempts, as every row is
    texts = attempts(model, tok, problems, turns, args.p1, args.max_new_tokens, batch=min(64, args.gen_batch or 64),
                      progress=f"{args.label or 'eval'}: held-out" if args.max_new_tokens > 64 else None)
    rec = dict(step=step, **{f"eval_{k}": v for k, v in metrics(problems, texts).items()},
               eval_seconds=time.time() - t0)
    last = f"eval_acc_t{turns}"
    say(f"{args.label + ': ' if args.label else ''}eval step {step} | held-out acc t1 {rec['eval_acc_t1']:.1%} "
        f"t{turns} {rec[last]:.1%} (i->c {rec['eval_delta_i2c']:.1%}, c->i {rec['eval_delta_c2i']:.1%}"
        f"{' t1->t2' if turns > 2 else ''}, changed {rec['eval_changed']:.1%}) | {len(problems)} problems in "
        f"{rec['eval_seconds']:.1f} s", flush=True)
    return rec


def load_heldout(args, tok, max_len):
    """--eval-every's problems (data.load_validation: the demo's "tune" split in evaluate.py's order, so that
    `evaluate.py --split tune --n N` scores the same ones; MATH's and MBPP's held out of their training file), the
    first --eval-n of those whose attempts fit the context. A file with none: an error where --eval-every was given,
    else (the preset's default) one line, and no evaluation."""
    try:
        held = data.load_validation(args.task, args.data, None if args.task != "demo" else args.eval_n or 500,
                                    seed=data.DEMO_EVAL_SEED)
    except data.DataError as e:  # an error where asked for; where the preset turned it on, a line and no evaluation
        if any(a.startswith("--eval-every") for a in getattr(args, "argv", [])):
            raise SystemExit(f"--eval-every: {e}") from None
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"held-out evaluation off: {e}", flush=True)
        return []
    return [p for p in held if data.fits(tok, p, args.p1, args.max_new_tokens, max(2, args.turns), max_len)][:args.eval_n]


def context_error(tok, max_seq_len, problems, p1, max_new_tokens, turns):
    """None if every problem's `turns` turns fit the model's context, else a one-line message naming
    the first problem that does not fit and the largest --max-new-tokens that fits them all."""
    followup = len(tok.render_followup([{"role": "user", "content": p1}]))
    lens = [len(tok.render([{"role": "user", "content": p.prompt}])) for p in problems]
    fits = [max_new_that_fits(max_seq_len, n, followup, turns) for n in lens]
    bad = [i for i, f in enumerate(fits) if f < max_new_tokens]
    if not bad:
        return None
    i, worst = bad[0], min(range(len(fits)), key=fits.__getitem__)
    what = (f"problem {i} (counting from 0; a {lens[i]}-token prompt) does not fit {turns} turns of "
            f"{max_new_tokens} new tokens into the model's context of {max_seq_len} positions")
    if fits[worst] < 1:
        return f"{what}, and problem {worst}'s prompt ({lens[worst]} tokens) leaves no room at any --max-new-tokens"
    return f"{what}: use --max-new-tokens {fits[worst]} or less"


def given_first(first_ids, first_tok, tok):
    """--first-from's first attempts (first_tok's ids) as tok's ids: the same tokens when the tokenizers agree
    (the context is then exactly the one the other model produced), else its text (stop tokens dropped)
    encoded by tok; the turn then gets tok's end of turn (sample.generate_turns closes it)."""
    if first_tok is tok or first_tok.same_as(tok):
        return first_ids
    return [tok.encode(first_tok.decode([x for x in y if x not in first_tok.stop_ids])) for y in first_ids]


def first_context_error(tok, max_seq_len, problems, p1, max_new_tokens, turns, first):
    """None if, after each given first attempt, the later turns fit the context (as generate_turns counts a
    batch: its longest prompt and its longest first attempt), else a one-line message naming a problem."""
    followup = len(tok.render_followup([{"role": "user", "content": p1}]))
    longest = max([max_new_tokens] + [len(f) for f in first])
    for i, p in enumerate(problems):
        need = len(tok.render([{"role": "user", "content": p.prompt}])) + longest + (turns - 1) * (max_new_tokens + followup + 1)
        if need > max_seq_len:
            return (f"problem {i} (counting from 0) needs {need} positions (its prompt, the longest given first attempt "
                    f"of {longest} tokens, {turns - 1} more turn(s) of {max_new_tokens}) > the context of {max_seq_len}; "
                    "lower --max-new-tokens")
    return None


def markdown(reports):
    cols = [c for c in reports[0] if c not in ("name", "ckpt", "n", "p1", "max_new_tokens", "dtype", "first_from",
                                               "edit_ratios")]
    pct = lambda v: f"{100 * v:+.1f}" if isinstance(v, float) and v < 0 else f"{100 * v:.1f}"
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in reports:
        lines.append(f"| {r['name']} | " + " | ".join(pct(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    first = reports[0].get("first_from")
    return "\n".join(lines) + f"\n\n(percent of {reports[0]['n']} problems; edit_ratio: mean edit distance between the " \
        "attempts over the longer one's length" + (f"; turn 1 from {first}, greedy" if first else "") + ")"


METRICS = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed", "verbatim", "edit_ratio")


def later_turns(report):
    """A report's metrics of attempts 3 on (--turns 3 or more): acc_t3, delta_t2_t3, acc_t4, ..."""
    return [k for k in report if k.startswith(("acc_t", "delta_t")) and k not in METRICS]


def mean_se(xs):
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); None with one value."""
    n, m = len(xs), sum(xs) / len(xs)
    return {"mean": m, "se": (sum((x - m) ** 2 for x in xs) / (n - 1) / n) ** 0.5 if n > 1 else None, "n": n}


def over_seeds(reports, reference):
    """The table over training seeds. Each report is named ROW@SEED; a row trained once (the base) has
    no @SEED. Per row: mean and standard error of each metric over its seeds, and the paired difference
    reference - row of delta and acc_t2, seed by seed (a row trained once pairs with every seed)."""
    rows = {}  # row -> {seed or None: report}
    for r in reports:
        row, at, seed = r["name"].rpartition("@")
        row, seed = (row, seed) if at else (r["name"], None)
        if seed in rows.setdefault(row, {}):
            raise ValueError(f"two checkpoints are named {r['name']!r}")
        rows[row][seed] = r
    if reference not in rows:
        raise ValueError(f"no checkpoint is named {reference}@SEED (the reference row); rows: {', '.join(rows)}")
    ref, out = rows[reference], []
    metrics = [m for m in METRICS if all(m in r for r in reports)] + later_turns(reports[0])  # old reports lack some
    for row, runs in rows.items():
        entry = {"row": row, "seeds": sorted(s for s in runs if s is not None),
                 **{m: mean_se([r[m] for r in runs.values()]) for m in metrics}}
        if row != reference:
            seeds = [s for s in ref if s in runs or list(runs) == [None]]
            if not seeds:
                raise ValueError(f"row {row!r} shares no seed with {reference!r}: nothing to pair")
            other = lambda s: runs.get(s, runs.get(None))
            entry["paired"] = {m: mean_se([ref[s][m] - other(s)[m] for s in seeds]) for m in ("delta", "acc_t2")}
        out.append(entry)
    return out


# The paper's Table 4 ablations, each held to SCoRe's Delta; its Section 4 baselines (train_sft.py), held to
# their two failure modes. Stage I only is the demo's extra row: held to acc_t2 alone (it keeps turn 1 at
# the base, so its Delta can be large while its final accuracy is not).
ABLATIONS = ("w/o multi-turn training", "w/o Stage I", "w/o reward shaping")
SFT_ROWS = ("STaR", "Pair-SFT")


def targets(rows, reference, base="base", ablations=ABLATIONS, sft=SFT_ROWS):
    """The paper's signature as checks on the table over seeds: (what, the measured value, met). met is
    None where a check needs a standard error and there is one seed: it can be neither met nor missed.
      the base does not self-correct: Delta <= 0 and c->i above i->c;
      the reference does: Delta above 0 by more than 2 standard errors, i->c at least twice c->i, c->i at
        most 2 points, Delta at least 5 points above the base's (paired);
      its Delta above each ablation's and each SFT row's by more than 2 paired standard errors, and its
        acc_t2 at least every other row's;
      each SFT row's Delta within 3 points of 0, and its "changed" below the reference's or its i->c no
        better than the base's (the paper's two failure modes of SFT on self-generated corrections)."""
    by = {r["row"]: r for r in rows}
    ref, checks = by[reference], []
    pct = lambda x: f"{100 * x:+.1f}"
    mean = lambda row, m: by[row][m]["mean"]

    def above(what, s):  # a paired difference, met when above 0 by more than 2 standard errors
        if s["se"] is None:
            checks.append((what, f"{pct(s['mean'])} (one seed: no standard error)", None))
        else:
            checks.append((what, f"{pct(s['mean'])} +- {100 * s['se']:.1f}", s["mean"] > 2 * s["se"]))
    if base in by:
        d, i2c, c2i = (mean(base, m) for m in ("delta", "delta_i2c", "delta_c2i"))
        checks.append(("the base does not self-correct: Delta <= 0 and c->i above i->c",
                       f"{pct(d)} (i->c {100 * i2c:.1f}, c->i {100 * c2i:.1f})", d <= 0 and c2i > i2c))
    above(f"{reference} Delta above 0 by more than 2 standard errors", ref["delta"])
    i2c, c2i = mean(reference, "delta_i2c"), mean(reference, "delta_c2i")
    checks.append((f"{reference} Delta_i->c at least twice its Delta_c->i", f"{100 * i2c:.1f} vs {100 * c2i:.1f}",
                   i2c >= 2 * c2i))
    checks.append((f"{reference} Delta_c->i at most 2 points", f"{100 * c2i:.1f}", c2i <= 0.02))
    if base in by:
        d = by[base]["paired"]["delta"]["mean"]
        checks.append((f"{reference} Delta at least 5 points above the base's", pct(d), d >= 0.05))
    for r in rows:
        if r["row"] in ablations or r["row"] in sft:
            above(f"{reference} Delta above {r['row']}'s by more than 2 standard errors (paired)", r["paired"]["delta"])
    for r in rows:
        if r["row"] != reference:
            a = r["paired"]["acc_t2"]["mean"]  # the table's paired column (the same mean, rounded alike)
            checks.append((f"{reference} acc_t2 at least {r['row']}'s", pct(a), a >= 0))
    for row in sft:
        if row not in by:
            continue
        d = mean(row, "delta")
        checks.append((f"{row} Delta within 3 points of 0", pct(d), abs(d) <= 0.03))
        ch, i2c = mean(row, "changed"), mean(row, "delta_i2c")
        what = f"{row} changes less than {reference} or corrects no more than the base"
        value = f"changed {100 * ch:.1f} vs {100 * mean(reference, 'changed'):.1f}"
        ok = ch < mean(reference, "changed")
        if base in by:
            value += f"; i->c {100 * i2c:.1f} vs {100 * mean(base, 'delta_i2c'):.1f}"
            ok = ok or i2c <= mean(base, "delta_i2c")
        checks.append((what, value, ok))
    return checks


def markdown_seeds(rows, checks, reference):
    """The table over seeds (mean +- standard error, in percent), the paired differences, the checks."""
    cell = lambda s: f"{100 * s['mean']:.1f}" + (f" ± {100 * s['se']:.1f}" if s["se"] is not None else "")
    metrics = [m for m in METRICS if m in rows[0]] + later_turns(rows[0])
    lines = ["| row | seeds | " + " | ".join(metrics) + f" | {reference} - row: delta | {reference} - row: acc_t2 |",
             "|---" * (len(metrics) + 4) + "|"]
    for r in rows:
        paired = [cell(r["paired"][m]) if "paired" in r else "" for m in ("delta", "acc_t2")]
        lines.append(f"| {r['row']} | {len(r['seeds']) or 1} | " + " | ".join(cell(r[m]) for m in metrics) + " | "
                     + " | ".join(paired) + " |")
    lines += ["", "| target | measured | |", "|---|---|---|"]
    verdict = {True: "met", False: "missed", None: "not measured"}
    lines += [f"| {what} | {value} | {verdict[ok]} |" for what, value, ok in checks]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="a checkpoint directory; repeat to compare")
    p.add_argument("--name", action="append", help="a label for each --ckpt, in order (default: its path)")
    p.add_argument("--task", default="demo", choices=data.TASKS,
                   help="the problems and their oracle: demo (generated), math (MATH500), humaneval or mbpp (--data)")
    p.add_argument("--data", help="evaluation data (MATH500 JSONL, HumanEval JSONL(.gz), MBPP JSONL)")
    p.add_argument("--n", type=int, help="evaluate the first N problems (default: all; the demo generates 500)")
    p.add_argument("--seed", type=int, default=data.DEMO_EVAL_SEED, help="demo: the order its problems are drawn in")
    p.add_argument("--split", default="eval", choices=data.DEMO_SPLITS,
                   help="demo: eval (the report), tune (choosing settings); both held out from training by construction")
    p.add_argument("--turns", type=int, default=2, help="attempts per problem (p1 between each)")
    p.add_argument("--first-from", metavar="CKPT",
                   help="turn 1 from this checkpoint (greedy, its own max_new_tokens unless --max-new-tokens), turn 2 "
                        "on from each --ckpt, conditioned on it: how a model corrects first attempts that are not its own "
                        "(paper Figure 5). The first attempts are generated once and given to every --ckpt as tokens when "
                        "the tokenizers agree, else as text; --scaling still samples each model's own (default: none, "
                        "each model's own first attempt)"),
    p.add_argument("--scaling", type=int, default=0, metavar="K",
                   help="also run the inference-compute comparison (math and demo: it votes over answers)")
    p.add_argument("--scaling-temperature", type=float, default=0.7, help="sampling temperature of --scaling (the paper's)")
    p.add_argument("--max-new-tokens", type=int,
                   help="per turn (default: each checkpoint's, from its task.json; else the task's: "
                        + ", ".join(f"{t} {n}" for t, n in DEFAULT_MAX_NEW.items()) + ")")
    p.add_argument("--batch", type=int, default=64, help="problems generated together")
    p.add_argument("--p1", help="the self-correction instruction (default: each checkpoint's, from its "
                                "task.json; else the one the task trains with)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "auto"],
                   help="compute precision (autocast over fp32 weights; default: bf16 on cuda, fp32 on the cpu, so that "
                        "a CPU's numbers are exact); auto: the trainers' choice, bf16 on a GPU or a CPU with bf16 units")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda; with torchrun, each process takes cuda:LOCAL_RANK")
    p.add_argument("--out", help="write the JSON report to this file (default: none; the table is printed)")
    p.add_argument("--markdown", help="write the markdown table to this file (default: none)")
    p.add_argument("--seeds", metavar="REF",
                   help="names are ROW@SEED (a row trained once, like the base, plain ROW): also report each row's "
                        "mean +- standard error over its seeds and the paired difference REF - row, seed by seed")
    args = p.parse_args(argv)
    error = lambda msg: p.exit(2, f"{p.prog}: error: {msg}\n")  # one line, without the usage
    if args.turns < 2:
        error("--turns must be at least 2")
    for flag in ("n", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.batch < 1 or args.scaling < 0:
        error("--batch must be at least 1 and --scaling at least 0")
    for flag in ("out", "markdown"):  # checked now: the report must not be lost after the evaluation
        if getattr(args, flag) and write_error(getattr(args, flag), folder=False):
            error(f"--{flag} {getattr(args, flag)}: {write_error(getattr(args, flag), folder=False)}")
    if device_error(args.device):
        error(device_error(args.device))
    if not 0.0 < args.scaling_temperature < float("inf"):  # also false for nan
        error(f"--scaling-temperature must be positive: --scaling samples (got {args.scaling_temperature})")
    if args.scaling and args.task in ("mbpp", "humaneval"):
        error(f"--scaling votes over the answers' equivalence classes; for programs (task {args.task}) "
              "a vote by their text is meaningless")
    names = args.name or []
    if len(names) > len(args.ckpt):
        error("more --name than --ckpt")
    names += args.ckpt[len(names):]
    if args.seeds:  # a mistake in the names stops the run here, before any model runs
        try:
            over_seeds([dict(name=n, **{m: 0.0 for m in METRICS}) for n in names], args.seeds)
        except ValueError as e:
            error(f"--seeds {args.seeds}: {e}")
    infos = []
    for ckpt in args.ckpt + ([args.first_from] if args.first_from else []):
        flag = "--first-from" if ckpt is args.first_from else "--ckpt"
        if not is_checkpoint(ckpt):
            error(f"{flag} {ckpt}: not a checkpoint (no config.json and model.pt, or LoRA adapters, there)")
        try:
            infos.append(data.task_info(ckpt))
        except data.DataError as e:
            error(str(e))
    try:
        problems = data.load_task(args.task, args.data, n=args.n, seed=args.seed, split=args.split)
    except data.DataError as e:
        error(str(e))
    rank, _, device = shard.setup_distributed(args.device)  # under torchrun: problems split over the ranks
    dtype = auto_dtype(device) if args.dtype == "auto" else args.dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
    warn_if_emulated(dtype, device)
    # each checkpoint's p1 and max_new_tokens, and whether every problem fits, before any model runs
    first_info = infos.pop() if args.first_from else None
    if args.first_from:  # its Tokenizer and weights checked now too; its first attempts fit one turn of its own budget
        first_max = args.max_new_tokens or first_info.get("max_new_tokens") or DEFAULT_MAX_NEW[args.task]
        try:
            first_tok, first_cfg = Tokenizer.from_pretrained(args.first_from), GPT.from_pretrained(args.first_from).config
        except (OSError, ValueError) as e:
            error(f"--first-from {args.first_from}: {e}")
        err = context_error(first_tok, first_cfg.max_seq_len, problems, data.instruction(args.task), first_max, 1)
        if err:
            error(f"--first-from {args.first_from}: {err}")
    plans = []
    for ckpt, info in zip(args.ckpt, infos):
        p1 = args.p1 or info.get("p1") or data.instruction(args.task)
        max_new = args.max_new_tokens or info.get("max_new_tokens") or DEFAULT_MAX_NEW[args.task]
        try:  # the weights too (memory-mapped: nothing is read yet), so a damaged file stops us before any model runs
            tok, cfg = Tokenizer.from_pretrained(ckpt), GPT.from_pretrained(ckpt).config
        except (OSError, ValueError) as e:
            error(f"--ckpt {ckpt}: {e}")
        err = context_error(tok, cfg.max_seq_len, problems, p1, max_new, args.turns)
        if err:
            error(f"--ckpt {ckpt}: {err}")
        plans.append((tok, p1, max_new))
    amp = lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    first_ids = None
    if args.first_from:  # turn 1 of every problem, once, from the other checkpoint (greedy)
        model = merge_lora(GPT.from_pretrained(args.first_from, device=device, dtype=torch.float32)).eval()
        with amp():
            first_ids = attempts(model, first_tok, problems, 1, data.instruction(args.task), first_max, args.batch,
                                 progress=f"{args.first_from}: turn 1 for --first-from", ids=True)[0]
        del model
    reports = []
    for name, ckpt, (tok, p1, max_new) in zip(names, args.ckpt, plans):
        # fp32 weights, autocast computes; a LoRA checkpoint's adapters folded into its weights (no extra products)
        model = merge_lora(GPT.from_pretrained(ckpt, device=device, dtype=torch.float32)).eval()
        first = None
        if first_ids is not None:
            first = given_first(first_ids, first_tok, tok)
            err = first_context_error(tok, model.config.max_seq_len, problems, p1, max_new, args.turns, first)
            if err:
                error(f"--ckpt {ckpt} with --first-from {args.first_from}: {err}")
        with amp():
            texts = attempts(model, tok, problems, args.turns, p1, max_new, args.batch, progress=name, first=first)
        rep = {"name": name, "ckpt": ckpt, **metrics(problems, texts)}
        if args.first_from:
            rep["first_from"] = args.first_from
        if args.scaling:
            with amp():
                rep.update(scaling(model, tok, problems, args.scaling, p1, max_new, args.batch, args.seed,
                                   temperature=args.scaling_temperature, progress=name))
        reports.append({**rep, "p1": p1, "max_new_tokens": max_new, "dtype": dtype,
                        "edit_ratios": [edit_ratio(x, y) for x, y in zip(texts[0], texts[1])]})  # plot.py --edit-hist
        del model
    if dist.is_initialized():  # every rank has all texts: leave the group now, not at the interpreter's exit
        dist.destroy_process_group()
    if rank != 0:
        return
    table, result = markdown(reports), reports[0] if len(reports) == 1 else reports
    if args.seeds:
        rows = over_seeds(reports, args.seeds)
        checks = targets(rows, args.seeds)
        table = (markdown_seeds(rows, checks, args.seeds) + f"\n\n(mean ± standard error over training seeds, percent "
                 f"of {reports[0]['n']} held-out problems)\n\nEach checkpoint:\n\n" + table)
        result = {"rows": rows, "targets": [dict(target=w, measured=v, met=ok) for w, v, ok in checks],
                  "checkpoints": reports}
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote the report to {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
        print(f"wrote the table to {args.markdown}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line, not a traceback: nothing was written
        raise SystemExit("evaluate.py: stopped by Ctrl-C (SIGINT) before the report was written; run the same command "
                         "again to evaluate from the start") from None
