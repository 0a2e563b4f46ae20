"""A packed block is several sequences to the model. Each piece of a block (a dialogue, or a window of a long one)
attends only to itself and counts its positions from 0, exactly as it does alone at inference: without this, a
dialogue in the middle of a block reads the ones before it and starts at position 200.

collate gives each input position the number of its piece within the row (`seg`); `inputs` makes of it the
position ids and what keeps the pieces apart, in the form the model's attention takes. That form is found once per
model by a probe that runs three short pieces packed and alone, trying in turn:

    PIECES    SDPA's causal kernel on each piece apart (`pieces_attention`, registered with transformers as an
              attention implementation): no block x block mask, and each piece costs its own length squared
    BOOL      a boolean block-diagonal causal mask, [batch, block, block], for any SDPA model
    ADDITIVE  the same as an additive mask, for eager attention, which adds the mask to its scores (Gemma 2's)

A model none of them gives its pieces' own logits (an attention that ignores a mask of ours) takes a piece a row:
collate's `split`, where the model's own causal mask is exact."""

import weakref

import torch
import torch.nn.functional as F

PIECES = "each piece's attention computed apart (SDPA's causal kernel)"
BOOL, ADDITIVE = "a boolean block-diagonal mask", "an additive block-diagonal mask"
IMPLEMENTATION = "dialogue_finetune_pieces"  # pieces_attention's name among transformers' attention implementations
_forms = weakref.WeakKeyDictionary()  # Hugging Face model -> PIECES, BOOL, ADDITIVE, or None: a piece a row


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
    if form == PIECES:  # the pieces themselves, [batch, 1, 1, width]: a 4D mask transformers hands on as it is
        return {"position_ids": positions, "attention_mask": seg[:, None, None, :].long()}
    keep = (seg[:, :, None] == seg[:, None, :]) & (at[:, None] >= at[None, :])  # [batch, query, key]
    if form == ADDITIVE:
        keep = torch.zeros(keep.shape, device=seg.device).masked_fill_(~keep, torch.finfo(torch.float32).min)
    return {"position_ids": positions, "attention_mask": keep[:, None]}  # one mask for every head


@torch.compiler.disable
def form(model):
    """How packed pieces are kept apart in `model` (PIECES, BOOL or ADDITIVE), found by probe() once per
    model; None where none does: give each piece a row of its own."""
    hf = hf_model(model)
    if hf not in _forms:
        _forms[hf] = probe(hf)
    return _forms[hf]


def trust(model, verdict):
    """form()'s verdict for `model` taken from elsewhere: under FSDP rank 0 probes the whole model, and the other
    ranks, which hold only its shape until the weights are sent, take its word."""
    hf = hf_model(model)
    if verdict == PIECES:
        use_pieces(hf)
    _forms[hf] = verdict


@torch.no_grad()
def probe(hf):
    """PIECES, BOOL or ADDITIVE, the first with which three short pieces packed in one row give the logits each
    gives alone (fp32, dropout off); else None. PIECES is tried on an SDPA model only, which keeps it where it
    works."""
    was, implementation = hf.training, hf.config._attn_implementation
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
            for f in ((PIECES,) if implementation == "sdpa" else ()) + (BOOL, ADDITIVE):
                try:
                    if f == PIECES:
                        use_pieces(hf)
                    packed = hf(input_ids=ids, use_cache=False, **inputs(seg, f)).logits.float()
                except Exception:  # a mask or positions of a shape the model does not take
                    packed = None
                if packed is not None and packed.shape == alone.shape and torch.allclose(
                        packed, alone, rtol=1e-4, atol=atol, equal_nan=True):
                    return f
                if f == PIECES:
                    hf.set_attn_implementation(implementation)
        return None
    finally:
        hf.train(was)


# ---------------------------------------------------------------------------------------------------------------------
# PIECES: SDPA on each piece apart

def use_pieces(hf):
    """The model's attention becomes pieces_attention, under a name of its own among transformers' implementations
    (it is not saved with the model: a saved model loads with its own). Any mask but the pieces of `inputs` takes
    the SDPA path it took before, so generation is as it was."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(IMPLEMENTATION, pieces_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    hf.set_attn_implementation(IMPLEMENTATION)


def pieces_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: (module, query, key, value [batch, heads, width, dim], mask) -> (output
    [batch, width, heads, dim], None). Where `attention_mask` is the pieces of `inputs` ([batch, 1, 1, width], long),
    the pieces' queries, keys and values are gathered into rows of their own, a row a piece, pieces of about the same
    length together (groups()); SDPA's causal kernel runs on each group, and the outputs go back to their places: each
    piece attends to itself alone, at about the cost of its own length squared, with no block x block mask. Any
    other mask: SDPA's own path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if attention_mask is None or attention_mask.dtype != torch.long:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, width, _ = query.shape
    flat = [t.transpose(1, 2).reshape(rows * width, t.shape[1], -1) for t in (query, key, value)]  # rows end to end
    places, outs = [], []
    for where, real in groups(attention_mask):
        q, k, v = (t[where].transpose(1, 2) for t in flat)  # [pieces, heads, longest, dim]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=k.shape[1] != heads)  # grouped-query attention's heads
        places.append(where[real])
        outs.append(out.transpose(1, 2)[real])  # the real positions, [n, heads, dim]
    out = flat[0].new_zeros(rows * width, heads, value.shape[-1]).index_copy(0, torch.cat(places), torch.cat(outs))
    return out.view(rows, width, heads, -1), None


_groups = [None, None]  # the last mask groups() was asked for, and its answer: every layer gets the same mask


@torch.compiler.disable
def groups(pieces):
    """The pieces of `inputs`' mask ([batch, 1, 1, width]) as groups of pieces of about the same length (within a
    factor of 2), each (where, real): `where` [pieces, longest] the index of each of a piece's positions in the rows
    laid end to end (padded on the right with 0), `real` which of them are the piece's. Padding every piece to the
    longest of the block would cost several times the attention of the pieces themselves."""
    if _groups[0] is pieces:
        return _groups[1]
    seg = pieces[:, 0, 0, :]
    rows, width = seg.shape
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = starts.flatten().nonzero()[:, 0]  # each piece's first position, in the rows laid end to end
    lengths = torch.diff(first, append=first.new_tensor([rows * width]))
    size = torch.ceil(torch.log2(lengths.float())).long()  # 1, 2, 3-4, 5-8, ... tokens: a group each
    out = []
    for s in size.unique().tolist():
        pick = (size == s).nonzero()[:, 0]
        at = torch.arange(int(lengths[pick].max()), device=seg.device)
        real = at[None, :] < lengths[pick, None]
        out.append((torch.where(real, first[pick, None] + at[None, :], 0), real))
    _groups[:] = [pieces, out]
    return out


def describe(model):
    """The line that says how packed pieces are kept apart in this model."""
    f = form(model)
    if f is None:
        return (f"packing: {type(hf_model(model)).__name__}'s attention does not keep packed pieces apart, so each "
                f"piece gets a row of its own (more padding)")
    return f"packing: each piece attends to itself alone ({f}) and counts its positions from 0"
