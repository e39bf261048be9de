"""Every entry point as safe as training: a damaged checkpoint is one line naming the file and what is wrong,
whichever script reads it; a bad --device, --out or flag is one line before anything runs."""
import argparse
import json
import os
import runpy
import shutil
import stat
import subprocess
import sys

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
    (out / "ckpt" / "model.pt").write_bytes(w)
    state = (out / "ckpt" / "state.pt").read_bytes()
    (out / "ckpt" / "state.pt").write_bytes(state[:len(state) // 2])  # the Adam state and the step
    with pytest.raises(SystemExit) as e:
        rl.run(rl.get_args(1, [*args, "--steps", "3", "--resume"]), train_stage1.objective, "Stage I")
    msg = one_line(e, capsys)
    assert str(out / "ckpt" / "state.pt") in msg and "best, step_000001, step_000002" in msg, msg
    # resuming a finished run says that no step is left (run.sh resumes every run)
    (out / "ckpt" / "state.pt").write_bytes(state)
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


# ----------------------------------------------------------------------------- flags, devices, paths
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--steps", "1", "--batch", "4", "--k", "2", "--micro-batch", "4", "--max-new-tokens", "2", "--n-train", "8"]


class Parsed(Exception):
    pass


def parser_of(monkeypatch, call):
    """The ArgumentParser an entry point builds (caught as it parses)."""
    def catch(self, *a, **k):
        raise Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Parsed) as e:
        call()
    return e.value.args[0]


def test_every_flag_of_every_entry_point_says_what_it_does_and_its_default(monkeypatch):
    import bench
    import plot
    import train_base
    for name, call in {"train_stage1": lambda: rl.get_args(1, []), "train_base": lambda: train_base.get_args([]),
                       "train_sft": lambda: train_sft.get_args([]), "evaluate": lambda: evaluate.main([]),
                       "sample": lambda: sample.main([]), "convert": lambda: convert.main([]),
                       "bench": bench.main, "plot": lambda: plot.main([])}.items():
        p = parser_of(monkeypatch, call)
        for a in p._actions:
            assert a.help, (name, a.option_strings)
            # a default is shown: by the project's formatter, or in the flag's own text
            shown = p.formatter_class is sample.HelpFormatter or "default" in a.help or a.default in (None, False, [])
            assert shown or not a.option_strings or a.default is argparse.SUPPRESS, (name, a.option_strings)


BASE_FLAGS = [(["--max-steps", "0"], "--max-steps must be at least 1 (got 0)"),
              (["--eval-every", "0"], "--eval-every must be at least 1 (got 0)"),
              (["--eval-n", "0"], "--eval-n must be at least 1 (got 0)"),
              (["--batch", "0"], "--batch must be at least 1 (got 0)"),
              (["--threads", "-1"], "--threads must be at least 0 (got -1)"),
              (["--n-layer", "0"], "--n-layer must be at least 1 (got 0)"),
              (["--lr", "0"], "--lr must be a positive number (got 0.0)"),
              (["--change", "1.5"], "--change is a fraction in [0, 1] (got 1.5)"),
              (["--two-turn", "-1"], "--two-turn is a fraction in [0, 1] (got -1.0)"),
              (["--n-embd", "30"], "--n-embd (30) must be a multiple of --n-head (4), and --n-head of --n-kv-head (2)")]


@pytest.mark.parametrize("flags,message", BASE_FLAGS, ids=[" ".join(f) for f, _ in BASE_FLAGS])
def test_train_base_checks_its_flags(tmp_path, capsys, flags, message):
    import train_base
    with pytest.raises(SystemExit) as e:
        train_base.get_args(["--out", str(tmp_path / "b"), *flags])
    assert e.value.code == 2 and capsys.readouterr().err == f"{os.path.basename(sys.argv[0])}: error: {message}\n"
    assert os.listdir(tmp_path) == []


def test_train_base_never_overwrites_a_base_or_a_run(demo_ckpt, tmp_path, capsys):
    import train_base
    for out in (demo_ckpt, tmp_path / "file"):
        (tmp_path / "file").write_text("x")
        with pytest.raises(SystemExit) as e:
            train_base.get_args(["--out", str(out)])
        assert e.value.code == 2 and f"--out {out} already exists" in capsys.readouterr().err
    assert train_base.get_args(["--out", str(tmp_path / "new")]).out == str(tmp_path / "new")


def bad_device_calls(ckpt, tmp_path, device):
    return {"rl": lambda: rl.get_args(1, ["--base", str(ckpt), "--device", device]),
            "train_sft": lambda: train_sft.get_args(["--method", "star", "--base", str(ckpt), "--device", device]),
            "sample": lambda: sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--device", device]),
            "evaluate": lambda: evaluate.main(["--ckpt", str(ckpt), "--device", device])}


@pytest.mark.parametrize("device", ["bogus", "cuda"])
def test_a_device_that_is_not_there_is_one_line(demo_ckpt, tmp_path, capsys, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for name, call in bad_device_calls(demo_ckpt, tmp_path, device).items():
        with pytest.raises(SystemExit) as e:
            call()
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and f"--device {device}: " in err, (name, err)


def test_out_that_cannot_be_written_is_refused_before_training(demo_ckpt, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        rl.get_args(1, ["--base", str(demo_ckpt), "--out", str(tmp_path / "file"), *SMALL, "--device", "cpu"])
    assert capsys.readouterr().err.endswith(f": error: --out {tmp_path / 'file'}: {tmp_path / 'file'} is a file, "
                                            "not a folder\n")
    with pytest.raises(SystemExit) as e:
        train_sft.get_args(["--method", "star", "--base", str(demo_ckpt), "--out", str(tmp_path / "file" / "sub")])
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(SystemExit) as e:
            rl.get_args(1, ["--base", str(demo_ckpt), "--out", str(tmp_path / "ro" / "run"), *SMALL])
        assert capsys.readouterr().err.endswith("is read-only for this user\n")
    assert sorted(os.listdir(tmp_path)) == ["file", "ro"][:1 + (os.geteuid() != 0)]


def test_fewer_problems_than_a_steps_prompts_is_refused_before_anything_is_written(demo_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rl.get_args(1, ["--base", str(demo_ckpt), *SMALL, "--n-train", "1"])
    assert "--n-train 1 is fewer problems than a step's 2 prompts (--batch / --k)" in capsys.readouterr().err
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"problem": "1 + 1?", "answer": "2"}) + "\n")
    out = tmp_path / "run"
    args = rl.get_args(1, ["--base", str(demo_ckpt), "--task", "math", "--data", str(one), "--out", str(out), *SMALL, "--p1", "Fix.",
                           "--device", "cpu"])
    args.n_train = None
    with pytest.raises(SystemExit) as e:
        rl.run(args, train_stage1.objective, "Stage I")
    assert e.value.code.startswith("math: 1 problem(s) to train on, fewer than the 2 prompts of a step"), e.value.code
    assert not out.exists()


def test_a_missing_base_is_named_as_base(tmp_path):
    with pytest.raises(SystemExit) as e:
        rl.run(rl.get_args(1, ["--base", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"), *SMALL,
                               "--device", "cpu"]), train_stage1.objective, "Stage I")
    assert e.value.code.startswith(f"--base {tmp_path / 'nothing'}: not a checkpoint (no config.json); make it "
                                   f"first: python train_base.py --out {tmp_path / 'nothing'}"), e.value.code


def test_evaluate_checks_its_outputs_and_n_before_evaluating(demo_ckpt, tmp_path, capsys):
    for flag, path, says in (("--out", tmp_path, "is a folder, not a file"),
                             ("--markdown", tmp_path / "no" / "t.md", "does not exist"),
                             ("--n", "100000", "the demo's eval split has 2613 distinct problems; asked for 100000")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--ckpt", str(demo_ckpt), "--device", "cpu", flag, str(path)])
        err = capsys.readouterr()
        assert e.value.code == 2 and says in err.err and len(err.err.splitlines()) == 1 and err.out == "", (flag, err)


@pytest.mark.parametrize("script,stops", [("train_base.py", "data.make_demo"), ("train_sft.py", "data.training_problems"),
                                          ("evaluate.py", "data.load_task"), ("sample.py", "data.task_info"),
                                          ("convert.py", "model.load_checkpoint")])
def test_ctrl_c_is_one_line(demo_ckpt, tmp_path, monkeypatch, capsys, script, stops):
    """Each script as a user runs it (its __main__), stopped by Ctrl-C (KeyboardInterrupt) while it works."""
    module, fn = stops.split(".")
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(__import__(module), fn, interrupted)
    argv = {"train_base.py": ["--out", str(tmp_path / "b"), "--max-steps", "1"],
            "train_sft.py": ["--method", "star", "--base", str(demo_ckpt), "--out", str(tmp_path / "s"), "--device", "cpu"],
            "evaluate.py": ["--ckpt", str(demo_ckpt), "--device", "cpu"],
            "sample.py": ["--ckpt", str(demo_ckpt), "--prompt", "x", "--device", "cpu"],
            "convert.py": ["--to-hf", str(demo_ckpt), str(tmp_path / "hf")]}[script]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except KeyboardInterrupt:
        pytest.fail(f"{script}: Ctrl-C is a KeyboardInterrupt traceback")
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and len(msg.strip().splitlines()) == 1 and "Ctrl-C" in msg, msg


def test_convert_says_why_a_demo_model_cannot_be_exported_and_names_a_bad_header(demo_ckpt, tmp_path):
    with pytest.raises(SystemExit) as e:
        convert.main(["--to-hf", str(demo_ckpt), str(tmp_path / "hf")])
    assert "without q/k/v biases (the demo's base" in e.value.code and "cannot be exported" in e.value.code
    assert not (tmp_path / "hf").exists()
    head = json.dumps({"a": 1}).encode()
    (tmp_path / "x.safetensors").write_bytes(len(head).to_bytes(8, "little") + head)
    with pytest.raises(SystemExit) as e:
        convert.read_safetensors(str(tmp_path / "x.safetensors"))
    assert e.value.code.startswith(f"convert.py: {tmp_path / 'x.safetensors'}: the safetensors header's entry 'a' is 1")


def test_bench_demo_without_a_base_says_what_is_missing_and_leaves_nothing(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--only", "demo", "--demo-base",
                          str(tmp_path / "base")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 1 and res.stderr.startswith(f"bench.py --only demo: no base model in {tmp_path / 'base'}")
    assert len(res.stderr.strip().splitlines()) == 1 and "bash run.sh demo1" in res.stderr
    assert os.listdir(tmp_path) == []


def test_bench_checks_its_flags_and_imports_no_checkout_at_the_top(monkeypatch, capsys):
    """A spawned child imports bench.py first and then the checkout it measures: bench.py's own imports of
    the project must wait for main()."""
    res = subprocess.run([sys.executable, "-c", "import sys, bench; print(sorted({'model', 'sample', 'rl'} & "
                          "set(sys.modules)))"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
    import bench
    monkeypatch.setattr(bench, "BENCHES", {})  # flags it failed to check would run nothing
    for flags, message in ((["--repeats", "0"], "--repeats must be at least 1 (got 0)"),
                           (["--demo-steps", "1"], "--demo-steps must be at least 2 (got 1)"),
                           (["--device", "bogus"], "--device bogus: ")):
        monkeypatch.setattr(sys, "argv", ["bench.py", *flags])
        with pytest.raises(SystemExit) as e:
            bench.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"bench.py: error: {message}") and len(err.splitlines()) == 1


def test_a_read_only_folder_is_named(tmp_path, monkeypatch):
    """(As root every folder is writable: the permission is played by os.access.)"""
    import model
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(tmp_path))
    assert model.write_error(tmp_path / "run" / "sub") == f"{tmp_path} is read-only for this user"
    assert model.write_error(tmp_path / "report.json", folder=False) == f"{tmp_path} is read-only for this user"
    assert model.write_error(tmp_path / "elsewhere" / "report.json", folder=False) == \
        f"{tmp_path / 'elsewhere'} (the folder of {tmp_path / 'elsewhere' / 'report.json'}) does not exist"


def test_ctrl_c_in_a_download_is_one_line(tmp_path):
    """download.py waiting on a server that never answers, stopped by SIGINT as a terminal's Ctrl-C sends it."""
    import signal
    import socket
    import subprocess
    import time
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "download.py"), "data", "math", str(tmp_path / "d"),
                                 "--url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        server.settimeout(60)
        conn, _ = server.accept()  # the download has started
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        conn.close()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "Ctrl-C" in err and "run the same command again" in err, err


def test_bench_demo_times_the_training_steps_of_a_stage_run(demo_ckpt):
    """bench.py --only demo's Stage I timing runs the checkout's train_stage1.py (the demo preset, so a held-out
    evaluation at its last step writes an eval record beside the training records) and reads each step after the
    first: seconds, generated tokens, the tokens its passes run."""
    import bench
    steps = bench._demo_stage1(ROOT, str(demo_ckpt), 3, 1, "fp32")
    assert len(steps) == 2 and all(s > 0 and gen > 0 and run >= gen for s, gen, run in steps), steps
