"""One training step and one validation pass, as train.py runs them and bench.py times them: forward and backward
over a step's micro-batches with the loss token-weighted over all of them (and all ranks), the clip and the AdamW
update; and the token-weighted loss of a whole set of batches. Each runs on a layout (processes.py: one process, DDP
or FSDP), which holds the model and knows how its ranks share the work."""

import math

import torch

from batching import IGNORE
from cli import progress


def make_optimizer(model, lr, weight_decay, betas):
    """AdamW with decay on matrices and embeddings only, never on biases and LayerNorm weights; fused (one kernel
    for all parameters, on CPU and CUDA). Of the trained parameters alone: with LoRA, the adapters'."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=betas, fused=True)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_step(layout, optimizer, scaler, micro, grad_clip, pairs=None):
    """One optimizer step on `micro`, this rank's micro-batches of it: forward and backward, then clip, update and
    zero the gradients. Returns (the mean loss, trained tokens, both over all ranks, and why no update was made: a
    loss or gradients that are not finite; else None). A step not taken leaves no gradients behind. `pairs`, an
    (objective, reference log-probabilities) for a preference objective: micro holds pairs (preference.pair_batch),
    and in the trained tokens' place come the step's figures (forward_backward_pairs)."""
    if pairs is None:
        loss, n_targets = forward_backward(layout, micro, scaler)
    else:
        loss, n_targets = forward_backward_pairs(layout, micro, *pairs, scaler)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return loss, n_targets, f"the loss is {loss}"
    if not optimizer_step(layout.model, optimizer, scaler, grad_clip):
        return loss, n_targets, "the gradients are not finite"
    return loss, n_targets, None


def forward_backward(layout, micro, scaler=None):
    """Forward and backward over one optimizer step's micro-batches, each (x, y, seg) as batching.collate makes
    them. The loss is token-weighted over the whole step
    (every micro-batch's summed loss / the step's target count, over all ranks), so K micro-batches of B, or N ranks
    of B, equal one batch of K*B or N*B. Returns the step's mean loss and its target count, both over all ranks."""
    device, world = layout.device, layout.world
    n_targets = int(world.sum(torch.tensor(sum(int((y != IGNORE).sum()) for _, y, _ in micro), device=device)))
    total = torch.zeros((), device=device)
    for m, (x, y, seg) in enumerate(micro):
        with layout.micro_batch(last=m == len(micro) - 1):
            with layout.autocast():
                loss = layout.net(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                  None if seg is None else seg.to(device, non_blocking=True))
            loss = loss / max(n_targets, 1)
            scaled = loss * world.size  # DDP and FSDP average the gradients over the ranks; the loss is over all
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.detach()
    return world.sum(total).item(), n_targets


def forward_backward_pairs(layout, micro, objective, ref, scaler=None):
    """forward_backward for a preference objective (preference.Objective) on micro-batches of pairs: the loss is the
    mean over the step's pairs, on all ranks (each micro-batch's summed pair losses / the step's pair count), so
    every pair weighs the same, however long, and K micro-batches or N ranks equal one batch. `ref`: the reference's
    log-probabilities of every training pair [pairs, 2], or None. Returns (the mean loss, {figure: mean over the
    step's pairs} with "pairs": their number)."""
    from preference import FIGURES, figure_sums
    device, world = layout.device, layout.world
    n_pairs = int(world.sum(torch.tensor(sum(len(m[4]) * m[5] for m in micro), device=device)))
    sums = torch.zeros(len(FIGURES), dtype=torch.float64, device=device)
    for m, (x, y, seg, which, index, live) in enumerate(micro):
        which = which.to(device, non_blocking=True)
        with layout.micro_batch(last=m == len(micro) - 1):
            with layout.autocast():
                logps = layout.net(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                   None if seg is None else seg.to(device, non_blocking=True), which=which,
                                   n=2 * len(index))
            lengths = torch.bincount(which, minlength=2 * len(index))
            losses, rc, rr = objective.losses(logps.float(), None if ref is None else ref[index].to(device), lengths)
            loss = losses.sum() * (live / max(n_pairs, 1))
            scaled = loss * world.size  # DDP and FSDP average the gradients over the ranks; the loss is over all
            (scaler.scale(scaled) if scaler else scaled).backward()
        if live:
            sums += figure_sums(losses.detach(), rc.detach(), rr.detach())
    sums = (world.sum(sums) / max(n_pairs, 1)).tolist()
    return sums[0], {**dict(zip(FIGURES, sums)), "pairs": n_pairs}


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Clip (after unscaling fp16 gradients), step, zero the gradients. False, with no step taken, where clipping
    finds gradients that are not finite (fp32 and bf16; fp16's scaler skips such steps itself)."""
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # FSDP's: of all ranks' shards
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if not scaler and not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return False
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# validation

@torch.no_grad()
def evaluate(layout, batches, desc=None, groups=None):
    """Token-weighted mean loss over a set's batches ((x, y, seg), batching.eval_batches'): the sum of the targets'
    losses / their number, padding never counted. Every rank of the layout scores its share of the batches (each as many, for FSDP's collectives). With
    `desc`, a progress bar of that name. With `groups` (batching.eval_groups: each target's group number, 0 for
    none), each group's mean from the same pass too: returns (loss, {group: loss}) then, else the loss."""
    scorer, device, world = layout.scorer, layout.device, layout.world
    was_training = scorer.training
    scorer.eval()
    n_groups = 1 + max((int(g.max()) for g in groups if g.numel()), default=0) if groups is not None else 1
    jobs = list(zip(batches, groups if groups is not None else [None] * len(batches)))
    if world.size > 1:
        x0, y0, seg0 = batches[0]
        idle = ((x0, torch.full_like(y0, IGNORE), seg0), None)  # a rank whose share is one short scores no targets
        jobs = (jobs[world.rank::world.size] + [idle])[:math.ceil(len(jobs) / world.size)]
    sums = torch.zeros(2, n_groups, dtype=torch.float64, device=device)  # [loss, targets] by group; 0: all
    for (x, y, seg), g in progress(jobs, desc=desc, disable=desc is None or not world.master, leave=False,
                                   unit="batch"):
        x, y, seg = x.to(device), y.to(device), None if seg is None else seg.to(device)
        with layout.autocast():
            if g is None:
                sums[0, 0] += scorer(x, y, seg).double()
                sums[1, 0] += (y != IGNORE).sum()
            else:  # each target's loss, in the order of y[y != IGNORE], added to its group's
                losses = scorer(x, y, seg, reduction="none").double()
                tags = g.to(device)[y != IGNORE]
                sums[0].index_add_(0, tags, losses)
                sums[1].index_add_(0, tags, torch.ones_like(losses))
    scorer.train(was_training)
    world.sum(sums)
    if groups is None:
        return sums[0, 0].item() / max(sums[1, 0].item(), 1)
    total, n = sums[0].sum().item(), sums[1].sum().item()
    return total / max(n, 1), {k: sums[0, k].item() / sums[1, k].item() for k in range(1, n_groups) if sums[1, k]}


def evaluate_pairs(layout, batches, n, objective, ref, desc=None):
    """A preference objective's FIGURES on a whole set of pairs (preference.pair_batches), means by pair, every rank
    scoring its share; `ref` the reference's log-probabilities of the set [n, 2], or None."""
    from preference import FIGURES, figure_sums, sequence_logps
    logps = sequence_logps(layout, batches, n, desc)
    lengths = torch.zeros(n, 2, dtype=torch.float64)
    for _, _, _, which, index, _ in batches:
        lengths[index] = torch.bincount(which, minlength=2 * len(index)).view(-1, 2).double()
    losses, rc, rr = objective.losses(logps.cpu().view(-1), None if ref is None else ref.double(), lengths.view(-1))
    return dict(zip(FIGURES, (figure_sums(losses, rc, rr) / max(n, 1)).tolist()))


def ppl(loss):
    """Perplexity of a mean loss in nats; capped so a diverged run prints a number, not an overflow."""
    return math.exp(min(loss, 50))
