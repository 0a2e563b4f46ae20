"""Tests for batching.py: windows, packing, Tokens, collate and its labels, with the real GPT-2 tokenizer.

Run: .venv/bin/python -m pytest -q tests/test_batching.py
"""

from collections import Counter

import pytest

import batching
from batching import IGNORE, collate, count, epoch_order, make_blocks, tokenize, windows
from render import render
from tiny import EOS_ID, gpt2_tokenizer, synthetic


def test_labels_by_position_and_padding_on_the_right():
    tok = gpt2_tokenizer()
    blocks = make_blocks(tok, synthetic(30, seed=6, max_turns=8), 64)
    pad = tok.eos_token_id  # as train.py pads: the same id as the EOS that must be learned
    x, y = collate(blocks, pad)
    assert x.shape == y.shape == (len(blocks), max(len(ids) for ids, _ in blocks) - 1)
    padded = 0
    for i, (ids, mask) in enumerate(blocks):
        n = len(ids) - 1
        assert x[i, :n].tolist() == ids[:-1]
        assert y[i, :n].tolist() == [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        assert (x[i, n:] == pad).all() and (y[i, n:] == IGNORE).all()
        padded += x.shape[1] - n
    assert padded > 0
    assert (y == EOS_ID).any()


def test_windows_cover_every_token_once():
    tok = gpt2_tokenizer()
    block = 32
    long_turn = ("Bob", " ".join(["garden"] * 25 + ["table"] * 25) + ".")
    dialogues = synthetic(40, seed=7, max_turns=10) + [[("Alex", "Short one."), long_turn, ("Cara", "Ok.")]]
    rendered = render(tok, dialogues)
    assert sum(sum(len(t) for t, _ in r) > block for r in rendered) >= 5
    assert max(len(t) for r in rendered for t, _ in r) > block
    for turns in rendered:
        ids = [t for tid, _ in turns for t in tid]
        starts, pos = {}, 0  # turn start offset -> turn length
        for tid, mask in turns:
            assert mask == [1] * len(tid)
            starts[pos] = len(tid)
            pos += len(tid)
        pieces = windows(turns, block, EOS_ID)
        assert [t for w, _ in pieces for t in w[1:]] == ids  # in order, nothing lost, nothing twice
        a = 0
        for w, m in pieces:
            assert len(w) <= block + 1 and len(m) == len(w) and m[0] == 0
            assert w[0] == (EOS_ID if a == 0 else ids[a - 1])
            turn_start = max(s for s in starts if s <= a)
            assert a == turn_start or starts[turn_start] > block, (a, starts)
            a += len(w) - 1

    blocks = make_blocks(tok, dialogues, block)
    assert all(len(ids) <= block + 1 and len(ids) == len(m) for ids, m in blocks)
    trained = Counter(t for ids, m in blocks for t, k in zip(ids, m) if k)
    assert trained == Counter(t for r in rendered for tid, _ in r for t in tid)
    assert count(blocks)[0] == sum(trained.values())


def test_batches_pad_under_5_percent():
    tok = gpt2_tokenizer()
    blocks = make_blocks(tok, synthetic(300, seed=1, min_turns=1, max_turns=20), 128)
    batch = 8
    order = epoch_order(blocks, 16 * batch, seed=1337)
    assert sorted(order) == list(range(len(blocks)))
    real = total = 0
    for i in range(0, len(order), batch):
        chosen = [blocks[j] for j in order[i:i + batch]]
        x, _ = collate(chosen, tok.eos_token_id, 128)  # as train.py collates: widths rounded up to 8
        real += count(chosen)[1]
        total += x.numel()
    assert 1 - real / total < 0.05


@pytest.mark.parametrize("longest, block_size, width", [(41, 64, 40), (42, 64, 48), (9, 64, 8), (100, 100, 100),
                                                        (90, 100, 96), (60, 60, 60)])
def test_collate_rounds_the_width_up_to_8_within_the_block(longest, block_size, width):
    # a few shapes instead of one per length (kernels picked or compiled per shape are reused), never past the block
    blocks = [([1] * longest, [True] * longest), ([2] * 5, [True] * 5)]
    x, y = collate(blocks, EOS_ID, block_size)
    assert x.shape == y.shape == (2, width)
    assert (y[0, longest - 1:] == IGNORE).all() and (y[1, 4:] == IGNORE).all() and (y[1, :4] == 2).all()
    assert collate(blocks, EOS_ID)[0].shape == (2, longest - 1)  # without a block size: the longest, exactly


def test_the_first_dialogues_within_a_token_cap():
    tok = gpt2_tokenizer()
    dialogues = synthetic(10, seed=3)
    sizes = [sum(len(ids) for ids, _ in turns) for turns in render(tok, dialogues)]
    first = lambda cap: len(tokenize(tok, dialogues).head(cap))
    assert first(0) == 10
    assert first(sum(sizes)) == 10
    assert first(sum(sizes[:4])) == 4
    assert first(sum(sizes[:4]) + sizes[4] - 1) == 4
    assert first(1) == 1  # never nothing
    head = tokenize(tok, dialogues).head(sum(sizes[:4]))
    assert len(head.ids) == sum(sizes[:4]) and list(make_blocks(tok, dialogues[:4], 64)) == list(
        batching.pack_tokens(head, 64))
