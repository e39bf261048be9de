"""loggers.py, offline: the records given to W&B (WANDB_MODE=offline, its files in tmp_path) and to TensorBoard
are read back from the files each writes and equal the records; no flag, no logger and no import; a missing
package is one line naming its pip command."""
import argparse
import builtins
import glob
import json
import os
import struct
import sys

import numpy as np
import pytest

import loggers

# training records and a held-out evaluation record at step 2, as log.jsonl holds them; "note" is no number
RECORDS = [
    dict(step=1, acc_t1=0.25, acc_t2=0.375, kl_t1=0.001953125, tokens=4096, changed=0.5),
    dict(step=2, acc_t1=0.5, acc_t2=0.625, kl_t1=0.00390625, tokens=4100, changed=0.25, note="warm-up done"),
    dict(step=2, eval_n=64, eval_acc_t1=0.40625, eval_acc_t2=0.5, eval_delta=0.09375, eval_seconds=1.5),
    dict(step=3, acc_t1=0.75, acc_t2=0.875, kl_t1=0.0078125, tokens=4104, changed=0.125, ratios=[0.1, 0.2]),
]


def expected():
    """{key: [(step, value)]}: every numeric value of the records but the step."""
    want = {}
    for r in RECORDS:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                want.setdefault(k, []).append((r["step"], v))
    return want


def args_of(argv):
    p = argparse.ArgumentParser()
    loggers.add_arguments(p)
    return p.parse_args(argv)


def log_all(args, run_dir):
    lg = loggers.open(args, str(run_dir), config={"lr": 5e-6, "preset": "demo"})
    for r in RECORDS:
        lg.log(r)
    lg.close()


def wandb_records(path):
    """The Record protos of a .wandb transaction log: W&B's LevelDB-style log (a 7-byte header ':W&B', magic,
    version; 32 KiB blocks of chunks: crc32c (4), length (2, little-endian), type (1: whole, 2-4: first,
    middle, last piece), data). wandb 0.31 ships no Python reader of it, so it is read here."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        b = f.read()
    assert b[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(b):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", b[pos:pos + 7])
        buf += b[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_holds_the_records(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    log_all(args_of(["--wandb", "score-test"]), tmp_path / "stage2")
    import wandb
    wandb.teardown()  # finish() returns before W&B's service has written the transaction log; this waits for it
    err = capsys.readouterr().err
    assert "note is not a number (str)" in err and "ratios is not a number (list)" in err
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    got, config = {}, {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # W&B's own: _step, _runtime, _timestamp
                    got.setdefault(key, []).append((rec.history.step.num, float(item.value_json)))
        elif kind == "config":
            config.update({u.key: u.value_json for u in rec.config.update})
        elif kind == "run":
            config.update({u.key: u.value_json for u in rec.run.config.update})
            assert rec.run.project == "score-test" and rec.run.display_name == "stage2"
    assert got == expected()  # every value, at its step, under its log.jsonl name; nothing else
    assert json.loads(config["lr"]) == 5e-6 and json.loads(config["preset"]) == "demo"


def test_tensorboard_event_files_hold_the_records(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = tmp_path / "tb"
    log_all(args_of(["--tensorboard", str(tb)]), tmp_path / "run")
    assert "note is not a number" in capsys.readouterr().err
    acc = EventAccumulator(str(tb))
    acc.Reload()
    got = {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}
    want = expected()
    assert got.keys() == want.keys()
    for k, pairs in want.items():  # TensorBoard stores float32: the records' values rounded so, exactly
        assert [s for s, _ in got[k]] == [s for s, _ in pairs], k
        assert [v for _, v in got[k]] == [float(np.float32(v)) for _, v in pairs], k


def test_no_flag_no_logger_no_import(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    lg = loggers.open(args_of([]), str(tmp_path / "run"))
    lg.log({"step": 1, "loss": 0.5})
    lg.close()
    assert "wandb" not in sys.modules and not os.path.exists(tmp_path / "run")
    with pytest.raises(ValueError, match="integer 'step'"):
        loggers.Loggers(tb_writer=object()).log({"loss": 0.5})


@pytest.mark.parametrize("argv, module, line", [
    (["--wandb", "p"], "wandb", "--wandb needs the wandb package, which is not installed: pip install wandb"),
    (["--tensorboard", "tb"], "torch.utils.tensorboard",
     "--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard"),
    (["--wandb", "p", "--tensorboard", "tb"], "torch.utils.tensorboard",  # W&B must not have started
     "--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard")])
def test_missing_package_is_one_line(tmp_path, monkeypatch, argv, module, line):
    monkeypatch.setenv("WANDB_MODE", "offline")  # should the check fail, no network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    for call in (lambda: loggers.check(args_of(argv)), lambda: loggers.open(args_of(argv), str(tmp_path / "r"))):
        with pytest.raises(SystemExit) as e:
            call()
        assert e.value.code == line
    assert not os.path.exists(tmp_path / "r") and not os.path.exists(tmp_path / "wandb")  # before any work
