"""torchrun / DDP on CPU (gloo). Run with: python -m pytest -q tests/test_distributed.py"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, script_env
from tiny import max_diff, save_tiny_gpt2, synthetic, weights, write_split


def torchrun(n, *args, cwd, script=os.path.join(ROOT, "train.py")):
    env = script_env({"OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    write_split(d, synthetic(60, seed=1), synthetic(12, seed=2))
    save_tiny_gpt2(d / "tiny", dropout=0.0)  # no dropout: its random masks would differ between layouts
    return d


def common(run_dir):
    return [f"--model={run_dir / 'tiny'}", "--learning_rate=1e-3", "--block_size=64", "--grad_accum_steps=2",
            "--max_steps=4", "--checkpoint_interval=2", "--keep_checkpoints=5"]


def test_two_ranks_equal_one_process_with_twice_the_batch(run_dir, script):
    one = script("train.py", *common(run_dir), "--batch_size=4", "--out_dir=one", cwd=run_dir)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *common(run_dir), "--batch_size=2", "--out_dir=two", cwd=run_dir)
    assert two.returncode == 0, two.stderr
    assert max_diff(weights(run_dir / "one" / "final"), weights(run_dir / "two" / "final")) < 1e-5
    # one set of outputs: rank 0 alone writes, each step is logged once, and one summary line is printed
    steps = [json.loads(line)["step"] for line in open(run_dir / "two" / "metrics.jsonl") if "val_loss" in line]
    assert steps == sorted(set(steps))
    assert sorted(os.listdir(run_dir / "two")) == ["best", "checkpoints", "config.json", "final", "metrics.jsonl"]
    assert two.stdout.count("trained steps") == 1
    assert "2 processes (gloo)" in two.stdout


def test_two_process_checkpoint_resumes_in_one_process(run_dir, script):
    out = run_dir / "two"
    if not (out / "checkpoints" / "step-00000002").is_dir():
        pytest.skip("needs the 2-process run of the test above")
    resumed = run_dir / "resumed"
    os.makedirs(resumed / "checkpoints")
    os.rename(out / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    r = script("train.py", *common(run_dir), "--batch_size=2", "--out_dir=resumed", "--resume=True", cwd=run_dir)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "step-00000002" in r.stdout
    assert "resuming a 2-process run with 1" in r.stdout
    assert (resumed / "final" / "model.safetensors").exists()
    assert [json.loads(line)["step"] for line in open(resumed / "metrics.jsonl")][-1] == 4


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


def test_two_ranks_share_one_token_cache(tmp_path):
    """Rank 0 tokenizes; the other waits, then maps the same files."""
    write_split(tmp_path, synthetic(30, seed=3), synthetic(6, seed=4))
    save_tiny_gpt2(tmp_path / "tiny")
    r = torchrun(2, f"--model={tmp_path / 'tiny'}", "--max_steps=2", "--block_size=64", "--eval_interval=0",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("tokenized train_data.txt") == 1 and r.stdout.count("tokenized val_data.txt") == 1
    assert len(list((tmp_path / "cache").glob("train_data.txt-*"))) == 1
    assert len(list((tmp_path / "cache").glob("*/blocks-64"))) == 1
