"""Every entry point as safe as training: a damaged checkpoint is one line naming the file and what is wrong,
whichever script reads it; a bad --device, --out or flag is one line before anything runs."""
import json
import os
import shutil
import stat

import pytest
import torch

import convert
import data
import evaluate
import rl
import sample
import train_sft
import train_stage1
from model import GPT, GPTConfig
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """A tiny model of the demo task, as train_base.py writes one."""
    torch.manual_seed(0)
    tok = Tokenizer.byte_level(data.DEMO_WORDS)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32,
                    max_seq_len=128, tie_embeddings=True)
    d = tmp_path_factory.mktemp("base")
    GPT(cfg).init_weights().save_pretrained(d)
    tok.save_pretrained(d)
    data.save_task_info(d, "demo", data.DEMO_P1, 4)
    return d


def damage(src, dst, how):
    """A copy of checkpoint src at dst, damaged `how`; returns the file at fault and what a message must say."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if how == "truncated":
        w = (dst / "model.pt").read_bytes()
        (dst / "model.pt").write_bytes(w[:len(w) // 2])
        return dst / "model.pt", "damaged"
    if how == "n_embd":
        (dst / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
        return dst, "by its config.json"
    if how == "four":
        (dst / "config.json").write_text(json.dumps({**cfg, "n_layer": "four"}))
        return dst / "config.json", "n_layer is 'four', not an int"
    (dst / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    return dst / "config.json", "unknown config keys ['n_layers']"


HOWS = ["truncated", "n_embd", "four", "unknown"]


def one_line(e, capsys):
    """The message of a SystemExit as the user sees it: its text, or what argparse printed."""
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and len(msg.strip().splitlines()) == 1, msg
    return msg


@pytest.mark.parametrize("how", HOWS)
def test_a_damaged_checkpoint_is_one_line_in_every_reader(demo_ckpt, tmp_path, capsys, how):
    bad = tmp_path / "bad"
    where, what = damage(demo_ckpt, bad, how)
    small = ["--steps", "1", "--batch", "4", "--k", "2", "--micro-batch", "4", "--max-new-tokens", "2", "--n-train", "8",
             "--device", "cpu"]
    runs = {
        "sample": lambda: sample.main(["--ckpt", str(bad), "--prompt", "sum 5: 1 2 3 4 6", "--device", "cpu"]),
        "evaluate": lambda: evaluate.main(["--ckpt", str(bad), "--task", "demo", "--n", "2", "--device", "cpu"]),
        "stage1 --base": lambda: rl.run(rl.get_args(1, ["--base", str(bad), "--init", str(demo_ckpt), "--out",
                                                        str(tmp_path / "r1"), *small]), train_stage1.objective, "Stage I"),
        "stage1 --init": lambda: rl.run(rl.get_args(1, ["--base", str(demo_ckpt), "--init", str(bad), "--out",
                                                        str(tmp_path / "r2"), *small]), train_stage1.objective, "Stage I"),
        "sft --base": lambda: train_sft.main(["--method", "star", "--base", str(bad), "--out", str(tmp_path / "s"),
                                              "--problems", "4", "--device", "cpu"]),
        "convert --to-hf": lambda: convert.main(["--to-hf", str(bad), str(tmp_path / "hf")]),
    }
    for name, run in runs.items():
        with pytest.raises(SystemExit) as e:
            run()
        msg = one_line(e, capsys)
        assert str(where) in msg and what in msg, (name, msg)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "s").exists()


def test_a_damaged_checkpoint_to_resume_points_at_the_others(demo_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--base", str(demo_ckpt), "--out", str(out), "--batch", "4", "--k", "2", "--micro-batch", "4",
            "--max-new-tokens", "2", "--n-train", "8", "--device", "cpu", "--keep-every", "1", "--save-every", "1"]
    rl.run(rl.get_args(1, [*args, "--steps", "2"]), train_stage1.objective, "Stage I")
    w = (out / "ckpt" / "model.pt").read_bytes()
    (out / "ckpt" / "model.pt").write_bytes(w[:100])
    with pytest.raises(SystemExit) as e:
        rl.run(rl.get_args(1, [*args, "--steps", "3", "--resume"]), train_stage1.objective, "Stage I")
    msg = one_line(e, capsys)
    assert str(out / "ckpt" / "model.pt") in msg and "best, step_000001, step_000002" in msg, msg
    # resuming a finished run says that no step is left (run.sh resumes every run)
    (out / "ckpt" / "model.pt").write_bytes(w)
    capsys.readouterr()
    rl.run(rl.get_args(1, [*args, "--steps", "1", "--resume"]), train_stage1.objective, "Stage I")
    assert "is at step 2, --steps 1: no step left to run" in capsys.readouterr().out


def test_checkpoints_are_readable_by_everyone_the_umask_allows(demo_ckpt, tmp_path):
    old = os.umask(0o022)
    try:
        GPT.from_pretrained(demo_ckpt).save_pretrained(tmp_path / "c")
    finally:
        os.umask(old)
    for f in ("model.pt", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "c" / f).st_mode) == 0o644, f
