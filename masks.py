"""A packed block is several sequences to the model. Each piece of a block (a dialogue, or a window of a long one)
attends only to itself and counts its positions from 0, exactly as it does alone at inference: without this, a
dialogue in the middle of a block reads the ones before it and starts at position 200.

collate gives each input position the number of its piece within the row (`seg`); `inputs` makes of it the
position ids and the block-diagonal causal mask, in the form the model's attention takes. That form is found once per
model by a probe that runs three short pieces packed and alone: a boolean mask (SDPA's), an additive one (eager
attention adds the mask to its scores: Gemma 2's, for one), or none that gives the pieces' own logits (an attention
that ignores a mask of ours), in which case collate gives each piece a row of its own (`split`) and the model's causal
mask is exact."""

import weakref

import torch

BOOL, ADDITIVE = "a boolean block-diagonal mask", "an additive block-diagonal mask"
_forms = weakref.WeakKeyDictionary()  # Hugging Face model -> BOOL, ADDITIVE, or None: a piece a row


def hf_model(model):
    """The Hugging Face model inside the wrappers: torch.compile's and peft's (whose LoRA layers sit inside it)."""
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "peft_config") else model


def inputs(seg, form):
    """The model's keyword arguments for a batch whose input positions belong to the pieces `seg` ([batch, width]:
    each position's piece, numbered in its row from 0, padding a piece of its own): position ids that start at 0 in
    each piece, and a causal mask that keeps each piece to itself, in `form`. {} for seg None: every row is one piece,
    and the model's own causal mask is exact. A model with no form takes a piece a row (collate's split)."""
    if seg is None:
        return {}
    if form is None:
        raise ValueError("this model's attention does not keep packed pieces apart: collate them with split=True")
    at = torch.arange(seg.shape[1], device=seg.device)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    positions = at - torch.cummax(torch.where(starts, at, 0), dim=1).values  # from each piece's first position
    keep = (seg[:, :, None] == seg[:, None, :]) & (at[:, None] >= at[None, :])  # [batch, query, key]
    if form == ADDITIVE:
        keep = torch.zeros(keep.shape, device=seg.device).masked_fill_(~keep, torch.finfo(torch.float32).min)
    return {"position_ids": positions, "attention_mask": keep[:, None]}  # one mask for every head


@torch.compiler.disable
def form(model):
    """The form of mask that keeps packed pieces apart in `model` (BOOL or ADDITIVE), found by probe() once per
    model; None where none does: give each piece a row of its own."""
    hf = hf_model(model)
    if hf not in _forms:
        _forms[hf] = probe(hf)
    return _forms[hf]


def trust(model, verdict):
    """form()'s verdict for `model` taken from elsewhere: under FSDP rank 0 probes the whole model, and the other
    ranks, which hold only its shape until the weights are sent, take its word."""
    _forms[hf_model(model)] = verdict


@torch.no_grad()
def probe(hf):
    """BOOL or ADDITIVE where three short pieces packed in one row give the logits each gives alone (fp32, dropout
    off), trying BOOL first; else None."""
    was = hf.training
    hf.eval()
    try:
        device = next(hf.parameters()).device
        vocab = hf.get_input_embeddings().num_embeddings
        lengths = [5, 7, 4]
        ids = (torch.arange(1, sum(lengths) + 1, device=device) * 7919 % vocab)[None]
        seg = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)])[None]
        with torch.autocast(device.type, enabled=False):
            alone = torch.cat([hf(input_ids=piece, use_cache=False).logits
                               for piece in ids.split(lengths, dim=1)], dim=1).float()
            finite = alone[torch.isfinite(alone)]  # a diverged model's logits overflow: compared as they are
            atol = 1e-4 * (1 + (float(finite.abs().max()) if finite.numel() else 0.0))
            for f in (BOOL, ADDITIVE):
                try:
                    packed = hf(input_ids=ids, use_cache=False, **inputs(seg, f)).logits.float()
                except Exception:  # a mask or positions of a shape the model does not take
                    continue
                if packed.shape == alone.shape and torch.allclose(packed, alone, rtol=1e-4, atol=atol,
                                                                  equal_nan=True):
                    return f
        return None
    finally:
        hf.train(was)


def describe(model):
    """The line that says how packed pieces are kept apart in this model."""
    f = form(model)
    if f is None:
        return (f"packing: {type(hf_model(model)).__name__}'s attention does not keep packed pieces apart, so each "
                f"piece gets a row of its own (more padding)")
    return f"packing: each piece attends to itself alone ({f}) and counts its positions from 0"
