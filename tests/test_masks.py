"""masks.py: a packed row is several sequences to the model. The logits of packed pieces equal each piece's alone, for
every family we train (GPT-2, Llama, Qwen3, Gemma 2 and 3, GPT-NeoX, Phi-3), in training and in validation, with
LoRA and gradient checkpointing, in one process, under DDP and under FSDP; a model that ignores our mask is found
and gets a piece a row.

Run: .venv/bin/python -m pytest -q tests/test_masks.py
"""

import pytest
import torch
import torch.distributed as dist
import transformers

import cli
import masks
import modeling
import processes
import step
import tiny
from batching import IGNORE, collate, rows

V = 101
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def family(name):
    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0))
    if name == "neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rotary_pct=0.25))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    if name == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=8))
    if name == "gemma2":  # eager attention with a softcap: it adds the mask to its scores
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SMALL, head_dim=8, sliding_window=64))
    if name == "gemma3":
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=64))
    if name == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL, pad_token_id=0))
    raise ValueError(name)


FAMILIES = ["gpt2", "neox", "llama", "qwen3", "gemma2", "gemma3", "phi3"]


def blocks(seed=0):
    """Three packed blocks of pieces of uneven length, as batching.Blocks gives them: (ids, mask, starts); a piece is
    its context token (mask 0) and its tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([9, 14, 6], [20], [5, 5, 12, 3]):
        ids, mask, starts = [], [], []
        for n in lengths:
            starts.append(len(ids))
            ids += torch.randint(1, V, (n,), generator=g).tolist()
            mask += [0] + [1] * (n - 1)
        out.append((ids, mask, starts))
    return out


def alone(model, block):
    """Each piece of a block run alone, its logits over the piece's inputs (all but its last token), in order."""
    ids, _, starts = block
    bounds = [*starts, len(ids)]
    out = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        last = k == len(starts) - 1
        piece = torch.tensor(ids[a:b - last] if last else ids[a:b])[None]  # the block's last token is no input
        out.append(model(input_ids=piece).logits[0])
    return torch.cat(out)


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_pieces_give_the_logits_each_gives_alone(name):
    model = family(name).eval()
    form = masks.form(model)  # the first form that works, found by the probe
    assert form == (masks.ADDITIVE if name == "gemma2" else masks.PIECES)  # Gemma 2's attention is eager
    x, _, seg = collate(blocks(), 0)
    assert seg is not None
    with torch.no_grad():
        shared = model(input_ids=x).logits  # the pieces seeing each other, as packing was
        # each form that the model's attention takes: for an SDPA model, the boolean mask works as well
        for f in (form,) + ((masks.BOOL,) if form == masks.PIECES else ()):
            packed = model(input_ids=x, **masks.inputs(seg, f)).logits
            for i, block in enumerate(blocks()):
                n = len(block[0]) - 1
                want = alone(model, block)
                assert (packed[i, :n] - want).abs().max() < 1e-5, (f, i)
                if len(block[2]) > 1:
                    assert (shared[i, :n] - want).abs().max() > 1e-3  # the test can tell


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
def test_the_loss_of_packed_pieces_is_theirs_alone_in_training_and_validation(name):
    model = family(name).train()  # no dropout in these: training's forward is validation's
    data = blocks(1)
    x, y, seg = collate(data, 0)
    layout = tiny.single(model)
    per_target = layout.scorer(x, y, seg, reduction="none").detach()
    with torch.no_grad():
        want = []
        for i, (ids, mask, starts) in enumerate(data):
            logits = alone(model, (ids, mask, starts))
            targets = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            want.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none")[keep])
    assert torch.allclose(per_target, torch.cat(want), atol=1e-5)
    mean, n = step.forward_backward(layout, [(x, y, seg)])  # and the step trains on those losses ...
    assert n == len(per_target) and mean == pytest.approx(per_target.mean().item(), rel=1e-5)
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)  # ... with the gradients of the pieces alone
    sum(torch.nn.functional.cross_entropy(alone(model, (ids, mask, starts)), torch.tensor(ids[1:]), reduction="none")
        [torch.tensor(mask[1:], dtype=torch.bool)].sum() for ids, mask, starts in data).div(n).backward()
    assert max((packed[k] - p.grad).abs().max().item() for k, p in model.named_parameters()) < 1e-6
    assert step.evaluate(layout, [(x, y, seg)]) == pytest.approx(per_target.mean().item(), rel=1e-5)


@pytest.mark.parametrize("settings", [["--lora_r=4", "--lora_dropout=0.0"], ["--gradient_checkpointing=True"],
                                      ["--lora_r=4", "--lora_dropout=0.0", "--gradient_checkpointing=True"]])
def test_lora_and_gradient_checkpointing_keep_the_pieces_apart(settings):
    model = modeling.adapt(family("llama"), cli.load_config(settings)).train()
    with torch.no_grad():
        for n, p in model.named_parameters():  # peft starts B at zero: give the adapters something to say
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x, y, seg = collate(blocks(2), 0)
    layout = tiny.single(model)
    got = layout.scorer(x, y, seg, reduction="none")
    with torch.no_grad():
        want = torch.cat([torch.nn.functional.cross_entropy(alone(model, b), torch.tensor(b[0][1:]), reduction="none")
                          [torch.tensor(b[1][1:], dtype=torch.bool)] for b in blocks(2)])
    assert torch.allclose(got, want, atol=1e-5)
    total = layout.scorer(x, y, seg)  # in training: gradient checkpointing recomputes each layer with the same mask
    total.backward()
    assert total.item() == pytest.approx(want.sum().item(), rel=1e-5)
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


def test_ddp_and_fsdp_keep_the_pieces_apart():
    x, y, seg = collate(blocks(3), 0)
    want = tiny.single(family("llama").train()).scorer(x, y, seg, reduction="none").detach()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = processes.DDP(processes.World(0, 1, backend="gloo"), torch.device("cpu"))
        ddp.wrap(family("llama").train())
        assert torch.allclose(ddp.net(x, y, seg, reduction="none").detach(), want, atol=1e-6)
    finally:
        dist.destroy_process_group()
    fsdp = processes.FSDP(processes.World(), torch.device("cpu"))  # in a group of one
    try:
        fsdp.wrap(family("llama").train())
        assert torch.allclose(fsdp.net(x, y, seg, reduction="none").detach(), want, atol=1e-5)
    finally:
        dist.destroy_process_group()


class Deaf(transformers.LlamaForCausalLM):
    """A model whose attention ignores a mask and positions of ours: all it takes is the ids."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


def test_a_model_that_ignores_the_mask_gets_a_piece_a_row():
    torch.manual_seed(0)
    model = Deaf(transformers.LlamaConfig(**SMALL)).eval()
    assert masks.form(model) is None
    assert "does not keep packed pieces apart, so each piece gets a row of its own" in masks.describe(model)
    with pytest.raises(ValueError, match="split=True"):
        masks.inputs(collate(blocks(), 0)[2], None)
    x, y, seg = collate(blocks(), 0, split=True)
    pieces = rows(blocks(), split=True)
    assert seg is None and len(x) == len(pieces) == 8  # a row a piece: the model's own causal mask is exact
    with torch.no_grad():
        got = model(input_ids=x).logits
        for k, (ids, mask) in enumerate(pieces):
            assert x[k, :len(ids) - 1].tolist() == ids[:-1] and mask[0] == 0  # each row is one piece, from its start
            want = model(input_ids=torch.tensor(ids[:-1])[None]).logits[0]
            assert (got[k, :len(ids) - 1] - want).abs().max() < 1e-5


def test_positions_start_at_0_in_each_piece_and_padding_is_a_piece_of_its_own():
    x, y, seg = collate([([7] * 4, [0, 1, 1, 1], [0]), ([5, 6, 7, 8, 9, 10], [0, 1, 1, 0, 1, 1], [0, 3])], 0)
    assert seg.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]  # row 0: 3 inputs, then padding; row 1: two pieces
    got = masks.inputs(seg, masks.BOOL)
    assert got["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    keep = got["attention_mask"][1, 0]
    assert keep.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert y[1].tolist() == [6, 7, IGNORE, 9, 10]  # the first piece's last input has no target in the second
    additive = masks.inputs(seg, masks.ADDITIVE)["attention_mask"][1, 0]
    assert (additive == 0).equal(keep) and (additive[~keep] == torch.finfo(torch.float32).min).all()
    assert collate([([7] * 4, [0, 1, 1, 1], [0]), ([5, 6, 7], [0, 1, 1])], 0)[2] is None  # one piece a row
