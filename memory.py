"""The memory preflight: what a training step will need, estimated from the model's shape and the settings, and
checked against what the device has left before the first step. Better one line now than the kernel's OOM killer an
hour in, or at once with no message: 18 GB for --model=scratch --block_size=100000."""

import hardware
import masks
from cli import UserError
from loss import chunk_size
from modeling import parameters

# The constants below were measured on this project's CPU machine: peak RSS over the steps of a GPT-2 trained with
# AdamW, minus the RSS before the first (128 wide, 1-8 layers, 4-8 heads, vocabulary 4096, B x T of 2048-16384
# tokens; and distilgpt2's shape, 6 x 768, vocabulary 50257, 8 x 256). Rough by design: the estimate is within
# about 25% of what was measured, which is enough to tell a run that fits from one that is 10x too big.
#
# Bytes a transformer layer keeps for the backward pass, per token and per unit of its width, in fp32 (half under
# 16-bit autocast): 69 MB a layer at 4096 tokens x 128 wide, about 33 fp32 values (Korthikanti et al. count 34
# bytes in 16-bit, attention scores aside). A Llama-style MLP is narrower than GPT-2's 4x: a little less there.
ACTIVATION_BYTES = 132
# GRADIENT_CHECKPOINTING: a layer keeps its input and little else (measured 16 bytes per token and unit), and the
# backward pass recomputes one layer at a time in full.
CHECKPOINT_BYTES = 16
# Attention scores (B x heads x T x T) exist where attention is not a fused O(T) kernel: eager attention, and
# torch's SDPA on CPU in training when the model has attention dropout (the fused CPU kernel has no dropout; GPT-2
# and scratch models have 0.1). Scores, probabilities, dropout mask and output in fp32: 13-16 bytes per score and
# layer, measured. Elsewhere (CUDA, or no attention dropout) attention is O(T): no term.
SCORE_BYTES = 16
# ... under GRADIENT_CHECKPOINTING on CPU, a layer's recomputed scores are freed, but into glibc's heap, which
# keep_freed_memory keeps from the OS, and where allocations this size fragment: 8 bytes a score a layer, measured.
SCORE_CHECKPOINT_BYTES = 8
# The logits (positions x vocabulary, fp32), their log-softmax and its gradient: 2.9 copies, measured with the full
# logits; the chunked loss holds them for one chunk of positions at a time.
LOGIT_COPIES = 3
# On CPU, the heap that keep_freed_memory keeps holds more than the tensors at their peak once a few steps have run:
# 1.3x at distilgpt2's shape after 5 steps (4.66 GB against 3.59 GB without it), up to 1.9x with a small model and
# long blocks. Counted as this share of the logits, activations and scores.
HEAP_SLACK = 0.3
# The block-diagonal mask that keeps packed pieces apart (masks.py), [batch, block, block]: none for PIECES; a boolean
# one and the comparison it is made from (2 bytes a query-key pair); or an additive fp32 one besides (6).
MASK_BYTES = {masks.PIECES: 0, masks.BOOL: 2, masks.ADDITIVE: 6, None: 0}


def model_shape(model, device, sharded=False):
    """What step_memory needs to know of a model: its sizes, whether its attention materializes the scores, the
    bytes of its packing mask per query-key pair, and whether it is sharded over the ranks (FSDP)."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    c = base.config
    dropout = next((float(v) for v in (getattr(c, k, None) for k in ("attn_pdrop", "attention_dropout",
                                                                     "attention_probs_dropout_prob")) if v), 0.0)
    form = masks.form(model)  # first: the probe may make the attention pieces_attention, SDPA's kernel on each piece
    impl = getattr(c, "_attn_implementation", None) or "eager"
    impl = "sdpa" if impl == masks.IMPLEMENTATION else impl
    params, trained = parameters(model)
    return {"params": params, "trained": trained,
            "layers": c.num_hidden_layers, "width": c.hidden_size, "heads": c.num_attention_heads,
            "vocab": c.vocab_size, "cpu": device.type == "cpu", "chunk": chunk_size(c.vocab_size, device),
            "scores": impl == "eager" or (impl == "sdpa" and device.type == "cpu" and dropout > 0),
            "mask": MASK_BYTES[form], "sharded": sharded}


def step_memory(shape, batch, block, checkpointing, half=False, trained=None, ranks=1, accumulating=False):
    """Bytes one training step needs, by term (a rough estimate: see the constants above). `half`: 16-bit autocast;
    `trained`: parameters trained, if not the model's own (LoRA); `ranks` > 1: DDP keeps a second copy of the
    gradients in its buckets, FSDP (shape["sharded"]) a rank's share of weights, gradients and AdamW's state, and
    gathers the weights of a layer or two at once; `accumulating` (GRAD_ACCUM_STEPS > 1): FSDP holds the gradients
    unsharded until the step's last micro-batch. The logits are one chunk's (loss.py: the loss never holds more at
    once)."""
    s, tokens = shape, batch * block
    trained = s["trained"] if trained is None else trained
    if checkpointing:
        per_unit = CHECKPOINT_BYTES * s["layers"] + ACTIVATION_BYTES
        per_score = SCORE_BYTES + (SCORE_CHECKPOINT_BYTES * (s["layers"] - 1) if s["cpu"] else 0)
    else:
        per_unit, per_score = ACTIVATION_BYTES * s["layers"], SCORE_BYTES * s["layers"]
    if s.get("sharded"):
        weights = {"weights": 4 * s["params"] // ranks, "gradients and AdamW state": 12 * trained // ranks,
                   "gathered layers": 2 * 4 * s["params"] // s["layers"] if ranks > 1 else 0,
                   "unsharded gradients": 4 * trained if accumulating and ranks > 1 else 0}
    else:
        weights = {"weights": 4 * s["params"], "gradients and AdamW state": (4 * (1 + (ranks > 1)) + 8) * trained}
    terms = {**weights,
             "logits": LOGIT_COPIES * 4 * min(tokens, s.get("chunk") or tokens) * s["vocab"],
             "activations": per_unit * tokens * s["width"] // (2 if half else 1),
             "attention scores": per_score * batch * s["heads"] * block ** 2 if s["scores"] else 0,
             "packing mask": s.get("mask", 0) * batch * block ** 2}
    if s["cpu"]:
        terms["heap slack"] = int(HEAP_SLACK * (terms["logits"] + terms["activations"] + terms["attention scores"]))
    return terms


def estimate(model, cfg, device, dtype=None, ranks=1, sharded=False, unsharded=True):
    """step_memory for this run's model and settings: BATCH_SIZE x BLOCK_SIZE, GRADIENT_CHECKPOINTING, on `ranks`
    processes; `sharded` (FSDP), with the gradients `unsharded` between micro-batches or not (keeps_gradients)."""
    return step_memory(model_shape(model, device, sharded), cfg.BATCH_SIZE, cfg.BLOCK_SIZE,
                       cfg.GRADIENT_CHECKPOINTING, dtype is not None, ranks=ranks,
                       accumulating=unsharded and cfg.GRAD_ACCUM_STEPS > 1)


def keeps_gradients(model, cfg, device, dtype=None, ranks=1, local_ranks=1):
    """FSDP with GRAD_ACCUM_STEPS > 1: whether a step's earlier micro-batches skip the gradients' reduce-scatter, as
    DDP skips its all-reduce. Their gradients then stay unsharded on every rank until the step's last (4 bytes a
    trained parameter: with LoRA, little; in a full fine-tune, what FSDP exists to save), so only where the step
    still fits in 80% of the memory; else every micro-batch reduces its own, which costs communication, not memory.
    `local_ranks`: the ranks on this machine, which share its memory."""
    room, _ = hardware.available_memory(device, local_ranks)
    if cfg.GRAD_ACCUM_STEPS == 1 or room is None:
        return True
    terms = estimate(model, cfg, device, dtype, ranks, sharded=True)
    return sum(terms.values()) - terms["weights"] <= 0.8 * room


def preflight(model, cfg, device, dtype=None, ranks=1, local_ranks=1, sharded=False, unsharded=True):
    """Before the first step: a UserError where the step cannot fit in what the device has left (one line: the
    estimate, what is available, and settings that would fit); a warning line to print where it would take over 80%
    of it; else None. The weights are in memory already, so they count against neither side. `ranks` processes in
    all, `local_ranks` of them on this machine; `sharded` (FSDP), its gradients held `unsharded` between
    micro-batches or not (keeps_gradients)."""
    room, where = hardware.available_memory(device, local_ranks)
    if room is None:
        return None
    terms = estimate(model, cfg, device, dtype, ranks, sharded, unsharded)
    need = sum(terms.values()) - terms["weights"]
    parts = ", ".join(f"{k} {gb(v)}" for k, v in sorted(terms.items(), key=lambda kv: -kv[1])
                      if v >= 5e7 and k != "weights")  # what shows as 0.0 GB says nothing
    step = (f"a training step of BATCH_SIZE={cfg.BATCH_SIZE} x BLOCK_SIZE={cfg.BLOCK_SIZE} needs about {gb(need)} "
            f"besides the model's weights" + (f" ({parts})" if parts else ""))
    if need > room:
        fits = fitting_settings(model_shape(model, device, sharded), cfg, room, dtype is not None, ranks, unsharded)
        advice = (f"these would fit: {' or '.join(fits)}" if fits else
                  "not even one sequence of 8 tokens would: a smaller MODEL, or a device with more memory")
        raise UserError(f"{step}, more than the {gb(room)} {where}; {advice}")
    if need > 0.8 * room:
        return (f"warning: {step}, {need / room:.0%} of the {gb(room)} {where}: other work on this machine could "
                f"push it over (a smaller BATCH_SIZE, or GRADIENT_CHECKPOINTING=True, needs less)")
    return None


def fitting_settings(shape, cfg, room, half, ranks=1, unsharded=True):
    """Changes of one setting each that bring the step within `room` bytes, as flags; where none does, the
    smallest batch with the longest block that fits."""
    B, T, accum, ckpt = cfg.BATCH_SIZE, cfg.BLOCK_SIZE, cfg.GRAD_ACCUM_STEPS, cfg.GRADIENT_CHECKPOINTING

    def fits(batch, block, checkpointing=ckpt, trained=None):
        terms = step_memory(shape, batch, block, checkpointing, half, trained, ranks,
                            accumulating=unsharded and accum * B // batch > 1)
        return sum(terms.values()) - terms["weights"] <= room

    out = []
    b = next((b for b in range(B - 1, 0, -1) if B % b == 0 and fits(b, T)), None)  # the same global batch
    if b:
        out.append(f"--batch_size={b} --grad_accum_steps={accum * B // b}")
    t = longest(lambda t: fits(B, t), T - 1)
    if t:
        out.append(f"--block_size={t}")
    if not ckpt and fits(B, T, True):
        out.append("--gradient_checkpointing=True")
    if not cfg.LORA_R and cfg.MODEL != "scratch" and fits(B, T, trained=0):  # adapters: a rounding error
        out.append("--lora_r=16 (LoRA)")
    if not out and B > 1:
        t = longest(lambda t: fits(1, t), T - 1)
        if t:
            out.append(f"--batch_size=1 --grad_accum_steps={accum * B} --block_size={t}")
    return out


def longest(fits, most):
    """The largest multiple of 8 up to `most` (8 at least) for which fits() holds, which it does below some size;
    None where not even 8 does."""
    lo, hi = 0, most // 8  # in units of 8 tokens: fits(8 * lo) holds (lo = 0 trivially), fits(8 * (hi + 1)) not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(8 * mid) else (lo, mid - 1)
    return 8 * lo or None


def gb(n):
    return f"{n / 1e9:,.1f} GB"


