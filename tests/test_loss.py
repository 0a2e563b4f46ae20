"""The chunked loss (loss.py) against the full-logits one: the same loss and gradients for each kind of output layer
(tied and untied, with a bias, softcapped, scaled), with LoRA, accumulated and validated; no tensor of more than one
chunk's logits; the full logits, with a line, for a model it cannot take apart.

Run: .venv/bin/python -m pytest -q tests/test_loss.py
"""

import weakref

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import loss
import modeling
import step
import tiny
from batching import IGNORE
from tiny import gpt2_tokenizer, save_tiny_gpt2

V = 50257  # GPT-2's vocabulary: the tokenizer saved beside each model
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
# a cap and scales far from 1, so that a transformation left out would show in the loss at once
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)),  # untied
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=8)),  # tied
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **SMALL, head_dim=8, final_logit_softcapping=0.5)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **SMALL, head_dim=8, final_logit_softcapping=0.5)),
    "cohere": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=0.25)),
    "phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(  # an output layer with a bias
        **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"})),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> model directory: each family built once (seed 0) and saved with GPT-2's tokenizer."""
    root = tmp_path_factory.mktemp("models")
    paths = {"gpt2": save_tiny_gpt2(str(root / "gpt2"))}
    for name, build in FAMILIES.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name, safe_serialization=True)
        gpt2_tokenizer().save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(autouse=True)
def auto_chunk(monkeypatch):
    monkeypatch.setattr(loss, "CHUNK", 0)  # a test's LOSS_CHUNK does not outlive it


def batch(seed, rows=3, width=40, masked=0.3):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, V, (rows, width), generator=g), torch.randint(0, V, (rows, width), generator=g)
    y[torch.rand(rows, width, generator=g) < masked] = IGNORE
    return x, y, None  # a batch as collate makes one: every row one piece


def full_step(model, micro):
    """The reference: every micro-batch's full-logits loss over the step's target count, backward; (mean loss,
    gradients)."""
    model.zero_grad(set_to_none=True)
    n = sum(int((y != IGNORE).sum()) for _, y, _ in micro)
    total = 0.0
    for x, y, _ in micro:
        part = loss.full_losses(model, x, y) / n
        part.backward()
        total += part.item()
    return total, grads(model)


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def close(mean, want_mean, g, want_g):
    """Within 1e-5: the mean loss (relative), the gradients (relative to the largest)."""
    assert g.keys() == want_g.keys() and g
    scale = max(v.abs().max().item() for v in want_g.values())
    diff = max((g[k] - want_g[k]).abs().max().item() for k in g)
    assert mean == pytest.approx(want_mean, rel=1e-5)
    assert diff <= 1e-5 * scale, (diff, scale)


class Widest(TorchDispatchMode):
    """What the ops make of vocabulary-wide tensors (a last dimension of V): the most rows of any one (rows), and the
    most rows of them alive at once (peak), counted from their making until they are freed."""

    def __init__(self):
        super().__init__()
        self.rows, self.peak, self.live = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()]
                 if isinstance(a, torch.Tensor)}  # a view or an in-place op's output is memory already counted
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == V
                    and t.untyped_storage().data_ptr() not in given):
                self.rows = max(self.rows, t.numel() // V)
                self.live[id(t)] = t.numel() // V
                weakref.finalize(t, self.live.pop, id(t), None)  # when torch frees it, Python's object goes too
                self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("family", ["gpt2", *FAMILIES])
def test_same_loss_and_gradients_as_the_full_logits(saved, family, monkeypatch):
    model = modeling.load(saved[family])[1].train()
    head = loss.head_of(model)
    assert head is not None  # taken apart, not the fallback
    if family.startswith("gemma"):
        assert head.cap == 0.5
    if family == "cohere":
        assert head.scale == 0.25
    # two micro-batches of different sizes (token weighting); the first has 256 positions, a fifth of them targets
    micro = [batch(1, rows=4, width=64, masked=0.8), batch(2, rows=2, width=24)]
    most = max(int((y != IGNORE).sum()) for _, y, _ in micro)  # the targets of one micro-batch, the most one chunk holds
    with Widest() as full:
        want_mean, want_g = full_step(model, micro)
    assert full.rows == 256 and full.peak >= 2 * 256  # the reference makes them all: the logits, then log-softmax
    # LOSS_CHUNK unset, the whole micro-batch's targets in one chunk (the vocabulary is small), and in chunks of 16
    # (a smaller budget); LOSS_CHUNK=7, the last chunk shorter
    for chunk, budget in ((0, loss.CPU_BUDGET), (0, 16 * 4 * V), (7, loss.CPU_BUDGET)):
        loss.use_chunk(chunk)
        monkeypatch.setattr(loss, "CPU_BUDGET", budget)
        rows = min(loss.chunk_size(V, torch.device("cpu")), most)
        assert 4 * rows <= full.rows  # the test can tell: the full logits are four times the most allowed, or more
        model.zero_grad(set_to_none=True)
        with Widest() as widest:
            mean, n = step.forward_backward(tiny.single(model), micro)
        assert n == sum(int((y != IGNORE).sum()) for _, y, _ in micro)
        close(mean, want_mean, grads(model), want_g)
        # never more than a chunk's logits at once; with a softcap, its derivative beside them
        assert widest.rows == rows and widest.peak <= 2 * rows, (chunk, budget, widest.rows, widest.peak)


def test_positions_without_a_target_never_reach_the_output_layer(saved):
    model = modeling.load(saved["llama"])[1].train()
    x, y, _ = batch(3, masked=1.0)
    y[0, 5], y[2, 30] = 11, 12  # two targets in 120 positions
    loss.head_of(model)  # its probe runs the model's own forward, once
    with Widest() as widest:
        total, n = loss.model_loss(model, x, y), (y != IGNORE).sum()
        total.backward()
    assert int(n) == 2 and widest.rows == 2
    x, y, _ = batch(4, masked=1.0)  # none at all (a rank's dummy batch under DDP): nothing, and every weight a gradient
    model.zero_grad(set_to_none=True)
    total, n = loss.model_loss(model, x, y), (y != IGNORE).sum()
    total.backward()
    assert total.item() == 0 and int(n) == 0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora(saved, family):
    cfg = cli.load_config(["--gradient_checkpointing=True", "--lora_r=4", "--lora_alpha=8", "--lora_dropout=0.0",
                           "--seed=0"])
    model = modeling.adapt(modeling.load(saved[family])[1], cfg).train()
    with torch.no_grad():  # peft starts B at zero: give the adapters something to say
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert loss.head_of(model) is not None
    micro = [batch(5), batch(6)]
    want_mean, want_g = full_step(model, micro)
    loss.use_chunk(5)
    model.zero_grad(set_to_none=True)
    mean, _ = step.forward_backward(tiny.single(model), micro)
    got = grads(model)
    assert got and all("lora_" in k for k in got)  # the frozen head got no gradient
    close(mean, want_mean, got, want_g)


def test_bf16_autocast_matches_the_full_logits_in_bf16(saved):
    model = modeling.load(saved["llama"])[1].train()
    x, y, _ = batch(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss.full_losses(model, x, y)
        loss.use_chunk(16)
        got = loss.model_loss(model, x, y)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-2)


def test_validation_and_per_group_losses(saved):
    model = modeling.load(saved["gemma2"])[1]
    batches = [batch(8), batch(9, rows=2)]
    groups = [torch.where(y != IGNORE, (x % 3) + 1, 0) for x, y, _ in batches]
    loss.use_chunk(6)
    overall, per = step.evaluate(tiny.single(model), batches, groups=groups)
    with torch.no_grad():
        every = torch.cat([loss.full_losses(model, x, y, reduction="none") for x, y, _ in batches])
    tags = torch.cat([g[y != IGNORE] for g, (_, y, _) in zip(groups, batches)])
    assert overall == pytest.approx(every.mean().item(), rel=1e-5)
    assert per.keys() == {1, 2, 3}
    for k, value in per.items():
        assert value == pytest.approx(every[tags == k].mean().item(), rel=1e-5)
    assert step.evaluate(tiny.single(model), batches) == pytest.approx(overall, rel=1e-6)


class Doubled(transformers.LlamaForCausalLM):
    """A model that does something to its logits that loss.py does not know of."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_model_it_cannot_take_apart_takes_the_full_logits_with_a_line(capsys):
    torch.manual_seed(0)
    model = Doubled(transformers.LlamaConfig(**SMALL)).train()
    x, y, _ = batch(10)
    total, n = loss.model_loss(model, x, y), (y != IGNORE).sum()
    assert capsys.readouterr().out.count("loss: Doubled: its logits are not") == 1
    assert loss.head_of(model) is None
    assert total.item() == pytest.approx(loss.full_losses(model, x, y).item(), rel=1e-6)
    loss.model_loss(model, x, y)
    assert capsys.readouterr().out == ""  # said once a model


def test_lora_on_the_output_layer_takes_the_full_logits(saved, capsys):
    cfg = cli.load_config(["--lora_r=4", "--lora_alpha=8", "--lora_dropout=0.0", "--lora_targets=['q_proj', 'lm_head']",
                           "--seed=0"])
    model = modeling.adapt(modeling.load(saved["llama"])[1], cfg).train()
    x, y, _ = batch(11)
    total = loss.model_loss(model, x, y)
    assert "not a linear layer; the loss takes the full logits" in capsys.readouterr().out
    assert total.item() == pytest.approx(loss.full_losses(model, x, y).item(), rel=1e-6)


def test_chunk_size_from_the_vocabulary_and_loss_chunk():
    cpu = torch.device("cpu")
    assert loss.chunk_size(128256, cpu) == loss.CPU_BUDGET // (4 * 128256)
    assert loss.chunk_size(262144, cpu) < loss.chunk_size(128256, cpu) < loss.chunk_size(32000, cpu)
    assert loss.chunk_size(10 ** 9, cpu) == loss.MIN_CHUNK
    loss.use_chunk(33)
    assert loss.chunk_size(128256, cpu) == 33
    loss.use_chunk(None)
    assert loss.chunk_size(128256, cpu) == loss.CPU_BUDGET // (4 * 128256)
    for bad in (-1, 1.5, "8", True):
        with pytest.raises(modeling.UserError, match="LOSS_CHUNK"):
            loss.use_chunk(bad)
