"""Run the real command-line tools many times without paying for `import torch` each time.

Every CLI case of tests/test_faults_cli.py is a separate process running `python train.py ...`
(or eval.py, `-m data.inspect`, ...). Starting a fresh interpreter costs ~3 s of CPU (torch's
import) before the tool reads its first argument; a hundred cases would cost minutes. So one
server process imports torch and the project's libraries once, then FORKS a child per case; the
child points fds 0/1/2 at /dev/null and two files, sets `sys.argv`, and runs the tool's file as
`__main__` (runpy), exactly as `python train.py ...` would run it from that point on. Its exit
status is the tool's: `sys.exit(main())`, or 1 with the traceback printed for an uncaught
exception, as the interpreter does. Forking is safe here because the server never runs a torch
operation (no OpenMP thread pool exists yet) and every child starts with OMP_NUM_THREADS=1.

`run_faults` runs a table of faults this way and judges each result (`judge_line`: the categories
of issue 15); tests/test_faults_cli.py holds the table.

Protocol (the server is `python tests/cli_forks.py`): the client writes one JSON line holding a
list of jobs {"id", "argv", "cwd", "out", "err", "env", "timeout", "pre", "after", "signal"}
(`pre`: Python run in the child first, to inject a fault such as a full disk; `after`: start
only once {"path": p} exists or {"job": id} has ended; `signal`: {"signum", "path" or "job"}
sent to the child once that holds); the server runs them `parallel` at a time and answers one
JSON line {"id", "rc": int or "timeout", "seconds", "pid"} per job, then {"done": true}.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the server


def _child(job: dict) -> None:
    """Runs in the forked child; never returns."""
    import atexit
    import runpy
    import signal
    import traceback
    code: object = 0
    try:
        os.chdir(job["cwd"])
        fds = [os.open(os.devnull, os.O_RDONLY),
               os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
               os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.update(job.get("env") or {})
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if job.get("pre"):
            exec(job["pre"], {"__name__": "__pre__"})
        argv = job["argv"]
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code & 0xFF)


def _ready(when: dict | None, done: set[str]) -> bool:
    """A job's condition: None, {"path": p} (p exists) or {"job": id} (that job has ended)."""
    return (when is None or ("path" in when and Path(when["path"]).exists())
            or ("job" in when and when["job"] in done))


def _run_batch(jobs: list[dict], parallel: int) -> None:
    pending, running, done = list(jobs), {}, set()
    while pending or running:
        for job in [j for j in pending if _ready(j.get("after"), done)][:parallel - len(running)]:
            pending.remove(job)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(job)
            running[pid] = (job, time.monotonic())
        for p, (job, t0) in list(running.items()):
            sig = job.get("signal")
            if sig and not sig.get("sent") and _ready(sig, done):
                os.kill(p, sig["signum"])
                sig["sent"] = True
            if time.monotonic() - t0 > job.get("timeout", 120):
                os.kill(p, 9)
        if not running and pending and not any(_ready(j.get("after"), done) for j in pending):
            for job in pending:  # waiting for something that can no longer happen
                print(json.dumps({"id": job["id"], "rc": "never started", "seconds": 0, "pid": 0}), flush=True)
            pending.clear()
        pid, status = os.waitpid(-1, os.WNOHANG) if running else (0, 0)
        if pid == 0:
            time.sleep(0.01)
            continue
        job, t0 = running.pop(pid)
        done.add(job["id"])
        rc = os.waitstatus_to_exitcode(status)
        rc = "timeout" if rc == -9 and time.monotonic() - t0 > job.get("timeout", 120) else rc
        print(json.dumps({"id": job["id"], "rc": rc, "seconds": round(time.monotonic() - t0, 2), "pid": pid}),
              flush=True)


def serve(parallel: int) -> None:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import importlib
    for name in ("torch", "torch._dynamo", "torch.distributed.checkpoint.state_dict", "torch.distributed.fsdp",
                 "train", "eval", "demo", "lora", "evaluation.generation", "evaluation.report", "evaluation.loss",
                 "evaluation.mc", "evaluation.ifeval", "data.quality", "data.teacher"):
        importlib.import_module(name)  # the point of the server: imported once (torch lazily imports a lot)
    for line in sys.stdin:
        _run_batch(json.loads(line), parallel)
        print(json.dumps({"done": True}), flush=True)


# ----------------------------------------------------------------------------- the client


class ForkRunner:
    """The pytest side: start the server once, then `run(jobs)` -> {id: exit status}."""

    def __init__(self, parallel: int = 2):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, __file__, str(parallel)], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, jobs: list[dict]) -> dict[str, dict]:
        self.proc.stdin.write(json.dumps(jobs) + "\n")
        self.proc.stdin.flush()
        out: dict[str, dict] = {}
        for line in self.proc.stdout:
            msg = json.loads(line)
            if msg.get("done"):
                return out
            out[msg["id"]] = msg
        raise RuntimeError(f"the fork server died (exit status {self.proc.wait()})")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ----------------------------------------------------------------------------- a table of faults


def tree_digest(path: Path) -> dict[str, str] | None:
    """{relative path: sha256} of every file under `path` (None when it does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def judge_line(case, ctx, rc, err: str, lost: list[str], left: list[str], present: list[str]) -> str:
    """The issue's category of one result: data loss > traceback > silent > unclear > OK.
    lost: files that existed before and were changed or removed; left: files made and left behind."""
    if lost:
        return "data loss"
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if rc == 0 or present:
        return "silent"
    lines = [line for line in err.splitlines() if "error:" in line]
    if rc != 2 or len(lines) != 1 or left:
        return "unclear"
    words = [w.format(pid=ctx.pid) for w in case.expect]
    if not all(any(alt in lines[0] for alt in w.split("|")) for w in words):
        return "unclear"
    if any(w in lines[0] for w in case.forbid):
        return "unclear"
    return "OK"


def run_faults(runner: ForkRunner, faults: list, ctx_for: Callable, logs: Path,
               root: Path = ROOT) -> dict[str, dict]:
    """Build, run (forked, two at a time) and judge every row; {name: result}."""
    jobs, before = [], {}
    for f in faults:
        c = ctx_for(f.name)
        argv = f.make(c)
        before[f.name] = tree_digest(c.tmp)
        jobs.append({"id": f.name, "argv": argv, "cwd": str(root), "out": str(logs / f"{f.name}.out"),
                     "err": str(logs / f"{f.name}.err"), "pre": f.pre, "timeout": 120})
    codes = runner.run(jobs)
    results = {}
    for f in faults:
        c = ctx_for(f.name)
        was, now = before[f.name], tree_digest(c.tmp)
        lost = sorted(k for k in was if now.get(k) != was[k]) if f.unchanged else []
        # the tokenized-data cache (data/cache.py) of valid input is meant to outlive a failed run:
        # the next run reuses it; it is never the user's file nor part of a run folder
        left = sorted(k for k in set(now) - set(was) if "/.cache/data/" not in f"/{k}") if f.unchanged else []
        present = [p for p in f.absent if (c.tmp / p).exists()]
        out, err = (logs / f"{f.name}.out").read_text(), (logs / f"{f.name}.err").read_text()
        rc = codes[f.name]["rc"]
        results[f.name] = {"rc": rc, "seconds": codes[f.name]["seconds"], "out": out, "err": err, "lost": lost,
                           "left": left, "present": present, "category": judge_line(f, c, rc, err, lost, left, present)}
    return results


def tally(results: dict[str, dict]) -> dict[str, int]:
    counts = collections.Counter(r["category"] for r in results.values())
    return {k: counts.get(k, 0) for k in ("OK", "traceback", "unclear", "silent", "data loss")}


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
