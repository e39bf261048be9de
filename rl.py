"""
What both stages of SCoRe share: two-turn rollouts, oracle rewards, per-token log-probs and KL of
the policy and the frozen reference, the leave-one-out baseline, the optimizer step with gradient
accumulation, checkpoints, resuming and logging. Each stage script supplies only its objective:

    objective(b, args) -> per-row loss (m,)

where b holds, for a micro-batch of m two-turn rollouts (whole groups of k samples per prompt):
    b.logp1, b.logp2  sum over the tokens of y1 / y2 of log pi(token)            (m,)
    b.kl1, b.kl2      sum over the tokens of y1 / y2 of the per-token KL term     (m,)
    b.r1, b.r2        oracle rewards r(y1), r(y2) in {0, 1}                        (m,)
    b.group           which prompt each row was sampled from                      (m,)
Rows whose y1 was drawn from the base model (--base-first, paper 5.3) have logp1 = kl1 = 0: that
y1 is not pi's sample, so only turn 2 learns from it. The objective is linear in the four sums
(REINFORCE: its weights carry no gradient), so update() reads each sum's weight off the objective
by autograd and gives every generated token the loss w_lp * log pi + w_kl * k2; the policy's head
forms that gradient in the same pass that computes the log-probs (model.token_loss).

The per-token KL term is k2 = 0.5 * (log pi - log pi_ref)^2 on tokens sampled from pi. Its
gradient, (log pi - log pi_ref) * grad log pi, has expectation grad KL(pi || pi_ref) for each
token's distribution (tests/test_rl.py checks this against the exact KL of a categorical policy).
The k3 estimator used as a loss would give the gradient of KL(pi_ref || pi) instead.
"""
import argparse
import json
import math
import os
import random
import shutil
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
from model import GPT, token_logprobs, token_loss
from sample import generate, generate_turns
from tokenizer import Tokenizer

# Presets, in plain sight. Paper defaults (Table 5): Adam, temperature 1.0, alpha 10, beta1 0.01;
# MATH beta2 0.1, lr 5e-6, batch 512, 3000 steps; MBPP beta2 0.25, lr 1e-5, batch 128, 1500 steps.
# `batch` counts two-turn rollouts per update (prompts x k); `steps` is per stage.
# The demo's 0.8M-parameter model moves turn 1 through the weights it shares with turn 2 far more
# than a 1.5B model does, so its Stage I holds turn 1 with beta2 = 0.5 (0.1 let it collapse, see
# README.md); run.sh gives Stage II its own steps and learning rate.
PRESETS = {
    "demo": dict(task="demo", data=None, base="out/demo/base", root="out/demo", n_train=20000,
                 lr=3e-4, batch=128, k=4, micro_batch=128, steps=120, beta1=0.01, beta2=0.5, alpha=10.0,
                 max_new_tokens=16, save_every=10, threads=0),
    "math": dict(task="math", data="data/math_train.jsonl", base="out/math/base", root="out/math", n_train=None,
                 lr=5e-6, batch=512, k=4, micro_batch=4, steps=3000, beta1=0.01, beta2=0.1, alpha=10.0,
                 max_new_tokens=1024, save_every=50, threads=0),
    "code": dict(task="mbpp", data="data/mbpp.jsonl", base="out/code/base", root="out/code", n_train=None,
                 lr=1e-5, batch=128, k=4, micro_batch=4, steps=1500, beta1=0.01, beta2=0.25, alpha=10.0,
                 max_new_tokens=1024, save_every=50, threads=0),
}


def get_args(stage, argv=None):
    """Arguments of a stage script: a preset's values as defaults, every knob overridable."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    preset = PRESETS[pre.parse_known_args(argv)[0].preset]
    doc = __import__("__main__").__doc__ or ""
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=doc, formatter_class=fmt)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="demo: the CPU demo; math: MATH train / MATH500 eval; code: MBPP train / HumanEval eval")
    p.add_argument("--task", help="demo | math | mbpp | humaneval")
    p.add_argument("--data", help="training data path (see data.py for the formats)")
    p.add_argument("--n-train", type=int, help="use only the first N training problems")
    p.add_argument("--base", help="the base model's checkpoint: pi_ref, and the tokenizer")
    p.add_argument("--init", help="policy to start from (Stage I: the base model; Stage II: Stage I's checkpoint)")
    p.add_argument("--out", help="run directory: ckpt/ (latest checkpoint) and log.jsonl")
    p.add_argument("--steps", type=int, help="optimizer updates")
    p.add_argument("--batch", type=int, help="two-turn rollouts per update (prompts x k)")
    p.add_argument("--k", type=int, help="samples per prompt (for the leave-one-out baseline)")
    p.add_argument("--micro-batch", type=int, help="rollouts per forward/backward (gradient accumulation)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--alpha", type=float, help="alpha: weight of the Stage II bonus r(y2) - r(y1)")
    p.add_argument("--beta1", type=float, help="beta1: KL(pi || pi_ref) weight (turn 2 in Stage I, both turns in Stage II)")
    p.add_argument("--beta2", type=float, help="beta2: the strong KL weight on turn 1 in Stage I")
    p.add_argument("--baseline", default="loo", choices=["loo", "none"],
                   help="loo: leave-one-out mean of the k samples of a prompt; none: the paper's plain REINFORCE")
    p.add_argument("--base-first", type=float, default=0.0,
                   help="fraction of first attempts y1 drawn from the base model (paper 5.3)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of both turns")
    p.add_argument("--max-new-tokens", type=int, help="per turn")
    p.add_argument("--p1", help="the self-correction instruction (default: the paper's; the demo's is shorter)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--save-every", type=int, help="checkpoint every N updates (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seeds the problems' order and the sampling of every step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda; with torchrun, each process takes cuda:LOCAL_RANK")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.set_defaults(**{k: v for k, v in preset.items() if k not in ("root",)})
    p.set_defaults(init=preset["base"] if stage == 1 else f"{preset['root']}/stage1/ckpt",
                   out=f"{preset['root']}/stage{stage}")
    args = p.parse_args(argv)
    if args.p1 is None:
        args.p1 = data.instruction(args.task)
    if args.batch % args.k or args.micro_batch % args.k:
        p.error(f"--batch ({args.batch}) and --micro-batch ({args.micro_batch}) must be multiples of --k ({args.k})")
    if not 0.0 <= args.base_first <= 1.0:
        p.error("--base-first is a fraction in [0, 1]")
    return args


# ------------------------------------------------------------------------------- rollouts
def rollout(policy, ref, tok, problems, args, seed):
    """Two attempts for each of `problems` (k samples each, prompt-major), their rewards, and the
    token-level layout of each rollout: prompt x, y1, (eot if y1 was cut), followup p1, y2."""
    prompts = [tok.render([{"role": "user", "content": p.prompt}]) for p in problems]
    followup = tok.render_followup([{"role": "user", "content": args.p1}])
    R = len(problems) * args.k
    first = None
    from_base = torch.rand(R, generator=torch.Generator().manual_seed(seed)) < args.base_first
    if from_base.any():  # paper 5.3: some first attempts come from the base model
        rows = from_base.nonzero().squeeze(1).tolist()
        ys = generate(ref, [prompts[r // args.k] for r in rows], args.max_new_tokens, args.temperature,
                      stop_ids=tok.stop_ids, seed=seed + 1)
        first = [None] * R
        for r, y in zip(rows, ys):
            first[r] = y
    y1s, y2s = generate_turns(policy, prompts, followup, args.max_new_tokens, turns=2, k=args.k,
                              temperature=args.temperature, stop_ids=tok.stop_ids, eot_id=tok.eot_id,
                              seed=seed, first=first)
    seqs, spans = [], []
    for r, (y1, y2) in enumerate(zip(y1s, y2s)):
        x = prompts[r // args.k]
        closed = y1 + ([] if y1 and y1[-1] in tok.stop_ids else [tok.eot_id])  # as generate_turns does
        seqs.append(x + closed + followup + y2)
        s2 = len(x) + len(closed) + len(followup)
        spans.append(((len(x), len(x) + len(y1)), (s2, s2 + len(y2))))
    L, dev = max(map(len, seqs)), policy.embed_tokens.weight.device
    tokens = torch.zeros(R, L, dtype=torch.long)
    m1 = torch.zeros(R, L - 1, dtype=torch.bool)  # target positions: token j + 1 is predicted at j
    m2 = torch.zeros(R, L - 1, dtype=torch.bool)
    for r, (s, ((a1, b1), (a2, b2))) in enumerate(zip(seqs, spans)):
        tokens[r, :len(s)] = torch.tensor(s)
        m1[r, a1 - 1:b1 - 1] = True
        m2[r, a2 - 1:b2 - 1] = True
    reps = [p for p in problems for _ in range(args.k)]
    text = lambda y: tok.decode([t for t in y if t not in tok.stop_ids])
    t1, t2 = [text(y) for y in y1s], [text(y) for y in y2s]
    r1 = torch.tensor(data.rewards(reps, t1), device=dev)
    r2 = torch.tensor(data.rewards(reps, t2), device=dev)
    group = torch.arange(len(problems), device=dev).repeat_interleave(args.k)
    return SimpleNamespace(tokens=tokens.to(dev), m1=m1.to(dev), m2=m2.to(dev), r1=r1, r2=r2, group=group,
                           first_from_pi=(~from_base).to(dev), n_generated=int(m1.sum() + m2.sum()), y1=t1, y2=t2)


def baseline(returns, group, args):
    """Advantage: the return minus the leave-one-out mean of the other samples of the same prompt
    (unbiased: it does not depend on the row's own sample); --baseline none keeps the raw return."""
    if args.baseline == "none":
        return returns
    n = torch.zeros(int(group.max()) + 1, device=returns.device).index_add_(0, group, torch.ones_like(returns))
    total = torch.zeros_like(n).index_add_(0, group, returns)
    n, total = n[group], total[group]
    return returns - (total - returns) / (n - 1).clamp(min=1)


def kl_term(lp, lp_ref):
    """Per-token KL term k2 = 0.5 * (log pi - log pi_ref)^2 on tokens sampled from pi: its gradient
    (log pi - log pi_ref) * grad log pi has expectation grad KL(pi || pi_ref)."""
    return 0.5 * (lp - lp_ref) ** 2


def objective_weights(objective, args, r1, r2, group, on_policy):
    """d objective / d (logp1, logp2, kl1, kl2) for each row: (4, m). A REINFORCE objective is linear in
    these sums (rewards, bonus and baseline carry no gradient), so its weights do not depend on the
    log-probs and are known before the policy runs. Checked: the weights at two points must agree."""
    def weights_at(s):
        s.requires_grad_()
        b = SimpleNamespace(logp1=s[0] * on_policy, logp2=s[1], kl1=s[2] * on_policy, kl2=s[3],
                            r1=r1, r2=r2, group=group)
        return torch.autograd.grad(objective(b, args).sum(), s)[0]
    w = weights_at(torch.zeros(4, len(r1), device=r1.device))
    if not torch.allclose(w, weights_at(torch.ones(4, len(r1), device=r1.device)), equal_nan=True):
        raise ValueError("the objective is not linear in b.logp1, b.logp2, b.kl1, b.kl2: rl.update needs "
                         "REINFORCE weights that carry no gradient")
    return w


def micro_batch_loss(policy, ref, ro, rows, objective, args, R):
    """The micro-batch's share of the loss, sum over rows of objective(b) / R, ready for backward(),
    and the k3 KL estimate (exp(-d) - 1 + d >= 0, for the logs) summed over each turn's tokens.
    Every generated token's loss is w_lp * log pi + w_kl * k2, with the objective's weights for its
    row and turn, so the policy's head forms the gradient while its logits are at hand (token_loss)."""
    m1, m2 = ro.m1[rows], ro.m2[rows]
    sel = m1 | m2  # only generated tokens count: prompt, instruction and padding never do
    L = int(sel.any(0).nonzero().max()) + 2  # drop the padding columns no row of this micro-batch needs
    idx, m2, sel = ro.tokens[rows, :L], m2[:, :L - 1], sel[:, :L - 1]
    tgt = idx[:, 1:][sel]
    on_policy = ro.first_from_pi[rows].float()  # a y1 drawn from the base model gets no turn-1 terms
    group = ro.group[rows] - ro.group[rows].min()
    w = objective_weights(objective, args, ro.r1[rows], ro.r2[rows], group, on_policy) / R  # (4, m)
    row, turn2 = sel.nonzero()[:, 0], m2[sel]  # each generated token's row and turn
    w_lp = torch.where(turn2, w[1, row], w[0, row])  # d loss / d log pi(token)
    w_kl = torch.where(turn2, w[3, row], w[2, row])  # d loss / d k2(token)
    with torch.no_grad():
        lp_ref = token_logprobs(ref.hidden(idx[:, :-1])[sel], ref.head_weight, tgt, args.temperature)
    loss, lp = token_loss(policy.hidden(idx[:, :-1])[sel], policy.head_weight, tgt,
                          lambda lp, s: w_lp[s] * lp + w_kl[s] * kl_term(lp, lp_ref[s]), args.temperature)
    d = lp - lp_ref
    k3 = torch.expm1(-d) + d
    return loss, (k3 * (~turn2) * on_policy[row]).sum(), (k3 * turn2).sum()


def update(policy, ref, opt, ro, objective, args, world=1):
    """One optimizer step over a batch of rollouts, accumulated over micro-batches of whole groups.
    With several processes each holds 1/world of the batch; the loss is scaled by the global batch
    and the summed gradients are all-reduced once, after the last micro-batch, so the update is the
    one a single process would make on the whole batch. Returns (loss, KL turn 1, KL turn 2), global."""
    R = ro.tokens.shape[0] * world  # rollouts in the global batch
    opt.zero_grad(set_to_none=True)
    stats = torch.zeros(4, device=ro.tokens.device)  # loss, KL turn 1, KL turn 2, non-finite losses
    for s in range(0, ro.tokens.shape[0], args.micro_batch):
        rows = torch.arange(s, min(s + args.micro_batch, ro.tokens.shape[0]), device=ro.tokens.device)
        loss, k3_1, k3_2 = micro_batch_loss(policy, ref, ro, rows, objective, args, R)
        if torch.isfinite(loss):
            loss.backward()
        stats += torch.stack([loss.detach(), k3_1 / R, k3_2 / R, (~torch.isfinite(loss)).float()])
    if world > 1:  # every rank takes part in both collectives, even after a bad loss: no deadlock
        dist.all_reduce(stats)
        all_reduce_grads(policy)
    if stats[3] > 0:
        raise FloatingPointError(f"loss is {'nan' if stats[0].isnan() else stats[0].item()}")
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
    opt.step()
    return stats[0].item(), stats[1].item(), stats[2].item()


def all_reduce_grads(model, average=False):
    """Sum (or average) the gradients over all processes: one collective on a flat buffer."""
    params = list(model.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def setup_distributed(device):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): join the process group, one GPU per
    process (nccl) or CPU processes (gloo). Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = str(device).startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


# ------------------------------------------------------------------------------- checkpoints
def save(out, policy, tok, opt, step, args):
    """Write the whole checkpoint into a temporary directory, then swap it in: ckpt/ is always a
    complete checkpoint (the previous one stays as ckpt.old/ until the swap is done)."""
    final, tmp, old = os.path.join(out, "ckpt"), os.path.join(out, "ckpt.tmp"), os.path.join(out, "ckpt.old")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save({"opt": opt.state_dict(), "step": step, "args": vars(args)}, os.path.join(tmp, "state.pt"))
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def latest(out):
    """The run's latest complete checkpoint directory, or None."""
    for d in ("ckpt", "ckpt.old"):
        p = os.path.join(out, d)
        if os.path.exists(os.path.join(p, "state.pt")):
            return p
    return None


# ------------------------------------------------------------------------------- the loop
def run(args, objective, name):
    """The loop both stages share: sample, score, update, log, checkpoint. Under torchrun each rank
    takes its share of every step's prompts; rank 0 alone logs and writes checkpoints."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n_prompts = args.batch // args.k
    if n_prompts % world:
        raise SystemExit(f"--batch / --k = {n_prompts} prompts per step do not split over {world} processes")
    say = print if rank == 0 else (lambda *a, **k: None)
    tok = Tokenizer.from_pretrained(args.base)
    step0, init = 0, args.init
    if args.resume:
        init = latest(args.out)
        if init is None:
            raise SystemExit(f"--resume: no checkpoint in {args.out}/ckpt to resume from")
        state = torch.load(os.path.join(init, "state.pt"), weights_only=False)
        step0 = state["step"]
    for path, what in ((init, "--init"), (args.base, "--base")):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"{what} {path}: not a checkpoint (no config.json); run the previous step first")
    policy = GPT.from_pretrained(init, device=dev)  # fp32 weights; bf16 autocast on the GPU
    ref = GPT.from_pretrained(args.base, device=dev, dtype=torch.bfloat16 if cuda else None).eval()
    ref.requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    if args.resume:
        opt.load_state_dict(state["opt"])
    try:
        problems = data.load_task(args.task, args.data, n=args.n_train, seed=args.seed)
    except data.DataError as e:
        raise SystemExit(f"{name}: {e}") from None
    log_path = os.path.join(args.out, "log.jsonl")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        kept = []
        if args.resume and os.path.exists(log_path):  # forget steps after the checkpoint: they are redone
            with open(log_path) as f:
                kept = [r for r in f if json.loads(r)["step"] <= step0]
        with open(log_path, "w") as f:
            f.writelines(kept)
    say(f"{name}: policy {init}, reference {args.base}, {len(problems)} problems, {args.steps} steps of "
        f"{n_prompts} prompts x {args.k} samples on {world} process(es), from step {step0}", flush=True)
    t_start, tokens_done = time.time(), 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    for step in range(step0 + 1, args.steps + 1):
        t0 = time.time()
        seed = args.seed * 1_000_003 + step  # everything random in a step follows from (seed, step): resumable
        batch = [problems[i] for i in random.Random(seed).sample(range(len(problems)), n_prompts)]
        with autocast:
            policy.eval()
            ro = rollout(policy, ref, tok, batch[rank::world], args, seed + 7919 * rank)
            policy.train()
            try:
                loss, kl1, kl2 = update(policy, ref, opt, ro, objective, args, world)
            except FloatingPointError as e:
                good = latest(args.out)
                raise SystemExit(f"step {step}: {e}; stopping. The last good checkpoint is "
                                 f"{good or 'none (no step was saved yet)'}.")
        counts = torch.stack([ro.r1.sum(), ro.r2.sum(), ((1 - ro.r1) * ro.r2).sum(), (ro.r1 * (1 - ro.r2)).sum(),
                              torch.tensor(float(ro.n_generated), device=dev)])
        if world > 1:
            dist.all_reduce(counts)
        tokens_done += int(counts[4])
        rate = tokens_done / (time.time() - t_start)
        eta = (time.time() - t_start) / (step - step0) * (args.steps - step) / 60
        acc_t1, acc_t2, i2c, c2i = (counts[:4] / args.batch).tolist()  # of the sampled rollouts (temperature T)
        rec = dict(step=step, acc_t1=acc_t1, acc_t2=acc_t2, delta_i2c=i2c, delta_c2i=c2i,
                   kl_t1=kl1, kl_t2=kl2, loss=loss, tokens=int(counts[4]), seconds=time.time() - t0)
        say(f"step {step}/{args.steps} | acc t1 {acc_t1:.1%} t2 {acc_t2:.1%} (i->c {i2c:.1%}, c->i {c2i:.1%}) | "
            f"KL t1 {kl1:.4f} t2 {kl2:.4f} | loss {loss:+.4f} | {rate:.0f} tok/s | ETA {eta:.1f} min", flush=True)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if step % args.save_every == 0 or step == args.steps:
                save(args.out, policy, tok, opt, step, args)
        if world > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint being written
    say(f"{name}: done; checkpoint {os.path.join(args.out, 'ckpt')}", flush=True)
    if world > 1:
        dist.destroy_process_group()
