"""Fine-tune MODEL on TRAIN_FILE with a hand-written PyTorch loop, on CUDA when present, else CPU.

    python train.py                                        # distilgpt2 from the Hub (cached after the first run)
    python train.py --model=scratch --learning_rate=1e-3   # fully offline: a small GPT-2 and a BPE trained here
    python train.py --resume=True                          # continue the run in OUT_DIR, with its own settings
    python train.py --model=DIR --format=chat_template --lora_r=16 --learning_rate=2e-4   # an instruct model, LoRA
    python train.py --show_example=True                    # print the first example as the model sees it; exit

Reads TRAIN_FILE and VAL_FILE (written by prepare_data.py). Writes to OUT_DIR: best/ and final/ (Hugging Face model
directories: AutoModelForCausalLM.from_pretrained(dir) loads them), checkpoints/step-NNNNNNNN/ (the model plus
state.pt: optimizer, step, RNG states, config), metrics.jsonl and config.json.
"""

import json
import math
import os
import resource
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import checkpoints
from cli import UserError, load_config, no_such, progress, run
from dialogues import format_dialogue, iter_dialogues
from render import CHAT_TEMPLATE

def get_lr(step, cfg, total_steps):
    """Linear warmup to LEARNING_RATE, then cosine or linear decay to LEARNING_RATE * MIN_LR_FRACTION."""
    if step < cfg.WARMUP_STEPS:
        return cfg.LEARNING_RATE * (step + 1) / cfg.WARMUP_STEPS
    min_lr = cfg.LEARNING_RATE * cfg.MIN_LR_FRACTION
    progress = min(1.0, (step - cfg.WARMUP_STEPS) / max(1, total_steps - 1 - cfg.WARMUP_STEPS))  # 1 at the last
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.LR_SCHEDULE == "cosine" else 1 - progress
    return min_lr + (cfg.LEARNING_RATE - min_lr) * decay


def check_config(cfg):
    """Every setting problem we can see before any work starts."""
    checks = [
        (cfg.LEARNING_RATE > 0, f"LEARNING_RATE must be > 0, got {cfg.LEARNING_RATE}"),
        (0 <= cfg.MIN_LR_FRACTION <= 1, f"MIN_LR_FRACTION must be in [0, 1], got {cfg.MIN_LR_FRACTION}"),
        (cfg.LR_SCHEDULE in ("cosine", "linear"), f"LR_SCHEDULE must be 'cosine' or 'linear', got {cfg.LR_SCHEDULE!r}"),
        (cfg.WARMUP_STEPS >= 0, f"WARMUP_STEPS must be >= 0, got {cfg.WARMUP_STEPS}"),
        (cfg.BATCH_SIZE >= 1, f"BATCH_SIZE must be >= 1, got {cfg.BATCH_SIZE}"),
        (cfg.GRAD_ACCUM_STEPS >= 1, f"GRAD_ACCUM_STEPS must be >= 1, got {cfg.GRAD_ACCUM_STEPS}"),
        (cfg.BLOCK_SIZE >= 8, f"BLOCK_SIZE must be >= 8 tokens, got {cfg.BLOCK_SIZE}"),
        (cfg.MAX_STEPS >= 0, f"MAX_STEPS must be >= 0, got {cfg.MAX_STEPS}"),
        (cfg.MAX_STEPS > 0 or cfg.EPOCHS >= 1, f"EPOCHS must be >= 1 (or MAX_STEPS > 0), got {cfg.EPOCHS}"),
        (cfg.WEIGHT_DECAY >= 0, f"WEIGHT_DECAY must be >= 0, got {cfg.WEIGHT_DECAY}"),
        (cfg.GRAD_CLIP >= 0, f"GRAD_CLIP must be >= 0 (0 = off), got {cfg.GRAD_CLIP}"),
        (len(cfg.BETAS) == 2 and all(0 <= b < 1 for b in cfg.BETAS),
         f"BETAS must be two numbers in [0, 1), got {cfg.BETAS}"),
        (min(cfg.EVAL_INTERVAL, cfg.CHECKPOINT_INTERVAL, cfg.LOG_INTERVAL) >= 0, "intervals must be >= 0"),
        (cfg.KEEP_CHECKPOINTS >= 1, f"KEEP_CHECKPOINTS must be >= 1, got {cfg.KEEP_CHECKPOINTS}"),
        (cfg.TRAIN_SPEAKERS is None or (isinstance(cfg.TRAIN_SPEAKERS, (list, tuple)) and cfg.TRAIN_SPEAKERS
                                        and all(isinstance(s, str) for s in cfg.TRAIN_SPEAKERS)),
         f"TRAIN_SPEAKERS must be None or a list of speaker names, got {cfg.TRAIN_SPEAKERS!r}"),
        (cfg.FORMAT in ("speaker", "chat_template"),
         f"FORMAT must be 'speaker' or 'chat_template', got {cfg.FORMAT!r}"),
        (cfg.ROLES is None or (isinstance(cfg.ROLES, dict) and cfg.ROLES
                               and all(isinstance(v, str) and isinstance(k, str) for k, v in cfg.ROLES.items())),
         f"ROLES must be None or a dict of speaker -> role, like {{'Bob': 'assistant', '*': 'user'}}, "
         f"got {cfg.ROLES!r}"),
        (cfg.ROLES is None or cfg.FORMAT == "chat_template", "ROLES is for FORMAT='chat_template' only"),
        (cfg.SYSTEM_PROMPT is None or isinstance(cfg.SYSTEM_PROMPT, str) and cfg.SYSTEM_PROMPT.strip(),
         f"SYSTEM_PROMPT must be None or some text, got {cfg.SYSTEM_PROMPT!r}"),
        (cfg.REPORT_TO in ("none", "tensorboard"), f"REPORT_TO must be 'none' or 'tensorboard', got {cfg.REPORT_TO!r}"),
        (isinstance(cfg.LORA_R, int) and cfg.LORA_R >= 0, f"LORA_R must be >= 0 (0 = off), got {cfg.LORA_R!r}"),
        (cfg.LORA_ALPHA > 0, f"LORA_ALPHA must be > 0, got {cfg.LORA_ALPHA}"),
        (0 <= cfg.LORA_DROPOUT < 1, f"LORA_DROPOUT must be in [0, 1), got {cfg.LORA_DROPOUT}"),
        (cfg.LORA_TARGETS is None or (isinstance(cfg.LORA_TARGETS, (list, tuple)) and cfg.LORA_TARGETS
                                      and all(isinstance(t, str) for t in cfg.LORA_TARGETS)),
         f"LORA_TARGETS must be None or a list of module names like ['q_proj', 'v_proj'], got {cfg.LORA_TARGETS!r}"),
        (cfg.LOSS_CHUNK is None or type(cfg.LOSS_CHUNK) is int and cfg.LOSS_CHUNK >= 0,
         f"LOSS_CHUNK must be a number of positions >= 1, or 0 for automatic, got {cfg.LOSS_CHUNK!r}"),
        (not (cfg.LORA_R and cfg.MODEL == "scratch"),
         "LORA_R > 0 adapts a pretrained MODEL; a scratch model has nothing to keep frozen (use LORA_R=0)"),
        (not (cfg.FSDP and cfg.PRECISION == "fp16"),
         "FSDP=True computes in bf16 or fp32: fp16 needs a loss scaler that sharded gradients do not have (use "
         "--precision=bf16)"),
        (not (cfg.FSDP and cfg.COMPILE), "COMPILE=True with FSDP=True is not supported yet: use one or the other"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for name in ("TRAIN_FILE", "VAL_FILE"):
        path = getattr(cfg, name)
        if not os.path.isfile(path):
            raise UserError(f"{no_such(name, path)}: run prepare_data.py first")


def prepare_tokenizer(tokenizer, cfg, name):
    """The tokenizer as the run uses and saves it: FORMAT="speaker" gives it our template (so apply_chat_template
    and pipeline() speak the training format); "chat_template" keeps the model's own, which it must have."""
    from render import role_map
    if cfg.FORMAT == "chat_template" and not tokenizer.chat_template:
        raise UserError(f"MODEL {name!r} has no chat template of its own; FORMAT='chat_template' renders dialogues "
                        f"with it (use FORMAT='speaker', or an instruct model)")
    if cfg.FORMAT == "speaker":
        tokenizer.chat_template = CHAT_TEMPLATE
    return role_map(cfg.ROLES, cfg.TRAIN_SPEAKERS) if cfg.FORMAT == "chat_template" else None


def show_example(cfg):
    """--show_example=True: the first training dialogue as the model sees it, with what is trained marked."""
    import modeling
    from render import context_token, render_any, with_system
    first = next(iter_dialogues(cfg.TRAIN_FILE), None)
    if first is None:
        raise UserError(f"{cfg.TRAIN_FILE} holds no dialogues: run prepare_data.py first")
    if cfg.MODEL == "scratch":
        tokenizer = modeling.scratch_tokenizer(cfg, (format_dialogue(d) for d in iter_dialogues(cfg.TRAIN_FILE)))
    else:
        tokenizer = modeling.load_tokenizer(cfg.MODEL)
    roles = prepare_tokenizer(tokenizer, cfg, cfg.MODEL)
    first = with_system(first, cfg.SYSTEM_PROMPT)
    turns = render_any(tokenizer, [first], cfg.TRAIN_SPEAKERS, roles, cfg.TRAIN_FILE)[0]
    start = context_token(tokenizer, roles)  # a chat template's own first token is the context: nothing before it
    ids = [start] * (start is not None) + [t for tid, _ in turns for t in tid]
    mask = [0] * (start is not None) + [m for _, tm in turns for m in tm]  # is ids[j] a target (the context never)
    runs, j = [], 0
    while j < len(ids):  # decode runs of equal mask: a character can span tokens
        k = next((k for k in range(j, len(ids)) if mask[k] != mask[j]), len(ids))
        text = tokenizer.decode(ids[j:k], skip_special_tokens=False)
        runs.append(f"\u27e6{text}\u27e7" if mask[j] else text)
        j = k
    print(f"the first training example of {cfg.TRAIN_FILE}, FORMAT={cfg.FORMAT!r}, as the model sees it "
          f"(trained tokens between \u27e6 and \u27e7):\n")
    print("".join(runs))
    cut = f"; longer than BLOCK_SIZE={cfg.BLOCK_SIZE}, so trained in windows" if len(ids) - 1 > cfg.BLOCK_SIZE else ""
    print(f"\n{len(ids)} tokens, {sum(mask)} trained ({sum(mask) / len(ids):.0%}){cut}")


def init_processes(backend, rank, world):
    """torch.distributed's process group, from torchrun's environment. Under --max-restarts, the store torchrun
    shares with its workers outlives a restart and still holds the dead attempt's addresses, which the new one can
    read before they are replaced (pytorch/pytorch#135712: a restart fails at random). On one machine every rank has
    the same restart count, so each attempt takes keys of its own; across machines the counts can differ, and the
    README's elastic command turns the sharing off instead (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    import torch.distributed as dist
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("LOCAL_WORLD_SIZE") != str(world):
        return dist.init_process_group(backend)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False)
    attempt = dist.PrefixStore(f"dialogue-finetune/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=attempt, rank=rank, world_size=world)


def open_model(cfg, resume_from, world, master):
    """The tokenizer and model the run trains: from the checkpoint it resumes (a LoRA checkpoint holds the adapter
    alone, applied to MODEL; an FSDP checkpoint holds the trained weights in shards, which restore() loads into
    MODEL), else MODEL, else a scratch model; with the adapters and gradient checkpointing of modeling.adapt."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import modeling
    # FSDP: rank 0 alone reads the weights, and sends each rank its part as the model is sharded (sharding.shard)
    load = modeling.load_shape if cfg.FSDP and world > 1 and not master else modeling.load
    if resume_from and os.path.isdir(os.path.join(resume_from, "shards")):  # FSDP's: the weights come in restore()
        tokenizer = modeling.load_tokenizer(resume_from)
        _, model = modeling.build_scratch(cfg, [], tokenizer) if cfg.MODEL == "scratch" else load(cfg.MODEL)
        return tokenizer, modeling.adapt(model, cfg)
    if resume_from and os.path.exists(os.path.join(resume_from, "adapter_model.safetensors")):
        tokenizer = modeling.load_tokenizer(resume_from)
        adapter = load_file(os.path.join(resume_from, "adapter_model.safetensors"))
        return tokenizer, modeling.adapt(load(cfg.MODEL)[1], cfg, adapter)
    if resume_from:
        tokenizer, model = load(resume_from)
    elif cfg.MODEL == "scratch":
        texts = (format_dialogue(d) for d in iter_dialogues(cfg.TRAIN_FILE))
        if world > 1:  # one tokenizer for all ranks: rank 0 trains it, the others load it
            shared = os.path.join(cfg.OUT_DIR, ".tmp-scratch-tokenizer")
            if master:
                modeling.scratch_tokenizer(cfg, texts).save_pretrained(shared)
            dist.barrier()
            tokenizer, model = modeling.build_scratch(cfg, texts, AutoTokenizer.from_pretrained(shared))
        else:
            tokenizer, model = modeling.build_scratch(cfg, texts)
    else:
        tokenizer, model = load(cfg.MODEL)
    return tokenizer, modeling.adapt(model, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# the run's state, its data step by step, and one optimizer step

@dataclass
class RunState:
    """Where a run stands; every checkpoint holds it. Optimizer steps taken; the position in the data (the epoch, and
    the blocks of it consumed); the best validation loss so far; this epoch's figures; the training losses since the
    last line of metrics.jsonl, each (loss, trained tokens, seconds)."""
    step: int = 0
    epoch: int = 0
    offset: int = 0
    best_val: float = math.inf
    best_step: int = None
    tokens: int = 0  # this epoch's trained tokens,
    real: int = 0  # its real input positions,
    positions: int = 0  # and all the positions processed, padding included
    recent: list = field(default_factory=list)
    trained: int = 0  # tokens trained and seconds spent on steps since this process started: its summary line
    train_time: float = 0.0

    @classmethod
    def restore(cls, state):
        tokens, real, positions = state["epoch_stats"]
        return cls(state["step"], state["epoch"], state["offset"], state["best_val"], state["best_step"], tokens,
                   real, positions, state.get("recent", []))

    def saved(self):
        """As a checkpoint's state.pt holds it."""
        return {"step": self.step, "epoch": self.epoch, "offset": self.offset, "best_val": self.best_val,
                "best_step": self.best_step, "epoch_stats": [self.tokens, self.real, self.positions],
                "recent": self.recent}

    def advance(self, chunk, positions, loss, n_targets, seconds):
        """One step taken on the blocks `chunk`: the position in the data moves on, and the figures add up."""
        from batching import count
        self.step, self.offset = self.step + 1, self.offset + len(chunk)
        self.tokens, self.real, self.positions = self.tokens + n_targets, self.real + count(chunk)[1], \
            self.positions + positions
        self.recent.append((loss, n_targets, seconds))
        self.trained, self.train_time = self.trained + n_targets, self.train_time + seconds

    def epoch_line(self, train_tokens, ended=True):
        return (f"epoch {self.epoch + 1}{'' if ended else ' (the run ends inside it)'}: {self.tokens:,} tokens trained "
                f"({self.tokens / max(train_tokens, 1):.0%} of the train set), padding "
                f"{1 - self.real / max(self.positions, 1):.1%} of {self.positions:,} positions")


@dataclass
class Data:
    train_tokens: object  # batching.Tokens, memory-mapped from the token cache
    train: object  # batching.Blocks: what an epoch trains on
    val_tokens: object  # the validation dialogues that VAL_MAX_TOKENS keeps
    val: list  # their (x, y) batches
    sha256: str  # TRAIN_FILE's: a resume must find the same file
    seconds: float  # what loading them took at start-up


class Steps:
    """The training blocks step by step: each epoch in its epoch_order, a global batch of blocks a step, as one
    micro-batch per GRAD_ACCUM_STEPS for this rank (step_batches: N ranks see what one process would)."""

    def __init__(self, blocks, cfg, world, rank, pad):
        self.blocks, self.world, self.rank, self.pad = blocks, world, rank, pad
        self.batch_size, self.block_size, self.seed = cfg.BATCH_SIZE, cfg.BLOCK_SIZE, cfg.SEED
        self.per_step = cfg.BATCH_SIZE * cfg.GRAD_ACCUM_STEPS * world
        self.per_epoch = math.ceil(len(blocks) / self.per_step)
        self.order, self.order_epoch = None, None

    def at(self, epoch, offset):
        """The step that starts `offset` blocks into `epoch`: (its blocks, this rank's micro-batches, the positions
        all ranks process, padding included)."""
        from batching import collate, epoch_order, step_batches, width
        if self.order_epoch != epoch:
            self.order, self.order_epoch = epoch_order(self.blocks, 16 * self.per_step, self.seed + epoch), epoch
        chunk = [self.blocks[j] for j in self.order[offset:offset + self.per_step]]
        slots = step_batches(chunk, self.batch_size, self.world)
        # a rank left without blocks at an epoch's end still runs forward/backward (DDP needs every rank's gradients)
        # on a block whose targets are all masked: it adds nothing
        dummy = (chunk[0][0], [0] * len(chunk[0][0]))
        micro = [collate(slot[self.rank] or [dummy], self.pad, self.block_size) for slot in slots]
        positions = sum(len(b) * width(b, self.block_size) for slot in slots for b in slot if b)
        return chunk, micro, positions


def train_step(net, model, optimizer, scaler, micro, device, dtype, grad_clip):
    """One optimizer step: forward and backward over the step's micro-batches (the loss token-weighted over all of
    them and all ranks), then clip, update and zero the gradients. Returns (the mean loss, trained tokens, why no
    update was made: a loss or gradients that are not finite; else None). bench.py times this same function."""
    import modeling
    loss, n_targets = modeling.forward_backward(net, micro, device, dtype, scaler)
    if not math.isfinite(loss):
        return loss, n_targets, f"the loss is {loss}"
    if not modeling.optimizer_step(model, optimizer, scaler, grad_clip):
        return loss, n_targets, "the gradients are not finite"
    return loss, n_targets, None


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class Interrupt:
    """Ctrl-C (SIGINT), and SIGTERM, which clusters and spot machines send before they take a machine away: the first
    asks the run to stop once the current optimizer step is done, with a checkpoint; a second stops it at once."""

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt  # the second: at once
        self.signal = signum
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (again to stop at "
                  f"once)", file=sys.stderr, flush=True)

    def asked(self, world, device):
        """The signal that stops the run now, or None. Under torchrun each rank gets its own signal, maybe a step
        apart: all stop after the step in which any rank got one."""
        if world == 1:
            return self.signal
        import torch
        import torch.distributed as dist
        flag = torch.tensor([self.signal or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def interrupted(run, s, signum, world):
    """The run stopped by a signal after step s.step, with its checkpoint written: the line that says so and how to
    go on, and the exit code of a process ended by that signal (130 for Ctrl-C, 143 for SIGTERM)."""
    args = [a for a in sys.argv[1:] if not a.lower().startswith("--resume=")] + ["--resume=True"]
    command = shlex.join([os.path.basename(sys.argv[0]), *args])
    how = (f"python {command}" if world == 1 else
           f"the same torchrun command with --resume=True (... {command})")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"interrupted ({signal.Signals(signum).name}) after step {s.step}: checkpoint "
              f"{os.path.join(run.cfg.OUT_DIR, 'checkpoints', f'step-{s.step:08d}')}. Resume with: {how}",
              file=sys.stderr, flush=True)
    return SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------------------------------
# setting up: processes, model, data, optimizer

def start_processes(cfg):
    """`torchrun --nproc_per_node=N train.py` starts N ranks (DDP or FSDP: nccl on CUDA, gloo on CPU); a plain
    `python train.py` is one. Rank 0 alone prints and writes files. Returns (world, rank, this rank's device setting,
    the backend)."""
    import torch
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world == 1:
        return 1, 0, None, None
    if torch.cuda.is_available() and cfg.DEVICE in ("auto", "cuda"):
        device, backend = f"cuda:{int(os.environ['LOCAL_RANK'])}", "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = "cpu", "gloo"
    init_processes(backend, rank, world)
    return world, rank, device, backend


def group_of_one(device):
    """FSDP=True in one process: the sharded code path on one device needs a process group, of one."""
    import torch
    import torch.distributed as dist
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    if "MASTER_ADDR" in os.environ:  # torchrun --nproc_per_node=1
        dist.init_process_group(backend)
    else:  # no rendezvous needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return backend


def check_data(cfg):
    """Before the model and the cache: a typo must not cost a tokenizing pass."""
    for path in (cfg.TRAIN_FILE, cfg.VAL_FILE):
        if next(iter_dialogues(path), None) is None:
            raise UserError(f"{path} holds no dialogues: run prepare_data.py first")
    if cfg.TRAIN_SPEAKERS is not None:
        unknown = set(cfg.TRAIN_SPEAKERS)
        for d in iter_dialogues(cfg.TRAIN_FILE):  # read only until each has been seen once
            unknown -= {s for s, _ in d}
            if not unknown:
                break
        if unknown:
            raise UserError(f"TRAIN_SPEAKERS {sorted(unknown)} never speak in {cfg.TRAIN_FILE}")


def load_data(cfg, tokenizer, roles, train_sha, world, say):
    """The token cache: tokenized once (rank 0 builds it, the others wait), memory-mapped by every later start."""
    import torch.distributed as dist
    t0 = time.time()

    import cache
    from batching import count, eval_batches, pack_tokens

    def cached(build):
        train_tok = cache.tokens(cfg.TRAIN_FILE, train_sha, tokenizer, cfg, roles, say, build)
        val_tok = cache.tokens(cfg.VAL_FILE, checkpoints.sha256(cfg.VAL_FILE), tokenizer, cfg, roles, say, build)
        return train_tok, val_tok, cache.blocks(train_tok, cfg.BLOCK_SIZE, say, build)

    master = int(os.environ.get("RANK", 0)) == 0
    if master:
        train_tok, val_tok, train_blocks = cached(build=True)
    if world > 1:  # the other ranks map what rank 0 built or checked
        dist.barrier()
        if not master:
            train_tok, val_tok, train_blocks = cached(build=False)
    val_tok = val_tok.head(cfg.VAL_MAX_TOKENS)
    val_blocks = pack_tokens(val_tok, cfg.BLOCK_SIZE)
    if count(val_blocks)[0] == 0:
        raise UserError(f"{cfg.VAL_FILE} has no turns by TRAIN_SPEAKERS {cfg.TRAIN_SPEAKERS}, so nothing to validate")
    # any pad id will do: padded positions are never targets and never attended to
    val = eval_batches(val_blocks, cfg.BATCH_SIZE, tokenizer.eos_token_id, cfg.BLOCK_SIZE)
    return Data(train_tok, train_blocks, val_tok, val, train_sha, time.time() - t0)


def restore(run, net, optimizer, scaler, device, world, rank):
    """The RunState to start from, with the optimizer, the loss scaler and each rank's random stream restored; from
    an FSDP checkpoint, the trained weights too. A checkpoint of either kind resumes under FSDP or not."""
    import torch
    cfg, state = run.cfg, run.state
    torch.manual_seed(cfg.SEED + rank)  # dropout; each rank its own stream
    if state is None:
        return RunState()
    if state.get("sharded") or cfg.FSDP:
        import sharding
        inner = getattr(net, "module", net)  # DDP's: the weights are named as the ChunkedLoss names them
        if state.get("sharded"):
            sharding.load(run.resume_from, getattr(inner, "_orig_mod", inner), optimizer, state["param_groups"])
        else:
            sharding.load_full_optimizer(net, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == world:  # same number of ranks: each continues its own random stream exactly
        torch.set_rng_state(state["rng"][rank]["torch"])
        if device.type == "cuda" and state["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
    else:  # streams that cannot be split or merged: new ones, not a repeat of the run's first steps'
        torch.manual_seed(cfg.SEED + rank + 1_000_003 * state["step"])
    return RunState.restore(state)


def total_steps(cfg, s, steps, n_blocks):
    """The step the run ends at: MAX_STEPS, or the end of its last epoch (counted from where it stands)."""
    if cfg.MAX_STEPS > 0:
        return cfg.MAX_STEPS
    return s.step + math.ceil((n_blocks - s.offset) / steps.per_step) + (cfg.EPOCHS - s.epoch - 1) * steps.per_epoch


def nothing_left(run, s, end_step, say):
    """A resumed run already at its end: say so and touch nothing (True); past its end: refused."""
    cfg = run.cfg
    if run.state is None or s.step < end_step:
        return False
    end = f"MAX_STEPS={cfg.MAX_STEPS}" if cfg.MAX_STEPS > 0 else f"EPOCHS={cfg.EPOCHS}"
    if s.step > end_step:
        raise UserError(f"{run.resume_from} is at step {s.step}, past the end of this run at step {end_step} ({end})"
                        f"; nothing was changed. To train on, resume with a larger --epochs or --max_steps")
    if not os.path.isdir(os.path.join(cfg.OUT_DIR, "final")):
        return False  # killed while final/ was written: the run writes it again
    say(f"the run in {cfg.OUT_DIR} is complete (step {s.step} of {end_step}, {end}); nothing to do. To train on, "
        f"resume with a larger --epochs or --max_steps")
    return True


# ---------------------------------------------------------------------------------------------------------------------
# what the loop does besides the step: log, validate, checkpoint

def log(run, **record):
    """A line of metrics.jsonl (rank 0), and with REPORT_TO="tensorboard" the same figures as events."""
    try:
        with open(run.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full disk, say: a torn last line is skipped when the file is read back
        raise UserError(f"cannot write {run.metrics}: {e.strerror}") from None
    if run.board is not None:
        for key, value in record.items():
            if key not in ("step", "epoch"):
                run.board.add_scalar(f"{'val' if key.startswith('val') else 'train'}/{key}", value, record["step"])


def open_board(run, step):
    """REPORT_TO="tensorboard": a SummaryWriter in OUT_DIR/tensorboard (rank 0), or the line that says what is missing
    (`run` None: only check, before anything is written). The events after the step a run starts from are purged,
    as its metrics.jsonl lines are (all of them where it starts again): the curves go on without duplicates."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("REPORT_TO='tensorboard' needs the tensorboard package: pip install tensorboard (or "
                        "--report_to=none)") from None
    if run is not None:
        return SummaryWriter(os.path.join(run.cfg.OUT_DIR, "tensorboard"), flush_secs=10,
                             purge_step=step + 1 if run.state is not None else 0)


def log_train(run, s, lr):
    """The training loss, lr and tokens/s since the last line."""
    log(run, step=s.step, epoch=s.epoch + 1, loss=sum(r[0] for r in s.recent) / len(s.recent), lr=lr,
        tokens_per_s=tokens_per_s(s.recent))
    s.recent = []


def validate(run, s, model, net, tokenizer, data, device, dtype):
    """The validation loss now, every rank scoring its share of the batches; logged, and best/ saved when it is the
    best so far. Returns (the loss, the line to print)."""
    import modeling
    scorer = net if run.cfg.FSDP else model  # FSDP: only the sharded module gathers the weights
    val_loss = modeling.evaluate(scorer, data.val, device, dtype, desc="validation", shared=True)
    if int(os.environ.get("RANK", 0)) == 0:
        log(run, step=s.step, epoch=s.epoch + 1 if s.step else 0, val_loss=val_loss, val_ppl=modeling.ppl(val_loss))
    best = val_loss < s.best_val and s.step > 0
    if best:
        s.best_val, s.best_step = val_loss, s.step
        save_model(run, model, net, tokenizer, "best")
    return val_loss, f"step {s.step}: val loss {val_loss:.4f} (ppl {modeling.ppl(val_loss):.2f}){' best' * best}"


def save_model(run, model, net, tokenizer, name):
    """best/ or final/, a Hugging Face model directory, written by rank 0; under FSDP every rank first sends it its
    part of the weights."""
    weights = None
    if run.cfg.FSDP:
        import sharding
        weights = sharding.full_weights(net)
    if int(os.environ.get("RANK", 0)) == 0:
        checkpoints.save_model(model, tokenizer, os.path.join(run.cfg.OUT_DIR, name), weights=weights)


def save_checkpoint(run, s, model, net, tokenizer, optimizer, scaler, device, world, extra):
    """Every rank's random state gathered (a resume with as many ranks continues each exactly); rank 0 writes, or
    under FSDP every rank its shard."""
    import torch
    import torch.distributed as dist
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    state = {**s.saved(), **extra, "world_size": world, "scaler": scaler.state_dict() if scaler else None,
             "rng": rngs, "config": vars(run.cfg)}
    if run.cfg.FSDP:
        import sharding
        return sharding.save(run.cfg.OUT_DIR, net, optimizer, tokenizer, model.config, state,
                             run.cfg.KEEP_CHECKPOINTS)
    if world > 1 and dist.get_rank() != 0:
        return
    checkpoints.save(run.cfg.OUT_DIR, model, tokenizer, {**state, "optimizer": optimizer.state_dict()},
                     run.cfg.KEEP_CHECKPOINTS)


def stopped(run, s, problem):
    return UserError(f"step {s.step + 1}: {problem}; stopped before the update. The last good checkpoint is "
                     f"{checkpoints.last_good(run.cfg.OUT_DIR) or 'none'}; try a lower LEARNING_RATE")


# ---------------------------------------------------------------------------------------------------------------------

def main():
    t_main = time.time()
    given = set()
    cfg = load_config(doc=__doc__, given=given)
    check_config(cfg)
    if cfg.SHOW_EXAMPLE:
        return show_example(cfg)
    # the heavy imports (torch, in setup and after) wait until the settings are checked: --help and a mistyped
    # setting answer at once
    import torch.distributed as dist
    run, world, rank, device, dtype = setup(cfg, given)
    cfg, master = run.cfg, rank == 0
    say = print if master else (lambda *a, **k: None)
    tokenizer, model, net, data = build(run, world, device, dtype, say)

    optimizer, scaler, net = optimization(model, net, cfg, world, device, dtype)
    s = restore(run, net, optimizer, scaler, device, world, rank)
    steps = Steps(data.train, cfg, world, rank, tokenizer.eos_token_id)
    end_step = total_steps(cfg, s, steps, len(data.train))
    say(describe(cfg, model, data, steps, end_step))
    say(f"start-up: {time.time() - t_main:.1f}s (data {data.seconds:.1f}s, the rest mostly imports and the model); "
        f"peak memory so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    if nothing_left(run, s, end_step, say):
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    if master:  # every check passed: the run's files begin here
        checkpoints.begin(run, {"global_batch": steps.per_step, "torchrun_job": run.job})
        run.board = open_board(run, s.step) if cfg.REPORT_TO == "tensorboard" else None
    extra = {"train_sha256": data.sha256, "global_batch": steps.per_step}  # what each checkpoint also records

    # -----------------------------------------------------------------------------------------------------------------
    # the loop: lr, micro-batches (forward, backward), clip, step, log; then validate and checkpoint when due
    start_step, t_start, first_val = s.step, time.time(), None
    if run.state is None:  # the starting point, for "val loss X -> Y" and the loss curve
        first_val, line = validate(run, s, model, net, tokenizer, data, device, dtype)
        say(line)
    # closed on an error too: the error line comes after the bar's, and Ctrl-C is Python's again
    signum = None
    with Interrupt() as stop, progress(total=end_step, initial=s.step, desc="train", unit="step",
                                       disable=not master) as bar:
        while s.step < end_step and not signum:
            lr = set_lr(optimizer, get_lr(s.step, cfg, end_step))
            chunk, micro, positions = steps.at(s.epoch, s.offset)
            t0 = time.time()
            loss, n, problem = train_step(net, model, optimizer, scaler, micro, device, dtype, cfg.GRAD_CLIP)
            if problem:
                raise stopped(run, s, problem)
            s.advance(chunk, positions, loss, n, time.time() - t0)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s(s.recent):,.0f}")
            bar.update(1)
            if master and (due(s.step, cfg.LOG_INTERVAL) or s.step == end_step):
                log_train(run, s, lr)

            end_of_epoch = s.offset >= len(data.train)
            last = end_of_epoch or s.step == end_step
            if last or due(s.step, cfg.EVAL_INTERVAL):
                line = validate(run, s, model, net, tokenizer, data, device, dtype)[1]
                if master:
                    bar.write(line)
            if end_of_epoch:
                if master:
                    bar.write(s.epoch_line(data.train_tokens.count_trained()))
                s.epoch, s.offset, s.tokens, s.real, s.positions = s.epoch + 1, 0, 0, 0, 0
            signum = stop.asked(world, device)
            if last or due(s.step, cfg.CHECKPOINT_INTERVAL) or signum:
                save_checkpoint(run, s, model, net, tokenizer, optimizer, scaler, device, world, extra)
            if world > 1 and (last or due(s.step, cfg.EVAL_INTERVAL) or due(s.step, cfg.CHECKPOINT_INTERVAL) or signum):
                dist.barrier()  # the other ranks wait while rank 0 writes

    # -----------------------------------------------------------------------------------------------------------------
    if signum and s.step < end_step:  # said after the bar is closed
        raise interrupted(run, s, signum, world)
    if s.offset > 0 and s.positions:  # a run that ends inside an epoch: its figures too
        say(s.epoch_line(data.train_tokens.count_trained(), ended=False))
    save_model(run, model, net, tokenizer, "final")
    if master:
        if run.board is not None:
            run.board.close()
        shutil.rmtree(os.path.join(cfg.OUT_DIR, ".tmp-scratch-tokenizer"), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    say(summary(cfg, model, s, start_step, time.time() - t_start, first_val))


def optimization(model, net, cfg, world, device, dtype):
    """AdamW (decay on matrices and embeddings only, never on biases and LayerNorm weights; of the shards, under
    FSDP), fp16's loss scaler (bf16 needs none), and what the loop runs: `net`, the model and its loss as one module
    (loss.ChunkedLoss: the loss never holds the full logits, and DDP syncs what it runs), compiled and in DDP as
    asked. Returns (optimizer, scaler, what the loop runs)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    import modeling
    optimizer = modeling.make_optimizer(model, cfg.LEARNING_RATE, cfg.WEIGHT_DECAY, cfg.BETAS, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if cfg.FSDP:
        return optimizer, scaler, net  # sharded already (build), and FSDP reduces the gradients itself
    net = torch.compile(net) if cfg.COMPILE else net
    net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    return optimizer, scaler, net


def build(run, world, device, dtype, say):
    """The model and tokenizer the run trains, on its device, and its data: (tokenizer, model, the model with its
    loss as one module (loss.ChunkedLoss; under FSDP, sharded), Data)."""
    import loss
    import modeling
    cfg, master = run.cfg, int(os.environ.get("RANK", 0)) == 0
    train_sha = checkpoints.sha256(cfg.TRAIN_FILE)  # read in pieces: never the whole file in memory
    if run.state is not None and run.state["train_sha256"] != train_sha:
        raise UserError(f"{cfg.TRAIN_FILE} has changed since {run.resume_from} was written; resuming would not "
                        f"continue the same run (start a new one in another OUT_DIR)")
    checkpoints.check_writable(cfg.OUT_DIR)
    check_data(cfg)
    tokenizer, model = open_model(cfg, run.resume_from, world, master)
    if run.state is not None:
        say(f"resuming from {run.resume_from} (step {run.state['step']})")
    roles = prepare_tokenizer(tokenizer, cfg, cfg.MODEL)
    if cfg.BLOCK_SIZE > modeling.context_size(model):
        raise UserError(f"BLOCK_SIZE={cfg.BLOCK_SIZE} is beyond the model's context of "
                        f"{modeling.context_size(model)} tokens")
    loss.use_chunk(cfg.LOSS_CHUNK)
    net = loss.ChunkedLoss(model.train())
    if cfg.FSDP:  # each block's weights go to the device as they are sharded: never the whole model at once
        import sharding
        sharding.shard(net, model, device, dtype)
    else:
        model.to(device)
    keep = not cfg.FSDP or modeling.keeps_gradients(model, cfg, device, dtype)
    net.reduce_every_micro_batch = not keep
    if not keep:
        say(f"FSDP: every micro-batch reduce-scatters its gradients: holding them unsharded over "
            f"GRAD_ACCUM_STEPS={cfg.GRAD_ACCUM_STEPS} micro-batches would not fit in memory")
    if memory_note := modeling.preflight(model, cfg, device, dtype, keep):  # a step that cannot fit stops here
        say(memory_note)
    if master:
        n_params, n_trained = modeling.parameters(model)
        checkpoints.check_space(cfg.OUT_DIR, n_trained, n_params, cfg.KEEP_CHECKPOINTS)
    return tokenizer, model, net, load_data(cfg, tokenizer, roles, train_sha, world, say)


def describe(cfg, model, data, steps, end_step):
    """The start-up line: the model, what it trains, and the data."""
    import modeling
    from batching import IGNORE
    n_params, n_trained = modeling.parameters(model)
    lora = f"LoRA r={cfg.LORA_R} on {cfg.LORA_TARGETS or 'all linear layers'}, " if cfg.LORA_R else ""
    notes = data.train_tokens.notes  # what a chat template's rendering changed (render.messages), where any
    changed = "".join([f"; {notes['merged']:,} turns merged into the message before them (same role)"] *
                      bool(notes.get("merged")) + [f"; {notes['context']:,} opening assistant turns kept as untrained "
                                                   f"context (the template wants the user first)"] *
                      bool(notes.get("context")))
    return (f"model: {cfg.MODEL} ({n_params / 1e6:.1f}M parameters, {lora}{n_trained / 1e6:.2f}M trained"
            f"{', gradient checkpointing' if cfg.GRADIENT_CHECKPOINTING else ''}); FORMAT={cfg.FORMAT}; "
            f"{len(data.train_tokens):,} train dialogues -> {data.train_tokens.count_trained():,} tokens in "
            f"{len(data.train)} blocks of <= {cfg.BLOCK_SIZE}; {steps.per_epoch} steps/epoch of {steps.per_step} "
            f"blocks, {end_step} steps; validation on {len(data.val_tokens):,} dialogues, "
            f"{sum(int((y != IGNORE).sum()) for _, y in data.val):,} tokens{changed}")


def summary(cfg, model, s, start_step, seconds, first_val):
    """The last line: what was trained, how fast, and how validation went."""
    import modeling
    n_params, n_trained = modeling.parameters(model)
    trained, train_time = s.trained, s.train_time
    start_val = f"{first_val:.4f} -> " if first_val is not None else ""
    return (f"trained steps {start_step}->{s.step} in {seconds:.0f}s: {trained:,} tokens at "
            f"{trained / max(train_time, 1e-9):,.0f} tok/s; val loss {start_val}best {s.best_val:.4f} "
            f"(ppl {modeling.ppl(s.best_val):.2f}) at step {s.best_step}; {n_trained:,} of {n_params:,} parameters "
            f"trained; models in {cfg.OUT_DIR}/best and {cfg.OUT_DIR}/final"
            f"{' (merged; the LoRA adapter in adapter/ of each)' if cfg.LORA_R else ''}")


def tokens_per_s(recent):
    return sum(r[1] for r in recent) / max(sum(r[2] for r in recent), 1e-9)


def due(step, interval):
    return bool(interval) and step % interval == 0


def setup(cfg, given):
    """The processes, the run in OUT_DIR and the device. Returns (the run, world, rank, device, autocast dtype)."""
    import modeling
    world, rank, device_name, backend = start_processes(cfg)
    say = print if rank == 0 else (lambda *a, **k: None)
    run = checkpoints.open_run(cfg, given, world, say)
    check_config(run.cfg)
    if run.cfg.REPORT_TO == "tensorboard":
        open_board(None, 0)
    device, dtype, device_note = modeling.pick_device(device_name or run.cfg.DEVICE, run.cfg.PRECISION)
    if run.cfg.FSDP and world == 1:  # the run's own setting: known only now, on a resume
        backend = group_of_one(device)
    if run.cfg.FSDP and device.type == "cpu":
        modeling.return_freed_memory()
    say(device_note + (f"; {world} process{'es' * (world > 1)} ({backend}, {'FSDP' if run.cfg.FSDP else 'DDP'})"
                       if backend else ""))
    return run, world, rank, device, dtype


if __name__ == "__main__":
    run(main)
