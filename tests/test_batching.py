"""Tests for batching.py: windows, packing, Tokens, collate and its labels: by hand, on random dialogues, and with
the real GPT-2 tokenizer.

Run: .venv/bin/python -m pytest -q tests/test_batching.py
"""

import bisect
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

import batching
from batching import IGNORE, Steps, collate, count, epoch_order, make_blocks, tokenize
from render import render
from tiny import EOS_ID, gpt2_tokenizer, synthetic


def test_labels_by_position_and_padding_on_the_right():
    tok = gpt2_tokenizer()
    blocks = make_blocks(tok, synthetic(30, seed=6, max_turns=8), 64)
    pad = tok.eos_token_id  # as train.py pads: the same id as the EOS that must be learned
    x, y, _ = collate(blocks, pad)
    assert x.shape == y.shape == (len(blocks), max(len(ids) for ids, *_ in blocks) - 1)
    padded = 0
    for i, (ids, mask, _) in enumerate(blocks):
        n = len(ids) - 1
        assert x[i, :n].tolist() == ids[:-1]
        assert y[i, :n].tolist() == [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        assert (x[i, n:] == pad).all() and (y[i, n:] == IGNORE).all()
        padded += x.shape[1] - n
    assert padded > 0
    assert (y == EOS_ID).any()


# ---------------------------------------------------------------------------------------------------------------------
# windows and packing, by hand

@pytest.mark.parametrize("lengths, block_size, cuts", [
    ([2, 3], 5, [0, 5]),  # two turns that fill a window exactly: no cut
    ([3, 4, 2], 5, [0, 3, 7, 9]),  # each cut where the next turn would not fit
    ([12], 5, [0, 5, 10, 12]),  # a turn longer than a block: cut into full windows, the rest last
    ([3, 7], 5, [0, 3, 8, 10]),  # the long turn starts a window of its own first, then is cut
    ([2, 12, 1], 5, [0, 2, 7, 12, 15]),  # a long turn's last part shares a window with the turn after it
    ([5, 1], 5, [0, 5, 6]),
])
def test_cut_points(lengths, block_size, cuts):
    assert batching.cut_points(lengths, block_size) == cuts


def test_best_fit_by_hand():
    # block 9: 10 ids of room. The 6s open a block each; the 3 goes to the second (a tie, taken from the back); the 2
    # only fits the first (4 left); the 1 fits both and goes to the fuller (1 left, not 2), where first fit would not.
    assert batching.best_fit([6, 6, 3, 2, 1], 9) == [[0, 3], [1, 2, 4]]
    assert batching.best_fit([], 9) == []


START = 10 ** 6  # the speaker format's start token in the made-up dialogues: an id none of their tokens has


def tokens_of(dialogues, start):
    """Tokens of dialogues given as lists of (ids, mask) turns, as tokenize makes them of rendered ones."""
    turns = [turn for d in dialogues for turn in d]
    return batching.Tokens(np.array([t for ids, _ in turns for t in ids], np.int64),
                           np.array([m for _, mask in turns for m in mask], np.uint8),
                           np.cumsum([len(ids) for ids, _ in turns]), np.cumsum([len(d) for d in dialogues]),
                           np.zeros(len(turns), np.int32), ["Alex"], start)


def test_pack_tokens_by_hand():
    dialogues = [[([10, 11], [1, 1]), ([12, 13, 14], [0, 0, 0])],  # the second turn is not trained
                 [([20], [1])],
                 [([30, 31, 32, 33, 34, 35], [1] * 6)]]
    # block 4: the windows (START 10 11) (11 12 13 14) | (START 20) | (START 30 31 32 33) (33 34 35), each after its
    # context token; packed longest first into blocks of 5 ids, the 2 into the later of the two blocks with 2 left
    blocks = batching.pack_tokens(tokens_of(dialogues, START), 4)
    assert list(blocks) == [([START, 30, 31, 32, 33], [0, 1, 1, 1, 1], [0]),
                            ([11, 12, 13, 14], [0, 0, 0, 0], [0]),
                            ([START, 10, 11], [0, 1, 1], [0]),
                            ([33, 34, 35, START, 20], [0, 1, 1, 0, 1], [0, 3])]  # where each piece starts
    assert blocks.lengths.tolist() == [5, 4, 3, 5] and count(blocks) == (9, 13)


def test_pack_tokens_by_hand_in_a_chat_template():
    # no start token: a dialogue's own first token is its first window's context (render gives it mask 0)
    dialogues = [[([10, 11], [0, 1]), ([12, 13, 14], [1, 1, 1])],
                 [([20, 21], [0, 1])],
                 [([30, 31, 32, 33, 34, 35], [0] + [1] * 5)]]
    # block 4: (10 11 12 13 14) | (20 21) | (30 31 32 33 34) (34 35)
    blocks = batching.pack_tokens(tokens_of(dialogues, None), 4)
    assert list(blocks) == [([10, 11, 12, 13, 14], [0, 1, 1, 1, 1], [0]),
                            ([30, 31, 32, 33, 34], [0, 1, 1, 1, 1], [0]),
                            ([20, 21, 34, 35], [0, 1, 0, 1], [0, 2])]
    assert count(blocks) == (10, 11)


# ---------------------------------------------------------------------------------------------------------------------
# windows and packing, on random dialogues

def random_dialogues(seed, block_size, own, trained=1.0, n=60):
    """n dialogues of (ids, mask) turns whose ids are their positions in the whole stream, so a block says where each
    of its tokens came from. Mostly short turns, some longer than a block. A trained token's mask is a speaker's
    tag (1-3), as Tokens.tagged makes them. With `own` (a chat template), a dialogue has at least two tokens and its
    first is not trained, as render_chat makes it."""
    rng = random.Random(seed)
    out, pos = [], 0
    for _ in range(n):
        d = []
        for i in range(rng.randint(1, 8)):
            size = rng.randint(1, 3 * block_size) if rng.random() < 0.15 else rng.randint(1, block_size // 2 + 1)
            size = max(size, 2) if own and i == 0 else size
            mask = [rng.randint(1, 3) if rng.random() < trained else 0 for _ in range(size)]
            if own and i == 0:
                mask[0] = 0
            d.append((list(range(pos, pos + size)), mask))
            pos += size
        out.append(d)
    return out


def assert_best_fit(lengths, blocks, block_size):
    """`blocks` (lists of indices into `lengths`, each in the order it was filled) are best-fit decreasing: taken
    longest first (equal lengths in order), each piece went into the fullest block it fitted, and into a new block
    only where none had room."""
    where = {p: (j, k) for j, block in enumerate(blocks) for k, p in enumerate(block)}
    assert sorted(where) == list(range(len(lengths))) and len(where) == sum(map(len, blocks))  # each piece once
    room, held = [], []  # per block so far: the ids it has room for, the pieces it holds
    for p in sorted(range(len(lengths)), key=lambda p: (-lengths[p], p)):
        (j, k), n = where[p], lengths[p]
        fits = [r for r in room if r >= n]
        assert j <= len(room), (p, room)
        if j == len(room):
            assert not fits, (p, room)  # a new block only where the piece fits in none
            room.append(block_size + 1)
            held.append(0)
        else:
            assert fits and room[j] == min(fits), (p, room)  # the fullest block with room
        assert k == held[j], (p, blocks[j])  # a block holds its pieces in the order they went in
        room[j] -= n
        held[j] += 1
    sizes = sorted(sum(lengths[p] for p in block) for block in blocks)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > block_size + 1  # so no two blocks would fit in one


@pytest.mark.parametrize("seed", range(4))
def test_best_fit_on_random_lengths(seed):
    rng = random.Random(seed)
    block_size = rng.choice([16, 64])  # blocks left with many different rooms: first fit is told apart every time
    lengths = [rng.randint(1, block_size + 1) for _ in range(rng.randint(200, 400))]
    assert_best_fit(lengths, batching.best_fit(lengths, block_size), block_size)


@pytest.mark.parametrize("block_size", [3, 5, 16])
@pytest.mark.parametrize("start", [START, None], ids=["start token", "chat template"])
def test_windows_on_random_dialogues(block_size, start):
    own = start is None
    dialogues = random_dialogues(block_size, block_size, own)
    tokens = tokens_of(dialogues, start)
    blocks = batching.pack_tokens(tokens, block_size)
    # the pieces of each block, read off the block alone: every token here is trained (a tag 1-3), so mask 0 is
    # exactly a piece's context token
    pieces = []  # (block, context token, targets)
    for j, (ids, mask, starts) in enumerate(blocks):
        assert len(ids) == len(mask) == blocks.lengths[j] <= block_size + 1 and mask[0] == 0
        assert starts == [k for k, m in enumerate(mask) if not m]  # the block says where its pieces start
        for t, m in zip(ids, mask):
            if m:
                assert m == tokens.mask[t]  # a target keeps its mask (its speaker's tag)
                pieces[-1][2].append(t)
            else:
                pieces.append((j, t, []))
    assert all(targets == list(range(targets[0], targets[-1] + 1)) for _, _, targets in pieces)  # in order

    firsts = [d[0][0][0] for d in dialogues]
    windows = defaultdict(list)  # dialogue -> its pieces as (first target, end, context token)
    for _, ctx, targets in pieces:
        windows[bisect.bisect_right(firsts, targets[0]) - 1].append((targets[0], targets[-1] + 1, ctx))
    assert sorted(windows) == list(range(len(dialogues)))
    cut_at_turn = cut_inside = 0
    for k, d in enumerate(dialogues):
        turn_end = {ids[0]: ids[-1] + 1 for ids, _ in d}  # where each turn starts -> where it ends
        first, end = d[0][0][0], d[-1][0][-1] + 1
        w = sorted(windows[k])
        # the windows take the dialogue's tokens one after another, each once (in a chat template all but the first)
        assert [a for a, _, _ in w] == [first + own] + [b for _, b, _ in w[:-1]] and w[-1][1] == end
        for i, (a, b, ctx) in enumerate(w):
            # the context: the start token before a dialogue's first window, else the token before the window (in a
            # chat template, for the first window that is the dialogue's own first token)
            assert ctx == (START if i == 0 and not own else a - 1), (k, i)
            if i:
                before = w[i - 1][0]
                if a in turn_end:  # cut where a turn starts, as that turn did not fit in the window before
                    assert turn_end[a] - before > block_size, (k, i)
                    cut_at_turn += 1
                else:  # cut inside a turn, only where the window before is full and lies inside that turn
                    assert a - before == block_size and max(s for s in turn_end if s < a) <= before, (k, i)
                    cut_inside += 1
    assert cut_at_turn and cut_inside and len(blocks) < len(pieces)  # the data has each case

    # packed by best fit: the pieces numbered in file order, each block's in the order it holds them
    number = {a: n for n, a in enumerate(sorted(targets[0] for _, _, targets in pieces))}
    lengths = [0] * len(pieces)
    packed = [[] for _ in blocks]
    for j, _, targets in pieces:
        lengths[number[targets[0]]] = len(targets) + 1
        packed[j].append(number[targets[0]])
    assert_best_fit(lengths, packed, block_size)

    # dialogues taken a few at a time (the last few fewer) are cut the same
    assert all((x == y).all() for x, y in zip(batching.pieces(tokens, block_size, per_pass=7),
                                              batching.pieces(tokens, block_size)))


@pytest.mark.parametrize("start", [START, None], ids=["start token", "chat template"])
def test_every_trained_token_is_a_target_once_an_epoch(start):
    dialogues = random_dialogues(7, 8, start is None, trained=0.6)
    blocks = batching.pack_tokens(tokens_of(dialogues, start), 8)
    targets = Counter((t, m) for ids, mask, _ in blocks for t, m in zip(ids, mask) if m)  # (position, tag)
    trained = Counter((t, m) for d in dialogues for ids, mask in d for t, m in zip(ids, mask) if m)
    assert targets == trained  # each position once: the ids are positions
    assert count(blocks)[0] == len(trained) and count(blocks) == count(list(blocks))
    order = epoch_order(blocks, 4, seed=1)
    assert sorted(order) == list(range(len(blocks)))  # an epoch takes every block once


def test_windows_of_real_dialogues_cover_every_token_once():
    tok = gpt2_tokenizer()
    block = 32
    long_turn = ("Bob", " ".join(["garden"] * 25 + ["table"] * 25) + ".")
    dialogues = synthetic(40, seed=7, max_turns=10) + [[("Alex", "Short one."), long_turn, ("Cara", "Ok.")]]
    rendered = render(tok, dialogues)
    assert sum(sum(len(t) for t, _ in r) > block for r in rendered) >= 5
    assert max(len(t) for r in rendered for t, _ in r) > block
    blocks = make_blocks(tok, dialogues, block)
    assert all(len(ids) <= block + 1 and len(ids) == len(m) for ids, m, _ in blocks)
    trained = Counter(t for ids, m, _ in blocks for t, k in zip(ids, m) if k)
    assert trained == Counter(t for r in rendered for tid, _ in r for t in tid)
    assert count(blocks)[0] == sum(trained.values())
    # every token is trained here but the context token before each window: EOS before a dialogue's first, else the
    # token before it, which is never an EOS (EOS only ends a dialogue)
    contexts = [t for ids, m, _ in blocks for t, k in zip(ids, m) if not k]
    assert len(contexts) == sum(len(batching.cut_points([len(t) for t, _ in r], block)) - 1 for r in rendered)
    assert contexts.count(EOS_ID) == len(dialogues)


@pytest.mark.parametrize("batch_size, accum, ranks", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_an_epoch_of_steps_pads_under_3_percent(batch_size, accum, ranks):
    """An epoch as train.py takes it (batching.Steps: the epoch order, a global batch a step, each rank's
    micro-batches): every block trained once, on the rank and micro-batch step_batches gives it, and padding under
    3% of the positions processed (what Steps reports is what the ranks' batches hold). These blocks are of uneven
    length: in a shuffled order without epoch_order's runs sorted by length, 5.4% would be padding."""
    tok = gpt2_tokenizer()
    blocks = make_blocks(tok, synthetic(400, seed=1, min_turns=2, max_turns=8, max_words=30), 128)
    per_rank = [Steps(blocks, batch_size, accum, 128, 1337, tok.eos_token_id, rank, ranks) for rank in range(ranks)]
    steps = per_rank[0]
    assert steps.per_step == batch_size * accum * ranks and steps.per_epoch == -(-len(blocks) // steps.per_step)
    seen, real, processed, reported = [], 0, 0, 0
    for offset in range(0, len(blocks), steps.per_step):
        step_blocks, _, positions = steps.at(0, offset)
        seen += step_blocks
        real += count(step_blocks)[1]
        reported += positions
        for rank, s in enumerate(per_rank):
            _, micro, _ = s.at(0, offset)
            assert len(micro) == -(-len(step_blocks) // (batch_size * ranks))
            for m, (x, y, seg) in enumerate(micro):
                mine = step_blocks[(m * ranks + rank) * batch_size:][:batch_size]
                if mine:  # a rank left with none at the epoch's end trains a block with no targets
                    want = collate(mine, tok.eos_token_id, 128)
                    assert torch.equal(x, want[0])
                    assert (seg is want[2] is None) or torch.equal(seg, want[2])  # its pieces kept apart
                    processed += x.numel()
                else:
                    assert (y == IGNORE).all()
    assert sorted(map(str, seen)) == sorted(map(str, blocks))  # each block once an epoch
    assert reported == processed
    assert 1 - real / processed < 0.03, 1 - real / processed


@pytest.mark.parametrize("longest, block_size, width", [(41, 64, 40), (42, 64, 48), (9, 64, 8), (100, 100, 100),
                                                        (90, 100, 96), (60, 60, 60)])
def test_collate_rounds_the_width_up_to_8_within_the_block(longest, block_size, width):
    # a few shapes instead of one per length (kernels picked or compiled per shape are reused), never past the block
    blocks = [([1] * longest, [True] * longest), ([2] * 5, [True] * 5)]
    x, y, _ = collate(blocks, EOS_ID, block_size)
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
