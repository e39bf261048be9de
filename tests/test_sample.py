"""sample.py against independent references: transformers' greedy generate, and GPT re-run on the
whole context at every step without a cache (`_naive_greedy`). Tiny random models, fp32, CPU."""
import pytest
import torch

from model import GPT, GPTConfig
from sample import draw, generate, generate_turns

V = 96


def _tiny_hf(tie=True, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    c = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=tie, initializer_range=0.2, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(c).eval()
    with torch.no_grad():  # make biases and norm weights non-trivial too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


def _to_gpt(hf):
    c = hf.config
    cfg = GPTConfig(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                    n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size, intermediate_size=c.intermediate_size,
                    max_seq_len=c.max_position_embeddings, rope_theta=c.rope_parameters["rope_theta"],
                    norm_eps=c.rms_norm_eps, qkv_bias=True, tie_embeddings=c.tie_word_embeddings)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    model = GPT(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for this file


@pytest.fixture(scope="module")
def pair():
    hf = _tiny_hf()
    return hf, _to_gpt(hf)


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf, ctx, n):
    """transformers' greedy generate of exactly n tokens after ctx (one row, no padding)."""
    ids = torch.tensor([ctx])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    return out[0, len(ctx):].tolist()


@torch.no_grad()
def _naive_greedy(model, ctx, n, stop_ids=()):
    """The whole context through the model at every step: no cache, no padding, one row."""
    ctx, out = list(ctx), []
    for _ in range(n):
        t = int(model(torch.tensor([ctx]))[0, -1].argmax())
        out.append(t)
        ctx.append(t)
        if t in stop_ids:
            break
    return out


def test_greedy_matches_transformers(pair):
    hf, model = pair
    prompts = _prompts([5, 17, 1, 30])
    ours = generate(model, prompts, 24, temperature=0)
    for p, o in zip(prompts, ours):
        assert o == _hf_greedy(hf, p, 24)


def test_untied_head_matches_transformers():
    hf = _tiny_hf(tie=False, seed=3)
    model = _to_gpt(hf)
    p = _prompts([9])[0]
    assert generate(model, [p], 12, temperature=0)[0] == _hf_greedy(hf, p, 12)


def test_cached_equals_full_recompute(pair):
    _, model = pair
    prompts = _prompts([3, 11, 26])
    for p, o in zip(prompts, generate(model, prompts, 40, temperature=0)):
        assert o == _naive_greedy(model, p, 40)


def test_row_alone_equals_row_batched(pair):
    _, model = pair
    row = _prompts([12], seed=5)[0]
    alone = generate(model, [row], 30, temperature=0)[0]
    batch = _prompts([40, 2, 25, 7], seed=6)
    batch.insert(2, row)
    assert generate(model, batch, 30, temperature=0)[2] == alone


def test_stop_ends_its_row_only(pair):
    _, model = pair
    prompts = _prompts([4, 9, 15, 6, 21, 2], seed=7)
    free = generate(model, prompts, 30, temperature=0)
    stop = free[0][5]  # a token row 0 produces: it must end there (or at an earlier copy of it)
    out = generate(model, prompts, 30, temperature=0, stop_ids=(stop,))
    ended = 0
    for p, f, o in zip(prompts, free, out):
        ref = _naive_greedy(model, p, 30, stop_ids=(stop,))
        assert o == ref
        assert o == (f[:f.index(stop) + 1] if stop in f else f)
        ended += stop in f
    assert 0 < ended < len(prompts), "the test needs rows that stop and rows that go on"


def _two_turn_reference(model, p, followup, n, stop_ids, eot_id, y1=None):
    y1 = _naive_greedy(model, p, n, stop_ids) if y1 is None else y1
    # the chat format closes every attempt with its end-of-turn token, unless the attempt ended with it
    ctx = p + y1 + ([] if y1 and y1[-1] == eot_id else [eot_id]) + followup
    return y1, _naive_greedy(model, ctx, n, stop_ids)


def _own_token(free, r, lo, hi):
    """A token row r produces first at an index in [lo, hi) and no other row produces at all."""
    others = {t for i, f in enumerate(free) if i != r for t in f}
    for i in range(lo, hi):
        if free[r][i] not in others and free[r][i] not in free[r][:i]:
            return free[r][i]
    raise AssertionError("no such token: change the test's seeds")


def test_turn2_from_cache_equals_from_scratch(pair):
    hf, model = pair
    prompts = _prompts([6, 19, 3, 12, 27, 9, 14, 1], seed=10)
    followup = _prompts([7], seed=9)[0]
    free = generate(model, prompts, 20, temperature=0)
    # row 0 stops early and waits in the batch (7 of 8 live: no compaction) while its position must not move;
    # row 5 stops late and is compacted out owing its stop token; the other rows hit max_new_tokens (eot appended)
    stops, eot = (_own_token(free, 0, 1, 4), _own_token(free, 5, 12, 19)), 95
    y1s, y2s = generate_turns(model, prompts, followup, 20, temperature=0, stop_ids=stops, eot_id=eot)
    assert [y[-1] in stops for y in y1s] == [True, False, False, False, False, True, False, False]
    for p, y1, y2 in zip(prompts, y1s, y2s):
        r1, r2 = _two_turn_reference(model, p, followup, 20, stops, eot)
        assert (y1, y2) == (r1, r2)
        # and transformers on the same two-turn context, when turn 2 ran its full length
        if not any(t in stops for t in y2):
            ctx = p + y1 + [eot] + followup  # no stop token here is the end of turn: every y1 is closed
            assert y2 == _hf_greedy(hf, ctx, 20)


def test_k_samples_and_given_first_attempts(pair):
    _, model = pair
    prompts = _prompts([5, 14], seed=10)
    followup = _prompts([4], seed=11)[0]
    k, stops, eot = 3, (7,), 95
    given = _prompts([9, 3], seed=12)
    first = [None, given[0], None, None, None, given[1]]  # rows 1 and 5 bring their own turn 1
    y1s, y2s = generate_turns(model, prompts, followup, 16, k=k, temperature=0, stop_ids=stops,
                              eot_id=eot, first=first)
    for r in range(len(prompts) * k):
        r1, r2 = _two_turn_reference(model, prompts[r // k], followup, 16, stops, eot, y1=first[r])
        assert (y1s[r], y2s[r]) == (r1, r2), r


def test_sampling_distribution(pair):
    """The first new token's empirical frequencies match softmax(logits / T) with nucleus top_p."""
    _, model = pair
    p = _prompts([8], seed=13)[0]
    N = 4000
    with torch.no_grad():
        logits = model(torch.tensor([p]))[0, -1].double()
    for T, top_p in ((1.0, 1.0), (0.7, 0.8)):
        probs = (logits / T).softmax(-1)
        sp, idx = probs.sort(descending=True)
        keep = (sp.cumsum(0) - sp) < top_p
        expect = torch.zeros_like(probs)
        expect[idx[keep]] = sp[keep] / sp[keep].sum()
        out = generate_turns(model, [p], [], 1, turns=1, k=N, temperature=T, top_p=top_p, seed=0)[0]
        freq = torch.bincount(torch.tensor([o[0] for o in out]), minlength=V).double() / N
        assert (freq[expect == 0] == 0).all()
        assert ((freq - expect).abs() <= 4 * (expect * (1 - expect) / N).sqrt() + 1e-3).all()


def test_logprobs_are_of_the_distribution_sampled(pair):
    """return_logprobs gives each first token's log-prob under the distribution it was drawn from: pi at
    temperature T, and with top_p < 1 the nucleus renormalized (whose log-probs exceed pi's); the
    reference is a full forward of the prompt, in float64, with the nucleus chosen here."""
    _, model = pair
    p = _prompts([8], seed=13)[0]
    with torch.no_grad():
        logits = model(torch.tensor([p]))[0, -1].double()
    for T, top_p in ((1.0, 1.0), (0.7, 1.0), (0.7, 0.6), (1.3, 0.3)):
        probs = (logits / T).softmax(-1)
        sp, idx = probs.sort(descending=True)
        keep = (sp.cumsum(0) - sp) < top_p  # the smallest prefix whose mass reaches top_p
        want = torch.full_like(probs, float("-inf"))
        want[idx[keep]] = (sp[keep] / sp[keep].sum()).log()
        out, lps = generate_turns(model, [p], [], 1, turns=1, k=200, temperature=T, top_p=top_p, seed=0,
                                  return_logprobs=True)
        toks, lps = torch.tensor([o[0] for o in out[0]]), torch.tensor([lp[0] for lp in lps[0]]).double()
        assert (lps - want[toks]).abs().max() < 1e-5, (T, top_p)
        assert len(set(toks.tolist())) > 1  # several tokens drawn
        if top_p < 1:
            assert keep.sum() < len(keep) and (lps > probs[toks].log() + 1e-3).all()


def test_draw_frequencies():
    """draw() against the weights themselves: zero weights never drawn (also at block edges and in
    the padded last block), the others in proportion; unnormalized weights are fine."""
    w = torch.zeros(300)  # 3 blocks of 128, the last one padded
    w[[1, 127, 128, 200, 299]] = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5])
    N = 200000
    idx = draw(w.expand(N, -1).contiguous(), torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=300).double() / N
    p = w.double() / w.sum()
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / N).sqrt() + 1e-4).all()
    one = torch.zeros(2, 300)
    one[0, 0], one[1, 299] = 1e-30, 7.0  # a lone tiny weight, a lone last entry
    assert draw(one).tolist() == [0, 299]


def test_seed_reproducible(pair):
    _, model = pair
    prompts = _prompts([4, 10, 2], seed=14)
    a = generate(model, prompts, 20, temperature=1.0, stop_ids=(3,), seed=123)
    b = generate(model, prompts, 20, temperature=1.0, stop_ids=(3,), seed=123)
    c = generate(model, prompts, 20, temperature=1.0, stop_ids=(3,), seed=124)
    assert a == b and a != c
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert generate_turns(model, prompts, [1, 2], 10, k=2, seed=g1) == generate_turns(model, prompts, [1, 2], 10, k=2, seed=g2)


def test_max_new_that_fits_is_generate_turns_limit(pair):
    from sample import max_new_that_fits
    _, model = pair  # max_seq_len 256
    for turns in (1, 2, 3):
        for L in (30, 31):
            for Fl in (6, 7):
                best = max_new_that_fits(256, L, Fl, turns)
                prompts, followup = _prompts([L, L - 5]), [1] * Fl
                generate_turns(model, prompts, followup, best, turns=turns, temperature=0)
                with pytest.raises(ValueError, match="max_seq_len"):
                    generate_turns(model, prompts, followup, best + 1, turns=turns, temperature=0)


def test_context_too_long_raises(pair):
    _, model = pair  # max_seq_len 256
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, _prompts([200]), 57, temperature=0)
    generate(model, _prompts([200]), 56, temperature=0)  # 200 + 56 = 256 fits
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_turns(model, _prompts([50]), [1] * 10, 100, temperature=0)  # 50 + 200 + 11 > 256


# ----------------------------------------------------------------------------- the CLI (main)
def _byte_ckpt(d, max_seq_len, info=None):
    import data
    from tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                  max_seq_len=max_seq_len)).init_weights(std=0.3).save_pretrained(d)
    tok.save_pretrained(d)
    if info:
        data.save_task_info(d, **info)
    return str(d)


def _cli(monkeypatch, argv):
    """sample.main(argv) with generation replaced by a record of what it was asked for."""
    import sample
    from tokenizer import Tokenizer
    seen = {}

    def fake(model, prompts, followup, max_new_tokens, turns=2, **kw):
        seen.update(max_new=max_new_tokens, p1_turn=Tokenizer.byte_level().decode(followup),
                    autocast=torch.is_autocast_enabled("cpu"), param_dtype=model.head_weight.dtype)
        return [[[65, 66]] for _ in range(turns)]
    monkeypatch.setattr(sample, "generate_turns", fake)
    sample.main(argv + ["--device", "cpu"])
    return seen


def test_cli_defaults_from_the_checkpoint(tmp_path, monkeypatch, capsys):
    import data
    d = _byte_ckpt(tmp_path / "a", 256, info=dict(task="demo", p1="Look again.", max_new_tokens=11))
    seen = _cli(monkeypatch, ["--ckpt", d, "--prompt", "sum 5: 1 4"])
    assert seen["max_new"] == 11 and "Look again." in seen["p1_turn"] and "Look again." in capsys.readouterr().out
    assert not seen["autocast"] and seen["param_dtype"] == torch.float32
    seen = _cli(monkeypatch, ["--ckpt", d, "--prompt", "q", "--p1", "Other.", "--dtype", "bf16"])
    assert "Other." in seen["p1_turn"] and seen["autocast"] and seen["param_dtype"] == torch.float32
    # no task.json: the paper's math p1, and 512 new tokens capped to what fits the context
    big, small = _byte_ckpt(tmp_path / "b", 2048), _byte_ckpt(tmp_path / "c", 512)
    seen = _cli(monkeypatch, ["--ckpt", big, "--prompt", "q"])
    assert seen["max_new"] == 512 and data.P1 in seen["p1_turn"]
    seen = _cli(monkeypatch, ["--ckpt", small, "--prompt", "q"])
    # by hand (byte-level, one token per special): "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n" is
    # 1 + 5 + 1 + 1 + 1 + 1 + 10 = 20 tokens; the followup "\n<|im_start|>user\n" + P1 +
    # "<|im_end|>\n<|im_start|>assistant\n" is 1 + 1 + 5 + len(P1) + 1 + 1 + 1 + 10; one more for a closing eot
    fits = (512 - 20 - (1 + 1 + 5 + len(data.P1) + 1 + 1 + 1 + 10 + 1)) // 2
    assert seen["max_new"] == fits


def test_cli_errors_are_one_line(tmp_path, capsys):
    import sample
    d = _byte_ckpt(tmp_path / "a", 512)
    for argv, want in [(["--ckpt", str(tmp_path)], "not a checkpoint"),
                       (["--ckpt", d, "--max-new-tokens", "400"], "use --max-new-tokens "),
                       (["--ckpt", d, "--prompt", "q" * 400], "leave no room"),
                       (["--ckpt", d, "--temperature", "-1"], "--temperature must be 0 (greedy) or positive (got -1.0)"),
                       (["--ckpt", d, "--temperature", "nan"], "--temperature must be 0 (greedy) or positive (got nan)"),
                       (["--ckpt", d, "--top-p", "0"], "--top-p is a fraction in (0, 1] (got 0.0)"),
                       (["--ckpt", d, "--top-p", "1.5"], "--top-p is a fraction in (0, 1] (got 1.5)")]:
        argv = argv + ([] if "--prompt" in argv else ["--prompt", "q"])
        with pytest.raises(SystemExit):
            sample.main(argv + ["--device", "cpu"])
        err = capsys.readouterr().err
        assert "Traceback" not in err and want in err.strip().splitlines()[-1]
    # the suggested value is the largest generate_turns accepts
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", d, "--prompt", "q", "--max-new-tokens", "400", "--device", "cpu"])
    best = int(capsys.readouterr().err.split("use --max-new-tokens ")[1].split()[0])
    import data
    from tokenizer import Tokenizer
    tok, model = Tokenizer.byte_level(), GPT.from_pretrained(d)
    ctx, fu = tok.render([{"role": "user", "content": "q"}]), tok.render_followup([{"role": "user", "content": data.P1}])
    generate_turns(model, [ctx], fu, best, stop_ids=tok.stop_ids, eot_id=tok.eot_id)
    with pytest.raises(ValueError):
        generate_turns(model, [ctx], fu, best + 1, stop_ids=tok.stop_ids, eot_id=tok.eot_id)


def test_module_imports_only_model():
    import subprocess
    import sys
    code = "import sys, sample; bad = {'data', 'tokenizer', 'reward', 'rl'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__file__.rsplit("/tests/", 1)[0])
