"""A Python program run as a child process and measured: its wall time and its own peak resident memory. The one way
the benchmarks (bench_scale.py, bench_loss.py) and the tests that bound a script's memory get a child's figures.
Imports no torch: the process that starts the child stays small."""

import json
import os
import subprocess
import sys

from cli import UserError

# Linux starts a process's peak resident size at its parent's (it carries across fork and exec), and the parent here
# may hold torch, a tokenizer or a test session: so the program is started by this small launcher, which reports
# that program's own peak (os.wait4 gives one child's rusage; RUSAGE_CHILDREN is a max over every child) and wall
# time. Its floor: the launcher's own ~10 MB.
LAUNCHER = """import json, os, sys, time
t = time.perf_counter()
pid = os.posix_spawn(sys.executable, [sys.executable] + sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"s": time.perf_counter() - t, "rss_kb": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}, f)
"""


def measure(argv, cwd, log, env=None):
    """Run `python argv...` from cwd, its stdout and stderr to log.out and log.err. `env`: the whole environment
    (default: this one, offline: the models are local, ask no Hub). Returns {"s": its wall time, "rss_mb": its own
    peak RSS, "rc": its exit code, "stdout", "stderr": what it printed}."""
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        subprocess.run([sys.executable, "-c", LAUNCHER, log + ".json", *argv], cwd=cwd, stdout=out, stderr=err,
                       env=env)
    try:
        with open(log + ".json") as f:
            r = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"could not run {' '.join(argv)[:200]} (see {log}.err)") from None
    with open(log + ".out") as out, open(log + ".err") as err:
        # ru_maxrss is in KB on Linux, in bytes on macOS
        rss_mb = r["rss_kb"] / (2 ** 20 if sys.platform == "darwin" else 1024)
        return {"s": r["s"], "rss_mb": rss_mb, "rc": r["rc"], "stdout": out.read(), "stderr": err.read()}


def last_line(text):
    """The last line a child printed that is not blank: where its error is."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
