"""Shared test helpers. Run the suite with: python -m pytest -q tests"""

import contextlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def script_env(extra=None):
    """The environment the scripts run in under test: offline (the Hub is never asked), unbuffered output."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", **(extra or {})}


def run_script(script, *args, cwd, env=None, timeout=600, stdin=None):
    """Run one of the pipeline's scripts as a user would, from `cwd`; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=script_env(env),
                          capture_output=True, text=True, timeout=timeout, input=stdin)


def run_script_env(env, script, *args, cwd, timeout=600, stdin=None):
    """run_script with `env` the whole environment, made beforehand (script_env): for in_background's thread, as the
    tests in this process change os.environ meanwhile."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, input=stdin)


@pytest.fixture
def script():
    return run_script


def train_args(model, *extra):
    """train.py's arguments for a short offline run of `model` (a directory from tiny.py) into out/."""
    return [f"--model={model}", "--device=cpu", "--out_dir=out", "--learning_rate=1e-3", "--warmup_steps=2", *extra]


def one_error_line(p):
    """The one line a refused run prints: exit code 2, no traceback, nothing else on stderr. Returns the line."""
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def last_error_line(p):
    """The `error: ...` line a failed run ends with (after any progress bar): exit code 2, no traceback, one such
    line on a line of its own."""
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), p.stderr
    assert sum("error:" in line for line in lines) == 1, p.stderr
    return lines[-1]


def call_main(main):
    """A script's main() under cli.run, as its __main__ runs it (no interpreter start-up), on one thread as the
    subprocesses run (ENV): the same arithmetic as theirs. Returns its exit code."""
    import torch

    import cli
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli.run(main)
        return 0
    except SystemExit as e:
        return e.code
    finally:
        torch.set_num_threads(threads)


def in_process(main, cwd, args, monkeypatch, capfd):
    """call_main from `cwd` with `args`, capturing the file descriptors. CompletedProcess-like."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["script.py", *args])
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # later subprocesses would warn about the fork
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else pick_device would set the threads from the cores
    capfd.readouterr()
    code = call_main(main)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def run_main(main, cwd, args, stdin=""):
    """in_process for a module-scoped fixture, which can have neither monkeypatch nor capfd: main() under cli.run
    from `cwd`, on one thread, reading `stdin`. Captures what Python writes to stdout and stderr (print, the progress
    bar, cli's error line), which is all the tests read. CompletedProcess-like."""
    import io
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(cwd)
        mp.setattr(sys, "argv", [f"{main.__module__}.py", *args])
        mp.setattr(sys, "stdin", io.StringIO(stdin))
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("OMP_NUM_THREADS", "1")
        code = call_main(main)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def patched_train(tmp_path, name, patch):
    """A script that runs train.py's main after `patch` (Python, with os, checkpoints, cli, modeling, step and train
    imported): a fault put into the real code path at a chosen moment."""
    script = tmp_path / name
    script.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\n"
                      f"sys.argv[0] = {os.path.join(ROOT, 'train.py')!r}\n"
                      f"import checkpoints, cli, modeling, step, train\n{patch}\ncli.run(train.main)\n")
    return str(script)


@contextlib.contextmanager
def in_background(request, jobs, workers=1):
    """A module's process-bound work, run in a thread of its own while the module's other tests run in this process:
    a real script's run is mostly its own process's, so on two cores the two overlap. `jobs`: name -> (function,
    *args), run in that order, `workers` at a time, each only if a selected test has that name or uses a fixture of
    that name. Yields name -> Future, whose result() the test takes. For a module-scoped autouse fixture; the tests that
    take the results go late in the file, so that the work is done when they come. The functions must not use this
    process's working directory, sys.argv or os.environ, which the tests in this process change meanwhile: absolute
    paths, and an environment made before (run_script_env)."""
    selected = {name for i in request.session.items if getattr(i, "module", None) is request.module
                for name in (getattr(i, "originalname", i.name), *getattr(i, "fixturenames", ()))}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield {name: pool.submit(*job) for name, job in jobs.items() if name in selected}
