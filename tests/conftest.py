"""Shared test helpers: run(), the one way a test runs a script; in_background(), to overlap a module's processes with
its other tests; and the checks of what a refused run prints. Run the suite with: python -m pytest -q tests"""

import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The environment the scripts run in under test, taken once, as the tests start: offline (the Hub is never asked),
# unbuffered output. A process takes it from here, never from os.environ at the time: tests change that meanwhile
# (monkeypatch), while in_background's thread starts processes.
SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
              "TOKENIZERS_PARALLELISM": "false"}

# A process whose main() runs after `patch`: a fault put into the real code path at a chosen moment.
PATCHED = """import os, sys
sys.path.insert(0, {root!r})
sys.argv[0] = {path!r}
import cli, {module}
{patch}
cli.run({module}.main)
"""


def script_env(changes=None):
    """SCRIPT_ENV with `changes`: name -> value, or None to unset it."""
    env = {**SCRIPT_ENV, **(changes or {})}
    return {name: value for name, value in env.items() if value is not None}


def command(script, args=(), patch=None):
    """The command line that runs `script` (a file of the project, or a path) with `args` as a process; with `patch`
    (Python, run after the script is imported and before its main()), through PATCHED."""
    path = os.path.join(ROOT, script)
    if patch is None:
        return [sys.executable, path, *args]
    module = os.path.splitext(os.path.basename(path))[0]
    return [sys.executable, "-c", PATCHED.format(root=ROOT, path=path, module=module, patch=patch), *args]


def run(script, *args, cwd, env=None, stdin=None, process=False, patch=None, timeout=600):
    """Run one of the project's scripts from `cwd` with `args`, as `python script args` would. Returns a
    CompletedProcess: its args, returncode, stdout and stderr.

    In this process by default (an interpreter's start and imports cost seconds): its main() under cli.run, as its
    __main__ runs it, on one thread as the processes under test run (env OMP_NUM_THREADS=1); what it writes to file
    descriptors 1 and 2 is captured, its libraries' own output too; the working directory, sys.argv, sys.stdin,
    os.environ and torch's threads are as before once it returns. From the main thread only.
    As a process with process=True, or `patch` (see command): in SCRIPT_ENV, never os.environ, so in_background's
    thread may start it while tests change os.environ and the working directory.
    `env`: variables to set (None: to unset), in the process's environment or, here, for the run's length.
    `stdin`: the text it reads; here also a file object (a terminal's stand-in)."""
    if process or patch is not None:
        return subprocess.run(command(script, args, patch), cwd=cwd, env=script_env(env), capture_output=True,
                              text=True, timeout=timeout, input=stdin)
    return run_here(script, list(args), cwd, env or {}, stdin)


def run_here(script, args, cwd, env, stdin):
    """run(), in this process."""
    import torch

    import cli
    main = importlib.import_module(os.path.splitext(os.path.basename(script))[0]).main
    saved = os.getcwd(), sys.argv, sys.stdin, dict(os.environ), torch.get_num_threads()
    changes = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **env}
    try:
        os.chdir(cwd)
        sys.argv = [os.path.join(ROOT, script), *args]
        sys.stdin = io.StringIO(stdin or "") if stdin is None or isinstance(stdin, str) else stdin
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(1)
        with captured() as output:
            try:
                cli.run(main)
                code = 0
            except SystemExit as e:
                code = 0 if e.code is None else e.code
    finally:
        os.chdir(saved[0])
        sys.argv, sys.stdin = saved[1], saved[2]
        for name in set(os.environ) - set(saved[3]):
            del os.environ[name]
        for name, value in saved[3].items():
            if os.environ.get(name) != value:
                os.environ[name] = value
        torch.set_num_threads(saved[4])
    return subprocess.CompletedProcess([script, *args], code, *output)


@contextlib.contextmanager
def captured():
    """What is written meanwhile to file descriptors 1 and 2, where sys.stdout and sys.stderr write too: a test that
    counts a run's lines must see a library's as well as Python's. Yields a list, [stdout, stderr] once done."""
    sys.stdout.flush()
    sys.stderr.flush()
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    fds = [os.dup(1), os.dup(2)]
    streams = sys.stdout, sys.stderr
    output = []
    try:
        for fd, f in zip((1, 2), files):
            os.dup2(f.fileno(), fd)
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                                                   errors="backslashreplace", write_through=True) for fd in (1, 2))
        yield output
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        for fd, saved in zip((1, 2), fds):
            os.dup2(saved, fd)
            os.close(saved)
        for f in files:
            f.seek(0)
            output.append(f.read().decode("utf-8", "replace"))
            f.close()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny GPT-2 (base/) fine-tuned for 6 steps in out/, for the tests of what train.py saves, evaluate.py and
    chat.py. BLOCK_SIZE=64 is below the model's context of 256 and below the longest dialogues, so evaluate.py must
    take the run's block size from OUT_DIR/config.json to score what training scored. Its directory: only
    test_evaluate's real evaluate.py writes there (its report); the other tests read it, or copy it first."""
    from tiny import save_tiny_gpt2, synthetic, write_split
    d = tmp_path_factory.mktemp("run")
    save_tiny_gpt2(str(d / "base"))
    write_split(d, synthetic(32, seed=1), synthetic(8, seed=2, min_turns=2))
    p = run("train.py", "--device=cpu", "--model=base", "--block_size=64", "--batch_size=4", "--max_steps=6",
            "--eval_interval=2", "--learning_rate=1e-3", "--warmup_steps=1", "--log_interval=1", cwd=d)
    assert p.returncode == 0, p.stderr
    return d


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


@contextlib.contextmanager
def in_background(request, jobs, workers=1):
    """A module's process-bound work, run in a thread of its own while the module's other tests run in this process:
    a real script's run is mostly its own process's, so on two cores the two overlap. `jobs`: name -> (function,
    *args), run in that order, `workers` at a time, each only if a selected test has that name or uses a fixture of
    that name. Yields name -> Future, whose result() the test takes. For a module-scoped autouse fixture; the tests that
    take the results go late in the file, so that the work is done when they come. The functions must not use this
    process's working directory, sys.argv or os.environ, which the tests in this process change meanwhile: absolute
    paths, and run(..., process=True), which takes SCRIPT_ENV."""
    selected = {name for i in request.session.items if getattr(i, "module", None) is request.module
                for name in (getattr(i, "originalname", i.name), *getattr(i, "fixturenames", ()))}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield {name: pool.submit(*job) for name, job in jobs.items() if name in selected}


# The trained speaker's one reply in `replied`'s dialogues: a tiny model learns it in a few dozen steps, so a test can
# tell a reply that stops at its turn's end from one that runs on.
REPLY = "Fine thanks."


def replied(n, seed):
    """n two-speaker dialogues (Alex, then Bob, 2 to 6 turns) in which Bob always says REPLY."""
    from tiny import synthetic
    return [[(s, REPLY if s == "Bob" else t) for s, t in d]
            for d in synthetic(n, seed=seed, min_turns=2, max_turns=6, speakers=["Alex", "Bob"])]


@pytest.fixture(scope="session")
def replying(tmp_path_factory):
    """Tiny models trained to answer REPLY as Bob (TRAIN_SPEAKERS=['Bob'], greedy TEMPERATURE=0 saved in their
    generation settings): {"speaker": a GPT-2 in the speaker format, "chat_template": a Llama in its ChatML template},
    each the run's directory (its model: out/best). For the tests of what other tools make of a run's files. The
    Llama's tokenizer adds no BOS itself (its template writes it), as Qwen's: one llama.cpp's converter knows."""
    from tiny import save_tiny_gpt2, save_tiny_llama, write_split
    runs = {}
    for fmt, save in (("speaker", save_tiny_gpt2), ("chat_template", lambda p: save_tiny_llama(p, add_bos=False))):
        d = tmp_path_factory.mktemp(fmt)
        save(str(d / "base"))
        write_split(d, replied(48, 1), replied(8, 2))
        p = run("train.py", *train_args("base", f"--format={fmt}", "--train_speakers=['Bob']", "--temperature=0",
                                        "--block_size=64", "--batch_size=8", "--max_steps=30", "--learning_rate=1e-2",
                                        "--eval_interval=0", "--max_new_tokens=12"), cwd=d)
        assert p.returncode == 0, p.stderr
        runs[fmt] = d
    return runs
