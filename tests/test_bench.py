"""The benchmarks, bench.py, bench_scale.py and bench_loss.py: smoke runs (figures present and sane, not timed), their
settings checked in one line, and bench.py's steps against train.py's. The speed-ups they measure are checked where
they live: test_modeling (fused GELU), test_step (fused AdamW), test_hardware (precision).

Run: .venv/bin/python -m pytest -q tests/test_bench.py
"""

import json

import pytest
import torch

import bench_scale
import loss
import step
from conftest import ROOT, in_background, run
from tiny import save_tiny_gpt2, synthetic, write_split


# bench_scale.py and bench_loss.py time processes of their own, one at a time: the two runs start with the module,
# side by side, while its other tests run in this process; their tests are last in the file.

@pytest.fixture(scope="module", autouse=True)
def benches(request, tmp_path_factory):
    """test name -> (its directory, the Future of its benchmark's run)."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("scale", "loss")}
    script = lambda *args: run(*args, cwd=ROOT, process=True)
    jobs = {"test_scale_smoke_prints_the_table": (
                script, "bench_scale.py", "--bench_smoke=True", "--bench_scales=0.01,",
                f"--bench_json={dirs['scale'] / 'scale.json'}", f"--bench_workdir={dirs['scale'] / 'work'}"),
            "test_loss_smoke_prints_the_table": (
                script, "bench_loss.py", "--bench_smoke=True", f"--bench_json={dirs['loss'] / 'loss.json'}")}
    with in_background(request, jobs, workers=2) as started:
        yield {name: (d, started.get(name)) for name, d in zip(jobs, dirs.values())}


# bench.py in this process: an interpreter start and torch's import would cost seconds each run.

def test_bench_smoke_prints_the_table_and_sane_figures(tmp_path):
    result = run("bench.py", "--bench_smoke=True", f"--bench_json={tmp_path / 'bench.json'}", "--device=cpu",
                 "--block_size=128", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for row in ("train tokens/s (trained)", "padding", "dataset trained per epoch", "MFU", "peak memory",
                "generation tokens/s"):
        assert row in result.stdout
    assert "PASS" not in result.stdout + result.stderr and "FAIL" not in result.stdout + result.stderr
    with open(tmp_path / "bench.json") as f:
        figures = json.load(f)
    ours = figures["ours"]
    assert figures["matmul_peak_flops"] > 0 and figures["precision"] == "fp32"
    assert figures["shape"] == [2, 64, 2] and figures["block_size"] == 128 and figures["steps"] == 3  # the smoke's
    for key in ("train_tokens_per_s", "all_tokens_per_s", "mfu", "peak_memory_mb", "peak_memory_gc_mb",
                "generation_tokens_per_s"):
        assert ours[key] > 0, key
    assert ours["all_tokens_per_s"] >= ours["train_tokens_per_s"]  # padding and context are processed, not trained
    assert 0 <= ours["padding"] < 0.05
    assert ours["dataset_trained_per_epoch"] == pytest.approx(1.0)


def test_bench_trains_train_pys_steps(tmp_path, monkeypatch):
    """The micro-batches bench.py trains on are the ones train.py trains on, step for step, with the same settings:
    these 5 dialogues make 14 blocks of 16, so that five steps of four blocks (two micro-batches of two) cross an
    epoch's end, where a step has two; and many blocks are full, so that the order depends on the seed."""
    dialogues = synthetic(5, seed=1)
    write_split(tmp_path, dialogues, dialogues[:3])
    settings = ["--device=cpu", "--block_size=16", "--batch_size=2", "--grad_accum_steps=2", "--seed=5"]
    taken, train_step = [], step.train_step
    monkeypatch.setattr(step, "train_step", lambda layout, optimizer, scaler, micro, clip, *pairs: (
        taken.append(micro), train_step(layout, optimizer, scaler, micro, clip, *pairs))[1])
    model = save_tiny_gpt2(str(tmp_path / "tiny"))
    result = run("train.py", *settings, f"--model={model}", "--max_steps=5", "--eval_interval=0",
                 "--checkpoint_interval=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epoch 1:" in result.stdout and "14 blocks" in result.stdout
    trains, taken[:] = taken[:], []
    result = run("bench.py", *settings, "--bench_smoke=True", "--data_file=train_data.txt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # bench.py: two steps with gradient checkpointing, then BENCH_WARMUP + BENCH_STEPS (2 + 3), each from the start
    assert len(trains) == 5 and len(taken) == 7
    same = lambda a, b: len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) and (sa is sb is None or torch.equal(sa, sb))
        for (xa, ya, sa), (xb, yb, sb) in zip(a, b))
    assert all(same(a, b) for a, b in zip(taken[:2], trains))
    assert all(same(a, b) for a, b in zip(taken[2:], trains))


@pytest.mark.parametrize("script, args, words", [
    ("bench.py", ["--bench_smoke=True", "--block_size=0"], "BLOCK_SIZE"),
    ("bench.py", ["--bench_shape=(2, 64, 3)"], "BENCH_SHAPE=(2, 64, 3): expected (layers, width, heads)"),
    ("bench.py", ["--smoke"], "unknown setting --smoke; did you mean --bench_smoke"),  # the old flags, one line each
    ("bench.py", ["--compare_hf=True"], "did you mean --bench_compare_hf"),
    ("bench_scale.py", ["--bench_scale=1,"], "did you mean --bench_scales,"),
    ("bench_scale.py", ["--bench_scales=10"], "expected a tuple like (1, 10, 100), got an int"),
    ("bench_scale.py", ["--bench_scales=(0,)"], "BENCH_SCALES=(0,): expected multiples of the chitchat corpus"),
    ("bench_loss.py", ["--bench_warmup=-1"], "BENCH_WARMUP >= 0")])
def test_bench_settings_are_checked_in_one_line(script, args, words):
    result = run(script, *args, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and words in result.stderr


def test_scale_reads_train_pys_lines():
    out = ("cpu; fp32\ntokenized val_data.txt: 61,203 tokens in 0.3s (204,010 tokens/s)\n"
           "tokenized /tmp/x/train_data.txt: 3,141,592 tokens in 12.3s (255,412 tokens/s)\n"
           "start-up: 2.4s (data 1.1s, the rest mostly imports and the model); peak memory so far 1,234 MB\nstep 1\n")
    train_line, startup, rss = bench_scale.parse_train(out)
    assert train_line == {"path": "/tmp/x/train_data.txt", "tokens": 3141592, "s": 12.3, "tokens_per_s": 255412}
    assert (startup, rss) == (2.4, 1234)
    assert bench_scale.parse_train("start-up: 0.5s (data 0.1s)\n") == (None, 0.5, None)  # warm, no memory figure
    assert bench_scale.parse_train("an older train.py\n") == (None, None, None)


def test_synthetic_corpus_is_deterministic_and_nested(tmp_path):
    bench_scale.write_corpus(tmp_path / "a.jsonl", 20, seed=3)
    bench_scale.write_corpus(tmp_path / "b.jsonl", 30, seed=3)
    a, b = (tmp_path / "a.jsonl").read_text().splitlines(), (tmp_path / "b.jsonl").read_text().splitlines()
    assert b[:20] == a and len(set(b)) == 30
    turns = json.loads(a[0])
    assert 8 <= len(turns) <= 12 and len({t["speaker"] for t in turns}) == 2


# ---------------------------------------------------------------------------------------------------------------------
# the benchmarks' runs started with the module

def test_scale_smoke_prints_the_table(benches):
    # one scale: each train.py run costs ~15 s here. train.py may not print its cache's lines yet (those figures are
    # then "-"), so only what bench_scale.py measures itself is checked
    tmp_path, run = benches["test_scale_smoke_prints_the_table"]
    result = run.result()
    assert result.returncode == 0, result.stderr
    for header in ("prepare", "cold tokenize", "tokenizer batch", "warm start-up", "peak RSS above", "0.01x"):
        assert header in result.stdout
    assert "PASS" not in result.stdout and "FAIL" not in result.stdout
    assert "[0.01x] prepare_data.py" in result.stderr  # progress, a line a stage
    with open(tmp_path / "scale.json") as f:
        figures = json.load(f)
    rows = figures["rows"]
    assert [r["dialogues"] for r in rows] == [54] and figures["model_rss_mb"] > 0
    assert rows[0]["prepare_s"] > 0 and rows[0]["tokenizer_tokens_per_s"] > 0
    assert 0 < rows[0]["prepare_rss_mb"] < figures["model_rss_mb"]  # prepare_data.py loads no model, nor torch
    assert "dropped 0 " in (tmp_path / "work" / "scale-0.01x" / "prepare.out").read_text()  # all distinct


def test_loss_smoke_prints_the_table(benches):
    # four small processes (the model alone, then each path's): their imports are most of the time
    tmp_path, run = benches["test_loss_smoke_prints_the_table"]
    result = run.result()
    assert result.returncode == 0, result.stderr
    for line in ("chunk:", "ours, chunked (loss.py)", "ours, full logits (before)", "HF-style", "peak RSS above"):
        assert line in result.stdout
    assert "PASS" not in result.stdout and "FAIL" not in result.stdout
    with open(tmp_path / "loss.json") as f:
        figures = json.load(f)
    paths = figures["paths"]
    assert paths.keys() == {"chunked", "full", "hf"} and figures["model_rss_mb"] > 0
    assert figures["shape"] == {"vocab": 8192, "block": 64, "batch": 2, "steps": 1, "warmup": 1}  # the smoke's
    assert all(p["step_s_best"] > 0 and len(p["losses"]) == 2 for p in paths.values())
    assert figures["loss_max_diff"] < 1e-5  # the same training, step by step
    assert paths["chunked"]["chunk"] == loss.CPU_BUDGET // (4 * 8192)  # the smoke's vocabulary is 8,192 tokens
