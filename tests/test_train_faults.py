"""train.py end to end against the faults a long training run meets, offline, with a tiny GPT-2 from tiny.py: SIGKILLs
at random moments and in the middle of checkpoint writes, Ctrl-C and SIGTERM, damaged checkpoints, checkpoints
holding a pickle that would run code, a non-finite loss, an OUT_DIR that takes no writes, and a disk that fills up
during a save. Whatever happens, a resumed run ends with the weights of an uninterrupted one, and nothing
half-written or unsafe is ever loaded. (evaluate.py's refusal of a damaged model is in test_evaluate.py.)

Run: .venv/bin/python -m pytest -q tests/test_train_faults.py
"""

import hashlib
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import time
from concurrent import futures

import pytest
import torch

import checkpoints
from conftest import command, in_background, last_error_line, run, script_env, train_args
from tiny import curve, max_diff, save_tiny_gpt2, synthetic, weights, write_split

# ---------------------------------------------------------------------------------------------------------------------
# one run's settings, and the uninterrupted run every faulty one must end up equal to

DATA = (synthetic(12, seed=5, max_turns=4), synthetic(4, seed=6))  # 10 blocks of 32: 5 steps per epoch
STEPS = 24
ENV = {"OMP_NUM_THREADS": "1"}  # one thread: the same arithmetic in every process, and no fight over the cores


# a checkpoint every step, two kept: many writes and many deletions to be killed in
FAULT_ARGS = ["--block_size=32", "--batch_size=2", f"--max_steps={STEPS}", "--checkpoint_interval=1",
              "--keep_checkpoints=2", "--eval_interval=0", "--log_interval=1"]


def fault_args(model, *extra):
    return train_args(model, *FAULT_ARGS, *extra)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # dropout, so that a resume must also restore the random state to give the same weights
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("models") / "tiny"), dropout=0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("reference")
    write_split(d, *DATA)
    p = run("train.py", *fault_args(model), cwd=d)  # in this process, on one thread: the arithmetic of the processes
    assert p.returncode == 0, p.stderr
    return d / "out"


@pytest.fixture(scope="module", autouse=True)
def processes(request, tmp_path_factory, model):
    """The runs this module kills and signals: real processes, started one after another in a thread from the
    module's start while its other tests run in this process. Their tests, last in the file, check them. test name ->
    Future."""
    d = tmp_path_factory.mktemp
    jobs = {"test_ctrl_c_finishes_the_step_and_resumes_exactly": (signalled_run, d("ctrl"), model, "SIGINT", 1, 7),
            "test_a_second_sigterm_stops_at_once": (signalled_run, d("term"), model, "SIGTERM", 2, 3),
            "test_sigkill_at_random_moments": (sigkill_starts, d("kill"), model)}
    with in_background(request, jobs) as started:
        yield started


def ckpt(out, step):
    return out / "checkpoints" / f"step-{step:08d}"


def assert_same_run(out, reference):
    assert max_diff(weights(out / "final"), weights(reference / "final")) < 1e-6
    assert max_diff(weights(out / "best"), weights(reference / "best")) < 1e-6
    assert curve(out) == pytest.approx(curve(reference), rel=1e-5)
    assert sorted(os.listdir(out / "checkpoints")) == sorted(os.listdir(reference / "checkpoints"))


def intact(d):
    """Whether directory d holds exactly the files its manifest.json lists, each of the recorded size and sha256.
    Checked here independently of checkpoints.check_manifest, which is under test."""
    try:
        with open(d / "manifest.json") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if set(os.listdir(d)) != {*manifest, "manifest.json"}:
        return False
    return all((d / name).stat().st_size == m["size"] and
               hashlib.sha256((d / name).read_bytes()).hexdigest() == m["sha256"] for name, m in manifest.items())


def refresh_manifest(d, name):
    """Record file `name` in d's manifest as it is now: damage the manifest cannot see."""
    with open(d / "manifest.json") as f:
        manifest = json.load(f)
    data = (d / name).read_bytes()
    manifest[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(manifest))


def crashed_copy(reference, d, last=STEPS):
    """In d: the data and a copy of the reference run as a kill right after its step-`last` checkpoint left it."""
    write_split(d, *DATA)
    shutil.copytree(reference, d / "out")
    shutil.rmtree(d / "out" / "final")
    for step in range(last + 1, STEPS + 1):
        shutil.rmtree(ckpt(d / "out", step))
    return d / "out"


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL at random moments and during checkpoint writes

def new_entries(path, before, prefix):
    return [n for n in (os.listdir(path) if path.is_dir() else []) if n.startswith(prefix) and n not in before]


# SIGKILL from inside the writer: checkpoints.atomic_dir calls before_rename once a directory's files are written and
# before it is renamed into place. The k-th such write whose temp name starts with PREFIX kills the process there.
KILL_IN_WRITE = """
import signal
import checkpoints
writes = [0]

def kill_in_write(tmp):
    if os.path.basename(tmp).startswith({prefix!r}):
        writes[0] += 1
        if writes[0] == {k}:
            os.kill(os.getpid(), signal.SIGKILL)

checkpoints.before_rename = kill_in_write
"""


def start_train(tmp_path, n, kind, k, model, log):
    """Start n of the run: killed from inside its k-th checkpoint write ("write") or the write of final/ ("final"),
    or a plain train.py (killed from outside at a random moment, or left to finish)."""
    args = [*fault_args(model), *(["--resume=True"] if n else [])]
    patch = None
    if kind in ("write", "final"):
        prefix, k = (".tmp-step-", k) if kind == "write" else (".tmp-final-", 1)
        patch = KILL_IN_WRITE.format(prefix=prefix, k=k)
    return subprocess.Popen(command("train.py", args, patch), cwd=tmp_path, env=script_env(ENV), stdout=log,
                            stderr=subprocess.STDOUT)


def sigkill_starts(tmp_path, model):
    """The starts of one run in tmp_path, each killed as the plan says and checked at its end. Returns tmp_path, the
    kills and what each start printed."""
    write_split(tmp_path, *DATA)
    out, ckpts = tmp_path / "out", tmp_path / "out" / "checkpoints"
    rng = random.Random(7)
    # How each start is killed: "write" = inside the k-th checkpoint write it starts (k random, 1 for the very first
    # start, so that a start is killed before any checkpoint is complete); "random" = after a random delay once set
    # up; "final" = inside the write of final/. The start after the last kill runs to the end.
    plan = ["write", "random", "write", "random", "write", "random", "final", None]
    kills, starts = [], []
    for n, kind in enumerate(plan):
        before_ckpts = set(os.listdir(ckpts)) if ckpts.is_dir() else set()
        log_path = tmp_path / f"start-{n}.log"
        k = 1 if n == 0 else rng.randint(1, 3)
        delay = rng.uniform(0, 0.5)
        with open(log_path, "w") as log:
            proc = start_train(tmp_path, n, kind, k, model, log)
        set_up, deadline = None, time.time() + 120
        while kind == "random" and proc.poll() is None and time.time() < deadline:
            if set_up is None and re.search(r"^model: ", log_path.read_text(), re.M):
                set_up = time.time()
            # at most two new checkpoints per start, so that the run outlasts the plan however fast it goes
            if (set_up and time.time() > set_up + delay) or len(new_entries(ckpts, before_ckpts, "step-")) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait(timeout=120)
        starts.append(log_path.read_text())
        if kind is None:
            assert proc.returncode == 0, starts[-1]
            break
        assert proc.returncode == -signal.SIGKILL, f"start {n} ({kind}) ended before its kill:\n{starts[-1]}"
        steps = sorted(s for s in os.listdir(ckpts) if s.startswith("step-")) if ckpts.is_dir() else []
        # renamed into place only when complete: a kill never leaves a step-* directory half-written or half-deleted
        assert all(intact(ckpts / s) for s in steps), (kind, steps)
        if (out / "final").exists():
            assert intact(out / "final")
        kills.append({"kind": kind, "complete": steps,
                      "in_write": bool(new_entries(ckpts, before_ckpts, ".tmp-step-"))})
    return tmp_path, kills, starts


# test_sigkill_at_random_moments, at the end of the file, checks them: they run while the tests before it do


# ---------------------------------------------------------------------------------------------------------------------
# damaged checkpoints are reported and passed over; a crafted pickle never runs

class Payload:
    """Unpickling this runs a shell command, as a malicious state.pt or pytorch_model.bin would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def evil(tmp_path_factory):
    """A torch.save file whose loading runs code (creates the returned marker), checked live here; one per test."""
    d = tmp_path_factory.mktemp("evil")
    marker, path = d / "MARKER", d / "evil.pt"
    torch.save({"step": STEPS, "optimizer": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the unsafe way: the payload must really run, or the tests prove nothing
    assert marker.exists()
    marker.unlink()
    return path.read_bytes(), marker


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: torch.load itself would load it without complaint
    path.write_bytes(bytes(data))


def put_pickle(d, evil, name="state.pt", refresh=True):
    (d / name).write_bytes(evil[0])
    if refresh:  # the manifest matches: only loading with weights_only stands in the way
        refresh_manifest(d, name)


DAMAGE = {  # case -> (what to do to the newest checkpoint, what the message must say)
    "truncated_model": (lambda d, evil: truncate(d / "model.safetensors"), r"model.safetensors is .* \(truncated\?\)"),
    "flipped_byte_in_state": (lambda d, evil: flip_byte(d / "state.pt"), "state.pt does not match its sha256"),
    "no_manifest": (lambda d, evil: (d / "manifest.json").unlink(), "no manifest.json"),
    "pickle_matching_manifest": (put_pickle, r"state.pt cannot be loaded safely \(UnpicklingError\)"),
    "pickle_stale_manifest": (lambda d, evil: put_pickle(d, evil, refresh=False), "state.pt is [0-9,]+ bytes, the"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_is_skipped(case, tmp_path, model, reference, evil):
    out = crashed_copy(reference, tmp_path)
    damage, message = DAMAGE[case]
    damage(ckpt(out, STEPS), evil)
    p = run("train.py", *fault_args(model), "--resume=True", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert not evil[1].exists(), "unpickling state.pt ran code"
    assert re.search(rf"skipping damaged checkpoint \S*step-{STEPS:08d}: {message}", p.stdout), p.stdout
    assert re.search(rf"resuming from \S*step-{STEPS - 1:08d} \(step {STEPS - 1}\)", p.stdout), p.stdout
    assert intact(ckpt(out, STEPS))  # written again
    assert_same_run(out, reference)


def test_no_intact_checkpoint_starts_again(tmp_path, monkeypatch, model, reference):
    out = crashed_copy(reference, tmp_path)
    truncate(ckpt(out, STEPS) / "model.safetensors")
    flip_byte(ckpt(out, STEPS - 1) / "state.pt")
    # the new run's own checkpoints must outlive the damaged newer ones: a crash after step 3 resumes from step 3
    real_save = checkpoints.save

    def save_then_crash(out_dir, model, tokenizer, state, keep):
        real_save(out_dir, model, tokenizer, state, keep)
        if state["step"] == 3:
            raise KeyboardInterrupt  # a Ctrl-C right after the step-3 checkpoint
    monkeypatch.setattr(checkpoints, "save", save_then_crash)
    p = run("train.py", *fault_args(model), "--resume=True", cwd=tmp_path)
    assert p.returncode == 130, p.stderr
    assert "no intact checkpoint in out: starting the run again" in p.stdout
    assert len(re.findall("skipping damaged checkpoint", p.stdout)) == 2
    assert intact(ckpt(out, 3))

    monkeypatch.setattr(checkpoints, "save", real_save)
    p = run("train.py", *fault_args(model), "--resume=True", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert re.search(r"resuming from \S*step-00000003 \(step 3\)", p.stdout), p.stdout
    assert_same_run(out, reference)


# ---------------------------------------------------------------------------------------------------------------------
# a non-finite loss

def test_non_finite_loss_stops_the_run(tmp_path, model):
    write_split(tmp_path, *DATA)
    # lr 1e6, reached after a warmup so that checkpoints come first, throws the weights beyond float32's range
    args = fault_args(model, "--learning_rate=1e6", "--warmup_steps=4")
    p = run("train.py", *args, cwd=tmp_path)
    line = last_error_line(p)
    m = re.fullmatch(r"error: step (\d+): the loss is (nan|inf|-inf); stopped before the update\. The last good "
                     r"checkpoint is (\S+); try a lower LEARNING_RATE", line)
    assert m, line
    step, last = int(m.group(1)), tmp_path / m.group(3)
    assert step > 1 and last == ckpt(tmp_path / "out", step - 1)
    assert intact(last)
    assert all(torch.isfinite(t).all() for t in weights(last).values())  # a good checkpoint: finite weights
    assert not (tmp_path / "out" / "final").exists()

    # the same settings resume from it and meet the same loss at the same step: it loaded, and nothing was lost
    p = run("train.py", *args, "--resume=True", cwd=tmp_path)
    assert f"resuming from {os.path.join('out', 'checkpoints', last.name)} (step {step - 1})" in p.stdout
    assert last_error_line(p) == line
    assert intact(last)


# ---------------------------------------------------------------------------------------------------------------------
# OUT_DIR takes no writes (a disk that fills up during a save: at the end of the file)

@pytest.mark.parametrize("out_dir", ["blocker", "blocker/out"])
def test_out_dir_cannot_be_made(out_dir, tmp_path, model):
    # a regular file where OUT_DIR or a folder above it would be: refused even as root, which chmod does not stop
    write_split(tmp_path, *DATA)
    (tmp_path / "blocker").write_text("not a directory")
    p = run("train.py", *fault_args(model, f"--out_dir={out_dir}"), cwd=tmp_path)
    line = last_error_line(p)
    assert len(p.stderr.splitlines()) == 1
    assert f"OUT_DIR {out_dir!r}" in line, line
    assert "step 0" not in p.stdout  # stopped before training
    assert sorted(os.listdir(tmp_path)) == ["blocker", "train_data.txt", "val_data.txt"]
    assert (tmp_path / "blocker").read_text() == "not a directory"


def test_out_dir_read_only(tmp_path, model):
    write_split(tmp_path, *DATA)
    (tmp_path / "out").mkdir(mode=0o500)
    if os.access(tmp_path / "out", os.W_OK):
        pytest.skip("chmod 0o500 does not stop this user's writes (root); test_out_dir_cannot_be_made covers root")
    try:
        p = run("train.py", *fault_args(model), cwd=tmp_path)
    finally:
        (tmp_path / "out").chmod(0o700)
    line = last_error_line(p)
    assert len(p.stderr.splitlines()) == 1 and "'out' is not writable" in line, line
    assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: the first finishes the step and writes a checkpoint; a second stops at once

SIGNALLED = """
import signal
import step
calls, train_step = [0], step.train_step

def signalled(*args, **kwargs):
    calls[0] += 1
    for _ in range({times} if calls[0] == {at} else 0):
        os.kill(os.getpid(), signal.{sig})
    return train_step(*args, **kwargs)

step.train_step = signalled
"""


def signalled_run(tmp_path, model, sig, times, at):
    """A run in tmp_path sent signal `sig` `times` times as its step `at` begins; checkpoints only at epoch ends
    (steps 5, 10, ...). Returns tmp_path and the CompletedProcess."""
    write_split(tmp_path, *DATA)
    return tmp_path, run("train.py", *fault_args(model, "--checkpoint_interval=0"), cwd=tmp_path, env=ENV,
                         patch=SIGNALLED.format(times=times, at=at, sig=sig), timeout=300)


def test_ctrl_c_finishes_the_step_and_resumes_exactly(processes, reference):
    tmp_path, p = processes["test_ctrl_c_finishes_the_step_and_resumes_exactly"].result()  # SIGINT as step 7 begins
    assert p.returncode == 130, p.stderr
    m = re.search(r"^interrupted \(SIGINT\) after step 7: checkpoint out/checkpoints/step-00000007\. Resume with: "
                  r"python (train\.py .*--resume=True)$", p.stderr, re.M)
    assert m, p.stderr
    assert "Traceback" not in p.stderr
    assert intact(ckpt(tmp_path / "out", 7))
    # the command it gives, as given (its arguments to train.py's main() here), continues the run to the weights of one
    # never stopped
    resumed = run("train.py", *shlex.split(m.group(1))[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from out/checkpoints/step-00000007 (step 7)" in resumed.stdout
    assert max_diff(weights(tmp_path / "out" / "final"), weights(reference / "final")) < 1e-6
    assert curve(tmp_path / "out") == pytest.approx(curve(reference), rel=1e-5)


def test_a_second_sigterm_stops_at_once(processes):
    tmp_path, p = processes["test_a_second_sigterm_stops_at_once"].result()  # two SIGTERMs as step 3 begins
    assert p.returncode == 130, p.stderr
    assert "SIGTERM: stopping after this step" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.rstrip().endswith("interrupted")
    assert not (tmp_path / "out" / "checkpoints").exists()  # the step was not finished, and nothing was written


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL at random moments and during checkpoint writes: the checks of sigkill_starts' run, last in the file so that
# its starts run while the tests before it do

def test_sigkill_at_random_moments(processes, reference):
    tmp_path, kills, starts = processes["test_sigkill_at_random_moments"].result()
    out, ckpts = tmp_path / "out", tmp_path / "out" / "checkpoints"
    assert len(kills) >= 5
    # every "write" kill landed while a checkpoint was half-written (its temp directory was left behind)
    assert all(k["in_write"] for k in kills if k["kind"] == "write"), kills
    assert not kills[0]["complete"]  # the first start died before its first checkpoint was complete
    for kill, log in zip(kills, starts[1:]):
        assert "skipping damaged checkpoint" not in log, log
        resumed = re.findall(r"resuming from (\S+) \(step (\d+)\)", log)
        if kill["complete"]:
            # the newest checkpoint complete when the previous start died: never a half-written one
            assert len(resumed) == 1 and os.path.basename(resumed[0][0]) == kill["complete"][-1], (kill, log)
            assert int(resumed[0][1]) == int(kill["complete"][-1][5:])
        else:
            assert not resumed, log  # nothing complete yet: --resume=True starts the run from the beginning
    assert "resuming from" in starts[-1] and f"(step {STEPS})" in starts[-1]  # killed while writing final/
    assert not [n for d in (out, ckpts) for n in os.listdir(d) if n.startswith(".tmp-")]  # leftovers cleared
    assert_same_run(out, reference)


# ---------------------------------------------------------------------------------------------------------------------
# the disk fills up during a save

# A full disk, for real: RLIMIT_FSIZE makes the kernel fail any write past the limit (EFBIG) inside the libraries'
# own writers, as ENOSPC would; root is bound by it too. model.safetensors is ~6.5 MB, state.pt ~13 MB. The limit
# holds for this whole process while it is set, and a process started meanwhile would inherit it: so this test comes
# last, once the processes of `processes` are done.
@pytest.mark.parametrize("limit_mb, fails", [(1, "model.safetensors"), (9, "state.pt")])
def test_disk_full_during_a_checkpoint(limit_mb, fails, tmp_path, monkeypatch, model, reference, processes):
    futures.wait(processes.values())  # done by now, unless a -k left out the tests that wait for them
    out = crashed_copy(reference, tmp_path, last=STEPS - 1)
    sizes = {f.name: f.stat().st_size for f in ckpt(reference, STEPS).iterdir()}
    over = sorted(f for f, size in sizes.items() if size > limit_mb << 20)
    assert fails in over and (fails == "model.safetensors" or over == [fails]), sizes  # model.safetensors goes first
    real_save = checkpoints.save

    def save_on_a_full_disk(*args):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_mb << 20, hard))
        try:
            real_save(*args)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    monkeypatch.setattr(checkpoints, "save", save_on_a_full_disk)
    p = run("train.py", *fault_args(model), "--resume=True", cwd=tmp_path)
    line = last_error_line(p)
    assert f"could not write out/checkpoints/step-{STEPS:08d}" in line and "intact" in line, line
    assert sorted(os.listdir(out / "checkpoints")) == [f"step-{STEPS - 1:08d}"]  # no leftovers, the last one kept
    assert intact(ckpt(out, STEPS - 1))

    monkeypatch.setattr(checkpoints, "save", real_save)  # space again
    p = run("train.py", *fault_args(model), "--resume=True", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert re.search(rf"resuming from \S*step-{STEPS - 1:08d} ", p.stdout), p.stdout
    assert_same_run(out, reference)
