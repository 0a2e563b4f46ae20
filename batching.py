"""From dialogues to training batches, the same way for training and for every loss we report.

A dialogue renders to tokens as its text-file lines, "Speaker: text\\n" per turn, then EOS: the EOS is a real target,
so the model learns to stop. `mask` marks the tokens that are trained (all of them, or only TRAIN_SPEAKERS' turns).
A dialogue longer than a block is cut into windows at turn boundaries (a turn longer than a block is cut too); each
window is preceded by one context token (EOS for a dialogue's start, else the token before the window) that is never
a target. Windows are packed several to a block by best-fit and batches group blocks of similar length, so padding
stays around 3% of positions, and every token of the file is a target exactly once per epoch. Labels are -100 by
position (padding, context, masked speakers), never by token id: GPT-2's pad would otherwise be its EOS, and the real
EOS would never be learned.
"""

import torch

IGNORE = -100  # cross_entropy's ignore_index


def encode(tokenizer, texts):
    """Token ids of a list of texts, as plain text: a dialogue that mentions "<|endoftext|>" must not get a real EOS
    (the model would learn to stop there), so special tokens are never parsed out of it."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def render(tokenizer, dialogues, train_speakers=None):
    """Each dialogue as a list of turns, each turn (ids, mask); the last turn carries the EOS."""
    turns = [t for d in dialogues for t in d]
    labels, bodies = encode(tokenizer, [f"{s}:" for s, _ in turns]), encode(tokenizer, [f" {t}\n" for _, t in turns])
    eos, out, k = tokenizer.eos_token_id, [], 0
    for d in dialogues:
        rendered = []
        for i, (speaker, _) in enumerate(d):
            body = bodies[k] + ([eos] if i == len(d) - 1 else [])
            if train_speakers is None:
                mask = [1] * (len(labels[k]) + len(body))
            else:  # the label is given at generation time; the reply, its line end and EOS are what we train
                mask = [0] * len(labels[k]) + [int(speaker in train_speakers)] * len(body)
            rendered.append((labels[k] + body, mask))
            k += 1
        out.append(rendered)
    return out


def windows(turns, block_size, eos):
    """Cut one rendered dialogue into pieces of at most block_size targets plus one leading context token."""
    ids = [t for tid, _ in turns for t in tid]
    mask = [m for _, tm in turns for m in tm]
    cuts, start, pos = [], 0, 0  # cut points in the dialogue's token stream, at turn boundaries where they can be
    for tid, _ in turns:
        end = pos + len(tid)
        if end - start > block_size and pos > start:
            cuts.append(pos)
            start = pos
        while end - start > block_size:  # a turn longer than a block
            start += block_size
            cuts.append(start)
        pos = end
    bounds = [0, *cuts, len(ids)]
    stream = [eos, *ids]  # stream[j] is the token before ids[j]
    return [(stream[a:b + 1], [0, *mask[a:b]]) for a, b in zip(bounds, bounds[1:])]


def pack(pieces, block_size):
    """Best-fit decreasing: each piece (longest first) goes into the fullest block it still fits. Deterministic."""
    cap = block_size + 1  # a block holds block_size inputs; with the shifted-by-one targets that is block_size + 1 ids
    by_free = [[] for _ in range(cap + 1)]  # by_free[f]: blocks with f ids of room left
    blocks = []
    for p in sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0])):
        n = len(pieces[p][0])
        f = next((f for f in range(n, cap + 1) if by_free[f]), None)
        if f is None:
            blocks.append([])
            b, f = len(blocks) - 1, cap
        else:
            b = by_free[f].pop()
        blocks[b].append(p)
        by_free[f - n].append(b)
    out = []
    for b in blocks:
        ids = [t for p in b for t in pieces[p][0]]
        mask = [m for p in b for m in pieces[p][1]]
        out.append((ids, mask))
    return out


def make_blocks(tokenizer, dialogues, block_size, train_speakers=None, speakers=None):
    """Dialogues -> packed blocks of (ids, mask), each at most block_size + 1 long. With `speakers`, the mask says
    whose turn each trained token is in (see tag_speakers)."""
    eos = tokenizer.eos_token_id
    rendered = render(tokenizer, dialogues, train_speakers)
    if speakers:
        rendered = tag_speakers(rendered, dialogues, speakers)
    pieces = [w for turns in rendered for w in windows(turns, block_size, eos)]
    return pack(pieces, block_size)


def tag_speakers(rendered, dialogues, speakers):
    """Rendered dialogues whose mask is, for each trained token, 1 + the index in `speakers` of the speaker whose
    turn it is in (label, text, line end, EOS), or 1 + len(speakers) for anyone else; 0 stays 0. Blocks made from
    them train the same tokens (any non-zero is a target), and eval_groups reads off whose they are: per-speaker
    losses from the one pass that gives the overall loss."""
    tag = {s: i + 1 for i, s in enumerate(speakers)}
    return [[(ids, [m and tag.get(speaker, len(speakers) + 1) for m in mask]) for (ids, mask), (speaker, _) in
             zip(turns, d)] for turns, d in zip(rendered, dialogues)]


def first_dialogues(tokenizer, dialogues, max_tokens):
    """The leading dialogues that hold at most max_tokens rendered tokens (at least one; all where max_tokens is 0):
    what caps the cost of a validation pass (VAL_MAX_TOKENS), the same subset in train.py and evaluate.py."""
    if not max_tokens:
        return dialogues
    total = 0
    for n, turns in enumerate(render(tokenizer, dialogues)):
        total += sum(len(ids) for ids, _ in turns)
        if total > max_tokens:
            return dialogues[:max(n, 1)]
    return dialogues


def epoch_order(blocks, group, seed):
    """A random order of the blocks in which neighbours have similar lengths: shuffle, then sort each run of `group`
    blocks longest first. Batches cut from it pad little (packing leaves blocks of uneven length); the runs keep
    the order random. A function of the seed alone, so a resumed run finds the same order."""
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
    return [j for i in range(0, len(perm), group) for j in sorted(perm[i:i + group], key=lambda j: -len(blocks[j][0]))]


def step_batches(chunk, batch_size, world):
    """One optimizer step's blocks as micro-batches per rank: [m][r] is micro-batch m of rank r, the blocks
    chunk[(m * world + r) * batch_size:][:batch_size]. So N ranks of batch B see exactly the blocks that one process
    of batch N*B sees. At an epoch's end a rank's list can be empty."""
    per = batch_size * world
    return [[chunk[m + r * batch_size:m + (r + 1) * batch_size] for r in range(world)]
            for m in range(0, len(chunk), per)]


def collate(blocks, pad_id, block_size=None):
    """Blocks -> (x, y) tensors, padded on the right to the longest block. y[t] is the target for x[t]: the next
    token where it is trained, else IGNORE. With right padding and a causal model, real positions never attend to
    padding, so no attention mask is needed and the fast causal attention path stays on.
    Given block_size, the width is rounded up to a multiple of 8 (at most block_size): a handful of shapes instead of
    one per length, so kernels chosen or compiled per shape (oneDNN on CPU, torch.compile) are reused, not rebuilt."""
    T = max(len(ids) for ids, _ in blocks) - 1
    if block_size:
        T = min(-(-T // 8) * 8, block_size)
    x = torch.full((len(blocks), T), pad_id, dtype=torch.long)
    y = torch.full((len(blocks), T), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(blocks):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        y[i, :n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), target, IGNORE)
    return x, y


def eval_batches(blocks, batch_size, pad_id, block_size=None):
    """Batches for a loss over a whole set: sorted by length (order does not change a sum, and sorted barely pads)."""
    blocks = sorted(blocks, key=lambda b: len(b[0]))
    return [collate(blocks[i:i + batch_size], pad_id, block_size) for i in range(0, len(blocks), batch_size)]


def eval_groups(blocks, batch_size, block_size=None):
    """For eval_batches' batches of the same blocks (made with `speakers`), a tensor per batch shaped like its y
    holding each target's speaker tag (0 where no target)."""
    blocks = sorted(blocks, key=lambda b: len(b[0]))
    out = []
    for i in range(0, len(blocks), batch_size):
        # collate's y for blocks whose ids are their tags: the tag where there is a target, else IGNORE (-> 0)
        out.append(collate([(mask, mask) for _, mask in blocks[i:i + batch_size]], 0, block_size)[1].clamp(min=0))
    return out


def count(blocks):
    """(trained tokens, real positions) of some blocks: a block of n ids fills n - 1 input positions."""
    return sum(sum(m) for _, m in blocks), sum(len(ids) - 1 for ids, _ in blocks)
