"""Tests for sharding.py (FSDP=True), in this process: the model sharded in a group of one computes the gradients the
unsharded one does (reduced after every micro-batch or only the last; in bf16 with fp32 weights and gradients), its
transformer layers found or refused in one line, and a full disk during a sharded checkpoint. torchrun's runs on
two ranks are in test_train_torchrun.py.

Run: .venv/bin/python -m pytest -q tests/test_sharding.py
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers

import checkpoints
import cli
import processes
import sharding
import step
import tiny
from batching import IGNORE
from tiny import gpt2_tokenizer, max_diff


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2,
                                                                n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def sharded_gradients(micro, dtype=None, every=False):
    """A tiny GPT-2's gradients from one step over `micro`, sharded in a group of one in this process (None: not
    sharded); in fp32, or computed in `dtype`. Returns {name: full gradient}."""
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
    torch.manual_seed(0)
    x = torch.randint(0, 512, (4, 2, 16))
    return [(x[i], torch.where(x[i] % 5 == 0, IGNORE, x[i]), None) for i in range(4)]


# ---------------------------------------------------------------------------------------------------------------------
# the gradients of a sharded model

def test_reducing_every_micro_batch_gives_the_same_gradients(micro):
    plain = sharded_gradients(micro, every=None)
    assert max_diff(plain, sharded_gradients(micro, every=False)) < 1e-6
    assert max_diff(plain, sharded_gradients(micro, every=True)) < 1e-6


def test_bf16_computes_in_bf16_and_keeps_fp32_weights_and_gradients(micro):
    plain = sharded_gradients(micro, every=None)
    half = sharded_gradients(micro, torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in half.values())
    assert 1e-6 < max_diff(plain, half) < 2e-2  # bf16's rounding: computed in bf16, and close


# ---------------------------------------------------------------------------------------------------------------------
# its layers, and its checkpoints on a full disk

def test_a_model_that_names_no_layers_is_refused_in_one_line():
    model = tiny_gpt2()
    model._no_split_modules = None
    with pytest.raises(cli.UserError, match="FSDP: GPT2LMHeadModel names no transformer layers"):
        sharding.layers(model)
    del model._no_split_modules  # the class's own again
    assert len(sharding.layers(model)) == 2


def test_a_full_disk_during_a_sharded_checkpoint_is_one_line_and_keeps_the_last(tmp_path, monkeypatch, micro):
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
