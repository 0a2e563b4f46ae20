"""The token cache: a text file of dialogues tokenized once, in batches, and kept on disk as flat arrays that later
runs, resumes, every rank and evaluate.py memory-map (nanoGPT's uint16 token file, with the loss mask and the
turn and dialogue offsets beside it).

    CACHE_DIR/train_data.txt-<key>/            ids.bin (the smallest dtype that holds the vocabulary), mask.bin,
                                               turn_ends.bin, dialogue_ends.bin, turn_speaker.bin, meta.json
    CACHE_DIR/train_data.txt-<key>/blocks-256/ the packed blocks for BLOCK_SIZE=256, as offsets into the above

The key is a hash of the file's content, the tokenizer and every setting that changes the rendering (FORMAT,
TRAIN_SPEAKERS, ROLES, SYSTEM_PROMPT): a cache made from another version of the file or another tokenizer is never used. Each
directory is written to a temp directory and renamed into place when complete, with a manifest of every file's size
and sha256 (as our checkpoints have); one that does not match it is rebuilt, never trusted. Delete CACHE_DIR at any
time: the next run rebuilds what it needs.
"""

import contextlib
import hashlib
import itertools
import json
import os
import time

import numpy as np

from batching import Blocks, Tokens, pack_tokens, render_arrays, token_dtype
from checkpoints import atomic_dir, check_manifest
from cli import UserError, progress
from dialogues import iter_dialogues
from render import context_token, with_system

VERSION = 3  # bumped when what is stored, or how it is rendered, changes (2: a chat template's exact tokens, counts;
#             3: nothing after a turn's end token is a target)
ARRAYS = {"ids": None, "mask": np.uint8, "turn_ends": np.int64, "dialogue_ends": np.int64, "turn_speaker": np.int32}
BLOCK_ARRAYS = {"a": np.int64, "b": np.int64, "ctx": np.int64, "ends": np.int64}
PER_PASS = 2048  # dialogues tokenized together: big enough for the fast tokenizer's batching, small in memory


def fingerprint(tokenizer):
    """What makes a tokenizer produce the ids it does: its whole definition, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a slow (Python) tokenizer has none: its vocabulary
    h = hashlib.sha256(backend.to_str().encode() if backend else json.dumps(tokenizer.get_vocab(), sort_keys=True)
                       .encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.bos_token_id,
                         tokenizer.eos_token_id, len(tokenizer)]).encode())
    return h.hexdigest()[:16]


def tokens(path, file_sha, tokenizer, rendering, cache_dir, say, build=True):
    """The Tokens of a text file as `rendering` (render.Rendering) renders it, memory-mapped from `cache_dir`; built
    first where missing, damaged or made from something else (unless `build` is False: the other ranks under
    torchrun, for which rank 0 built it)."""
    meta = {"version": VERSION, "file": os.path.basename(path), "file_sha256": file_sha,
            "tokenizer": fingerprint(tokenizer), "format": rendering.format, "train_speakers": rendering.train_speakers,
            "roles": rendering.roles, "system_prompt": rendering.system_prompt}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    d = os.path.join(cache_dir, f"{meta['file']}-{key}")
    if build:
        problem = check_manifest(d, required=True) if os.path.isdir(d) else None
        if problem:
            say(f"token cache {d} is damaged ({problem}): tokenizing {path} again")
        elif not os.path.isdir(d) and (other := _other_version(cache_dir, meta)):
            say(f"token cache for {path}: {other}; tokenizing it for this run")
        if problem or not os.path.isdir(d):
            _build(d, path, meta, tokenizer, rendering.train_speakers, rendering.roles_of)
    elif not os.path.isfile(os.path.join(d, "meta.json")):
        raise UserError(_unshared(d))
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    dtype = np.dtype(meta["dtype"])
    arrays = {name: _map(os.path.join(d, name + ".bin"), dtype if t is None else t) for name, t in ARRAYS.items()}
    return Tokens(**arrays, speakers=meta["speakers"], start=meta["start"], trained=meta["trained"], path=d,
                  notes={k: meta.get(k, 0) for k in ("merged", "context")})


def blocks(t, block_size, say, build=True):
    """Packed Blocks of some cached Tokens for BLOCK_SIZE, memory-mapped from the cache (packed and stored first
    where missing or damaged): best fit over millions of windows takes a while, and every start would redo it."""
    d = os.path.join(t.path, f"blocks-{block_size}")
    problem = check_manifest(d, required=True) if build and os.path.isdir(d) else None
    if problem:
        say(f"token cache {d} is damaged ({problem}): packing it again")
    if build and (problem or not os.path.isdir(d)):
        packed = pack_tokens(t, block_size)
        with new_dir(d) as tmp:
            for name in BLOCK_ARRAYS:
                getattr(packed, name).astype(BLOCK_ARRAYS[name]).tofile(os.path.join(tmp, name + ".bin"))
    if not build and not os.path.isdir(d):
        raise UserError(_unshared(d))
    return Blocks(t, *(_map(os.path.join(d, name + ".bin"), dtype) for name, dtype in BLOCK_ARRAYS.items()))


def _unshared(d):
    return (f"rank {os.environ.get('RANK', '?')} finds no token cache at {os.path.abspath(d)}, which rank 0 has "
            f"just written: on more than one machine, CACHE_DIR (like OUT_DIR) must be on a filesystem they share")


def _map(path, dtype):
    """A read-only memory map (an empty array for an empty file, which numpy cannot map)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _other_version(cache_dir, meta):
    """Why a cache of the same file name does not serve this run, if there is one: the file, the tokenizer or the
    settings differ."""
    others = []
    for name in os.listdir(cache_dir) if os.path.isdir(cache_dir) else []:
        if name.startswith(meta["file"] + "-") and os.path.isfile(os.path.join(cache_dir, name, "meta.json")):
            try:
                with open(os.path.join(cache_dir, name, "meta.json")) as f:
                    others.append(json.load(f))
            except (OSError, ValueError):
                continue
    if not others:
        return None
    differ = {"file_sha256": "another version of the file", "tokenizer": "another tokenizer",
              "format": "another FORMAT", "train_speakers": "other TRAIN_SPEAKERS", "roles": "other ROLES",
              "system_prompt": "another SYSTEM_PROMPT",
              "version": "an older cache format"}
    why = [text for k, text in differ.items() if all(o.get(k) != meta[k] for o in others)]
    return "the one in the cache is for " + (" and ".join(why) if why else "other settings")


def _build(d, path, meta, tokenizer, train_speakers, roles_of):
    """Tokenize the file PER_PASS dialogues at a time, appending their arrays to the files as it goes; with
    SYSTEM_PROMPT first in each dialogue that has no system message. meta.json counts what a chat template's
    rendering changed (chat_pieces): turns merged into the message before them, leading turns kept as context."""
    import collections
    dtype = token_dtype(tokenizer)
    speakers, n, stats = {}, {"tokens": 0, "turns": 0, "dialogues": 0, "trained": 0}, collections.Counter()
    t0 = time.time()
    print(f"tokenizing {path} ({os.path.getsize(path) / 1e6:,.1f} MB) into {d}", flush=True)
    # piped or under test, a bar that is erased at the end writes nothing unless it takes 10 s (cli.progress)
    with new_dir(d) as tmp, progress(total=os.path.getsize(path), unit="B", unit_scale=True,
                                     desc=f"tokenizing {os.path.basename(path)}", leave=False) as bar:
        files = {name: open(os.path.join(tmp, name + ".bin"), "wb") for name in ARRAYS}
        with contextlib.ExitStack() as closing:
            for f in files.values():
                closing.enter_context(f)
            pending = []  # dialogues read, not yet tokenized
            for dialogue in itertools.chain(iter_dialogues(path, bar.update), [None]):
                if dialogue is not None:
                    pending.append(with_system(dialogue, meta["system_prompt"]))
                if pending and (dialogue is None or len(pending) == PER_PASS):
                    ids, mask, lengths, turns, names = render_arrays(tokenizer, pending, train_speakers, roles_of, path,
                                                                     stats)
                    ids.tofile(files["ids"])
                    mask.tofile(files["mask"])
                    (n["tokens"] + np.cumsum(lengths)).tofile(files["turn_ends"])
                    (n["turns"] + np.cumsum(turns)).tofile(files["dialogue_ends"])
                    np.array([speakers.setdefault(s, len(speakers)) for s in names], np.int32).tofile(
                        files["turn_speaker"])
                    n["tokens"] += len(ids)
                    n["turns"] += len(lengths)
                    n["dialogues"] += len(turns)
                    n["trained"] += int(np.count_nonzero(mask))
                    pending = []
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "dtype": np.dtype(dtype).name, "speakers": list(speakers), "start": context_token(tokenizer, roles_of),
                       **n, "merged": stats["merged"], "context": stats["context"]}, f)
    seconds = time.time() - t0
    print(f"tokenized {path}: {n['tokens']:,} tokens in {seconds:.1f}s ({n['tokens'] / max(seconds, 1e-9):,.0f} "
          f"tokens/s)", flush=True)


@contextlib.contextmanager
def new_dir(d):
    """checkpoints.atomic_dir for a cache directory: on any failure (a full disk) nothing a later run could map is
    left, and one line says so."""
    try:
        with atomic_dir(d) as tmp:
            yield tmp
    except OSError as e:
        raise UserError(f"cannot write the token cache {d}: {e.strerror or e}; nothing was kept (free some space, or "
                        f"point CACHE_DIR elsewhere)") from None
