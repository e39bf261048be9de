"""Downloads against a local HTTP server on 127.0.0.1 (nothing leaves the machine): download.py model on a
tiny HF-style repository, download.py data on tiny files in each data set's published format.
Dropped connections, a server that ignores Range, 404s and size mismatches."""
import gzip
import http.server
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import data  # noqa: E402
import download  # noqa: E402
from model import GPT  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` {url path: bytes} and honours 'Range: bytes=N-' (206, or 416 past the end) unless
    `ignore_range`. A path in `drop` gets half of what it asked for, then the connection closes (once);
    `swap` {path: bytes} replaces a file after its first request; `redirect` {path: target} answers 302,
    as the hub does for LFS files. `log` holds (path, Range, Authorization) of every request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.drop, self.swap, self.redirect, self.log = {}, set(), {}, {}, []
        self.ignore_range = False
        self.url = f"http://127.0.0.1:{self.server_port}"


class Handler(http.server.BaseHTTPRequestHandler):  # HTTP/1.0: one request per connection
    def log_message(self, *args):
        pass

    def reply(self, code, headers):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.end_headers()

    def do_GET(self):
        s, path, rng = self.server, self.path, self.headers.get("Range")
        s.log.append((path, rng, self.headers.get("Authorization")))
        if path in s.redirect:
            return self.reply(302, {"Location": s.redirect[path], "Content-Length": 0})
        if path not in s.files:
            return self.send_error(404)
        body, start = s.files[path], 0
        if path in s.swap:
            s.files[path] = s.swap.pop(path)
        if rng and not s.ignore_range:
            start = int(rng.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                return self.reply(416, {"Content-Range": f"bytes */{len(body)}", "Content-Length": 0})
            self.reply(206, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                             "Content-Length": len(body) - start})
        else:
            self.reply(200, {"Content-Length": len(body)})
        end = len(body)
        if path in s.drop:
            s.drop.discard(path)
            end = start + (len(body) - start) // 2
        self.wfile.write(body[start:end])


@pytest.fixture()
def server():
    s = Server()
    threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield s
    s.shutdown()
    s.server_close()


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(download, "RETRY_WAIT", 0.0)


# ---------------------------------------------------------------------------- the downloader
BLOB = random.Random(0).randbytes(3_000_000)  # a few 1 MiB reads


@pytest.mark.parametrize("ignore_range", [False, True])
def test_resume_after_dropped_connection(server, tmp_path, ignore_range, capsys, monkeypatch):
    server.files["/f.bin"], server.ignore_range = BLOB, ignore_range
    server.drop.add("/f.bin")
    monkeypatch.setattr(download, "PROGRESS_EVERY", -1)  # a progress line per read
    download.download(server.url + "/f.bin", str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == BLOB and not (tmp_path / "f.bin.part").exists()
    assert [r for _, r, _ in server.log] == [None, f"bytes={len(BLOB) // 2}-"]
    out = capsys.readouterr().out
    assert ("ignored the Range request" in out) == ignore_range
    assert "f.bin: 1.0 MB of 3.0 MB (35%)" in out and "/s, ETA" in out and "1.5 MB kept, retrying" in out

    # a .part left by an interrupted run is resumed; a complete one (416) is just renamed; a file is skipped
    for have in (1000, len(BLOB)):
        server.log.clear()
        (tmp_path / "g.bin.part").write_bytes(BLOB[:have])
        download.download(server.url + "/f.bin", str(tmp_path / "g.bin"))
        assert (tmp_path / "g.bin").read_bytes() == BLOB and server.log[0][1] == f"bytes={have}-"
        os.remove(tmp_path / "g.bin")
    server.log.clear()
    download.download(server.url + "/f.bin", str(tmp_path / "f.bin"))
    assert server.log == []


def test_download_errors(server, tmp_path, monkeypatch):
    with pytest.raises(download.DownloadError, match=f"{server.url}/missing: HTTP 404") as e:
        download.download(server.url + "/missing", str(tmp_path / "missing"))
    assert e.value.status == 404 and not os.listdir(tmp_path)

    # the file changes size on the server between two attempts: the bytes we have are worthless
    server.files["/f.bin"], server.swap["/f.bin"] = BLOB[:100_000], BLOB[:120_000]
    server.drop.add("/f.bin")
    with pytest.raises(download.DownloadError, match=r"/f.bin: size mismatch: .*100000 bytes.* now 120000 bytes"):
        download.download(server.url + "/f.bin", str(tmp_path / "f.bin"))
    assert not os.listdir(tmp_path)

    # nobody listening: a bounded number of retries, then an error naming the URL
    monkeypatch.setattr(download, "RETRIES", 2)
    dead = f"http://127.0.0.1:{server.server_port}/x"
    server.shutdown()
    server.server_close()
    with pytest.raises(download.DownloadError, match=f"{dead}: giving up after 2 retries"):
        download.download(dead, str(tmp_path / "x"))


# ---------------------------------------------------------------------------- download.py model
@pytest.fixture(scope="module")
def hf_repo(tmp_path_factory):
    """A tiny random Qwen2 saved by transformers in 40 KB shards, with a small byte-level BPE tokenizer
    trained here: {file name: bytes} as the hub would serve them, and the model."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the solution of the equation is the answer"] * 50, trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d, max_shard_size="40KB")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    hf_tok.save_pretrained(d)
    files = {f: (d / f).read_bytes() for f in os.listdir(d)}
    assert sum(f.endswith(".safetensors") for f in files) > 2 and "model.safetensors.index.json" in files
    return model, hf_tok, files


def serve_repo(server, files, revision="main"):
    """The repository at /org/tiny/resolve/REVISION/FILE; safetensors redirect to /cdn/FILE, as on the hub."""
    for name, body in files.items():
        path = f"/org/tiny/resolve/{revision}/{name}"
        if name.endswith(".safetensors"):
            server.redirect[path], path = f"/cdn/{name}", f"/cdn/{name}"
        server.files[path] = body


def test_model_download(server, hf_repo, tmp_path, monkeypatch):
    model, hf_tok, files = hf_repo
    serve_repo(server, files, revision="refs%2Fpr%2F1")
    shard = sorted(f for f in files if f.endswith(".safetensors"))[1]
    server.drop.add(f"/cdn/{shard}")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    argv = ["model", "org/tiny", str(tmp_path / "ckpt"), "--revision", "refs/pr/1"]
    download.main(argv)

    hf_dir = tmp_path / "ckpt.hf"
    assert sorted(os.listdir(hf_dir)) == sorted(files)  # no .part left
    for name, body in files.items():
        assert (hf_dir / name).read_bytes() == body, name
    assert [r for p, r, _ in server.log if p == f"/cdn/{shard}"] == [None, f"bytes={len(files[shard]) // 2}-"]
    assert {a for p, _, a in server.log if p.startswith("/org/")} == {"Bearer hf_secret"}
    assert {a for p, _, a in server.log if p.startswith("/cdn/")} == {None}  # the token stays with the hub

    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = GPT.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)(idx)
        assert (ours - model(idx).logits).abs().max() <= 1e-4
    text = "the answer is 42, <|im_start|>"
    assert Tokenizer.from_pretrained(tmp_path / "ckpt").encode(text, allow_special=True) == hf_tok.encode(text)

    n = len(server.log)  # again: complete files are not fetched again, only the absent optional ones asked for
    download.main(argv)
    assert server.log[n:] and all(p not in server.files and p not in server.redirect for p, _, _ in server.log[n:])


def test_model_download_errors(server, hf_repo, tmp_path):
    _, _, files = hf_repo
    run = lambda out: download.main(["model", "org/tiny", str(tmp_path / out), "--endpoint", server.url])
    with pytest.raises(SystemExit, match=f"{server.url}/org/tiny/resolve/main/config.json: HTTP 404"):
        run("a")

    shards = sorted(f for f in files if f.endswith(".safetensors"))
    serve_repo(server, {k: v for k, v in files.items() if k != shards[-1]})  # the index lists a shard that is gone
    with pytest.raises(SystemExit, match=f"resolve/main/{shards[-1]}: HTTP 404"):
        run("b")

    serve_repo(server, {shards[-1]: files[shards[-1]][:-64]})  # served whole, but cut short at the source
    with pytest.raises(SystemExit, match=f"{shards[-1]}: size mismatch: its header describes"):
        run("c")
    assert not (tmp_path / "c.hf" / shards[-1]).exists() and (tmp_path / "c.hf" / shards[0]).exists()

    server.files = {p: b for p, b in server.files.items() if "tokenizer" not in p}
    with pytest.raises(SystemExit, match="resolve/main/: no tokenizer files"):
        run("d")
    with pytest.raises(SystemExit, match="ORG/NAME"):
        download.main(["model", "../etc", str(tmp_path / "e"), "--endpoint", server.url])


# ---------------------------------------------------------------------------- download.py data
def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def tar_of(members):
    """A tar file's bytes from [(name, bytes or None for a directory, or ("symlink", target))]."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            if body is None:
                info.type = tarfile.DIRTYPE
            elif isinstance(body, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, body[1]
            else:
                info.size = len(body)
            tar.addfile(info, io.BytesIO(body) if isinstance(body, bytes) else None)
    return buf.getvalue()


def math_row(i):
    return {"problem": f"What is {i} + {i}?", "solution": f"It is $\\boxed{{{2 * i}}}$.", "answer": str(2 * i),
            "subject": "Algebra", "level": 1, "unique_id": f"test/algebra/{i}.json"}


DATA_FILES = {
    "HumanEval.jsonl.gz": gzip.compress(jsonl([
        {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"x + {i}\"\"\"\n",
         "canonical_solution": f"    return x + {i}\n", "test": f"def check(c):\n    assert c(1) == {1 + i}\n",
         "entry_point": f"f{i}"} for i in range(3)])),
    "mbpp.jsonl": jsonl([{"task_id": i, "text": f"Write a function f{i}.", "code": f"def f{i}(): return {i}",
                          "test_list": [f"assert f{i}() == {i}"], "test_setup_code": "", "challenge_test_list": []}
                         for i in (1, 10, 11, 510, 511, 600, 601, 974)]),
    "MATH500.jsonl": jsonl([math_row(i) for i in range(4)]),
    "math_train.jsonl": jsonl([math_row(i) for i in range(4, 9)]),
    "MATH.tar": tar_of([("MATH", None), ("MATH/train", None), ("MATH/train/algebra", None),
                        ("MATH/train/algebra/1.json", json.dumps(
                            {"problem": "1+1?", "level": "Level 1", "type": "Algebra",
                             "solution": "$\\boxed{2}$"}).encode()),
                        ("MATH/test/algebra/2.json", json.dumps(
                            {"problem": "2+2?", "level": "Level 1", "type": "Algebra",
                             "solution": "$\\boxed{4}$"}).encode())]),
}


def test_data_download(server, tmp_path, capsys):
    server.files = {f"/d/{k}": v for k, v in DATA_FILES.items()}
    server.drop |= {"/d/mbpp.jsonl", "/d/MATH.tar"}
    out = tmp_path / "data"
    for name in ("humaneval", "mbpp", "math"):
        download.main(["data", name, str(out), "--url", server.url + "/d/"])
    for name, body in DATA_FILES.items():
        assert (out / name).read_bytes() == body
    he = data.load_humaneval(out / "HumanEval.jsonl.gz")
    assert [p.meta["entry_point"] for p in he] == ["f0", "f1", "f2"]
    for split, ids in {"train": (601, 974), "test": (11, 510), "validation": (511, 600), "prompt": (1, 10)}.items():
        rows = [json.loads(line) for line in (out / f"mbpp_{split}.jsonl").read_text().splitlines()]
        assert [r["task_id"] for r in rows] == list(ids)
        assert len(data.load_mbpp(out / f"mbpp_{split}.jsonl")) == 2
    assert [p.reference for p in data.load_math(out / "MATH500.jsonl")] == ["0", "2", "4", "6"]
    assert len(data.load_math(out / "math_train.jsonl")) == 5
    assert [p.reference for p in data.load_math(out / "MATH" / "train")] == ["2"]
    assert [p.reference for p in data.load_math(out / "MATH" / "test")] == ["4"]
    assert "MATH500.jsonl (4)" in capsys.readouterr().out and not (out / ".MATH.extracting").exists()

    server.log.clear()  # again: nothing fetched
    download.main(["data", "math", str(out), "--url", server.url + "/d"])
    assert server.log == []


def test_data_download_errors(server, tmp_path):
    with pytest.raises(SystemExit, match=f"{server.url}/d/mbpp.jsonl: HTTP 404"):
        download.main(["data", "mbpp", str(tmp_path / "a"), "--url", server.url + "/d"])
    server.files = {f"/d/{k}": v for k, v in DATA_FILES.items()}
    server.files["/d/MATH500.jsonl"] = b"version https://git-lfs.github.com/spec/v1\noid sha256:35dc\nsize 446564\n"
    with pytest.raises(SystemExit, match="MATH500.jsonl sent a Git LFS pointer"):
        download.main(["data", "math", str(tmp_path / "b"), "--url", server.url + "/d"])
    assert not (tmp_path / "b" / "MATH500.jsonl").exists()


@pytest.mark.parametrize("members, message", [
    ([("MATH/../../evil.json", b"{}")], "points outside"),
    ([("/tmp/evil.json", b"{}")], "points outside"),
    ([("MATH/link", ("symlink", "/etc/passwd"))], "not a regular file"),
])
def test_tar_refuses_escapes(tmp_path, members, message):
    (tmp_path / "t.tar").write_bytes(tar_of([("MATH/ok.json", b"{}")] + members))
    with pytest.raises(download.DownloadError, match=message):
        download.extract_tar(tmp_path / "t.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.json").exists()


def test_clis(server, tmp_path, capsys):
    server.files = {f"/d/{k}": v for k, v in DATA_FILES.items()}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "download.py"), "data", "humaneval", str(tmp_path),
                        "--url", server.url + "/d"], capture_output=True, text=True)
    assert r.returncode == 0 and "humaneval: 3 problems" in r.stdout, r.stderr
    for argv, flags in ((["data", "--help"], ["--url", "MATH500.jsonl", "mbpp_train.jsonl"]),
                        (["model", "--help"], ["--endpoint", "--revision", "--hf-dir", "--dtype"]),
                        (["--help"], ["HF_TOKEN", "python download.py model", "python download.py data"])):
        with pytest.raises(SystemExit) as e:
            download.main(argv)
        out = capsys.readouterr().out
        assert e.value.code == 0 and all(f in out for f in flags), out
