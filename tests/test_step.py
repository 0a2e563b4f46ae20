"""Tests for step.py: one training step (token-weighted over micro-batches and ranks, clip, update; one that is not
finite changes nothing), the optimizer (fused AdamW, the lr), and the validation pass (the plain per-token mean of
-log p(next token), per group from the same pass, shared over the ranks, every token of a windowed dialogue once).

Run: .venv/bin/python -m pytest -q tests/test_step.py
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch
import transformers

import batching
import loss
import processes
import step
import tiny
from batching import IGNORE, collate, count, make_blocks
from dialogues import format_dialogue
from render import render
from tiny import EOS_ID, gpt2_tokenizer, synthetic


def gpt2(dropout=0.0):
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout))


def batches(n, seed, rows=2, width=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 97, (rows, width), generator=g)
        y = torch.where(torch.rand(rows, width, generator=g) < 0.3, IGNORE, torch.randint(0, 97, (rows, width),
                                                                                          generator=g))
        out.append((x, y, None))  # as collate makes a batch: every row one piece
    return out


def reference(model, data):
    """Each target's loss from the model's own logits, in the order of the batches: what the pass must average."""
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1).double(),
                                                    y.flatten(), ignore_index=IGNORE, reduction="none")[y.flatten() != IGNORE]
                  for x, y, _ in data]
    return torch.cat(losses)


# ---------------------------------------------------------------------------------------------------------------------
# the validation pass

def test_validation_is_token_weighted_and_leaves_the_model_as_it_was():
    model = gpt2(dropout=0.1).eval()
    data = batches(3, seed=1) + batches(1, seed=2, rows=1, width=40)  # batches of unequal size: a mean of means errs
    want = reference(model, data).mean().item()
    assert step.evaluate(tiny.single(model), data) == pytest.approx(want, rel=1e-6)
    assert not model.training  # evaluate.py generates next, with dropout off
    model.train()
    assert step.evaluate(tiny.single(model), data) == pytest.approx(want, rel=1e-6)  # scored without dropout ...
    assert model.training  # ... and handed back to training as it was
    means = [reference(model.eval(), [b]).mean().item() for b in data]
    assert abs(sum(means) / len(means) - want) > 1e-3  # the test can tell a mean of means


def test_per_group_losses_come_from_the_same_pass():
    model = gpt2().eval()
    data = batches(4, seed=3)
    groups = [torch.where(y != IGNORE, x % 3 + 1, 0) for x, y, _ in data]  # every target in group 1, 2 or 3
    overall, per = step.evaluate(tiny.single(model), data, groups=groups)
    every = reference(model, data)
    tags = torch.cat([g[y != IGNORE] for g, (_, y, _) in zip(groups, data)])
    assert overall == pytest.approx(every.mean().item(), rel=1e-6)
    assert per.keys() == {1, 2, 3}
    for k, value in per.items():
        assert value == pytest.approx(every[tags == k].mean().item(), rel=1e-6)


class Ranks(processes.World):
    """Rank `rank` of a world of `size` with no process group: its sums are kept for the test to add up, as the
    all-reduce would, instead of being sent."""

    def __init__(self, rank, size, sent):
        super().__init__(rank, size)
        self.sent = sent

    def sum(self, tensor):
        self.sent.append(tensor.clone())
        return tensor


@pytest.mark.parametrize("n_batches, size", [(5, 2), (4, 2), (3, 4)])  # a share one short; shares even; idle ranks
def test_each_rank_scores_its_share_and_together_they_score_each_target_once(n_batches, size):
    model = gpt2().eval()
    data = batches(n_batches, seed=4)
    groups = [torch.where(y != IGNORE, x % 2 + 1, 0) for x, y, _ in data]
    sent = []
    for rank in range(size):
        layout = processes.Single(Ranks(rank, size, sent), torch.device("cpu"))
        layout.wrap(model)
        step.evaluate(layout, data, groups=groups)
    total = sum(sent)  # what every rank gets back from the all-reduce: [loss, targets] by group
    every, tags = reference(model, data), torch.cat([g[y != IGNORE] for g, (_, y, _) in zip(groups, data)])
    assert total[1, 1:].tolist() == [float((tags == k).sum()) for k in (1, 2)]  # each target counted once
    assert total[0].sum().item() / total[1].sum().item() == pytest.approx(every.mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# the validation loss by hand, on dialogues rendered as training renders them

DIALOGUES = [
    [("Alex", "Hello there, how was the garden today?"), ("Bob", "Quite sunny, the dog sat under the table.")],
    [("Cara", "Did you see the big cat on the roof?"), ("Dan", "Yes!"), ("Cara", "It ran home later, very happy.")],
    [("Bob", "We want to go home now, please."), ("Alex", "Maybe tomorrow, it is late and quite dark.")],
]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    # wide initialisation: a near-uniform model would hide a target lost or added in the noise
    config = transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.5)
    return transformers.GPT2LMHeadModel(config).eval()


def rendered_ids(tok, turns):
    """A dialogue's tokens as training renders them: label and text tokenized apart, EOS at the end."""
    ids = []
    for s, t in turns:
        for piece in (f"{s}:", f" {t}\n"):
            ids += tok(piece, add_special_tokens=False)["input_ids"]
    return ids + [EOS_ID]


def hand_nll(model, tok, dialogues):
    """-log p of every next token, each dialogue run on its own from its leading EOS."""
    nll = []
    with torch.no_grad():
        for turns in dialogues:
            ids = tok(tok.eos_token + format_dialogue(turns) + tok.eos_token)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
            nll += (-logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).tolist()
    return nll


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_loss_equals_hand_computation(lm, batch_size):
    tok = gpt2_tokenizer()
    for d in DIALOGUES:  # the whole text tokenizes as training's label/text pieces do, EOS included
        assert tok(tok.eos_token + format_dialogue(d) + tok.eos_token)["input_ids"] == [EOS_ID] + rendered_ids(tok, d)
    block_size = 32
    blocks = batching.make_blocks(tok, DIALOGUES, block_size)
    sizes = [len(rendered_ids(tok, d)) for d in DIALOGUES]
    # each dialogue fits a block and no two share one, so each is scored on its own as the hand computation does
    assert len(blocks) == len(DIALOGUES) and max(sizes) <= block_size < 2 * min(sizes)
    mean = step.evaluate(tiny.single(lm), batching.eval_batches(blocks, batch_size, EOS_ID))
    nll = hand_nll(lm, tok, DIALOGUES)
    expected = sum(nll) / len(nll)
    assert mean == pytest.approx(expected, abs=1e-4)
    assert math.exp(mean) == pytest.approx(math.exp(expected), rel=1e-4)
    # the test can tell: leaving out one target (the last EOS) moves the mean well beyond the tolerance
    assert abs(sum(nll[:-1]) / (len(nll) - 1) - expected) > 1e-3


@pytest.mark.parametrize("block_size", [16, 64])  # 16: dialogues cut into windows; 64: several packed in a block
def test_per_speaker_losses_come_from_the_same_pass(lm, block_size):
    tok, cpu, speakers = gpt2_tokenizer(), torch.device("cpu"), ["Alex", "Cara"]
    blocks = batching.make_blocks(tok, DIALOGUES, block_size, speakers=speakers)
    groups = batching.eval_groups(blocks, 2, block_size)
    overall, per = step.evaluate(tiny.single(lm), batching.eval_batches(blocks, 2, EOS_ID, block_size), groups=groups)
    plain = batching.eval_batches(batching.make_blocks(tok, DIALOGUES, block_size), 2, EOS_ID, block_size)
    assert overall == pytest.approx(step.evaluate(tiny.single(lm), plain), rel=1e-6)
    # each group's loss by hand: the same blocks, trained only where a turn is that speaker's (or no listed one's)
    for tag, name in enumerate([*speakers, None], 1):
        keep = lambda s: s == name or (name is None and s not in speakers)
        only = batching.tokenize(tok, DIALOGUES)
        only.mask = np.array([m if keep(s) else 0 for turns, d in zip(render(tok, DIALOGUES), DIALOGUES)
                              for (_, mask), (s, _) in zip(turns, d) for m in mask], np.uint8)
        by_hand = batching.eval_batches(batching.pack_tokens(only, block_size), 2, EOS_ID, block_size)
        assert per[tag] == pytest.approx(step.evaluate(tiny.single(lm), by_hand), rel=1e-5), name
    assert sorted(per) == [1, 2, 3]


def test_windowed_loss_covers_every_token_once(lm):
    tok = gpt2_tokenizer()
    everything = Counter(t for d in DIALOGUES for t in rendered_ids(tok, d))
    for block_size in (8, 12):  # cuts at turn boundaries and inside long turns
        blocks = batching.make_blocks(tok, DIALOGUES, block_size)
        assert len(blocks) > len(DIALOGUES)
        batches = batching.eval_batches(blocks, 4, EOS_ID)
        targets = Counter(int(t) for _, y, _ in batches for t in y[y != batching.IGNORE])
        assert targets == everything
        assert sum(everything.values()) == sum(int((y != batching.IGNORE).sum()) for _, y, _ in batches)
        assert math.isfinite(step.evaluate(tiny.single(lm), batches))


# ---------------------------------------------------------------------------------------------------------------------
# a training step

def test_k_micro_batches_equal_one_batch_of_all_of_them():
    data = batches(3, seed=5, rows=2) + batches(1, seed=6, rows=1)
    one, many = gpt2(), gpt2()
    x = torch.cat([torch.nn.functional.pad(b[0], (0, 0)) for b in data])
    y = torch.cat([b[1] for b in data])
    loss1, n1 = step.forward_backward(tiny.single(one.train()), [(x, y, None)])
    loss2, n2 = step.forward_backward(tiny.single(many.train()), data)
    assert n1 == n2 == int((y != IGNORE).sum())
    assert loss1 == pytest.approx(loss2, rel=1e-6)
    assert loss1 == pytest.approx(reference(one.eval(), [(x, y, None)]).mean().item(), rel=1e-5)
    diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(one.parameters(), many.parameters()))
    assert diff < 1e-6


def test_accumulation_equals_one_batch_in_process():
    tok = gpt2_tokenizer()
    blocks = sorted(make_blocks(tok, synthetic(12, seed=8, max_turns=6), 32), key=lambda b: -len(b[0]))
    four = [blocks[0], blocks[1], blocks[-2], blocks[-1]]  # two long, two short: the micro-batches differ in size
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).double().train()
    cpu = torch.device("cpu")

    def step_grads(micro_batches, per_micro_mean=False):
        """Gradients of one optimizer step, as train.py takes it: every micro-batch's summed loss over the whole
        step's target count, backward per micro-batch (or, per_micro_mean, the naive mean of means)."""
        model.zero_grad(set_to_none=True)
        batches = [collate(b, EOS_ID) for b in micro_batches]
        n_targets = sum(int((y != IGNORE).sum()) for _, y, _ in batches)
        total = 0.0
        for x, y, seg in batches:
            mean = loss.model_loss(model, x, y, seg=seg) / (int((y != IGNORE).sum()) * len(batches) if per_micro_mean
                                                            else n_targets)
            mean.backward()
            total += mean.item()
        return total, {k: p.grad.clone() for k, p in model.named_parameters()}

    def grad_diff(g1, g2):
        return max((g1[k] - g2[k]).abs().max().item() for k in g1)

    loss1, g1 = step_grads([four])
    loss2, g2 = step_grads([four[:2], four[2:]])
    assert loss1 == pytest.approx(loss2, rel=1e-6)  # model_loss takes the cross-entropy in fp32
    assert grad_diff(g1, g2) < 1e-5
    assert grad_diff(g1, step_grads([four[:2], four[2:]], per_micro_mean=True)[1]) > 1e-3  # the test can tell

    # train.py's own step function, on the same micro-batches
    for micro_batches in ([four], [four[:2], four[2:]]):
        model.zero_grad(set_to_none=True)
        mean, n_targets = step.forward_backward(tiny.single(model), [collate(b, EOS_ID) for b in micro_batches])
        assert mean == pytest.approx(loss1, rel=1e-6)
        assert n_targets == count(four)[0]  # every trained token of these blocks, each once
        assert grad_diff(g1, {k: p.grad for k, p in model.named_parameters()}) < 1e-5


def test_a_step_that_is_not_finite_changes_nothing():
    model = gpt2().train()
    layout = tiny.single(model)
    optimizer = step.make_optimizer(model, 1e-2, 0.0, (0.9, 0.999))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, _ = batches(1, seed=7)[0]
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = float("nan")
    mean, n, problem = step.train_step(layout, optimizer, None, [(x, y, None)], 1.0)
    assert math.isnan(mean) and problem == "the loss is nan" and n == int((y != IGNORE).sum())
    model.transformer.wte.weight.data[0, 0] = before["transformer.wte.weight"][0, 0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state  # no update was made
    mean, _, problem = step.train_step(layout, optimizer, None, [(x, y, None)], 1.0)
    assert math.isfinite(mean) and problem is None
    assert not torch.equal(before["lm_head.weight"], model.lm_head.weight)


def test_non_finite_gradients_are_not_applied():
    # a finite loss can still give an infinite gradient: the step must not write it into the weights (nor into a
    # checkpoint after it)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    optimizer = step.make_optimizer(layer, 1e-2, 0.0, (0.9, 0.999))
    layer(torch.ones(1, 4)).sum().backward()
    layer.weight.grad[0, 0] = float("inf")
    assert step.optimizer_step(layer, optimizer, None, grad_clip=1.0) is False
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert layer.weight.grad is None  # and nothing is left to add to the next step's
    layer(torch.ones(1, 4)).sum().backward()
    assert step.optimizer_step(layer, optimizer, None, grad_clip=1.0) is True
    assert not torch.equal(before["weight"], layer.weight)


# ---------------------------------------------------------------------------------------------------------------------
# the optimizer

def test_the_lr_is_set_on_every_group():
    model = gpt2()
    optimizer = step.make_optimizer(model, 1e-3, 0.1, (0.9, 0.999))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # never on biases and LayerNorms
    assert all(p.dim() < 2 for p in optimizer.param_groups[1]["params"])
    assert step.set_lr(optimizer, 5e-4) == 5e-4
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4]


def test_fused_adamw_matches_the_plain_one():
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).double()  # float64: only real differences show
    fused = transformers.GPT2LMHeadModel(plain.config).double()
    fused.load_state_dict(plain.state_dict())
    cpu = torch.device("cpu")
    opt_fused = step.make_optimizer(fused, 1e-2, 0.1, (0.9, 0.99))
    assert all(group["fused"] for group in opt_fused.param_groups)
    groups = [{"params": [p for p in plain.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in plain.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt_plain = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99), foreach=False)
    x = torch.randint(0, 100, (2, 16))
    for _ in range(3):
        for model, opt in ((plain, opt_plain), (fused, opt_fused)):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    diff = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), fused.parameters()))
    assert diff < 1e-9
    moved = max((a - b).abs().max().item()
                for a, b in zip(plain.parameters(), transformers.GPT2LMHeadModel(plain.config).parameters()))
    assert moved > 1e-3  # the steps did something
