"""convert.py: tiny random HF models -> our checkpoint -> HF again, logits compared with transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,  # noqa: E402
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import convert  # noqa: E402
from model import GPT  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
             rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}  # short: the scaling matters at T=32


def make_hf(arch):
    torch.manual_seed({"qwen2": 0, "qwen3": 1, "llama": 2}[arch])
    if arch == "qwen2":  # q/k/v bias, tied head
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True, rope_theta=1e6))
    elif arch == "qwen3":  # per-head q/k norm, head_dim != hidden / heads, untied
        model = Qwen3ForCausalLM(Qwen3Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                             tie_word_embeddings=False))
    else:  # Llama 3.1 RoPE scaling, GQA 4:1, untied
        model = LlamaForCausalLM(LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=1,
                                             rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False))
    with torch.no_grad():  # HF zeroes biases and sets norms to 1: randomize everything so each mapping counts
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def save_hf(model, d, **kw):
    model.save_pretrained(d, **kw)
    Tokenizer.byte_level().save_pretrained(d)  # convert.py carries the tokenizer along


def logits_hf(model, idx):
    with torch.no_grad():
        return model(idx).logits.float()


def logits_ours(ckpt, idx):
    with torch.no_grad():
        return GPT.from_pretrained(ckpt, dtype=torch.float32)(idx)


IDX = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_round_trip_matches_transformers(arch, tmp_path):
    model = make_hf(arch)
    save_hf(model, tmp_path / "hf")
    config = convert.hf_to_ckpt(tmp_path / "hf", tmp_path / "ckpt")
    assert config.arch == arch and config.tie_embeddings == (arch == "qwen2")
    assert config.qkv_bias == (arch == "qwen2") and config.qk_norm == (arch == "qwen3")
    assert config.head_dim == (24 if arch == "qwen3" else 16)
    assert (config.rope_scaling is not None) == (arch == "llama")
    ref = logits_hf(model, IDX)
    assert (logits_ours(tmp_path / "ckpt", IDX) - ref).abs().max() <= 1e-4

    # back to HF: transformers loads it as the same architecture, same weights, same logits
    convert.ckpt_to_hf(tmp_path / "ckpt", tmp_path / "hf2")
    hf_cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert hf_cfg["architectures"] == [type(model).__name__] and hf_cfg["model_type"] == arch
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert type(again) is type(model)
    original = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert (logits_hf(again, IDX) - ref).abs().max() <= 1e-4
    assert Tokenizer.from_pretrained(tmp_path / "hf2").encode("héllo") == list("héllo".encode())


def test_llama3_rope_scaling_matters(tmp_path):
    """The Llama test above can fail: without the scaling the logits differ."""
    model = make_hf("llama")
    save_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    convert.hf_to_ckpt(tmp_path / "hf", tmp_path / "ckpt")
    assert (logits_ours(tmp_path / "ckpt", IDX) - logits_hf(model, IDX)).abs().max() > 1e-2


def test_old_style_rope_keys(tmp_path):
    """config.json written by transformers 4: rope_theta and rope_scaling at top level."""
    model = make_hf("llama")
    save_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    config = convert.hf_to_ckpt(tmp_path / "hf", tmp_path / "ckpt")
    assert config.rope_scaling["original_max_position_embeddings"] == 8 and config.rope_theta == 10000.0
    assert (logits_ours(tmp_path / "ckpt", IDX) - logits_hf(model, IDX)).abs().max() <= 1e-4


def test_sharded_bf16(tmp_path):
    model = make_hf("qwen2").to(torch.bfloat16)
    save_hf(model, tmp_path / "hf", max_shard_size="40KB")
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 1
    convert.hf_to_ckpt(tmp_path / "hf", tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in state.values())  # bf16 stays bf16
    # the reference: the bf16 weights in fp32 (not model.float(), whose RoPE table went through bf16)
    ref = logits_hf(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32), IDX)
    assert (logits_ours(tmp_path / "ckpt", IDX) - ref).abs().max() <= 1e-4
    convert.ckpt_to_hf(tmp_path / "ckpt", tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").dtype == torch.bfloat16
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32)
    assert (logits_hf(again, IDX) - ref).abs().max() <= 1e-4
    convert.hf_to_ckpt(tmp_path / "hf", tmp_path / "ckpt32", dtype=torch.float32)  # --dtype
    assert all(t.dtype == torch.float32 for t in torch.load(tmp_path / "ckpt32" / "model.pt").values())


def test_cli(tmp_path, capsys):
    save_hf(make_hf("qwen3"), tmp_path / "hf")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), str(tmp_path / "hf"), str(tmp_path / "ckpt")],
                       capture_output=True, text=True, cwd=tmp_path)  # once as a real process
    assert r.returncode == 0 and "wrote qwen3 checkpoint" in r.stdout, r.stderr
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["byte_tokenizer.json", "config.json", "model.pt",
                                                     "tokenizer.json", "tokenizer_config.json"]
    convert.main(["--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2"), "--dtype", "bfloat16"])
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    assert e.value.code == 0 and "--to-hf" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="config.json not found"):
        convert.main([str(tmp_path / "nowhere"), str(tmp_path / "x")])


# ---------------------------------------------------------------------------- clear errors
@pytest.fixture()
def hf_dir(tmp_path):
    save_hf(make_hf("llama"), tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["MistralForCausalLM"]), "architecture .*MistralForCausalLM.* not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "RoPE type 'yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "RoPE type 'dynamic'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(use_sliding_window=True), "sliding-window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(intermediate_size=128), r"model-?\d*.*safetensors: layers.0.mlp.down_proj.weight has shape \[64, 96\]"),
    (dict(num_hidden_layers=3), r"missing \['layers.2."),
])
def test_config_errors(hf_dir, tmp_path, changes, message):
    edit_config(hf_dir, **changes)
    with pytest.raises(SystemExit, match=message) as e:
        convert.hf_to_ckpt(hf_dir, tmp_path / "out")
    assert "config.json" in str(e.value) or "safetensors" in str(e.value)
    assert not (tmp_path / "out" / "model.pt").exists()


def test_file_errors(tmp_path):
    model = make_hf("qwen2")
    save_hf(model, tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / "sharded" / shard)
    with pytest.raises(SystemExit, match=f"lists shard {shard}, which is missing"):
        convert.hf_to_ckpt(tmp_path / "sharded", tmp_path / "out")

    save_hf(model, tmp_path / "single")
    path = tmp_path / "single" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(SystemExit, match="model.safetensors is truncated"):
        convert.hf_to_ckpt(tmp_path / "single", tmp_path / "out")
    path.write_bytes(data[:50])
    with pytest.raises(SystemExit, match="model.safetensors is truncated or not safetensors"):
        convert.hf_to_ckpt(tmp_path / "single", tmp_path / "out")
    os.remove(path)
    with pytest.raises(SystemExit, match="no model.safetensors"):
        convert.hf_to_ckpt(tmp_path / "single", tmp_path / "out")


def test_safetensors_reader_writer(tmp_path):
    """Our writer's files read back by the safetensors package, and the package's files by our reader."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 1, 3, dtype=torch.float16), "d": torch.tensor([True, False, True]),
               "e": torch.randn(()), "f": torch.zeros(0, 4)}
    convert.write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = safetensors_torch.load_file(tmp_path / "ours.safetensors")
    safetensors_torch.save_file(tensors, tmp_path / "theirs.safetensors")
    ours = convert.read_safetensors(tmp_path / "theirs.safetensors")
    for k, t in tensors.items():
        assert theirs[k].dtype == ours[k].dtype == t.dtype and torch.equal(theirs[k], t) and torch.equal(ours[k], t)
    assert (tmp_path / "ours.safetensors").read_bytes()[8:9] == b"{"
