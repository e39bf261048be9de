"""LoRA and activation checkpointing against independent references: the base model's own logits, the
chain rule applied by hand to the full weight gradient, transformers' logits of the exported merge, and
the gradients of the same update without checkpointing. Then a LoRA Stage I and Stage II as a user runs
them, from a tiny Qwen2 that transformers saves in bf16."""
import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch

import data
import rl
import train_stage1
import train_stage2
from model import GPT, GPTConfig, LoRALinear, adapters_off, add_lora, load_checkpoint, merge_lora, token_logprobs
from test_real_path import TRAIN, adam_tensors, check_export, cli, qwen, script  # noqa: F401 (qwen: a fixture)
from tokenizer import Tokenizer

CFG = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=128,
                qkv_bias=True, tie_embeddings=False)


def lora_pair(seed=0, r=4, alpha=8.0):
    """A random base model and a LoRA copy of it whose adapters are random too (B no longer zero)."""
    torch.manual_seed(seed)
    base = GPT(CFG).init_weights(std=0.2).eval()
    lora = add_lora(copy.deepcopy(base), r, alpha, "unused")
    with torch.no_grad():
        for m in lora.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.2)
    return base, lora


def test_fresh_adapters_compute_the_base_exactly():
    torch.manual_seed(0)
    base = GPT(CFG).init_weights(std=0.2).eval()
    lora = add_lora(copy.deepcopy(base), 4, 8.0, "unused")
    idx = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        assert torch.equal(base(idx), lora(idx))  # B = 0: the update adds exactly nothing
    assert all(not p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    assert sum(p.requires_grad for p in lora.parameters()) == 2 * 7 * CFG.n_layer  # A and B of 7 projections a layer


def test_adapters_off_is_the_base_and_merged_equals_unmerged():
    base, lora = lora_pair()
    idx = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        on = lora(idx)
        assert (on - base(idx)).abs().max() > 0.1  # the adapters change the model
        with adapters_off(lora):
            assert torch.equal(lora(idx), base(idx))  # the reference of a LoRA run: its frozen base, exactly
        merged = merge_lora(copy.deepcopy(lora))
        assert not any(isinstance(m, LoRALinear) for m in merged.modules()) and merged.lora is None
        assert (merged(idx) - on).abs().max() < 1e-5
        # merged by hand: W + (alpha / r) B A for one projection
        m = lora.layers[1].mlp.down_proj
        assert torch.allclose(merged.layers[1].mlp.down_proj.weight, m.weight + 2.0 * m.lora_B @ m.lora_A, atol=1e-6)


def test_adapters_off_nests_and_restores_each_adapter():
    """adapters_off inside adapters_off: after the inner one ends, the outer forward is still the base's; after
    the outer one, the policy's; an adapter that was off before stays off."""
    base, lora = lora_pair()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        on = lora(idx)
        with adapters_off(lora):
            with adapters_off(lora):
                pass
            assert torch.equal(lora(idx), base(idx))  # still the reference, not the policy
        assert torch.equal(lora(idx), on)
        m = lora.layers[0].mlp.down_proj
        m.enabled = False
        with adapters_off(lora):
            pass
        assert m.enabled is False and lora.layers[1].mlp.down_proj.enabled is True


def test_adapter_gradients_are_the_chain_rule_of_the_weight_gradient():
    """dL/dA = s B^T dL/dW and dL/dB = s dL/dW A^T, with dL/dW the gradient of the same loss with respect to
    the effective weight W + s B A of a plain model, by hand for every adapter."""
    base, lora = lora_pair(seed=1)
    merged = merge_lora(copy.deepcopy(lora)).requires_grad_(True)
    idx = torch.randint(0, 97, (3, 20))
    tgt = torch.randint(0, 97, (3 * 19,))
    loss = lambda m: -(token_logprobs(m.hidden(idx)[:, :-1].reshape(-1, 32), m.head_weight, tgt) ** 2).sum()
    loss(lora).backward()
    loss(merged).backward()
    checked = 0
    for (name, m), (_, w) in zip(lora.named_modules(), merged.named_modules()):
        if isinstance(m, LoRALinear):
            dW = w.weight.grad
            for got, want in ((m.lora_A.grad, m.scale * m.lora_B.T @ dW), (m.lora_B.grad, m.scale * dW @ m.lora_A.T)):
                assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name
            assert m.weight.grad is None
            checked += 1
    assert checked == 7 * CFG.n_layer


def test_lora_checkpoint_holds_the_adapters_and_names_its_base(tmp_path):
    base, lora = lora_pair(seed=2)
    base.save_pretrained(tmp_path / "base")
    lora.lora["base"] = str(tmp_path / "base")
    lora.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["adapters.pt", "config.json", "lora.json"]
    assert json.loads((tmp_path / "ckpt" / "lora.json").read_text()) == {"r": 4, "alpha": 8.0, "base": str(tmp_path / "base")}
    saved = torch.load(tmp_path / "ckpt" / "adapters.pt", weights_only=True)
    assert all(k.endswith((".lora_A", ".lora_B")) for k in saved) and len(saved) == 2 * 7 * CFG.n_layer
    back = GPT.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)  # the frozen weights cast, not the adapters
    assert back.lora["r"] == 4 and all(p.dtype == torch.float32 for n, p in back.named_parameters() if "lora_" in n)
    assert all(p.dtype == torch.bfloat16 for n, p in back.named_parameters() if "lora_" not in n)
    back = GPT.from_pretrained(tmp_path / "ckpt")
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(idx), lora(idx))
        config, state = load_checkpoint(tmp_path / "ckpt")  # what --to-hf exports: the adapters merged in
        plain = GPT(config)
        plain.load_state_dict(state)
        assert (plain(idx) - lora(idx)).abs().max() < 1e-5
    os.rename(tmp_path / "base", tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="its base checkpoint .*base"):
        GPT.from_pretrained(tmp_path / "ckpt")


# ----------------------------------------------------------------------------- the update
def rollouts(policy, ref, n=3, k=2, seed=4):
    tok = Tokenizer.byte_level()
    a = SimpleNamespace(k=k, max_new_tokens=5, temperature=1.0, p1=data.DEMO_P1, base_first=0.5, micro_batch=2 * k,
                        grad_clip=0.0, alpha=10.0, beta1=0.05, beta2=0.3, baseline="loo", kl="reward", gen_batch=None)
    ro = rl.rollout(policy, ref, tok, data.make_demo(n, seed=seed), a, seed=seed)
    ro.r = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])[:, :n * k]
    return ro, a


def grads_of_update(policy, ref, ro, a, objective):
    rl.update(policy, ref, torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0), ro,
              objective, a)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointing_gives_the_same_gradients(lora):
    """rl.update with --checkpoint-activations (whole rows, each block recomputed in the backward) against
    the same update without it (each prompt once for its k rows, nothing recomputed), within 1e-6 of the
    gradient's scale. In fp64 (RMSNorm still normalizes in fp32): in fp32 the two summation orders alone
    differ by about 1e-6."""
    tok = Tokenizer.byte_level()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                    max_seq_len=256, tie_embeddings=True)
    torch.manual_seed(0)
    ref = GPT(cfg).init_weights(std=0.3).double().eval()
    policy = add_lora(copy.deepcopy(ref), 4, 8.0, "unused").double() if lora else GPT(cfg).init_weights(std=0.3).double()
    if lora:
        with torch.no_grad():
            for m in policy.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.normal_(0, 0.3)
        ref = policy  # the LoRA reference: the policy with its adapters off
    ro, a = rollouts(policy, ref)
    plain = grads_of_update(policy, ref, ro, a, train_stage2.objective)
    a.checkpoint_activations = True
    ckpt = grads_of_update(policy, ref, ro, a, train_stage2.objective)
    assert plain.keys() == ckpt.keys() and len(plain) == (4 * 7 if lora else len(list(policy.parameters())))
    for n in plain:
        assert (plain[n] - ckpt[n]).abs().max() <= 1e-6 * max(1.0, plain[n].abs().max().item()), n
    assert any(g.abs().max() > 0 for g in plain.values())


def test_lora_update_is_the_naive_objective_with_the_base_as_reference():
    """A LoRA run's update: autograd through the naive objective over full logits, with the frozen base
    (a separate plain copy) as the reference; only the adapters get gradients."""
    from test_rl import naive_gradients
    tok = Tokenizer.byte_level()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
                    max_seq_len=256)
    torch.manual_seed(3)
    base = GPT(cfg).init_weights(std=0.3).eval()
    lora = add_lora(copy.deepcopy(base), 4, 8.0, "unused")
    with torch.no_grad():
        for m in lora.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.3)
    ro, a = rollouts(lora, lora)
    got = grads_of_update(lora, lora, ro, a, train_stage1.objective)
    lora.zero_grad(set_to_none=True)
    want = naive_gradients(lora, base, ro, train_stage1.objective, a)
    assert got.keys() == {n for n, p in lora.named_parameters() if "lora_" in n}
    for n in got:
        assert (got[n] - want[n]).abs().max() <= 1e-5 * max(1.0, want[n].abs().max().item()), n


# ----------------------------------------------------------------------------- as a user runs it
def adapters_of(ckpt):
    return torch.load(os.path.join(ckpt, "adapters.pt"), weights_only=True)


def test_lora_stage1_then_stage2_from_a_bf16_qwen2(qwen, tmp_path, monkeypatch):
    """Stage I then Stage II with --lora from a tiny Qwen2 that transformers saved in bf16, bf16 compute, each
    through its script's entry point (rl.get_args, rl.run), with an oracle the tiny model can pass (an even
    length is right: its math earns nothing, and without a reward Stage I's first steps have no gradient):
    the checkpoints hold adapters that moved and name the base; the frozen weights keep the base's bits
    through training; --resume ends with the adapters of an uninterrupted run; the export merges them and
    transformers computes our logits; evaluate.py reads the checkpoint."""
    q, d = qwen, tmp_path
    monkeypatch.setattr(data, "rewards", lambda problems, texts, timeout=10.0: [float(len(t) % 2 == 0) for t in texts])
    seen = []  # the frozen weights at each checkpoint
    real_save = rl.save
    monkeypatch.setattr(rl, "save", lambda path, policy, *a, **kw: (
        seen.append({n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}),
        real_save(path, policy, *a, **kw)))
    argv = lambda init, out, steps, *extra: [str(x) for x in (
        "--preset", "math", "--data", q["math"], "--base", q["base"], "--init", init, "--lora", "4", "--dtype", "bf16",
        "--lr", "1e-2", *TRAIN, "--out", out, "--steps", steps, "--save-every", "2", *extra)]
    rl.run(rl.get_args(1, argv(q["base"], d / "s1", 2)), train_stage1.objective, "Stage I")
    s1 = d / "s1" / "ckpt"
    assert not (s1 / "model.pt").exists() and json.loads((s1 / "lora.json").read_text()) == \
        {"r": 4, "alpha": 8.0, "base": str(q["base"])}
    moved = adapters_of(s1)
    assert all(moved[k].abs().max() > 0 for k in moved if k.endswith("lora_B"))  # B starts at zero: it moved
    state = torch.load(s1 / "state.pt", weights_only=False)
    shapes = sorted(tuple(t.shape) for t in adam_tensors(state))
    assert shapes == sorted(tuple(t.shape) for t in moved.values() for _ in range(2))  # Adam holds the adapters only

    rl.run(rl.get_args(2, argv(s1, d / "a", 4)), train_stage2.objective, "Stage II")  # on from Stage I's adapters
    base = GPT.from_pretrained(q["base"])  # bf16, as transformers saved it
    assert len(seen) >= 3 and all(torch.equal(w[n], p) for w in seen for n, p in base.named_parameters())
    assert seen[0]["layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    rl.run(rl.get_args(2, argv(s1, d / "b", 2)), train_stage2.objective, "Stage II")
    rl.run(rl.get_args(2, argv(s1, d / "b", 4, "--resume")), train_stage2.objective, "Stage II")
    a, b = adapters_of(d / "a" / "ckpt"), adapters_of(d / "b" / "ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], moved[k]) for k in a)  # Stage II moved Stage I's adapters on

    check_export(d / "a" / "ckpt", d)  # --to-hf merges the adapters; transformers' logits are ours (fp32 export)
    r = cli(script("evaluate.py"), "--ckpt", d / "a" / "ckpt", "--task", "math", "--data", q["math500"],
            "--max-new-tokens", "8", "--device", "cpu", "--out", d / "rep.json")
    assert json.loads((d / "rep.json").read_text())["n"] == 3, r.stdout


def test_lora_refuses_frozen_weights_that_are_not_the_reference(qwen, tmp_path):
    q = qwen
    run = lambda *argv: cli(script("train_stage1.py"), "--preset", "math", "--data", q["math"], "--base", q["base"],
                            "--dtype", "fp32", *TRAIN, "--steps", "1", *argv, ok=False)
    r = run("--init", q["pert"], "--lora", "4", "--out", tmp_path / "x")
    assert r.returncode != 0 and "is neither --base" in r.stderr.strip().splitlines()[-1], r.stderr
    assert run("--init", q["base"], "--lora", "4", "--out", tmp_path / "s1").returncode == 0
    r = run("--init", tmp_path / "s1" / "ckpt", "--lora", "8", "--out", tmp_path / "y")
    assert r.returncode != 0 and "holds adapters of rank 4" in r.stderr.strip().splitlines()[-1], r.stderr
