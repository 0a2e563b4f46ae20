"""FSDP=True: sharded training and sharded checkpoints (torchrun on CPU, gloo). Every run takes 8 blocks a step and
ends where one process does."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import cli
import hardware
import memory
import modeling
import processes
import sharding
import step
import tiny
import train
from conftest import one_error_line, patched_train, run_script
from test_distributed import torchrun
from tiny import curve, gpt2_tokenizer, max_diff, save_tiny_gpt2, save_tiny_llama, synthetic, weights, write_split

COMMON = ["--learning_rate=1e-3", "--block_size=64", "--grad_accum_steps=2", "--max_steps=4",
          "--checkpoint_interval=2", "--keep_checkpoints=5"]

# The first attempt's rank 0 is killed by SIGKILL while the checkpoint of step 4 is written: every rank's shard is in
# its temp directory, which is not yet renamed into place. torchrun starts both again, and the run goes on from step 2.
KILLED = """
import signal
def dying(tmp):
    if "step-00000004" in tmp and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        assert sorted(os.listdir(os.path.join(tmp, "shards"))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.before_rename = dying
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    write_split(d, synthetic(60, seed=1), synthetic(12, seed=2))
    save_tiny_gpt2(d / "gpt2", dropout=0.0)  # no dropout: its random masks would differ between layouts
    save_tiny_llama(d / "llama")
    return d


@pytest.fixture(scope="module")
def runs(run_dir, tmp_path_factory):
    """One process of BATCH_SIZE=4 (out_dir one); DDP on two ranks of 2 (ddp); FSDP on two ranks of 2 (fsdp), killed
    once as it writes a checkpoint and restarted by torchrun."""
    one = run_script("train.py", "--model=gpt2", *COMMON, "--batch_size=4", "--out_dir=one", cwd=run_dir)
    assert one.returncode == 0, one.stderr
    ddp = torchrun(2, "--model=gpt2", *COMMON, "--batch_size=2", "--out_dir=ddp", cwd=run_dir)
    assert ddp.returncode == 0, ddp.stderr
    wrapper = patched_train(tmp_path_factory.mktemp("wrapper"), "killed.py", KILLED)
    fsdp = torchrun(2, "--model=gpt2", *COMMON, "--batch_size=2", "--fsdp=True", "--out_dir=fsdp", cwd=run_dir,
                    script=wrapper, launcher=["--max-restarts=1"])
    assert fsdp.returncode == 0, fsdp.stderr
    return one, ddp, fsdp


def test_fsdp_ends_with_the_weights_of_ddp_and_of_one_process(run_dir, runs):
    one, ddp, fsdp = runs
    assert "2 processes (gloo, FSDP)" in fsdp.stdout
    final = weights(run_dir / "fsdp" / "final")
    assert max_diff(weights(run_dir / "one" / "final"), final) < 1e-5
    assert max_diff(weights(run_dir / "ddp" / "final"), final) < 1e-5
    for got, want in zip(curve(run_dir / "fsdp"), curve(run_dir / "one"), strict=True):  # the logged figures too
        assert got == pytest.approx(want, abs=1e-5)
    # best/ and final/ are plain model directories, the tied output layer saved once, as one process saves it
    assert weights(run_dir / "fsdp" / "best").keys() == weights(run_dir / "one" / "best").keys()


def test_a_kill_while_the_shards_are_written_resumes_exactly(run_dir, runs):
    _, _, fsdp = runs
    assert "torchrun restarted this run (1 restart, 2 processes): continuing it" in fsdp.stdout
    assert "step-00000002 (step 2)" in fsdp.stdout  # the half-written step 4 was never seen
    checkpoint = run_dir / "fsdp" / "checkpoints" / "step-00000004"
    assert sorted(os.listdir(checkpoint / "shards")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert checkpoints.check_manifest(checkpoint, required=True) is None  # each rank hashed its own shard
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["sharded"] and state["optimizer"] is None  # the optimizer's state is in the shards, not here
    assert not [n for n in os.listdir(run_dir / "fsdp" / "checkpoints") if n.startswith(".tmp")]
    assert max_diff(weights(run_dir / "one" / "final"), weights(run_dir / "fsdp" / "final")) < 1e-5


def resume_from(run_dir, source, step, name):
    """A new OUT_DIR holding only checkpoint `step` of run `source` (copied): a run stopped there."""
    shutil.copytree(run_dir / source / "checkpoints" / f"step-{step:08d}",
                    run_dir / name / "checkpoints" / f"step-{step:08d}")
    return run_dir / name


@pytest.mark.parametrize("source, ranks, flags, kept", [
    # FSDP on 2 ranks, resumed in one process: FSDP in a group of one, the shards read back whole
    ("fsdp", 1, [], "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process"),
    # ... or without FSDP: the shards loaded into a plain model
    ("fsdp", 1, ["--fsdp=False"], "BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process"),
    # one process without FSDP, resumed on 2 FSDP ranks: its model directory sharded, its optimizer state too
    ("one", 2, ["--fsdp=True"], "BATCH_SIZE=4 x GRAD_ACCUM_STEPS=1 x 2 processes"),
])
def test_a_checkpoint_resumes_on_other_ranks_and_layouts(run_dir, runs, source, ranks, flags, kept):
    name = f"{source}_on_{ranks}{''.join(flags)}"
    out = resume_from(run_dir, source, 2, name)
    args = [f"--out_dir={name}", "--resume=True", *flags]
    r = run_script("train.py", *args, cwd=run_dir) if ranks == 1 else torchrun(ranks, *args, cwd=run_dir)
    assert r.returncode == 0, r.stderr
    assert f"is kept: {kept}" in r.stdout
    assert max_diff(weights(run_dir / "one" / "final"), weights(out / "final")) < 1e-5
    for got, want in zip(curve(out), curve(run_dir / "one")[-8:], strict=True):  # steps 1-4, validation
        assert got == pytest.approx(want, abs=1e-5)


def test_one_fsdp_process_resumes_on_two(run_dir, runs):
    """2 ranks -> 1 (checkpointing every step: step 3 is a one-process FSDP checkpoint) -> 2 ranks."""
    resume_from(run_dir, "fsdp", 2, "down")
    r = run_script("train.py", "--out_dir=down", "--resume=True", "--max_steps=3", "--checkpoint_interval=1",
                   "--keep_checkpoints=1", cwd=run_dir)
    assert r.returncode == 0, r.stderr
    assert "1 process (gloo, FSDP)" in r.stdout
    assert os.listdir(run_dir / "down" / "checkpoints") == ["step-00000003"]  # sharded ones are pruned too
    assert sorted(os.listdir(run_dir / "down" / "checkpoints" / "step-00000003" / "shards")) == [
        ".metadata", "__0_0.distcp"]
    out = resume_from(run_dir, "down", 3, "up")
    r = torchrun(2, "--out_dir=up", "--resume=True", "--max_steps=4", cwd=run_dir)
    assert r.returncode == 0, r.stderr
    assert "resuming from up/checkpoints/step-00000003 (step 3)" in r.stdout
    assert max_diff(weights(run_dir / "one" / "final"), weights(out / "final")) < 1e-5


def test_damage_that_one_rank_finds_makes_every_rank_pass_the_checkpoint_over(run_dir, runs):
    """Under torchrun each rank hashes its share of a checkpoint's files: a file only rank 1 reads is damaged (same
    size, one byte changed), and both ranks go back to the checkpoint before."""
    out = resume_from(run_dir, "fsdp", 2, "damaged")
    shutil.copytree(run_dir / "fsdp" / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    names = sorted(json.loads((out / "checkpoints" / "step-00000004" / "manifest.json").read_text()))
    victim = out / "checkpoints" / "step-00000004" / names[1]  # rank 1's share: every second file
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    r = torchrun(2, "--out_dir=damaged", "--resume=True", cwd=run_dir)
    assert r.returncode == 0, r.stderr
    assert f"skipping damaged checkpoint damaged/checkpoints/step-00000004: {names[1]} does not match" in r.stdout
    assert "resuming from damaged/checkpoints/step-00000002 (step 2)" in r.stdout
    assert max_diff(weights(run_dir / "one" / "final"), weights(out / "final")) < 1e-5


def test_lora_with_gradient_checkpointing_on_a_llama(run_dir):
    """Only the adapters are trained, sharded, and checkpointed; the merged model and the adapter are those of one
    process."""
    lora = ["--model=llama", *COMMON, "--lora_r=4", "--lora_dropout=0.0", "--gradient_checkpointing=True"]
    one = run_script("train.py", *lora, "--batch_size=4", "--out_dir=lora_one", cwd=run_dir)
    assert one.returncode == 0, one.stderr
    fsdp = torchrun(2, *lora, "--batch_size=2", "--fsdp=True", "--out_dir=lora_fsdp", cwd=run_dir)
    assert fsdp.returncode == 0, fsdp.stderr
    for sub in ("final", "best"):
        assert max_diff(weights(run_dir / "lora_one" / sub), weights(run_dir / "lora_fsdp" / sub)) < 1e-5
    adapter = lambda run: load_file(run_dir / run / "final" / "adapter" / "adapter_model.safetensors")
    assert max_diff(adapter("lora_one"), adapter("lora_fsdp")) < 1e-5
    # a checkpoint's shards hold the adapters and their AdamW state, nothing of the frozen model
    reader = sharding.SafeReader(run_dir / "lora_fsdp" / "checkpoints" / "step-00000004" / "shards")
    names = list(reader.read_metadata().state_dict_metadata)
    assert names and all("lora_" in n for n in names)
    assert any(n.startswith("optim.") and n.endswith("exp_avg") for n in names)


# ---------------------------------------------------------------------------------------------------------------------
# in process: settings, the metadata reader, the memory estimate

@pytest.mark.parametrize("flags, message", [
    (["--fsdp=True", "--precision=fp16"], "FSDP=True computes in bf16 or fp32"),
    (["--fsdp=True", "--compile=True"], "COMPILE=True with FSDP=True is not supported"),
])
def test_settings_fsdp_cannot_take(run_dir, monkeypatch, flags, message):
    monkeypatch.chdir(run_dir)
    with pytest.raises(cli.UserError, match=message):
        train.check_config(cli.load_config(flags))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_sharded_checkpoint_runs_no_code_even_with_a_forged_manifest(run_dir, runs):
    """DCP's .metadata is a pickle: one that would run a command is refused, in one line, with nothing run."""
    out = resume_from(run_dir, "fsdp", 2, "evil")
    checkpoint = out / "checkpoints" / "step-00000002"
    (checkpoint / "shards" / ".metadata").write_bytes(pickle.dumps(Evil()))
    (checkpoint / "manifest.json").unlink()
    checkpoints.write_manifest(checkpoint)  # forged to match
    r = run_script("train.py", "--out_dir=evil", "--resume=True", cwd=run_dir)
    line = one_error_line(r)
    assert "the sharded checkpoint does not load" in line and "posix.system is not allowed" in line, line
    assert not (run_dir / "pwned").exists() and not (out / "final").exists()


def test_the_memory_estimate_counts_a_rank_s_share():
    shape = {"params": 8_000_000_000, "trained": 8_000_000_000, "layers": 32, "width": 4096, "heads": 32,
             "vocab": 128_256, "cpu": False, "chunk": 2000, "scores": False}
    ddp = memory.step_memory(shape, 1, 2048, True, True, ranks=8)
    fsdp = memory.step_memory({**shape, "sharded": True}, 1, 2048, True, True, ranks=8)
    assert ddp["gradients and AdamW state"] == 16 * 8e9  # a full copy on each rank, and DDP's buckets
    assert fsdp["gradients and AdamW state"] == 12 * 8e9 / 8 and fsdp["weights"] == 4 * 8e9 / 8
    assert fsdp["gathered layers"] == 2 * 4 * 8e9 / 32  # two layers' weights at a time
    accumulating = memory.step_memory({**shape, "sharded": True}, 1, 2048, True, True, ranks=8, accumulating=True)
    assert accumulating["unsharded gradients"] == 4 * 8e9


def test_gradients_stay_unsharded_between_micro_batches_only_where_they_fit(monkeypatch):
    import transformers
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2,
                                                                 n_head=2))
    cfg = cli.load_config(["--fsdp=True", "--grad_accum_steps=4", "--batch_size=2", "--block_size=64"])
    cpu = torch.device("cpu")
    terms = memory.estimate(model, cfg, cpu, ranks=1, sharded=True)
    need, unsharded = sum(terms.values()) - terms["weights"], terms["unsharded gradients"]
    assert unsharded == 0  # one process: no shards, nothing to hold unsharded
    terms = memory.estimate(model, cfg, cpu, ranks=2, sharded=True)
    need, unsharded = sum(terms.values()) - terms["weights"], terms["unsharded gradients"]
    assert unsharded == 4 * modeling.parameters(model)[1]
    for room, keeps in [(need / 0.8 + 1, True), (need / 0.8 - 1, False)]:
        monkeypatch.setattr(hardware, "available_memory", lambda device, processes=1: (room, "test"))
        assert memory.keeps_gradients(model, cfg, cpu, ranks=2) is keeps
    assert memory.keeps_gradients(model, cli.load_config(["--fsdp=True"]), cpu, ranks=2)  # no accumulation: no question


def tiny_gpt2():
    import transformers
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2,
                                                                n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def sharded_gradients(micro, dtype=None, every=False):
    """A tiny GPT-2's gradients from one step over `micro`, sharded in a group of one in this process (None: not
    sharded); in fp32, or computed in `dtype`. Returns {name: full gradient}."""
    import torch.distributed as dist
    model, cpu = tiny_gpt2(), torch.device("cpu")
    if every is None:
        step.forward_backward(tiny.single(model, dtype=dtype), micro)
        return {n: p.grad for n, p in model.named_parameters()}
    layout = processes.FSDP(processes.World(), cpu, dtype)  # in a group of one
    try:
        layout.wrap(model)
        layout.reduce_every_micro_batch = every
        step.forward_backward(layout, micro)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32 in any case
        return {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def micro():
    from batching import IGNORE
    torch.manual_seed(0)
    x = torch.randint(0, 512, (4, 2, 16))
    return [(x[i], torch.where(x[i] % 5 == 0, IGNORE, x[i])) for i in range(4)]


def test_reducing_every_micro_batch_gives_the_same_gradients(micro):
    plain = sharded_gradients(micro, every=None)
    assert max_diff(plain, sharded_gradients(micro, every=False)) < 1e-6
    assert max_diff(plain, sharded_gradients(micro, every=True)) < 1e-6


def test_bf16_computes_in_bf16_and_keeps_fp32_weights_and_gradients(micro):
    plain = sharded_gradients(micro, every=None)
    half = sharded_gradients(micro, torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in half.values())
    assert 1e-6 < max_diff(plain, half) < 2e-2  # bf16's rounding: computed in bf16, and close


def test_a_model_that_names_no_layers_is_refused_in_one_line():
    model = tiny_gpt2()
    model._no_split_modules = None
    with pytest.raises(cli.UserError, match="FSDP: GPT2LMHeadModel names no transformer layers"):
        sharding.layers(model)
    del model._no_split_modules  # the class's own again
    assert len(sharding.layers(model)) == 2


def test_a_full_disk_during_a_sharded_checkpoint_is_one_line_and_keeps_the_last(tmp_path, monkeypatch, micro):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    model = tiny_gpt2()
    tokenizer = gpt2_tokenizer()
    layout = processes.FSDP(processes.World(), torch.device("cpu"))  # in a group of one
    try:
        layout.wrap(model)
        net = layout.net
        optimizer = step.make_optimizer(model, 1e-3, 0.0, (0.9, 0.999))
        step.forward_backward(layout, micro)
        step.optimizer_step(model, optimizer, None, 1.0)
        sharding.save(str(tmp_path), net, optimizer, tokenizer, model.config, {"step": 1}, keep=2)

        class Full(dcp.FileSystemWriter):
            def write_data(self, plan, planner):
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(dcp, "FileSystemWriter", Full)
        with pytest.raises(cli.UserError, match=r"could not write .*step-00000002: .*No space left on device.*; "
                                                r"what was there before is intact"):
            sharding.save(str(tmp_path), net, optimizer, tokenizer, model.config, {"step": 2}, keep=2)
    finally:
        dist.destroy_process_group()
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000001"]  # no temp directory left, the last one intact
    assert checkpoints.check_manifest(tmp_path / "checkpoints" / "step-00000001", required=True) is None
