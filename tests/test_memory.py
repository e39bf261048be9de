"""memory.memory_model against independent counts: parameters of a GPT built on the meta device, the KV
cache generate_turns actually allocates, and the bytes autograd actually saves for backward (read with
saved_tensors_hooks). No timing or resident-memory assertions here: bench.py --only memory measures."""
import math
from types import SimpleNamespace

import pytest
import torch

import memory
import rl
import shard
from model import GPT, GPTConfig, add_lora
from sample import generate_turns
import sample

CONFIGS = [  # GQA with q/k/v biases and a tied head; plain multi-head, untied; Qwen3's q/k norms and head_dim
    GPTConfig(vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=176, max_seq_len=512,
              qkv_bias=True, tie_embeddings=True),
    GPTConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, intermediate_size=96, max_seq_len=512),
    GPTConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=24, intermediate_size=96,
              max_seq_len=512, qk_norm=True),
]


def knobs(**kw):
    return SimpleNamespace(**{"batch": 8, "k": 2, "micro_batch": 2, "max_new_tokens": 8, "gen_batch": None,
                              "dtype": "fp32", "device": "cpu", **kw})


@pytest.mark.parametrize("cfg", CONFIGS)
def test_state_terms_count_the_meta_models_parameters(cfg):
    with torch.device("meta"):
        model = GPT(cfg)
    P = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    # what autocast casts (and caches during update): the blocks' linear weights and biases, not the norms
    linear = sum(p.numel() for n, p in model.layers.named_parameters() if "norm" not in n)
    for dtype, ref_bytes in (("fp32", 4), ("bf16", 2)):
        m = memory.memory_model(cfg, knobs(dtype=dtype))
        assert (m["weights"], m["grads"], m["adam"], m["ref"]) == (4 * P, 4 * P, 8 * P, ref_bytes * P)
        assert m["autocast"] == (2 * linear if dtype == "bf16" else 0)
    # LoRA: the frozen weights in the compute dtype, fp32 masters, gradients and Adam state for the adapters only
    model = add_lora(model, 8, 16.0, "unused")
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    for dtype, cb in (("fp32", 4), ("bf16", 2)):
        m = memory.memory_model(cfg, knobs(dtype=dtype, lora=8))
        assert (m["weights"], m["grads"], m["adam"]) == (cb * P + 4 * adapters, 4 * adapters, 8 * adapters)
        assert m["ref"] == m["sampler"] == 0 and m["autocast"] == (2 * adapters if dtype == "bf16" else 0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("base_first, turns", [(0.0, 2), (0.5, 2), (0.0, 3), (0.5, 3)])
def test_kv_cache_is_what_generate_turns_allocates(monkeypatch, dtype, base_first, turns):
    cfg = CONFIGS[0]
    prompt_len, followup_len, rows, k, mnt = 11, 5, 6, 3, 7
    caches = []

    class Recorded(sample.KVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)
    monkeypatch.setattr(sample, "KVCache", Recorded)
    model = GPT(cfg).init_weights()
    prompts = [[1] * prompt_len, [2] * (prompt_len - 3)]  # the longest prompt sets the cache's length
    first = [[3] * mnt if r % 2 else None for r in range(rows)] if base_first else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        generate_turns(model, prompts, [4] * followup_len, mnt, turns=turns, k=k, seed=0, first=first)
    (cache,) = caches
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)  # after repeating prompts to k rows
    # --gen-batch rows + k - 1: rounded down to whole prompt groups, as rl.rollout chunks
    m = memory.memory_model(cfg, knobs(gen_batch=rows + k - 1, k=k, max_new_tokens=mnt, dtype=dtype, base_first=base_first,
                                       turns=turns),
                        prompt_len=prompt_len, followup_len=followup_len)
    assert m["kv_cache"] == allocated


def saved_bytes(model, dtype, fn):
    """Bytes of the distinct storages autograd saves for backward while fn() runs under the compute dtype's
    autocast, leaving out the weights and autocast's casts of them. Every saved tensor is kept alive, so no
    storage's address is reused."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def is_weight(t):
        fn = t.grad_fn
        while fn is not None and type(fn).__name__ in ("TBackward0", "ToCopyBackward0", "ViewBackward0"):
            fn = fn.next_functions[0][0]
        return t.untyped_storage().data_ptr() in params or (t.grad_fn is None and t.requires_grad) \
            or type(fn).__name__ == "AccumulateGrad"
    seen, kept = {}, []

    def pack(t):
        kept.append(t)
        if not is_weight(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("lora, mode", [(0, "shared"), (0, "sharded"), (0, "checkpointed"), (4, "shared"),
                                        (4, "checkpointed")])  # a LoRA policy is never sharded
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_activations_are_what_autograd_saves(cfg, dtype, lora, mode, monkeypatch):
    """The policy's pass of rl.objective_input (rl.generated_hidden: each prompt once for its k rows; each row whole
    where FSDP2 shards the policy (world 2, full fine-tuning only) or with activation checkpointing), full
    fine-tuning and LoRA (its weights frozen in the compute dtype). With checkpointing the term adds, to what
    the forward keeps, one block's recomputation: what autograd saves in a block's forward over the whole rows."""
    ckpt, world = mode == "checkpointed", 2 if mode == "sharded" else 1
    monkeypatch.setattr(shard, "is_sharded", lambda model: mode == "sharded")  # what generated_hidden asks
    prompt_len, followup_len, micro, k, mnt = 10, 6, 4, 2, 8
    T = prompt_len + 2 * mnt + followup_len + 2  # the model's worst-case positions of a row
    torch.manual_seed(0)
    model = GPT(cfg).init_weights()
    if lora:
        model = add_lora(model.to(torch.bfloat16 if dtype == "bf16" else torch.float32), lora, 8.0, "unused")
    idx = torch.randint(0, cfg.vocab_size, (micro, T + 1))
    idx[:, :prompt_len] = idx[::k, :prompt_len].repeat_interleave(k, 0)  # the k rows of a group share a prompt
    m1 = torch.zeros(micro, T, dtype=torch.bool)
    m1[:, prompt_len - 1:prompt_len - 1 + mnt] = True  # turn 1's targets: the prompt's last token predicts y1's first
    sel = m1.clone()
    sel[:, -mnt:] = True  # and turn 2's
    got = saved_bytes(model, dtype, lambda: rl.generated_hidden(idx, sel, m1, k)(model, ckpt))
    if ckpt:  # one block recomputed, as the backward runs it: the whole rows' input, RoPE tables, causal
        x0 = torch.randn(micro, T, cfg.n_embd, requires_grad=True)  # x, not a leaf: its copies are not a weight's
        x = (x0 * 1).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        angles = torch.arange(T)[:, None].float() * model.inv_freq
        cos, sin = (f(torch.cat((angles, angles), -1))[None, None].to(x.dtype) for f in (torch.cos, torch.sin))
        got += saved_bytes(model, dtype, lambda: model.layers[0](x, cos, sin, None, 0, None))
    m = memory.memory_model(cfg, knobs(micro_batch=micro, k=k, max_new_tokens=mnt, dtype=dtype, lora=lora,
                                       checkpoint_activations=ckpt), world=world, prompt_len=prompt_len,
                            followup_len=followup_len)
    assert abs(m["activations"] - got) <= 0.01 * got, (m["activations"], got)


def test_monotonic_in_gen_batch_and_micro_batch():
    cfg = CONFIGS[0]
    for dtype in ("fp32", "bf16"):
        prev = None
        for g in (2, 4, 8, 16):
            m = memory.memory_model(cfg, knobs(batch=16, gen_batch=g, dtype=dtype))
            if prev:
                assert m["kv_cache"] > prev["kv_cache"] and m["sampling"] > prev["sampling"]
                assert m["total"] >= prev["total"] and m["update"] == prev["update"]
            prev = m
        prev = None
        for mb in (2, 4, 8, 16):
            m = memory.memory_model(cfg, knobs(batch=16, micro_batch=mb, dtype=dtype))
            if prev:
                assert m["activations"] > prev["activations"] and m["head"] >= prev["head"]
                assert m["total"] >= prev["total"] and m["sampling"] == prev["sampling"]
            prev = m
        assert m["total"] == max(m["sampling"], m["update"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_world_shards_full_fine_tuning_and_all_reduces_lora(dtype):
    """world > 1, full fine-tuning (FSDP2): the masters, gradients and Adam state are the largest rank's shard
    (each parameter's first dimension split in world chunks, rounded up; tests/test_distributed.py counts
    real shards), the reference and the sampler copy whole on every rank (the sampler in fp32 too), no flat
    buffer, the root and two blocks gathered whole in the update, the whole fp32 policy at load. A LoRA
    policy stays whole and all-reduces its adapters' gradients through one flat buffer."""
    cfg = CONFIGS[0]
    with torch.device("meta"):
        model = GPT(cfg)
    P = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = P - cfg.n_layer * block  # the embedding (tied head) and the final norm
    cb = 2 if dtype == "bf16" else 4
    a = knobs(batch=16, micro_batch=2, max_new_tokens=2, device="cpu", dtype=dtype)
    one, eight = (memory.memory_model(cfg, a, world=w, prompt_len=4, followup_len=4) for w in (1, 8))
    local = sum(math.ceil(p.shape[0] / 8) * p[0].numel() for p in model.parameters())
    assert P / 8 < local < P / 4
    assert (eight["weights"], eight["grads"], eight["adam"]) == (4 * local, 4 * local, 8 * local)
    assert (eight["ref"], eight["sampler"]) == (cb * P, cb * P) and one["sampler"] == (2 * P if dtype == "bf16" else 0)
    assert eight["allreduce"] == 0 and eight["gathered"] == 4 * (root + 4 * block) and one["gathered"] == 0
    assert (eight["load"], one["load"]) == (4 * P, 0)
    assert eight["kv_cache"] * 8 == one["kv_cache"]  # without --gen-batch each rank samples its batch // world rows
    lora = add_lora(model, 8, 16.0, "unused")
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    one, two = (memory.memory_model(cfg, knobs(**{**vars(a), "lora": 8}), world=w, prompt_len=4, followup_len=4)
                for w in (1, 2))
    assert (one["allreduce"], two["allreduce"]) == (0, 4 * adapters) and two["weights"] == one["weights"]


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        memory.memory_model(CONFIGS[0], knobs(dtype="fp16"))
