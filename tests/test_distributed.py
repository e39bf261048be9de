"""Several processes on the CPU with the gloo backend. Two processes, each holding half of a global batch,
make the same update as one process holding all of it:
- full fine-tuning, the policy sharded by FSDP2 (shard.py), Stage I and Stage II, fp32 and bf16 autocast:
  after two steps the weights agree within 1e-5, and so do each step's loss, KLs and gradient norm (1e-5
  relative: a gradient summed twice, or averaged, shows in the norm, which Adam's step and clipping hide)
  and the last gradients (1e-5 of their largest entry); the sampler copy gathered from the shards is the
  updated policy, and each rank holds the shard of weights and Adam state that memory.py counts. In bf16
  both sides run whole rows (--checkpoint-activations): on one process the update otherwise runs each
  prompt once for its k rows, which rounds differently in bf16 (sharded, the policy always runs whole rows).
  Each rank's peak memory in an update, counted op by op, lies where memory.py's per-rank terms put it.
- a LoRA policy, whole on every rank, its adapters' gradients all-reduced: the same, to the same tolerances.
(At Adam's lr 1e-3 the two sides' sum-order noise stays below 2e-6 in every measure; a lr of 1e-2 moves some
entries by more, as Adam divides tiny gradients by tinier second moments.)
torchrun runs a stage end to end; and a run or an evaluation leaves no process group behind."""
import gc
import json
import os
import socket
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
import evaluate
import memory
import rl
import shard
import train_stage1
import train_stage2
from model import GPT, GPTConfig, add_lora
from tokenizer import Tokenizer

ARGS = SimpleNamespace(k=2, max_new_tokens=5, temperature=1.0, p1=data.DEMO_P1, base_first=0.0, micro_batch=2,
                       grad_clip=1.0, alpha=10.0, beta1=0.01, beta2=0.1, baseline="loo", kl="reward", gen_batch=None,
                       checkpoint_activations=False)
CFG = GPTConfig(vocab_size=Tokenizer.byte_level().vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                intermediate_size=64, max_seq_len=512, tie_embeddings=True)
# (name, objective, dtype): the FSDP2 cases
CASES = [(f"stage{s} {d}", o, d) for s, o in ((1, train_stage1.objective), (2, train_stage2.objective))
         for d in ("fp32", "bf16")]


def setup(seed, lora=False):
    """A policy, its reference (with LoRA: itself, adapters off) and three batches of rollouts of 4 prompts x 2."""
    torch.manual_seed(seed)
    tok = Tokenizer.byte_level()
    policy, ref = GPT(CFG).init_weights(std=0.3), GPT(CFG).init_weights(std=0.3)
    if lora:
        policy = ref = add_lora(policy, 4, 8.0, "unused")
        for name, p in policy.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.3)  # adapters that change the model: both A and B get gradients
    ros = []
    for i in range(3):
        ro = rl.rollout(policy, ref, tok, data.make_demo(4, seed=3 + i), ARGS, seed=5 + i)
        ro.r = torch.tensor([[1.0, 0, 0, 1, 1, 1, 0, 0],  # varied rewards, so every term has a gradient
                             [1.0, 1, 0, 0, 1, 0, 1, 0]]).roll(i, 1)
        ros.append(ro)
    return policy, ref, ros


def rows_of(ro, rows):
    out = SimpleNamespace(**vars(ro))
    for name in ("tokens", "turn", "lp_old", "group", "first_from_pi"):
        setattr(out, name, getattr(ro, name)[rows])
    out.r = ro.r[:, rows]
    return out


def steps(policy, ref, ros, objective, dtype, world=1, rank=0, opt=None):
    """An update per batch of rollouts as rl.train makes them (a fresh autocast each step; sharded, without its
    weight cache), on the whole batches or, with world 2, on rank's share: prompts rank, rank + 2 (rl.train's
    batch[rank::world]). opt: a fresh Adam (as rl.train builds it) unless given."""
    opt = opt or adam(policy)
    args = SimpleNamespace(**{**vars(ARGS), "checkpoint_activations": dtype == "bf16"})
    rows = torch.tensor([p * 2 + j for p in range(rank, 4, world) for j in range(2)])
    stats = []
    for ro in ros:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16",
                            cache_enabled=not shard.is_sharded(policy)):
            stats.append(rl.update(policy, ref, opt, rows_of(ro, rows), objective, args, world=world))
    return opt, stats


def adam(policy):
    return torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)


def save(out, policy, opt):
    """checkpoint.save's checkpoint of the Stage II fp32 case after its first two batches (step 2)."""
    args = SimpleNamespace(task="demo", p1=data.DEMO_P1, max_new_tokens=ARGS.max_new_tokens)
    rl.save([out], policy, Tokenizer.byte_level(), opt, 2, args)


def resume(ckpt, world=1, rank=0):
    """What rl.train does at --resume (the policy from the checkpoint, sharded over world > 1 processes, Adam's
    state loaded into a fresh Adam), then the Stage II fp32 case's third batch."""
    policy = GPT.from_pretrained(ckpt, dtype=torch.float32)
    if world > 1:
        shard.shard(policy)
    opt = adam(policy)
    shard.load_optimizer(policy, opt, torch.load(os.path.join(ckpt, "state.pt"), mmap=True, weights_only=False)["opt"])
    _, ref, ros = setup(0)
    steps(policy, ref, ros[2:], train_stage2.objective, "fp32", world, rank, opt)
    return policy


def worker(rank, port, out_dir):
    """Each FSDP2 case (two batches), then the LoRA case, on rank's half of each batch. Stage II fp32 writes its
    checkpoint (2 processes -> 1) and resumes from the one that one process wrote (1 -> 2) for the third batch."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rank_, world, _ = shard.setup_distributed("cpu")
    assert (rank_, world) == (rank, 2)
    got = {}
    for name, objective, dtype in CASES:
        policy, ref, ros = setup(0)
        shard.shard(policy)
        sampler = rl.make_sampler(policy, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        opt, stats = steps(policy, ref, ros[:2], objective, dtype, world=2, rank=rank)
        rl.refresh_sampler(sampler, policy)
        if name == "stage2 fp32":
            save(os.path.join(out_dir, "ckpt2"), policy, opt)
        got[name] = {"stats": stats, "weights": {n: p.full_tensor() for n, p in policy.named_parameters()},
                     "grads": {n: p.grad.full_tensor() for n, p in policy.named_parameters()},
                     "sampler": {n: p.clone() for n, p in sampler.named_parameters()}, "separate": sampler is not policy,
                     "local": sum(p.to_local().numel() for p in policy.parameters()),
                     "adam": sum(t.to_local().numel() for s in opt.state.values() for k, t in s.items() if k != "step")}
    policy = resume(os.path.join(out_dir, "ckpt1"), world=2, rank=rank)
    got["resumed"] = {n: p.full_tensor() for n, p in policy.named_parameters()}
    policy, _, ros = setup(0, lora=True)
    opt, stats = steps(policy, policy, ros[:2], train_stage2.objective, "fp32", world=2, rank=rank)
    got["lora"] = {"stats": stats, "weights": {n: p.detach().clone() for n, p in policy.named_parameters()},
                   "grads": {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}}
    torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    del policy, opt
    shard.teardown()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """What each rank of a two-process run made of every case (one spawn for all of them), and the directory of
    the checkpoints: ckpt1 (written by one process before the spawn) and ckpt2 (by the two processes)."""
    out = tmp_path_factory.mktemp("fsdp")
    policy, ref, ros = setup(0)
    opt, _ = steps(policy, ref, ros[:2], train_stage2.objective, "fp32")
    save(str(out / "ckpt1"), policy, opt)
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)] + [out]


def same_update(got, stats, policy):
    flat = lambda s: [s[0], *s[1], *s[2:]]  # per step: loss, [KL of each turn], gradient norm, mismatch
    for a, b in zip(got["stats"], stats):
        assert all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(flat(a), flat(b))), (a, b)
    for n, p in policy.named_parameters():
        if p.requires_grad:
            assert (got["grads"][n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), n
        assert (got["weights"][n] - p.detach()).abs().max() <= 1e-5, n


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fsdp_two_processes_make_the_single_process_update(two_processes, case):
    name, objective, dtype = case
    policy, ref, ros = setup(0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    _, stats = steps(policy, ref, ros[:2], objective, dtype)
    same_update(two_processes[0][name], stats, policy)
    assert all(not torch.equal(before[n], p) for n, p in policy.named_parameters())  # every weight moved
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for got in two_processes[:2]:  # each rank's sampler: a whole copy of the updated policy, in the compute dtype
        assert got[name]["separate"]  # in fp32 too: sampling with the sharded policy would gather it at every token
        assert all(torch.equal(got[name]["sampler"][n], got[name]["weights"][n].to(compute)) for n in before)
    assert all(torch.equal(two_processes[0][name]["weights"][n], two_processes[1][name]["weights"][n]) for n in before)


def test_each_rank_holds_the_shard_memory_counts(two_processes):
    """memory.py's per-rank weights and Adam state: 4 and 8 bytes per element of the largest rank's shard (FSDP2
    splits each parameter's first dimension in world chunks, the first ones rounded up); its sampler: the bytes
    of the copy each rank samples with."""
    knobs = SimpleNamespace(batch=8, k=2, micro_batch=2, max_new_tokens=5, gen_batch=None, dtype="fp32", device="cpu")
    m = memory.memory_model(CFG, knobs, world=2)
    local = max(got["stage1 fp32"]["local"] for got in two_processes[:2])
    assert two_processes[0]["stage1 fp32"]["local"] == local  # rank 0 holds the rounded-up chunks
    with torch.device("meta"):
        P = sum(p.numel() for p in GPT(CFG).parameters())
    assert P // 2 < local < P and (m["weights"], m["grads"], m["adam"]) == (4 * local, 4 * local, 8 * local)
    assert two_processes[0]["stage1 fp32"]["adam"] == 2 * local
    for dtype in ("fp32", "bf16"):  # the sampler: a whole copy in the compute dtype on every rank
        sampler = two_processes[1][f"stage1 {dtype}"]["sampler"]
        m = memory.memory_model(CFG, SimpleNamespace(**{**vars(knobs), "dtype": dtype}), world=2)
        assert m["sampler"] == sum(t.numel() * t.element_size() for t in sampler.values())


def test_lora_two_processes_make_the_single_process_update(two_processes):
    policy, _, ros = setup(0, lora=True)
    _, stats = steps(policy, policy, ros[:2], train_stage2.objective, "fp32")
    same_update(two_processes[0]["lora"], stats, policy)
    assert all(torch.equal(two_processes[0]["lora"]["weights"][n], two_processes[1]["lora"]["weights"][n])
               for n, _ in policy.named_parameters())


def test_checkpoints_resume_on_another_number_of_processes(two_processes):
    """A checkpoint written by two processes resumes on one, and one written by one process resumes on two: after
    the third batch, the weights of one process that never stopped (1e-5). The two processes write the files one
    process writes: the same names, shapes and layout (Adam's state keyed by the parameter's index), the same
    values to the update's tolerance."""
    policy, ref, ros = setup(0)
    opt, _ = steps(policy, ref, ros, train_stage2.objective, "fp32")  # three batches, no checkpoint
    out = two_processes[2]
    for name, got in (("2 -> 1", dict(resume(str(out / "ckpt2")).named_parameters())),
                      ("1 -> 2", two_processes[0]["resumed"])):
        for n, p in policy.named_parameters():
            assert (got[n] - p).abs().max() <= 1e-5, (name, n)
    one, two = ({f: torch.load(out / c / f, weights_only=False) for f in ("model.pt", "state.pt")} for c in ("ckpt1", "ckpt2"))
    assert one["model.pt"].keys() == two["model.pt"].keys()
    assert all((one["model.pt"][k] - v).abs().max() <= 1e-5 for k, v in two["model.pt"].items())
    a, b = one["state.pt"]["opt"], two["state.pt"]["opt"]
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() == set(range(len(a["state"])))
    for i, s in a["state"].items():
        assert s.keys() == b["state"][i].keys() and all(s[k].shape == b["state"][i][k].shape for k in s)
        assert torch.equal(s["step"], b["state"][i]["step"]) and (s["exp_avg"] - b["state"][i]["exp_avg"]).abs().max() <= 1e-5
    assert {k: v for k, v in one["state.pt"].items() if k != "opt"} == {k: v for k, v in two["state.pt"].items() if k != "opt"}


def run_worker(rank, ports, base, out_dir):
    """rl.run's two-process run, then evaluate.py's; after each, the names of this process's threads. Each joins
    its group on a port of its own: on the same one, a rank that left rl.run first could reach the store that the
    other rank still holds from rl.run, closed under it ("Connection reset by peer"; torchrun starts each in a
    process of its own)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    threads = lambda: " ".join(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    run = os.path.join(out_dir, "run")
    rl.run(rl.get_args(2, ["--base", base, "--init", base, "--out", run, "--steps", "1", "--batch", "4", "--k", "2",
                           "--micro-batch", "2", "--max-new-tokens", "3", "--n-train", "8", "--device", "cpu",
                           "--threads", "1", "--eval-every", "1", "--eval-n", "7", "--keep-every", "1"]),
           train_stage2.objective, "Stage II")
    after_run = threads()
    os.environ["MASTER_PORT"] = str(ports[1])
    evaluate.main(["--ckpt", os.path.join(run, "ckpt"), "--task", "demo", "--n", "4", "--batch", "2", "--device", "cpu"])
    with open(os.path.join(out_dir, f"threads{rank}"), "w") as f:
        f.write(after_run + "\n" + threads())


def test_run_and_evaluate_leave_no_process_group_behind(tmp_path):
    """When rl.run or evaluate.main returns under two processes, the gloo group is gone with its threads.
    (It was not. rl.run: Adam's constructor imports torch._dynamo, which imports torch.distributed.nn,
    whose defaults group=group.WORLD then held the group past destroy_process_group; evaluate.py never
    destroyed it. Its threads ran into the interpreter's shutdown, where a thread that releases a
    tensor's Python object is ended mid-way: a rank aborted after "done" with "terminate called without
    an active exception".)"""
    tok = Tokenizer.byte_level()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32,
                    max_seq_len=512, tie_embeddings=True)
    GPT(cfg).init_weights().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    mp.spawn(run_worker, args=((free_port(), free_port()), str(tmp_path / "base"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        for what, threads in zip(("rl.run", "evaluate.main"), (tmp_path / f"threads{rank}").read_text().split("\n")):
            assert "gloo" not in threads, (rank, what, threads)
    # the held-out evaluation split over the two ranks (7 problems: 4 and 3) is one process's evaluate.py
    (rec,) = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "eval_n" in r]
    evaluate.main(["--ckpt", str(tmp_path / "run" / "step_000001"), "--task", "demo", "--split", "tune", "--n", "7",
                   "--device", "cpu", "--out", str(tmp_path / "one.json")])
    one = json.loads((tmp_path / "one.json").read_text())
    got = {k[5:]: v for k, v in rec.items() if k.startswith("eval_") and k != "eval_seconds"}
    assert got["n"] == 7 and got == {k: one[k] for k in got}


class LiveBytes(TorchDispatchMode):
    """Bytes allocated on the CPU, counted without an allocator's statistics (the CPU has none): the distinct
    storages of the tensors Python holds when it starts, and of every tensor an op then reads or writes, each at its
    current size (FSDP2 grows a gathered parameter's storage and frees it in place) until it dies. peak: the most at
    once, after any op run under it. Not seen: an op's internal temporaries, those of the ops a DTensor runs on its
    local shards, and what gloo's threads allocate."""

    def __init__(self):
        super().__init__()
        self.storages = {}  # the storage's address -> a weak reference to it
        gc.collect()
        for t in gc.get_objects():
            if issubclass(type(t), torch.Tensor):
                self.track(t)
        self.start = self.peak = self.now()

    def track(self, t):
        s = getattr(t, "_local_tensor", t).untyped_storage()  # a DTensor (FSDP2's shards): this rank's local tensor
        known = self.storages.get(s._cdata)
        if known is None or known() is None:  # a freed storage's address can come back
            self.storages[s._cdata] = weakref.ref(s)

    def now(self):
        held = [(k, r, r()) for k, r in self.storages.items()]
        self.storages = {k: r for k, r, s in held if s is not None}
        return sum(s.nbytes() for _, _, s in held if s is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if issubclass(type(t), torch.Tensor):  # type(): some arguments warn when asked for __class__
                self.track(t)
        self.peak = max(self.peak, self.now())
        return out


# Blocks wide for the tokens they see, so that what FSDP2 gathers outweighs the activations: 1M parameters a block,
# 48 tokens a micro-batch; three blocks, so that a middle block's backward has one before it and one after
WIDE = GPTConfig(vocab_size=CFG.vocab_size, n_layer=3, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=1024,
                 max_seq_len=64, tie_embeddings=True)
SHORT = dict(prompt_len=8, followup_len=4)  # the rollouts' layout: prompt, y1, eot, followup, y2, one position more


def short_rollouts(rows, seed):
    """`rows` rollouts (groups of ARGS.k rows sharing a prompt) of random tokens, laid out as rl.rollout lays them:
    each attempt ARGS.max_new_tokens long, at the memory model's worst-case positions."""
    g = torch.Generator().manual_seed(seed)
    p, f, n = SHORT["prompt_len"], SHORT["followup_len"], ARGS.max_new_tokens
    width = p + 2 * n + f + 3  # + eot and one position: memory.py's row of p + 2n + f + 2 positions, and its last target
    tokens = torch.randint(0, WIDE.vocab_size, (rows, width), generator=g)
    tokens[:, :p] = tokens[::ARGS.k, :p].repeat_interleave(ARGS.k, 0)
    j = torch.arange(width - 1).expand(rows, -1)  # target positions
    turn = ((j >= p - 1) & (j < p - 1 + n)).to(torch.int8) + 2 * (j >= width - 1 - n).to(torch.int8)
    return SimpleNamespace(tokens=tokens, turn=turn, lp_old=-torch.rand(rows, width - 1, generator=g),
                           r=torch.stack([torch.arange(rows) % 2 * 1.0, torch.arange(rows) // 2 % 2 * 1.0]),
                           group=torch.arange(rows) // ARGS.k,
                           first_from_pi=torch.ones(rows, dtype=torch.bool))


def memory_worker(rank, port, out_dir):
    """Per dtype, as rl.train holds them: WIDE sharded, a whole reference and sampler in the compute dtype, Adam; two
    updates of two micro-batches each (autocast without its cache), each under LiveBytes."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    shard.setup_distributed("cpu")
    got = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        policy = shard.shard(GPT(WIDE).init_weights())
        ref = GPT(WIDE).init_weights().to(compute).eval().requires_grad_(False)
        sampler = rl.make_sampler(policy, compute)
        opt = adam(policy)
        for step in range(2):  # the peak of the second: the first also allocates the gradients and Adam's state
            ro = short_rollouts(2 * ARGS.micro_batch, seed=2 * step + rank)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16", cache_enabled=False), \
                    LiveBytes() as live:
                rl.update(policy, ref, opt, ro, train_stage2.objective, ARGS, world=2)
        got[dtype] = live.peak - live.start
        del policy, ref, sampler, opt, live
    torch.save(got, os.path.join(out_dir, f"memory{rank}.pt"))
    shard.teardown()


def test_each_ranks_update_peak_is_what_memory_counts(tmp_path):
    """memory.py's per-rank update under FSDP2 against each rank's measured peak (LiveBytes, above the state the step
    starts with: the shards, gradients, Adam, reference and sampler; test_each_rank_holds_the_shard_memory_counts
    counts those). The model adds its transients at their largest: the activations and autocast's casts that
    autograd keeps, the log-prob head's buffers, and "gathered" (the root and four blocks' worth of weights and
    gradients whole); the backward frees a block's activations and casts as it moves to the next block, so the
    measured peak lies between the model's update without those two and the model's update. Here "gathered" is
    most of the update (16 MB of 20 in fp32): one block's weights or gradients (4 MB) counted more or fewer than
    FSDP2 holds leave the window (measured: 17.9 MB in [16.3, 20.2] in fp32, 20.7 in [16.5, 24.5] in bf16)."""
    mp.spawn(memory_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"memory{rank}.pt")
        for dtype in ("fp32", "bf16"):
            knobs = SimpleNamespace(batch=4 * ARGS.micro_batch, k=ARGS.k, micro_batch=ARGS.micro_batch,
                                    max_new_tokens=ARGS.max_new_tokens, gen_batch=None, device="cpu", dtype=dtype)
            m = memory.memory_model(WIDE, knobs, world=2, **SHORT)
            update = m["update"] - (m["weights"] + m["grads"] + m["adam"] + m["ref"] + m["sampler"])
            assert update - m["activations"] - m["autocast"] <= got[dtype] <= update, (rank, dtype, got[dtype], update)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_stage2_smoke(tmp_path):
    tok = Tokenizer.byte_level()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32,
                    max_seq_len=512, tie_embeddings=True)
    GPT(cfg).init_weights().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "train_stage2.py", "--base", str(tmp_path / "base"), "--init", str(tmp_path / "base"),
           "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "8", "--k", "2", "--micro-batch", "4",
           "--max-new-tokens", "4", "--n-train", "20", "--device", "cpu", "--threads", "1"]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "on 2 process(es)" in res.stdout and res.stdout.count("step 1/2") == 1  # rank 0 alone prints
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval_n" in r) for r in log] == [(1, False), (2, False), (2, True)]  # the preset evaluates the last
    assert res.stdout.count("eval step 2") == 1
    GPT.from_pretrained(tmp_path / "run" / "ckpt")
