"""
What both stages of SCoRe share: rollouts of two attempts (or T), oracle rewards, per-token log-probs and KL of
the policy and the frozen reference, the leave-one-out baseline, the optimizer step with gradient
accumulation, checkpoints, resuming and logging. Each stage script supplies only its objective,
written with `reinforce`: each attempt's reward and KL weight,

    objective(b, args) = reinforce(b, args, [(reward, beta) of turn 1, (reward, beta) of turn 2]) -> per-row loss (m,)

where b holds, for a micro-batch of m rollouts (whole groups of k samples per prompt) of T attempts
(--turns, the paper's 2; the lists b.logp, b.kl, b.r hold each attempt's, b.logp[0] is b.logp1, ...):
    b.logp1, b.logp2  sum over the tokens of y1 / y2 of log pi(token)                      (m,)
    b.kl1, b.kl2      the turn's KL: sum over its tokens of log pi - log pi_ref (--kl reward)
                      or of k2 = 0.5 (log pi - log pi_ref)^2 (--kl loss)                  (m,)
    b.r1, b.r2        oracle rewards r(y1), r(y2) in {0, 1}                                  (m,)
    b.group           which prompt each row was sampled from                                (m,)

The estimator (--kl reward, the paper's RLOO, Ahmadian et al. 2024): each turn's return is its
reward minus beta times the log-ratio of the whole attempt, log pi(y) - log pi_ref(y), taken as a
constant; the advantage is that return minus the leave-one-out mean of the other k - 1 samples'
returns; the loss is -advantage * log pi(y). Its expected gradient is exactly the gradient of
E[r] - beta * KL(pi || pi_ref) of the sequence (tests/test_estimator.py enumerates it). The log-ratio
uses the sampler's log-probs of the sampled tokens, so it costs no extra forward pass of the policy.
--kl loss puts the per-token k2 into the loss instead: its gradient is each token's KL with the
tokens before it held fixed, and misses how a token changes the KL of the tokens after it.

With --turns T > 2 each attempt after the first follows p1 and sees every earlier one, as sampled; each
attempt is credited with its own return (gamma = 0), so the objective names T (reward, beta) pairs.

Rows whose y1 was drawn from the base model (--base-first, paper 5.3) get no turn-1 terms: that y1
is not pi's sample, so only turn 2 learns from it.

The update is the objective as written: the policy's log-prob of each generated token from the
chunked head (model.token_logprobs, which never holds the (N, V) logits), summed per row and turn
(turn_sums), the stage's objective on those sums, (objective(b, args).sum() / R).backward(). Any
differentiable objective runs: update() asks nothing of it but a per-row loss.

Precision: the policy is always trained on fp32 master weights (fp32 Adam state), whatever the
checkpoint's dtype; --dtype bf16 runs the policy's forward and backward under torch.autocast, on the
CPU as on the GPU. The reference is stored in the compute dtype. The rollouts are sampled by a copy of the
policy in the compute dtype, refreshed every step (make_sampler: in bf16, the same numbers without casting
every decoded token; under FSDP2 a whole copy, gathered once per step), or, in fp32 on one process and with
--lora (whose frozen weights are already in the compute dtype), by the policy itself.
"""
import argparse
import json
import math
import os
import random
import re
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
import evaluate
import loggers
import memory
import shard
from checkpoint import check_resume, check_same_model, latest, lora_policy, save, where_to_resume
from model import (GPT, CheckpointError, adapters_off, auto_dtype, device_error, load_checkpoint, load_config,
                   load_tensors, merge_lora, read_lora, token_logprobs, warn_if_emulated, write_error)
from sample import HelpFormatter, generate, generate_turns, layout, seed_of
from shard import all_reduce_grads, setup_distributed
from tokenizer import Tokenizer


# ------------------------------------------------------------------------------- the estimator
def baseline(returns, group, args):
    """Advantage: the return minus the leave-one-out mean of the other samples of the same prompt
    (unbiased: it does not depend on the row's own sample); --baseline none keeps the raw return."""
    if args.baseline == "none":
        return returns
    n = returns.new_zeros(int(group.max()) + 1).index_add_(0, group, torch.ones_like(returns))
    total = torch.zeros_like(n).index_add_(0, group, returns)
    n, total = n[group], total[group]
    return returns - (total - returns) / (n - 1).clamp(min=1)


def kl_term(lp, lp_ref):
    """Per-token KL term k2 = 0.5 * (log pi - log pi_ref)^2 on tokens sampled from pi (--kl loss): its
    gradient (log pi - log pi_ref) * grad log pi has expectation grad KL(pi || pi_ref) of one token's
    distribution, with the tokens before it held fixed."""
    return 0.5 * (lp - lp_ref) ** 2


def reinforce(b, args, turns):
    """The per-row REINFORCE loss of a rollout of T attempts, each credited with its own return (gamma = 0).
    turns: one (reward, beta) per attempt, in order: its reward (m,) or a number, and the weight of its KL.
      --kl reward (RLOO): return R = reward - beta * (log pi(y) - log pi_ref(y)), a constant; loss -A(R) log pi(y)
      --kl loss:          loss -A(reward) log pi(y) + beta * sum of the per-token k2
    A(.) is the return minus the leave-one-out mean of the other samples of the prompt (--baseline loo)."""
    if len(turns) != len(b.logp):
        raise ValueError(f"the objective credits {len(turns)} attempt(s); the rollouts hold {len(b.logp)}")
    loss = 0.0
    for logp, kl, (reward, beta) in zip(b.logp, b.kl, turns):
        reward = torch.zeros_like(b.r1) + reward
        if args.kl == "reward":
            loss = loss - baseline(reward - beta * kl, b.group, args) * logp
        else:
            loss = loss - baseline(reward, b.group, args) * logp + beta * kl
    return loss


# ------------------------------------------------------------------------------- the update
def generated_hidden(idx, sel, m1, k):
    """A function of a model that gives model.hidden(idx[:, :-1])[sel], the hidden states at the target
    positions sel (m, L - 1), with each prompt run once for its k samples (GPT.hidden_shared); with
    checkpoint=True each row whole, its blocks recomputed in the backward. idx (m, L): whole groups of k
    rows, prompt-major; m1 (m, L - 1): turn 1's target positions, the first of which is the prompt's last
    token: the prompt's other tokens are shared, everything from that token on is not."""
    shared = m1.float().argmax(1)  # (m,) each row's prompt length - 1
    width = idx.shape[1] - 1
    col = shared[:, None] + torch.arange(width - int(shared.min()), device=idx.device)  # suffix columns in idx
    col, ok = col.clamp(max=width - 1), col < width  # past a row's end: padding, never a target
    suffix, sel_suffix = idx[:, :-1].gather(1, col), sel.gather(1, col) & ok  # same targets, same order
    prefix, group = idx[::k, :int(shared.max())], torch.arange(idx.shape[0], device=idx.device) // k

    def hidden(model, checkpoint=False):
        # whole rows: with activation checkpointing (hidden_shared writes a KV cache, never recomputed), and for a
        # policy sharded by FSDP2 (the prompt's pass reaches the loss only through the cache, not through the
        # blocks' outputs, where FSDP2 hooks the gathering of a block's weights for its backward)
        if checkpoint or shard.is_sharded(model):
            h = model.hidden(idx[:, :-1], checkpoint=checkpoint)[sel]
        else:
            h = model.hidden_shared(prefix, shared[::k], suffix, group)[sel_suffix]
        # the head's weight read after the forward: FSDP2 leaves the root's parameters gathered after it (the
        # root is never resharded after forward), so it is whole here, not a shard
        return h, model.head_weight
    return hidden


def objective_input(policy, ref, ro, rows, args):
    """What the stage's objective reads (b, the module docstring), for the rollouts `rows` (whole groups of k):
    the policy's log-probs of each generated token from the chunked head (model.token_logprobs: the (N, V)
    logits never exist), differentiable; the frozen reference's, without gradient; both summed per row and turn
    by turn_sums. Prompt, instruction and padding tokens never count."""
    turn = ro.turn[rows]
    sel = turn > 0  # the generated tokens' target positions
    L = int(sel.any(0).nonzero().max()) + 2  # drop the padding columns no row of this micro-batch needs
    idx, turn, sel = ro.tokens[rows, :L], turn[:, :L - 1], sel[:, :L - 1]
    tgt = idx[:, 1:][sel]  # (n,) each generated token
    hidden = generated_hidden(idx, sel, turn == 1, args.k)
    with torch.no_grad(), adapters_off(ref):  # with LoRA the reference is the policy with its adapters off
        lp_ref = token_logprobs(*hidden(ref), tgt, args.temperature)  # (n,) log pi_ref
    lp = token_logprobs(*hidden(policy, getattr(args, "checkpoint_activations", False)), tgt,
                        args.temperature)  # (n,) log pi: the training path
    tokens = SimpleNamespace(lp=lp, lp_ref=lp_ref, lp_old=ro.lp_old[rows, :L - 1][sel],  # the sampler's log pi
                             row=sel.nonzero()[:, 0], turn=turn[sel])  # (n,) each generated token's row and turn
    return turn_sums(tokens, SimpleNamespace(first_from_pi=ro.first_from_pi[rows], r=ro.r[:, rows],
                                             group=ro.group[rows] - ro.group[rows].min()), args)


def turn_sums(tokens, rows, args):
    """The objective's input b (module docstring) from per-token log-probs.
    tokens, each (n,), per generated token: lp the policy's log-prob, with gradient; lp_ref the reference's;
      lp_old the sampler's (for the KL in the reward); row its row (of m); turn its attempt, 1 to T.
    rows: r (T, m) the rewards of each attempt; group (m,) the prompt; first_from_pi (m,) False where y1 came
      from the base model: that y1 is not pi's sample, so its tokens enter no turn-1 sum (only later turns
      learn from it).
    b.log holds sums for the logs: k3, per turn, the k3 KL estimate exp(-d) - 1 + d >= 0 (d = log pi -
    log pi_ref) over the turn's tokens; lp_diff |log pi - sampler log pi| over the n_sampled tokens pi sampled."""
    lp, lp_ref, row, turn = tokens.lp, tokens.lp_ref, tokens.row, tokens.turn
    turns = [(turn == 1) & rows.first_from_pi[row]]  # (n,) turn-1 tokens that pi sampled
    turns += [turn == t for t in range(2, len(rows.r) + 1)]  # (n,) each later turn's tokens
    sampled = torch.stack(turns).any(0)
    per_row = lambda x, turn: torch.zeros(rows.r.shape[1], device=x.device, dtype=x.dtype).index_add(0, row, x * turn)
    # --kl reward: log pi - log pi_ref of each sampled token, a constant (it goes into the return);
    # --kl loss: the per-token k2 = 0.5 (log pi - log pi_ref)^2, with gradient
    kl = tokens.lp_old - lp_ref if args.kl == "reward" else kl_term(lp, lp_ref)
    d = lp.detach() - lp_ref
    k3 = torch.expm1(-d) + d
    log = SimpleNamespace(k3=[(k3 * t).sum() for t in turns], n_sampled=sampled.sum(),
                          lp_diff=((lp.detach() - tokens.lp_old).abs() * sampled).sum())
    return Batch(logp=[per_row(lp, t) for t in turns], kl=[per_row(kl, t) for t in turns], r=list(rows.r),
                 group=rows.group, log=log)


class Batch(SimpleNamespace):
    """The objective's input b: lists over the attempts (logp, kl, r), each also read and written by its number,
    b.logp1 for b.logp[0], b.r2 for b.r[1]: the names the stage scripts write the paper's equations with."""
    numbered = re.compile(r"(logp|kl|r)([1-9][0-9]*)$")

    def __getattr__(self, name):  # only for what is not an attribute
        m = self.numbered.match(name)
        if m and int(m[2]) <= len(self.__dict__.get(m[1], ())):
            return self.__dict__[m[1]][int(m[2]) - 1]
        raise AttributeError(f"{name}: the rollouts hold {len(self.__dict__.get('logp', ()))} attempt(s)")

    def __setattr__(self, name, value):
        m = self.numbered.match(name)
        if m:
            getattr(self, m[1])[int(m[2]) - 1] = value  # one place for each attempt's tensor
        else:
            super().__setattr__(name, value)


def update(policy, ref, opt, ro, objective, args, world=1):
    """One optimizer step over a batch of rollouts, accumulated over micro-batches of whole groups: for
    each, the stage's objective on the micro-batch's log-probs (objective_input), summed over rows, divided by
    the global batch R, backward(). With several processes each holds 1/world of the batch and the ranks'
    gradients are summed (FSDP2's reduce-scatter after each backward where the policy is sharded, else one
    all-reduce after the last micro-batch), so the update is the one a single process would make on the whole
    batch. Returns the global (loss, [KL of each turn], gradient norm before clipping, mean |trainer -
    sampler log-prob| per generated token)."""
    R = ro.tokens.shape[0] * world  # rollouts in the global batch
    opt.zero_grad(set_to_none=True)
    total = {}  # sums over the micro-batches (and the ranks) of what the logs report
    for s in range(0, ro.tokens.shape[0], args.micro_batch):
        rows = torch.arange(s, min(s + args.micro_batch, ro.tokens.shape[0]), device=ro.tokens.device)
        b = objective_input(policy, ref, ro, rows, args)
        loss = objective(b, args).sum() / R  # the stage's objective, as its script writes it
        loss.backward()  # even if not finite (the step is refused below): FSDP2's backward is a collective
        part = dict(loss=loss.detach().float(), nonfinite=(~torch.isfinite(loss)).float(), lp_diff=b.log.lp_diff,
                    n_sampled=b.log.n_sampled.float(), **{f"kl_t{t + 1}": k3 / R for t, k3 in enumerate(b.log.k3)})
        total = {name: total.get(name, 0) + x for name, x in part.items()}
    flat = torch.stack(list(total.values()))  # one tensor: one collective
    if world > 1:  # every rank takes part in every collective, even after a bad loss: no deadlock
        dist.all_reduce(flat)
        if not shard.is_sharded(policy):
            all_reduce_grads(policy)
    t = SimpleNamespace(**dict(zip(total, flat.tolist())))
    if t.nonfinite > 0:
        raise FloatingPointError(f"loss is {t.loss}")
    # the norm of the whole gradient, the same on every rank (summed over them): a finite loss can still have a
    # non-finite gradient, and one step on it makes every weight NaN; refused before the step, on every rank
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip or float("inf")).item()
    if not math.isfinite(norm):
        raise FloatingPointError(f"the gradient's norm is {norm} (the loss is finite)")
    opt.step()
    kl = [getattr(t, f"kl_t{i + 1}") for i in range(len(b.log.k3))]
    return t.loss, kl, norm, t.lp_diff / max(t.n_sampled, 1)


# ------------------------------------------------------------------------------- rollouts
def rollout(policy, ref, tok, problems, args, seed):
    """args.turns attempts (default 2; 1: the first only) for each of `problems` (k samples each, prompt-major),
    their rewards (r: (T, R)), whether each rollout's last answer differs from its first (changed), the sampler's
    log-probs of the sampled tokens, and the token layout of each rollout, with counts for the logs.
    seed: an int or a tuple, the key of this rollout's randomness (sample_attempts)."""
    prompts = [tok.render([{"role": "user", "content": p.prompt}]) for p in problems]
    followup = tok.render_followup([{"role": "user", "content": args.p1}])
    k, dev = args.k, policy.embed_tokens.weight.device
    t0 = time.time()
    ys, lps, from_base = sample_attempts(policy, ref, tok, prompts, followup, args, seed)
    t_sample = time.time() - t0
    ro = lay_out(prompts, ys, lps, followup, tok.eot_id, k)
    t0 = time.time()
    texts = [[tok.decode([t for t in y if t not in tok.stop_ids]) for y in turn] for turn in ys]
    reps = [p for p in problems for _ in range(k)]
    r = torch.tensor([data.rewards(reps, t) for t in texts], device=dev)  # (T, R)
    answers = [[data.answer_of(p, y) for p, y in zip(reps, t)] for t in (texts[0], texts[-1])]
    changed = [evaluate.changed(p, a, b) for p, a, b in zip(reps, *answers)]  # paper Figure 6b (one turn: none)
    cut = lambda y: len(y) == args.max_new_tokens and y[-1] not in tok.stop_ids  # ran out of tokens
    return SimpleNamespace(tokens=ro.tokens.to(dev), turn=ro.turn.to(dev), lp_old=ro.lp_old.to(dev), r=r,
                           group=torch.arange(len(problems), device=dev).repeat_interleave(k),
                           first_from_pi=(~from_base).to(dev), texts=texts, changed=changed,
                           n_generated=int((ro.turn > 0).sum()), len_y=[sum(map(len, y)) for y in ys],
                           cut=sum(cut(y) for t in ys for y in t),
                           n_context=sum(ro.lengths), n_shared=sum((k - 1) * (len(x) - 1) for x in prompts),
                           t_sample=t_sample, t_score=time.time() - t0)


def sample_attempts(policy, ref, tok, prompts, followup, args, seed):
    """The attempts of each prompt's k samples: (ys, lps, from_base), ys and lps lists over turns (args.turns,
    default 2) of lists over rows of token ids and of the sampler's log-prob of each (None for a y1 drawn from
    the base model, --base-first, paper 5.3, marked in from_base (R,)). Generated in chunks of at most
    args.gen_batch rows (whole prompt groups), so that the KV cache stays bounded. The coin flips of
    --base-first, the base model's first attempts and the policy's samples each draw from a stream of their
    own, named by seed and the chunk (seed_of)."""
    R, k = len(prompts) * args.k, args.k
    turns = getattr(args, "turns", 2)  # 1: single-turn RL (train_single_turn.py) samples no second attempt
    from_base = torch.rand(R, generator=torch.Generator().manual_seed(seed_of(seed, "base-first"))) < args.base_first
    per = max(1, (getattr(args, "gen_batch", None) or R) // k)  # prompts per chunk
    ys, lps = [[] for _ in range(turns)], [[] for _ in range(turns)]
    for c, a in enumerate(range(0, len(prompts), per)):
        rows, first = range(a * k, min(a + per, len(prompts)) * k), None
        base_rows = [r for r in rows if from_base[r]]
        if base_rows:  # paper 5.3: some first attempts come from the base model
            with adapters_off(ref):  # with LoRA the base model is the policy with its adapters off
                y1 = generate(ref, [prompts[r // k] for r in base_rows], args.max_new_tokens, args.temperature,
                              stop_ids=tok.stop_ids, seed=seed_of(seed, "base", c))
            first = [None] * len(rows)
            for r, y in zip(base_rows, y1):
                first[r - a * k] = y
        y, lp = generate_turns(policy, prompts[a:a + per], followup, args.max_new_tokens, turns=turns, k=k,
                               temperature=args.temperature, stop_ids=tok.stop_ids, eot_id=tok.eot_id,
                               seed=seed_of(seed, "policy", c), first=first, return_logprobs=True)
        for t in range(turns):
            ys[t] += y[t]
            lps[t] += lp[t]
    return ys, lps, from_base


def lay_out(prompts, ys, lps, followup, eot_id, k):
    """Each rollout's tokens in sample.layout's order, (R, L) zero-padded; turn (R, L - 1) the attempt (1 to T) whose
    token is predicted at each position (position j predicts token j + 1), 0 where none is; lp_old (R, L - 1)
    the sampler's log-prob of each generated token at its target position (0 where there is none: a y1 from the
    base model); lengths, each rollout's."""
    R = len(ys[0])
    seqs, spans = zip(*(layout(prompts[r // k], [y[r] for y in ys], followup, eot_id) for r in range(R)))
    L = max(map(len, seqs))
    tokens = torch.tensor([s + [0] * (L - len(s)) for s in seqs])  # (R, L), zero-padded
    j = torch.arange(L - 1)  # target positions: token j + 1 is predicted at j

    def targets(t):  # (R, L - 1): turn t's target positions, [start - 1, end - 1) of its span
        a, b = (torch.tensor([sp[t] for sp in spans]) - 1).T[:, :, None]
        return (j >= a) & (j < b)
    turn, lp_old = torch.zeros(R, L - 1, dtype=torch.int8), torch.zeros(R, L - 1)
    for t in range(len(ys)):
        m = targets(t)
        turn[m] = t + 1
        sampled = torch.tensor([lp is not None for lp in lps[t]])[:, None]  # a y1 from the base model has none
        lp_old[m & sampled] = torch.tensor([x for lp in lps[t] if lp is not None for x in lp])
    return SimpleNamespace(tokens=tokens, turn=turn, lp_old=lp_old, lengths=list(map(len, seqs)))


def make_sampler(policy, dtype):
    """The model that samples the rollouts of a full fine-tuning (a LoRA policy samples itself, train): the policy
    itself in fp32 on one process; else a whole copy of it in the compute dtype, refreshed before every step
    (refresh_sampler): in bf16 so that decoding does not cast the fp32 masters at every token (it computes
    exactly what autocast over the masters computes: the residual stream is bf16 in both); under FSDP2, in fp32
    too, so that decoding does not gather every block of the sharded policy at every token: the copy is
    gathered once per step."""
    if dtype == torch.float32 and not shard.is_sharded(policy):
        return policy
    with torch.device("meta"):
        sampler = GPT(policy.config)
    sampler = sampler.to(dtype).to_empty(device=policy.head_weight.device).eval().requires_grad_(False)
    refresh_sampler(sampler, policy)
    return sampler


@torch.no_grad()
def refresh_sampler(sampler, policy):
    if sampler is not policy:
        sharded = shard.is_sharded(policy)
        for a, b in zip(sampler.parameters(), policy.parameters()):
            a.copy_(shard.full(b, sharded))  # sharded: gathered from the ranks, one parameter at a time


# ------------------------------------------------------------------------------- the loop
def run(args, objective, name):
    """A stage's run (train), made safe to start and to stop: a run directory that holds a checkpoint
    is continued only with --resume, never trained over; Ctrl-C (SIGINT) or SIGTERM stops it with one
    line that names the last checkpoint and the command that resumes from it. (No checkpoint is written
    at the interrupt: the weights in the middle of a step belong to no step, and an exact resume needs
    a step's.)"""
    ckpt = latest(args.out)
    if ckpt and not args.resume:
        raise SystemExit(f"--out {args.out} already holds a run (checkpoint {ckpt}): continue it with --resume, "
                         f"or start over with a new --out (or delete {args.out} first)")
    handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(args, objective, name)
    except CheckpointError as e:  # one line naming the file; a damaged checkpoint of this run: the others it kept
        kept = args.resume and args.out in str(e) and [d for d in sorted(os.listdir(args.out)) if d[:5] in ("best", "step_")]
        raise SystemExit(f"{args.label or name}: {e}" + (f"; the run also kept {', '.join(kept)} in {args.out}: copy "
                         f"one over its ckpt/ to resume from its step" if kept else "")) from None
    except KeyboardInterrupt as e:
        sig = e.args[0] if e.args else "SIGINT"
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if rank == 0:
            print(f"{args.label or name}: stopped by {sig}; {where_to_resume(args, world)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + getattr(signal, sig))  # the shell's code for a death by that signal
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def train(args, objective, name):
    """The loop both stages share: sample, score, update, log, checkpoint. Under torchrun each rank
    takes its share of every step's prompts; rank 0 alone logs and writes checkpoints."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    dev = torch.device(device)
    n_prompts = args.batch // args.k
    if n_prompts % world:
        raise SystemExit(f"--batch / --k = {n_prompts} prompts per step do not split over {world} processes")
    say = print if rank == 0 else (lambda *a, **k: None)
    name = args.label or name
    step0, init, state = 0, args.init, {}
    if args.resume:
        init = latest(args.out)
        if init is None:
            raise SystemExit(f"--resume: no checkpoint in {args.out}/ckpt to resume from")
        # memory-mapped: under torchrun every rank reads the whole Adam state, and keeps its shard
        state = load_tensors(os.path.join(init, "state.pt"), weights_only=False)
        if args.gen_batch is None:  # the run's own, not what the memory model would choose on this GPU
            args.gen_batch = state["args"].get("gen_batch")
        check_resume(state["args"], args)
        step0 = state["step"]
        if step0 >= args.steps:  # run.sh continues every run: a finished one does nothing, and says so
            say(f"{name}: the run in {args.out} is at step {step0}, --steps {args.steps}: no step left to run")
    for path, what in ((args.base, "--base"), (init, "--init")):  # --init defaults to --base: name --base first
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"{what} {path}: not a checkpoint (no config.json); make it first: " + (
                "a training script's --out DIR writes DIR/ckpt (python train_stage1.py for Stage II's --init)"
                if what == "--init" else f"python train_base.py --out {path} (bash run.sh demo1 writes out/demo1/"
                "seed0/base)" if args.task == "demo" else f"python convert.py HF_DIR {path}"))
    tok = Tokenizer.from_pretrained(args.base)
    if not args.lora:  # (a LoRA policy's frozen weights are checked to be --base's: lora_policy)
        # each one's weights against its own config.json first (memory-mapped: no weight is read), then the two
        config = [load_config(p) if read_lora(p) else load_checkpoint(p)[0] for p in (init, args.base)]
        check_same_model(*config, tok, init, args.base)
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.lora:  # one copy of the weights: the reference is the policy with its adapters off, it samples itself
        policy = ref = sampler = lora_policy(init, args, dev, compute)
    else:
        policy = GPT.from_pretrained(init, device=dev, dtype=torch.float32)  # fp32 masters, whatever the checkpoint's dtype
        if policy.lora:  # a LoRA checkpoint, fully fine-tuned from here on
            merge_lora(policy).requires_grad_(True)
        if world > 1:  # each rank keeps 1/world of the masters (and of their gradients and Adam state): shard.py
            shard.shard(policy)
        # frozen, in the compute dtype; whole on every rank (memory.py: it fits, and base-first attempts sample it)
        ref = GPT.from_pretrained(args.base, device=dev, dtype=compute).eval()
        ref.requires_grad_(False)
        sampler = make_sampler(policy, compute)
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=args.lr)  # fp32 state, as the masters
    if args.resume:
        shard.load_optimizer(policy, opt, state["opt"])
    problems = data.training_problems(args, tok, ref.config.max_seq_len, say)
    if len(problems) < n_prompts:  # each step draws its prompts without replacement
        raise SystemExit(f"{args.task}: {len(problems)} problem(s) to train on, fewer than the {n_prompts} prompts of "
                         f"a step (--batch {args.batch} / --k {args.k}): lower --batch or give more problems")
    if args.gen_batch is None and dev.type == "cuda":  # the memory model's choice for this GPU
        args.gen_batch = memory.default_gen_batch(policy.config, args, world, torch.cuda.get_device_properties(dev).total_memory)
        say(f"--gen-batch {args.gen_batch} (from the memory model; pass --gen-batch to override)")
    heldout = evaluate.load_heldout(args, tok, ref.config.max_seq_len) if args.eval_every else []
    if args.best_by == "eval" and not heldout:
        raise SystemExit("--best-by eval: there are no held-out problems to evaluate on")
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
        f"{n_prompts} prompts x {args.k} samples on {world} process(es), {args.dtype}, from step {step0}" +
        (f"; held-out evaluation of {len(heldout)} problems every {args.eval_every} steps" if heldout else ""), flush=True)
    extra = loggers.open(args, args.out, config=run_config(args)) if rank == 0 else loggers.open(None, args.out)
    t_start, tokens_done = time.time(), 0
    # best/: the best training reward of the last attempt over the steps since each save (--best-by train, the
    # paper's), or the best held-out accuracy of the last attempt (--best-by eval)
    best, window = state.get("best", state.get("best_reward", -math.inf)), []
    # Sharded, autocast's cache of the weights' bf16 casts is off: it would keep every block's cast, gathered, until
    # the step ends (the whole model in bf16 on every rank); each use casts again (the same values).
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16",
                              cache_enabled=not shard.is_sharded(policy))
    for step in range(step0 + 1, args.steps + 1):
        t0 = time.time()
        # everything random in a step follows from (seed, step): resumable; each use has its own stream
        order = random.Random(seed_of(args.seed, step, "problems"))
        batch = [problems[i] for i in order.sample(range(len(problems)), n_prompts)]
        with autocast:
            refresh_sampler(sampler, policy)
            sampler.eval()
            ro = rollout(sampler, ref, tok, batch[rank::world], args, (args.seed, step, rank))
            policy.train()
            t1 = time.time()
            try:
                loss, kl, grad_norm, mismatch = update(policy, ref, opt, ro, objective, args, world)
            except FloatingPointError as e:
                good = latest(args.out)
                raise SystemExit(f"step {step}: {e}; stopping. The last good checkpoint is "
                                 f"{good or 'none (no step was saved yet)'}.")
        t_update = time.time() - t1
        rec = step_record(ro, dev, world, args.batch)  # of the sampled rollouts (temperature T), over the ranks
        tokens_done += rec["tokens"]
        rate = tokens_done / (time.time() - t_start)
        eta = (time.time() - t_start) / (step - step0) * (args.steps - step) / 60
        T = len(kl)
        rec = dict(step=step, **rec, **{f"kl_t{t + 1}": kl[t] for t in range(T)}, loss=loss, grad_norm=grad_norm,
                   lp_mismatch=mismatch, t_sample=ro.t_sample, t_score=ro.t_score, t_update=t_update,
                   seconds=time.time() - t0)
        acc = " ".join(f"t{t + 1} {rec[f'acc_t{t + 1}']:.1%}" for t in range(T))
        fix = (f" (i->c {rec['delta_i2c']:.1%}, c->i {rec['delta_c2i']:.1%}{' t1->t2' if T > 2 else ''}, changed "
               f"{rec['changed']:.1%})") if T > 1 else ""
        say(f"{args.label + ': ' if args.label else ''}step {step}/{args.steps} | acc {acc}{fix} | "
            f"KL {' '.join(f't{t + 1} {kl[t]:.4f}' for t in range(T))} | loss {loss:+.4f} | |g| {grad_norm:.3f} | "
            f"{rate:.0f} tok/s | ETA {eta:.1f} min", flush=True)
        window.append(rec[f"acc_t{T}"])
        records = [rec]
        if heldout and (step % args.eval_every == 0 or step == args.steps):
            with autocast:
                refresh_sampler(sampler, policy)  # the weights of this step, after its update
                sampler.eval()
                records.append(evaluate.held_out(sampler, tok, heldout, args, step, say))
        if rank == 0:
            with open(log_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            for r in records:
                extra.log(r)
        # every rank saves (a sharded policy is gathered to rank 0, which writes) and keeps the same best
        paths = []
        if step % args.save_every == 0 or step == args.steps:
            paths.append("ckpt")
            if args.best_by == "train":
                reward = sum(window) / len(window)  # the final attempt's training reward since the last save
                best = max(best, reward)
                paths += ["best"] if best == reward else []  # the paper evaluates the best training reward's
            window = []
        if args.best_by == "eval" and len(records) > 1 and records[1][f"eval_acc_t{max(T, 2)}"] >= best:  # later wins
            best = records[1][f"eval_acc_t{max(T, 2)}"]
            paths.append("best")
        if args.keep_every and step % args.keep_every == 0:
            paths.append(f"step_{step:06d}")
        if paths:  # gathered and written once, the others copies
            save([os.path.join(args.out, p) for p in paths], policy, tok, opt, step, args,
                 {"best": best, "best_by": args.best_by})
        if world > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint being written
    extra.close()
    say(f"{name}: done; checkpoint {os.path.join(args.out, 'ckpt')}, best "
        f"{'training reward' if args.best_by == 'train' else 'held-out accuracy'} {best:.1%} in "
        f"{os.path.join(args.out, 'best')}", flush=True)
    if world > 1:
        del policy, sampler, opt  # a sharded policy holds the group (shard.teardown)
        shard.teardown()


def step_record(ro, dev, world, batch):
    """A step's log record of its sampled rollouts, summed over the ranks: acc_t1 .. acc_tT each attempt's
    accuracy; with T > 1, delta_i2c and delta_c2i (attempt 1 -> 2, the paper's) and changed (the share whose last
    answer differs from the first's, paper Figure 6b); len_y1 .. len_yT mean tokens; cut, the share of
    attempts that ran out of tokens; tokens generated, context (positions of every rollout) and trained
    (positions the update computes, each prompt once for its k samples)."""
    T = ro.r.shape[0]
    counts = {**{f"acc_t{t + 1}": ro.r[t].sum() for t in range(T)}, **{f"len_y{t + 1}": ro.len_y[t] for t in range(T)}}
    if T > 1:
        counts.update(delta_i2c=((1 - ro.r[0]) * ro.r[1]).sum(), delta_c2i=(ro.r[0] * (1 - ro.r[1])).sum(),
                      changed=sum(ro.changed))
    counts.update(cut=ro.cut / T, tokens=ro.n_generated, context=ro.n_context, trained=ro.n_context - ro.n_shared)
    flat = torch.tensor([float(x) for x in counts.values()], dtype=torch.float64, device=dev)
    if world > 1:
        dist.all_reduce(flat)
    rec = dict(zip(counts, flat.tolist()))
    return {name: int(x) if name in ("tokens", "context", "trained") else x / batch for name, x in rec.items()}


def run_config(args):
    """The run's flags, as the loggers' config: what JSON can hold."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None), list))}


# ------------------------------------------------------------------------------- presets and arguments
# Presets, in plain sight. Paper defaults (Table 5): Adam, temperature 1.0, alpha 10, beta1 0.01;
# MATH beta2 0.1, lr 5e-6, batch 512, 3000 steps; MBPP beta2 0.25, lr 1e-5, batch 128, 1500 steps.
# `batch` counts two-turn rollouts per update (prompts x k); `steps` is per stage.
# The demo's 0.8M-parameter model moves turn 1 through the weights it shares with turn 2 far more
# than a 1.5B model does, so its Stage I holds turn 1 with beta2 = 0.5 (0.1 let it collapse, see
# README.md). Its Stage I runs 300 steps (its Delta turns positive only after 100 to 160), its Stage II
# 300 at lr 1e-4 with every first attempt from the policy (--base-first 0: half from the base, paper 5.3,
# gave back Stage I's Delta on the demo); 450 + 150 corrected more but broke more (docs/RESULTS.md). `stage2` holds what a preset changes
# for Stage II. run.sh passes none of these again.
# The demo computes in bf16 where the CPU has bf16 matrix units (fp32 masters; 1.6x faster per step at
# its shapes on an AVX512-BF16 EPYC), in fp32 where it has not (model.auto_dtype).
PRESETS = {
    "demo": dict(task="demo", data=None, base="out/demo/base", root="out/demo", n_train=20000,
                 lr=3e-4, batch=128, k=4, micro_batch=128, steps=300, beta1=0.01, beta2=0.5, alpha=10.0,
                 max_new_tokens=16, save_every=10, threads=0, dtype="auto", eval_every=50, eval_n=500,
                 stage2=dict(steps=300, lr=1e-4, base_first=0.0)),
    "math": dict(task="math", data="data/math_train.jsonl", base="out/math/base", root="out/math", n_train=None,
                 lr=5e-6, batch=512, k=4, micro_batch=4, steps=3000, beta1=0.01, beta2=0.1, alpha=10.0,
                 max_new_tokens=1024, save_every=50, threads=0, gen_batch=256, eval_every=50, eval_n=None),
    "code": dict(task="mbpp", data="data/mbpp.jsonl", base="out/code/base", root="out/code", n_train=None,
                 lr=1e-5, batch=128, k=4, micro_batch=4, steps=1500, beta1=0.01, beta2=0.25, alpha=10.0,
                 max_new_tokens=1024, save_every=50, threads=0, gen_batch=128, eval_every=50, eval_n=None),
}


def get_args(stage, argv=None, run=None, unused=None):
    """Arguments of a stage script: a preset's values as defaults, every knob overridable. `run` names
    the default run directory under the preset's root (default: stage1 or stage2). `unused`: the weights the
    script's objective does not read (default: alpha in Stage I, beta2 in Stage II): given, they are refused."""
    unused = unused if unused is not None else ("alpha",) if stage == 1 else ("beta2",)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    name = pre.parse_known_args(argv)[0].preset
    preset = PRESETS[name]
    doc = (__import__("__main__").__doc__ or "") + (
        f"\nDefaults below are the {name!r} preset's for Stage {'I' * stage}; --preset changes them all.")
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="demo: the CPU demo; math: MATH train / MATH500 eval; code: MBPP train / HumanEval eval")
    p.add_argument("--task", choices=data.TASKS, help="the training task")
    p.add_argument("--data", help="training data path (see data.py for the formats)")
    p.add_argument("--n-train", type=int, help="use only the first N training problems")
    p.add_argument("--base", help="the base model's checkpoint: pi_ref, and the tokenizer")
    p.add_argument("--init", help="policy to start from (default: Stage I, --base; Stage II, the preset's Stage I "
                                  "checkpoint)")
    p.add_argument("--out", help="run directory: ckpt/ (latest checkpoint) and log.jsonl")
    p.add_argument("--steps", type=int, help="optimizer updates")
    p.add_argument("--batch", type=int, help="two-turn rollouts per update (prompts x k)")
    p.add_argument("--k", type=int, help="samples per prompt (for the leave-one-out baseline)")
    p.add_argument("--micro-batch", type=int, help="rollouts per forward/backward (gradient accumulation)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--alpha", type=float, help="alpha: weight of the Stage II bonus r(y2) - r(y1)")
    p.add_argument("--beta1", type=float, help="beta1: KL(pi || pi_ref) weight (turn 2 in Stage I, both turns in Stage II)")
    p.add_argument("--beta2", type=float, help="beta2: the strong KL weight on turn 1 in Stage I")
    p.add_argument("--kl", default="reward", choices=["reward", "loss"],
                   help="reward: the paper's RLOO, -beta * (log pi - log pi_ref) of each attempt in its return; "
                        "loss: a per-token k2 = 0.5 (log pi - log pi_ref)^2 in the loss (for comparison)")
    p.add_argument("--baseline", default="loo", choices=["loo", "none"],
                   help="loo: leave-one-out mean of the k samples of a prompt; none: the paper's plain REINFORCE")
    p.add_argument("--base-first", type=float, default=0.0,
                   help="fraction of first attempts y1 drawn from the base model (paper 5.3)")
    p.add_argument("--turns", type=int, help="attempts per rollout (default 2, the paper's): each after the first "
                                             "follows p1 and sees every earlier one; the objective credits each")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every turn")
    p.add_argument("--max-new-tokens", type=int, help="per turn")
    p.add_argument("--p1", help="the self-correction instruction (default: the paper's; the demo's is shorter)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "auto"], default="auto",
                   help="compute precision of sampling, reference and training (autocast over fp32 master weights); "
                        "auto: bf16 on a GPU or a CPU with bf16 matrix units, else fp32")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="LoRA adapters of rank R on every attention and MLP projection (0: full fine-tuning, the "
                        "paper's setting): the weights stay frozen in the compute dtype, only the fp32 adapters train, "
                        "and the reference is the policy with its adapters off (one copy of the weights)")
    p.add_argument("--lora-alpha", type=float, help="LoRA's alpha: the adapters' update is scaled by alpha / R "
                                                    "(default: 2 R)")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="keep only each block's input in the update and recompute the block in the backward: "
                        "activations shrink to about one block's, the update costs about a third more")
    p.add_argument("--gen-batch", type=int,
                   help="generate each step's rollouts in chunks of at most N rows (whole prompt groups); "
                        "default: all at once on the CPU, what fits the free memory on a GPU (memory.py)")
    p.add_argument("--save-every", type=int, help="checkpoint OUT/ckpt every N updates (and at the end)")
    p.add_argument("--eval-every", type=int,
                   help="every N steps and at the last, a greedy evaluation on held-out problems the run never trains on "
                        "(the demo's tune split; 1 in 25 of MATH's training file; MBPP's validation ids), an eval_* "
                        "record in log.jsonl and a progress line (0: off)")
    p.add_argument("--eval-n", type=int, help="held-out problems per evaluation (default: the demo 500, else all held out)")
    p.add_argument("--best-by", choices=["train", "eval"], default="train",
                   help="what best/ keeps: train, the step with the best training reward of the last attempt since "
                        "the last save (the paper's); eval, the best held-out accuracy of the last attempt "
                        "(needs --eval-every)")
    loggers.add_arguments(p)
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep OUT/step_NNNNNN every N updates (0: only ckpt/ and best/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (only --steps may change)")
    p.add_argument("--seed", type=int, default=0, help="seeds the problems' order and the sampling of every step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda; with torchrun, each process takes cuda:LOCAL_RANK")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument("--label", help="the run's name, at the start of every progress line (default: the stage's, "
                                   "at the start and end only)")
    for action in p._actions:
        if action.dest in unused:
            action.help = f"unused by {p.prog}: its objective has no {action.dest} (refused)"
    p.set_defaults(**{k: v for k, v in preset.items() if k not in ("root", "stage2", "data", *unused)})
    if stage == 2:
        p.set_defaults(**preset.get("stage2", {}))
    p.set_defaults(out=f"{preset['root']}/{run or f'stage{stage}'}")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the line that resumes the run repeats
    if args.data is None and args.task == preset["task"]:  # the preset's data is its task's, not another's
        args.data = preset["data"]
    args.unused, given = list(unused), [f for f in unused if getattr(args, f) is not None]
    error = f"--{given[0]} is unused by {p.prog}: its objective has no {given[0]}" if given else check_args(args)
    if error:  # one line, before anything is read or written
        p.exit(2, f"{p.prog}: error: {error}\n")
    if args.init is None:  # Stage I's policy starts from the base model it is held to, unless told otherwise
        args.init = args.base if stage == 1 else f"{preset['root']}/stage1/ckpt"
    if args.dtype == "auto":
        args.dtype = auto_dtype(args.device)
    warn_if_emulated(args.dtype, args.device)
    loggers.check(args)  # a missing package: one line, before anything is read
    if args.p1 is None:
        args.p1 = data.instruction(args.task)
    if args.turns is None:
        args.turns = 2
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora
    return args


def check_numbers(a):
    """The first nonsense among the numeric flags a script has (the stages', train_sft.py's), as a one-line
    message naming the flag; None if all is well. A flag the script lacks is not checked, nor is one that is None
    (all problems, all rows at once, the whole batch; a weight the script does not use)."""
    value, name = lambda flag: getattr(a, flag, None), lambda flag: "--" + flag.replace("_", "-")
    for flag in ("steps", "batch", "k", "micro_batch", "max_new_tokens", "save_every", "n_train", "gen_batch",
                 "problems", "epochs", "eval_n"):
        if value(flag) is not None and value(flag) < 1:
            return f"{name(flag)} must be at least 1 (got {value(flag)})"
    for flag in ("keep_every", "threads", "eval_every"):
        if value(flag) is not None and value(flag) < 0:
            return f"{name(flag)} must be at least 0 (got {value(flag)})"
    if not (math.isfinite(a.lr) and a.lr > 0):
        return f"--lr must be a positive number (got {a.lr})"
    if not (math.isfinite(a.temperature) and a.temperature > 0):
        return f"--temperature must be positive: RL samples its rollouts (got {a.temperature})"
    for flag in ("alpha", "beta1", "beta2", "grad_clip"):
        if value(flag) is not None and not (math.isfinite(value(flag)) and value(flag) >= 0):
            return f"{name(flag)} must be a number at least 0 (got {value(flag)})"
    if not 0.0 <= a.base_first <= 1.0:  # also false for nan
        return f"--base-first is a fraction in [0, 1] (got {a.base_first})"
    return None


def check_args(a):
    """A stage script's flags: check_numbers, then the rules of RL's batches and of LoRA, as a one-line message
    naming the flag; None if all is well."""
    error = check_numbers(a)
    if error:
        return error
    if a.turns is not None and a.turns < 2:
        return f"--turns must be at least 2: a stage trains attempts after the first (got {a.turns})"
    if a.k < 2 and a.baseline == "loo":
        return "--k 1 leaves the leave-one-out baseline no other sample: use --k 2 or more, or --baseline none"
    if a.batch % a.k or a.micro_batch % a.k:
        return f"--batch ({a.batch}) and --micro-batch ({a.micro_batch}) must be multiples of --k ({a.k})"
    if a.gen_batch is not None and a.gen_batch < a.k:
        return f"--gen-batch ({a.gen_batch}) must hold at least one prompt's k = {a.k} samples"
    if a.lora < 0:
        return f"--lora is a rank, 0 (full fine-tuning) or more (got {a.lora})"
    if a.lora_alpha is not None and not (math.isfinite(a.lora_alpha) and a.lora_alpha > 0):
        return f"--lora-alpha must be a positive number (got {a.lora_alpha})"
    if a.best_by == "eval" and not a.eval_every:
        return "--best-by eval keeps the step of the best held-out accuracy: it needs --eval-every N"
    if a.n_train is not None and a.n_train < a.batch // a.k:
        return f"--n-train {a.n_train} is fewer problems than a step's {a.batch // a.k} prompts (--batch / --k)"
    return device_error(a.device) or write_error(a.out) and f"--out {a.out}: {write_error(a.out)}"
