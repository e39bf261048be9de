"""model.py against independent references: transformers' implementations of the three
architectures, naive full recomputation for the KV cache, naive log_softmax for token_logprobs."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

import model
from model import GPT, GPTConfig, KVCache, grouped_attention, sdpa_attention, token_logprobs

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_pair(arch):
    """A random transformers model and the same weights in our GPT."""
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=256)
    if arch == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=True, rope_theta=10000.0))
        cfg = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
                        qkv_bias=True, tie_embeddings=True, rope_theta=10000.0)
    elif arch == "qwen3":
        hf = Qwen3ForCausalLM(Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                          tie_word_embeddings=False, rope_theta=1000000.0))
        cfg = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=24,
                        intermediate_size=96, qk_norm=True, rope_theta=1000000.0)
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=8, num_key_value_heads=2,
                                          rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "rope_theta": 500000.0}))
        cfg = GPTConfig(vocab_size=97, n_layer=2, n_head=8, n_kv_head=2, n_embd=64, intermediate_size=96,
                        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    cfg.norm_eps = hf.config.rms_norm_eps
    # random (not default-init) norm weights and biases, so every parameter matters
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    ours = GPT(cfg)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert missing == ["inv_freq"] or missing == [] and not unexpected, (missing, unexpected)
    assert not unexpected
    return hf.eval(), ours.eval()


# model.attention takes grouped_attention on the CPU and SDPA on a GPU: both run here
ATTENTION = {"grouped": grouped_attention, "sdpa": sdpa_attention}


@pytest.mark.parametrize("kernel", sorted(ATTENTION))
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_logits_match_transformers(arch, kernel, monkeypatch):
    monkeypatch.setattr(model, "attention", ATTENTION[kernel])
    hf, ours = tiny_pair(arch)
    idx = torch.randint(0, 97, (3, 70))  # past original_max_position_embeddings: the llama3 scaling matters
    with torch.no_grad():
        ref, got = hf(idx).logits, ours(idx)
    assert (ref - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("kernel", sorted(ATTENTION))
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_kv_cache_matches_full_recompute(arch, kernel, monkeypatch):
    monkeypatch.setattr(model, "attention", ATTENTION[kernel])
    _, m = tiny_pair(arch)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = m(idx)
        cache = KVCache(m.config, 2, 40)
        parts = [m(idx[:, :11], cache=cache)]                    # prefill
        parts.append(m(idx[:, 11:20], cache=cache, start=11))    # a multi-token continuation
        for t in range(20, 30):                                  # one token at a time
            parts.append(m(idx[:, t:t + 1], cache=cache, start=t))
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_per_row_positions_and_mask_equal_unpadded_rows():
    """Left-padded rows with their own positions and a pad mask give the unpadded logits."""
    _, m = tiny_pair("qwen2")
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        ref_a, ref_b = m(a)[0, -1], m(b)[0, -1]
        idx = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
        pos = torch.stack([torch.arange(12), (torch.arange(12) - 5).clamp(min=0)])
        valid = torch.stack([torch.ones(12, dtype=torch.bool), torch.arange(12) >= 5])
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        mask = (causal[None] & valid[:, None, :]) | torch.eye(12, dtype=torch.bool)[None]  # pads see themselves
        out = m(idx, pos=pos, mask=mask[:, None])
    assert (out[0, -1] - ref_a).abs().max() < 1e-5
    assert (out[1, -1] - ref_b).abs().max() < 1e-5


def naive_attention(q, k, v, allowed):
    """Head by head, row by row, in fp64: softmax(q k^T / sqrt(D)) v over the allowed (T, S) slots."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                s = k[b, h // rep].double() @ q[b, h, i].double() / D ** 0.5
                w = torch.softmax(s.masked_fill(~allowed[b, i], float("-inf")), 0)
                out[b, h, i] = w @ v[b, h // rep].double()
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("kernel", sorted(ATTENTION))
@pytest.mark.parametrize("T,S,masked", [(6, 6, False), (1, 9, True), (4, 9, True), (5, 5, True)])
def test_attention_kernels_match_a_naive_reference(kernel, T, S, masked, dtype, tol):
    """Grouped query heads (8 over 2 KV heads), causal (bias None, S == T) or an arbitrary mask given
    as the additive bias GPT.hidden builds, decoding (T = 1) included."""
    torch.manual_seed(0)
    B, H, G, D = 2, 8, 2, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, G, S, D), torch.randn(B, G, S, D)
    if masked:
        allowed = torch.rand(B, T, S) < 0.6
        allowed[:, torch.arange(T), S - T + torch.arange(T)] = True  # each query sees at least its own slot
        bias = torch.zeros(B, 1, T, S).masked_fill(~allowed[:, None], float("-inf")).to(dtype)
    else:
        allowed = (torch.arange(S)[None, :] <= S - T + torch.arange(T)[:, None]).expand(B, T, S)
        bias = None
    got = ATTENTION[kernel](q.to(dtype), k.to(dtype), v.to(dtype), bias)
    assert got.dtype == dtype and got.shape == (B, H, T, D)
    assert (got.double() - naive_attention(q, k, v, allowed)).abs().max() < tol


@pytest.mark.parametrize("autocast", [False, True])
def test_hidden_shared_equals_hidden_over_whole_rows(autocast):
    """GPT.hidden_shared (each prompt run once, its keys and values copied to the rows that continue it)
    against GPT.hidden over each whole row: values and the gradients of every parameter, prompts of
    different lengths (one shorter than the longest prefix) and continuations of different lengths."""
    _, m = tiny_pair("qwen3")
    torch.manual_seed(1)
    plen, k = [6, 3], 3
    prompts = [torch.randint(0, 97, (n,)) for n in plen]
    rests = [torch.randint(0, 97, (n,)) for n in (4, 7, 1, 5, 2, 6)]
    rows = [torch.cat([prompts[r // k], rests[r]]) for r in range(6)]
    prefix = torch.zeros(2, max(plen), dtype=torch.long)
    for g, x in enumerate(prompts):
        prefix[g, :len(x)] = x
    T = max(len(y) for y in rests)
    suffix = torch.zeros(6, T, dtype=torch.long)
    for r, y in enumerate(rests):
        suffix[r, :len(y)] = y
    weights = torch.randn(6, T, 64)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

    def grads(loss):
        m.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    with ctx:
        h = m.hidden_shared(prefix, torch.tensor(plen), suffix, torch.arange(6) // k)
    got = grads(sum((h[r, :len(y)].float() * weights[r, :len(y)]).sum() for r, y in enumerate(rests)))
    with ctx:
        full = [m.hidden(x[None])[0, len(x) - len(y):] for x, y in zip(rows, rests)]
    ref = grads(sum((f.float() * weights[r, :len(f)]).sum() for r, f in enumerate(full)))
    tol = 5e-2 if autocast else 1e-5
    for r, f in enumerate(full):
        assert (h[r, :len(f)].float() - f.float()).abs().max() < tol * max(1.0, f.abs().max().item())
    assert got.keys() == ref.keys() == {n for n, _ in m.named_parameters()} - {"lm_head.weight"}  # hidden: no head
    for n in ref:
        assert (got[n] - ref[n]).abs().max() <= tol * max(1.0, ref[n].abs().max().item()), n


def test_checkpoint_round_trip_and_errors(tmp_path):
    _, m = tiny_pair("qwen3")
    m.save_pretrained(tmp_path / "ck")
    m2 = GPT.from_pretrained(tmp_path / "ck")
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(idx), m2(idx))
    assert not list((tmp_path / "ck").glob(".*"))  # no temporary files left behind
    bf = GPT.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16
    # the RoPE frequencies are not rounded to bf16 (that would shift angles by radians at long positions)
    assert bf.inv_freq.dtype == torch.float32
    assert torch.equal(bf.inv_freq, m.inv_freq) and torch.equal(m.bfloat16().inv_freq, m2.inv_freq)
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path / "nothing")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ValueError, match="does not match its config"):
        GPT.from_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    with pytest.raises(ValueError, match="unknown config keys"):
        GPT.from_pretrained(tmp_path / "ck")


def test_default_init_is_torchs_and_meta_builds_draw_nothing():
    """GPT draws its embedding itself (so that a meta-device build draws nothing): the values and the
    random stream must be nn.Embedding's and nn.Linear's own, in the same order."""
    cfg = GPTConfig(vocab_size=97, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=24)
    torch.manual_seed(3)
    m = GPT(cfg)
    torch.manual_seed(3)
    emb, q = torch.nn.Embedding(97, 16), torch.nn.Linear(16, 16, bias=False)
    assert torch.equal(m.embed_tokens.weight, emb.weight) and m.embed_tokens.weight.requires_grad
    assert torch.equal(m.layers[0].self_attn.q_proj.weight, q.weight)
    with torch.device("meta"):
        meta = GPT(cfg)
    assert meta.embed_tokens.weight.is_meta and meta.inv_freq.is_meta  # the RoPE table follows the weights


def naive_logprobs(h, W, t, temperature):
    return torch.log_softmax((h @ W.T).float() / temperature, dim=-1).gather(1, t[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_token_logprobs_fp32_values_and_gradients(temperature, chunk):
    torch.manual_seed(1)
    N, d, V = 150, 32, 301
    h = torch.randn(N, d, requires_grad=True)
    W = (torch.randn(V, d) * 0.3).requires_grad_()
    t = torch.randint(0, V, (N,))
    g = torch.randn(N)  # an arbitrary upstream gradient, not just a sum
    got = token_logprobs(h, W, t, temperature, chunk=chunk)
    gh, gw = torch.autograd.grad((got * g).sum(), (h, W))
    ref = naive_logprobs(h, W, t, temperature)
    rh, rw = torch.autograd.grad((ref * g).sum(), (h, W))
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 1e-5
    assert (gh - rh).abs().max() < 1e-5
    # the weight gradient sums over N = 150 tokens (entries up to ~4): fp32 rounding is relative to its size
    assert (gw - rw).abs().max() < 1e-5 * max(1.0, rw.abs().max().item())


def test_token_logprobs_fp64_gradcheck():
    torch.manual_seed(2)
    h = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (9,))
    assert torch.autograd.gradcheck(lambda h, W: token_logprobs(h, W, t, 0.9, chunk=4), (h, W))


def assert_bf16_close(grads, ref_grads, lp=None, ref_lp=None):
    """The stated bf16 tolerance: log-probs within 0.05 absolute, gradients within 2% of their scale."""
    if lp is not None:
        assert (lp - ref_lp).abs().max() < 0.05
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r).abs().max() < 0.02 * r.abs().max()


def test_bf16_within_tolerance():
    """bf16 inputs: compared with the fp32 naive computation on the same (bf16-rounded) inputs.
    Stated tolerance: log-probs within 0.05 absolute, gradients within 2% of their scale."""
    torch.manual_seed(3)
    N, d, V = 200, 64, 1000
    h = torch.randn(N, d).bfloat16().requires_grad_()
    W = (torch.randn(V, d) * 0.2).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,))
    g = torch.randn(N)
    got = token_logprobs(h, W, t, chunk=64)
    gh, gw = torch.autograd.grad((got * g).sum(), (h, W))
    assert gh.dtype == gw.dtype == torch.bfloat16
    h32, W32 = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    ref = naive_logprobs(h32, W32, t, 1.0)
    rh, rw = torch.autograd.grad((ref * g).sum(), (h32, W32))
    assert_bf16_close((gh, gw), (rh, rw), got, ref)


def test_token_logprobs_only_hidden_needs_grad_and_bad_shapes():
    h = torch.randn(10, 8, requires_grad=True)
    W = torch.randn(20, 8)
    t = torch.randint(0, 20, (10,))
    (gh,) = torch.autograd.grad(token_logprobs(h, W, t).sum(), (h,))
    (rh,) = torch.autograd.grad(naive_logprobs(h, W, t, 1.0).sum(), (h,))
    assert (gh - rh).abs().max() < 1e-5
    with pytest.raises(ValueError, match="do not fit"):
        token_logprobs(h, W[:, :4], t)


def test_training_forward_has_gradients_through_hidden():
    """hidden() + token_logprobs gives the same loss and gradients as logits + log_softmax."""
    _, m = tiny_pair("qwen2")
    idx = torch.randint(0, 97, (2, 16))
    tgt = idx[:, 1:].reshape(-1)
    lp = token_logprobs(m.hidden(idx)[:, :-1].reshape(-1, 64), m.head_weight, tgt)
    g1 = torch.autograd.grad(lp.sum(), m.embed_tokens.weight)[0]
    ref = F.log_softmax(m(idx)[:, :-1].reshape(-1, 97), -1).gather(1, tgt[:, None]).squeeze(1)
    g2 = torch.autograd.grad(ref.sum(), m.embed_tokens.weight)[0]
    assert (lp - ref).abs().max() < 1e-5
    assert (g1 - g2).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_nonlinear_loss_through_token_logprobs(dtype, tol, chunk):
    """The training path: a loss that is not linear in the log-probs (a weight times log p plus a squared
    distance to reference log-probs, the shape of the RL objective with a per-token KL), at temperature
    0.7: values and both gradients against autograd through the naive log_softmax."""
    torch.manual_seed(4)
    N, d, V = 150, 32, 301
    h = torch.randn(N, d, dtype=dtype, requires_grad=True)
    W = (torch.randn(V, d, dtype=dtype) * 0.3).requires_grad_()
    t = torch.randint(0, V, (N,))
    a, lp_ref = torch.randn(N, dtype=dtype), torch.randn(N, dtype=dtype) - 5
    loss_fn = lambda lp: (a * lp + 0.05 * (lp - lp_ref) ** 2).sum()
    lp = token_logprobs(h, W, t, 0.7, chunk=chunk)
    gh, gw = torch.autograd.grad(-2.5 * loss_fn(lp), (h, W))
    ref_lp = torch.log_softmax(h @ W.T / 0.7, dim=-1).gather(1, t[:, None]).squeeze(1)
    rh, rw = torch.autograd.grad(-2.5 * loss_fn(ref_lp), (h, W))
    assert lp.dtype == dtype
    assert (lp - ref_lp).abs().max() < tol
    assert (gh - rh).abs().max() < tol * max(1.0, rh.abs().max().item())
    assert (gw - rw).abs().max() < tol * max(1.0, rw.abs().max().item())


def test_bf16_hidden_with_fp32_head_as_under_autocast():
    """The GPU training case: hidden states in bf16 (autocast) and the fp32 head parameter, with the
    backward run after autocast has ended. Against fp32 naive, the bf16 tolerance above."""
    torch.manual_seed(6)
    N, d, V = 120, 32, 500
    h = torch.randn(N, d).bfloat16().requires_grad_()
    W = (torch.randn(V, d) * 0.2).requires_grad_()
    t, g = torch.randint(0, V, (N,)), torch.randn(N)
    h32, W32 = h.detach().float().requires_grad_(), W.detach().clone().requires_grad_()
    ref = naive_logprobs(h32, W32, t, 1.0)
    rh, rw = torch.autograd.grad((ref * g).sum(), (h32, W32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_logprobs(h, W, t, chunk=30)
    gh, gw = torch.autograd.grad((lp * g).sum(), (h, W))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert_bf16_close((gh, gw), (rh, rw), lp, ref)


def test_fp32_masters_under_autocast_compute_what_bf16_weights_compute():
    """Under bf16 autocast the residual stream stays in bf16 and RMSNorm scales in bf16, so a policy with
    fp32 master weights computes, bit for bit, what the same weights stored in bf16 compute (the reference,
    and the sampler copy rl.make_sampler makes). Weights rounded to bf16 first, so both hold equal values."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128,
                    max_seq_len=128, qkv_bias=True, qk_norm=True, tie_embeddings=False)
    masters = GPT(cfg).init_weights(std=0.1).to(torch.bfloat16).float()
    stored = GPT(cfg)
    stored.load_state_dict(masters.state_dict())
    stored = stored.to(torch.bfloat16)
    idx = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = masters(idx)
        b = stored(idx)
    assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)


def test_auto_dtype_follows_the_cpus_bf16_units(monkeypatch):
    """bf16 only where its products are fast: a GPU, or a CPU with AVX512-BF16 or AMX (an AVX2 CPU
    emulates them, 5x to 6x slower than fp32 at the demo's size); the scripts resolve --dtype auto before
    anything runs."""
    import rl
    from model import auto_dtype
    for avx512_bf16, amx, want in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert auto_dtype("cpu") == want
        assert auto_dtype("cuda:0") == "bf16"
        assert rl.get_args(1, ["--device", "cpu"]).dtype == want  # the demo preset's default is auto
        assert rl.get_args(1, ["--device", "cpu", "--dtype", "fp32"]).dtype == "fp32"


EMULATED = ("--dtype bf16: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX), so bf16 is emulated and "
            "slow (about 5x slower than fp32 at the demo's size); --dtype fp32 is faster here\n")


def test_bf16_on_a_cpu_that_emulates_it_says_so_in_one_line(monkeypatch, capsys):
    """--dtype bf16 on a CPU without bf16 units (faked: neither AVX512-BF16 nor AMX): each training script says
    in one line that bf16 is emulated and slow; with either unit, on a GPU, in fp32 or with auto: nothing."""
    import rl
    import train_base
    import train_sft
    parse = {"stage": lambda f: rl.get_args(1, ["--device", "cpu", *f]),
             "sft": lambda f: train_sft.get_args(["--method", "star", "--device", "cpu", *f]),
             "base": lambda f: train_base.get_args(f)}
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        for name, get_args in parse.items():
            capsys.readouterr()
            get_args(["--dtype", "bf16"])
            err = capsys.readouterr().err
            assert err == ("" if avx512_bf16 or amx else EMULATED), (name, avx512_bf16, amx, err)
            for other in (["--dtype", "fp32"], ["--dtype", "auto"]):
                get_args(other)
                assert capsys.readouterr().err == "", (name, other)
    monkeypatch.setattr(rl, "device_error", lambda device: None)  # a GPU, faked as the CPU's units are
    rl.get_args(1, ["--device", "cuda", "--dtype", "bf16"])
    assert capsys.readouterr().err == ""
