"""Tests for memory.py: what a training step will need (the estimate, a rank's share of it under DDP and FSDP), the
preflight that refuses, warns or passes, the settings it suggests, and whether FSDP's gradients stay unsharded
between micro-batches.

Run: .venv/bin/python -m pytest -q tests/test_memory.py
"""

import pytest
import torch
import transformers

import cli
import hardware
import memory
import modeling
from tiny import save_tiny_gpt2


def gpt2(n_layer=2, n_embd=32, n_head=2, vocab=512, positions=4096, dropout=0.1):
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(config)


CPU = torch.device("cpu")


def total(shape, *args, **kw):
    return sum(memory.step_memory(shape, *args, **kw).values())


# ---------------------------------------------------------------------------------------------------------------------
# the estimate

def test_the_estimate_grows_with_batch_and_block_and_shrinks_with_checkpointing_and_lora(tmp_path):
    shape = memory.model_shape(gpt2(), CPU)
    assert shape["scores"]  # SDPA on CPU with attention dropout: the scores are materialized, O(T^2)
    for ckpt in (False, True):
        by_batch = [total(shape, b, 256, ckpt) for b in (1, 2, 4, 8)]
        by_block = [total(shape, 4, t, ckpt) for t in (64, 128, 256, 512)]
        assert by_batch == sorted(set(by_batch)) and by_block == sorted(set(by_block))
    assert total(shape, 8, 512, True) < total(shape, 8, 512, False)
    # quadratic in the block where the scores are materialized, linear where attention is a fused kernel
    assert total(shape, 1, 8192, False) > 6 * total(shape, 1, 2048, False)
    fused = memory.model_shape(gpt2(dropout=0.0), CPU)
    assert not fused["scores"] and memory.step_memory(fused, 1, 8192, False)["attention scores"] == 0

    path = save_tiny_gpt2(str(tmp_path / "m"))
    full = modeling.adapt(modeling.load(path)[1], cli.load_config([]))
    lora = modeling.adapt(modeling.load(path)[1], cli.load_config(["--lora_r=4"]))
    full_terms = memory.estimate(full, cli.load_config([]), CPU)
    lora_terms = memory.estimate(lora, cli.load_config(["--lora_r=4"]), CPU)
    assert lora_terms["gradients and AdamW state"] < full_terms["gradients and AdamW state"] / 50
    assert sum(lora_terms.values()) < sum(full_terms.values())


# ---------------------------------------------------------------------------------------------------------------------
# the preflight and the settings it suggests

def test_preflight_refuses_warns_or_passes(monkeypatch):
    model = gpt2(n_layer=8)
    cfg = cli.load_config(["--batch_size=8", "--block_size=2048", "--model=some/model"])
    terms = memory.estimate(model, cfg, CPU)
    need = sum(terms.values()) - terms["weights"]  # the weights are loaded already
    cfg.GRADIENT_CHECKPOINTING = True
    terms = memory.estimate(model, cfg, CPU)
    need_ckpt = sum(terms.values()) - terms["weights"]
    cfg.GRADIENT_CHECKPOINTING = False
    assert need_ckpt < need
    for room, expect in ((need * 2, None), (need * 1.1, "warning: "), ((need + need_ckpt) / 2, cli.UserError)):
        monkeypatch.setattr(hardware, "available_memory", lambda device, processes=1: (int(room), "available RAM"))
        if expect is cli.UserError:
            with pytest.raises(cli.UserError) as e:
                memory.preflight(model, cfg, CPU)
            line = str(e.value)
            assert "\n" not in line and "BATCH_SIZE=8 x BLOCK_SIZE=2048" in line and "available RAM" in line
            assert f"{memory.gb(room)}" in line and "attention scores" in line and "logits" in line
            assert "--batch_size=" in line and "--block_size=" in line and "--gradient_checkpointing=True" in line
        else:
            note = memory.preflight(model, cfg, CPU)
            assert note is None if expect is None else note.startswith(expect)


def test_the_settings_suggested_do_fit():
    shape = memory.model_shape(gpt2(), CPU)
    cfg = cli.load_config(["--batch_size=8", "--grad_accum_steps=2", "--block_size=4096", "--model=some/model"])
    need = lambda b, t, ck=False, trained=None: (total(shape, b, t, ck, trained=trained)
                                                 - memory.step_memory(shape, b, t, ck)["weights"])
    room = need(8, 4096) // 3
    fits = memory.fitting_settings(shape, cfg, room, False)
    flags = dict(f.split("=") for s in fits for f in s.split() if f.startswith("--"))
    assert "--lora_r" not in flags  # LoRA's saving is the gradients and AdamW state: not what is short here
    batch, block = int(flags["--batch_size"]), int(flags["--block_size"])
    assert need(batch, 4096) <= room < need(batch * 2, 4096) and 8 % batch == 0
    assert int(flags["--grad_accum_steps"]) == 2 * 8 // batch  # the same global batch
    assert need(8, block) <= room < need(8, block + 8) and block % 8 == 0
    # nothing fits where even one short sequence does not
    assert memory.fitting_settings(shape, cfg, 1000, False) == []


# ---------------------------------------------------------------------------------------------------------------------
# several ranks: each one's share, under DDP and FSDP

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
