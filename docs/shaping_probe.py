"""
The hypothesis of docs/stage2_weighted.py measured at one point: from a Stage I checkpoint, with the weights
held fixed, how far Adam's step under each Stage II objective moves turn 1's objective, against alpha = 0's.

On B batches of rollouts (sampled as Stage II's first steps sample them), each turn's part of the loss is
differentiated alone (rl.reinforce with the other turn's reward and beta 0): g1, turn 1's gradient (the same in
every objective), and g2 under each objective (SCoRe: r(y2) + alpha (r(y2) - r(y1)); weighted: (1 + alpha) r(y2);
alpha 0: r(y2)). Each objective's per-batch gradient g1 + g2 is clipped to norm --grad-clip as training clips
it, fed to Adam's moments (betas 0.9, 0.999, bias-corrected; the weights never move), and its direction
d = m / (sqrt(v) + eps) after the first batch (Adam's first step: the sign) and after the first half of the
batches (a state closer to training's) is scored on the other half's mean gradients (independent of d):
turn-1 rate = G1 . d, the first-order gain of turn 1's objective per unit of lr (the step is -lr d, G1 the
mean gradient of turn 1's loss); turn-2 rate = G2 . d with
G2 the gradient of r(y2) alone (alpha 0's turn 2), the same yardstick for all three.

    python docs/shaping_probe.py --base out/demo/seed0/base --init out/demo/seed0/stage1/step_000300 --seed 0
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import torch  # noqa: E402

import data  # noqa: E402
import rl  # noqa: E402
from model import GPT  # noqa: E402
from sample import seed_of  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

B = 32  # batches: the first half builds Adam's moments, the second half measures the mean gradients
args = rl.get_args(stage=2, run="probe")
torch.set_num_threads(args.threads or torch.get_num_threads())
torch.manual_seed(args.seed)
tok = Tokenizer.from_pretrained(args.base)
compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
policy = GPT.from_pretrained(args.init, dtype=torch.float32)
ref = GPT.from_pretrained(args.base, dtype=compute).eval().requires_grad_(False)
sampler = rl.make_sampler(policy, compute)
params = [p for p in policy.parameters() if p.requires_grad]
problems = data.training_problems(args, tok, ref.config.max_seq_len, print)
autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
zero = (0.0, 0.0)  # a turn left out: reward 0, beta 0
turn2 = {"SCoRe": lambda b: b.r2 + args.alpha * (b.r2 - b.r1), "weighted": lambda b: (1 + args.alpha) * b.r2,
         "alpha 0": lambda b: b.r2}
flat = lambda loss, keep: torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in
                                     zip(params, torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True))])
grads = []  # per batch: {"g1": ..., objective: g2}
for step in range(1, B + 1):
    order = random.Random(seed_of(args.seed, step, "problems"))
    batch = [problems[i] for i in order.sample(range(len(problems)), args.batch // args.k)]
    with autocast:
        ro = rl.rollout(sampler, ref, tok, batch, args, (args.seed, step, 0))
        b = rl.objective_input(policy, ref, ro, torch.arange(ro.tokens.shape[0]), args)
        R = ro.tokens.shape[0]
        g = {"g1": flat(rl.reinforce(b, args, [(b.r1, args.beta1), zero]).sum() / R, True)}
        for i, (name, ret) in enumerate(turn2.items()):
            g[name] = flat(rl.reinforce(b, args, [zero, (ret(b), args.beta1)]).sum() / R, i < len(turn2) - 1)
    grads.append(g)
    print(f"batch {step}/{B}: acc t1 {ro.r[0].mean():.3f} t2 {ro.r[1].mean():.3f}", flush=True)
half = B // 2
G1 = torch.stack([g["g1"] for g in grads[half:]]).mean(0)  # loss gradients: a step -lr d gains lr G . d
G2 = torch.stack([g["alpha 0"] for g in grads[half:]]).mean(0)
print(f"|G1| {G1.norm():.4f} |G2 (r(y2) alone)| {G2.norm():.4f}; per-batch |g1| "
      f"{torch.stack([g['g1'].norm() for g in grads]).mean():.3f}")
rows = {}
for name in turn2:
    m = v = 0
    for t, g in enumerate(grads[:half], 1):
        x = g["g1"] + g[name]
        x = x * min(1.0, args.grad_clip / (x.norm().item() + 1e-6)) if args.grad_clip else x
        m, v = 0.9 * m + 0.1 * x, 0.999 * v + 0.001 * x * x
        d = (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        if t == 1:
            first = d
    rows[name] = [(G1 @ d).item() for d in (first, d)] + [(G2 @ d).item() for d in (first, d)] + [
        torch.stack([(g["g1"] + g[name]).norm() for g in grads]).mean().item()]
ref_row = rows["alpha 0"]
print("| objective | turn-1 rate, first step | turn-1 rate, after 16 | turn-2 rate, first step | turn-2 rate, after 16 "
      "| mean unclipped |g| |\n|---|---|---|---|---|---|")
for name, r in rows.items():
    print(f"| {name} | " + " | ".join(f"{x:.3g} ({x / y:.2f}x)" for x, y in zip(r[:4], ref_row[:4])) + f" | {r[4]:.1f} |")
