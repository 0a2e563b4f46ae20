"""train.py under torchrun on CPU (gloo): DDP on 2 and 4 ranks and FSDP=True on 2, each held to one process's run
(the same weights and logged figures), killed ranks restarted by torchrun, checkpoints resumed on other numbers of
ranks and layouts, damaged or unsafe checkpoints, and errors said once whichever rank meets them.

Run: .venv/bin/python -m pytest -q tests/test_train_torchrun.py
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import cli
import sharding
import train
from conftest import ROOT, command, one_error_line, run, script_env
from tiny import curve, max_diff, save_tiny_gpt2, save_tiny_llama, synthetic, weights, write_split


def torchrun(n, *args, cwd, script="train.py", patch=None, launcher=()):
    """`script` on n ranks under torchrun --standalone, each rank started as conftest.run starts a process (with
    `patch`, if given), in its environment, one thread a rank."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *launcher, "--no-python", *command(script, args, patch)], cwd=cwd,
                          env=script_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=300)


def resume_from(run_dir, source, step, name):
    """A new OUT_DIR holding only checkpoint `step` of run `source` (copied): a run stopped there."""
    out = run_dir / name
    shutil.copytree(run_dir / source / "checkpoints" / f"step-{step:08d}", out / "checkpoints" / f"step-{step:08d}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# DDP: two ranks against one process with twice the batch, restarts, resumes on other ranks, one error line

@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    write_split(d, synthetic(60, seed=1), synthetic(12, seed=2))
    save_tiny_gpt2(d / "tiny", dropout=0.0)  # no dropout: its random masks would differ between layouts
    return d


def ddp_args(ddp_dir):
    return [f"--model={ddp_dir / 'tiny'}", "--learning_rate=1e-3", "--block_size=64", "--grad_accum_steps=2",
            "--max_steps=4", "--checkpoint_interval=2", "--keep_checkpoints=5"]


@pytest.fixture(scope="module")
def ddp_runs(ddp_dir):
    """The uninterrupted runs the others are held to: one process of BATCH_SIZE=4 (out_dir one; this one, in-process),
    and two ranks of BATCH_SIZE=2 (two, the first: its ranks find no token cache); 8 blocks a step either way."""
    two = torchrun(2, *ddp_args(ddp_dir), "--batch_size=2", "--out_dir=two", cwd=ddp_dir)
    assert two.returncode == 0, two.stderr
    one = run("train.py", *ddp_args(ddp_dir), "--batch_size=4", "--out_dir=one", cwd=ddp_dir)
    assert one.returncode == 0, one.stderr
    return one, two


def test_two_ranks_equal_one_process_with_twice_the_batch(ddp_dir, ddp_runs):
    one, two = ddp_runs
    assert max_diff(weights(ddp_dir / "one" / "final"), weights(ddp_dir / "two" / "final")) < 1e-5
    # one set of outputs: rank 0 alone writes, each step is logged once, and one summary line is printed
    steps = [json.loads(line)["step"] for line in open(ddp_dir / "two" / "metrics.jsonl") if "val_loss" in line]
    assert steps == sorted(set(steps))
    assert sorted(os.listdir(ddp_dir / "two")) == ["best", "checkpoints", "config.json", "final", "metrics.jsonl"]
    assert two.stdout.count("trained steps") == 1
    assert "2 processes (gloo, DDP)" in two.stdout


def test_a_two_process_run_finishes_in_one_process_with_its_global_batch(ddp_dir, ddp_runs):
    """2 ranks x BATCH_SIZE=2 x GRAD_ACCUM_STEPS=2, stopped at step 2, resumed by one process (this one): 2 x 4 x 1.
    It takes the same 8 blocks a step and ends where the 1-process run of batch 4 x 2 does."""
    out = resume_from(ddp_dir, "two", 2, "two_then_one")
    r = run("train.py", "--out_dir=two_then_one", "--resume=True", cwd=ddp_dir)
    assert r.returncode == 0, r.stderr
    assert ("the run's global batch of 8 blocks a step (BATCH_SIZE=2 x GRAD_ACCUM_STEPS=2 x 2 processes) is kept: "
            "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process") in r.stdout
    assert "4 steps" in r.stdout  # the schedule is the run's: the same number of steps
    assert max_diff(weights(ddp_dir / "one" / "final"), weights(out / "final")) < 1e-5
    # the logged loss (steps 1-4: the checkpoint carries the two before it) and validation are the run's too
    for got, want in zip(curve(out), curve(ddp_dir / "one")[-8:], strict=True):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("ranks, kept", [
    (2, "BATCH_SIZE=4 x GRAD_ACCUM_STEPS=1 x 2 processes"),
    # scale-up: BATCH_SIZE=4 does not divide a rank's 2 blocks, and the job goes on with the largest batch that does
    (4, "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=1 x 4 processes (BATCH_SIZE=4 does not divide a process's 2 blocks; 2 is "
        "the largest that does)")])
def test_a_one_process_run_finishes_on_more_ranks_with_its_global_batch(ranks, kept, ddp_dir, ddp_runs):
    out = resume_from(ddp_dir, "one", 2, f"one_then_{ranks}")
    r = torchrun(ranks, f"--out_dir=one_then_{ranks}", "--resume=True", cwd=ddp_dir)  # no batch flags
    assert r.returncode == 0, r.stderr
    assert f"is kept: {kept}" in r.stdout
    assert max_diff(weights(ddp_dir / "one" / "final"), weights(out / "final")) < 1e-5


def test_a_batch_size_that_does_not_divide_takes_the_largest_that_does(ddp_dir, ddp_runs):
    out = resume_from(ddp_dir, "one", 2, "smaller")
    r = run("train.py", "--out_dir=smaller", "--resume=True", "--batch_size=3", "--max_steps=3", cwd=ddp_dir)
    assert r.returncode == 0, r.stderr
    assert ("the run's global batch of 8 blocks a step (BATCH_SIZE=4 x GRAD_ACCUM_STEPS=2 x 1 process) is kept: "
            "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process (BATCH_SIZE=3 does not divide a process's 8 blocks; 2 is "
            "the largest that does)") in r.stdout
    assert (out / "checkpoints" / "step-00000003").is_dir()


# Rank KILL of torchrun's first attempt is killed by SIGKILL as it begins step 3, after the checkpoint of step 2:
# torchrun stops the other rank and starts both again.
KILLED_AT_STEP_3 = """
import signal
import step
calls, forward_backward = [0], step.forward_backward

def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3 and os.environ["RANK"] == "{kill}" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return forward_backward(*args, **kwargs)

step.forward_backward = dying
"""


def test_torchrun_restarts_continue_the_run_exactly(ddp_dir, ddp_runs, kill=1):
    r = torchrun(2, *ddp_args(ddp_dir), "--batch_size=2", f"--out_dir=killed{kill}", cwd=ddp_dir,
                 patch=KILLED_AT_STEP_3.format(kill=kill), launcher=["--max-restarts=2"])
    assert r.returncode == 0, r.stderr
    assert "torchrun restarted this run (1 restart, 2 processes): continuing it" in r.stdout
    assert "step-00000002 (step 2)" in r.stdout
    # the killed rank's peer says so in one line, not with gloo's traceback
    assert "Traceback" not in r.stderr, r.stderr
    assert "error: rank 0: another process of this job stopped (" in r.stderr, r.stderr
    out = ddp_dir / f"killed{kill}"
    assert max_diff(weights(ddp_dir / "two" / "final"), weights(out / "final")) < 1e-5
    assert curve(out) == curve(ddp_dir / "two")


# Rank 1 sees no checkpoints: as on a machine that does not share OUT_DIR with rank 0's.
UNSHARED = """
import checkpoints
find = checkpoints.find
checkpoints.find = lambda out_dir: [] if os.environ["RANK"] == "1" else find(out_dir)
"""


def test_ranks_that_see_different_checkpoints_stop(ddp_dir, ddp_runs):
    out = resume_from(ddp_dir, "one", 2, "unshared")
    r = torchrun(2, "--out_dir=unshared", "--resume=True", cwd=ddp_dir, patch=UNSHARED)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: the ranks find different checkpoints in OUT_DIR 'unshared' (steps [2, None]): on more "
                      "than one machine, OUT_DIR must be on a filesystem they share"], r.stderr
    assert sorted(os.listdir(out)) == ["checkpoints"]


def restart_env(job, restarts="1"):
    """The variables torchrun sets in a restarted worker, for a run in this process."""
    return {"TORCHELASTIC_RUN_ID": job, "TORCHELASTIC_RESTART_COUNT": restarts}


def test_a_restart_finding_no_intact_checkpoint_stops(ddp_dir, ddp_runs):
    out = resume_from(ddp_dir, "one", 2, "damaged")
    config = json.loads((ddp_dir / "one" / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torchrun_job": "job-7"}))
    with open(out / "checkpoints" / "step-00000002" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    before = {p: p.stat().st_size for p in out.rglob("*")}
    r = run("train.py", "--out_dir=damaged", cwd=ddp_dir, env=restart_env("job-7"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: torchrun restarted the run in damaged, and none of its 1 checkpoints is "
                               "intact; nothing was changed. To start the run again from step 0, run train.py with "
                               "--resume=True\n"), r.stderr
    assert {p: p.stat().st_size for p in out.rglob("*")} == before
    # torchrun without a job id calls every job "none": a restart cannot tell this run from an older one
    (out / "config.json").write_text(json.dumps({**config, "torchrun_job": "none"}))
    before = {p: p.stat().st_size for p in out.rglob("*")}
    r = run("train.py", "--out_dir=damaged", cwd=ddp_dir, env=restart_env("none"))
    assert r.returncode == 2
    assert "already holds a run: torchrun restarted the workers, but it continues a run only where" in r.stderr
    assert {p: p.stat().st_size for p in out.rglob("*")} == before


def test_an_error_is_reported_once(ddp_dir):
    r = torchrun(2, f"--model={ddp_dir / 'tiny'}", "--learning_rate=0", "--out_dir=bad", cwd=ddp_dir)
    assert r.returncode != 0
    assert r.stderr.count("error: LEARNING_RATE must be > 0") == 1
    assert not (ddp_dir / "bad").exists()


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


def test_two_ranks_share_one_token_cache(ddp_dir, ddp_runs):
    """Rank 0 tokenizes; the other waits, then maps the same files. The 2-rank run of `runs` started with no cache;
    every later run of the module finds the same one (the same files and BLOCK_SIZE)."""
    _, two = ddp_runs
    assert two.stdout.count("tokenized train_data.txt") == 1 and two.stdout.count("tokenized val_data.txt") == 1
    assert len(list((ddp_dir / "cache").glob("train_data.txt-*"))) == 1
    assert len(list((ddp_dir / "cache").glob("*/blocks-64"))) == 1


# ---------------------------------------------------------------------------------------------------------------------
# FSDP=True: sharded training and sharded checkpoints; every run takes 8 blocks a step and ends where one process does

FSDP_ARGS = ["--learning_rate=1e-3", "--block_size=64", "--grad_accum_steps=2", "--max_steps=4",
          "--checkpoint_interval=2", "--keep_checkpoints=5"]

# The first attempt's rank 0 is killed by SIGKILL while the checkpoint of step 4 is written: every rank's shard is in
# its temp directory, which is not yet renamed into place. torchrun starts both again, and the run goes on from step 2.
KILLED_WRITING_SHARDS = """
import signal
import checkpoints
def dying(tmp):
    if "step-00000004" in tmp and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        assert sorted(os.listdir(os.path.join(tmp, "shards"))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.before_rename = dying
"""


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    write_split(d, synthetic(60, seed=1), synthetic(12, seed=2))
    save_tiny_gpt2(d / "gpt2", dropout=0.0)  # no dropout: its random masks would differ between layouts
    save_tiny_llama(d / "llama")
    return d


@pytest.fixture(scope="module")
def fsdp_runs(fsdp_dir):
    """One process of BATCH_SIZE=4 (out_dir one); DDP on two ranks of 2 (ddp); FSDP on two ranks of 2 (fsdp), killed
    once as it writes a checkpoint and restarted by torchrun."""
    one = run("train.py", "--model=gpt2", *FSDP_ARGS, "--batch_size=4", "--out_dir=one", cwd=fsdp_dir, process=True)
    assert one.returncode == 0, one.stderr
    ddp = torchrun(2, "--model=gpt2", *FSDP_ARGS, "--batch_size=2", "--out_dir=ddp", cwd=fsdp_dir)
    assert ddp.returncode == 0, ddp.stderr
    fsdp = torchrun(2, "--model=gpt2", *FSDP_ARGS, "--batch_size=2", "--fsdp=True", "--out_dir=fsdp", cwd=fsdp_dir,
                    patch=KILLED_WRITING_SHARDS, launcher=["--max-restarts=1"])
    assert fsdp.returncode == 0, fsdp.stderr
    return one, ddp, fsdp


def test_fsdp_ends_with_the_weights_of_ddp_and_of_one_process(fsdp_dir, fsdp_runs):
    one, ddp, fsdp = fsdp_runs
    assert "2 processes (gloo, FSDP)" in fsdp.stdout
    final = weights(fsdp_dir / "fsdp" / "final")
    assert max_diff(weights(fsdp_dir / "one" / "final"), final) < 1e-5
    assert max_diff(weights(fsdp_dir / "ddp" / "final"), final) < 1e-5
    for got, want in zip(curve(fsdp_dir / "fsdp"), curve(fsdp_dir / "one"), strict=True):  # the logged figures too
        assert got == pytest.approx(want, abs=1e-5)
    # best/ and final/ are plain model directories, the tied output layer saved once, as one process saves it
    assert weights(fsdp_dir / "fsdp" / "best").keys() == weights(fsdp_dir / "one" / "best").keys()


def test_a_kill_while_the_shards_are_written_resumes_exactly(fsdp_dir, fsdp_runs):
    _, _, fsdp = fsdp_runs
    assert "torchrun restarted this run (1 restart, 2 processes): continuing it" in fsdp.stdout
    assert "step-00000002 (step 2)" in fsdp.stdout  # the half-written step 4 was never seen
    checkpoint = fsdp_dir / "fsdp" / "checkpoints" / "step-00000004"
    assert sorted(os.listdir(checkpoint / "shards")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert checkpoints.check_manifest(checkpoint, required=True) is None  # each rank hashed its own shard
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["sharded"] and state["optimizer"] is None  # the optimizer's state is in the shards, not here
    assert not [n for n in os.listdir(fsdp_dir / "fsdp" / "checkpoints") if n.startswith(".tmp")]
    assert max_diff(weights(fsdp_dir / "one" / "final"), weights(fsdp_dir / "fsdp" / "final")) < 1e-5


@pytest.mark.parametrize("source, ranks, flags, kept", [
    # FSDP on 2 ranks, resumed in one process: FSDP in a group of one, the shards read back whole
    ("fsdp", 1, [], "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process"),
    # ... or without FSDP: the shards loaded into a plain model
    ("fsdp", 1, ["--fsdp=False"], "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process"),
    # one process without FSDP, resumed on 2 FSDP ranks: its model directory sharded, its optimizer state too
    ("one", 2, ["--fsdp=True"], "BATCH_SIZE=4 x GRAD_ACCUM_STEPS=1 x 2 processes"),
])
def test_a_checkpoint_resumes_on_other_ranks_and_layouts(fsdp_dir, fsdp_runs, source, ranks, flags, kept):
    name = f"{source}_on_{ranks}{''.join(flags)}"
    out = resume_from(fsdp_dir, source, 2, name)
    args = [f"--out_dir={name}", "--resume=True", *flags]
    r = run("train.py", *args, cwd=fsdp_dir, process=True) if ranks == 1 else torchrun(ranks, *args, cwd=fsdp_dir)
    assert r.returncode == 0, r.stderr
    assert f"is kept: {kept}" in r.stdout
    assert max_diff(weights(fsdp_dir / "one" / "final"), weights(out / "final")) < 1e-5
    for got, want in zip(curve(out), curve(fsdp_dir / "one")[-8:], strict=True):  # steps 1-4, validation
        assert got == pytest.approx(want, abs=1e-5)


def test_one_fsdp_process_resumes_on_two(fsdp_dir, fsdp_runs):
    """2 ranks -> 1 (checkpointing every step: step 3 is a one-process FSDP checkpoint) -> 2 ranks."""
    resume_from(fsdp_dir, "fsdp", 2, "down")
    r = run("train.py", "--out_dir=down", "--resume=True", "--max_steps=3", "--checkpoint_interval=1",
            "--keep_checkpoints=1", cwd=fsdp_dir, process=True)
    assert r.returncode == 0, r.stderr
    assert "1 process (gloo, FSDP)" in r.stdout
    assert os.listdir(fsdp_dir / "down" / "checkpoints") == ["step-00000003"]  # sharded ones are pruned too
    assert sorted(os.listdir(fsdp_dir / "down" / "checkpoints" / "step-00000003" / "shards")) == [
        ".metadata", "__0_0.distcp"]
    out = resume_from(fsdp_dir, "down", 3, "up")
    r = torchrun(2, "--out_dir=up", "--resume=True", "--max_steps=4", cwd=fsdp_dir)
    assert r.returncode == 0, r.stderr
    assert "resuming from up/checkpoints/step-00000003 (step 3)" in r.stdout
    assert max_diff(weights(fsdp_dir / "one" / "final"), weights(out / "final")) < 1e-5


def test_damage_that_one_rank_finds_makes_every_rank_pass_the_checkpoint_over(fsdp_dir, fsdp_runs):
    """Under torchrun each rank hashes its share of a checkpoint's files: a file only rank 1 reads is damaged (same
    size, one byte changed), and both ranks go back to the checkpoint before."""
    out = resume_from(fsdp_dir, "fsdp", 2, "damaged")
    shutil.copytree(fsdp_dir / "fsdp" / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    names = sorted(json.loads((out / "checkpoints" / "step-00000004" / "manifest.json").read_text()))
    victim = out / "checkpoints" / "step-00000004" / names[1]  # rank 1's share: every second file
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    r = torchrun(2, "--out_dir=damaged", "--resume=True", cwd=fsdp_dir)
    assert r.returncode == 0, r.stderr
    assert f"skipping damaged checkpoint damaged/checkpoints/step-00000004: {names[1]} does not match" in r.stdout
    assert "resuming from damaged/checkpoints/step-00000002 (step 2)" in r.stdout
    assert max_diff(weights(fsdp_dir / "one" / "final"), weights(out / "final")) < 1e-5


def test_lora_with_gradient_checkpointing_on_a_llama(fsdp_dir):
    """Only the adapters are trained, sharded, and checkpointed; the merged model and the adapter are those of one
    process."""
    lora = ["--model=llama", *FSDP_ARGS, "--lora_r=4", "--lora_dropout=0.0", "--gradient_checkpointing=True"]
    one = run("train.py", *lora, "--batch_size=4", "--out_dir=lora_one", cwd=fsdp_dir, process=True)
    assert one.returncode == 0, one.stderr
    fsdp = torchrun(2, *lora, "--batch_size=2", "--fsdp=True", "--out_dir=lora_fsdp", cwd=fsdp_dir)
    assert fsdp.returncode == 0, fsdp.stderr
    for sub in ("final", "best"):
        assert max_diff(weights(fsdp_dir / "lora_one" / sub), weights(fsdp_dir / "lora_fsdp" / sub)) < 1e-5
    adapter = lambda run: load_file(fsdp_dir / run / "final" / "adapter" / "adapter_model.safetensors")
    assert max_diff(adapter("lora_one"), adapter("lora_fsdp")) < 1e-5
    # a checkpoint's shards hold the adapters and their AdamW state, nothing of the frozen model
    reader = sharding.SafeReader(fsdp_dir / "lora_fsdp" / "checkpoints" / "step-00000004" / "shards")
    names = list(reader.read_metadata().state_dict_metadata)
    assert names and all("lora_" in n for n in names)
    assert any(n.startswith("optim.") and n.endswith("exp_avg") for n in names)


@pytest.mark.parametrize("flags, message", [
    (["--fsdp=True", "--precision=fp16"], "FSDP=True computes in bf16 or fp32"),
    (["--fsdp=True", "--compile=True"], "COMPILE=True with FSDP=True is not supported"),
])
def test_settings_fsdp_cannot_take(fsdp_dir, monkeypatch, flags, message):
    monkeypatch.chdir(fsdp_dir)
    with pytest.raises(cli.UserError, match=message):
        train.check_config(cli.load_config(flags))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_sharded_checkpoint_runs_no_code_even_with_a_forged_manifest(fsdp_dir, fsdp_runs):
    """DCP's .metadata is a pickle: one that would run a command is refused, in one line, with nothing run."""
    out = resume_from(fsdp_dir, "fsdp", 2, "evil")
    checkpoint = out / "checkpoints" / "step-00000002"
    (checkpoint / "shards" / ".metadata").write_bytes(pickle.dumps(Evil()))
    (checkpoint / "manifest.json").unlink()
    checkpoints.write_manifest(checkpoint)  # forged to match
    r = run("train.py", "--out_dir=evil", "--resume=True", cwd=fsdp_dir, process=True)
    line = one_error_line(r)
    assert "the sharded checkpoint does not load" in line and "posix.system is not allowed" in line, line
    assert not (fsdp_dir / "pwned").exists() and not (out / "final").exists()
