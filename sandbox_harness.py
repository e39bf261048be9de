# score-sandbox harness: the program reward.sandbox_run runs in a child Python (`-I -S -c` this file's text),
# which reads its job (the program, the tests, the nonce) from stdin and writes the nonce to the verdict pipe
# only after every test ran to its end. What it defends and how: the comment above reward._HARNESS.
# reward.py reads this file when it is imported: copy the two together.
import ast, builtins, marshal, os, resource, sys
import collections, copy, functools, heapq, itertools, math, operator, random, string  # what tests import
import importlib  # importing it renames the frozen importlib modules: before the snapshot, not after

def main():
    raw = b""
    while chunk := os.read(0, 1 << 16):
        raw += chunk
    job = marshal.loads(raw)
    del raw
    nonce = job.pop("nonce").encode()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.path.extend(job["path"])
    for res, lim in ((resource.RLIMIT_CPU, job["cpu"]), (resource.RLIMIT_AS, job["mem"]),
                     (resource.RLIMIT_FSIZE, job["fsize"]), (resource.RLIMIT_NPROC, 0),
                     (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (lim, lim))
    # captured now: the program may rebind any global or builtin name afterwards
    _id, _len, _type, _callable, _iter, _int, _str, _builtins = id, len, type, callable, iter, int, str, builtins
    _BaseException, _ValueError, _PermissionError, _ImportError = (
        BaseException, ValueError, PermissionError, ImportError)
    _write, _exit, _compile, _exec, _module, _dictkeys, _dictvalues, _startswith = (
        os.write, os._exit, compile, exec, type(sys), dict.keys, dict.values, str.startswith)
    out_fd, home, streams = job["fd"], job["dir"], (sys.stdout, sys.stderr)

    # what the tests rely on, watched for changes: builtins, every module already loaded (the
    # common test imports among them), the classes those modules define, and sys.modules itself
    sys.modules.pop("_signal", None)  # signal handlers could race the checks: not importable
    watched = [(sys.modules, dict(sys.modules))]
    for m in list(sys.modules.values()):
        if _type(m) is _module and m is not sys and m.__name__ != "__main__":
            watched.append((m.__dict__, dict(m.__dict__)))
            for v in list(m.__dict__.values()):
                if isinstance(v, type) and getattr(v, "__module__", None) == m.__name__:
                    watched.append((v.__dict__, dict(v.__dict__)))
    builtin_names = frozenset(builtins.__dict__)
    missing = object()

    def intact():
        if _len(_builtins.__dict__) != _len(builtin_names):
            return False
        for live, saved in watched:
            for k, v in saved.items():
                if live.get(k, missing) is not v:
                    return False
        return True

    # values the tests may compare: built-in data only, so no __eq__ of the program's can answer
    atoms = frozenset(map(_id, (type(None), bool, int, float, complex, str, bytes, range)))
    seqs = frozenset(map(_id, (list, tuple, set, frozenset, collections.deque, type({}.keys()),
                               type({}.values()), type({}.items()))))
    maps = frozenset(map(_id, (dict, collections.Counter, collections.OrderedDict, collections.defaultdict)))

    def plain(x):
        stack, n = [x], 0
        while stack:
            v = stack.pop()
            t = _id(_type(v))
            n += 1
            if n > 1_000_000:
                return False
            if t in seqs:
                stack.extend(_iter(v))
            elif t in maps:
                stack.extend(_dictkeys(v))
                stack.extend(_dictvalues(v))
            elif t not in atoms:
                return False
        return True

    cheated = []

    def guard(fn):  # what the tests call instead of the program's function
        def call(*args, **kwargs):
            result = fn(*args, **kwargs)
            if not (plain(result) and plain(args) and plain(kwargs) and intact()):
                cheated.append(1)
                raise _ValueError("sandbox: a non-builtin value or a patched builtin/module")
            return result
        return call

    # the audit hook: what the program may not do (it cannot be removed once added)
    roots = tuple(p.rstrip("/") + "/" for p in sys.path + [sys.prefix, sys.base_prefix] if p.startswith("/"))
    devices = frozenset(("/dev/null", "/dev/urandom", "/dev/zero"))
    frame_attrs = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    denied_modules = frozenset(("ctypes", "_ctypes", "cffi", "_posixsubprocess", "_xxsubinterpreters",
                                "_testcapi", "_testinternalcapi", "signal", "_signal"))
    inside = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
              "os.rename": ((0, 1), (2, 3))}  # allowed within the working directory: (paths, dir_fds)
    denied = frozenset(("sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook",
                        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.fork", "os.forkpty",
                        "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile", "subprocess.Popen",
                        "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
                        "resource.prlimit", "os.chdir", "os.chmod", "os.chown", "os.link", "os.symlink",
                        "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
                        "mmap.__new__"))
    armed = [True]

    def at_home(path):  # relative (the working directory: chdir is denied) or under it, no ".."
        return _type(path) is _str and ".." not in path.split("/") and (
            not _startswith(path, "/") or path == home or _startswith(path, home + "/"))

    def hook(event, args):
        if not armed[0]:
            return
        if event == "open":  # builtin open (mode is a str) or os.open (mode None, flags)
            path, mode, flags = args
            if _type(path) is _int:  # an fd already open
                return
            if mode is None:
                writing = flags & 0o3103  # O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND
            else:
                writing = "w" in mode or "a" in mode or "x" in mode or "+" in mode
            if at_home(path) and not (mode is None and writing and not _startswith(path, "/")):
                return  # (os.open may name a dir_fd elsewhere: its relative writes are denied)
            if not writing and _type(path) is _str and ".." not in path.split("/") and (
                    path in devices or _startswith(path, roots)):
                return  # reading the standard library and site-packages
            raise _PermissionError("sandbox: open " + (path if _type(path) is _str else "?"))
        if event in inside:
            paths, dir_fds = inside[event]
            for i in paths:
                if not at_home(args[i]):
                    raise _PermissionError("sandbox: " + event)
            for i in dir_fds:
                if args[i] != -1 and args[i] is not None:
                    raise _PermissionError("sandbox: " + event + " with dir_fd")
            return
        if event == "sys._getframe":
            raise _ValueError("sandbox: no frames")  # ValueError: namedtuple and enum expect it
        if event == "object.__getattr__" and args[1] in frame_attrs or \
                event == "object.__setattr__" and args[1] == "__code__":
            raise _PermissionError("sandbox: " + event + " " + args[1])
        if event == "import" and args[0].partition(".")[0] in denied_modules:
            raise _ImportError("sandbox: import " + args[0])
        if event in denied or _startswith(event, ("socket.", "shutil.", "ctypes.", "winreg.")):
            raise _PermissionError("sandbox: " + event)

    sys.addaudithook(hook)
    program = sys.modules["__program__"] = _module("__program__")
    g = program.__dict__
    try:
        tests = _compile(job["tests"], "<tests>", "exec", ast.PyCF_ONLY_AST)
        imports = ast.Module([s for s in tests.body if _type(s) in (ast.Import, ast.ImportFrom)], [])
        _exec(_compile(job["program"], "<program>", "exec"), g)
        if not intact():
            raise _ValueError("sandbox: the program patched a builtin or a module")
        # the program's functions see what the tests import (MBPP's setup code: import math)
        _exec(_compile(imports, "<tests>", "exec"), scratch := {})
        for k, v in scratch.items():
            if not _startswith(k, "__"):
                g.setdefault(k, v)
        # the tests' own namespace: the program's names, minus those that shadow builtins, its
        # functions and classes behind guard()
        t = {"__name__": "__tests__", "__builtins__": _builtins}
        for k, v in list(g.items()):
            if k in builtin_names or _startswith(k, "__"):
                continue
            if _type(v) is _module or plain(v):  # type(): __class__ can lie
                t[k] = v
            elif _callable(v):
                t[k] = guard(v)
        _exec(_compile(tests, "<tests>", "exec"), t)
        passed = not cheated and intact()
    except _BaseException:  # failed asserts, errors, SystemExit, KeyboardInterrupt: all fail
        armed[0] = passed = False
        try:
            __import__("traceback").print_exc()
        except _BaseException:
            pass
    if passed:
        _write(out_fd, nonce)
    for stream in streams:  # os._exit skips flushing
        try:
            stream.flush()
        except _BaseException:
            pass
    _exit(0 if passed else 1)

if __name__ == "__main__":  # run by reward.sandbox_run as `python -I -S -c TEXT`; never imported
    main()
