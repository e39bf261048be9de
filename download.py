"""
Downloads: the only file that touches the network. Weights from the Hugging Face hub (then converted by
convert.py), and the data sets from their original public locations, in the form data.py reads.

    python download.py model Qwen/Qwen2.5-Math-1.5B-Instruct out/math/base   # OUT.hf (the raw files), then OUT
    python download.py data math data        # data/MATH500.jsonl, data/math_train.jsonl, data/MATH/
    python download.py data mbpp data        # data/mbpp.jsonl and its splits by task id
    python download.py data humaneval data   # data/HumanEval.jsonl.gz

A model: {endpoint}/ORG/NAME/resolve/{revision}/{file} with urllib: config.json, generation_config.json
and the tokenizer files if present, then model.safetensors or the shards that model.safetensors.index.json
lists. Each file is written as FILE.part and renamed when complete; an interrupted run resumes with HTTP
Range requests, and complete files are skipped. Sizes are checked against the server's and each
safetensors header against its file. Set HF_TOKEN for gated repositories (Llama: accept the license on
the model's page first) and HF_ENDPOINT (or --endpoint) for a mirror.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import ssl
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request

import convert
import data
from tokenizer import HF_TOKENIZER_FILES

HF_ENDPOINT = "https://huggingface.co"
RETRIES = 5        # failed attempts in a row (no byte received) before giving up
RETRY_WAIT = 1.0   # seconds before the first retry, doubled after each
PROGRESS_EVERY = 5.0  # seconds between progress lines of a long download


class DownloadError(RuntimeError):
    def __init__(self, msg, status=None):
        super().__init__(msg)
        self.status = status  # the HTTP status, if the server answered with an error


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def download(url, path, auth=None):
    """Fetch url into path, resumably. Bytes go to path.part; a later attempt (after a dropped connection,
    or in a later run) asks for the rest with 'Range: bytes=N-' and a server that answers 200 instead of 206
    restarts the file from 0. The size is checked against Content-Length / Content-Range, and path.part
    becomes path only when complete, so an existing path is complete and is not fetched again. Connection
    errors are retried with backoff; an HTTP error (404, 401, ...) raises DownloadError naming the URL.
    `auth` is an Authorization value sent to url only, not along redirects (HF sends LFS files to a CDN)."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part, name, total, failures = path + ".part", os.path.basename(path), None, 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        req = urllib.request.Request(url)
        if auth:
            req.add_unredirected_header("Authorization", auth)
        if have:
            req.add_header("Range", f"bytes={have}-")
        got = 0
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                length = r.headers.get("Content-Length")
                length = int(length) if length is not None else None
                if have and r.status == 206:  # "bytes START-END/TOTAL"
                    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("Content-Range", ""))
                    if not m or int(m[1]) != have:
                        raise DownloadError(f"{url}: asked for bytes {have}- and got Content-Range "
                                            f"{r.headers.get('Content-Range')!r}")
                    size = None if m[3] == "*" else int(m[3])
                else:  # 200: the whole file (a server that ignores Range included)
                    if have:
                        print(f"  {name}: the server ignored the Range request, starting over from byte 0")
                        have = 0
                    size = length
                if total is not None and size is not None and size != total:
                    os.remove(part)  # the file changed on the server: the bytes we have belong to another version
                    raise DownloadError(f"{url}: size mismatch: {_size(total)} ({total} bytes) at first, "
                                        f"now {size} bytes; removed {part}, run again to start over")
                total = size if size is not None else total
                t0 = last = time.time()
                with open(part, "ab" if have else "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        got += len(chunk)
                        if time.time() - last > PROGRESS_EVERY:  # a line every few seconds, not per chunk
                            last, done = time.time(), have + got
                            rate = got / max(last - t0, 1e-6)
                            left = f" of {_size(total)} ({100 * done / total:.0f}%)" if total else ""
                            eta = f", ETA {(total - done) / max(rate, 1):.0f} s" if total else ""
                            print(f"  {name}: {_size(done)}{left}, {_size(rate)}/s{eta}", flush=True)
                if length is not None and got < length:  # http.client returns b"" when the server hangs up early
                    raise ConnectionError(f"connection closed after {_size(have + got)} of {_size(total or 0)}")
                dt = time.time() - t0
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the range starts at or past the end: the .part is complete, or stale
                m = re.fullmatch(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
                if m and int(m[1]) == have:
                    total, dt = have, 0.0
                    break
                os.remove(part)
                continue
            if e.code < 500 and e.code != 429:
                hint = {401: " (private, gated or missing repository? set HF_TOKEN to a token with access)",
                        403: " (gated repository? accept its license on the website and set HF_TOKEN)"}
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint.get(e.code, '')}", e.code) from None
            err = e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError) as e:
            err = e
        else:
            break
        failures = 0 if got else failures + 1  # a dropped connection after progress resumes at once
        if failures > RETRIES:
            raise DownloadError(f"{url}: giving up after {RETRIES} retries: {err}")
        wait = RETRY_WAIT * 2 ** (failures - 1) if failures else 0
        print(f"  {name}: {err}; {_size(have + got)} kept, retrying in {wait:.0f} s", flush=True)
        time.sleep(wait)
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise DownloadError(f"{url}: size mismatch: the server announced {total} bytes, {part} has {size}")
    os.replace(part, path)
    print(f"  {name}: {_size(size)}" + (f" in {dt:.0f} s ({_size(size / dt)}/s)" if dt > 1 else ""), flush=True)
    return path


def check_safetensors(path):
    """A downloaded .safetensors is whole: its header parses and its tensors end where the file ends.
    A file that fails is removed (it would otherwise count as complete)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n, header = convert.read_safetensors_header(f, path, size)
    end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end != size:
        os.remove(path)
        raise DownloadError(f"{path}: size mismatch: its header describes {end} bytes, the file has {size}; removed, run again")


def hf_download(repo, hf_dir, endpoint=HF_ENDPOINT, revision="main", token=None):
    """Fetch a Hugging Face model repository (config, tokenizer files, safetensors weights) into hf_dir,
    from {endpoint}/{repo}/resolve/{revision}/{file}. Files already complete in hf_dir are skipped."""
    if not re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", repo):  # also keeps the URL inside {endpoint}/
        raise DownloadError(f"a model is a repository id ORG/NAME, got {repo!r}")
    base = f"{endpoint.rstrip('/')}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/"
    auth = f"Bearer {token}" if token else None

    def get(name, required=True):
        try:
            download(base + urllib.parse.quote(name), os.path.join(hf_dir, name), auth=auth)
            return True
        except DownloadError as e:
            if e.status == 404 and not required:
                return False
            raise DownloadError(str(e))

    print(f"downloading {repo} ({revision}) from {endpoint} into {hf_dir}")
    get("config.json")
    get("generation_config.json", required=False)
    have = {name for name in HF_TOKENIZER_FILES if get(name, required=False)}
    if not ({"tokenizer.json", "tokenizer.model"} & have or {"vocab.json", "merges.txt"} <= have):
        raise DownloadError(f"{base}: no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)")
    if get("model.safetensors.index.json", required=False):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        weight_map = convert.read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DownloadError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        for name in shards:  # the index names the files to write: keep them inside hf_dir
            if not re.fullmatch(r"[\w.-]+\.safetensors", name):
                raise DownloadError(f"{index}: unexpected shard name {name!r}")
    elif get("model.safetensors", required=False):
        shards = ["model.safetensors"]
    else:
        raise DownloadError(f"{base}: neither model.safetensors nor model.safetensors.index.json "
             "(only safetensors weights are read, not pytorch_model.bin)")
    for name in shards:
        get(name)
        check_safetensors(os.path.join(hf_dir, name))


# ---------------------------------------------------------------------------- data sets
# Each data set from its original public location, saved under the name in the left column.
# github.com/.../raw/... follows Git LFS (PRM800K's splits are LFS files; raw.githubusercontent.com
# would serve the pointer). `--url BASE` fetches BASE/<name> instead: a mirror, or a test's server.
# MATH.tar is where the MATH repository's README points; its tree is MATH/{train,test}/<subject>/<id>.json.
SOURCES = {
    "humaneval": {"HumanEval.jsonl.gz": "https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz"},
    "mbpp": {"mbpp.jsonl": "https://github.com/google-research/google-research/raw/master/mbpp/mbpp.jsonl"},
    "math": {  # MATH500 and the 12,000-problem training split of Lightman et al. (PRM800K), then the original MATH
        "MATH500.jsonl": "https://github.com/openai/prm800k/raw/main/prm800k/math_splits/test.jsonl",
        "math_train.jsonl": "https://github.com/openai/prm800k/raw/main/prm800k/math_splits/train.jsonl",
        "MATH.tar": "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar"},
}


def split_mbpp(path, out_dir):
    """mbpp.jsonl -> mbpp_{prompt,test,validation,train}.jsonl by task_id; {split: number of rows}."""
    rows = {name: [] for name in data.MBPP_SPLITS}
    for n, row in data.read_jsonl(path):
        for name, (lo, hi) in data.MBPP_SPLITS.items():
            if lo <= row.get("task_id", 0) <= hi:
                rows[name].append(json.dumps(row) + "\n")
    for name, lines in rows.items():
        out = os.path.join(out_dir, f"mbpp_{name}.jsonl")
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(out + ".tmp", out)
    return {name: len(lines) for name, lines in rows.items()}


def extract_tar(path, out_dir):
    """Extract a tar file's regular files and directories into out_dir. Refuses absolute paths, '..',
    links and devices (a tar may name any path, so nothing is trusted)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        for m in members:
            parts = m.name.replace("\\", "/").split("/")
            if m.name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise DownloadError(f"{path}: refusing member {m.name!r}, it points outside the directory")
            if not (m.isfile() or m.isdir()):
                raise DownloadError(f"{path}: refusing member {m.name!r}, not a regular file or directory")
        for m in members:
            target = os.path.join(out_dir, *m.name.replace("\\", "/").split("/"))
            if m.isdir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def fetch(name, out_dir, base_url=None):
    """Download data set `name` into out_dir (skipping complete files) and write what the readers take."""
    for file, url in SOURCES[name].items():
        url = f"{base_url.rstrip('/')}/{file}" if base_url else url
        path = os.path.join(out_dir, file)
        download(url, path)
        with open(path, "rb") as f:
            if f.read(40).startswith(b"version https://git-lfs.github.com/spec/"):
                os.remove(path)
                raise DownloadError(f"{url} sent a Git LFS pointer, not the file (removed {path}); use a URL that "
                                "serves LFS content (github.com/ORG/REPO/raw/...)")
    d = lambda f: os.path.join(out_dir, f)
    if name == "humaneval":
        print(f"humaneval: {len(data.load_humaneval(d('HumanEval.jsonl.gz')))} problems in {d('HumanEval.jsonl.gz')}")
    elif name == "mbpp":
        counts = split_mbpp(d("mbpp.jsonl"), out_dir)
        print("mbpp: " + ", ".join(f"{d(f'mbpp_{k}.jsonl')} ({n})" for k, n in counts.items()))
    else:
        if not os.path.isdir(d("MATH")):  # extract beside, then rename: an interrupted run leaves no half tree
            tmp = d(".MATH.extracting")
            shutil.rmtree(tmp, ignore_errors=True)
            extract_tar(d("MATH.tar"), tmp)
            if not os.path.isdir(os.path.join(tmp, "MATH")):
                raise DownloadError(f"{d('MATH.tar')}: expected a top-level MATH/ directory, found {os.listdir(tmp)}")
            os.replace(os.path.join(tmp, "MATH"), d("MATH"))
            shutil.rmtree(tmp)
        count = lambda sub: sum(f.endswith(".json") for _, _, fs in os.walk(d(f"MATH/{sub}")) for f in fs)
        print(f"math: {d('MATH500.jsonl')} ({len(data.load_math(d('MATH500.jsonl')))}), "
              f"{d('math_train.jsonl')} ({len(data.load_math(d('math_train.jsonl')))}), "
              f"{d('MATH/train')} ({count('train')}), {d('MATH/test')} ({count('test')})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, metavar="{model,data}")
    m = sub.add_parser("model", help="fetch a Hugging Face model repository, then convert it (convert.py)")
    m.add_argument("repo", metavar="ORG/NAME", help="the repository, e.g. Qwen/Qwen2.5-Math-1.5B-Instruct")
    m.add_argument("out", metavar="OUT_DIR", help="the converted checkpoint to write")
    m.add_argument("--hf-dir", metavar="DIR", help="where the raw HF files go (default: OUT_DIR.hf)")
    m.add_argument("--endpoint", default=os.environ.get("HF_ENDPOINT", HF_ENDPOINT),
                   help="the hub to download from (default: $HF_ENDPOINT, else %s)" % HF_ENDPOINT)
    m.add_argument("--revision", default="main", help="branch, tag or commit to download (default: main)")
    m.add_argument("--dtype", choices=convert.CLI_DTYPES, help="cast the weights (default: keep the checkpoint's dtype)")
    d = sub.add_parser("data", help="fetch a data set into DIR in the form data.py reads", epilog=DATA_FILES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("name", choices=sorted(SOURCES), metavar="NAME", help="the data set: " + ", ".join(sorted(SOURCES)))
    d.add_argument("dir", metavar="DIR", help="directory to write (created if needed)")
    d.add_argument("--url", metavar="BASE", help="fetch each file from BASE/<file name> instead of its "
                                                 "original location (a mirror, or a local server)")
    args = p.parse_args(argv)
    try:
        if args.what == "data":
            fetch(args.name, args.dir, args.url)
            return
        hf_dir = args.hf_dir or os.path.normpath(args.out) + ".hf"
        if os.path.abspath(hf_dir) == os.path.abspath(args.out):
            raise DownloadError(f"--hf-dir must differ from OUT_DIR ({args.out}): both hold a config.json")
        hf_download(args.repo, hf_dir, args.endpoint, args.revision, os.environ.get("HF_TOKEN"))
    except (DownloadError, data.DataError) as e:
        raise SystemExit(f"download.py: {e}") from None
    convert.convert(hf_dir, args.out, dtype=convert.CLI_DTYPES.get(args.dtype))


DATA_FILES = """what each writes into DIR:
  humaneval  HumanEval.jsonl.gz (164 problems; evaluation)
  mbpp       mbpp.jsonl (all 974) and its README's split by task_id: mbpp_train.jsonl (601-974),
             mbpp_test.jsonl (11-510), mbpp_validation.jsonl (511-600), mbpp_prompt.jsonl (1-10, few-shot)
  math       MATH500.jsonl (MATH500, the PRM800K test subset; evaluation), math_train.jsonl (the other
             12,000 MATH problems, PRM800K's training split), and the original MATH/train and
             MATH/test trees (7,500 + 5,000 per-problem JSON files) from MATH.tar"""

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line, not a traceback
        raise SystemExit("download.py: stopped by Ctrl-C (SIGINT); run the same command again: downloads resume where "
                         "they stopped") from None
