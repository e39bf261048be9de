"""
The GPU check: one command that runs every path a GPU takes, checks each against an independent
reference, and measures the real shapes, sized to a short lease (about 9 minutes on one H100, estimated
part by part below: not yet run on one).

    python bench.py --only gpu --out gpu_check          # on a GPU machine (the default --device there is cuda)
    python bench.py --only gpu --device cpu --tiny      # every part at toy shapes on the CPU (tests/test_bench_gpu.py)
    python bench.py --only gpu --parts logits,grads     # a subset

Parts, in order (the time each is expected to take on one H100; each reports, times itself and fails
alone: an exception is one ERROR row, and the next part runs):
  machine     torch and CUDA versions, the device's name, memory, bf16 support                        (1 s)
  logits      the model's logits on the device (SDPA attention) against the CPU's written-out attention
              and against transformers on the same random Qwen2-shaped weights: fp32 within 1e-4 of the
              largest logit; bf16 (autocast) no further from transformers' fp32
              logits than twice transformers' own bf16 model is                                        (10 s)
  sampler     two-turn greedy generation (sample.generate_turns: KV cache, prefill, decode, rows of
              other lengths, stop tokens) against a naive decode that recomputes the whole context for
              every token, on the CPU: identical tokens in fp32                                          (5 s)
  grads       one Stage II update (rl.update: shared prompts, the chunked log-prob head, turn sums, the
              estimator) on the device against the gradient of Eq. 4 written out naively here (full
              logits, whole rows) on the CPU in float64: full fine-tuning, LoRA, activation
              checkpointing; within 1e-4 of the largest gradient                                         (10 s)
  entry       the scripts as a user runs them (subprocesses, default --device, --dtype auto): a random
              Qwen2 saved by transformers, convert.py, train_stage1.py and train_stage2.py (2 steps each,
              and 1 step then --resume: bit-identical), evaluate.py, convert.py --to-hf against
              transformers' logits                                                                      (90 s)
  runsh       QUICK=1 bash run.sh demo1: the demo's pipeline, end to end                              (150 s)
  step-1.5b   one Stage II step of the math preset at Qwen2.5-1.5B's shape, random weights, rollouts of
              fixed length (no stop tokens): one --gen-batch chunk sampled (the memory model's choice for
              this device) and 16 micro-batches updated; peak memory against memory.memory_model, tokens/s,
              a decode step against the memory-bandwidth bound, the update's model FLOP utilization   (120 s)
  step-7b     the same at Qwen2.5-7B with --lora 16 --checkpoint-activations (256 new tokens per turn) (90 s)
  hf-generate the two-turn sampler against transformers' generate, same weights and batch (Qwen2.5-1.5B's
              shape on a GPU, 64 rows, 128 new tokens per turn)                                         (40 s)

Writes OUT/gpu.json (every row, each part's time, the machine) and OUT/gpu.md (the table, ready to paste
into README), and prints the table; a part's traceback goes to OUT/gpu_errors.txt. A row's result: ok,
FAIL (outside its limit), ERROR (the part raised), or blank for a measurement. On the CPU the device side
of every comparison runs the GPU's kernels (SDPA attention), so the comparisons can fail there too.
"""
import contextlib
import copy
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import data
import memory
import model
import rl
import train_stage2
from bench import MODELS  # the published config.json numbers of Qwen2.5-1.5B, Qwen2.5-7B, Llama-3.1-8B
from model import GPT, GPTConfig, add_lora
from sample import generate_turns
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = dict(n_embd=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=512, qkv_bias=True,
            tie_embeddings=True)
# dense bf16 peak of the cards a user is likely to hold (vendor data sheets, without sparsity), and their memory
# bandwidth; the first name that the device's name contains wins
CARDS = [("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12), ("H100", 989e12, 3.35e12),
         ("H200", 989e12, 4.8e12), ("GH200", 989e12, 4.0e12), ("A100", 312e12, 2.0e12), ("L40S", 362e12, 0.86e12),
         ("L4", 121e12, 0.3e12), ("A10", 125e12, 0.6e12)]
FP32_LIMIT, BF16_FACTOR, GRAD_LIMIT = 1e-4, 2.0, 1e-4


# ------------------------------------------------------------------------------- rows and parts
class Check:
    """What a part reports: rows of (check, measured, limit, result); `cmp` makes a comparison row."""

    def __init__(self, device, tiny, work):
        self.dev, self.tiny, self.work, self.rows = torch.device(device), tiny, work, []
        self.cuda = self.dev.type == "cuda"

    def row(self, check, measured, limit="", result=""):
        self.rows.append(dict(check=check, measured=measured, limit=limit, result=result))
        print(f"    {check}: {measured}" + (f" (limit {limit})" if limit else "") + (f" {result}" if result else ""),
              flush=True)

    def cmp(self, check, value, limit, fmt="{:.2e}"):
        ok = value <= limit  # False for nan
        self.row(check, fmt.format(value), "<= " + fmt.format(limit), "ok" if ok else "FAIL")
        return ok

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)


@contextlib.contextmanager
def gpu_kernels(dev):
    """The device side of every comparison runs the kernels a GPU runs: on the CPU, model.attention is
    pointed at SDPA (model.sdpa_attention, looked up at each call) instead of the written-out attention."""
    if dev.type != "cpu":
        yield
        return
    saved = model.attention
    model.attention = lambda q, k, v, bias=None: model.sdpa_attention(q, k, v, bias)
    try:
        yield
    finally:
        model.attention = saved


def seconds(c, fn, *a):
    c.sync()
    t0 = time.perf_counter()
    out = fn(*a)
    c.sync()
    return time.perf_counter() - t0, out


def free(c):
    gc.collect()
    if c.cuda:
        torch.cuda.empty_cache()


def card(c):
    """(name, bf16 peak FLOP/s, bandwidth B/s) from CARDS, or None where the card is not listed / on the CPU."""
    if not c.cuda:
        return None
    name = torch.cuda.get_device_name(c.dev)
    return next(((n, f, b) for n, f, b in CARDS if n in name), None)


# ------------------------------------------------------------------------------- 1. the machine
def part_machine(c):
    c.row("torch", torch.__version__)
    c.row("python", platform.python_version())
    if c.cuda:
        p = torch.cuda.get_device_properties(c.dev)
        c.row("CUDA", f"{torch.version.cuda} (cuDNN {torch.backends.cudnn.version()})")
        c.row("device", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
                        f"{p.multi_processor_count} SMs")
        c.row("bf16", "supported" if torch.cuda.is_bf16_supported() else "not supported",
              "", "ok" if torch.cuda.is_bf16_supported() else "FAIL")
        known = card(c)
        c.row("data sheet", f"{known[0]}: {known[1] / 1e12:.0f} TFLOP/s bf16 dense, {known[2] / 1e12:.2f} TB/s"
              if known else "not in bench_gpu.CARDS: the measured matmul rate and copy bandwidth stand in")
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
        c.row("device", f"CPU: {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
        c.row("bf16", f"--dtype auto picks {model.auto_dtype('cpu')} here")


# ------------------------------------------------------------------------------- 2. correctness
def qwen2_pair(shape, seed=0, device="cpu", dtype=torch.float32, max_len=1024, randomize=True):
    """transformers' Qwen2 and this project's GPT with the same weights, built on `device` in `dtype`: random,
    every tensor drawn (biases and norms included, so that each mapping counts), or with randomize=False
    transformers' own initialization (a timing needs no more)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    s = shape
    hc = Qwen2Config(vocab_size=s["vocab_size"], hidden_size=s["n_embd"], intermediate_size=s["intermediate_size"],
                     num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"], num_key_value_heads=s["n_kv_head"],
                     max_position_embeddings=max_len, tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = Qwen2ForCausalLM(hc).eval()
        if randomize:
            with torch.no_grad():
                for name, p in hf.named_parameters():
                    p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
        hf = hf.to(dtype)
        cfg = GPTConfig(**{**s, "max_seq_len": max_len, "rope_theta": 10000.0, "norm_eps": hc.rms_norm_eps,
                           "qkv_bias": True, "tie_embeddings": True})
        ours = GPT(cfg).to(dtype)  # the HF names without "model.", the tied head dropped
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    return hf, ours.eval()


def small_shape(c):
    # on a GPU, head_dim 64 and a vocabulary of 32768: the shapes for which SDPA picks its fused kernels
    return TINY if c.tiny else dict(n_embd=512, n_layer=4, n_head=8, n_kv_head=2, intermediate_size=1408,
                                    vocab_size=32768)


@torch.no_grad()
def part_logits(c):
    hf, ours = qwen2_pair(small_shape(c))
    idx = torch.randint(0, ours.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    ref_hf = hf(idx).logits.float()
    ref_cpu = ours(idx)  # the CPU's written-out attention (model.grouped_attention)
    scale = ref_hf.abs().max().item()
    c.cmp("ours on the CPU (written-out attention) vs transformers, fp32, max abs diff / max abs logit",
          (ref_cpu - ref_hf).abs().max().item() / scale, FP32_LIMIT)
    dev_model = copy.deepcopy(ours).to(c.dev)
    with gpu_kernels(c.dev):
        got = dev_model(idx.to(c.dev)).float().cpu()
        with torch.autocast(c.dev.type, dtype=torch.bfloat16):  # fp32 weights under autocast, as the trainer runs
            got16 = dev_model(idx.to(c.dev)).float().cpu()
    where = f"ours on {c.dev.type} (SDPA)"
    c.cmp(f"{where} vs ours on the CPU, fp32", (got - ref_cpu).abs().max().item() / scale, FP32_LIMIT)
    c.cmp(f"{where} vs transformers, fp32", (got - ref_hf).abs().max().item() / scale, FP32_LIMIT)
    # bf16: no worse than BF16_FACTOR x transformers' own bf16 model's distance from its fp32 logits
    hf16 = (copy.deepcopy(hf).to(torch.bfloat16)(idx).logits.float() - ref_hf).abs().max().item() / scale
    c.cmp(f"{where} vs transformers' fp32, bf16 autocast (transformers in bf16: {hf16:.2e})",
          (got16 - ref_hf).abs().max().item() / scale, BF16_FACTOR * hf16)
    agree = (got16.argmax(-1) == ref_hf.argmax(-1)).float().mean().item()
    c.row(f"{where}, bf16: top-1 token agreement with transformers' fp32", f"{agree:.1%}")


def naive_greedy(m, context, n, stop_ids):
    """Greedy tokens from `context`, each step a forward over the whole sequence (no cache)."""
    seq, out = list(context), []
    for _ in range(n):
        t = int(m(torch.tensor([seq]))[0, -1].argmax())
        out.append(t)
        seq.append(t)
        if t in stop_ids:
            break
    return out


@torch.no_grad()
def part_sampler(c):
    _, ours = qwen2_pair(small_shape(c), seed=2)
    V, new = ours.config.vocab_size, 12
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 13, 9, 21)]
    followup = torch.randint(0, V, (6,), generator=g).tolist()
    eot = V - 1
    # stop tokens: tokens the greedy first attempts produce, so that rows stop at different steps
    firsts = [naive_greedy(ours, p, new, ()) for p in prompts]
    stops = (firsts[0][3], firsts[2][6], eot)
    want = []
    for p in prompts:
        y1 = naive_greedy(ours, p, new, stops)
        close = [] if y1 and y1[-1] == eot else [eot]
        want.append((y1, naive_greedy(ours, p + y1 + close + followup, new, stops)))
    dev_model = copy.deepcopy(ours).to(c.dev)
    with gpu_kernels(c.dev):
        y1s, y2s = generate_turns(dev_model, prompts, followup, new, turns=2, temperature=0.0, stop_ids=stops,
                                  eot_id=eot)
    same = sum(a == w[0] for a, w in zip(y1s, want)) + sum(b == w[1] for b, w in zip(y2s, want))
    lengths = sorted({len(y) for y in y1s + y2s})
    c.row("rows' attempt lengths (stops at different steps)", str(lengths))
    c.cmp(f"generate_turns on {c.dev.type} vs naive full-recompute greedy on the CPU, fp32: attempts that differ",
          2 * len(prompts) - same, 0, fmt="{}")


def make_rollouts(cfg, k=2, groups=3, seed=4):
    """A batch of two-turn rollouts laid out as rl.rollout lays them (prompt-major groups of k sharing a
    prompt, then y1, the instruction and y2, zero padding), built by hand: tokens, the turns' target masks,
    the sampler's log-probs, rewards."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
    follow = rnd(5)
    seqs, spans = [], []
    for q in range(groups):
        prompt = rnd(6 + 3 * q)
        for _ in range(k):
            y1, y2 = rnd(int(torch.randint(2, 9, (1,), generator=g))), rnd(int(torch.randint(2, 9, (1,), generator=g)))
            seqs.append(prompt + y1 + follow + y2)
            spans.append(((len(prompt), len(prompt) + len(y1)), (len(prompt) + len(y1) + 5, len(seqs[-1]))))
    R, L = len(seqs), max(map(len, seqs))
    tokens = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
    j = torch.arange(L - 1)
    turn = torch.zeros(R, L - 1, dtype=torch.int8)  # the attempt (1, 2) each target position belongs to
    for t in range(2):
        turn[torch.stack([(j >= sp[t][0] - 1) & (j < sp[t][1] - 1) for sp in spans])] = t + 1
    return SimpleNamespace(tokens=tokens, turn=turn, lp_old=-3 + torch.randn(R, L - 1, generator=g),
                           r=torch.randint(0, 2, (2, R), generator=g).float(),
                           group=torch.arange(groups).repeat_interleave(k), first_from_pi=torch.ones(R, dtype=torch.bool))


def naive_stage2_grads(policy, ref, ro, a):
    """The gradient of Stage II's loss (paper Eq. 4, RLOO with the KL in each turn's return), written out
    from the rollouts' full logits: each row's whole sequence through model.forward, log_softmax over the
    vocabulary, the turns' log-probs summed by their masks; float64, on the CPU."""
    policy, ref = copy.deepcopy(policy).double().cpu(), copy.deepcopy(ref).double().cpu()
    for p in policy.parameters():
        p.grad = None
    R, k = ro.tokens.shape[0], a.k
    logp, kl = torch.zeros(R, 2, dtype=torch.float64), torch.zeros(R, 2, dtype=torch.float64)
    for r in range(R):
        idx, tgt = ro.tokens[r:r + 1, :-1], ro.tokens[r, 1:]
        lp = policy(idx)[0].log_softmax(-1).gather(1, tgt[:, None])[:, 0]
        with torch.no_grad():
            lp_ref = ref(idx)[0].log_softmax(-1).gather(1, tgt[:, None])[:, 0]
        for t, m in enumerate((ro.turn[r] == 1, ro.turn[r] == 2)):
            logp[r, t] = lp[m].sum()
            kl[r, t] = (ro.lp_old[r].double()[m] - lp_ref[m]).sum()  # log pi - log pi_ref, the sampler's log pi
    r1, r2 = ro.r.double()
    ret1 = r1 - a.beta1 * kl[:, 0]                                   # r(y1) - beta1 KL_1
    ret2 = r2 + a.alpha * (r2 - r1) - a.beta1 * kl[:, 1]            # r^(y2) - beta1 KL_2
    loss = 0
    for ret, t in ((ret1, 0), (ret2, 1)):
        others = (ret.view(-1, k).sum(1, keepdim=True) - ret.view(-1, k)) / (k - 1)  # leave-one-out mean
        loss = loss - ((ret.view(-1, k) - others).reshape(-1) * logp[:, t]).sum()
    (loss / R).backward()
    return {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}


def part_grads(c):
    shape = TINY if c.tiny else dict(n_embd=256, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=512,
                                     vocab_size=4096, qkv_bias=True, tie_embeddings=False)
    cfg = GPTConfig(**shape, max_seq_len=256)
    a = SimpleNamespace(k=2, micro_batch=4, temperature=1.0, kl="reward", baseline="loo", alpha=10.0, beta1=0.01,
                        beta2=0.1, grad_clip=0.0, checkpoint_activations=False)
    ro = make_rollouts(cfg, k=a.k)
    for mode in ("full", "lora", "checkpointing"):
        torch.manual_seed(5)
        base = GPT(cfg).init_weights(0.1)
        if mode == "lora":
            policy = add_lora(copy.deepcopy(base), 4, 8.0, "unused")
            for m in model.lora_layers(policy):
                torch.nn.init.normal_(m.lora_B, std=0.1)  # a fresh B is zero: the A's would get no gradient
            ref = base  # the reference is the base (rl.update: the policy with its adapters off)
        else:
            policy = base
            ref = copy.deepcopy(base)
            with torch.no_grad():
                for p in ref.parameters():
                    p.add_(0.02 * torch.randn_like(p))
        want = naive_stage2_grads(policy, ref, ro, a)
        pol = copy.deepcopy(policy).to(c.dev).train()
        ref_dev = pol if mode == "lora" else copy.deepcopy(ref).to(c.dev).eval().requires_grad_(False)
        opt = torch.optim.SGD([p for p in pol.parameters() if p.requires_grad], lr=0.0)  # gradients, no step
        dev_ro = SimpleNamespace(**{n: v.to(c.dev) if torch.is_tensor(v) else v for n, v in vars(ro).items()})
        args = SimpleNamespace(**{**vars(a), "checkpoint_activations": mode == "checkpointing"})
        with gpu_kernels(c.dev):
            rl.update(pol, ref_dev, opt, dev_ro, train_stage2.objective, args)
        got = {n: p.grad for n, p in pol.named_parameters() if p.grad is not None}
        if set(got) != set(want):
            c.row(f"{mode}: parameters with a gradient", f"{len(got)} on the device, {len(want)} naive", "same set",
                  "FAIL")
            continue
        scale = max(w.abs().max().item() for w in want.values())
        diff = max((got[n].double().cpu() - want[n]).abs().max().item() for n in want)
        c.cmp(f"{mode}: rl.update's gradient on {c.dev.type}, fp32, vs Eq. 4 naive in float64 on the CPU, "
              f"max abs diff / max abs gradient ({len(want)} tensors)", diff / scale, GRAD_LIMIT)


# ------------------------------------------------------------------------------- 3. the entry points
MATH_ROWS = [{"problem": "What is $3 + 4$?", "answer": "7"}, {"problem": "Compute $2 \\cdot 5$.", "answer": "10"},
             {"problem": "Solve for $x$: $x + 2 = 9$.", "answer": "7"}, {"problem": "What is $6 - 1$?", "answer": "5"}]
MATH500_ROWS = [{"problem": "What is $1 + 1$?", "solution": "$\\boxed{2}$", "answer": "2", "subject": "Prealgebra",
                 "level": 1, "unique_id": "test/prealgebra/1.json"},
                {"problem": "What is $5^2$?", "solution": "$\\boxed{25}$", "answer": "25", "subject": "Algebra",
                 "level": 2, "unique_id": "test/algebra/3.json"}]


def tiny_hf_checkpoint(path):
    """A random Qwen2 saved by transformers in bf16 (as from the hub), with a byte-level BPE trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["problem"] for r in MATH_ROWS + MATH500_ROWS] + [data.P1, data.MATH_FORMAT, "user\nassistant\nsystem\n",
                                                                 "so the answer is \\boxed{9}."]
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf, _ = qwen2_pair(TINY)
    hf.to(torch.bfloat16).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(path)


def script(c, *argv, env=None):
    """Run a script as a user types it; raises with its last lines where it fails."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if r.returncode:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-3:]
        raise RuntimeError(f"{' '.join(map(str, argv[:1]))} exited {r.returncode}: {' | '.join(tail)}")
    return r.stdout, time.perf_counter() - t0


def same_tensors(a, b):
    """Names of the tensors (in two torch.load'ed dicts, nested) that are not bit-identical."""
    if torch.is_tensor(a):
        return [] if torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [""]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [" (other keys)"]
        return [f"/{k}{d}" for k in a for d in same_tensors(a[k], b[k])]
    if isinstance(a, (list, tuple)):
        return [f"/{i}{d}" for i, (x, y) in enumerate(zip(a, b)) for d in same_tensors(x, y)] if len(a) == len(b) \
            else [" (other length)"]
    return []


def ckpt_tensors(path):
    """A checkpoint's weights (model.pt) and Adam state (state.pt's "opt"; none for a base)."""
    state = f"{path}/state.pt"
    opt = torch.load(state, map_location="cpu", weights_only=False)["opt"] if os.path.exists(state) else {}
    return torch.load(f"{path}/model.pt", map_location="cpu", weights_only=True), opt


def part_entry(c):
    w = c.work
    tiny_hf_checkpoint(f"{w}/hf")
    for name, rows in (("math.jsonl", MATH_ROWS), ("math500.jsonl", MATH500_ROWS)):
        with open(f"{w}/{name}", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    out, t = script(c, "convert.py", f"{w}/hf", f"{w}/base")
    c.row("convert.py HF_DIR OUT_DIR", f"{out.strip().splitlines()[-1]} ({t:.0f} s)")
    # Stage I's policy starts from a perturbed copy of the base: its KL to the base gives every weight a gradient
    # although random weights earn no reward (from the base itself, the 2 steps would change nothing)
    pert = GPT.from_pretrained(f"{w}/base")
    with torch.no_grad():
        for p in pert.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p.dtype))
    pert.save_pretrained(f"{w}/pert")
    Tokenizer.from_pretrained(f"{w}/base").save_pretrained(f"{w}/pert")
    small = ["--preset", "math", "--data", f"{w}/math.jsonl", "--base", f"{w}/base", "--batch", "4", "--k", "2",
             "--micro-batch", "2", "--max-new-tokens", "8", "--save-every", "1"]
    for stage, init in ((1, f"{w}/pert"), (2, f"{w}/s1/ckpt")):
        run = [f"train_stage{stage}.py", *small, "--init", init]
        out, t = script(c, *run, "--out", f"{w}/s{stage}", "--steps", "2")
        last = [line for line in out.splitlines() if "step 2/2" in line]
        c.row(f"train_stage{stage}.py, 2 steps", f"{last[-1].split('|', 1)[1].strip() if last else out[-200:]} "
                                                  f"({t:.0f} s)")
        script(c, *run, "--out", f"{w}/s{stage}r", "--steps", "1")
        script(c, *run, "--out", f"{w}/s{stage}r", "--steps", "2", "--resume")
        (wa, sa), (wb, sb) = (ckpt_tensors(f"{w}/{d}/ckpt") for d in (f"s{stage}", f"s{stage}r"))
        differ = [f"model.pt{d}" for d in same_tensors(wa, wb)] + [f"state.pt/opt{d}" for d in same_tensors(sa, sb)]
        moved = sum((wa[n].float() != v.float()).sum().item() for n, v in ckpt_tensors(init)[0].items())
        c.row(f"train_stage{stage}.py: weights changed by the 2 steps", f"{moved / sum(v.numel() for v in wa.values()):.1%}",
              "> 0", "ok" if moved else "FAIL")
        c.cmp(f"train_stage{stage}.py: 1 step, then --resume to 2, against 2 uninterrupted: tensors not bit-identical "
              f"(weights and Adam state){': ' + ', '.join(differ[:2]) if differ else ''}", len(differ), 0, fmt="{}")
    out, t = script(c, "evaluate.py", "--ckpt", f"{w}/s2/ckpt", "--task", "math", "--data", f"{w}/math500.jsonl",
                    "--out", f"{w}/report.json")
    rep = json.load(open(f"{w}/report.json"))
    rep = rep["rows"][0] if "rows" in rep else rep
    bad = [m for m in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed")
           if not (isinstance(rep.get(m), (int, float)) and -1 <= rep[m] <= 1)]
    c.cmp(f"evaluate.py's report: metrics missing or outside [-1, 1] ({t:.0f} s)", len(bad), 0, fmt="{}")
    script(c, "convert.py", "--to-hf", f"{w}/s2/ckpt", f"{w}/export", "--dtype", "float32")
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(f"{w}/export").eval()
    ours = GPT.from_pretrained(f"{w}/s2/ckpt", dtype=torch.float32).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(idx).logits.float()
        diff = (ours(idx) - want).abs().max().item() / want.abs().max().item()
    c.cmp("convert.py --to-hf of the Stage II checkpoint: transformers' logits vs ours, max abs diff / max abs logit",
          diff, FP32_LIMIT)


def part_runsh(c):
    out = f"{c.work}/runsh"
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "run.sh", "demo1"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "QUICK": "1", "OUT": out, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable})
    t = time.perf_counter() - t0
    table = f"{out}/demo1/table.md"
    ok = r.returncode == 0 and os.path.exists(table)
    tail = " | ".join((r.stderr.strip() or r.stdout.strip()).splitlines()[-2:])
    c.row("QUICK=1 bash run.sh demo1", f"exit {r.returncode}, {t:.0f} s" + ("" if ok else f": {tail}"),
          "exit 0 and a table", "ok" if ok else "FAIL")


# ------------------------------------------------------------------------------- 4. measurements
class FixedTok:
    """What rl.rollout asks of a tokenizer, for random weights: prompts and instruction of fixed lengths
    (random ids), no stop tokens (every attempt runs to max_new_tokens), nothing decoded (reward 0)."""

    def __init__(self, V, prompt_len, followup_len, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = lambda n: torch.randint(0, V, (n,), generator=g).tolist()
        self.prompt_len, self.follow = prompt_len, self.ids(followup_len)
        self.stop_ids, self.eot_id = (), V - 1

    def render(self, messages):
        return self.ids(self.prompt_len)

    def render_followup(self, messages):
        return self.follow

    def decode(self, ids):
        return ""


def peak_mib(c):
    if c.cuda:
        return torch.cuda.max_memory_allocated(c.dev) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(c):
    if c.cuda:
        torch.cuda.reset_peak_memory_stats(c.dev)


def rates(c):
    """(bf16 matrix FLOP/s, memory bandwidth B/s, where each comes from): the data sheet's where the card is
    in CARDS, else measured here (a large bf16 product; an on-device copy, bytes read + written)."""
    known = card(c)
    if known:
        return known[1], known[2], f"{known[0]} data sheet"
    n = 256 if c.tiny else 8192
    x = torch.randn(n, n, device=c.dev, dtype=torch.bfloat16)
    x @ x
    t = min(seconds(c, torch.matmul, x, x)[0] for _ in range(3))
    y = torch.empty(2**24 if c.tiny else 2**28, device=c.dev, dtype=torch.bfloat16)
    z = torch.empty_like(y)
    z.copy_(y)
    bw = 2 * y.numel() * 2 / min(seconds(c, z.copy_, y)[0] for _ in range(3))
    return 2 * n ** 3 / t, bw, "measured here"


def one_step(c, name, shape, lora, ckpt, max_new, micro_batches):
    """One Stage II step of the math preset at `shape`, random weights, as rl.train sets it up: sampling of one
    gen-batch chunk, then `micro_batches` micro-batches of the update; peaks against memory.memory_model."""
    free(c)
    dev, bf16 = c.dev, torch.bfloat16
    p = rl.PRESETS["math"]
    prompt_len, followup_len = (24, 8) if c.tiny else (256, 64)
    cfg = GPTConfig(**shape, max_seq_len=prompt_len + 2 * max_new + followup_len + 8)
    a = SimpleNamespace(batch=p["batch"], k=p["k"], micro_batch=p["micro_batch"], max_new_tokens=max_new, gen_batch=None,
                        dtype="bf16", device=dev.type, lora=lora, checkpoint_activations=ckpt, temperature=1.0,
                        p1=data.P1, base_first=0.0, grad_clip=1.0, alpha=10.0, beta1=0.01, baseline="loo", kl="reward")
    if c.cuda:
        budget = torch.cuda.get_device_properties(dev).total_memory
    else:
        budget = 2 * 2**30  # the CPU: a pretend 2 GiB card, so that the choice is made as on a GPU
    a.gen_batch = memory.default_gen_batch(cfg, a, 1, budget)
    rows = a.gen_batch
    pred = {k: v / 2**20 for k, v in memory.memory_model(cfg, a, prompt_len=prompt_len, followup_len=followup_len).items()}
    c.row(f"{name}: what ran", f"{'LoRA 16, ' if lora else ''}{'activation checkpointing, ' if ckpt else ''}"
                               f"one chunk of --gen-batch {rows} (the memory model's for this device) of the preset's "
                               f"{a.batch} rollouts, {max_new} new tokens per turn, prompts {prompt_len}, p1 {followup_len}, "
                               f"{micro_batches} micro-batches of {a.micro_batch}")
    base_mib = torch.cuda.memory_allocated(dev) / 2**20 if c.cuda else 0.0
    torch.manual_seed(0)
    with torch.device(dev):
        if lora:  # rl.lora_policy: one copy of the weights, frozen in bf16; it is its own reference and sampler
            policy = ref = sampler = add_lora(GPT(cfg).init_weights().to(bf16), lora, 2.0 * lora, "unused")
        else:
            policy = GPT(cfg).init_weights()
            ref = copy.deepcopy(policy).to(bf16).eval().requires_grad_(False)
            sampler = rl.make_sampler(policy, bf16)
    trained = [q for q in policy.parameters() if q.requires_grad]
    for q in trained:  # a previous step's gradients and Adam state, as a run holds them when it samples
        q.grad = torch.zeros_like(q)
    opt = torch.optim.Adam(trained, lr=1e-6)
    opt.step()
    tok = FixedTok(cfg.vocab_size, prompt_len, followup_len)
    problems = data.make_demo(rows // a.k, seed=0)  # only their count matters: nothing is decoded
    autocast = torch.autocast(dev.type, dtype=bf16)
    reset_peak(c)
    with autocast:
        rl.refresh_sampler(sampler, policy)
        sampler.eval()
        t_sample, ro = seconds(c, rl.rollout, sampler, ref, tok, problems, a, (0, 1, 0))
    sampling = peak_mib(c) - base_mib
    gen = ro.n_generated
    c.row(f"{name}: sampling, {rows} rows x 2 turns", f"{gen / t_sample:,.0f} generated tok/s ({t_sample:.1f} s)")
    # a decode step at the chunk's last context, against the bytes it must read: weights + the KV cache
    flops, bw, source = rates(c)
    S = prompt_len + 2 * max_new + followup_len
    with torch.inference_mode(), autocast:
        cache = model.KVCache(cfg, rows, S + 1, device=dev, dtype=bf16)
        tokn = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        valid = torch.ones(rows, 1, 1, S + 1, dtype=torch.bool, device=dev)
        pos = torch.full((rows, 1), S, device=dev)
        step = lambda: F.linear(sampler.hidden(tokn, pos, cache, S, valid)[:, -1], sampler.head_weight)
        step()
        t_step = min(seconds(c, step)[0] for _ in range(3))
        del cache
    P = sum(q.numel() for q in sampler.parameters())
    bytes_step = 2 * P + rows * S * cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * 2
    c.row(f"{name}: a decode step at context {S}, {rows} rows", f"{t_step * 1e3:.1f} ms; bound {bytes_step / bw * 1e3:.1f} ms "
          f"({bytes_step / 2**30:.1f} GiB at {bw / 1e12:.2f} TB/s, {source}): {bytes_step / bw / t_step:.0%} of the bound")
    # the update, on the first micro_batches micro-batches of the chunk
    keep = min(rows, micro_batches * a.micro_batch)
    sub = SimpleNamespace(**{n: v[:keep] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
                             for n, v in vars(ro).items()})
    del ro
    free(c)
    reset_peak(c)
    policy.train()
    with autocast:
        t_update, _ = seconds(c, rl.update, policy, ref, opt, sub, train_stage2.objective, a)
    update = peak_mib(c) - base_mib
    sel = sub.turn > 0
    n_gen = int(sel.sum())
    run_tokens = keep * sub.tokens.shape[1] - (keep - keep // a.k) * (prompt_len - 1)  # each prompt runs once
    d, V = cfg.n_embd, cfg.vocab_size
    blocks = P - V * d * (1 if cfg.tie_embeddings else 2)  # the matrices a token passes through, less the head
    # policy forward + backward (6; with LoRA 4: the frozen weights get no gradient), the reference's forward (2);
    # attention's products over the context are not counted (a few percent at these lengths)
    per = 6 if not lora else 4
    model_flops = (per + 2) * blocks * run_tokens + (per + 2) * d * V * n_gen
    full = t_update * a.batch / keep + t_sample * a.batch / rows
    c.row(f"{name}: update, {keep} rollouts", f"{run_tokens / t_update:,.0f} tok/s ({t_update:.1f} s); model FLOP "
          f"utilization {model_flops / t_update / flops:.1%} of {flops / 1e12:.3g} TFLOP/s bf16 ({source}); "
          f"a whole step of {a.batch} rollouts about {full:.0f} s")
    if c.cuda:
        for what, got in (("sampling", sampling), ("update", update)):
            ratio = got / pred[what]
            c.row(f"{name}: peak memory, {what}, measured / memory.memory_model", f"{got / 1024:.1f} / "
                  f"{pred[what] / 1024:.1f} GiB = {ratio:.2f}", "0.75 - 1.25", "ok" if 0.75 <= ratio <= 1.25 else "FAIL")
    else:  # the resident set of a process that has run other parts measures nothing of this step's
        c.row(f"{name}: predicted peak (memory.memory_model)", f"sampling {pred['sampling']:.0f} MiB, update "
              f"{pred['update']:.0f} MiB (the CPU's check of the model: bench.py --only memory)")
    del policy, ref, sampler, opt, sub
    free(c)


def part_step_15b(c):
    one_step(c, "Qwen2.5-1.5B", TINY if c.tiny else MODELS["Qwen2.5-1.5B"], 0, False, 8 if c.tiny else 1024,
             2 if c.tiny else 16)


def part_step_7b(c):
    one_step(c, "Qwen2.5-7B", TINY if c.tiny else MODELS["Qwen2.5-7B"], 16 if not c.tiny else 4, True,
             8 if c.tiny else 256, 2)


def hf_two_turns(hf, prompts, followup, n):
    """Two turns with transformers' generate, as its users write it: the second a new call on the whole context;
    exactly n new tokens a turn (min_new_tokens), sampled at temperature 1."""
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    with torch.inference_mode():
        y1 = hf.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
        ctx = torch.cat([y1, followup.expand(len(prompts), -1)], 1)
        hf.generate(ctx, attention_mask=torch.ones_like(ctx), **kw)


def part_hf_generate(c):
    free(c)
    s = TINY if c.tiny else MODELS["Qwen2.5-1.5B"]
    B, L_PROMPT, NEW, L_FOLLOW = (8, 16, 16, 8) if c.tiny else (64, 64, 128, 24)
    dtype = torch.bfloat16 if c.cuda else torch.float32
    hf, ours = qwen2_pair(s, device=c.dev, dtype=dtype, max_len=4096, randomize=False)
    g = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, s["vocab_size"], (B, L_PROMPT), generator=g).to(c.dev)
    followup = torch.randint(0, s["vocab_size"], (L_FOLLOW,), generator=g).to(c.dev)
    run_ours = lambda n: generate_turns(ours, prompts.tolist(), followup.tolist(), n, temperature=1.0, seed=0)
    run_ours(2), hf_two_turns(hf, prompts[:2], followup, 2)  # warm up
    t_ours = min(seconds(c, run_ours, NEW)[0] for _ in range(2))
    t_hf = min(seconds(c, hf_two_turns, hf, prompts, followup, NEW)[0] for _ in range(2))
    n = 2 * NEW * B
    c.row(f"two-turn sampling, {B} rows, prompts {L_PROMPT}, {NEW} new tokens per turn, {str(dtype)[6:]}",
          f"ours {n / t_ours:,.0f} tok/s, transformers' generate {n / t_hf:,.0f} tok/s: {t_hf / t_ours:.2f}x")
    del hf, ours
    free(c)


PARTS = {"machine": (part_machine, 1), "logits": (part_logits, 10), "sampler": (part_sampler, 5),
         "grads": (part_grads, 10), "entry": (part_entry, 90), "runsh": (part_runsh, 150),
         "step-1.5b": (part_step_15b, 120), "step-7b": (part_step_7b, 90), "hf-generate": (part_hf_generate, 40)}


# ------------------------------------------------------------------------------- the report
def report(parts, out):
    lines = ["| part | check | measured | limit | result |", "|---|---|---|---|---|"]
    cell = lambda x: str(x).replace("|", "\\|")  # a progress line's | would end the cell
    for name, p in parts.items():
        for i, r in enumerate(p["rows"]):
            lines.append(f"| {name if i == 0 else ''} | " + " | ".join(cell(r[k]) for k in ("check", "measured", "limit",
                                                                                          "result")) + " |")
    lines.append("")
    lines.append("Seconds per part: " + ", ".join(f"{n} {p['seconds']:.0f}" for n, p in parts.items()))
    text = "\n".join(lines) + "\n"
    if out:
        with open(os.path.join(out, "gpu.md"), "w") as f:
            f.write(text)
    return text


def run(device=None, tiny=False, parts=None, out=None):
    """Run the parts (names, default all) on `device`; returns {part: {"seconds", "rows"}} and writes OUT/gpu.json
    and OUT/gpu.md. Each part runs whatever happened to the ones before it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = list(PARTS) if not parts else parts
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); "
                         "use --device cpu --tiny to run the check's logic on the CPU")
    if out:
        os.makedirs(out, exist_ok=True)
    expected = sum(PARTS[n][1] for n in names)
    print(f"GPU check on {device}{' (tiny shapes)' if tiny else ''}: {', '.join(names)}; "
          f"expected about {expected / 60:.0f} min on one H100", flush=True)
    work = tempfile.mkdtemp(prefix="gpu_check_")
    done, t_all = {}, time.perf_counter()
    try:
        for i, name in enumerate(names):
            fn, eta = PARTS[name]
            print(f"[{i + 1}/{len(names)}] {name} (expected {eta} s on one H100; "
                  f"{time.perf_counter() - t_all:.0f} s so far)", flush=True)
            c = Check(device, tiny, os.path.join(work, name))
            os.makedirs(c.work)
            t0 = time.perf_counter()
            try:
                fn(c)
            except Exception as e:  # one part's failure must not hide the others
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                c.row("the part raised", msg, "", "ERROR")
                if out:
                    with open(os.path.join(out, "gpu_errors.txt"), "a") as f:
                        f.write(f"== {name}\n{traceback.format_exc()}\n")
                free(c)
            done[name] = dict(seconds=time.perf_counter() - t0, rows=c.rows)
            if out:  # after every part: a run cut off by its lease keeps what it measured
                with open(os.path.join(out, "gpu.json"), "w") as f:
                    json.dump(dict(device=device, tiny=tiny, torch=torch.__version__, parts=done), f, indent=1)
                report(done, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + report(done, out), flush=True)
    bad = sum(r["result"] in ("FAIL", "ERROR") for p in done.values() for r in p["rows"])
    print(f"GPU check: {'all checks passed' if not bad else f'{bad} row(s) FAIL or ERROR'} in "
          f"{time.perf_counter() - t_all:.0f} s" + (f"; report in {out}/gpu.md" if out else ""), flush=True)
    return done


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", help="cuda or cpu (default: cuda where torch sees a GPU)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes: the check's logic in under a minute on the CPU")
    ap.add_argument("--parts", help=f"comma-separated subset of: {', '.join(PARTS)} (default: all)")
    ap.add_argument("--out", help="folder for gpu.json, gpu.md and gpu_errors.txt (default: print only)")
    x = ap.parse_args()
    run(x.device, x.tiny, x.parts.split(",") if x.parts else None, x.out)
