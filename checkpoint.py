"""
A run's checkpoints (rl.py writes them, --resume and evaluate.py read them): each a whole directory (the
policy's fp32 masters, the tokenizer, task.json, and state.pt with Adam's state, the step and the run's
arguments), the same files whatever the number of processes, written into a temporary directory and swapped
in, so that a checkpoint on disk is always complete. A step's ckpt/, best/ and step_N/ are gathered and
written once, the others copies of the finished directory. --resume continues the same run: the flags that
change what a run computes must be those it was started with.
"""
import os
import shlex
import shutil
import sys

import torch
import torch.distributed as dist

import data
import shard
from model import GPT, add_lora, save_checkpoint
from tokenizer import Tokenizer


# Flags that change what a run computes: --resume refuses to continue a run with other values.
# gen_batch too: the chunks draw from streams of their own, so another chunking samples other rollouts.
RUN_FLAGS = ("preset", "task", "data", "n_train", "base", "batch", "k", "lr", "alpha", "beta1", "beta2", "kl",
             "baseline", "base_first", "temperature", "max_new_tokens", "p1", "grad_clip", "seed", "dtype", "gen_batch",
             "lora", "lora_alpha", "turns", "best_by")


def save(paths, policy, tok, opt, step, args, extra=None):
    """Write a whole checkpoint (the policy's fp32 masters, the tokenizer, task.json, and state.pt with the Adam
    state (opt.state_dict()), step and args) at each of `paths` (ckpt/, best/, step_N/): gathered and written
    once, at the first, the others copies of that finished directory (hard links where the file system allows:
    a checkpoint's files are never written again, each save writes new ones). Each path is written into a
    temporary directory, then swapped in: it is always a complete checkpoint (the previous one stays as
    path.old until the swap is done). Every rank calls it; rank 0 writes. The same files whatever the number of
    processes (a sharded policy and its Adam state are gathered whole: shard.full_state), so a run resumes on
    any number."""
    sharded = shard.is_sharded(policy)
    weights, adam = shard.full_state(policy, opt) if sharded else (None, opt.state_dict())  # whole, on rank 0
    if dist.is_initialized() and dist.get_rank() != 0:
        return

    def swap_in(write, path):
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    def write(tmp):
        if sharded:
            save_checkpoint(tmp, policy.config, weights)  # what save_pretrained writes of the whole model
        else:
            policy.save_pretrained(tmp)  # the model's own layout (a LoRA policy: its adapters and its base's path)
        tok.save_pretrained(tmp)
        data.save_task_info(tmp, args.task, args.p1, args.max_new_tokens)  # what evaluate.py and sample.py default to
        torch.save({"opt": adam, "step": step, "args": vars(args), **(extra or {})}, os.path.join(tmp, "state.pt"))
    swap_in(write, paths[0])
    for path in paths[1:]:
        swap_in(lambda tmp: shutil.copytree(paths[0], tmp, copy_function=_link_or_copy), path)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def latest(out):
    """The run's latest complete checkpoint directory, or None."""
    for d in ("ckpt", "ckpt.old"):
        p = os.path.join(out, d)
        if os.path.exists(os.path.join(p, "state.pt")):
            return p
    return None


def check_resume(saved, args):
    """--resume continues the same run: a flag that changes it is an error naming the flag. A run saved before a
    flag existed ran with its default (two attempts, best/ by the training reward); best/ by the held-out
    accuracy compares one held-out set across the run: --eval-n too."""
    saved = {"turns": 2, "best_by": "train", **saved}
    for k in RUN_FLAGS + (("eval_n",) if getattr(args, "best_by", "train") == "eval" else ()):
        if k in saved and saved[k] != getattr(args, k) and k not in args.unused:  # unused: changes nothing
            raise SystemExit(f"--resume: --{k.replace('_', '-')} is {getattr(args, k)!r} but the run in {args.out} "
                             f"was started with {saved[k]!r}; only --steps may change (or start a new --out)")


def where_to_resume(args, world):
    """What a stopped run says: its last checkpoint and its step (read memory-mapped: not the Adam state), and the
    command that continues it (the one that started it, with --resume); or that none was written yet."""
    ckpt = latest(args.out)
    if not ckpt:
        return "no checkpoint was written yet: run the same command to start again"
    step = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", mmap=True, weights_only=False)["step"]
    launch = [os.path.basename(sys.executable)] if world == 1 else ["torchrun", f"--nproc_per_node={world}"]
    command = shlex.join(launch + [sys.argv[0]] + [a for a in args.argv if a != "--resume"] + ["--resume"])
    return f"the last checkpoint is {ckpt} (step {step}; the steps after it are redone); resume with: {command}"


def lora_policy(init, args, dev, compute):
    """A LoRA run's policy: the base's weights, frozen in the compute dtype, with fp32 adapters: new ones of
    rank args.lora where init is the base itself, else init's own (a LoRA checkpoint of the same base)."""
    policy = GPT.from_pretrained(init, device=dev, dtype=compute)
    same = lambda a, b: os.path.realpath(a) == os.path.realpath(b)
    if policy.lora is None:
        if not same(init, args.base):
            raise SystemExit(f"--lora: --init {init} is neither --base {args.base} nor a LoRA checkpoint of it: the "
                             f"frozen weights must be the reference's")
        return add_lora(policy, args.lora, args.lora_alpha, args.base)
    if not same(policy.lora["base"], args.base):
        raise SystemExit(f"--lora: --init {init} holds adapters of {policy.lora['base']}, not of --base {args.base}")
    if (policy.lora["r"], policy.lora["alpha"]) != (args.lora, args.lora_alpha):
        raise SystemExit(f"--lora {args.lora} --lora-alpha {args.lora_alpha}: --init {init} holds adapters of rank "
                         f"{policy.lora['r']}, alpha {policy.lora['alpha']}")
    return policy


def check_same_model(policy, ref, ours, init, base):
    """The KL to pi_ref is a comparison of two distributions over one vocabulary, computed by one architecture:
    a policy (--init) whose configuration (max_seq_len aside) or tokenizer differs from the reference's (--base,
    whose tokenizer `ours` the run uses) is refused, naming both."""
    fields = [f for f in vars(ref) if f != "max_seq_len" and getattr(policy, f) != getattr(ref, f)]
    differ = [f"{f} {getattr(policy, f)} against {getattr(ref, f)}" for f in fields]
    try:
        tok = Tokenizer.from_pretrained(init)  # a checkpoint without tokenizer files is read with --base's
    except FileNotFoundError:
        tok = None
    if tok is not None and not tok.same_as(ours):
        differ.append(f"tokenizer {tok.enc.name} ({tok.vocab_size} tokens) against {ours.enc.name} "
                      f"({ours.vocab_size} tokens)")
    if differ:
        raise SystemExit(f"--init {init} is not a model of --base {base}'s shape ({'; '.join(differ)}): the KL to "
                         f"a reference of another architecture or tokenizer means nothing")
