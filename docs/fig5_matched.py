"""The demo's Figure-5 measurement per problem (docs/RESULTS.md): for each training seed, each row's two
attempts on its own first attempts and on its seed's base's (evaluate.py --first-from), greedy, on the
eval split, with evaluate.py's own functions, and which problems each first and second attempt got right.

    python docs/fig5_matched.py --demo /work/demo_run/demo --out fig5_matched.json
    python docs/fig5_matched.py --table fig5_matched.json     # its table again

It prints, per row, the rates that do not depend on how many first attempts are wrong: the share of
wrong first attempts fixed (i->c / (1 - acc_t1)) and of right ones broken (c->i / acc_t1), over all
problems and over the problems on which both first attempts (the row's and the base's) are wrong (or
both right), so that the two sources are compared on the same problems."""
import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/docs/", 1)[0])
import data  # noqa: E402
from evaluate import attempts, given_first, mean_se, metrics  # noqa: E402
from model import GPT, auto_dtype, merge_lora  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

ROWS = {"SCoRe": "score/ckpt", "STaR": "star/ckpt", "Pair-SFT": "pair/ckpt"}


def ms(xs):
    m = mean_se(list(xs))
    return m["mean"], m["se"] or 0.0


def rate(num, den):
    return sum(num) / max(1, sum(den))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", help="bash run.sh's OUT/demo (seed0, seed1, ... in it)")
    p.add_argument("--table", metavar="JSON", help="only print the table of an earlier --out")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out")
    args = p.parse_args()
    if args.table:
        with open(args.table) as f:
            return report(json.load(f))
    if not (args.demo and args.out):
        p.error("--demo and --out (or --table)")
    problems = data.load_task("demo", None, n=args.n, seed=data.DEMO_EVAL_SEED, split="eval")
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto_dtype("cpu") == "bf16")
    out = {"dtype": auto_dtype("cpu"), "n": len(problems), "seeds": {}}
    for s in args.seeds.split(","):
        d = f"{args.demo}/seed{s}"
        info = data.task_info(f"{d}/base")
        btok = Tokenizer.from_pretrained(f"{d}/base")
        model = merge_lora(GPT.from_pretrained(f"{d}/base", dtype=torch.float32)).eval()
        with amp():
            base_ids = attempts(model, btok, problems, 1, data.instruction("demo"), info["max_new_tokens"], 64,
                                ids=True)[0]
        base_right = data.rewards(problems, [btok.decode([x for x in y if x not in btok.stop_ids]) for y in base_ids])
        out["seeds"][s] = {"base_t1": base_right}
        for row, sub in ROWS.items():
            ckpt = f"{d}/{sub}"
            info, tok = data.task_info(ckpt), Tokenizer.from_pretrained(ckpt)
            model = merge_lora(GPT.from_pretrained(ckpt, dtype=torch.float32)).eval()
            rec = {}
            for how, first in (("own", None), ("base", given_first(base_ids, btok, tok))):
                with amp():
                    texts = attempts(model, tok, problems, 2, info["p1"], info["max_new_tokens"], 64, first=first)
                rec[how] = {"t1": data.rewards(problems, texts[0]), "t2": data.rewards(problems, texts[1]),
                            "metrics": metrics(problems, texts)}
            assert rec["base"]["t1"] == base_right
            out["seeds"][s][row] = rec
            print(f"seed {s} {row}: done", file=sys.stderr, flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f)
    report(out)


def report(out):
    """Per row, mean over seeds of the fix and break rates, own against the base's first attempts."""
    print("| row | first attempts | fix: all wrong t1 | fix: both wrong | break: all right t1 | break: both right | "
          "n both wrong | n both right |")
    print("|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        table = {}
        for how in ("own", "base"):
            vals = []
            for s, rec in out["seeds"].items():
                own, b = rec[row]["own"]["t1"], rec["base_t1"]
                t1, t2 = rec[row][how]["t1"], rec[row][how]["t2"]
                bw = [x == 0 and y == 0 for x, y in zip(own, b)]
                br = [x == 1 and y == 1 for x, y in zip(own, b)]
                vals.append((rate([a == 0 and c == 1 for a, c in zip(t1, t2)], [a == 0 for a in t1]),
                             rate([w and c == 1 for w, c in zip(bw, t2)], bw),
                             rate([a == 1 and c == 0 for a, c in zip(t1, t2)], [a == 1 for a in t1]),
                             rate([r and c == 0 for r, c in zip(br, t2)], br), sum(bw), sum(br)))
            table[how] = vals
            cells = [f"{100 * ms(v[i] for v in vals)[0]:.1f} ± {100 * ms(v[i] for v in vals)[1]:.1f}"
                     for i in range(4)]
            print(f"| {row} | {how} | " + " | ".join(cells) + f" | {sum(v[4] for v in vals) / len(vals):.0f} | "
                  f"{sum(v[5] for v in vals) / len(vals):.0f} |")
        cells = [f"{100 * ms(b[i] - o[i] for b, o in zip(table['base'], table['own']))[0]:+.1f} ± "
                 f"{100 * ms(b[i] - o[i] for b, o in zip(table['base'], table['own']))[1]:.1f}" for i in range(4)]
        print(f"| {row} | base - own (paired) | " + " | ".join(cells) + " |  |  |")


if __name__ == "__main__":
    main()
