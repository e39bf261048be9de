"""
The memory model of one SCoRe step: what a Stage I/II step holds at its peak on one process (on each
rank under torchrun), term by term, from the model's shapes and the run's flags, and the --gen-batch that
fits a GPU (rl.run's default on a GPU). bench.py --only memory prints its tables and checks it against the
CPU's measured peak; tests/test_memory.py checks its terms against independent counts (a meta model's
parameters, the KV cache the sampler allocates, the bytes autograd saves), tests/test_distributed.py the
shards that FSDP2 gives each rank and each rank's peak in an update, counted op by op.
"""
import math
from types import SimpleNamespace


def parameter_shapes(config):
    """The shape of each of the model's parameters (model.py's GPT): the embedding, per layer the norms, q/k/v
    (biases, Qwen3's q/k norms), o and the MLP, the final norm and an untied head."""
    c = config
    d, D, I, HD, KD = c.n_embd, c.head_dim, c.intermediate_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    layer = [(d,), (HD, d), (KD, d), (KD, d), (d, HD), (d,), (I, d), (I, d), (d, I)]
    layer += [(HD,), (KD,), (KD,)] * c.qkv_bias + [(D,), (D,)] * c.qk_norm
    return [(c.vocab_size, d)] + layer * c.n_layer + [(d,)] + [(c.vocab_size, d)] * (not c.tie_embeddings)


def shard_numel(shapes, world):
    """Elements of the largest rank's shards of these parameters: FSDP2 splits each one's first dimension in
    `world` chunks, the first ones rounded up (torch.chunk)."""
    return sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes)


def memory_model(config, args, world=1, prompt_len=256, followup_len=64):
    """Predicted memory of one Stage I/II step on one process (each of `world` ranks), in bytes: {term: bytes}
    and the peaks "sampling", "update", "load" and "total" = their max. The terms do not all coexist:
      sampling: policy weights (fp32, 4P), gradients (4P, kept from the last step until update's
        zero_grad), Adam (8P), the reference in the compute dtype, the KV cache of one gen-batch, and
        the largest of sampling's transients;
      update: the same weights, Adam and reference, the gradients (allocated by the first micro-batch:
        the peak is at the second), autocast's bf16 copies of the policy's linear weights, and the
        largest of: one micro-batch's activations with the log-prob head's buffers; the reference's
        pass; the flat all-reduce buffer (LoRA, world > 1); the optimizer's temporaries.
    --lora R: the weights are frozen in the compute dtype and only the adapters (r x (in + out) per
    projection) have fp32 masters, gradients and Adam state; no separate reference or sampler copy (the
    policy is both, its adapters off or on); autocast casts only the adapters; the head has no gradient.
    --checkpoint-activations: the policy's pass runs each row whole and keeps each block's input; the
    backward holds one block's activations at a time.
    world > 1, full fine-tuning (FSDP2, shard.py): the masters, gradients and Adam state are the rank's shard
    (about 1/world each); the reference and the sampler copy are whole on every rank (the sampler in the
    compute dtype, fp32 included); the policy's pass runs whole rows; autocast caches no casts (each
    linear's bf16 weight lives while autograd keeps it: every block's without checkpointing, one block's
    with it); "gathered": while the update runs, the root's weights whole (embedding, final norm, an untied
    head) and four blocks' worth whole: the weights of the running block and of the one gathered ahead, the
    running block's gradients, and the reduce-scatter's copy of the previous block's (FSDP2 keeps it until the
    next reduce-scatter); "load": the whole fp32 policy before it is sharded.
    Lengths are worst cases: prompt_len (256: a long MATH or MBPP prompt) + T * max_new_tokens +
    (T - 1) * (followup_len (p1 rendered, 64) + 2) positions per row (T = args.turns attempts, default 2), and
    every attempt runs to max_new_tokens.
    args: batch, k, micro_batch, max_new_tokens, gen_batch (None: all rows), dtype, device (default cuda),
    lora (default 0), checkpoint_activations (default False), turns (default 2).
    Not counted: the CUDA context, the allocators' slack (cached or fragmented free memory), Python."""
    c = config
    d, V, L, D, I = c.n_embd, c.vocab_size, c.n_layer, c.head_dim, c.intermediate_size
    HD, KD = c.n_head * D, c.n_kv_head * D
    cuda = str(getattr(args, "device", "cuda")).startswith("cuda")
    dtype = getattr(args, "dtype", None) or ("bf16" if cuda else "fp32")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"memory_model: dtype {dtype!r} is not bf16 or fp32")
    cb = 2 if dtype == "bf16" else 4  # bytes of the compute dtype
    r, ckpt = getattr(args, "lora", 0) or 0, getattr(args, "checkpoint_activations", False)
    mnt, k, micro = args.max_new_tokens, args.k, args.micro_batch
    rows = args.batch // world  # rows sampled at once: all of a rank's, or --gen-batch's whole prompt groups
    if getattr(args, "gen_batch", None):
        rows = min(rows, max(1, args.gen_batch // k) * k)
    turns = getattr(args, "turns", None) or 2  # attempts per rollout
    S = prompt_len + turns * mnt + (turns - 1) * (followup_len + 2)  # positions of a row (generate_turns' cache)
    S_gen = S + (mnt if getattr(args, "base_first", 0) > 0 else 0)  # a given first attempt takes its own slots
    T2 = followup_len + 2  # turn 2's prefill: the last token of y1, eot, p1
    N = micro * turns * mnt  # generated tokens of a micro-batch: the log-prob head's rows
    # parameters, from the shapes (model.py's GPT)
    shapes = parameter_shapes(c)
    P = sum(math.prod(s) for s in shapes)
    linear = L * (d * (HD + 2 * KD) + HD * d + 3 * d * I + c.qkv_bias * (HD + 2 * KD))  # autocast casts these
    P_lora = r * L * (7 * d + 2 * HD + 2 * KD + 3 * I)  # A and B of q, k, v, o, gate, up, down
    sharded = world > 1 and not r  # FSDP2 shards full fine-tuning; a LoRA policy stays whole (shard.py)
    P_rank = shard_numel(shapes, world) if sharded else P  # this rank's masters
    P_root = V * d * (1 if c.tie_embeddings else 2) + d  # FSDP2's root: the embedding, final norm, untied head
    P_block = (P - P_root) // L
    trained = P_lora if r else P_rank
    largest = max(shard_numel([s], world if sharded else 1) for s in shapes)  # the largest (shard of a) parameter
    # What autograd keeps (tests/test_memory.py checks the CPU's terms against the saved tensors): under
    # autocast the residual stream is in the compute dtype; each RMSNorm keeps an fp32 copy of its input
    # (and its normalized output where its weight trains); the q/k/v (gate/up) projections share one saved
    # input; a LoRA adapter also keeps its (tokens, r) product.
    norm = (4 + cb * (not r)) * d + 4  # an RMSNorm: its fp32 input, rsqrt, the normalized output (weight trained)
    per_layer = (2 * norm                                       # the two RMSNorms
                 + 2 * d * cb                                   # the normed inputs of q/k/v and of gate/up
                 + 2 * HD * cb                                  # attention: the scaled q, o_proj's input
                 + c.qk_norm * ((4 + cb * (not r)) * (HD + KD) + 4 * (c.n_head + c.n_kv_head))  # Qwen3's q/k norms
                 + 4 * I * cb                                   # MLP: gate, up, silu(gate), product
                 + 7 * r * cb)                                  # LoRA: x A^T of each adapter
    final = 8 + 2 * D * cb + norm  # per token, once: the token id, RoPE's cos and sin, the final RMSNorm
    if ckpt or sharded:
        # Whole rows of S tokens. Checkpointed, kept through the forward: each block's input and the final norm's;
        # during a block's backward its recomputed activations (and on the CPU its probabilities). Else every
        # block's activations.
        T = S
        tokens = micro * T
        attn = (micro * c.n_head * T * T * cb + micro * T * 2 * KD * cb) if not cuda else \
            tokens * (HD * cb + 4 * c.n_head + 2 * HD * cb)  # SDPA (causal, no mask): out, lse, K and V expanded
        if ckpt:
            acts = tokens * (L * d * cb + final) + tokens * per_layer + attn
        else:
            acts = tokens * (L * per_layer + final) + L * attn
    else:
        # The trainer runs each prompt once for its k samples (rl.generated_hidden): per micro-batch, n groups
        # of P0 = prompt_len - 1 shared tokens, and `micro` rows of T0 = S - P0 tokens each, whose keys and
        # values sit in a KV cache of P0 + T0 slots per row.
        n, P0 = micro // k, prompt_len - 1
        T0 = S - P0
        tokens = n * P0 + micro * T0
        keys = n * P0 * P0 + micro * T0 * (P0 + T0)  # (query, key) pairs of the prefix and the suffix passes
        if cuda:  # SDPA (unmeasured): its output and log-sum-exp, K and V expanded to n_head heads, the bias once
            attn = L * (tokens * (HD * cb + 4 * c.n_head) + (n * P0 + micro * (P0 + T0)) * 2 * HD * cb) \
                + micro * T0 * (P0 + T0) * cb
        else:  # grouped_attention: the probabilities, and the KV caches of both passes (n and micro rows)
            attn = L * (keys * c.n_head * cb + (n + micro) * (P0 + T0) * 2 * KD * cb)
        acts = tokens * (L * per_layer + final) + attn
        if r:  # frozen embedding: no token ids kept, and nothing for the first RMSNorm (its input needs no gradient)
            acts -= tokens * (8 + norm)
    # the reference's pass, before the policy's and without gradient, shares prompts in both modes
    n, P0 = micro // k, prompt_len - 1
    T0 = S - P0
    ref_tokens, ref_keys = n * P0 + micro * T0, n * P0 * P0 + micro * T0 * (P0 + T0)
    chunk = min(max(1, 2**25 // V), N)  # model.token_logprobs' block of tokens (its buffer: chunk x V fp32)
    m = {
        "weights": cb * P + 4 * P_lora if r else 4 * P_rank,  # LoRA: the frozen weights in the compute dtype
        "grads": 4 * trained,
        "adam": 8 * trained,
        "ref": 0 if r else cb * P,  # LoRA: the policy with its adapters off
        # the copy that samples: bf16, or sharded (in the compute dtype); not with LoRA
        "sampler": cb * P if (cb == 2 or sharded) and not r else 0,
        # autocast's bf16 casts of the trained weights: cached for the step; sharded, uncached (what autograd keeps)
        "autocast": 0 if cb == 4 else 2 * P_lora if r else 2 * linear // (L if sharded and ckpt else 1),
        "kv_cache": rows * S_gen * L * 2 * KD * cb,
        # the largest of: the prompts' cache while select() repeats it to k rows; turn 2's prefill (its
        # mask, bool and as SDPA's float bias, and one MLP's work); a decode step's logits and probabilities;
        # sharded, the refresh of the sampler, which gathers one fp32 parameter at a time (before the cache).
        # (In bf16 the sampler is the policy's bf16 copy: nothing is cast.)
        "sample_work": max(rows // k * S_gen * L * KD * cb, rows * T2 * (5 * S_gen + 3 * I * cb + 2 * d * cb),
                           3 * rows * V * 4, 4 * V * d * sharded),
        "activations": acts + N * 16,  # + the (N, 2) int64 index of the generated tokens
        # token_logprobs, at its backward (every activation still held): the generated tokens' hidden
        # states it saved, their fp32 gradient, the (chunk, V) fp32 buffer of recomputed logits, the (V, d) fp32
        # weight gradient (not with LoRA: the head is frozen); in bf16 also a block's bf16 product and, for fp32
        # masters, the head's bf16 copy
        "head": chunk * V * 4 + N * d * (cb + 4) + (0 if r else V * d * 4)
                + (chunk * V * 2 + (0 if r else V * d * 2) if cb == 2 else 0),
        # the reference's pass before the policy's: its hidden states, KV caches, token_logprobs' buffer, one
        # MLP's work (and on the CPU one layer's scores)
        "ref_pass": ref_tokens * (d + 3 * I) * cb + L * (n + micro) * (P0 + T0) * 2 * KD * cb + N * d * cb
                    + chunk * V * 4 + (0 if cuda else 2 * ref_keys * c.n_head * cb),
        "allreduce": 4 * trained if world > 1 and not sharded else 0,
        "gathered": 4 * (P_root + 4 * P_block) if sharded else 0,
        # torch's Adam: foreach on CUDA (a temporary the size of all trained parameters); per tensor on the
        # CPU (three temporaries of the largest, measured)
        "optimizer": 4 * trained if cuda else 3 * 4 * (r * max(d, I, HD) if r else largest),
    }
    state = m["weights"] + m["grads"] + m["adam"] + m["ref"] + m["sampler"]
    m["sampling"] = state + m["kv_cache"] + m["sample_work"]
    m["update"] = state + m["autocast"] + max(m["activations"] + m["head"] + m["gathered"], m["ref_pass"],
                                              m["allreduce"], m["optimizer"])
    m["load"] = 4 * P if sharded else 0
    m["total"] = max(m["sampling"], m["update"], m["load"])
    return m


def default_gen_batch(config, args, world, budget):
    """The largest --gen-batch (whole prompt groups, halving from all of a rank's rows) whose step the
    memory model predicts to fit in 90% of `budget` bytes; at least one prompt's k rows."""
    rows = args.batch // world
    while rows > args.k and memory_model(config, SimpleNamespace(**{**vars(args), "gen_batch": rows}), world)["total"] > 0.9 * budget:
        rows = max(args.k, rows // 2 // args.k * args.k)
    return rows
