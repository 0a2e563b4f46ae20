"""The loss without the full logits. Today's vocabularies are 128k-262k tokens (Llama 3, Qwen3, Gemma 3), and
`model(x).logits` is [batch, block, vocab]: with its fp32 copy, the log-softmax and the gradient, a 2-layer toy body
with Llama 3's vocabulary peaked 5.1 GB over the model's own memory at block 512, batch 4. Here the model's body
gives the hidden states, and only the positions with a target go through the output head and cross-entropy, a chunk
of positions at a time in fp32; each chunk's gradient is computed as soon as its logits are (the head's backward,
done in the forward pass), so one chunk's logits exist at a time and nothing is computed twice. The model's own
output transformation (Gemma's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling) is applied
per chunk, and a probe checks once per model that body + head + transformation give the model's own logits; a model
that fails it takes the full logits, with a line saying so.

step.py's training step and validation pass run it, through ChunkedLoss; and the sequence log-probabilities that
the preference objectives (preference.py) compare."""

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from batching import IGNORE
from cli import UserError
from masks import form, hf_model, inputs

CHUNK = 0  # positions per chunk (LOSS_CHUNK, set by the script through use_chunk); 0 = chosen by chunk_size
# A chunk's fp32 logits take at most this many bytes; the softmax and the gradient take their place (a softcapped
# model's derivative, and autocast's bf16 copies, up to 1.5x more).
# Each chunk reads the output layer's weight twice and its gradient once, so a chunk must be tall enough for that to
# be small beside its own [positions, vocab] work: measured on a CPU with a 128k vocabulary, 64 MB chunks (130
# positions) were ~20% slower than 128 MB ones (261), and 256 MB ones (520) no faster (docs/performance.md).
CPU_BUDGET = 128 << 20
CUDA_SHARE = 64  # on CUDA, 1/64 of the device's memory (375 MB on a 24 GB card: 730 positions at 128k) ...
CUDA_BUDGET = 1 << 30  # ... up to 1 GB (2,000 positions at 128k: a GPU's matmuls are saturated well before)
MIN_CHUNK = 16  # positions; a huge vocabulary still gets matmuls of some height


def use_chunk(n):
    """LOSS_CHUNK: positions per chunk for every loss this process computes; 0 or None = chosen from the vocabulary
    and the device."""
    global CHUNK
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise UserError(f"LOSS_CHUNK must be a number of positions >= 1, or 0 for automatic, got {n!r}")
    CHUNK = n or 0


def chunk_size(vocab, device):
    """Positions per chunk: LOSS_CHUNK, else as many as keep one chunk's fp32 logits within the device's budget."""
    if CHUNK:
        return CHUNK
    if device.type == "cuda":
        budget = min(torch.cuda.get_device_properties(device).total_memory // CUDA_SHARE, CUDA_BUDGET)
    else:
        budget = CPU_BUDGET
    return max(MIN_CHUNK, budget // (4 * vocab))


# ---------------------------------------------------------------------------------------------------------------------
# the model's parts: body, output layer, what follows it

class Head:
    """What the chunked loss takes from a model: its body (input ids -> the hidden states the output layer reads),
    the output layer (an nn.Linear, tied to the input embeddings or not, with or without a bias), and the model's
    transformation of the logits: a scale, then a softcap (cap * tanh(logits / cap)); 1.0 and None where none."""

    def __init__(self, body, linear, scale=1.0, cap=None):
        self.body, self.linear, self.scale, self.cap = body, linear, scale, cap

    def hidden(self, x, **extra):
        """The hidden states of input ids x; `extra`, the model's other inputs (masks.inputs)."""
        return self.body(input_ids=x, use_cache=False, **extra)[0]

    def logits(self, h):
        """fp32 logits of hidden states h, transformed as the model does: the reference the probe compares with."""
        return transform(F.linear(h, self.linear.weight, self.linear.bias).float(), self.scale, self.cap)


_heads = weakref.WeakKeyDictionary()  # model -> Head, or None where the model takes the full logits


@torch.compiler.disable
def head_of(model):
    """The model's Head, found and checked once per model; None, and a line saying so, where the loss must take the
    full logits."""
    hf = hf_model(model)
    if hf not in _heads:
        head, why = find_head(hf)
        if head is not None:
            why = probe(hf, head)
        if why:
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:  # one line a run
                print(f"loss: {type(hf).__name__}: {why}; the loss takes the full logits ([batch, block, vocab] in "
                      f"memory)")
            head = None
        _heads[hf] = head
    return _heads[hf]


def trust_head(model, ok):
    """head_of's verdict for `model` (`ok`: whether it has a Head) taken from elsewhere: under FSDP rank 0 probes the
    whole model, and the other ranks, which hold only its shape until the weights are sent, take its word."""
    hf = hf_model(model)
    _heads[hf] = find_head(hf)[0] if ok else None


def find_head(hf):
    """(Head, None), or (None, why not)."""
    linear = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    body = getattr(hf, "base_model", None)
    if type(linear) is not nn.Linear:  # peft's LoRA layer on the head, a custom module: only its forward knows
        return None, f"its output layer is a {type(linear).__name__}, not a linear layer"
    if body is None or body is hf:
        return None, "its body (the model under the output layer) is not found"
    config = hf.config
    scale = getattr(config, "logit_scale", None) or 1.0  # Cohere: logits * logit_scale
    scale /= getattr(config, "logits_scaling", None) or 1.0  # Granite: logits / logits_scaling
    return Head(body, linear, float(scale), getattr(config, "final_logit_softcapping", None)), None


@torch.no_grad()
def probe(hf, head):
    """None if body + output layer + transformation give the model's own logits on a few tokens (fp32, dropout off),
    else what differs. A model that does more than we know of (scales its hidden states, adds a bias of its own)
    fails it."""
    was = hf.training
    hf.eval()
    try:
        weight = head.linear.weight
        ids = (torch.arange(1, 9, device=weight.device) * 7919 % hf.get_input_embeddings().num_embeddings)[None]
        with torch.autocast(weight.device.type, enabled=False):
            want = hf(input_ids=ids, use_cache=False).logits.float()
            got = head.logits(head.hidden(ids))
    except Exception as e:  # a body that takes other arguments, say: the model's own forward still works
        return f"its body could not be run alone ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    finally:
        hf.train(was)
    finite = want[torch.isfinite(want)]  # a diverged model's logits overflow: compared as they are, inf and nan too
    atol = 1e-5 * (1 + (float(finite.abs().max()) if finite.numel() else 0.0))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=atol, equal_nan=True):
        return "its logits are not its output layer's applied to its body's hidden states"
    return None


def transform(logits, scale, cap):
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


# ---------------------------------------------------------------------------------------------------------------------
# cross-entropy over chunks of positions

def compute_dtype(weight):
    """The dtype the head's matmuls run in: autocast's where it is on (as the model's own nn.Linear would), else the
    weight's. The softmax and the loss are fp32 either way."""
    kind = weight.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


def chunk_logits(h, weight, bias, scale, cap):
    """(fp32 transformed logits of a chunk, d logits / d raw logits or None where it is the scalar `scale`)."""
    z = F.linear(h, weight, bias).float()
    if scale != 1.0:
        z *= scale
    if cap is None:
        return z, None
    z = torch.tanh(z.div_(cap)).mul_(cap)
    return z, (z / cap).square_().neg_().add_(1).mul_(scale)  # d(cap * tanh(u / cap)) / du = 1 - tanh^2


def add_chunk_grads(g, dz, scale, dtype, hc, w, rows, grad_h, grad_w, grad_b):
    """A chunk's share of the head's gradients, from `g` (d loss / d the chunk's fp32 transformed logits, changed in
    place): back through the transformation (`dz`, or the scalar `scale`), then through h @ W.T + b, into h's `rows`
    of grad_h and the fp32 sums grad_w and grad_b (each None where not needed)."""
    if dz is not None:
        g *= dz
    elif scale != 1.0:
        g *= scale
    g = g.to(dtype)
    if grad_h is not None:
        grad_h[rows] = g @ w  # in grad_h's dtype
    if grad_w is not None:
        if dtype == torch.float32:
            grad_w.addmm_(g.t(), hc)
        else:
            grad_w += (g.t() @ hc).float()
    if grad_b is not None:
        grad_b += g.sum(0, dtype=torch.float32)


class FusedLoss(torch.autograd.Function):
    """Summed cross-entropy of transformed logits (h @ W.T + b) against targets, one chunk of positions at a time:
    each chunk's gradients for h, W and b are computed right after its loss, and its logits freed. backward() only
    scales them by the incoming gradient. The weight's gradient accumulates in fp32."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, scale, cap, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = compute_dtype(weight)
        with torch.autocast(weight.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, len(h), chunk):
                hc, t = h[i:i + chunk].to(dtype), targets[i:i + chunk]
                z, dz = chunk_logits(hc, w, b, scale, cap)
                z -= z.amax(1, keepdim=True)  # shifted, so exp cannot overflow
                picked = z.gather(1, t[:, None])[:, 0]
                g = z.exp_()  # in the logits' place, as every step here: one chunk's [positions, vocab] at a time
                sums = g.sum(1)
                total += (sums.log() - picked).sum()
                g /= sums[:, None]  # the softmax: d loss / d logits ...
                g[torch.arange(len(t), device=t.device), t] -= 1  # ... is softmax - one-hot
                add_chunk_grads(g, dz, scale, dtype, hc, w, slice(i, i + chunk), grad_h, grad_w, grad_b)
                del z, dz, g  # before the next chunk's logits are made
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = h.dtype, weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        grads = [None if g is None else g.mul_(grad).to(d) for g, d in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


@torch.no_grad()
def chunked_losses(h, weight, bias, targets, scale, cap, chunk):
    """Each target's cross-entropy (fp32), a chunk at a time, no gradient: validation's."""
    dtype = compute_dtype(weight)
    with torch.autocast(weight.device.type, enabled=False):
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        out = torch.empty(len(h), dtype=torch.float32, device=h.device)
        for i in range(0, len(h), chunk):
            t = targets[i:i + chunk]
            z, _ = chunk_logits(h[i:i + chunk].to(dtype), w, b, scale, cap)
            out[i:i + chunk] = torch.logsumexp(z, 1) - z.gather(1, t[:, None])[:, 0]
    return out


class FusedLogps(torch.autograd.Function):
    """Log-probabilities of the targets summed per sequence (`which`: each target's sequence, of n): the preference
    losses' input, a chunk of positions at a time as FusedLoss. Their gradient weighs each target by its sequence's
    incoming gradient, which only backward() knows, so backward() makes each chunk's logits again (4 head matmuls
    to FusedLoss's 3); one chunk's logits exist at a time either way."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, which, n, scale, cap, chunk):
        out = torch.zeros(n, dtype=torch.float32, device=h.device)
        out.index_add_(0, which, -chunked_losses(h, weight, bias, targets, scale, cap, chunk))
        ctx.save_for_backward(h, weight, bias, targets, which)
        ctx.setup = scale, cap, chunk, compute_dtype(weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, targets, which = ctx.saved_tensors
        (scale, cap, chunk, dtype), (need_h, need_w, need_b) = ctx.setup, ctx.needs_input_grad[:3]
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            for i in range(0, len(h), chunk):
                hc, t = h[i:i + chunk].to(dtype), targets[i:i + chunk]
                z, dz = chunk_logits(hc, w, b, scale, cap)
                g = torch.softmax(z, 1).neg_()  # d log p(t) / d logits = one-hot - softmax
                g[torch.arange(len(t), device=t.device), t] += 1
                g *= grad[which[i:i + chunk]].float()[:, None]
                add_chunk_grads(g, dz, scale, dtype, hc, w, slice(i, i + chunk), grad_h, grad_w, grad_b)
                del z, dz, g
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


@torch.compiler.disable  # python loops over data-dependent sizes: torch.compile runs the body, this runs eagerly
def head_loss(head, hidden, y, reduction="sum"):
    """The loss of hidden states [batch, block, width] against targets y [batch, block]: the sum, or each target's
    loss in the order of y[y != IGNORE]. Positions without a target never reach the output layer."""
    keep = y != IGNORE
    h, t = hidden[keep], y[keep]
    weight, bias = head.linear.weight, head.linear.bias
    chunk = chunk_size(weight.shape[0], weight.device)
    if reduction == "none":
        return chunked_losses(h, weight, bias, t, head.scale, head.cap, chunk)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return FusedLoss.apply(h, weight, bias, t, head.scale, head.cap, chunk)
    return chunked_losses(h, weight, bias, t, head.scale, head.cap, chunk).sum()


def full_losses(model, x, y, reduction="sum", **extra):
    """The plain loss, from the full logits: for a model whose output layer head_of cannot take apart. `extra`: the
    model's other inputs (masks.inputs)."""
    logits = model(input_ids=x, **extra).logits
    losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE,
                             reduction=reduction)
    return losses if reduction == "sum" else losses[y.reshape(-1) != IGNORE]


def model_loss(model, x, y, reduction="sum", seg=None):
    """A model's loss on a batch: the sum over its targets, or (reduction="none") each target's in the order of
    y[y != IGNORE]; chunked wherever head_of can take the model apart. `seg`: each position's piece in a packed row
    (batching.collate), kept apart from the others (masks.py); None where every row is one piece."""
    extra = {} if seg is None else inputs(seg, form(model))
    head = head_of(model)
    if head is None:
        return full_losses(model, x, y, reduction, **extra)
    return head_loss(head, head.hidden(x, **extra), y, reduction)


def model_logps(model, x, y, which, n, seg=None):
    """Each of n sequences' summed log-probability of its targets (`which`: the sequence of each target, in the order
    of y[y != IGNORE]), with its gradient; chunked wherever head_of can take the model apart, as model_loss."""
    extra = {} if seg is None else inputs(seg, form(model))
    head = head_of(model)
    if head is None:
        logits = model(input_ids=x, **extra).logits.float()
        keep = y != IGNORE
        picked = torch.log_softmax(logits[keep], -1).gather(1, y[keep][:, None])[:, 0]
        return torch.zeros(n, dtype=torch.float32, device=x.device).index_add(0, which, picked)
    return head_logps(head, head.hidden(x, **extra), y, which, n)


@torch.compiler.disable
def head_logps(head, hidden, y, which, n):
    keep = y != IGNORE
    weight = head.linear.weight
    return FusedLogps.apply(hidden[keep], weight, head.linear.bias, y[keep], which, n, head.scale, head.cap,
                            chunk_size(weight.shape[0], weight.device))


class ChunkedLoss(nn.Module):
    """A model and its loss as one module: forward(x, y, seg) is model_loss's, the summed loss over the targets (or
    each target's, reduction="none"). It exists for DDP: DDP syncs the gradients of what runs inside its own forward, and
    the chunked loss runs the model's body and output layer apart, so it is this module that a layout hands to DDP,
    FSDP and torch.compile (processes.py)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, seg=None, reduction="sum", which=None, n=0):
        """`which` (each target's sequence, of n): each sequence's summed log-probability instead (model_logps)."""
        if which is not None:
            return model_logps(self.model, x, y, which, n, seg)
        return model_loss(self.model, x, y, reduction, seg)
