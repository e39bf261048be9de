"""
The paper's metrics, greedy, with no feedback at test time: the model answers (turn 1), is shown
only the instruction p1, and answers again (turn 2).

    acc_t1, acc_t2   accuracy of the first and second attempt
    delta            acc_t2 - acc_t1
    delta_i2c        fraction of problems wrong at turn 1 and right at turn 2
    delta_c2i        fraction of problems right at turn 1 and wrong at turn 2
    changed          fraction of problems whose final answer changed between the turns
    acc_t3, ...      with --turns N, the accuracy after each further round of p1
    scaling          with --scaling K: K samples each corrected once, majority vote, against 2K
                     independent samples, majority vote (the paper's Figure 1, right)

    python evaluate.py --ckpt out/demo/base --task demo --out report.json
    python evaluate.py --ckpt A --name base --ckpt B --name SCoRe --task math --data MATH500.jsonl --markdown t.md
    torchrun --nproc_per_node=8 evaluate.py --ckpt A --task math --data MATH500.jsonl    # problems split over GPUs

With one --ckpt the JSON report is that model's flat dict of metrics; with several, a list of them.
"""
import argparse
import json
from collections import Counter

import torch
import torch.distributed as dist

import data
import rl
from model import GPT
from sample import generate_turns
from tokenizer import Tokenizer

DEFAULT_MAX_NEW = {"demo": 16, "math": 1024, "mbpp": 1024, "humaneval": 1024}


def attempts(model, tok, problems, turns, p1, max_new_tokens, batch, k=1, temperature=0.0, seed=None):
    """Texts of each turn: a list over turns of lists over rows (problem-major, k rows per problem).
    Under torchrun each rank generates for its share of the problems and every rank gets all texts."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = problems[rank::world]
    followup = tok.render_followup([{"role": "user", "content": p1}])
    out = [[] for _ in range(turns)]
    for i in range(0, len(mine), batch):
        prompts = [tok.render([{"role": "user", "content": p.prompt}]) for p in mine[i:i + batch]]
        ys = generate_turns(model, prompts, followup, max_new_tokens, turns=turns, k=k, temperature=temperature,
                            stop_ids=tok.stop_ids, eot_id=tok.eot_id,
                            seed=None if seed is None else seed + 7919 * rank + i)
        for t in range(turns):
            out[t] += [tok.decode([x for x in y if x not in tok.stop_ids]) for y in ys[t]]
    if world == 1:
        return out
    everyone = [None] * world  # each rank's texts, grouped per problem, back in the problems' order
    dist.all_gather_object(everyone, [[out[t][i * k:(i + 1) * k] for t in range(turns)] for i in range(len(mine))])
    return [[y for i in range(len(problems)) for y in everyone[i % world][i // world][t]] for t in range(turns)]


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
               changed=sum(x != y for x, y in zip(ans1, ans2)) / n, n=n)
    return rep


def majority_correct(problems, texts, k):
    """Accuracy of the most common answer among each problem's k texts (ties: the first seen)."""
    correct = 0
    for i, p in enumerate(problems):
        group = texts[i * k:(i + 1) * k]
        answers = [data.answer_of(p, y) for y in group]
        counts = Counter(a for a in answers if a is not None)
        if counts:
            best = counts.most_common(1)[0][0]
            correct += data.rewards([p], [group[answers.index(best)]])[0]
    return correct / len(problems)


def scaling(model, tok, problems, K, p1, max_new_tokens, batch, seed):
    """Paper Figure 1 (right): K samples each corrected once (2K generations) against 2K parallel samples."""
    seq = attempts(model, tok, problems, 2, p1, max_new_tokens, max(1, batch // K), k=K, temperature=1.0, seed=seed)
    par = attempts(model, tok, problems, 1, p1, max_new_tokens, max(1, batch // (2 * K)), k=2 * K,
                   temperature=1.0, seed=seed + 1)
    return {f"maj@{K}_self_corrected": majority_correct(problems, seq[1], K),
            f"maj@{2 * K}_parallel": majority_correct(problems, par[0], 2 * K)}


def markdown(reports):
    cols = [c for c in reports[0] if c not in ("name", "ckpt", "n")]
    pct = lambda v: f"{100 * v:+.1f}" if isinstance(v, float) and v < 0 else f"{100 * v:.1f}"
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in reports:
        lines.append(f"| {r['name']} | " + " | ".join(pct(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + f"\n\n(percent of {reports[0]['n']} problems)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="a checkpoint directory; repeat to compare")
    p.add_argument("--name", action="append", help="a label for each --ckpt, in order")
    p.add_argument("--task", default="demo", help="demo | math | mbpp | humaneval")
    p.add_argument("--data", help="evaluation data (MATH500 JSONL, HumanEval JSONL(.gz), MBPP JSONL)")
    p.add_argument("--n", type=int, help="evaluate the first N problems (demo: how many to generate; default 500)")
    p.add_argument("--seed", type=int, default=data.DEMO_EVAL_SEED, help="demo problems' seed (held out from training)")
    p.add_argument("--turns", type=int, default=2, help="attempts per problem (p1 between each)")
    p.add_argument("--scaling", type=int, default=0, metavar="K", help="also run the inference-compute comparison")
    p.add_argument("--max-new-tokens", type=int, help="per turn (default: the task's)")
    p.add_argument("--batch", type=int, default=64, help="problems generated together")
    p.add_argument("--p1", help="the self-correction instruction (default: the one the task trains with)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--markdown", help="write the markdown table here")
    args = p.parse_args(argv)
    if args.turns < 2:
        p.error("--turns must be at least 2")
    names = args.name or []
    if len(names) > len(args.ckpt):
        p.error("more --name than --ckpt")
    names += args.ckpt[len(names):]
    try:
        problems = data.load_task(args.task, args.data, n=args.n, seed=args.seed)
    except data.DataError as e:
        p.error(str(e))
    p1 = args.p1 or data.instruction(args.task)
    rank, _, device = rl.setup_distributed(args.device)  # under torchrun: problems split over the ranks
    args.device = device
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW.get(args.task, 1024)
    reports = []
    for name, ckpt in zip(names, args.ckpt):
        dtype = torch.bfloat16 if str(args.device).startswith("cuda") else None
        model = GPT.from_pretrained(ckpt, device=args.device, dtype=dtype).eval()
        tok = Tokenizer.from_pretrained(ckpt)
        texts = attempts(model, tok, problems, args.turns, p1, max_new, args.batch)
        rep = {"name": name, "ckpt": ckpt, **metrics(problems, texts)}
        if args.scaling:
            rep.update(scaling(model, tok, problems, args.scaling, p1, max_new, args.batch, args.seed))
        reports.append(rep)
        if rank == 0:
            print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rep.items() if isinstance(v, float)), flush=True)
    if rank != 0:
        return
    table = markdown(reports)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(reports[0] if len(reports) == 1 else reports, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
