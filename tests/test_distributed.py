"""torchrun / DDP on CPU (gloo). Run with: python -m pytest -q tests/test_distributed.py"""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest

import train
from cli import UserError
from conftest import ROOT, in_process, patched_train, run_main, script_env
from tiny import curve, max_diff, save_tiny_gpt2, synthetic, weights, write_split
from checkpoints import split_batch


def torchrun(n, *args, cwd, script=os.path.join(ROOT, "train.py"), launcher=()):
    env = script_env({"OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *launcher, script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    write_split(d, synthetic(60, seed=1), synthetic(12, seed=2))
    save_tiny_gpt2(d / "tiny", dropout=0.0)  # no dropout: its random masks would differ between layouts
    return d


def common(run_dir):
    return [f"--model={run_dir / 'tiny'}", "--learning_rate=1e-3", "--block_size=64", "--grad_accum_steps=2",
            "--max_steps=4", "--checkpoint_interval=2", "--keep_checkpoints=5"]


@pytest.fixture(scope="module")
def runs(run_dir):
    """The uninterrupted runs the others are held to: one process of BATCH_SIZE=4 (out_dir one; this one, in-process),
    and two ranks of BATCH_SIZE=2 (two, the first: its ranks find no token cache); 8 blocks a step either way."""
    two = torchrun(2, *common(run_dir), "--batch_size=2", "--out_dir=two", cwd=run_dir)
    assert two.returncode == 0, two.stderr
    one = run_main(train.main, run_dir, [*common(run_dir), "--batch_size=4", "--out_dir=one"])
    assert one.returncode == 0, one.stderr
    return one, two


def test_two_ranks_equal_one_process_with_twice_the_batch(run_dir, runs):
    one, two = runs
    assert max_diff(weights(run_dir / "one" / "final"), weights(run_dir / "two" / "final")) < 1e-5
    # one set of outputs: rank 0 alone writes, each step is logged once, and one summary line is printed
    steps = [json.loads(line)["step"] for line in open(run_dir / "two" / "metrics.jsonl") if "val_loss" in line]
    assert steps == sorted(set(steps))
    assert sorted(os.listdir(run_dir / "two")) == ["best", "checkpoints", "config.json", "final", "metrics.jsonl"]
    assert two.stdout.count("trained steps") == 1
    assert "2 processes (gloo, DDP)" in two.stdout


def resume_from(run_dir, source, step, name):
    """A new OUT_DIR holding only checkpoint `step` of run `source` (copied): a run stopped there."""
    out = run_dir / name
    shutil.copytree(run_dir / source / "checkpoints" / f"step-{step:08d}", out / "checkpoints" / f"step-{step:08d}")
    return out


def test_a_two_process_run_finishes_in_one_process_with_its_global_batch(run_dir, runs, monkeypatch, capfd):
    """2 ranks x BATCH_SIZE=2 x GRAD_ACCUM_STEPS=2, stopped at step 2, resumed by one process (this one): 2 x 4 x 1.
    It takes the same 8 blocks a step and ends where the 1-process run of batch 4 x 2 does."""
    out = resume_from(run_dir, "two", 2, "two_then_one")
    r = in_process(train.main, run_dir, ["--out_dir=two_then_one", "--resume=True"], monkeypatch, capfd)
    assert r.returncode == 0, r.stderr
    assert ("the run's global batch of 8 blocks a step (BATCH_SIZE=2 x GRAD_ACCUM_STEPS=2 x 2 processes) is kept: "
            "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process") in r.stdout
    assert "4 steps" in r.stdout  # the schedule is the run's: the same number of steps
    assert max_diff(weights(run_dir / "one" / "final"), weights(out / "final")) < 1e-5
    # the logged loss (steps 1-4: the checkpoint carries the two before it) and validation are the run's too
    for got, want in zip(curve(out), curve(run_dir / "one")[-8:], strict=True):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("ranks, kept", [
    (2, "BATCH_SIZE=4 x GRAD_ACCUM_STEPS=1 x 2 processes"),
    # scale-up: BATCH_SIZE=4 does not divide a rank's 2 blocks, and the job goes on with the largest batch that does
    (4, "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=1 x 4 processes (BATCH_SIZE=4 does not divide a process's 2 blocks; 2 is "
        "the largest that does)")])
def test_a_one_process_run_finishes_on_more_ranks_with_its_global_batch(ranks, kept, run_dir, runs):
    out = resume_from(run_dir, "one", 2, f"one_then_{ranks}")
    r = torchrun(ranks, f"--out_dir=one_then_{ranks}", "--resume=True", cwd=run_dir)  # no batch flags
    assert r.returncode == 0, r.stderr
    assert f"is kept: {kept}" in r.stdout
    assert max_diff(weights(run_dir / "one" / "final"), weights(out / "final")) < 1e-5


def test_a_batch_size_that_does_not_divide_takes_the_largest_that_does(run_dir, runs, monkeypatch, capfd):
    out = resume_from(run_dir, "one", 2, "smaller")
    r = in_process(train.main, run_dir, ["--out_dir=smaller", "--resume=True", "--batch_size=3", "--max_steps=3"],
                   monkeypatch, capfd)
    assert r.returncode == 0, r.stderr
    assert ("the run's global batch of 8 blocks a step (BATCH_SIZE=4 x GRAD_ACCUM_STEPS=2 x 1 process) is kept: "
            "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process (BATCH_SIZE=3 does not divide a process's 8 blocks; 2 is "
            "the largest that does)") in r.stdout
    assert (out / "checkpoints" / "step-00000003").is_dir()


# Rank KILL of torchrun's first attempt is killed by SIGKILL as it begins step 3, after the checkpoint of step 2:
# torchrun stops the other rank and starts both again.
KILLED = """
import signal
calls, forward_backward = [0], step.forward_backward

def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3 and os.environ["RANK"] == "{kill}" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return forward_backward(*args, **kwargs)

step.forward_backward = dying
"""


def test_torchrun_restarts_continue_the_run_exactly(run_dir, runs, tmp_path, kill=1):
    wrapper = patched_train(tmp_path, "killed.py", KILLED.format(kill=kill))
    r = torchrun(2, *common(run_dir), "--batch_size=2", f"--out_dir=killed{kill}", cwd=run_dir,
                 script=wrapper, launcher=["--max-restarts=2"])
    assert r.returncode == 0, r.stderr
    assert "torchrun restarted this run (1 restart, 2 processes): continuing it" in r.stdout
    assert "step-00000002 (step 2)" in r.stdout
    # the killed rank's peer says so in one line, not with gloo's traceback
    assert "Traceback" not in r.stderr, r.stderr
    assert "error: rank 0: another process of this job stopped (" in r.stderr, r.stderr
    out = run_dir / f"killed{kill}"
    assert max_diff(weights(run_dir / "two" / "final"), weights(out / "final")) < 1e-5
    assert curve(out) == curve(run_dir / "two")


# Rank 1 sees no checkpoints: as on a machine that does not share OUT_DIR with rank 0's.
UNSHARED = """
find = checkpoints.find
checkpoints.find = lambda out_dir: [] if os.environ["RANK"] == "1" else find(out_dir)
"""


def test_ranks_that_see_different_checkpoints_stop(run_dir, runs, tmp_path):
    out = resume_from(run_dir, "one", 2, "unshared")
    wrapper = patched_train(tmp_path, "unshared.py", UNSHARED)
    r = torchrun(2, "--out_dir=unshared", "--resume=True", cwd=run_dir, script=wrapper)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: the ranks find different checkpoints in OUT_DIR 'unshared' (steps [2, None]): on more "
                      "than one machine, OUT_DIR must be on a filesystem they share"], r.stderr
    assert sorted(os.listdir(out)) == ["checkpoints"]


def restart_env(monkeypatch, job, restarts="1"):
    """The variables torchrun sets in a restarted worker, set here for a run in this process."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restarts)


def test_a_restart_finding_no_intact_checkpoint_stops(run_dir, runs, monkeypatch, capfd):
    out = resume_from(run_dir, "one", 2, "damaged")
    config = json.loads((run_dir / "one" / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torchrun_job": "job-7"}))
    with open(out / "checkpoints" / "step-00000002" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    before = {p: p.stat().st_size for p in out.rglob("*")}
    restart_env(monkeypatch, "job-7")
    r = in_process(train.main, run_dir, ["--out_dir=damaged"], monkeypatch, capfd)
    assert r.returncode == 2
    assert r.stderr.startswith("error: torchrun restarted the run in damaged, and none of its 1 checkpoints is "
                               "intact; nothing was changed. To start the run again from step 0, run train.py with "
                               "--resume=True\n"), r.stderr
    assert {p: p.stat().st_size for p in out.rglob("*")} == before
    # torchrun without a job id calls every job "none": a restart cannot tell this run from an older one
    (out / "config.json").write_text(json.dumps({**config, "torchrun_job": "none"}))
    before = {p: p.stat().st_size for p in out.rglob("*")}
    restart_env(monkeypatch, "none")
    r = in_process(train.main, run_dir, ["--out_dir=damaged"], monkeypatch, capfd)
    assert r.returncode == 2
    assert "already holds a run: torchrun restarted the workers, but it continues a run only where" in r.stderr
    assert {p: p.stat().st_size for p in out.rglob("*")} == before


def test_split_batch():
    cfg = types.SimpleNamespace(BATCH_SIZE=4, GRAD_ACCUM_STEPS=2)
    assert split_batch(cfg, set(), (4, 2, 2), 1) == (4, 4, "")
    assert split_batch(cfg, set(), (4, 2, 2), 4) == (4, 1, "")
    assert split_batch(types.SimpleNamespace(BATCH_SIZE=2, GRAD_ACCUM_STEPS=2), {"BATCH_SIZE"}, (4, 2, 2), 2) \
        == (2, 4, "")
    assert split_batch(types.SimpleNamespace(BATCH_SIZE=4, GRAD_ACCUM_STEPS=8), {"GRAD_ACCUM_STEPS"},
                       (4, 2, 2), 1) == (2, 8, "")
    # scale-up: a 1-process run of BATCH_SIZE=4 on 8 ranks takes 2 blocks a rank; the largest batch that divides it
    assert split_batch(cfg, set(), (4, 2, 2), 8) == (2, 1, " (BATCH_SIZE=4 does not divide a process's 2 blocks; 2 "
                                                          "is the largest that does)")
    assert split_batch(types.SimpleNamespace(BATCH_SIZE=3, GRAD_ACCUM_STEPS=1), set(), (4, 1, 1), 1)[:2] == (2, 2)
    # an elastic job's command line stays as it began: BATCH_SIZE is kept, GRAD_ACCUM_STEPS made up
    assert split_batch(cfg, {"BATCH_SIZE", "GRAD_ACCUM_STEPS"}, (4, 2, 2), 1) == (4, 4, "")
    batch, accum, note = split_batch(types.SimpleNamespace(BATCH_SIZE=4, GRAD_ACCUM_STEPS=3), {"GRAD_ACCUM_STEPS"},
                                     (4, 2, 2), 1)
    assert (batch, accum) == (4, 4) and "GRAD_ACCUM_STEPS=3 does not divide a process's 16 blocks" in note
    with pytest.raises(UserError, match=r"does not divide over 3 processes; resume it on 1, 2, 4, 8 or 16 processes"):
        split_batch(cfg, set(), (4, 2, 2), 3)


def test_an_error_is_reported_once(run_dir):
    r = torchrun(2, f"--model={run_dir / 'tiny'}", "--learning_rate=0", "--out_dir=bad", cwd=run_dir)
    assert r.returncode != 0
    assert r.stderr.count("error: LEARNING_RATE must be > 0") == 1
    assert not (run_dir / "bad").exists()


# Each rank of this script fails after its own delay (None: it never does, and waits to be stopped). The first to
# exit makes torchrun stop the others with SIGTERM: its error line must be out by then, whichever rank it is.
RANKS_FAIL = """
import os, sys, time
sys.path.insert(0, {root!r})
import cli

def main():
    delay = {delays!r}[int(os.environ["RANK"])]
    time.sleep(60 if delay is None else delay)
    raise cli.UserError("rank " + os.environ["RANK"] + " failed")

cli.run(main)
"""


@pytest.mark.parametrize("delays, expected", [
    ((None, 0), "rank 1 failed"),  # rank 0 never gets to say anything: rank 1 must
    ((1.0, 0), "rank 1 failed"),   # the case seen in a full run: rank 1 first, rank 0 stopped before its turn
    ((0, 1.0), "rank 0 failed"),
])
def test_the_first_error_reaches_the_user_whichever_rank_it_is(delays, expected, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(RANKS_FAIL.format(root=ROOT, delays=delays))
    r = torchrun(2, cwd=tmp_path, script=str(script))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {expected}"], r.stderr


def test_two_ranks_share_one_token_cache(run_dir, runs):
    """Rank 0 tokenizes; the other waits, then maps the same files. The 2-rank run of `runs` started with no cache;
    every later run of the module finds the same one (the same files and BLOCK_SIZE)."""
    _, two = runs
    assert two.stdout.count("tokenized train_data.txt") == 1 and two.stdout.count("tokenized val_data.txt") == 1
    assert len(list((run_dir / "cache").glob("train_data.txt-*"))) == 1
    assert len(list((run_dir / "cache").glob("*/blocks-64"))) == 1
