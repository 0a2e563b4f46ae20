"""step.py: one training step (token-weighted over micro-batches and ranks, clip, update) and the validation pass
(token-weighted, per group from the same pass, shared over the ranks).

Run: .venv/bin/python -m pytest -q tests/test_step.py
"""

import math

import pytest
import torch
import transformers

import processes
import step
import tiny
from batching import IGNORE


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
        out.append((x, y))
    return out


def reference(model, data):
    """Each target's loss from the model's own logits, in the order of the batches: what the pass must average."""
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1).double(),
                                                    y.flatten(), ignore_index=IGNORE, reduction="none")[y.flatten() != IGNORE]
                  for x, y in data]
    return torch.cat(losses)


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
    groups = [torch.where(y != IGNORE, x % 3 + 1, 0) for x, y in data]  # every target in group 1, 2 or 3
    overall, per = step.evaluate(tiny.single(model), data, groups=groups)
    every = reference(model, data)
    tags = torch.cat([g[y != IGNORE] for g, (_, y) in zip(groups, data)])
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
    groups = [torch.where(y != IGNORE, x % 2 + 1, 0) for x, y in data]
    sent = []
    for rank in range(size):
        layout = processes.Single(Ranks(rank, size, sent), torch.device("cpu"))
        layout.wrap(model)
        step.evaluate(layout, data, groups=groups)
    total = sum(sent)  # what every rank gets back from the all-reduce: [loss, targets] by group
    every, tags = reference(model, data), torch.cat([g[y != IGNORE] for g, (_, y) in zip(groups, data)])
    assert total[1, 1:].tolist() == [float((tags == k).sum()) for k in (1, 2)]  # each target counted once
    assert total[0].sum().item() / total[1].sum().item() == pytest.approx(every.mean().item(), rel=1e-6)


def test_k_micro_batches_equal_one_batch_of_all_of_them():
    data = batches(3, seed=5, rows=2) + batches(1, seed=6, rows=1)
    one, many = gpt2(), gpt2()
    x = torch.cat([torch.nn.functional.pad(b[0], (0, 0)) for b in data])
    y = torch.cat([b[1] for b in data])
    loss1, n1 = step.forward_backward(tiny.single(one.train()), [(x, y)])
    loss2, n2 = step.forward_backward(tiny.single(many.train()), data)
    assert n1 == n2 == int((y != IGNORE).sum())
    assert loss1 == pytest.approx(loss2, rel=1e-6)
    assert loss1 == pytest.approx(reference(one.eval(), [(x, y)]).mean().item(), rel=1e-5)
    diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(one.parameters(), many.parameters()))
    assert diff < 1e-6


def test_a_step_that_is_not_finite_changes_nothing():
    model = gpt2().train()
    layout = tiny.single(model)
    optimizer = step.make_optimizer(model, 1e-2, 0.0, (0.9, 0.999))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batches(1, seed=7)[0]
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = float("nan")
    mean, n, problem = step.train_step(layout, optimizer, None, [(x, y)], 1.0)
    assert math.isnan(mean) and problem == "the loss is nan" and n == int((y != IGNORE).sum())
    model.transformer.wte.weight.data[0, 0] = before["transformer.wte.weight"][0, 0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state  # no update was made
    mean, _, problem = step.train_step(layout, optimizer, None, [(x, y)], 1.0)
    assert math.isfinite(mean) and problem is None
    assert not torch.equal(before["lm_head.weight"], model.lm_head.weight)


def test_the_lr_is_set_on_every_group():
    model = gpt2()
    optimizer = step.make_optimizer(model, 1e-3, 0.1, (0.9, 0.999))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # never on biases and LayerNorms
    assert all(p.dim() < 2 for p in optimizer.param_groups[1]["params"])
    assert step.set_lr(optimizer, 5e-4) == 5e-4
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4]


# ---------------------------------------------------------------------------------------------------------------------
# the optimizer: fused AdamW computes what the plain one does

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
