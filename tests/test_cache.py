"""Tests for cache.py: the token cache and the array-backed blocks, the same as in memory, invalidated by a changed
file or tokenizer, rebuilt when damaged, never left half-written. train.py's runs on it (the same weights cold and
warm, start-up memory flat in the corpus size) are in test_train.py.

Run: .venv/bin/python -m pytest -q tests/test_cache.py
"""

import errno
import os

import numpy as np
import pytest

import batching
import cache
import checkpoints
import cli
from batching import make_blocks, pack_tokens
from render import Rendering, render, role_map
from tiny import chat_tokenizer, gpt2_tokenizer, synthetic, write_text


def cached_tokens(tmp_path, tokenizer, dialogues=None, said=None, format="speaker", train_speakers=None):
    path = tmp_path / "train_data.txt"
    if dialogues is not None:
        write_text(path, dialogues)
    return cache.tokens(str(path), checkpoints.sha256(path), tokenizer, Rendering(format, None, train_speakers),
                        str(tmp_path / "cache"), (said if said is not None else []).append)


# ---------------------------------------------------------------------------------------------------------------------
# the cache gives exactly what memory gives

@pytest.mark.parametrize("block_size, train_speakers", [(16, None), (64, ["Alex"]), (128, None)])
def test_cached_blocks_are_the_in_memory_blocks(tmp_path, monkeypatch, block_size, train_speakers):
    monkeypatch.setattr(cache, "PER_PASS", 64)  # the file tokenized in four passes, the last one short
    tok = gpt2_tokenizer()
    dialogues = synthetic(200, seed=block_size, max_turns=12, max_words=30) + [[("Bob", "long " * 90)]]
    t = cached_tokens(tmp_path, tok, dialogues, train_speakers=train_speakers)
    assert isinstance(t.ids, np.memmap) and t.ids.dtype == np.uint16  # GPT-2's 50,257 ids fit in 16 bits
    blocks = cache.blocks(t, block_size, print)
    assert list(blocks) == list(make_blocks(tok, dialogues, block_size, train_speakers))
    trained = sum(m != 0 for turns in render(tok, dialogues, train_speakers) for _, mask in turns for m in mask)
    assert batching.count(blocks) == batching.count(list(blocks)) and batching.count(blocks)[0] == trained
    assert batching.epoch_order(blocks, 16, 3) == batching.epoch_order(pack_tokens(t, block_size), 16, 3)


def test_chat_template_tokens_need_32_bits_only_beyond_65536_ids(tmp_path):
    tok = chat_tokenizer()
    dialogues = synthetic(30, speakers=["Alex", "Bob"])
    t = cached_tokens(tmp_path, tok, dialogues, format="chat_template", train_speakers=["Bob"])
    assert t.ids.dtype == np.uint16 and t.start is None  # a dialogue's first token is its context
    roles = role_map(None, ["Bob"])
    assert list(cache.blocks(t, 64, print)) == list(make_blocks(tok, dialogues, 64, ["Bob"], roles))


# ---------------------------------------------------------------------------------------------------------------------
# what invalidates it, what damages it

def test_a_changed_file_or_tokenizer_is_never_used(tmp_path):
    said = []
    first = cached_tokens(tmp_path, gpt2_tokenizer(), synthetic(20, seed=1), said)
    assert said == [] and len(first) == 20
    again = cached_tokens(tmp_path, gpt2_tokenizer(), None, said)
    assert again.path == first.path and said == []
    changed = cached_tokens(tmp_path, gpt2_tokenizer(), synthetic(21, seed=1), said)
    assert changed.path != first.path and len(changed) == 21
    assert said == [f"token cache for {tmp_path / 'train_data.txt'}: the one in the cache is for another version of "
                    f"the file; tokenizing it for this run"]
    other = chat_tokenizer()
    said.clear()
    cached_tokens(tmp_path, other, None, said)
    assert len(said) == 1 and "another tokenizer" in said[0], said
    said.clear()
    cached_tokens(tmp_path, gpt2_tokenizer(), None, said, train_speakers=["Alex"])
    assert len(said) == 1 and "other TRAIN_SPEAKERS" in said[0], said


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete", "blocks"])
def test_a_damaged_cache_is_rebuilt(tmp_path, damage):
    tok = gpt2_tokenizer()
    t = cached_tokens(tmp_path, tok, synthetic(30, seed=2))
    good = list(cache.blocks(t, 32, print))
    target = os.path.join(t.path, "blocks-32", "a.bin") if damage == "blocks" else os.path.join(t.path, "ids.bin")
    data = bytearray(open(target, "rb").read())
    del t
    if damage == "delete":
        os.unlink(target)
    else:
        with open(target, "wb") as f:
            f.write(data[:-3] if damage == "truncate" else bytes([data[0] ^ 1]) + data[1:])
    said = []
    t = cached_tokens(tmp_path, tok, None, said)
    assert list(cache.blocks(t, 32, said.append)) == good
    assert len(said) == 1 and "is damaged" in said[0] and ("packing" if damage == "blocks" else "tokenizing") in said[0]
    assert cached_tokens(tmp_path, tok, None, said) is not None and len(said) == 1  # now intact: no more lines


def test_a_full_disk_leaves_no_cache_behind(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache, "render_arrays", full)
    with pytest.raises(cli.UserError, match=r"cannot write the token cache .*No space left on device; nothing "):
        cached_tokens(tmp_path, gpt2_tokenizer(), synthetic(5))
    assert os.listdir(tmp_path / "cache") == []  # no directory, not even a temp one, that a later run could map
