"""
The decoder: one GPT class covering Qwen2 / Qwen2.5 (qkv bias), Qwen3 (per-head q/k RMSNorm,
explicit head_dim) and Llama 3.x (RoPE frequency scaling). RMSNorm, RoPE, GQA, SwiGLU, tied or
untied head, attention through F.scaled_dot_product_attention, a preallocated KV cache, the
fused log-prob kernel `token_logprobs`, and the project's checkpoint format.

Parameter names are the Hugging Face names without the leading "model.", so convert.py is a
rename. This file imports nothing from the project: copy it alone.
"""
import contextlib
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def cpu_has_bf16_units():
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX). Without them it emulates bf16
    products: a 4096x384x1536 product ran at 1 against 50 GFLOP/s in fp32 on a 2-core AVX2 EPYC, and the demo's
    Stage I at 117 against 559 generated tokens/s (4.8x to 6.4x slower over the demo's steps)."""
    fast = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in fast)


def auto_dtype(device):
    """'bf16' where bf16 products are fast: a GPU, or a CPU with bf16 matrix instructions; 'fp32' elsewhere."""
    return "bf16" if str(device).startswith("cuda") or cpu_has_bf16_units() else "fp32"


def warn_if_emulated(dtype, device):
    """One line on stderr (rank 0's) where --dtype bf16 runs on a CPU without bf16 matrix instructions."""
    if dtype == "bf16" and not str(device).startswith("cuda") and not cpu_has_bf16_units() and \
            os.environ.get("RANK", "0") == "0":
        print("--dtype bf16: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX), so bf16 is emulated and "
              "slow (about 5x slower than fp32 at the demo's size); --dtype fp32 is faster here", file=sys.stderr)


def device_error(device):
    """None if torch can compute on `device` here, else a one-line reason (a misspelled device, no GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        return f"--device {device}: {str(e).splitlines()[0]}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: torch sees no CUDA GPU on this machine (use --device cpu)"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
    if dev.type not in ("cpu", "cuda"):
        return f"--device {device}: only cpu and cuda are supported"
    return None


def write_error(path, folder=True):
    """None if `path` can be written (a folder, created if needed; or with folder=False a file), else a
    one-line reason: it is a file (a folder), it is a folder (a file), its folder is missing or read-only."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != folder:
        return f"{path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}"
    parent = os.path.dirname(path)
    if not folder and not os.path.isdir(parent):
        return f"{parent} (the folder of {path}) does not exist"
    existing = path if folder else parent
    while not os.path.exists(existing):  # the folders to create go into the nearest one that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is read-only for this user"
    return None


@dataclass
class GPTConfig:
    vocab_size: int = 32768
    n_layer: int = 8
    n_head: int = 8
    n_kv_head: int = 2
    n_embd: int = 512
    head_dim: int = 0            # 0: n_embd // n_head (Qwen3 sets it explicitly)
    intermediate_size: int = 1408
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict = None    # Llama 3.1/3.2: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    norm_eps: float = 1e-6
    qkv_bias: bool = False       # Qwen2 / Qwen2.5
    qk_norm: bool = False        # Qwen3
    tie_embeddings: bool = False
    arch: str = "qwen2"          # qwen2 | qwen3 | llama: what convert.py --to-hf writes

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32, scale in the input's dtype (as the reference implementations do for bf16 weights)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * xf.to(x.dtype)  # fp32 weights under autocast: a bf16 product


def rope_frequencies(config):
    """Inverse frequencies (head_dim // 2,), with Llama 3's frequency scaling when configured. Always built on
    the CPU, also inside a meta-device build (where arange would import torch's Python decompositions,
    about 2 s); the model moves it with its weights."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device="cpu") / D))
    s = config.rope_scaling
    if s:
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended
        old_len = s["original_max_position_embeddings"]
        low_wavelen = old_len / s["low_freq_factor"]
        high_wavelen = old_len / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.float()


def apply_rope(x, cos, sin):
    # x (B, H, T, D); cos, sin (B, 1, T, D); the "rotate half" layout of the HF checkpoints
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def compute_dtype(weight):
    """The dtype activations take with this weight: autocast's where autocast is on, else the weight's."""
    kind = weight.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


class KVCache:
    """Preallocated keys and values: one (B, H_kv, S_max, D) buffer per layer, written in place.
    Slot s of every row is written at the same step; a row's RoPE positions are its own (given to
    forward), so rows of different lengths share slots and the mask hides the slots a row lacks."""

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len

    def select(self, rows):
        """Keep only `rows` (a LongTensor of row indices), e.g. to drop finished rows or repeat a prompt."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


def attention(q, k, v, bias=None):
    """Attention of q (B, H, T, D) over k, v (B, H_kv, S, D), S >= T, the queries being the last T slots.
    bias: additive, in q's dtype (B or 1, 1, T, S), 0 where a query may attend and -inf elsewhere; None:
    causal, with S == T. On a GPU, SDPA's kernels; on the CPU, grouped_attention, faster there at the short lengths of
    RL rollouts (measured at the demo's shapes, 128 rows x 4 heads x 49 tokens in bf16, forward and
    backward per layer: about 10 ms, against 20 ms for SDPA's math kernel and 92 ms for its flash kernel)."""
    return (grouped_attention if q.device.type == "cpu" else sdpa_attention)(q, k, v, bias)


def grouped_attention(q, k, v, bias=None):
    """Attention written out: the rep = H / H_kv query heads that share a KV head are stacked as the rows
    of one product, so K and V are never copied per head. As in the reference implementations' eager
    attention, the products run in q's dtype and the softmax accumulates in fp32 (its output rounded to
    q's dtype). The scores (B, H, T, S) exist at once."""
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    if bias is None:  # causal (S == T)
        bias = torch.full((T, S), float("-inf"), device=q.device).triu_(1).to(q.dtype)
    else:
        bias = bias.unsqueeze(2)  # (B, 1, 1, T, S): the same for the rep heads of a group
    s = (q.reshape(B, G, H // G * T, D) * D ** -0.5) @ k.transpose(-1, -2)  # (B, G, rep * T, S)
    p = (s.view(B, G, H // G, T, S) + bias).softmax(-1)
    return (p.view(B, G, H // G * T, S) @ v).view(B, H, T, D)


def sdpa_attention(q, k, v, bias=None):
    """The same through F.scaled_dot_product_attention (the GPU's flash and memory-efficient kernels)."""
    B, H, T, D = q.shape
    G = k.shape[1]
    if G != H:
        if T == 1:  # decoding: the rep query heads that share a KV head become its rep query rows, no K/V copy
            return F.scaled_dot_product_attention(q.view(B, G, H // G, D), k, v, attn_mask=bias).view(B, H, 1, D)
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def forward(self, x, cos, sin, cache_kv, start, bias):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_kv is not None:
            ck, cv = cache_kv
            ck[:, :, start:start + T] = k
            cv[:, :, start:start + T] = v
            k, v = ck[:, :, :start + T], cv[:, :, :start + T]  # (B, H_kv, S, D)
        y = attention(q, k, v, bias)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache_kv, start, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_kv, start, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # nn.Embedding's own init (a standard normal), drawn here so that a meta-device build draws nothing:
        # normal_ on the meta device imports torch's Python decompositions: about 2 s of each checkpoint load
        w = torch.empty(config.vocab_size, config.n_embd)
        if w.device.type != "meta":
            nn.init.normal_(w)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd, _weight=w)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lora = None  # {r, alpha, base} once add_lora has given the model adapters
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # RoPE tables in fp32, not saved in checkpoints (from_pretrained rebuilds them after a meta-device build)
        self.register_buffer("inv_freq", rope_frequencies(config).to(w.device), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype) / .bfloat16() would round the RoPE frequencies: keep them fp32 on the model's device
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = rope_frequencies(self.config).to(self.embed_tokens.weight.device)
        return self

    @property
    def head_weight(self):
        """(V, d): the output projection, tied to the embedding or not."""
        return self.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def init_weights(self, std=0.02):
        """Random init for training from scratch (the demo's base model)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        return self

    def hidden(self, idx, pos=None, cache=None, start=0, mask=None, checkpoint=False):
        """Final-normed hidden states (B, T, d).
        idx (B, T) token ids; pos (B, T) RoPE positions (default start + arange(T));
        cache: a KVCache, written at slots [start, start + T); mask: bool (B, 1, T, start + T),
        True where a query may attend (each query must see at least its own slot), default causal.
        checkpoint: keep only each block's input for the backward, which recomputes the block (activation
        checkpointing, torch.utils.checkpoint; without a cache)."""
        if checkpoint and cache is not None:
            raise ValueError("hidden: activation checkpointing recomputes blocks, which would write the KV cache twice")
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device).expand(B, T)
        if mask is None and start > 0:  # causal mask offset by the cached slots
            q_slot = torch.arange(start, start + T, device=idx.device)
            mask = (torch.arange(start + T, device=idx.device)[None, :] <= q_slot[:, None])[None, None]
        angles = pos[..., None].float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
        # compute precision: under autocast the residual stream is kept in the autocast dtype, so fp32
        # master weights compute exactly what the same weights stored in that dtype compute
        x = self.embed_tokens(idx).to(compute_dtype(self.embed_tokens.weight))
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        bias = None if mask is None else torch.zeros(mask.shape, device=x.device, dtype=x.dtype).masked_fill_(
            ~mask, float("-inf"))  # additive, built once for every layer
        for i, block in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, kv, start, bias, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv, start, bias)
        return self.norm(x)

    def hidden_shared(self, prefix, prefix_len, suffix, group):
        """Final-normed hidden states (R, T, d) of `suffix` (R, T), where row r continues the first
        prefix_len[g] tokens of prefix[g] (prefix (n, P), g = group[r]): rows that share a prompt (the k
        samples of RL) run it once. The prefix's keys and values go through a KV cache, with gradients,
        then are copied to the rows that continue it; the suffix sees its prefix's valid slots and itself
        causally, at positions prefix_len[g] + t. The same values as hidden() over each whole row."""
        n, P = prefix.shape
        R, T = suffix.shape
        dev = suffix.device
        cache = KVCache(self.config, n, P + T, device=dev, dtype=compute_dtype(self.head_weight))
        if P:
            self.hidden(prefix, cache=cache)  # writes slots [0, P); the final layer's outputs there are not used
        cache.select(group)
        plen = prefix_len[group]  # (R,)
        t = torch.arange(T, device=dev)
        slot = torch.arange(P + T, device=dev)
        mask = (slot < plen[:, None, None]) | ((slot >= P) & (slot - P <= t[:, None]))  # (R, T, P + T)
        return self.hidden(suffix, pos=plen[:, None] + t, cache=cache, start=P, mask=mask[:, None])

    def forward(self, idx, pos=None, cache=None, start=0, mask=None):
        """Logits (B, T, V). For training losses use hidden() and token_logprobs() instead,
        which never hold the (B, T, V) logits at once."""
        return F.linear(self.hidden(idx, pos, cache, start, mask), self.head_weight)

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, ckpt_dir, device="cpu", dtype=None):
        """Build on the meta device and assign the saved tensors: no second copy in memory. A LoRA
        checkpoint (lora.json and adapters.pt) gives its base model with the adapters attached, unmerged;
        `dtype` casts the weights, and the adapters stay fp32 (what a LoRA run trains)."""
        lora = read_lora(ckpt_dir)
        config, state = load_checkpoint(lora["base"] if lora else ckpt_dir)
        with torch.device("meta"):
            model = cls(config)
        if lora:
            add_lora(model, lora["r"], lora["alpha"], lora["base"])
            state = {**state, **load_tensors(os.path.join(ckpt_dir, "adapters.pt"))}
        check_state(ckpt_dir, model, state)
        model.load_state_dict(state, strict=False, assign=True)
        model.inv_freq = rope_frequencies(config)
        adapters = {n: p.data for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
        model = model.to(device=device, dtype=dtype)
        for n, p in model.named_parameters():
            if n in adapters:  # not through dtype: a round trip through bf16 would round them
                p.data = adapters[n].to(device=device, dtype=torch.float32)
        return model

    def save_pretrained(self, ckpt_dir):
        """config.json and model.pt; for a LoRA model the adapters (adapters.pt) and lora.json, which names
        the base checkpoint whose frozen weights they belong to, instead of the weights."""
        if not self.lora:
            return save_checkpoint(ckpt_dir, self.config, self.state_dict())
        adapters = {k: v for k, v in self.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
        save_checkpoint(ckpt_dir, self.config, adapters, name="adapters.pt")
        atomic_write(os.path.join(ckpt_dir, "lora.json"), json.dumps(self.lora, indent=2).encode())


def read_lora(ckpt_dir):
    """A LoRA checkpoint's lora.json, {r, alpha, base}; None for a checkpoint of whole weights."""
    path = os.path.join(ckpt_dir, "lora.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lora = json.load(f)
    if not os.path.exists(os.path.join(lora["base"], "model.pt")):
        raise FileNotFoundError(f"{path}: its base checkpoint {lora['base']} (the frozen weights the adapters "
                                f"belong to) has no model.pt")
    return lora


def load_checkpoint(ckpt_dir):
    """(GPTConfig, state_dict) from a checkpoint directory: config.json + model.pt (memory-mapped). A LoRA
    checkpoint gives its base's weights with the adapters merged in, in fp32 (merge_lora): what --to-hf
    exports."""
    if read_lora(ckpt_dir):
        model = merge_lora(GPT.from_pretrained(ckpt_dir, dtype=torch.float32))
        return model.config, model.state_dict()
    w_path = os.path.join(ckpt_dir, "model.pt")
    config = load_config(ckpt_dir)
    if not os.path.exists(w_path):
        raise FileNotFoundError(f"{w_path} not found: is {ckpt_dir} a checkpoint written by convert.py or a training script?")
    state = load_tensors(w_path)
    with torch.device("meta"):
        check_state(ckpt_dir, GPT(config), state)
    return config, state


def check_state(ckpt_dir, model, state):
    """A CheckpointError unless `state` holds exactly the tensors of `model` (built from the config.json of
    ckpt_dir), each of its shape: a config.json edited or a model.pt of another model is one line."""
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = [n for n in expected if n not in state and n != "inv_freq"]  # RoPE's table is rebuilt, not saved
    unexpected = [n for n in state if n not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: the weights file does not match its config.json: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for n, t in state.items():
        if not isinstance(t, torch.Tensor) or t.shape != expected[n].shape:
            raise CheckpointError(f"{ckpt_dir}: {n} is {tuple(getattr(t, 'shape', ()))} in its weights but "
                                  f"{tuple(expected[n].shape)} by its config.json: one of the two is not this model's")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as this project writes it; the message names the file."""


def load_tensors(path, weights_only=True):
    """torch.load of a checkpoint file (memory-mapped), a damaged one (truncated, overwritten) a CheckpointError
    naming it. weights_only=False only for the project's own state.pt (the Adam state and the run's args)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as e:  # a damaged zip, a short read, a pickle of something else: torch says it many ways
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is damaged (truncated, or not a checkpoint file): torch cannot read it "
                              f"({why[:150]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint's dict")
    return state


def load_config(ckpt_dir):
    """The GPTConfig of a checkpoint directory (its config.json), each value checked against its field's type."""
    cfg_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: is {ckpt_dir} a checkpoint written by convert.py or a training script?")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    kinds = {f.name: f.type.__name__ for f in fields(GPTConfig)}
    unknown = set(raw) - set(kinds)
    if unknown:
        raise CheckpointError(f"{cfg_path}: unknown config keys {sorted(unknown)}")
    for k, v in raw.items():
        ok = {"int": type(v) is int, "float": type(v) in (int, float), "bool": type(v) is bool,
              "str": type(v) is str, "dict": v is None or type(v) is dict}[kinds[k]]
        if not ok or (kinds[k] == "int" and v < (0 if k == "head_dim" else 1)):
            raise CheckpointError(f"{cfg_path}: {k} is {v!r}, not a{'n' if kinds[k] == 'int' else ''} {kinds[k]}"
                                  + (" of at least 1" if kinds[k] == "int" and k != "head_dim" else ""))
    try:
        return GPTConfig(**raw)
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def atomic_write(path, data):
    """Write bytes, a state dict (torch.save), or what a function data(f) writes, to a temporary file beside
    `path`, then rename it over `path`: a reader never sees half a file. Readable as a file open() creates."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.")
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's are 0600: another user could not read a checkpoint
    with os.fdopen(fd, "wb") as f:
        if callable(data):
            data(f)
        elif isinstance(data, bytes):
            f.write(data)
        else:
            torch.save(data, f)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir, config, state_dict, name="model.pt"):
    """Write config.json and the tensors (model.pt) atomically (temporary files, then renames)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    atomic_write(os.path.join(ckpt_dir, name), state_dict)
    atomic_write(os.path.join(ckpt_dir, "config.json"), json.dumps(asdict(config), indent=2).encode())


# ------------------------------------------------------------------------------- LoRA
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """A frozen projection and a trainable low-rank update (Hu et al. 2021):
    y = x W^T + b + (alpha / r) (x A^T) B^T, with A (r, in) drawn as nn.Linear draws a weight and B (out, r)
    zero, so that a fresh adapter computes exactly the frozen layer. With `enabled` False it is the frozen
    layer alone: the reference model of a LoRA run is its policy with every adapter off (adapters_off)."""

    def __init__(self, base, r, alpha):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: frozen, in their own dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=base.weight.device))
        if base.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale, self.enabled = alpha / r, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a, b = (self.lora_A, self.lora_B) if torch.is_autocast_enabled(x.device.type) else \
            (self.lora_A.to(x.dtype), self.lora_B.to(x.dtype))
        return y + F.linear(F.linear(x, a), b) * self.scale


def add_lora(model, r, alpha, base):
    """Freeze `model` and give each attention and MLP projection a LoRA adapter of rank r (fp32); returns the
    model, whose trainable parameters are then the adapters alone. `base` is the checkpoint the frozen
    weights come from: save_pretrained writes the adapters and that path, not the weights."""
    model.requires_grad_(False)
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in LORA_TARGETS:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha))  # fp32 adapters
    model.lora = {"r": r, "alpha": alpha, "base": os.path.abspath(base)}
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_off(model):
    """Inside, a LoRA model computes its frozen base model (a LoRA run's reference); a no-op without adapters.
    On exit each adapter is as it was before (nested uses stay off until the outermost one ends)."""
    before = [(m, m.enabled) for m in lora_layers(model)]
    for m, _ in before:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in before:
            m.enabled = enabled


@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its weight, W + (alpha / r) B A (in fp32, stored in W's dtype), and make the
    model a plain one again."""
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in LORA_TARGETS:
                m = getattr(parent, name, None)
                if isinstance(m, LoRALinear):
                    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                    w = m.weight.float() + m.scale * (m.lora_B.float() @ m.lora_A.float())
                    lin.weight, lin.bias = nn.Parameter(w.to(m.weight.dtype), requires_grad=False), m.bias
                    setattr(parent, name, lin)
    model.lora = None
    return model


# -------------------------------------------------------------------- fused log-probs
class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T / temperature)[targets]: forward in blocks of tokens, keeping
    only the per-token log-sum-exp; backward recomputes the logits in blocks of the vocabulary.
    One buffer of chunk x V elements is reused for every block, so the (N, V) logits never exist."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        N = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # fp32 at least
        out = torch.empty(N, device=hidden.device, dtype=acc)
        lse = torch.empty(N, device=hidden.device, dtype=acc)
        buf = torch.empty(min(chunk, N), weight.shape[0], device=hidden.device, dtype=acc)
        W = weight.to(hidden.dtype)  # products in hidden's dtype (a bf16 hidden under autocast, an fp32 head)
        for s in range(0, N, chunk):
            logits = _chunk_logits(hidden[s:s + chunk], W, temperature, buf)  # (c, V)
            tgt, m, z = _shifted_exp_(logits, targets[s:s + chunk])
            lse[s:s + chunk] = m + z.log()
            out[s:s + chunk] = tgt - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Recompute the logits in column blocks of the vocabulary, the same buffer size as forward:
        # each block of the weight gradient is written once, and only the small (N, d) hidden
        # gradient accumulates (token blocks would add into the whole (V, d) gradient every block).
        hidden, weight, targets, lse = ctx.saved_tensors
        T = ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = hidden.shape[0], weight.shape[0]
        cols = max(1, min(V, ctx.chunk * V // max(N, 1)))
        g = grad_out.to(lse.dtype) / T  # d out_i / d logits_ij = (1[j == t_i] - p_ij) / T
        grad_h = torch.zeros(hidden.shape, device=hidden.device, dtype=lse.dtype) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        buf = torch.empty(N, cols, device=hidden.device, dtype=lse.dtype)
        W = weight.to(hidden.dtype)  # as in forward; backward may run outside the forward's autocast
        for v in range(0, V, cols):
            Wv = W[v:v + cols]
            G = _chunk_logits(hidden, Wv, T, buf[:, :Wv.shape[0]]).sub_(lse[:, None]).exp_().mul_(-g[:, None])
            rows = ((targets >= v) & (targets < v + cols)).nonzero().squeeze(1)  # targets in this block
            G[rows, targets[rows] - v] += g[rows]
            G = G.to(hidden.dtype)  # (N, cols) = g * (onehot - p) / T
            if need_h:
                if grad_h.dtype == G.dtype:
                    grad_h.addmm_(G, Wv)
                else:
                    grad_h += G @ Wv
            if need_w:  # this block of the weight gradient, written once
                if G.dtype == grad_w.dtype:
                    torch.mm(G.T, hidden, out=grad_w[v:v + cols])
                else:
                    grad_w[v:v + cols] = G.T @ hidden
        return (grad_h.to(hidden.dtype) if need_h else None), grad_w, None, None, None


def _chunk_logits(h, weight, temperature, buf):
    """h @ weight.T / temperature into (a view of) buf, in buf's dtype."""
    out = buf[:h.shape[0], :weight.shape[0]]
    if h.dtype == out.dtype:
        torch.mm(h, weight.T, out=out)
    else:
        out.copy_(h @ weight.T)
    return out.div_(temperature) if temperature != 1.0 else out


def _shifted_exp_(logits, targets):
    """The target logits, the row maxima m and z = sum exp(logits - m); turns `logits` into
    exp(logits - m) in place, so no second (c, V) buffer is needed."""
    tgt = logits.gather(1, targets[:, None]).squeeze(1)
    m = logits.amax(dim=1)
    return tgt, m, logits.sub_(m[:, None]).exp_().sum(dim=1)


def _check_head(name, hidden, weight, targets, chunk):
    """Refuse shapes that do not fit; return the chunk (default: a 128 MiB fp32 buffer of chunk x V)."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: shapes hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)} do not fit (N, d), (V, d), (N,)")
    return chunk or max(1, 2**25 // weight.shape[0])


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk=None):
    """Log-probs (N,) in fp32 (fp64 for fp64 inputs) of `targets` (N,) under
    softmax(hidden (N, d) @ weight (V, d).T / temperature), differentiable in hidden and weight,
    never materializing the (N, V) logits: chunks of `chunk` tokens (default: a 128 MiB buffer)."""
    chunk = _check_head("token_logprobs", hidden, weight, targets, chunk)
    return _TokenLogprobs.apply(hidden, weight, targets, float(temperature), chunk)
