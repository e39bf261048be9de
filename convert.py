"""
Hugging Face checkpoint <-> this project's checkpoint.

    python convert.py HF_DIR OUT_DIR            # config.json + *.safetensors -> config.json + model.pt + tokenizer
    python convert.py --to-hf CKPT_DIR OUT_DIR  # back to HF layout, for transformers and vLLM (a LoRA run's
                                                # adapters merged into its base's weights, in fp32 unless --dtype)

Architectures: Qwen2ForCausalLM (Qwen2, Qwen2.5), Qwen3ForCausalLM (dense Qwen3), LlamaForCausalLM
(Llama 3, 3.1, 3.2, 3.3). Refused with a message: other architectures, RoPE types other than the
default and Llama 3's (yarn, dynamic, linear, longrope...), sliding-window attention, biases the
decoder does not have (attention_bias / mlp_bias on Llama or Qwen3), activations other than SiLU.

Safetensors is read and written here (no safetensors package): 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian tensors. Files are
memory-mapped, so a conversion that keeps the dtype never holds a second copy of the weights in memory.
The tokenizer files travel along (tokenizer.py reads them); --to-hf also writes a
generation_config.json holding only the stop ids (no sampling defaults). download.py fetches a
model from the hub and converts it.
"""
import argparse
import json
import math
import mmap
import os
import struct
import sys

import torch

from model import GPT, GPTConfig, atomic_write, load_checkpoint, save_checkpoint
from tokenizer import HF_TOKENIZER_FILES, Tokenizer

ARCHS = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CLI_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
              "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the training scripts' spelling too


def fail(msg):
    raise SystemExit(f"convert.py: {msg}")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read {path}: {e}")


# ---------------------------------------------------------------------------- safetensors
def read_safetensors_header(f, path, size):
    """(n, header) of an open safetensors file of `size` bytes: n is the JSON header's length."""
    if size < 8:
        fail(f"{path} is truncated ({size} bytes): not a safetensors file")
    n = struct.unpack("<Q", f.read(8))[0]
    if 8 + n > size:
        fail(f"{path} is truncated or not safetensors: header of {n} bytes in a file of {size}")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{path}: unreadable safetensors header ({e})")
    if not isinstance(header, dict):
        fail(f"{path}: the safetensors header is not a JSON object")
    return n, header


def read_safetensors(path):
    """{name: tensor}, memory-mapped copy-on-write (pages load on use; the file is never modified)."""
    if sys.byteorder != "little":
        fail("safetensors is little-endian; this machine is not")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n, header = read_safetensors_header(f, path, size)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header.pop("__metadata__", None)
    base, tensors = 8 + n, {}
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in info["shape"]) and isinstance(offsets, list)
                and len(offsets) == 2 and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            fail(f"{path}: the safetensors header's entry {name!r} is {str(info)[:80]}, not "
                 "{dtype, shape, data_offsets}: not a safetensors file this reader knows")
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            fail(f"{path}: tensor {name} has dtype {info['dtype']}, not supported ({', '.join(DTYPES)})")
        start, end = info["data_offsets"]
        shape, itemsize = info["shape"], dtype.itemsize
        numel = math.prod(shape)
        if end - start != numel * itemsize:
            fail(f"{path}: tensor {name} spans {end - start} bytes, but {info['dtype']} {shape} needs {numel * itemsize}")
        if base + end > size:
            fail(f"{path} is truncated: tensor {name} ends at byte {base + end}, the file has {size}")
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        elif (base + start) % itemsize:  # misaligned for its dtype: copy this one tensor
            t = torch.frombuffer(bytearray(buf[base + start:base + end]), dtype=dtype).view(shape)
        else:
            t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=base + start).view(shape)
        tensors[name] = t
    return tensors


def write_safetensors(path, tensors, dtype=None):
    """Write {name: tensor}, casting floating tensors to `dtype` one at a time if given.
    Header JSON padded with spaces to a multiple of 8 bytes; tensors back to back in header order."""
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        nbytes = t.numel() * dt.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            f.write(cast(t).contiguous().reshape(-1).view(torch.uint8).numpy().data)
    atomic_write(path, write)


def read_hf_weights(hf_dir):
    """{HF name: tensor} and {HF name: file it came from}, from model.safetensors or the shards of its index."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map") or fail(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(hf_dir, name)):
                fail(f"{index} lists shard {name}, which is missing from {hf_dir}")
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files, weight_map = ["model.safetensors"], None
    else:
        fail(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
             "(only safetensors is read; save with safe_serialization=True)")
    tensors, source = {}, {}
    for name in files:
        path = os.path.join(hf_dir, name)
        for k, t in read_safetensors(path).items():
            tensors[k], source[k] = t, path
    if weight_map is not None:
        lost = [k for k in weight_map if k not in tensors]
        if lost:
            fail(f"{index} lists tensors that its shards lack: {lost[:5]}")
    return tensors, source


# ---------------------------------------------------------------------------- configs
def gpt_config(hf, where):
    """GPTConfig from a HF config.json dict; refuse anything the decoder would compute differently."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHS:
        fail(f"{where}: architecture {archs or hf.get('model_type')} not supported (supported: {', '.join(ARCHS)})")
    arch, get = ARCHS[archs[0]], hf.get
    if get("hidden_act", "silu") != "silu":
        fail(f"{where}: hidden_act {get('hidden_act')!r} not supported (only silu)")
    if arch != "qwen2" and (get("attention_bias") or get("mlp_bias")):
        fail(f"{where}: attention_bias / mlp_bias = true not supported for {archs[0]}")
    if get("use_sliding_window") or "sliding_attention" in (get("layer_types") or []):
        fail(f"{where}: sliding-window attention (use_sliding_window / layer_types) not supported")
    # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older files rope_theta + rope_scaling
    rope = dict(get("rope_parameters") or get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        fail(f"{where}: per-layer rope_parameters not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) != 1.0:
        fail(f"{where}: partial_rotary_factor != 1 not supported")
    scaling = None
    if kind == "llama3":
        scaling = {k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")}
        scaling["original_max_position_embeddings"] = int(rope.get("original_max_position_embeddings",
                                                                   get("max_position_embeddings")))
    elif kind != "default":
        fail(f"{where}: RoPE type {kind!r} not supported (only the default and Llama 3's 'llama3')")
    n_embd, n_head = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or n_embd // n_head
    if arch == "qwen2" and head_dim != n_embd // n_head:
        fail(f"{where}: Qwen2 with head_dim {head_dim} != hidden_size / num_attention_heads")
    return GPTConfig(
        vocab_size=get("vocab_size"), n_layer=get("num_hidden_layers"), n_head=n_head,
        n_kv_head=get("num_key_value_heads") or n_head, n_embd=n_embd, head_dim=head_dim,
        intermediate_size=get("intermediate_size"), max_seq_len=get("max_position_embeddings"),
        rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))), rope_scaling=scaling,
        norm_eps=get("rms_norm_eps", 1e-6), qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        tie_embeddings=bool(get("tie_word_embeddings", False)), arch=arch)


def hf_config(c, dtype, tok):
    """A HF config.json dict for GPTConfig c: every field transformers (4.x and 5.x) and vLLM read."""
    arch = {v: k for k, v in ARCHS.items()}[c.arch]
    rope = {"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else None
    dtype_name = str(dtype).removeprefix("torch.")
    hf = {
        "architectures": [arch], "model_type": c.arch, "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": tok.bos_id, "eos_token_id": tok.eot_id,
        # both spellings of RoPE (old keys for transformers 4 and older vLLM, rope_parameters for transformers 5)
        "rope_theta": c.rope_theta, "rope_scaling": rope,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta, **(rope or {})},
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    if c.arch == "qwen2":
        if c.head_dim != c.n_embd // c.n_head:
            fail(f"Qwen2 needs head_dim == n_embd / n_head, the checkpoint has {c.head_dim}")
        if not c.qkv_bias and not c.qk_norm:  # the demo's
            fail("a qwen2 model without q/k/v biases (the demo's base and the runs trained from it) cannot be "
                 "exported: Hugging Face's Qwen2 always has them; only models converted from Hugging Face (and runs "
                 "from them) can")
        if not c.qkv_bias or c.qk_norm:
            fail("a qwen2 checkpoint must have qkv_bias and no qk_norm")
        del hf["head_dim"]
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    elif c.qkv_bias or c.qk_norm != (c.arch == "qwen3"):
        fail(f"a {c.arch} checkpoint cannot have qkv_bias={c.qkv_bias}, qk_norm={c.qk_norm}")
    if c.arch == "qwen3":
        hf.update(attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    if c.arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return hf


# ---------------------------------------------------------------------------- the two directions
def hf_to_ckpt(hf_dir, out_dir, dtype=None):
    """HF_DIR (config.json, safetensors, tokenizer files) -> OUT_DIR (config.json, model.pt, tokenizer files)."""
    where = os.path.join(hf_dir, "config.json")
    if not os.path.exists(where):
        fail(f"{where} not found: is {hf_dir} a Hugging Face model directory?")
    config = gpt_config(read_json(where), where)
    try:
        tok = Tokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as e:
        fail(f"tokenizer: {e}")
    if tok.vocab_size > config.vocab_size:
        fail(f"{hf_dir}: the tokenizer has {tok.vocab_size} ids, the model's vocab_size is {config.vocab_size}")
    tensors, source = read_hf_weights(hf_dir)

    state = {}
    for name, t in tensors.items():  # model.X -> X; lm_head.weight kept unless tied
        if name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight" and config.tie_embeddings:
            continue
        state[name.removeprefix("model.")] = t
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        fail(f"{hf_dir}: weights do not match {where}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in state.items():
        if t.shape != expected[k].shape:
            fail(f"{source.get(k, source.get('model.' + k))}: {k} has shape {list(t.shape)}, "
                 f"{where} implies {list(expected[k].shape)}")
    # one dtype for the whole model: --dtype, else the embedding's (bf16 stays bf16)
    dtype = dtype or state["embed_tokens.weight"].dtype
    state = {k: t if t.dtype == dtype else t.to(dtype) for k, t in state.items()}
    save_checkpoint(out_dir, config, state)
    tok.save_pretrained(out_dir)
    return config


def ckpt_to_hf(ckpt_dir, out_dir, dtype=None):
    """CKPT_DIR (config.json, model.pt or a LoRA run's adapters, tokenizer) -> OUT_DIR (config.json,
    model.safetensors, tokenizer)."""
    try:
        config, state = load_checkpoint(ckpt_dir)
        tok = Tokenizer.from_pretrained(ckpt_dir)
    except (OSError, ValueError) as e:
        fail(str(e))
    dtype = dtype or state["embed_tokens.weight"].dtype
    hf = hf_config(config, dtype, tok)
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    if set(state) != set(expected):
        fail(f"{ckpt_dir}: model.pt does not match config.json: {sorted(set(state) ^ set(expected))[:5]}")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {(k if k == "lm_head.weight" else "model." + k): state[k] for k in expected}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids)}  # no sampling defaults: callers choose
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    tok.save_pretrained(out_dir)
    return hf


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Convert a Hugging Face model (Qwen2/2.5, Qwen3 dense, Llama 3.x) to this project's checkpoint, "
                    "or with --to-hf convert a checkpoint back to Hugging Face layout.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("src", metavar="SRC", help="HF model directory; with --to-hf a checkpoint of this project")
    p.add_argument("out", metavar="OUT_DIR", help="directory to write (created if needed)")
    p.add_argument("--to-hf", action="store_true", help="convert a checkpoint of this project back to HF layout")
    p.add_argument("--dtype", choices=CLI_DTYPES, help="cast the weights (default: keep the checkpoint's dtype)")
    args = p.parse_args(argv)
    convert(args.src, args.out, args.to_hf, CLI_DTYPES.get(args.dtype))


def convert(src, out, to_hf=False, dtype=None):
    """SRC (an HF model directory, or with to_hf a checkpoint of this project) to OUT, with a line saying what."""
    if os.path.exists(src) and os.path.exists(out) and os.path.samefile(src, out):
        fail(f"OUT_DIR must differ from SRC ({src}): both hold a config.json")
    if to_hf:
        hf = ckpt_to_hf(src, out, dtype)
        print(f"wrote {hf['architectures'][0]} ({hf['dtype']}) to {out}")
    else:
        c = hf_to_ckpt(src, out, dtype)
        print(f"wrote {c.arch} checkpoint ({c.n_layer} layers, d={c.n_embd}, vocab {c.vocab_size}) to {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line, not a traceback
        raise SystemExit("convert.py: stopped by Ctrl-C (SIGINT); what it was writing may be incomplete: run the same "
                         "command again") from None
