"""Tests for preference tuning (preference.py, loss.model_logps, step.forward_backward_pairs): the pairs' records in
their common forms, rendered as training renders a dialogue with only the replies scored; the sequence
log-probabilities and the DPO loss and gradient against a direct computation from the full logits; a tie has no
gradient; a policy equal to its reference has loss log 2; and train.py's DPO runs end to end (accuracy up, resume
bit-exact after SIGKILL, LoRA, best/ and final/), prepare_data.py's pairs files, show_example and evaluate.py.

Run: .venv/bin/python -m pytest -q tests/test_preference.py
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import cli
import loss
import preference
import step
import tiny
from batching import IGNORE
from dialogues import parse_pair
from render import Rendering

PAIRS = [([("user", "what is the cat doing today")], [("assistant", "the cat sat on the table")],
          [("assistant", "dog")]),
         ([("user", "hi")], [("assistant", "hello there, how are you")], [("assistant", "go away now please")]),
         ([("user", "where"), ("assistant", "here"), ("user", "when")], [("assistant", "tomorrow")],
          [("assistant", "yesterday was very sad")])]


# ---------------------------------------------------------------------------------------------------------------------
# records

@pytest.mark.parametrize("record", [
    {"prompt": "hi", "chosen": "hello", "rejected": "go"},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "assistant", "content": "go"}]},
    {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
])
def test_the_common_forms_give_one_pair(record):
    assert parse_pair(record, "r") == ([("user", "hi")], [("assistant", "hello")], [("assistant", "go")])


@pytest.mark.parametrize("record, says", [
    ({"chosen": "a", "rejected": "b"}, "no 'prompt'"),
    ({"prompt": "hi", "chosen": 3, "rejected": "b"}, "'chosen' is a number"),
    ({"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "go"}]},
     "no reply of its own"),
    ({"prompt": "hi", "chosen": "a"}, "not a preference pair"),
])
def test_a_bad_record_is_one_line(record, says):
    with pytest.raises(cli.UserError, match=says):
        parse_pair(record, "r")


# ---------------------------------------------------------------------------------------------------------------------
# the sequence log-probabilities and the loss, against the full logits

@pytest.fixture(scope="module")
def batch():
    """The pairs rendered in the speaker format and packed into rows of 48 (so some rows hold several sequences)."""
    pairs = preference.Pairs(preference.render_pair(tiny.gpt2_tokenizer(), PAIRS, Rendering()))
    return pairs, preference.pair_batch(pairs, [0, 1, 2], tiny.EOS_ID, 48)


def direct_logps(model, pairs):
    """Each sequence's summed log-probability of its scored tokens, each sequence alone, from its full logits."""
    out = []
    for ids, mask in pairs.sequences:
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        out.append((logp * torch.tensor(mask[1:])).sum())
    return torch.stack(out)


def test_only_the_replies_are_scored_each_ending_with_eos(batch):
    pairs, _ = batch
    tok = tiny.gpt2_tokenizer()
    for (ids, mask), (_, reply) in zip(pairs.sequences, [(p, r) for p, c, r0 in PAIRS for r in (c, r0)]):
        scored = [t for t, m in zip(ids, mask) if m]
        assert scored[-1] == tiny.EOS_ID
        assert tok.decode(scored[:-1]) == f" {reply[0][1]}\n"
        assert tok.decode(ids).endswith(f"assistant: {reply[0][1]}\n<|endoftext|>")


def test_logps_and_gradient_equal_the_full_logits(batch):
    pairs, (x, y, seg, which, index, _) = batch
    assert seg is not None  # packed: pieces kept apart
    loss.use_chunk(5)  # several chunks per row
    try:
        got_model, want_model = tiny.gpt2(), tiny.gpt2()
        ref = torch.tensor([[-30.0, -40.0], [-20.0, -25.0], [-10.0, -60.0]])
        dpo = preference.Objective("dpo", 0.1)
        got = loss.ChunkedLoss(got_model)(x, y, seg, which=which, n=6)
        want = direct_logps(want_model, pairs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        lengths = torch.bincount(which, minlength=6)
        dpo.losses(got, ref, lengths)[0].sum().backward()
        dpo.losses(want, ref, lengths)[0].sum().backward()
        for (name, a), b in zip(got_model.named_parameters(), want_model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)
    finally:
        loss.use_chunk(0)


def test_policy_as_its_reference_has_loss_log_2(batch):
    pairs, micro = batch
    layout = tiny.single(tiny.gpt2())
    ref = preference.sequence_logps(layout, [micro], 3).float()  # the policy itself is the reference
    mean, figures = step.forward_backward_pairs(layout, [micro], preference.Objective("dpo", 0.1), ref)
    assert mean == pytest.approx(math.log(2), abs=1e-6)
    assert figures["pairs"] == 3 and figures["margin"] == pytest.approx(0, abs=1e-6)


def test_a_tie_has_no_gradient(batch):
    pairs, _ = batch
    tie = preference.Pairs([pairs.sequences[0], pairs.sequences[0]])
    model = tiny.gpt2()
    micro = [preference.pair_batch(tie, [0], tiny.EOS_ID, 64)]
    for objective, ref in ((preference.Objective("dpo", 0.1), torch.tensor([[-3.0, -9.0]])),
                           (preference.Objective("simpo", 2.0, 0.5), None)):
        model.zero_grad()
        mean, _ = step.forward_backward_pairs(tiny.single(model), micro, objective, ref)
        assert mean > 0.1  # a loss, but no direction to move in
        grads = [p.grad.abs().max().item() for p in model.parameters() if p.grad is not None]
        assert grads and max(grads) < 1e-7
