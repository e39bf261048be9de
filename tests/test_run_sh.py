"""run.sh's safety, fast: a stand-in `python` first on PATH plays the jobs (it records its pid, succeeds, fails
or sleeps as told), so what is tested is run.sh itself: it never deletes finished work, and a failed job or a
signal stops every process it started."""
import os
import signal
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE = """#!/bin/bash
echo $$ >> "$FAKE_PIDS"
[ -n "$FAKE_BASE_SECONDS" ] && [ "$1" = train_base.py ] && sleep "$FAKE_BASE_SECONDS"
[ -n "$FAKE_LOG" ] && { printf '%s\\n' "$*" >> "$FAKE_LOG"; [ "$2" = --out ] && mkdir -p "$3"; exit 0; }  # all succeed
case "$1" in
  train_base.py) mkdir -p "$3"; exit 0 ;;  # python train_base.py --out DIR ...
  train_stage2.py) [ -n "$FAKE_FAIL" ] && { sleep 1; echo "fake failure" >&2; exit 3; } ;;
esac
exec sleep 120
"""


def fake_env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE)
    (bin_dir / "python").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "QUICK": "1", "OUT": str(tmp_path / "out"),
            "FAKE_PIDS": str(tmp_path / "pids"), **extra}


def alive(pid):
    """Whether process pid runs (a zombie, dead but not yet reaped by its adopter, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pids(tmp_path):
    path = tmp_path / "pids"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def wait_for(cond, timeout=30):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.1)


def test_other_settings_are_refused_and_nothing_is_deleted(tmp_path):
    env = fake_env(tmp_path)
    out = tmp_path / "out" / "demo"
    (out / "seed0" / "score" / "ckpt").mkdir(parents=True)
    (out / "seed0" / "score" / "ckpt" / "model.pt").write_text("finished")
    (out / "report.json").write_text("{}")
    (out / "settings").write_text("base: ; runs: , s1 300, s2 300; sft: --problems 19200; dtype auto\n")
    res = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    line = res.stderr.strip()
    assert "s1 300" in line and "s1 2" in line and "FRESH=1" in line and "OUT=" in line, line
    assert (out / "seed0" / "score" / "ckpt" / "model.pt").read_text() == "finished"
    assert (out / "report.json").exists() and "s1 300" in (out / "settings").read_text()
    assert pids(tmp_path) == []  # no job started
    # runs without a settings file (their settings unknown) are kept alike
    (out / "settings").unlink()
    res = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "unknown" in res.stderr and (out / "seed0" / "score" / "ckpt" / "model.pt").exists()


def test_a_failed_job_stops_every_process_it_started(tmp_path):
    env = fake_env(tmp_path, FAKE_FAIL="1")
    res = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    err = res.stderr.splitlines()
    assert "run.sh: no_stage1@0 failed (its lines above say why)" in err, err
    assert err[-1].startswith("run.sh: stopped;") and "run the same command again" in err[-1], err
    started = pids(tmp_path)
    assert len(started) >= 3  # the base, the failed job, and the job beside it, still running when it failed
    wait_for(lambda: not any(alive(p) for p in started))
    numbers = [ln.split()[3] for ln in err if ln.startswith("===== run.sh: job")]
    assert numbers == [str(i) for i in range(1, len(numbers) + 1)], numbers  # one number per job, no repeats


def test_a_signal_stops_every_process_and_says_how_to_continue(tmp_path):
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        env = fake_env(tmp_path / sig.name) if (tmp_path / sig.name).mkdir() is None else None
        run = subprocess.Popen(["bash", "run.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
        wait_for(lambda: len(pids(tmp_path / sig.name)) >= 3)  # the base, then two jobs at once
        run.send_signal(sig)  # to run.sh alone, not to its group: run.sh must pass it on
        _, err = run.communicate(timeout=30)
        assert run.returncode == code, err
        assert err.strip().splitlines()[-1] == ("run.sh: stopped; finished runs are kept: run the same command again "
                                                "to continue (FRESH=1 starts over)"), err
        started = pids(tmp_path / sig.name)
        wait_for(lambda: not any(alive(p) for p in started))


def test_the_math_preset_stops_its_python_on_a_signal_to_run_sh_alone(tmp_path):
    env = fake_env(tmp_path)
    base = tmp_path / "out" / "math" / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    run = subprocess.Popen(["bash", "run.sh", "math"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: len(pids(tmp_path)) >= 1)  # Stage I's python, running
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=30)
    assert run.returncode == 130 and err.strip().splitlines()[-1].startswith("run.sh: stopped;"), err
    started = pids(tmp_path)
    wait_for(lambda: not any(alive(p) for p in started))


def test_the_quickstarts_sample_path_is_what_run_sh_demo1_writes(tmp_path):
    """README's Quickstart runs `bash run.sh demo1`, then sample.py on SCoRe's checkpoint: its path is the --out
    that run.sh gives the SCoRe row's Stage II, plus ckpt/."""
    import re
    readme = open(os.path.join(ROOT, "README.md")).read()
    ckpt = re.search(r"^python sample.py --ckpt (\S+)", readme, re.M).group(1)
    env = fake_env(tmp_path, FAKE_LOG=str(tmp_path / "log"), QUICK="0")  # OUT: tmp_path/out, for the default out
    res = subprocess.run(["bash", "run.sh", "demo1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    score = [ln for ln in (tmp_path / "log").read_text().splitlines() if "SCoRe (seed 0)" in ln]
    assert len(score) == 1 and score[0].startswith("train_stage2.py --out "), score
    assert ckpt == os.path.relpath(score[0].split()[2], tmp_path) + "/ckpt", (ckpt, score)


def test_turns3_adds_the_three_attempt_row(tmp_path):
    """TURNS3=1 bash run.sh demo1: Stage I and Stage II with --turns 3 (Stage II from that Stage I's checkpoint), and
    the row in evaluate.py's command; without it, no --turns in any training command."""
    for turns3 in ("1", "0"):
        d, log = tmp_path / turns3, tmp_path / f"log{turns3}"
        d.mkdir()
        env = fake_env(d, FAKE_LOG=str(log), TURNS3=turns3)
        res = subprocess.run(["bash", "run.sh", "demo1"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        lines = log.read_text().splitlines()
        three = [ln for ln in lines if "--turns 3" in ln and not ln.startswith("evaluate.py")]
        ev = [ln for ln in lines if ln.startswith("evaluate.py")]
        if turns3 == "1":
            s1, s2 = sorted(three)  # train_stage1.py, train_stage2.py
            assert s1.startswith("train_stage1.py --out ") and s2.startswith("train_stage2.py --out ")
            assert f"--init {s1.split()[2]}/ckpt" in s2
            assert "SCoRe, trained on 3 attempts@0" in ev[0] and f"{s2.split()[2]}/ckpt" in ev[0]
        else:
            assert not three and "3 attempts" not in ev[0]


def test_the_eta_counts_the_jobs_that_ran_this_time(tmp_path):
    """run.sh's ETA is the seconds per unit of cost of the jobs that ran (here the base: 10 s for its cost of 200),
    over the cost left, on two lanes; jobs that end at once (a finished run, continued) do not make it 0."""
    env = fake_env(tmp_path, FAKE_LOG=str(tmp_path / "log"), FAKE_BASE_SECONDS="10", QUICK="0")
    res = subprocess.run(["bash", "run.sh", "demo1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    jobs = [ln for ln in res.stderr.splitlines() if ln.startswith("===== run.sh: job ")]
    assert "left" not in jobs[0]  # the base: nothing has run yet (every other job waits for it)
    # after the base: stage1 300 + stage1_only 300 + no_stage1 600 + single_turn 400 + score 300 + no_shaping 300
    # + star 200 + pair 200 = 2600 of cost left at most, 10 s / 200 each, over two lanes: 65 s, about 1 min
    assert jobs[1].endswith("about 1 min left) =====") and jobs[-1].endswith("about 0 min left) =====")
    assert all(ln.endswith(("about 1 min left) =====", "about 0 min left) =====")) for ln in jobs[1:]), jobs
