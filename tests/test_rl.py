"""The SCoRe objectives against hand-computed values, the KL term's gradient against the exact
KL(pi || pi_ref), and the rollout layout at the token level."""
import json
import os
import runpy
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import data
import rl
import train_single_turn
import train_stage1
import train_stage2
from model import GPT, GPTConfig, token_logprobs
from sample import generate
from tokenizer import Tokenizer


def args(**kw):
    return SimpleNamespace(**{"alpha": 10.0, "beta1": 0.01, "beta2": 0.1, "baseline": "none", "kl": "loss", **kw})


def test_leave_one_out_baseline_by_hand():
    ret = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = rl.baseline(ret, group, args(baseline="loo"))
    # row 0: 1 - mean(0, 0); row 1: 0 - mean(1, 0); row 3: 1 - mean(1, 0); row 5: 0 - mean(1, 1)
    assert torch.allclose(adv, torch.tensor([1.0, -0.5, -0.5, 0.5, 0.5, -1.0]))
    assert torch.equal(rl.baseline(ret, group, args(baseline="none")), ret)


def test_kl_term_gradient_is_forward_kl():
    """E_{a ~ pi}[grad k2(a)] = grad KL(pi || pi_ref) for a categorical policy, exactly (weighting each
    outcome by its detached probability) and by sampling; and it is not grad KL(pi_ref || pi)."""
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    ref = torch.randn(6).log_softmax(0)
    lp = theta.log_softmax(0)
    exact = torch.autograd.grad((lp.exp() * (lp - ref)).sum(), theta)[0]
    lp = theta.log_softmax(0)
    reverse = torch.autograd.grad((ref.exp() * (ref - lp)).sum(), theta)[0]
    p = lp.detach().exp()
    assert (exact - reverse).abs().max() > 0.05  # the two directions differ here

    lp = theta.log_softmax(0)
    expected = torch.autograd.grad((lp.exp().detach() * rl.kl_term(lp, ref)).sum(), theta)[0]
    assert torch.allclose(expected, exact, atol=1e-6)

    n = 200_000
    a = torch.multinomial(p.detach(), n, replacement=True, generator=torch.Generator().manual_seed(1))
    lp = theta.log_softmax(0)
    sampled = torch.autograd.grad(rl.kl_term(lp[a], ref[a]).mean(), theta)[0]
    assert (sampled - exact).abs().max() < 0.02  # sampling error ~ 1/sqrt(n) * O(1)
    assert (sampled - reverse).abs().max() > 0.05


# ----------------------------------------------------------------------------- rollouts, tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    tok = Tokenizer.byte_level()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                    max_seq_len=512, tie_embeddings=True)
    model = GPT(cfg).init_weights(std=0.3)  # large init: varied outputs of varied lengths
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    # a policy that differs from the base, so the KL terms give gradients even when every reward is 0
    other = GPT(cfg).init_weights(std=0.3)
    other.save_pretrained(d / "init")
    tok.save_pretrained(d / "init")
    return model.eval(), tok, str(d)


def test_rollout_layout_and_masks(tiny):
    """Each greedy rollout's tokens and masks against the layout built by hand from independent greedy
    generations: x, y1, the end-of-turn token unless y1 ends with it, p1 rendered, y2; the masks mark
    exactly the positions that predict y1's and y2's tokens."""
    model, tok, _ = tiny
    problems = data.make_demo(3, seed=5)
    a = SimpleNamespace(k=2, max_new_tokens=6, temperature=0.0, p1=data.DEMO_P1, base_first=0.0, gen_batch=None)
    ro = rl.rollout(model, model, tok, problems, a, seed=3)
    followup = tok.render_followup([{"role": "user", "content": data.DEMO_P1}])
    closes = 0
    for r in range(6):
        x = tok.render([{"role": "user", "content": problems[r // 2].prompt}])
        y1 = generate(model, [x], 6, temperature=0.0, stop_ids=tok.stop_ids)[0]
        close = [] if y1[-1] == tok.eot_id else [tok.eot_id]
        closes += len(close)
        y2 = generate(model, [x + y1 + close + followup], 6, temperature=0.0, stop_ids=tok.stop_ids)[0]
        seq = x + y1 + close + followup + y2
        assert ro.tokens[r, :len(seq)].tolist() == seq and not ro.tokens[r, len(seq):].any()
        s1, s2 = len(x), len(x) + len(y1) + len(close) + len(followup)  # where y1 and y2 start
        want = [1 if s1 - 1 <= j < s1 - 1 + len(y1) else 2 if s2 - 1 <= j < s2 - 1 + len(y2) else 0
                for j in range(ro.turn.shape[1])]  # position j predicts token j + 1
        assert ro.turn[r].tolist() == want
        assert tok.decode([t for t in y1 if t not in tok.stop_ids]) == ro.texts[0][r]
    assert closes > 0  # some y1 was cut or stopped on another token, so the closing rule was exercised


@pytest.mark.parametrize("turns", [2, 3])
def test_each_turn_is_conditioned_on_the_earlier_ones(tiny, turns):
    """Greedy turn t from the rollout (its tokens read off ro.turn == t) equals generating from scratch over x,
    then each earlier attempt closed and followed by p1: with --turns 3, y3 sees y1 and y2."""
    model, tok, _ = tiny
    problems = data.make_demo(4, seed=6)
    a = SimpleNamespace(k=1, max_new_tokens=6, temperature=0.0, p1=data.DEMO_P1, base_first=0.0, gen_batch=None,
                        turns=turns)
    ro = rl.rollout(model, model, tok, problems, a, seed=0)
    followup = tok.render_followup([{"role": "user", "content": data.DEMO_P1}])
    assert ro.r.shape == (turns, 4) and len(ro.texts) == turns
    for r, p in enumerate(problems):
        context = tok.render([{"role": "user", "content": p.prompt}])
        for t in range(1, turns + 1):
            y = ro.tokens[r, 1:][ro.turn[r] == t].tolist()
            assert generate(model, [context], 6, temperature=0.0, stop_ids=tok.stop_ids)[0] == y, (r, t)
            assert tok.decode([x for x in y if x not in tok.stop_ids]) == ro.texts[t - 1][r]
            seq, context = context + y, context + (y if y[-1] == tok.eot_id else y + [tok.eot_id]) + followup
        assert ro.tokens[r, :len(seq)].tolist() == seq and not ro.tokens[r, len(seq):].any()  # the whole rollout


def test_single_turn_rollout_holds_the_first_attempt_only(tiny):
    """args.turns = 1 (train_single_turn.py): each row is x + y1 as an independent greedy generation
    gives it, turn 2's mask is empty, and the objective's gradient is autograd's through the naive
    objective over the same rows (single-turn RL from a policy that differs from the reference)."""
    model, tok, base = tiny
    problems = data.make_demo(4, seed=8)
    a = SimpleNamespace(k=2, max_new_tokens=6, temperature=0.0, p1=data.DEMO_P1, base_first=0.0, gen_batch=None,
                        turns=1, micro_batch=4, grad_clip=0.0, beta1=0.05, baseline="loo", kl="reward")
    ro = rl.rollout(model, model, tok, problems, a, seed=3)
    for r in range(8):
        x = tok.render([{"role": "user", "content": problems[r // 2].prompt}])
        y1 = generate(model, [x], 6, temperature=0.0, stop_ids=tok.stop_ids)[0]
        assert ro.tokens[r, :len(x) + len(y1)].tolist() == x + y1 and not ro.tokens[r, len(x) + len(y1):].any()
        assert ro.turn[r].tolist() == [len(x) - 1 <= j < len(x) - 1 + len(y1) for j in range(ro.turn.shape[1])]
    assert ro.r.shape == (1, 8) and len(ro.texts) == len(ro.len_y) == 1
    policy = GPT.from_pretrained(base + "/init")
    a.temperature = 1.0
    ro = rl.rollout(policy, model, tok, problems, a, seed=11)
    ro.r = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
    ref_grads = naive_gradients(policy, model, ro, train_single_turn.objective, a)
    rl.update(policy, model, torch.optim.SGD(policy.parameters(), lr=0.0), ro, train_single_turn.objective, a)
    for n, p in policy.named_parameters():
        assert (p.grad - ref_grads[n]).abs().max() <= 1e-5 * max(1.0, ref_grads[n].abs().max().item()), n
    assert any(p.grad.abs().max() > 0 for p in policy.parameters())


def test_first_token_is_independent_of_the_coin_flips(tiny):
    """A first attempt the policy samples has pi's first-token distribution whatever --base-first's coin
    flips decided: each purpose draws from a stream of its own. (When the coin flips and the policy's
    first chunk shared one seed, a row left to pi at --base-first 0.9 never drew a token from the first
    20% of pi's mass in token order, and at 0.3 drew the first 40% about 36% of the time.) pi's
    probabilities come from a full forward of the prompt; the sets are prefixes of the vocabulary; fixed
    seeds, so the outcome is deterministic; the bound is 4 standard errors."""
    model, tok, _ = tiny
    problems = data.make_demo(1, seed=5)
    x = tok.render([{"role": "user", "content": problems[0].prompt}])
    with torch.no_grad():
        cdf = torch.softmax(model(torch.tensor([x]))[0, -1].double(), -1).cumsum(0)  # in token-id order
    a = SimpleNamespace(k=1, max_new_tokens=1, temperature=1.0, p1=data.DEMO_P1, base_first=0.9, gen_batch=None,
                        turns=1)
    firsts = []
    for seed in range(1500):
        ro = rl.rollout(model, model, tok, problems, a, seed=seed)
        if ro.first_from_pi[0]:
            firsts.append(int(ro.tokens[0, len(x)]))
    assert len(firsts) > 100
    for c in (0.2, 0.4, 0.6, 0.8):
        cut = int((cdf < c).sum()) + 1  # tokens [0, cut) hold pi's first `mass` of probability
        mass = cdf[cut - 1].item()
        freq = sum(t < cut for t in firsts) / len(firsts)
        assert abs(freq - mass) < 4 * (mass * (1 - mass) / len(firsts)) ** 0.5, (c, freq, mass, len(firsts))


def test_no_two_purposes_or_seeds_share_a_stream(tiny):
    """The base model's first attempts at one seed are not the policy's at the next seed, and a rollout's
    second chunk does not replay another seed's first chunk (with seed + 1 and seed + 7 * chunk, both
    did). The policy and the base are the same model here, so a shared stream gives the same tokens."""
    model, tok, _ = tiny
    p = data.make_demo(1, seed=5)[0]
    a = lambda **kw: SimpleNamespace(**{"k": 4, "max_new_tokens": 6, "temperature": 1.0, "p1": data.DEMO_P1,
                                        "gen_batch": None, "turns": 1, "base_first": 0.0, **kw})
    for seed in range(3):
        from_base = rl.rollout(model, model, tok, [p], a(base_first=1.0), seed=seed)
        from_pi = rl.rollout(model, model, tok, [p], a(), seed=seed + 1)
        assert not from_base.first_from_pi.any() and from_pi.first_from_pi.all()
        assert from_base.texts[0] != from_pi.texts[0], seed
        chunked = rl.rollout(model, model, tok, [p, p], a(gen_batch=4), seed=seed)
        later = rl.rollout(model, model, tok, [p, p], a(gen_batch=4), seed=seed + 7)
        assert chunked.texts[0][4:] != later.texts[0][:4], seed


def naive_gradients(policy, ref, ro, objective, a):
    """The objective through full logits and log_softmax, each row on its own, masks applied by hand."""
    policy.zero_grad(set_to_none=True)
    lp = lambda m, r: torch.log_softmax(m(ro.tokens[r:r + 1])[0, :-1], -1).gather(1, ro.tokens[r, 1:, None])[:, 0]
    sums, T = [], ro.r.shape[0]
    for r in range(ro.tokens.shape[0]):
        pol, pref = lp(policy, r), lp(ref, r).detach()
        # --kl loss: per-token k2 in the loss; --kl reward: the attempt's log-ratio, a constant in its return
        kl = 0.5 * (pol - pref) ** 2 if a.kl == "loss" else (pol - pref).detach()
        on = float(ro.first_from_pi[r])  # a y1 from the base model: no turn-1 terms
        w = [on] + [1.0] * (T - 1)
        sums.append(torch.stack([(x * (ro.turn[r] == t + 1)).sum() * w[t] for x in (pol, kl) for t in range(T)]))
    s = torch.stack(sums, 1)
    b = rl.Batch(logp=list(s[:T]), kl=list(s[T:]), r=list(ro.r), group=ro.group)
    (objective(b, a).sum() / ro.tokens.shape[0]).backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


# synthetic rewards of 8 rollouts: every pattern of attempt 1 -> 2 twice, and of attempt 2 -> 3
REWARDS = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0],
                        [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0],
                        [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])


@pytest.mark.parametrize("kl", ["reward", "loss"])
@pytest.mark.parametrize("stage, turns", [(1, 2), (2, 2), (1, 3), (2, 3)])
def test_update_gradients_match_naive_objective(tiny, stage, turns, kl):
    """rl.update's gradient (the chunked head's log-probs, each prompt run once for its k rows, sums
    per row and turn, micro-batches accumulated) equals autograd through the naive objective over full
    logits, row by row, with some first attempts from the base model, synthetic rewards in all four
    patterns and the loo baseline; with two attempts and with three (--turns 3)."""
    model, tok, base = tiny
    problems = data.make_demo(4, seed=7)
    a = SimpleNamespace(k=2, max_new_tokens=5, temperature=1.0, p1=data.DEMO_P1, base_first=0.5, micro_batch=4,
                        grad_clip=0.0, alpha=10.0, beta1=0.01, beta2=0.1, baseline="loo", kl=kl, gen_batch=None,
                        turns=turns)
    ro = rl.rollout(model, model, tok, problems, a, seed=11)
    assert 0 < (~ro.first_from_pi).sum() < 8
    objective = (train_stage1 if stage == 1 else train_stage2).objective
    policy = GPT.from_pretrained(base + "/init")  # differs from the reference: the KL terms have gradients
    ro = rl.rollout(policy, model, tok, problems, a, seed=11)  # the policy's samples: its log-probs are the sampler's
    ro.r = REWARDS[:turns]
    ref_grads = naive_gradients(policy, model, ro, objective, a)
    rl.update(policy, model, torch.optim.SGD(policy.parameters(), lr=0.0), ro, objective, a)
    for n, p in policy.named_parameters():
        assert (p.grad - ref_grads[n]).abs().max() <= 1e-5 * max(1.0, ref_grads[n].abs().max().item()), n


def test_a_nonlinear_objective_just_works(tiny):
    """update() asks nothing of the objective but a per-row loss: PPO's clipped surrogate on turn 2 (the
    ratio to an old policy 0.3 nats below pi, so the clip binds where the advantage is positive) and an
    exponential of turn 1's log-prob give autograd's gradient through the naive objective."""
    model, tok, base = tiny
    a = SimpleNamespace(k=2, max_new_tokens=5, temperature=1.0, p1=data.DEMO_P1, base_first=0.0, micro_batch=2,
                        grad_clip=0.0, beta1=0.01, baseline="loo", kl="reward", gen_batch=None)
    policy = GPT.from_pretrained(base + "/init")
    ro = rl.rollout(policy, model, tok, data.make_demo(3, seed=1), a, seed=2)
    ro.r[1] = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])

    def clipped(b, args):
        adv = rl.baseline(b.r2, b.group, args)
        ratio = (b.logp2 - b.logp2.detach() + 0.3).exp()
        return -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) + 0.1 * b.logp1.exp()
    ref_grads = naive_gradients(policy, model, ro, clipped, a)
    rl.update(policy, model, torch.optim.SGD(policy.parameters(), lr=0.0), ro, clipped, a)
    for n, p in policy.named_parameters():
        assert (p.grad - ref_grads[n]).abs().max() <= 1e-5 * max(1.0, ref_grads[n].abs().max().item()), n
    assert any(p.grad.abs().max() > 0 for p in policy.parameters())


# ----------------------------------------------------------------------------- flags checked at parse time
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_FLAGS = [  # (flags, the error line's message): one rule each
    (["--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["--steps", "-1"], "--steps must be at least 1 (got -1)"),
    (["--batch", "0"], "--batch must be at least 1 (got 0)"),
    (["--k", "0"], "--k must be at least 1 (got 0)"),
    (["--micro-batch", "0"], "--micro-batch must be at least 1 (got 0)"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1 (got 0)"),
    (["--save-every", "0"], "--save-every must be at least 1 (got 0)"),
    (["--n-train", "0"], "--n-train must be at least 1 (got 0)"),
    (["--gen-batch", "0"], "--gen-batch must be at least 1 (got 0)"),
    (["--keep-every", "-2"], "--keep-every must be at least 0 (got -2)"),
    (["--threads", "-1"], "--threads must be at least 0 (got -1)"),
    (["--lr", "-1"], "--lr must be a positive number (got -1.0)"),
    (["--lr", "0"], "--lr must be a positive number (got 0.0)"),
    (["--lr", "nan"], "--lr must be a positive number (got nan)"),
    (["--lr", "inf"], "--lr must be a positive number (got inf)"),
    (["--temperature", "0"], "--temperature must be positive: RL samples its rollouts (got 0.0)"),
    (["--temperature", "nan"], "--temperature must be positive: RL samples its rollouts (got nan)"),
    (["--alpha", "1"], "--alpha is unused by train_stage1.py: its objective has no alpha"),
    (["--beta1", "nan"], "--beta1 must be a number at least 0 (got nan)"),
    (["--beta2", "-0.1"], "--beta2 must be a number at least 0 (got -0.1)"),
    (["--grad-clip", "-1"], "--grad-clip must be a number at least 0 (got -1.0)"),
    (["--base-first", "1.5"], "--base-first is a fraction in [0, 1] (got 1.5)"),
    (["--base-first", "nan"], "--base-first is a fraction in [0, 1] (got nan)"),
    (["--k", "1", "--batch", "4", "--micro-batch", "2"],
     "--k 1 leaves the leave-one-out baseline no other sample: use --k 2 or more, or --baseline none"),
    (["--batch", "6", "--k", "4"], "--batch (6) and --micro-batch (2) must be multiples of --k (4)"),
    (["--gen-batch", "1"], "--gen-batch (1) must hold at least one prompt's k = 2 samples"),
    (["--lora", "-4"], "--lora is a rank, 0 (full fine-tuning) or more (got -4)"),
    (["--lora", "4", "--lora-alpha", "0"], "--lora-alpha must be a positive number (got 0.0)"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys, flags, message):
    """train_stage1.py as a user runs it (its __main__), with a small run's flags and then one bad value:
    exit status 2, one line on stderr naming the flag, and no file written (the run directory does not
    exist), before any model is read."""
    _, _, base = tiny
    script = os.path.join(ROOT, "train_stage1.py")
    argv = ["--base", base, "--init", base, "--out", str(tmp_path / "run"), "--steps", "1", "--batch", "4", "--k", "2",
            "--micro-batch", "2", "--max-new-tokens", "2", "--n-train", "8", "--device", "cpu", *flags]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"train_stage1.py: error: {message}\n", err
    assert os.listdir(tmp_path) == []


def test_k1_without_the_baseline_and_zero_weights_are_accepted(tiny):
    _, _, base = tiny
    flags = ["--base", base, "--k", "1", "--batch", "4", "--micro-batch", "2", "--baseline", "none", "--beta1", "0",
             "--grad-clip", "0", "--base-first", "1"]
    a = rl.get_args(1, flags + ["--beta2", "0"])
    assert (a.k, a.alpha, a.beta1, a.beta2, a.base_first) == (1, None, 0.0, 0.0, 1.0)
    a = rl.get_args(2, flags + ["--alpha", "0"])
    assert (a.k, a.alpha, a.beta1, a.beta2, a.base_first) == (1, 0.0, 0.0, None, 1.0)


@pytest.mark.parametrize("script,flag", [("train_stage1.py", "--alpha"), ("train_stage2.py", "--beta2"),
                                         ("train_single_turn.py", "--alpha"), ("train_single_turn.py", "--beta2")])
def test_a_weight_the_objective_does_not_read_is_refused(tiny, tmp_path, monkeypatch, capsys, script, flag):
    """alpha is Stage II's, beta2 Stage I's, and the single-turn ablation has neither: a script that does not
    use the flag says so in --help and refuses it in one line, writing nothing; its own weights are checked."""
    _, _, base = tiny
    path = os.path.join(ROOT, script)
    argv = ["--base", base, "--init", base, "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu"]

    def run(*flags):
        monkeypatch.setattr(sys, "argv", [path, *argv, *flags])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(path, run_name="__main__")
        return e.value.code, capsys.readouterr()

    code, out = run("--help")
    assert code == 0 and f"unused by {script}: its objective has no {flag[2:]}" in " ".join(out.out.split())
    code, out = run(flag, "0")
    assert code == 2 and out.err == f"{script}: error: {flag} is unused by {script}: its objective has no {flag[2:]}\n"
    assert os.listdir(tmp_path) == []
    if script == "train_stage2.py":
        code, out = run("--alpha", "-1")
        assert code == 2 and out.err == f"{script}: error: --alpha must be a number at least 0 (got -1.0)\n"


def test_data_with_the_demo_task_is_an_error(tiny, tmp_path, capsys):
    """The demo task generates its problems: a --data beside it is refused in one line (training, the SFT
    baselines, evaluation), before anything is written; the math preset's data does not follow --task demo."""
    _, _, base = tiny
    with pytest.raises(SystemExit) as e:
        rl.run(run_args(base, str(tmp_path / "run"), 1, extra=["--data", "x.jsonl"]), train_stage2.objective, "II")
    assert e.value.code == "demo: the demo task generates its problems, it reads no file (--data x.jsonl)"
    assert not (tmp_path / "run").exists()
    assert rl.get_args(1, ["--preset", "math", "--task", "demo"]).data is None
    assert rl.get_args(1, ["--preset", "math"]).data == rl.PRESETS["math"]["data"]
    import train_sft
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--method", "star", "--base", base, "--data", "x.jsonl", "--out", str(tmp_path / "sft")])
    assert e.value.code == "demo: the demo task generates its problems, it reads no file (--data x.jsonl)"
    import evaluate
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", base, "--task", "demo", "--data", "x.jsonl"])
    assert capsys.readouterr().err.endswith("error: the demo task generates its problems, it reads no file "
                                            "(--data x.jsonl)\n")


def test_stage1_starts_from_base_unless_init_says_otherwise():
    """Stage I's policy starts from the model it is held to: --base, whatever the preset's base is."""
    assert rl.get_args(1, ["--preset", "math", "--base", "my/base"]).init == "my/base"
    assert rl.get_args(1, ["--preset", "math", "--base", "my/base", "--init", "other"]).init == "other"
    assert rl.get_args(1, ["--preset", "math"]).init == "out/math/base"
    assert rl.get_args(2, ["--preset", "math", "--base", "my/base"]).init == "out/math/stage1/ckpt"


# ----------------------------------------------------------------------------- the loop: resume, NaN
def train_log(run):
    """The training records of a run's log.jsonl (the demo preset also evaluates at the last step: eval_* records)."""
    return [rec for rec in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "eval_n" not in rec]


def run_args(base, out, steps, stage=2, extra=()):
    return rl.get_args(stage, ["--base", base, "--init", base + "/init", "--out", out, "--steps", str(steps), "--batch", "8",
                               "--k", "2", "--micro-batch", "4", "--max-new-tokens", "5", "--n-train", "50",
                               "--save-every", "2", "--lr", "1e-3", "--device", "cpu", *extra])


def test_a_policy_of_another_shape_or_tokenizer_is_refused(tiny, tmp_path):
    """--init a model of another shape than --base (2 layers of d = 64 against 2 of d = 32), or of the same shape
    with another tokenizer: refused at start-up in one line naming what differs, both values; nothing written."""
    _, tok, base = tiny
    cfg = GPT.from_pretrained(base).config
    other = GPTConfig(**{**vars(cfg), "n_embd": 64, "intermediate_size": 128, "head_dim": 0})
    GPT(other).init_weights().save_pretrained(tmp_path / "wide")
    tok.save_pretrained(tmp_path / "wide")
    GPT(cfg).init_weights().save_pretrained(tmp_path / "retok")
    retok = Tokenizer.byte_level(["sum"])
    retok.save_pretrained(tmp_path / "retok")
    for init, want in (("wide", "(n_embd 64 against 32; head_dim 32 against 16; intermediate_size 128 against 64)"),
                       ("retok", f"(tokenizer byte_level ({retok.vocab_size} tokens) against byte_level "
                                 f"({tok.vocab_size} tokens))")):
        a = run_args(base, str(tmp_path / "run"), 2, extra=["--init", str(tmp_path / init)])
        with pytest.raises(SystemExit) as e:
            rl.run(a, train_stage2.objective, "Stage II")
        assert e.value.code == (f"--init {tmp_path / init} is not a model of --base {base}'s shape {want}: the KL to "
                                "a reference of another architecture or tokenizer means nothing"), e.value.code
        assert not (tmp_path / "run").exists()
    # the same shape and tokenizer, other weights: a policy of the base (the fixture's init) trains
    rl.run(run_args(base, str(tmp_path / "ok"), 1), train_stage2.objective, "Stage II")


@pytest.mark.parametrize("sharded", [False, True])
def test_a_save_gathers_and_writes_once_for_all_its_copies(tiny, tmp_path, monkeypatch, sharded):
    """ckpt/, best/ and step_N/ of one step: the state is gathered (sharded: shard.full_state, faked here on one
    process) and serialized once; the three directories hold the same files, byte for byte, and each is a
    whole checkpoint."""
    _, tok, base = tiny
    policy = GPT.from_pretrained(base + "/init")
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    policy(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()  # an Adam state to save
    calls = {"gather": 0, "torch.save": 0, "save_pretrained": 0, "save_checkpoint": 0}

    def counted(name, f):
        def g(*a, **kw):
            calls[name] += 1
            return f(*a, **kw)
        return g
    monkeypatch.setattr(torch, "save", counted("torch.save", torch.save))
    monkeypatch.setattr(GPT, "save_pretrained", counted("save_pretrained", GPT.save_pretrained))
    monkeypatch.setattr(checkpoint, "save_checkpoint", counted("save_checkpoint", checkpoint.save_checkpoint))
    if sharded:
        monkeypatch.setattr(checkpoint.shard, "is_sharded", lambda model: True)
        monkeypatch.setattr(checkpoint.shard, "full_state", counted("gather", lambda m, o: (m.state_dict(), o.state_dict())))
    a = SimpleNamespace(task="demo", p1=data.DEMO_P1, max_new_tokens=5)
    dirs = [tmp_path / d for d in ("ckpt", "best", "step_000002")]
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "stale").write_text("an older best")  # replaced whole, as before
    rl.save([str(d) for d in dirs], policy, tok, opt, 2, a, {"best_reward": 0.5})
    assert calls == {"gather": int(sharded), "torch.save": 2, "save_pretrained": int(not sharded),  # model, state
                     "save_checkpoint": int(sharded)}, calls
    files = {d.name: {f: (d / f).read_bytes() for f in sorted(os.listdir(d))} for d in dirs}
    assert files["ckpt"] == files["best"] == files["step_000002"] and "state.pt" in files["ckpt"]
    assert sorted(os.listdir(tmp_path)) == ["best", "ckpt", "step_000002"]  # no .tmp or .old left
    for d in dirs:
        loaded = GPT.from_pretrained(d).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in policy.state_dict().items())
        assert torch.load(d / "state.pt", weights_only=False)["step"] == 2


def test_resume_gives_identical_weights(tiny, tmp_path, monkeypatch, capsys):
    """A run stopped by Ctrl-C during step 3 says, in one line, where its last checkpoint is (step 2) and
    how to resume; resumed, it ends with the weights of the run that was never stopped."""
    _, _, base = tiny
    rl.run(run_args(base, str(tmp_path / "a"), 4), train_stage2.objective, "Stage II")
    calls = {"n": 0}
    real = rl.update

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C during step 3, after the step-2 checkpoint
        return real(*a, **kw)

    monkeypatch.setattr(rl, "update", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        rl.run(run_args(base, str(tmp_path / "b"), 4), train_stage2.objective, "Stage II")
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.count("\n") == 1, err  # 128 + SIGINT, as a shell reports it
    assert err.startswith(f"Stage II: stopped by SIGINT; the last checkpoint is {tmp_path / 'b' / 'ckpt'} (step 2;")
    assert f" --out {tmp_path / 'b'} " in err and err.endswith(" --resume\n"), err
    monkeypatch.setattr(rl, "update", real)
    rl.run(run_args(base, str(tmp_path / "b"), 4, extra=["--resume"]), train_stage2.objective, "Stage II")
    a = GPT.from_pretrained(tmp_path / "a" / "ckpt").state_dict()
    b = GPT.from_pretrained(tmp_path / "b" / "ckpt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = GPT.from_pretrained(base + "/init").state_dict()
    assert not torch.equal(a["embed_tokens.weight"], init["embed_tokens.weight"])  # training did move it
    assert [rec["step"] for rec in train_log(tmp_path / "b")] == [1, 2, 3, 4]


@pytest.mark.parametrize("turns", [2, 3])
def test_logged_accuracies_count_the_steps_rollouts(tiny, tmp_path, monkeypatch, turns):
    """Each log record's accuracy of every attempt, delta_i2c and delta_c2i (attempt 1 -> 2) and changed (the
    last attempt's answer against the first's) against a count made here of the texts the step sampled (recorded
    as rl.rollout returns them). The oracle is replaced by one that any text can pass (an even length is
    right), so every pattern of rewards occurs."""
    _, _, base = tiny
    right = lambda text: float(len(text) % 2 == 0)
    monkeypatch.setattr(data, "rewards", lambda problems, texts: [right(t) for t in texts])
    monkeypatch.setattr(data, "answer_of", lambda problem, text: text[:1] or None)  # answers that change, or none
    seen, real = [], rl.rollout

    def recording(*a, **kw):
        seen.append((a[3], real(*a, **kw)))
        return seen[-1][1]

    monkeypatch.setattr(rl, "rollout", recording)
    rl.run(run_args(base, str(tmp_path / "r"), 4, extra=["--turns", str(turns)]), train_stage2.objective, "Stage II")
    log = train_log(tmp_path / "r")
    assert len(log) == len(seen) == 4
    for rec, (problems, ro) in zip(log, seen):
        assert len(ro.texts) == turns
        r = [[right(t) for t in ys] for ys in ro.texts]
        n = len(r[0])
        reps = [p for p in problems for _ in range(2)]  # k = 2
        answers = [[data.answer_of(p, y) for p, y in zip(reps, ys)] for ys in (ro.texts[0], ro.texts[-1])]
        want = {**{f"acc_t{t + 1}": sum(r[t]) / n for t in range(turns)},
                "delta_i2c": sum(a == 0 and b == 1 for a, b in zip(r[0], r[1])) / n,
                "delta_c2i": sum(a == 1 and b == 0 for a, b in zip(r[0], r[1])) / n,
                "changed": sum(a != b for a, b in zip(*answers)) / n}  # (demo answers: compared as strings)
        assert {k: rec[k] for k in want} == pytest.approx(want, abs=1e-12), rec["step"]
        assert f"acc_t{turns + 1}" not in rec and f"kl_t{turns}" in rec and f"len_y{turns}" in rec
    assert sum(rec["delta_i2c"] > 0 for rec in log) and sum(rec["delta_c2i"] > 0 for rec in log)
    assert sum(0 < rec["changed"] < 1 for rec in log)
    assert sum(rec[f"acc_t{turns}"] != rec["acc_t2"] for rec in log) or turns == 2


def test_logged_cut_is_the_fraction_of_attempts_cut(tiny, tmp_path, monkeypatch):
    """The log's cut (attempts that hit --max-new-tokens without a stop token) against a count made here of the
    step's sampled tokens, for two turns and for the single-turn ablation (one attempt per rollout)."""
    _, tok, base = tiny
    seen, real = [], rl.rollout

    def recording(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(rl, "rollout", recording)
    for turns, objective in ((2, train_stage2.objective), (1, train_single_turn.objective)):
        seen.clear()
        a = run_args(base, str(tmp_path / f"t{turns}"), 2, stage=turns, extra=["--max-new-tokens", "3"])
        a.turns = turns
        rl.run(a, objective, "cut")
        log = train_log(tmp_path / f"t{turns}")
        for rec, ro in zip(log, seen):
            ys = [ro.tokens[r, 1:][ro.turn[r] == t].tolist() for t in range(1, turns + 1) for r in range(len(ro.tokens))]
            cut = sum(len(y) == 3 and y[-1] not in tok.stop_ids for y in ys)
            assert rec["cut"] == pytest.approx(cut / len(ys)), (turns, rec["step"])
        assert sum(rec["cut"] for rec in log) > 0


def test_resume_keeps_the_runs_gen_batch(tiny, tmp_path):
    """--gen-batch changes which stream samples which rows: a resume keeps the run's (recorded in its
    checkpoint), refuses another one, and ends with the weights of the run that was never stopped."""
    _, _, base = tiny
    gb = ["--gen-batch", "4"]
    rl.run(run_args(base, str(tmp_path / "a"), 4, extra=gb), train_stage2.objective, "Stage II")
    rl.run(run_args(base, str(tmp_path / "b"), 2, extra=gb), train_stage2.objective, "Stage II")
    for other in (["--gen-batch", "2"], ["--gen-batch", "8"]):
        with pytest.raises(SystemExit) as e:
            rl.run(run_args(base, str(tmp_path / "b"), 4, extra=["--resume", *other]), train_stage2.objective,
                   "Stage II")
        assert str(e.value.code).startswith(f"--resume: --gen-batch is {other[1]} but the run in {tmp_path / 'b'} "
                                            "was started with 4"), e.value.code
    rl.run(run_args(base, str(tmp_path / "b"), 4, extra=["--resume"]), train_stage2.objective, "Stage II")
    assert torch.load(tmp_path / "b" / "ckpt" / "state.pt", weights_only=False)["args"]["gen_batch"] == 4
    a = GPT.from_pretrained(tmp_path / "a" / "ckpt").state_dict()
    b = GPT.from_pretrained(tmp_path / "b" / "ckpt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_directory_is_never_trained_over(tiny, tmp_path):
    """The same command again, without --resume, into a directory that holds a checkpoint: refused in one
    line that names both ways on; the checkpoint and the log are untouched."""
    _, _, base = tiny
    out = tmp_path / "r"
    rl.run(run_args(base, str(out), 2), train_stage2.objective, "Stage II")
    before = {p: (out / p).read_bytes() for p in ("log.jsonl", "ckpt/model.pt", "ckpt/state.pt")}
    with pytest.raises(SystemExit) as e:
        rl.run(run_args(base, str(out), 2), train_stage2.objective, "Stage II")
    assert e.value.code == (f"--out {out} already holds a run (checkpoint {out / 'ckpt'}): continue it with "
                            f"--resume, or start over with a new --out (or delete {out} first)")
    assert before == {p: (out / p).read_bytes() for p in before}


def test_sigterm_stops_with_one_line_and_its_command_resumes(tiny, tmp_path):
    """train_stage1.py in a process of its own, sent SIGTERM once it has saved a checkpoint: exit status
    143, no traceback, one line naming the checkpoint and the command that resumes; that command (with
    --steps cut short) continues from the checkpoint's step."""
    _, _, base = tiny
    out = tmp_path / "r"
    cmd = [sys.executable, os.path.join(ROOT, "train_stage1.py"), "--base", base, "--out", str(out), "--steps", "1000",
           "--batch", "4", "--k", "2", "--micro-batch", "2", "--max-new-tokens", "3", "--n-train", "8",
           "--save-every", "1", "--device", "cpu", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "ckpt" / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"Stage I: stopped by SIGTERM; the last checkpoint is {out / 'ckpt'} (step "), line
    step = int(line.split("(step ")[1].split(";")[0])
    again = shlex.split(line.split("resume with: ")[1])
    assert again[1:] == cmd[1:] + ["--resume"], again
    res = subprocess.run([sys.executable, *again[1:], "--steps", str(step + 1)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"from step {step}" in res.stdout and f"step {step + 1}/{step + 1}" in res.stdout, res.stdout


def test_nan_loss_stops_with_last_good_checkpoint(tiny, tmp_path):
    _, _, base = tiny
    calls = {"n": 0}

    def poisoned(b, args):
        calls["n"] += 1
        loss = train_stage1.objective(b, args)
        # steps 1-2 fine: 2 micro-batches each, the objective evaluated once per micro-batch
        return loss * float("nan") if calls["n"] > 4 else loss

    with pytest.raises(SystemExit, match="step 3: loss is nan.*last good checkpoint"):
        rl.run(run_args(base, str(tmp_path / "r"), 4, stage=1), poisoned, "Stage I")
    assert torch.load(tmp_path / "r" / "ckpt" / "state.pt", weights_only=False)["step"] == 2
    GPT.from_pretrained(tmp_path / "r" / "ckpt")


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward returns an infinite gradient: a finite loss with a non-finite gradient."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_a_nonfinite_gradient_is_refused_before_the_step(tiny, tmp_path):
    """Step 3's loss is finite but its gradient is not: the step is refused before opt.step(), the run stops
    with the one-line message naming the last good checkpoint (step 2), and no checkpoint holds a NaN."""
    _, _, base = tiny
    calls = {"n": 0}

    def poisoned(b, args):
        calls["n"] += 1
        if calls["n"] > 4:  # steps 1-2 fine: 2 micro-batches each
            b.logp2 = InfiniteGradient.apply(b.logp2)
        loss = train_stage1.objective(b, args)
        assert torch.isfinite(loss).all()
        return loss

    with pytest.raises(SystemExit, match=r"step 3: the gradient's norm is (nan|inf) \(the loss is finite\); "
                                         r"stopping\. The last good checkpoint is .*ckpt"):
        rl.run(run_args(base, str(tmp_path / "r"), 4, stage=1), poisoned, "Stage I")
    for d in ("ckpt", "best"):
        assert torch.load(tmp_path / "r" / d / "state.pt", weights_only=False)["step"] == 2
        weights = GPT.from_pretrained(tmp_path / "r" / d).state_dict()
        assert all(torch.isfinite(w).all() for w in weights.values()), d


def test_sampler_logprobs_match_the_trainer_in_fp32(tiny):
    """The KL in the reward uses the sampler's log-probs of the sampled tokens: in fp32 they equal the
    log_softmax of a full forward over the finished rollouts (transformers-free, naive) to 1e-5, at the
    sampling temperature; a y1 drawn from the base model gets none (it is not pi's sample)."""
    model, tok, base = tiny
    policy = GPT.from_pretrained(base + "/init")
    a = SimpleNamespace(k=2, max_new_tokens=6, temperature=0.7, p1=data.DEMO_P1, base_first=0.5, gen_batch=2)
    ro = rl.rollout(policy, model, tok, data.make_demo(3, seed=4), a, seed=9)
    with torch.no_grad():
        full = torch.log_softmax(policy(ro.tokens)[:, :-1].float() / 0.7, -1).gather(2, ro.tokens[:, 1:, None])[..., 0]
    m1, m2 = ro.turn == 1, ro.turn == 2
    mine = m2 | (m1 & ro.first_from_pi[:, None])
    assert 0 < (~ro.first_from_pi).sum() < 6 and mine.sum() > 20
    assert (ro.lp_old[mine] - full[mine]).abs().max() < 1e-5
    assert (ro.lp_old[m1 & ~ro.first_from_pi[:, None]] == 0).all()


# ----------------------------------------------------------------------------- --turns 2 is the two-turn code
def two_turn_update(policy, ref, opt, ro, stage, a):
    """rl.update as it was written for two attempts alone (before --turns): turn 1's and turn 2's target masks,
    the sums logp1, logp2, kl1, kl2, and Eq. 3 / Eq. 4 with both turns spelled out."""
    m1, m2 = ro.turn == 1, ro.turn == 2
    R = ro.tokens.shape[0]
    opt.zero_grad(set_to_none=True)
    for s in range(0, R, a.micro_batch):
        rows = torch.arange(s, min(s + a.micro_batch, R))
        r1m, r2m = m1[rows], m2[rows]
        sel = r1m | r2m
        L = int(sel.any(0).nonzero().max()) + 2
        idx, r2m, sel = ro.tokens[rows, :L], r2m[:, :L - 1], sel[:, :L - 1]
        tgt = idx[:, 1:][sel]
        hidden = rl.generated_hidden(idx, sel, r1m[:, :L - 1], a.k)
        with torch.no_grad():
            lp_ref = token_logprobs(*hidden(ref), tgt, a.temperature)
        lp = token_logprobs(*hidden(policy), tgt, a.temperature)
        row, turn2 = sel.nonzero()[:, 0], r2m[sel]
        t1 = ~turn2 & ro.first_from_pi[rows][row]
        kl = ro.lp_old[rows, :L - 1][sel] - lp_ref if a.kl == "reward" else rl.kl_term(lp, lp_ref)
        per_row = lambda x, turn: torch.zeros(len(rows), dtype=x.dtype).index_add(0, row, x * turn)
        logp1, logp2, kl1, kl2 = per_row(lp, t1), per_row(lp, turn2), per_row(kl, t1), per_row(kl, turn2)
        r1, r2, group = ro.r[0, rows], ro.r[1, rows], ro.group[rows] - ro.group[rows].min()
        if stage == 1:
            turns = ((torch.zeros_like(r1), a.beta2), (r2, a.beta1))
        else:
            turns = ((r1, a.beta1), (r2 + a.alpha * (r2 - r1), a.beta1))
        loss = 0.0
        for logp, k, (reward, beta) in zip((logp1, logp2), (kl1, kl2), turns):
            if a.kl == "reward":
                loss = loss - rl.baseline(reward - beta * k, group, a) * logp
            else:
                loss = loss - rl.baseline(reward, group, a) * logp + beta * k
        (loss.sum() / R).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), a.grad_clip or float("inf"))
    opt.step()


@pytest.mark.parametrize("stage, kl, dtype", [(1, "reward", "fp32"), (2, "reward", "fp32"), (2, "loss", "fp32"),
                                              (1, "reward", "bf16"), (2, "reward", "bf16")])
def test_two_turns_train_exactly_the_two_turn_code(tiny, stage, kl, dtype):
    """--turns 2 (the default) makes bit for bit the weights that the two-turn code made (two_turn_update): three
    Adam steps on rollouts with first attempts from the base model, rewards in every pattern, micro-batches,
    gradient clipping, in fp32 and under bf16 autocast. (The scripts themselves were compared with the commit
    before --turns existed: the same bytes in every checkpoint, docs/RESULTS.md.)"""
    model, tok, base = tiny
    a = SimpleNamespace(k=2, max_new_tokens=5, temperature=1.0, p1=data.DEMO_P1, base_first=0.5, micro_batch=4,
                        grad_clip=1.0, alpha=10.0, beta1=0.01, beta2=0.1, baseline="loo", kl=kl, gen_batch=None,
                        turns=2)
    objective = (train_stage1 if stage == 1 else train_stage2).objective
    weights = []
    for update in ("rl", "two-turn"):
        policy = GPT.from_pretrained(base + "/init")
        opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
        for step in range(3):
            ro = rl.rollout(model, model, tok, data.make_demo(4, seed=step), a, seed=step)  # the same in both
            ro.r = REWARDS[:2].roll(step, 1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                if update == "rl":
                    rl.update(policy, model, opt, ro, objective, a)
                else:
                    two_turn_update(policy, model, opt, ro, stage, a)
        weights.append(policy.state_dict())
    moved = GPT.from_pretrained(base + "/init").state_dict()
    assert not torch.equal(weights[0]["embed_tokens.weight"], moved["embed_tokens.weight"])
    for n in weights[0]:
        assert torch.equal(weights[0][n], weights[1][n]), n


# ----------------------------------------------------------------------------- watching a run (--eval-every)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_held_out_records_equal_evaluate_py(tiny, tmp_path, monkeypatch, dtype):
    """The eval records a run writes (--eval-every 2) equal evaluate.py's report on the checkpoint of that step
    (--keep-every 2) and the same problems (--split tune --n 12), metric by metric: the run's in-memory sampler
    against a checkpoint read back from disk. The oracle is one that any text can pass (an even length is
    right), so the numbers are not all 0."""
    import evaluate
    _, _, base = tiny
    monkeypatch.setattr(data, "rewards", lambda problems, texts: [float(len(t) % 2 == 0) for t in texts])
    out = tmp_path / "r"
    rl.run(run_args(base, str(out), 4, extra=["--eval-every", "2", "--eval-n", "12", "--keep-every", "2",
                                              "--dtype", dtype]), train_stage2.objective, "Stage II")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_acc_t1" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_n"] == 12 for r in evals)
    assert [r["step"] for r in log if "acc_t1" in r] == [1, 2, 3, 4]
    for rec in evals:
        report = tmp_path / f"report{rec['step']}.json"
        evaluate.main(["--ckpt", str(out / f"step_{rec['step']:06d}"), "--task", "demo", "--split", "tune", "--n", "12",
                       "--dtype", dtype, "--device", "cpu", "--out", str(report)])
        want = json.loads(report.read_text())
        got = {k[5:]: v for k, v in rec.items() if k.startswith("eval_") and k != "eval_seconds"}
        assert {"acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed", "verbatim", "edit_ratio", "n"} <= set(got)
        assert got == {k: want[k] for k in got}
    assert any(0 < r["eval_acc_t1"] < 1 for r in evals) and evals[0] != evals[1]


def test_best_by_eval_keeps_the_best_held_out_step(tiny, tmp_path, monkeypatch):
    """--best-by eval: best/ holds the step of the highest held-out acc_t2 among the eval records (the later of
    equals, as with the training reward), its state says so; --best-by eval without --eval-every is a one-line
    error."""
    _, _, base = tiny
    monkeypatch.setattr(data, "rewards", lambda problems, texts: [float(len(t) % 2 == 0) for t in texts])
    out = tmp_path / "r"
    rl.run(run_args(base, str(out), 5, extra=["--eval-every", "1", "--eval-n", "16", "--best-by", "eval",
                                              "--lr", "3e-2"]), train_stage2.objective, "Stage II")
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_acc_t2" in r]
    scores = [r["eval_acc_t2"] for r in evals]
    assert len(set(scores)) > 1, scores  # the test means something only if the held-out numbers move
    state = torch.load(out / "best" / "state.pt", weights_only=False)
    assert state["step"] == evals[len(scores) - 1 - scores[::-1].index(max(scores))]["step"]
    assert state["best"] == max(scores) and state["best_by"] == "eval"
    with pytest.raises(SystemExit):
        run_args(base, str(tmp_path / "x"), 2, extra=["--best-by", "eval", "--eval-every", "0"])


def math_file(tmp_path):
    """A MATH training file of 400 problems: its path, its rows, and the statements of its validation problems, the
    1 in 25 whose sha256 (first 8 bytes, big-endian) is 0 modulo 25, recomputed here apart from data.is_validation."""
    import hashlib
    rows = [{"problem": f"What is {i} plus {i % 7}?", "solution": f"\\boxed{{{i + i % 7}}}"} for i in range(400)]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = {r["problem"] for r in rows
            if int.from_bytes(hashlib.sha256(r["problem"].encode()).digest()[:8], "big") % 25 == 0}
    return path, rows, held


def test_math_validation_problems_never_reach_training(tiny, tmp_path, monkeypatch):
    """MATH's validation problems (1 in 25 of the training file by sha256 of the statement, recomputed here) are
    never in a step's prompts, whatever the flags, and are exactly what --eval-every evaluates on."""
    import evaluate
    _, _, base = tiny
    path, rows, held = math_file(tmp_path)
    assert 5 < len(held) < 40
    statement = lambda p: p.prompt.split("\n")[0]
    trained, evaluated, real_rollout, real_attempts = [], [], rl.rollout, evaluate.attempts
    monkeypatch.setattr(rl, "rollout", lambda pol, ref, tok, problems, *a: trained.extend(problems) or
                        real_rollout(pol, ref, tok, problems, *a))
    monkeypatch.setattr(evaluate, "attempts", lambda model, tok, problems, *a, **kw: evaluated.extend(problems) or
                        real_attempts(model, tok, problems, *a, **kw))
    args = rl.get_args(1, ["--preset", "math", "--data", str(path), "--base", base, "--init", base + "/init",
                           "--out", str(tmp_path / "r"), "--steps", "12", "--batch", "64", "--k", "2", "--micro-batch",
                           "64", "--max-new-tokens", "3", "--save-every", "12", "--eval-every", "12", "--device", "cpu"])
    rl.run(args, train_stage1.objective, "Stage I")
    assert len(trained) == 12 * 32 and {statement(p) for p in trained} <= {r["problem"] for r in rows} - held
    assert {statement(p) for p in evaluated} == held


def test_tensorboard_gets_exactly_the_log_records(tiny, tmp_path):
    """A stage run with --tensorboard: its event files hold every number of every log.jsonl record, training and
    held-out evaluation, under the same names at the record's step (float32, as TensorBoard stores them)."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, _, base = tiny
    out, tb = tmp_path / "r", tmp_path / "tb"
    rl.run(run_args(base, str(out), 3, extra=["--eval-every", "2", "--eval-n", "8", "--tensorboard", str(tb)]),
           train_stage2.objective, "Stage II")
    want = {}
    for rec in map(json.loads, (out / "log.jsonl").read_text().splitlines()):
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                want.setdefault(k, []).append((rec["step"], float(np.float32(v))))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    got = {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}
    assert "eval_acc_t2" in want and "acc_t2" in want and got == want


def test_resume_keeps_what_best_means(tiny, tmp_path):
    """A run saved before --best-by existed chose best/ by the training reward: resumed with --best-by eval it is
    refused by name (a held-out accuracy against a training reward would decide nothing); with --best-by eval, a
    changed --eval-n is refused too (another held-out set)."""
    _, _, base = tiny
    out = tmp_path / "r"
    rl.run(run_args(base, str(out), 2, extra=["--eval-every", "0"]), train_stage2.objective, "Stage II")
    state = torch.load(out / "ckpt" / "state.pt", weights_only=False)
    del state["args"]["best_by"], state["args"]["turns"]  # as a checkpoint written before the flags were
    torch.save(state, out / "ckpt" / "state.pt")
    with pytest.raises(SystemExit, match="--best-by is 'eval' but the run .* was started with 'train'"):
        rl.run(run_args(base, str(out), 3, extra=["--resume", "--eval-every", "1", "--best-by", "eval"]),
               train_stage2.objective, "Stage II")
    out2 = tmp_path / "e"
    rl.run(run_args(base, str(out2), 2, extra=["--eval-every", "1", "--eval-n", "8", "--best-by", "eval"]),
           train_stage2.objective, "Stage II")
    with pytest.raises(SystemExit, match="--eval-n is 16 but the run"):
        rl.run(run_args(base, str(out2), 3, extra=["--resume", "--eval-every", "1", "--eval-n", "16", "--best-by",
                                                   "eval"]), train_stage2.objective, "Stage II")
    rl.run(run_args(base, str(out2), 3, extra=["--resume", "--eval-every", "1", "--eval-n", "8", "--best-by", "eval"]),
           train_stage2.objective, "Stage II")  # the same flags continue


def test_n_train_counts_problems_after_the_held_out_ones(tiny, tmp_path):
    """--n-train N on a MATH file: N problems to train on, none of them a validation problem (they are taken out
    first), and a single-turn run keeps only problems whose two attempts fit (it is evaluated on two)."""
    _, tok, _ = tiny
    path, rows, held = math_file(tmp_path)
    first = [r["problem"] for r in rows[:60]]
    assert any(p in held for p in first)  # the file's first 60 hold validation problems
    a = SimpleNamespace(task="math", data=str(path), n_train=60, seed=0, p1=data.P1, max_new_tokens=3, turns=2)
    got = [p.prompt.split("\n")[0] for p in data.training_problems(a, tok, 512, lambda *x: None)]
    assert len(got) == 60 and not set(got) & held
    prompt = len(tok.render([{"role": "user", "content": rows[0]["problem"] + data.MATH_FORMAT}]))
    followup = len(tok.render_followup([{"role": "user", "content": data.P1}]))
    one = SimpleNamespace(**{**vars(a), "turns": 1, "max_new_tokens": 40})
    tight = prompt + followup + 60  # one attempt of 40 fits, two do not
    with pytest.raises(SystemExit, match="no problem left"):
        data.training_problems(one, tok, tight, lambda *x: None)
