"""Preference tuning: pairs of replies to one prompt, the preferred one (chosen) and the other (rejected), and the
objectives that make the chosen one likelier than the rejected: DPO (against the starting model, the reference) and
SimPO (reference-free, length-normalised, with a target margin).

A pair is rendered as two sequences, the prompt then each reply, exactly as render.py renders a dialogue (speaker
format or chat template, SYSTEM_PROMPT first); only the reply's tokens are scored, its end-of-turn token included.
A micro-batch of pairs packs its 2 x pairs sequences into rows of at most BLOCK_SIZE targets (batching.best_fit; the
pieces kept apart as masks.py keeps them), so no reply is padded to its partner's length, and the model gives each
sequence's summed log-probability without the full logits (loss.model_logps). The reference's log-probabilities are
computed once before training, in the same chunks, with no second model in memory (with LoRA: the model with its
adapters off), and kept in CACHE_DIR/reference/, keyed by the reference's weights and the data.

train.py runs it with OBJECTIVE="dpo" or "simpo"; step.py's forward_backward_pairs and evaluate_pairs take the
batches made here."""

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from batching import Steps, best_fit, collate
from cli import UserError, progress
from dialogues import SYSTEM, iter_pairs
from render import context_token, render_any, role_map, with_system


# ---------------------------------------------------------------------------------------------------------------------
# the objectives

@dataclass(frozen=True)
class Objective:
    """DPO: reward = BETA * (log p(reply) - the reference's); SimPO: reward = BETA * log p(reply) / its tokens, and
    the chosen must win by SIMPO_GAMMA. The loss is -log sigmoid(chosen reward - rejected reward [- gamma])."""
    name: str
    beta: float
    gamma: float = 0.0

    @property
    def needs_reference(self):
        return self.name == "dpo"

    def losses(self, logps, ref, lengths):
        """Per pair (loss, chosen reward, rejected reward), from the sequences' summed log-probabilities `logps`
        [2 x pairs: chosen, rejected, ...], the reference's `ref` [pairs, 2] (DPO) and their scored tokens."""
        chosen, rejected = logps[0::2], logps[1::2]
        if self.name == "dpo":
            rc, rr = self.beta * (chosen - ref[:, 0]), self.beta * (rejected - ref[:, 1])
            return -F.logsigmoid(rc - rr), rc, rr
        rc, rr = self.beta * chosen / lengths[0::2], self.beta * rejected / lengths[1::2]
        return -F.logsigmoid(rc - rr - self.gamma), rc, rr


def objective_of(cfg):
    """OBJECTIVE's Objective, or None for supervised training."""
    return None if cfg.OBJECTIVE == "sft" else Objective(cfg.OBJECTIVE, float(cfg.BETA), float(cfg.SIMPO_GAMMA))


FIGURES = ("loss", "reward_acc", "margin", "chosen", "rejected")  # what a step and validation report, means by pair


def figure_sums(losses, rc, rr):
    """The sums of FIGURES over some pairs, float64 [5]: averaged once every rank's are added. A pair whose rewards
    are equal (every pair at the start, where the policy is its reference) counts as half right: a coin toss, so
    the accuracy starts at 50%, not 0."""
    right = (rc > rr).double() + 0.5 * (rc == rr).double()
    return torch.stack([losses.sum().double(), right.sum(), (rc - rr).sum().double(), rc.sum().double(),
                        rr.sum().double()])


# ---------------------------------------------------------------------------------------------------------------------
# pairs to tokens

@dataclass
class Pairs:
    """A set of rendered pairs: pair i is sequences[2i] (prompt + chosen) and sequences[2i + 1] (prompt + rejected),
    each (ids, mask), ids starting with the token they are read after, never a target. `cut`: sequences cut to fit
    BLOCK_SIZE (the prompt's oldest tokens first)."""
    sequences: list
    cut: int = 0

    def __len__(self):
        return len(self.sequences) // 2

    def count_trained(self):
        """What an epoch trains: its pairs (train.py's epoch line)."""
        return len(self)

    def scored(self):
        return sum(sum(1 for m in mask if m) for _, mask in self.sequences)


def render_pair(tokenizer, pairs, rendering):
    """Some (prompt, chosen, rejected) pairs as the sequences Pairs holds: each reply after its prompt, rendered as
    training renders a dialogue with the reply's speakers the trained ones; everything before the reply unscored."""
    start, out = context_token(tokenizer, rendering.roles_of), []
    for prompt, chosen, rejected in pairs:
        speakers = sorted({s for s, _ in chosen + rejected} - {SYSTEM})
        roles_of = role_map(rendering.roles, speakers) if rendering.format == "chat_template" else None
        dialogues = [with_system(prompt + reply, rendering.system_prompt) for reply in (chosen, rejected)]
        for d, reply in zip(render_any(tokenizer, dialogues, speakers, roles_of), (chosen, rejected)):
            before = len(d) - len(reply)  # the prompt's turns, a system message included
            ids = [start] * (start is not None) + [t for tid, _ in d for t in tid]
            mask = [0] * (start is not None) + [m * (i >= before) for i, (_, tm) in enumerate(d) for m in tm]
            out.append((ids, mask))
    return out


def fit(ids, mask, block_size):
    """A sequence cut to block_size + 1 ids where longer: the context token kept, then the prompt's oldest tokens
    dropped, then the reply's last ones. Returns (ids, mask, whether it was cut)."""
    over = len(ids) - (block_size + 1)
    if over <= 0:
        return ids, mask, False
    first = next((i for i, m in enumerate(mask) if m), len(mask))  # the reply's first scored token
    drop = min(over, max(first - 2, 0))  # prompt tokens after the context token, keeping the one before the reply
    ids, mask = ids[:1] + ids[1 + drop:], mask[:1] + mask[1 + drop:]
    return ids[:block_size + 1], mask[:block_size + 1], True


def load_pairs(path, tokenizer, rendering, block_size, per_pass=512):
    """The pairs file at `path` rendered and fitted to BLOCK_SIZE. A pair whose replies have no scored token left
    (a prompt longer than a block) is refused: it would carry no signal."""
    pairs, sequences, cut = [], [], 0

    def flush():
        nonlocal cut
        for ids, mask in render_pair(tokenizer, pairs, rendering):
            ids, mask, was_cut = fit(ids, mask, block_size)
            cut += was_cut
            sequences.append((ids, mask))
        pairs.clear()

    for pair in progress(iter_pairs(path), desc=f"rendering {os.path.basename(path)}", unit=" pairs", leave=False):
        pairs.append(pair)
        if len(pairs) == per_pass:
            flush()
    flush()
    for i, (_, mask) in enumerate(sequences):
        if not any(mask[1:]):
            raise UserError(f"{path}: pair {i // 2 + 1}: its {('chosen', 'rejected')[i % 2]} reply has no token left "
                            f"to score within BLOCK_SIZE={block_size} (or is empty); raise BLOCK_SIZE or drop the pair")
    return Pairs(sequences, cut)


# ---------------------------------------------------------------------------------------------------------------------
# batches

def pair_batch(pairs, index, pad, block_size, split=False, live=True):
    """The pairs numbered `index` as one micro-batch: (x, y, seg, which, index, live). Their 2 x len(index)
    sequences (chosen then rejected, pair by pair) are packed into rows by best fit (each its own row with `split`);
    `which` is each target's sequence, in the order of y[y != IGNORE]; `live` False: a stand-in batch that counts
    for nothing (a rank with no pairs left at an epoch's end still runs forward and backward)."""
    seqs = [pairs.sequences[2 * p + k] for p in index for k in (0, 1)]
    rows = []
    for row in best_fit([len(ids) for ids, _ in seqs], block_size):  # a row holds block_size + 1 ids
        ids, mask, tags, starts = [], [], [], []
        for s in sorted(row):
            starts.append(len(ids))
            ids += seqs[s][0]
            mask += seqs[s][1]
            tags += [s] * len(seqs[s][0])
        rows.append(((ids, mask, starts), (tags, mask, starts)))
    x, y, seg = collate([r for r, _ in rows], pad, block_size, split)
    tags = collate([t for _, t in rows], 0, block_size, split)[1]
    return x, y, seg, tags[tags >= 0], torch.tensor(index, dtype=torch.long), live


def pair_batches(pairs, batch_size, pad, block_size, split=False):
    """A whole set's micro-batches, in order: validation's and the reference's."""
    return [pair_batch(pairs, list(range(i, min(i + batch_size, len(pairs)))), pad, block_size, split)
            for i in range(0, len(pairs), batch_size)]


class PairSteps(Steps):
    """The training pairs step by step, as batching.Steps takes blocks: each epoch in an order fixed by the seed and
    the epoch, a global batch of BATCH_SIZE x GRAD_ACCUM_STEPS x ranks pairs a step, rank r's micro-batch m the pairs
    [(m * ranks + r) * BATCH_SIZE:][:BATCH_SIZE] of it, so N ranks see what one process would."""

    def __init__(self, pairs, *args, **kwargs):  # Steps's settings and sizes, counted in pairs
        super().__init__(pairs, *args, **kwargs)
        self.pairs = pairs

    def at(self, epoch, offset):
        """The step that starts `offset` pairs into `epoch`: (its pairs, this rank's micro-batches, the positions all
        ranks process, padding included), as Steps.at."""
        if self.order_epoch != epoch:
            self.order = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(self.seed + epoch))
            self.order, self.order_epoch = self.order.tolist(), epoch
        taken = self.order[offset:offset + self.per_step]
        per = self.batch_size * self.ranks
        micro, positions = [], 0
        for m in range(0, len(taken), per):
            for r in range(self.ranks):
                index = taken[m + r * self.batch_size:m + (r + 1) * self.batch_size]
                if index:
                    batch = pair_batch(self.pairs, index, self.pad, self.block_size, self.split)
                    positions += batch[0].numel()
                if r == self.rank:
                    micro.append(batch if index else
                                 pair_batch(self.pairs, taken[:1], self.pad, self.block_size, self.split, False))
        return taken, micro, positions

    def real(self, taken):
        """The real input positions of some pairs: a sequence of n ids fills n - 1."""
        return sum(len(self.pairs.sequences[2 * p + k][0]) - 1 for p in taken for k in (0, 1))


# ---------------------------------------------------------------------------------------------------------------------
# the reference's log-probabilities, computed once

def weights_key(model):
    """A digest of the model's weights as they are (LoRA adapters left out, and peft's names for the weights it wraps
    taken back: the reference is the model without them, the same as a full fine-tuning run's): what names the
    reference."""
    h = hashlib.sha256()
    plain = {k.replace("base_model.model.", "", 1).replace(".base_layer.", "."): v
             for k, v in model.state_dict().items() if "lora_" not in k}
    for name, t in sorted(plain.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def reference_key(weights, files, tokenizer, rendering, block_size, dtype):
    """The key of a reference's log-probabilities: its weights, the pairs files' contents, the tokenizer, the rendering,
    BLOCK_SIZE (what is cut) and the precision they were computed in."""
    import cache
    import checkpoints
    meta = [cache.VERSION, weights, [checkpoints.sha256(f) for f in files], cache.fingerprint(tokenizer),
            [rendering.format, rendering.roles, rendering.train_speakers, rendering.system_prompt], block_size,
            str(dtype)]
    return hashlib.sha256(json.dumps(meta, default=str).encode()).hexdigest()[:16]


def reference(layout, sets, key, cache_dir, say, build=True):
    """The reference's log-probabilities [pairs, 2] (float32, CPU) of each set in `sets` (name -> its batches and
    pair count), from CACHE_DIR/reference/<key>/ where they are, else computed now by the layout's model (adapters
    off) and kept there. `build` False: they must be there (a resumed run never computes them again)."""
    from cache import new_dir
    from checkpoints import check_manifest
    d = os.path.join(cache_dir, "reference", key)
    if os.path.isdir(d) and not check_manifest(d, required=True):
        say(f"reference log-probabilities from {d} (the same reference weights and pairs)")
        return {name: torch.from_numpy(np.load(os.path.join(d, name + ".npy"))) for name in sets}
    if not build:
        raise UserError(f"the reference log-probabilities this run was started with ({d}) are gone: they are not "
                        f"computed again from a trained model; start the run anew (or restore CACHE_DIR)")
    out = {}
    with disabled_adapters(layout.model):
        for name, (batches, n) in sets.items():
            out[name] = sequence_logps(layout, batches, n, desc=f"reference log-probs ({name})").float().cpu()
    if layout.master:
        with new_dir(d) as tmp:
            for name, logps in out.items():
                np.save(os.path.join(tmp, name + ".npy"), logps.numpy())
        say(f"reference log-probabilities of {sum(n for _, n in sets.values()):,} pairs kept in {d}")
    layout.world.barrier()
    return out


def disabled_adapters(model):
    """peft's context with the LoRA adapters off (the model as it started); nothing to do for a model without."""
    import contextlib
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def sequence_logps(layout, batches, n, desc=None):
    """Each pair's (chosen, rejected) summed log-probabilities [n, 2] (float64, on the layout's device), the model
    in eval mode; every rank scores its share of the batches (as many each, for FSDP's collectives)."""
    scorer, device, world = layout.scorer, layout.device, layout.world
    was = scorer.training
    scorer.eval()
    out = torch.zeros(n, 2, dtype=torch.float64, device=device)
    jobs = batches
    if world.size > 1:
        idle = batches[0][:5] + (False,)
        jobs = (list(batches[world.rank::world.size]) + [idle])[:math.ceil(len(batches) / world.size)]
    for x, y, seg, which, index, live in progress(jobs, desc=desc, disable=desc is None or not world.master,
                                                  leave=False, unit="batch"):
        with layout.autocast():
            logps = scorer(x.to(device), y.to(device), None if seg is None else seg.to(device),
                           which=which.to(device), n=2 * len(index))
        if live:
            out[index.to(device)] += logps.double().view(-1, 2)
    scorer.train(was)
    if hasattr(scorer, "reshard"):  # FSDP's root keeps its weights gathered after a forward without a backward: the
        scorer.reshard()  # optimizer, made after the reference pass, must find (and train) the shards
    return world.sum(out)
