"""
The paper's first finding (Section 4, Table 3): supervised fine-tuning on correction traces that the base
model generated itself, kept by the oracle, does not teach self-correction. Two baselines:

    --method star   STaR (the paper's D_StaR): two-turn traces (x, y1, p1, y2) sampled from the base whose
                    first attempt is wrong and second right; the base is trained on y2 in its context.
    --method pair   Pair-SFT (Welleck et al. 2023, the paper's D_SFT): a wrong first attempt y1 paired with a
                    right attempt to the same problem sampled independently (another of its k samples), which
                    the base is trained on as the second attempt after y1.
    --plus          also the right-to-right traces (the paper's D+): STaR keeps rollouts whose both attempts
                    are right, Pair-SFT pairs a right first attempt with another right sample; they teach
                    keeping a right answer.

Collection: --k two-turn samples (temperature 1) of each of --problems training problems from the base,
batched as RL's rollouts are (rl.rollout, in chunks of --gen-batch rows); the kept traces go to
OUT/traces.jsonl for a reader to look at. Fine-tuning: sft_step (the demo base's own supervised
loop, fp32 masters under --dtype's autocast), the loss on the second attempt's tokens only, --epochs passes
over the kept traces in batches of --batch. The checkpoint (OUT/ckpt) is evaluated like every RL row.

    python train_sft.py --method star --base out/demo1/seed0/base --out out/star   # bash run.sh demo1's base
    python train_sft.py --preset math --method pair --base out/math/base
"""
import argparse
import json
import math
import os
import random
import time

import torch

import data
import loggers
import rl
import shard
from model import GPT, CheckpointError, auto_dtype, device_error, token_logprobs, warn_if_emulated, write_error
from sample import HelpFormatter, layout, seed_of
from tokenizer import Tokenizer


def sft_step(model, opt, batch, dtype, micro_batch=None, world=1):
    """One supervised step (the SFT baselines', and the demo base's in train_base.py): batch is a list of (ids, mask), mask marking the
    positions whose next token is trained on; the mean negative log-likelihood of those tokens over the
    batch, through the chunked head, accumulated over micro-batches of rows; under torchrun the ranks'
    gradients averaged; clipped to norm 1; one optimizer step. Returns the loss."""
    n_tok = sum(sum(mask) for _, mask in batch)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for s in range(0, len(batch), micro_batch or len(batch)):
        part = batch[s:s + (micro_batch or len(batch))]
        T = max(len(ids) for ids, _ in part)
        idx = torch.zeros(len(part), T, dtype=torch.long, device=model.head_weight.device)
        loss_mask = torch.zeros(len(part), T - 1, dtype=torch.bool, device=idx.device)
        for i, (ids, mask) in enumerate(part):
            idx[i, :len(ids)] = torch.tensor(ids)
            loss_mask[i, :len(mask)] = torch.tensor(mask)
        with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):  # fp32 masters
            h = model.hidden(idx[:, :-1])  # (B, T-1, d)
            logp = token_logprobs(h[loss_mask], model.head_weight, idx[:, 1:][loss_mask])
        loss = -logp.sum() / n_tok
        loss.backward()
        total += loss.item()
    if world > 1:
        shard.all_reduce_grads(model, average=True)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return total


def get_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="demo", choices=sorted(rl.PRESETS))
    preset = rl.PRESETS[pre.parse_known_args(argv)[0].preset]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(rl.PRESETS),
                   help="the task, data, base model and lengths of an RL preset")
    p.add_argument("--method", required=True, choices=["star", "pair"], help="star: STaR; pair: Pair-SFT")
    p.add_argument("--plus", action="store_true", help="also the right-to-right traces (D+)")
    p.add_argument("--base", default=preset["base"], help="the base model: it samples the traces and is fine-tuned")
    p.add_argument("--data", default=preset["data"], help="training data path (see data.py)")
    p.add_argument("--out", help="run directory (default: the preset's root / star, star_plus, pair or pair_plus)")
    p.add_argument("--problems", type=int, default=19_200,
                   help="training problems sampled from (the demo's RL rows see 600 steps x 32 prompts = 19,200)")
    p.add_argument("--k", type=int, default=preset["k"], help="two-turn samples per problem")
    p.add_argument("--gen-batch", type=int, default=preset.get("gen_batch") or 1024, help="rows sampled at once")
    p.add_argument("--epochs", type=int, default=2, help="passes over the kept traces")
    p.add_argument("--batch", type=int, default=64, help="traces per optimizer step")
    p.add_argument("--micro-batch", type=int, help="traces per forward/backward (default: the whole batch)")
    p.add_argument("--lr", type=float, default=preset["lr"], help="AdamW learning rate (default: the preset's RL rate)")
    p.add_argument("--max-new-tokens", type=int, default=preset["max_new_tokens"], help="per attempt")
    p.add_argument("--dtype", choices=["bf16", "fp32", "auto"], default="auto",
                   help="compute precision (autocast over fp32 masters); auto: bf16 on a GPU or a CPU with bf16 units")
    p.add_argument("--seed", type=int, default=0, help="seeds the problems, the sampling and the batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 leaves torch's own number (default: 0)")
    loggers.add_arguments(p)  # the fine-tuning's log.jsonl records, also to W&B / TensorBoard
    args = p.parse_args(argv)
    error = lambda msg: p.exit(2, f"{p.prog}: error: {msg}\n")  # one line, without the usage
    loggers.check(args)
    args.task, args.n_train, args.p1 = preset["task"], preset["n_train"], data.instruction(preset["task"])
    args.temperature, args.base_first = 1.0, 0.0  # the base's own samples, every first attempt its own
    wrong = rl.check_numbers(args) or (args.k < 2 and args.method == "pair" and
                                       "--method pair pairs a sample with another sample of the same problem: "
                                       "--k must be at least 2") or device_error(args.device)
    if wrong:  # one line, before anything is read or written
        error(wrong)
    if args.out is None:
        args.out = os.path.join(preset["root"], args.method + ("_plus" if args.plus else ""))
    if write_error(args.out):
        error(f"--out {args.out}: {write_error(args.out)}")
    if args.dtype == "auto":
        args.dtype = auto_dtype(args.device)
    warn_if_emulated(args.dtype, args.device)
    return args


def keep(ro, k, method, plus, rng):
    """The traces the method keeps from rollouts of k samples per problem (prompt-major rows): a list of
    (row of the first attempt, row of the second attempt, turn the second attempt was sampled at). STaR: a
    rollout's own two attempts, wrong then right (--plus: right then right too). Pair-SFT: a wrong first
    attempt and a right first attempt of another sample of the same problem, drawn independently of it
    (--plus: a right first attempt and another right one)."""
    r1, r2 = ro.r.tolist()
    out = []
    for g in range(len(r1) // k):
        rows = range(g * k, (g + 1) * k)
        if method == "star":
            out += [(i, i, 2) for i in rows if r2[i] == 1 and (r1[i] == 0 or plus)]
        else:
            right = [j for j in rows if r1[j] == 1]
            for i in rows:
                others = [j for j in right if j != i]
                if others and (r1[i] == 0 or plus):
                    out.append((i, rng.choice(others), 1))
    return out


def attempt(ro, row, turn):
    """The token ids of one attempt of a rollout row (turn 1 or 2), as it was sampled."""
    return ro.tokens[row, 1:][ro.turn[row] == turn].tolist()


def second_attempt_example(prompt, y1, y2, followup, eot_id):
    """(ids, mask) of a trace in RL's chat layout (sample.layout: x, y1, end of turn, p1, y2), the mask
    marking only the positions that predict y2's tokens: the loss is on the second attempt alone."""
    ids, (_, (s, e)) = layout(prompt, [y1, y2], followup, eot_id)
    return ids, [s - 1 <= t < e - 1 for t in range(len(ids) - 1)]


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.path.exists(os.path.join(args.out, "ckpt")):
        raise SystemExit(f"--out {args.out} already holds a run: choose a new --out (or delete {args.out} first)")
    watch = loggers.open(args, args.out, config=vars(args))
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    try:
        tok = Tokenizer.from_pretrained(args.base)
        base = GPT.from_pretrained(args.base, device=dev, dtype=compute).eval().requires_grad_(False)  # samples
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"--base {args.base}: {e}") from None
    problems = data.training_problems(args, tok, base.config.max_seq_len, print)
    order = random.Random(seed_of(args.seed, "problems")).sample(range(len(problems)), len(problems))
    problems = [problems[i] for i in (order * math.ceil(args.problems / len(problems)))[:args.problems]]
    followup = tok.render_followup([{"role": "user", "content": args.p1}])
    rng = random.Random(seed_of(args.seed, "pairs"))
    examples, traces, counts, t0 = [], [], [0, 0, 0, 0], time.time()
    per = max(1, args.gen_batch // args.k)  # problems per rollout
    for c, a in enumerate(range(0, len(problems), per)):
        chunk = problems[a:a + per]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            ro = rl.rollout(base, base, tok, chunk, args, seed=(args.seed, "collect", c))
        for x, y in zip(*ro.r.tolist()):
            counts[int(2 * x + y)] += 1  # wrong->wrong, wrong->right, right->wrong, right->right
        for i, j, turn in keep(ro, args.k, args.method, args.plus, rng):
            prompt = tok.render([{"role": "user", "content": chunk[i // args.k].prompt}])
            y1, y2 = attempt(ro, i, 1), attempt(ro, j, turn)
            examples.append(second_attempt_example(prompt, y1, y2, followup, tok.eot_id))
            traces.append({"problem": chunk[i // args.k].prompt, "y1": ro.texts[0][i], "y2": ro.texts[turn - 1][j],
                           "r1": ro.r[0, i].item(), "r2": ro.r[turn - 1, j].item(),
                           "rows": [a * args.k + i, a * args.k + j], "second_from_turn": turn})
        done, dt = min(a + per, len(problems)), time.time() - t0
        eta = dt / done * (len(problems) - done)
        print(f"collected {done}/{len(problems)} problems, kept {len(examples)} traces | {done / dt:.2f} problems/s | "
              f"ETA {eta // 60:.0f}m{eta % 60:02.0f}s", flush=True)
    n = sum(counts)
    print(f"the base's samples: w->w {counts[0] / n:.1%}, w->r {counts[1] / n:.1%}, r->w {counts[2] / n:.1%}, "
          f"r->r {counts[3] / n:.1%}; {args.method}{' +' if args.plus else ''} keeps {len(examples)} traces", flush=True)
    if not examples:
        raise SystemExit(f"{args.method}: no trace was kept from {len(problems)} problems; nothing to fine-tune on")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "traces.jsonl"), "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in traces)

    model = GPT.from_pretrained(args.base, device=dev, dtype=torch.float32).train()  # fp32 masters
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    steps = args.epochs * math.ceil(len(examples) / args.batch)
    shuffle = random.Random(seed_of(args.seed, "batches"))
    log, t0 = [], time.time()
    for epoch in range(args.epochs):
        order = shuffle.sample(range(len(examples)), len(examples))
        for b in range(0, len(order), args.batch):
            loss = sft_step(model, opt, [examples[i] for i in order[b:b + args.batch]], args.dtype, args.micro_batch)
            log.append({"step": len(log) + 1, "loss": loss})
            watch.log(log[-1])
            if len(log) % 10 == 0 or len(log) == steps:
                eta = (time.time() - t0) / len(log) * (steps - len(log)) / 60
                print(f"step {len(log)}/{steps} | loss {loss:.3f} | ETA {eta:.1f} min", flush=True)
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    watch.close()
    ckpt = os.path.join(args.out, "ckpt")
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    data.save_task_info(ckpt, args.task, args.p1, args.max_new_tokens)
    print(f"{args.method}{' +' if args.plus else ''}: done; checkpoint {ckpt}, traces {args.out}/traces.jsonl", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line, not a traceback; the checkpoint is written only at the end
        raise SystemExit("train_sft.py: stopped by Ctrl-C (SIGINT) before its checkpoint was written; run the same "
                         "command again to start over") from None
