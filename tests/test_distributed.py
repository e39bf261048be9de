"""Data parallelism on the CPU with the gloo backend: two processes, each holding half of a global
batch, make the same update as one process holding all of it: the same summed gradients (1e-5 of
their largest entry: the difference is only the order of floating-point sums) and the same weights
after Adam's step (1e-4 absolute, 1% of its lr 1e-2 step: Adam divides tiny gradients by tinier
second moments, so sum-order noise moves some entries by more than the gradients' own precision);
torchrun runs a stage end to end; and a run or an evaluation leaves no process group behind."""
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

import data
import evaluate
import rl
import train_stage2
from model import GPT, GPTConfig
from tokenizer import Tokenizer

ARGS = SimpleNamespace(k=2, max_new_tokens=5, temperature=1.0, p1=data.DEMO_P1, base_first=0.0, micro_batch=2,
                       grad_clip=1.0, alpha=10.0, beta1=0.01, baseline="loo", kl="reward", gen_batch=None)


def setup(seed):
    torch.manual_seed(seed)
    tok = Tokenizer.byte_level()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                    max_seq_len=512, tie_embeddings=True)
    policy, ref = GPT(cfg).init_weights(std=0.3), GPT(cfg).init_weights(std=0.3)
    ro = rl.rollout(policy, ref, tok, data.make_demo(4, seed=3), ARGS, seed=5)
    ro.r1 = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0])  # varied rewards, so every term has a gradient
    ro.r2 = torch.tensor([1.0, 1, 0, 0, 1, 0, 1, 0])
    return policy, ref, ro


def rows_of(ro, rows):
    out = SimpleNamespace(**vars(ro))
    for name in ("tokens", "m1", "m2", "lp_old", "r1", "r2", "group", "first_from_pi"):
        setattr(out, name, getattr(ro, name)[rows])
    return out


def worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rank_, world, _ = rl.setup_distributed("cpu")
    assert (rank_, world) == (rank, 2)
    policy, ref, ro = setup(0)
    # prompts split as rl.run splits them: rank r takes prompts r, r + 2, ...; each prompt has k = 2 rows
    rows = torch.tensor([p * 2 + j for p in range(rank, 4, 2) for j in range(2)])
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    stats = rl.update(policy, ref, opt, rows_of(ro, rows), train_stage2.objective, ARGS, world=2)
    if rank == 0:
        torch.save({"state": policy.state_dict(), "stats": stats,
                    "grads": {n: p.grad for n, p in policy.named_parameters()}}, os.path.join(out_dir, "ddp.pt"))
    torch.distributed.destroy_process_group()


def run_worker(rank, port, base, out_dir):
    """rl.run's two-process run, then evaluate.py's; after each, the names of this process's threads."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    threads = lambda: " ".join(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    run = os.path.join(out_dir, "run")
    rl.run(rl.get_args(2, ["--base", base, "--init", base, "--out", run, "--steps", "1", "--batch", "4", "--k", "2",
                           "--micro-batch", "2", "--max-new-tokens", "3", "--n-train", "8", "--device", "cpu",
                           "--threads", "1"]), train_stage2.objective, "Stage II")
    after_run = threads()
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
    mp.spawn(run_worker, args=(free_port(), str(tmp_path / "base"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        for what, threads in zip(("rl.run", "evaluate.main"), (tmp_path / f"threads{rank}").read_text().split("\n")):
            assert "gloo" not in threads, (rank, what, threads)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_the_single_process_update(tmp_path):
    policy, ref, ro = setup(0)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    stats = rl.update(policy, ref, opt, ro, train_stage2.objective, ARGS, world=1)
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")
    for n, p in policy.named_parameters():
        assert (got["grads"][n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), n
    for k, v in policy.state_dict().items():
        assert (got["state"][k] - v).abs().max() < 1e-4, k
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())  # the update moved weights
    assert all(abs(a - b) < 1e-6 * max(1.0, abs(b)) for a, b in zip(got["stats"], stats)), (got["stats"], stats)


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
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    GPT.from_pretrained(tmp_path / "run" / "ckpt")
