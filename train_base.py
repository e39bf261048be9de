"""
The demo only: train the small base model from scratch on solved examples of the built-in task
(its tokenizer merges the chat roles, the numbers and the words of p1), and stop while it still
errs, so that there is something for self-correction to fix.

Its second turn behaves as the models the paper starts from do (Gemini 1.5 Flash on MATH: Delta
-11.2, i->c 4.6%, c->i 15.8%): told "there might be an error", it often gives up its answer. Half of
the examples (--two-turn) add p1 and a second answer: half of those (--change) another pair of the
numbers, which is wrong, the rest the same right answer again. A changed answer is a near miss
(--change-to near): a wrong pair drawn with weight exp(-|a + b - target|), the move of a model that
doubts itself, so that when the base changes a wrong answer, its knowledge of the task shapes where
it goes. The base never sees a wrong first attempt, let alone a correction (that would be Pair-SFT,
one of the paper's baselines): what it does after a wrong first attempt is its own.

Measured on the tuning problems (docs/RESULTS.md): a base that only repeated its answer (--change 0)
copied it at turn 2 so faithfully that Stage I found nothing to learn; one whose changes went to any
wrong pair alike (--change-to random) changed to the right pair 1 time in 9 after a wrong first attempt,
too rarely for RL to build on, and no RL row learned to correct. Answers name their numbers as the
prompt does, one token each (" 15+ 3"; --numbers digits spells "15+3" digit by digit, as before).

    python train_base.py --out out/demo/base    # the base the other scripts' demo defaults start from
"""
import argparse
import math
import os
import random
import sys
import time

import torch

import torch.distributed as dist

import data
import evaluate
import shard
from model import GPT, GPTConfig, auto_dtype, warn_if_emulated, write_error
from sample import HelpFormatter
from tokenizer import Tokenizer
from train_sft import sft_step


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="out/demo/base",
                   help="checkpoint directory to write (new: an existing base or run is never overwritten)")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-embd", type=int, default=128, help="width of the residual stream (a multiple of --n-head)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--n-kv-head", type=int, default=2, help="key/value heads (GQA; --n-head is a multiple of it)")
    p.add_argument("--batch", type=int, default=64, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (after 100 steps of warm-up)")
    p.add_argument("--max-steps", type=int, default=3000, help="at most this many steps")
    p.add_argument("--eval-every", type=int, default=50,
                   help="check the greedy accuracy and save the checkpoint every N steps")
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems for the greedy accuracy check")
    p.add_argument("--stop-acc", type=float, default=0.5,
                   help="stop at the first evaluation whose greedy accuracy reaches this (the base must still err)")
    p.add_argument("--change", type=float, default=0.5,
                   help="fraction of the two-turn examples whose second answer is another (wrong) pair")
    p.add_argument("--change-to", choices=["near", "random"], default="near",
                   help="where a changed answer goes: a near miss (a wrong pair, weight exp(-|a + b - target|)) "
                        "or any wrong pair alike")
    p.add_argument("--numbers", choices=["tokens", "digits"], default="tokens",
                   help='how an answer writes its numbers: as the prompt does, one token each (" 15+ 3"), or '
                        'digit by digit ("15+3")')
    p.add_argument("--two-turn", type=float, default=0.5,
                   help="fraction of examples with a second turn (p1, then the same right answer)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the training problems")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 leaves torch's own number (default: 0)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "auto"], default="auto",
                   help="compute precision of the training steps (autocast over fp32 weights; evaluation in fp32); "
                        "auto: bf16 on a CPU with bf16 matrix units, else fp32")
    args = p.parse_args(argv)
    error = check_args(args)
    if error:  # one line, before anything is written
        p.exit(2, f"{p.prog}: error: {error}\n")
    if args.dtype == "auto":
        args.dtype = auto_dtype("cpu")
    warn_if_emulated(args.dtype, "cpu")
    return args


def check_args(a):
    """The first nonsense among the flags, as a one-line message naming the flag; None if all is well."""
    for flag in ("n_layer", "n_embd", "n_head", "n_kv_head", "batch", "max_steps", "eval_every", "eval_n"):
        if getattr(a, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(a, flag)})"
    if a.threads < 0:
        return f"--threads must be at least 0 (got {a.threads})"
    if a.n_embd % a.n_head or a.n_head % a.n_kv_head:
        return (f"--n-embd ({a.n_embd}) must be a multiple of --n-head ({a.n_head}), and --n-head of --n-kv-head "
                f"({a.n_kv_head})")
    if not (math.isfinite(a.lr) and a.lr > 0):
        return f"--lr must be a positive number (got {a.lr})"
    for flag in ("stop_acc", "change", "two_turn"):
        if not 0.0 <= getattr(a, flag) <= 1.0:  # also false for nan
            return f"--{flag.replace('_', '-')} is a fraction in [0, 1] (got {getattr(a, flag)})"
    if os.path.exists(a.out) and (not os.path.isdir(a.out) or os.listdir(a.out)):
        return f"--out {a.out} already exists: a base or a run is never overwritten; choose a new --out (or delete it first)"
    return write_error(a.out) and f"--out {a.out}: {write_error(a.out)}"


def answer(a, b, numbers="tokens"):
    """The text of an answer naming the pair a, b: " 15+ 3" (each number one token, as in the prompt)
    or "15+3" (digits)."""
    return f" {a}+ {b}" if numbers == "tokens" else f"{a}+{b}"


def example(tok, prob, rng, two_turn, change=0.0, change_to="near", numbers="tokens"):
    """(ids, loss mask over the predicted positions): chat(x), the right answer, the end of the turn;
    with probability two_turn, then p1 and a second answer: with probability `change` another pair of
    the numbers, always wrong (the base gives up a right answer when told it may be wrong: a near miss,
    or any wrong pair alike), else the same answer again."""
    prompt = tok.render([{"role": "user", "content": prob.prompt}])
    right = tuple(map(int, prob.reference.split("+")))
    y = tok.encode(answer(*right, numbers)) + [tok.eot_id]
    ids, mask = prompt + y, [False] * (len(prompt) - 1) + [True] * len(y)  # train the answers, not x or p1
    if rng.random() < two_turn:
        pair = right
        if rng.random() < change:
            nums, target = prob.meta["numbers"], prob.meta["target"]
            wrong = [(a, b) for i, a in enumerate(nums) for b in nums[i + 1:] if a + b != target]
            weights = [math.exp(-abs(a + b - target)) if change_to == "near" else 1.0 for a, b in wrong]
            pair = rng.choices(wrong, weights)[0]
        y = tok.encode(answer(*pair, numbers)) + [tok.eot_id]
        followup = tok.render_followup([{"role": "user", "content": data.DEMO_P1}])
        ids, mask = ids + followup + y, mask + [False] * len(followup) + [True] * len(y)
    return ids, mask


def greedy_accuracy(model, tok, problems):
    """Greedy first-attempt accuracy (under torchrun the ranks share the problems)."""
    model.eval()
    texts = evaluate.attempts(model, tok, problems, 1, data.DEMO_P1, max_new_tokens=16, batch=100)[0]
    model.train()
    return sum(data.rewards(problems, texts)) / len(problems)


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, _ = shard.setup_distributed("cpu")  # under torchrun: gloo processes, gradients averaged
    torch.manual_seed(args.seed)
    tok = Tokenizer.byte_level(data.DEMO_WORDS)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head,
                       n_embd=args.n_embd, intermediate_size=3 * args.n_embd, max_seq_len=512, tie_embeddings=True,
                       arch="qwen2")
    model = GPT(config).init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    held_out = data.make_demo(args.eval_n, seed=10_000 + args.seed, split="tune")  # never an evaluation problem
    train_seed = args.seed * 1_000_003
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"base model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world} process(es)")
    t0, acc = time.time(), 0.0
    for step in range(1, args.max_steps + 1):
        lr = args.lr * min(1.0, step / 100)  # short warm-up, then constant
        for g in opt.param_groups:
            g["lr"] = lr
        problems = data.make_demo(args.batch * world, seed=train_seed + step)[rank::world]  # training split; this rank's share
        rng = random.Random(train_seed + step)
        batch = [example(tok, p, rng, args.two_turn, args.change, args.change_to, args.numbers) for p in problems]
        loss = sft_step(model, opt, batch, args.dtype, world=world)
        if step % args.eval_every == 0 or step == args.max_steps:
            prev, acc = acc, greedy_accuracy(model, tok, held_out)  # every rank: the same weights, the same verdict
            rate = step / (time.time() - t0)
            # the run stops at stop_acc: extrapolate the accuracy's last gain; max_steps bounds it
            left = 0 if acc >= args.stop_acc else args.max_steps - step
            if prev < acc < args.stop_acc:
                left = min(left, math.ceil((args.stop_acc - acc) / (acc - prev)) * args.eval_every)
            say(f"step {step:5d} | loss {loss:.3f} | greedy acc {acc:.1%} (stops at {args.stop_acc:.0%}) | "
                f"{rate:.1f} steps/s | ETA {left / rate / 60:.1f} min at the last gain in accuracy "
                f"(at most {(args.max_steps - step) / rate / 60:.0f} min)", flush=True)
            if rank == 0:
                model.save_pretrained(args.out)
                tok.save_pretrained(args.out)
                data.save_task_info(args.out, "demo", data.DEMO_P1, 16)
            if acc >= args.stop_acc:
                break
    if world > 1:
        dist.destroy_process_group()
    say(f"saved {args.out}: greedy accuracy {acc:.1%} on {args.eval_n} held-out problems after {step} steps")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line, not a traceback
        print("train_base.py: stopped by Ctrl-C (SIGINT); what --out holds is the base of the last evaluation, "
              "unfinished: delete it and run the same command again", file=sys.stderr)
        raise SystemExit(130)
