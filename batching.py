"""From rendered dialogues to training batches, the same way for training and for every loss we report.

Works on what render.py makes: each dialogue a list of (ids, mask) turns, ending with EOS; `tokenize` is the one
bridge from dialogues (render_any) to Tokens, the flat arrays the token cache holds. A dialogue longer than a block is
cut into windows at turn boundaries (a turn longer than a block is cut too); each window is preceded by one context
token (at a dialogue's start in the speaker format the tokenizer's BOS, or EOS where it has none; in a chat template
the template's own first token, so the sequence is exactly the template's; else the token before the window) that is
never a target. Windows are packed several to a block by best-fit and batches group blocks of similar length, so
padding stays around 3% of positions, and every token of the file is a target exactly once per epoch. Labels are
-100 by position (padding, context, masked speakers), never by token id: GPT-2's pad would otherwise be its EOS, and
the real EOS would never be learned.
"""

import numpy as np
import torch

from render import context_token, render_any

IGNORE = -100  # cross_entropy's ignore_index


def cut_points(lengths, block_size):
    """Where a dialogue whose turns have these token counts is cut into windows of at most block_size targets:
    [0, ..., total], at turn boundaries where they can be (a turn longer than a block is cut too)."""
    cuts, start, pos = [0], 0, 0
    for n in lengths:
        end = pos + n
        if end - start > block_size and pos > start:
            cuts.append(pos)
            start = pos
        while end - start > block_size:  # a turn longer than a block
            start += block_size
            cuts.append(start)
        pos = end
    return cuts + [pos]


def best_fit(lengths, block_size):
    """Best-fit decreasing: each piece (longest first) goes into the fullest block it still fits. Returns the blocks
    as lists of piece indices. Deterministic."""
    cap = block_size + 1  # a block holds block_size inputs; with the shifted-by-one targets that is block_size + 1 ids
    by_free = [[] for _ in range(cap + 1)]  # by_free[f]: blocks with f ids of room left
    blocks = []
    for p in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[p]
        f = next((f for f in range(n, cap + 1) if by_free[f]), None)
        if f is None:
            blocks.append([])
            b, f = len(blocks) - 1, cap
        else:
            b = by_free[f].pop()
        blocks[b].append(p)
        by_free[f - n].append(b)
    return blocks


def make_blocks(tokenizer, dialogues, block_size, train_speakers=None, roles_of=None, source="data", speakers=None):
    """Dialogues -> packed Blocks of (ids, mask), each at most block_size + 1 long. With `roles_of` (render.role_map) they
    are rendered with the model's chat template, else in the speaker format. With `speakers`, the mask says whose
    turn each trained token is in (see Tokens.tagged)."""
    tokens = tokenize(tokenizer, dialogues, train_speakers, roles_of, source)
    return pack_tokens(tokens.tagged(speakers) if speakers else tokens, block_size)



# ---------------------------------------------------------------------------------------------------------------------
# Flat arrays: what the token cache holds and memory-maps, and blocks as offsets into them

class Tokens:
    """Rendered dialogues as flat arrays, in memory or memory-mapped from the token cache: every turn's ids and mask
    one after another (`ids`, `mask`), where each turn ends in them (`turn_ends`), where each dialogue's turns end
    (`dialogue_ends`, in turns), who speaks each turn (`turn_speaker`, an index into `speakers`), and the token a
    dialogue starts after (`start`; None: each dialogue's own first token, never a target). `trained` is the number
    of trained tokens where known; `notes` what rendering counted (chat_pieces' stats) where known."""

    def __init__(self, ids, mask, turn_ends, dialogue_ends, turn_speaker, speakers, start, trained=None, path=None,
                 notes=None):
        self.ids, self.mask, self.turn_ends, self.dialogue_ends = ids, mask, turn_ends, dialogue_ends
        self.turn_speaker, self.speakers, self.start, self.trained = turn_speaker, speakers, start, trained
        self.path = path  # the cache directory it is mapped from, if any
        self.notes = notes or {}

    def __len__(self):
        return len(self.dialogue_ends)

    def count_trained(self):
        return self.trained if self.trained is not None else int(np.count_nonzero(self.mask))

    def head(self, max_tokens):
        """The leading dialogues that hold at most max_tokens tokens (at least one; all where max_tokens is 0): what
        caps the cost of a validation pass (VAL_MAX_TOKENS), the same subset in train.py and evaluate.py."""
        ends = self.turn_ends[self.dialogue_ends - 1]  # each dialogue's last token, +1
        k = len(self) if not max_tokens else max(int(np.searchsorted(ends, max_tokens, side="right")), 1)
        turns = int(self.dialogue_ends[k - 1])
        n = int(self.turn_ends[turns - 1])
        return Tokens(self.ids[:n], self.mask[:n], self.turn_ends[:turns], self.dialogue_ends[:k],
                      self.turn_speaker[:turns], self.speakers, self.start,
                      self.trained if k == len(self) else None)

    def tagged(self, speakers):
        """These tokens with a mask that says, for each trained token, whose turn it is in: 1 + the speaker's index in
        `speakers`, or 1 + len(speakers) for anyone else; 0 stays 0. Blocks made from them train the same tokens (any
        non-zero is a target), and eval_groups reads off whose they are: per-speaker losses from the one pass that
        gives the overall loss."""
        tag = np.array([1 + speakers.index(s) if s in speakers else 1 + len(speakers) for s in self.speakers] or [0],
                       dtype=np.uint8)
        lengths = np.diff(self.turn_ends, prepend=0)
        mask = np.where(np.asarray(self.mask) != 0, np.repeat(tag[self.turn_speaker], lengths), 0).astype(np.uint8)
        return Tokens(self.ids, mask, self.turn_ends, self.dialogue_ends, self.turn_speaker, self.speakers,
                      self.start, self.trained)


def token_dtype(tokenizer):
    """The smallest dtype that holds every token id."""
    return np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32


def render_arrays(tokenizer, dialogues, train_speakers=None, roles_of=None, source="data", stats=None):
    """Some dialogues rendered (render_any) as flat arrays: (ids, mask, tokens per turn, turns per dialogue, each
    turn's speaker)."""
    rendered = render_any(tokenizer, dialogues, train_speakers, roles_of, source, stats)
    ids = np.fromiter((t for d in rendered for tid, _ in d for t in tid), dtype=np.int64)
    mask = np.fromiter((m for d in rendered for _, tm in d for m in tm), dtype=np.uint8, count=len(ids))
    lengths = np.fromiter((len(tid) for d in rendered for tid, _ in d), dtype=np.int64)
    turns = np.fromiter((len(d) for d in dialogues), dtype=np.int64, count=len(dialogues))
    return ids.astype(token_dtype(tokenizer)), mask, lengths, turns, [s for d in dialogues for s, _ in d]


def tokenize(tokenizer, dialogues, train_speakers=None, roles_of=None, source="data"):
    """Dialogues (a list) as Tokens in memory."""
    ids, mask, lengths, turns, names = render_arrays(tokenizer, dialogues, train_speakers, roles_of, source)
    speakers = list(dict.fromkeys(names))
    index = {s: i for i, s in enumerate(speakers)}
    return Tokens(ids, mask, np.cumsum(lengths), np.cumsum(turns), np.array([index[s] for s in names], np.int32),
                  speakers, context_token(tokenizer, roles_of))


def pieces(tokens, block_size, per_pass=10000):
    """The windows of every dialogue (cut_points) as (a, b, ctx) arrays: targets ids[a:b], after the context token
    ctx (the dialogue's start token for its first window, else the token before a; with no start token, a
    dialogue's first window begins after its first token, which is its context)."""
    own = tokens.start is None
    a_out, b_out = [], []
    for lo in range(0, len(tokens), per_pass):  # per_pass dialogues at a time: Python lists of ints cost 30x arrays
        d_ends = tokens.dialogue_ends[lo:lo + per_pass].tolist()
        t_lo = int(tokens.dialogue_ends[lo - 1]) if lo else 0
        t_ends = tokens.turn_ends[t_lo:d_ends[-1]].tolist()
        pos = int(tokens.turn_ends[t_lo - 1]) if t_lo else 0
        k = 0
        for d_end in d_ends:
            ends = t_ends[k:d_end - t_lo]
            k = d_end - t_lo
            lengths = [e - s for s, e in zip([pos] + ends[:-1], ends)]
            lengths[0] -= own
            bounds = cut_points(lengths, block_size)
            a_out += [pos + own + x for x in bounds[:-1]]
            b_out += [pos + own + x for x in bounds[1:]]
            pos = ends[-1]
    a, b = np.array(a_out, dtype=np.int64), np.array(b_out, dtype=np.int64)
    if own:
        return a, b, np.asarray(tokens.ids[np.maximum(a - 1, 0)], dtype=np.int64)
    starts = np.zeros(len(a), dtype=bool)
    starts[np.searchsorted(a, np.concatenate([[0], tokens.turn_ends[tokens.dialogue_ends[:-1] - 1]]))] = True
    ctx = np.where(starts, tokens.start, np.asarray(tokens.ids[np.maximum(a - 1, 0)], dtype=np.int64))
    return a, b, ctx


class Blocks:
    """Packed blocks as offsets into a Tokens' arrays: block j is pieces ends[j - 1]:ends[j], piece p the context
    token ctx[p], then ids[a[p]:b[p]] (mask 0, then mask[a[p]:b[p]]). A block is sliced from the arrays only when it
    is asked for, as Python lists (ids, mask, starts): `starts`, where each piece begins in it, keeps the pieces apart
    in training (collate, masks.py)."""

    def __init__(self, tokens, a, b, ctx, ends):
        self.tokens, self.a, self.b, self.ctx, self.ends = tokens, a, b, ctx, ends
        cum = np.concatenate([np.zeros(1, np.int64), np.cumsum(np.asarray(b) - np.asarray(a) + 1)])
        self.lengths = cum[ends] - cum[np.concatenate([np.zeros(1, np.int64), ends[:-1]])[:len(ends)]]

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        j %= len(self)
        ids, mask, starts = [], [], []
        for p in range(int(self.ends[j - 1]) if j else 0, int(self.ends[j])):
            a, b = int(self.a[p]), int(self.b[p])
            starts.append(len(ids))
            ids += [int(self.ctx[p]), *self.tokens.ids[a:b].tolist()]
            mask += [0, *self.tokens.mask[a:b].tolist()]
        return ids, mask, starts

    def __iter__(self):
        return (self[j] for j in range(len(self)))


def pack_tokens(tokens, block_size):
    """Tokens -> Blocks: the pieces of every dialogue packed by best_fit."""
    a, b, ctx = pieces(tokens, block_size)
    order = best_fit((b - a + 1).tolist(), block_size)
    ends = np.cumsum([len(block) for block in order], dtype=np.int64)
    flat = np.fromiter((p for block in order for p in block), dtype=np.int64, count=int(ends[-1]) if len(ends) else 0)
    return Blocks(tokens, a[flat], b[flat], ctx[flat], ends)


def epoch_order(blocks, group, seed):
    """A random order of the blocks in which neighbours have similar lengths: shuffle, then sort each run of `group`
    blocks longest first. Batches cut from it pad little (packing leaves blocks of uneven length); the runs keep
    the order random. A function of the seed alone, so a resumed run finds the same order."""
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
    lengths = blocks.lengths.tolist()
    return [j for i in range(0, len(perm), group) for j in sorted(perm[i:i + group], key=lambda j: -lengths[j])]


def step_batches(blocks, batch_size, world):
    """One optimizer step's blocks as micro-batches per rank: [m][r] is micro-batch m of rank r, the blocks
    blocks[(m * world + r) * batch_size:][:batch_size]. So N ranks of batch B see exactly the blocks that one process
    of batch N*B sees. At an epoch's end a rank's list can be empty."""
    per = batch_size * world
    return [[blocks[m + r * batch_size:m + (r + 1) * batch_size] for r in range(world)]
            for m in range(0, len(blocks), per)]


def rows(blocks, split=False):
    """The rows a batch of these blocks takes: the blocks themselves, or with `split` each piece of each a row of its
    own (for a model whose attention cannot keep packed pieces apart: masks.py). A block is (ids, mask, starts), or
    (ids, mask): one piece."""
    if not split:
        return list(blocks)
    out = []
    for ids, mask, *starts in blocks:
        bounds = [*(starts[0] if starts else [0]), len(ids)]
        out += [(ids[a:b], mask[a:b]) for a, b in zip(bounds, bounds[1:])]
    return out


def collate(blocks, pad_id, block_size=None, split=False):
    """Blocks -> (x, y, seg) tensors, padded on the right to the longest row (see rows for `split`). y[t] is the
    target for x[t]: the next token where it is trained, else IGNORE; a piece's last target is never the next piece's
    first token, whose mask is 0. seg[t] is the piece x[t] belongs to in its row (numbered from 0; the padding a piece
    of its own), which keeps the pieces apart (masks.inputs); seg is None where no row holds more than one piece, and
    the model's own causal mask is then exact: with right padding, real positions never attend to padding.
    Given block_size, the width is rounded up to a multiple of 8 (at most block_size): a handful of shapes instead of
    one per length, so kernels chosen or compiled per shape (oneDNN on CPU, torch.compile) are reused, not rebuilt."""
    blocks = rows(blocks, split)
    T = width(blocks, block_size)
    x = torch.full((len(blocks), T), pad_id, dtype=torch.long)
    y = torch.full((len(blocks), T), IGNORE, dtype=torch.long)
    seg = torch.zeros((len(blocks), T), dtype=torch.long)
    for i, (ids, mask, *starts) in enumerate(blocks):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        y[i, :n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), target, IGNORE)
        starts = starts[0] if starts else [0]
        for k, start in enumerate(starts[1:], 1):
            seg[i, start:] = k
        seg[i, n:] = len(starts)
    return x, y, seg if any(len(b[2]) > 1 for b in blocks if len(b) > 2) else None


def width(blocks, block_size=None):
    """The input positions of collate's batch of these rows: the longest row's, rounded up to a multiple of 8 (at
    most block_size) given block_size."""
    T = max(len(ids) for ids, *_ in blocks) - 1
    return min(-(-T // 8) * 8, block_size) if block_size else T


def eval_batches(blocks, batch_size, pad_id, block_size=None, split=False):
    """Batches for a loss over a whole set: its rows sorted by length (order does not change a sum, and sorted
    barely pads)."""
    blocks = sorted(rows(blocks, split), key=lambda b: len(b[0]))
    return [collate(blocks[i:i + batch_size], pad_id, block_size) for i in range(0, len(blocks), batch_size)]


def eval_groups(blocks, batch_size, block_size=None, split=False):
    """For eval_batches' batches of the same blocks (made with `speakers`), a tensor per batch shaped like its y
    holding each target's speaker tag (0 where no target)."""
    blocks = sorted(rows(blocks, split), key=lambda b: len(b[0]))
    out = []
    for i in range(0, len(blocks), batch_size):
        # collate's y for blocks whose ids are their tags: the tag where there is a target, else IGNORE (-> 0)
        out.append(collate([(mask, mask) for _, mask, *_ in blocks[i:i + batch_size]], 0, block_size)[1]
                   .clamp(min=0))
    return out


def count(blocks):
    """(trained tokens, real positions) of some blocks: a block of n ids fills n - 1 input positions. For all the
    Blocks of some Tokens, without slicing a single block: every token is in exactly one of them."""
    if isinstance(blocks, Blocks):
        return blocks.tokens.count_trained(), int(blocks.lengths.sum()) - len(blocks)
    return sum(sum(1 for x in m if x) for _, m, *_ in blocks), sum(len(ids) - 1 for ids, *_ in blocks)


# ---------------------------------------------------------------------------------------------------------------------
# A run's data, step by step

class Steps:
    """The training blocks step by step: each epoch in its epoch_order, a global batch of blocks a step, as one
    micro-batch per GRAD_ACCUM_STEPS for this rank (step_batches: N ranks see what one process would). The order is
    a function of the seed and the epoch alone, so a resumed run, and every rank, finds the same. `split`: each piece
    a row of its own (rows)."""

    def __init__(self, blocks, batch_size, accum_steps, block_size, seed, pad, rank=0, ranks=1, split=False):
        self.blocks, self.batch_size, self.block_size, self.seed, self.pad = blocks, batch_size, block_size, seed, pad
        self.rank, self.ranks, self.split = rank, ranks, split
        self.per_step = batch_size * accum_steps * ranks
        self.per_epoch = -(-len(blocks) // self.per_step)
        self.order, self.order_epoch = None, None

    def at(self, epoch, offset):
        """The step that starts `offset` blocks into `epoch`: (its blocks, this rank's micro-batches, the positions
        all ranks process, padding included)."""
        if self.order_epoch != epoch:
            self.order, self.order_epoch = epoch_order(self.blocks, 16 * self.per_step, self.seed + epoch), epoch
        blocks = [self.blocks[j] for j in self.order[offset:offset + self.per_step]]
        slots = step_batches(blocks, self.batch_size, self.ranks)
        # a rank left without blocks at an epoch's end still runs forward/backward (DDP needs every rank's gradients)
        # on a block whose targets are all masked: it adds nothing
        dummy = (blocks[0][0], [0] * len(blocks[0][0]))
        micro = [collate(slot[self.rank] or [dummy], self.pad, self.block_size, self.split) for slot in slots]
        positions = sum(len(r) * width(r, self.block_size) for r in (rows(b, self.split) for slot in slots
                                                                      for b in slot if b))
        return blocks, micro, positions

    def real(self, blocks):
        """The real input positions of some blocks (count)."""
        return count(blocks)[1]
