"""Fine-tune MODEL on TRAIN_FILE with a hand-written PyTorch loop, on CUDA when present, else CPU.

    python train.py                                        # distilgpt2 from the Hub (cached after the first run)
    python train.py --model=scratch --learning_rate=1e-3   # fully offline: a small GPT-2 and a BPE trained here
    python train.py --resume=True                          # continue the run in OUT_DIR, with its own settings
    python train.py --model=DIR --format=chat_template --lora_r=16 --learning_rate=2e-4   # an instruct model, LoRA
    python train.py --show_example=True                    # print the first example as the model sees it; exit
    python train.py --objective=dpo --beta=0.1             # preference pairs (prepare_data.py --objective=dpo): DPO

Reads TRAIN_FILE and VAL_FILE (written by prepare_data.py). Writes to OUT_DIR: best/ and final/ (Hugging Face model
directories: AutoModelForCausalLM.from_pretrained(dir) loads them), checkpoints/step-NNNNNNNN/ (the model plus
state.pt: optimizer, step, RNG states, config), metrics.jsonl and config.json.
"""

import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import checkpoints
import trackers
from cli import UserError, load_config, no_such, progress, quiet_libraries, run
from dialogues import OBJECTIVES, format_dialogue, iter_dialogues, iter_pairs
from render import Rendering, run_speakers, speaker_template


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
        (cfg.EARLY_STOP_EVALS >= 0, f"EARLY_STOP_EVALS must be >= 0 (0 = off), got {cfg.EARLY_STOP_EVALS}"),
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
        (cfg.OBJECTIVE in OBJECTIVES, f"OBJECTIVE must be one of {', '.join(map(repr, OBJECTIVES))}, got "
                                      f"{cfg.OBJECTIVE!r}"),
        (isinstance(cfg.BETA, (int, float)) and cfg.BETA > 0, f"BETA must be a number > 0, got {cfg.BETA!r}"),
        (isinstance(cfg.SIMPO_GAMMA, (int, float)) and cfg.SIMPO_GAMMA >= 0,
         f"SIMPO_GAMMA must be a number >= 0, got {cfg.SIMPO_GAMMA!r}"),
        (cfg.OBJECTIVE == "sft" or cfg.TRAIN_SPEAKERS is None,
         f"TRAIN_SPEAKERS is for OBJECTIVE='sft': with {cfg.OBJECTIVE!r} the replies of each pair are what is scored"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    trackers.check(cfg.REPORT_TO, installed=False)
    for name in ("TRAIN_FILE", "VAL_FILE"):
        path = getattr(cfg, name)
        if not os.path.isfile(path):
            raise UserError(f"{no_such(name, path)}: run prepare_data.py first")


def prepare_tokenizer(tokenizer, rendering, name, speakers):
    """The tokenizer as the run uses and saves it: FORMAT="speaker" gives it our template, its user and assistant
    being `speakers` (render.run_speakers), so apply_chat_template, pipeline() and `transformers serve` speak the
    training format; "chat_template" keeps the model's own, which it must have. Returns the rendering's roles_of."""
    if rendering.format == "chat_template" and not tokenizer.chat_template:
        raise UserError(f"MODEL {name!r} has no chat template of its own; FORMAT='chat_template' renders dialogues "
                        f"with it (use FORMAT='speaker', or an instruct model)")
    if rendering.format == "speaker":
        tokenizer.chat_template = speaker_template(*speakers)
    return rendering.roles_of


def show_example(cfg):
    """--show_example=True: the first training dialogue (or preference pair) as the model sees it, with what is
    trained (scored) marked."""
    import modeling
    from render import context_token, render_any, with_system
    first = next(training_texts(cfg), None)
    if first is None:
        raise UserError(f"{cfg.TRAIN_FILE} holds no dialogues: run prepare_data.py first")
    if cfg.MODEL == "scratch":
        tokenizer = modeling.scratch_tokenizer(cfg, training_texts(cfg))
    else:
        tokenizer = modeling.load_tokenizer(cfg.MODEL)
    rendering = Rendering.of(cfg)
    roles_of = prepare_tokenizer(tokenizer, rendering, cfg.MODEL, run_speakers(cfg))
    if cfg.OBJECTIVE != "sft":
        import preference
        pair = next(iter_pairs(cfg.TRAIN_FILE))
        print(f"the first preference pair of {cfg.TRAIN_FILE}, FORMAT={cfg.FORMAT!r}, as the model sees it (scored "
              f"tokens between \u27e6 and \u27e7):")
        for name, (ids, mask) in zip(("chosen", "rejected"), preference.render_pair(tokenizer, [pair], rendering)):
            print(f"\n{name}:\n{marked(tokenizer, ids, mask)}\n\n{len(ids)} tokens, {sum(mask)} scored"
                  f"{'; longer than BLOCK_SIZE, so its prompt is cut' if len(ids) - 1 > cfg.BLOCK_SIZE else ''}")
        return
    first = with_system(next(iter_dialogues(cfg.TRAIN_FILE)), cfg.SYSTEM_PROMPT)
    turns = render_any(tokenizer, [first], cfg.TRAIN_SPEAKERS, roles_of, cfg.TRAIN_FILE)[0]
    start = context_token(tokenizer, roles_of)  # a chat template's own first token is the context: nothing before it
    ids = [start] * (start is not None) + [t for tid, _ in turns for t in tid]
    mask = [0] * (start is not None) + [m for _, tm in turns for m in tm]  # is ids[j] a target (the context never)
    print(f"the first training example of {cfg.TRAIN_FILE}, FORMAT={cfg.FORMAT!r}, as the model sees it "
          f"(trained tokens between \u27e6 and \u27e7):\n")
    print(marked(tokenizer, ids, mask))
    cut = f"; longer than BLOCK_SIZE={cfg.BLOCK_SIZE}, so trained in windows" if len(ids) - 1 > cfg.BLOCK_SIZE else ""
    print(f"\n{len(ids)} tokens, {sum(mask)} trained ({sum(mask) / len(ids):.0%}){cut}")


def marked(tokenizer, ids, mask):
    """Rendered tokens as text, the trained ones between \u27e6 and \u27e7."""
    runs, j = [], 0
    while j < len(ids):  # decode runs of equal mask: a character can span tokens
        k = next((k for k in range(j, len(ids)) if mask[k] != mask[j]), len(ids))
        text = tokenizer.decode(ids[j:k], skip_special_tokens=False)
        runs.append(f"\u27e6{text}\u27e7" if mask[j] else text)
        j = k
    return "".join(runs)


def training_texts(cfg):
    """TRAIN_FILE's dialogues as text (a scratch model's tokenizer learns from them): with a preference OBJECTIVE,
    each pair's prompt with either reply."""
    if cfg.OBJECTIVE == "sft":
        return (format_dialogue(d) for d in iter_dialogues(cfg.TRAIN_FILE))
    return (format_dialogue(prompt + reply) for prompt, *replies in iter_pairs(cfg.TRAIN_FILE) for reply in replies)


def open_model(cfg, resume_from, layout):
    """The tokenizer and model the run trains: from the checkpoint it resumes (a LoRA checkpoint holds the adapter
    alone, applied to MODEL; an FSDP checkpoint holds the trained weights in shards, which restore() loads into
    MODEL), else MODEL, else a scratch model; with the adapters and gradient checkpointing of modeling.adapt. A rank
    that the layout sends its weights to (FSDP's, but rank 0) loads the model's shape alone."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import modeling
    load = modeling.load if layout.reads_weights else modeling.load_shape
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
        texts = training_texts(cfg)
        if layout.size > 1:  # one tokenizer for all ranks: rank 0 trains it, the others load it
            shared = os.path.join(cfg.OUT_DIR, ".tmp-scratch-tokenizer")
            if layout.master:
                modeling.scratch_tokenizer(cfg, texts).save_pretrained(shared)
            layout.world.barrier()
            tokenizer, model = modeling.build_scratch(cfg, texts, AutoTokenizer.from_pretrained(shared))
        else:
            tokenizer, model = modeling.build_scratch(cfg, texts)
    else:
        tokenizer, model = load(cfg.MODEL)
    return tokenizer, modeling.adapt(model, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# the run's state and data

@dataclass
class RunState:
    """Where a run stands; every checkpoint holds it. Optimizer steps taken; the position in the data (the epoch, and
    the blocks of it consumed); the best validation loss so far; this epoch's figures; the training losses since the
    last line of metrics.jsonl, each (loss, trained tokens, seconds); the validations in a row without a new best
    (EARLY_STOP_EVALS)."""
    step: int = 0
    epoch: int = 0
    offset: int = 0
    best_val: float = math.inf
    best_step: int = None
    tokens: int = 0  # this epoch's trained tokens,
    real: int = 0  # its real input positions,
    positions: int = 0  # and all the positions processed, padding included
    recent: list = field(default_factory=list)
    stale: int = 0
    trained: int = 0  # tokens trained and seconds spent on steps since this process started: its summary line
    train_time: float = 0.0

    @classmethod
    def restore(cls, state):
        tokens, real, positions = state["epoch_stats"]
        return cls(state["step"], state["epoch"], state["offset"], state["best_val"], state["best_step"], tokens,
                   real, positions, state.get("recent", []), state.get("stale", 0))

    def saved(self):
        """As a checkpoint's state.pt holds it."""
        return {"step": self.step, "epoch": self.epoch, "offset": self.offset, "best_val": self.best_val,
                "best_step": self.best_step, "epoch_stats": [self.tokens, self.real, self.positions],
                "recent": self.recent, "stale": self.stale}

    def advance(self, consumed, real, positions, loss, n_targets, seconds, figures=None):
        """One step taken on `consumed` blocks (or pairs) holding `real` input positions: the position in the data
        moves on, and the figures add up. `n_targets`: trained tokens (or pairs); `figures`: a preference
        objective's (step.forward_backward_pairs)."""
        self.step, self.offset = self.step + 1, self.offset + consumed
        self.tokens, self.real, self.positions = self.tokens + n_targets, self.real + real, self.positions + positions
        self.recent.append((loss, n_targets, seconds) + ((figures,) if figures else ()))
        self.trained, self.train_time = self.trained + n_targets, self.train_time + seconds

    def epoch_line(self, train_tokens, ended=True, unit="tokens"):
        return (f"epoch {self.epoch + 1}{'' if ended else ' (the run ends inside it)'}: {self.tokens:,} {unit} trained "
                f"({self.tokens / max(train_tokens, 1):.0%} of the train set), padding "
                f"{1 - self.real / max(self.positions, 1):.1%} of {self.positions:,} positions")


@dataclass
class Data:
    train_tokens: object  # batching.Tokens, memory-mapped from the token cache
    train: object  # batching.Blocks: what an epoch trains on
    val_tokens: object  # the validation dialogues that VAL_MAX_TOKENS keeps
    val: list  # their (x, y, seg) batches
    split: bool  # each piece a row of its own: the model's attention cannot keep packed pieces apart (masks.py)
    sha256: str  # TRAIN_FILE's: a resume must find the same file
    seconds: float  # what loading them took at start-up
    reference: dict = None  # a preference OBJECTIVE's: the reference's log-probabilities of "train" and "val" pairs
    reference_key: str = None  # ... and what they are kept under (preference.reference_key)


class Interrupt:
    """Ctrl-C (SIGINT), and SIGTERM, which clusters and spot machines send before they take a machine away: the first
    asks the run to stop once the current optimizer step is done, with a checkpoint; a second stops it at once."""

    def __init__(self, master=True):
        self.signal, self.master = None, master
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt  # the second: at once
        self.signal = signum
        if self.master:
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (again to stop at "
                  f"once)", file=sys.stderr, flush=True)

    def asked(self, world, device):
        """The signal that stops the run now, or None. Under torchrun each rank gets its own signal, maybe a step
        apart: all stop after the step in which any rank got one."""
        return world.max(self.signal or 0, device) or None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def interrupted(run, s, signum, layout):
    """The run stopped by a signal after step s.step, with its checkpoint written: the line that says so and how to
    go on, and the exit code of a process ended by that signal (130 for Ctrl-C, 143 for SIGTERM)."""
    args = [a for a in sys.argv[1:] if not a.lower().startswith("--resume=")] + ["--resume=True"]
    command = shlex.join([os.path.basename(sys.argv[0]), *args])
    how = (f"python {command}" if layout.size == 1 else
           f"the same torchrun command with --resume=True (... {command})")
    if layout.master:
        print(f"interrupted ({signal.Signals(signum).name}) after step {s.step}: checkpoint "
              f"{os.path.join(run.cfg.OUT_DIR, 'checkpoints', f'step-{s.step:08d}')}. Resume with: {how}",
              file=sys.stderr, flush=True)
    return SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------------------------------
# setting up: processes, model, data, optimizer

def setup(cfg, given):
    """The processes, the run in OUT_DIR, the device and the layout of the processes. Returns (the run, the
    layout)."""
    import hardware
    import processes
    world = processes.start(cfg.DEVICE)
    say = print if world.master else silent
    run = checkpoints.open_run(cfg, given, world, say)
    check_config(run.cfg)
    trackers.check(run.cfg.REPORT_TO)
    device, dtype, device_note = hardware.pick(run.cfg.DEVICE, run.cfg.PRECISION, world.local_size,
                                               run.cfg.CPU_THREADS, world.device)
    layout = processes.layout(world, run.cfg.FSDP, device, dtype)
    say(device_note + layout.describe())
    return run, layout


def build(run, layout, say, given=()):
    """The model and tokenizer the run trains, held by the layout on its device, and the run's data: (tokenizer,
    Data). `given`: the settings named on the command line (a --user_name or --bot_name names the saved template's
    speakers)."""
    import loss
    import masks
    import modeling
    from generation import save_settings
    cfg = run.cfg
    train_sha = checkpoints.sha256(cfg.TRAIN_FILE)  # read in pieces: never the whole file in memory
    if run.state is not None and run.state["train_sha256"] != train_sha:
        raise UserError(f"{cfg.TRAIN_FILE} has changed since {run.resume_from} was written; resuming would not "
                        f"continue the same run (start a new one in another OUT_DIR)")
    checkpoints.check_writable(cfg.OUT_DIR)
    check_data(cfg)
    tokenizer, model = open_model(cfg, run.resume_from, layout)
    if run.state is not None:
        say(f"resuming from {run.resume_from} (step {run.state['step']})")
    rendering = Rendering.of(cfg)
    roles_of = prepare_tokenizer(tokenizer, rendering, cfg.MODEL, run_speakers(cfg, given))
    # what best/ and final/ tell other tools: where a reply ends, and how to sample it
    save_settings(model.get_base_model() if hasattr(model, "peft_config") else model, tokenizer, roles_of, cfg)
    if cfg.BLOCK_SIZE > modeling.context_size(model):
        raise UserError(f"BLOCK_SIZE={cfg.BLOCK_SIZE} is beyond the model's context of "
                        f"{modeling.context_size(model)} tokens")
    loss.use_chunk(cfg.LOSS_CHUNK)
    reference = None
    if cfg.OBJECTIVE == "dpo":  # what names the reference: the weights as they start (rank 0 has them under FSDP)
        import preference
        if run.state is not None and not run.state.get("reference_key"):
            raise UserError(f"{run.resume_from} records no reference log-probabilities, so it is not a DPO run's "
                            f"checkpoint; resume it with its own OBJECTIVE")
        reference = ("key", run.state["reference_key"]) if run.state is not None else (
            "weights", layout.world.gather(preference.weights_key(model) if layout.master else None)[0])
    if note := layout.wrap(model.train(), cfg):
        say(note)
    if note := layout.preflight(cfg):  # a step that cannot fit stops here
        say(note)
    say(masks.describe(model))
    if layout.master:
        n_params, n_trained = modeling.parameters(model)
        checkpoints.check_space(cfg.OUT_DIR, n_trained, n_params, cfg.KEEP_CHECKPOINTS)
    return tokenizer, load_data(cfg, tokenizer, rendering, train_sha, layout, say, reference)


def optimization(layout, cfg):
    """AdamW over the model's trained parameters (decay on matrices and embeddings only; under FSDP, of the shards)
    and fp16's loss scaler (bf16 needs none)."""
    import torch

    import step
    optimizer = step.make_optimizer(layout.model, cfg.LEARNING_RATE, cfg.WEIGHT_DECAY, cfg.BETAS)
    return optimizer, torch.amp.GradScaler("cuda") if layout.dtype == torch.float16 else None


def check_data(cfg):
    """Before the model and the cache: a typo must not cost a tokenizing pass."""
    for path in (cfg.TRAIN_FILE, cfg.VAL_FILE):
        if next(iter_dialogues(path) if cfg.OBJECTIVE == "sft" else iter_pairs(path), None) is None:
            raise UserError(f"{path} holds no dialogues: run prepare_data.py first")
    if cfg.TRAIN_SPEAKERS is not None:
        unknown = set(cfg.TRAIN_SPEAKERS)
        for d in iter_dialogues(cfg.TRAIN_FILE):  # read only until each has been seen once
            unknown -= {s for s, _ in d}
            if not unknown:
                break
        if unknown:
            raise UserError(f"TRAIN_SPEAKERS {sorted(unknown)} never speak in {cfg.TRAIN_FILE}")


def load_data(cfg, tokenizer, rendering, train_sha, layout, say, reference=None):
    """The token cache: tokenized once (rank 0 builds it, the others wait), memory-mapped by every later start; the
    validation batches, with each packed piece kept apart as the model allows (masks.py)."""
    t0 = time.time()

    import cache
    import masks
    from batching import count, eval_batches, pack_tokens

    def cached(build):
        train_tok = cache.tokens(cfg.TRAIN_FILE, train_sha, tokenizer, rendering, cfg.CACHE_DIR, say, build)
        val_tok = cache.tokens(cfg.VAL_FILE, checkpoints.sha256(cfg.VAL_FILE), tokenizer, rendering, cfg.CACHE_DIR,
                               say, build)
        return train_tok, val_tok, cache.blocks(train_tok, cfg.BLOCK_SIZE, say, build)

    if cfg.OBJECTIVE != "sft":
        return load_pairs(cfg, tokenizer, rendering, train_sha, layout, say, reference, t0)
    if layout.master:
        train_tok, val_tok, train_blocks = cached(build=True)
    layout.world.barrier()  # the other ranks map what rank 0 built or checked
    if not layout.master:
        train_tok, val_tok, train_blocks = cached(build=False)
    val_tok = val_tok.head(cfg.VAL_MAX_TOKENS)
    val_blocks = pack_tokens(val_tok, cfg.BLOCK_SIZE)
    if count(val_blocks)[0] == 0:
        raise UserError(f"{cfg.VAL_FILE} has no turns by TRAIN_SPEAKERS {cfg.TRAIN_SPEAKERS}, so nothing to validate")
    split = masks.form(layout.model) is None
    # any pad id will do: padded positions are never targets and never attended to
    val = eval_batches(val_blocks, cfg.BATCH_SIZE, tokenizer.eos_token_id, cfg.BLOCK_SIZE, split)
    return Data(train_tok, train_blocks, val_tok, val, split, train_sha, time.time() - t0)


def load_pairs(cfg, tokenizer, rendering, train_sha, layout, say, reference, t0):
    """A preference OBJECTIVE's data: the pairs of TRAIN_FILE and VAL_FILE rendered (VAL_MAX_TOKENS caps the
    validation pairs as it caps dialogues), and for DPO the reference's log-probabilities of every pair. `reference`:
    ("weights", a digest of the starting weights) for a new run, which computes them (or finds them in CACHE_DIR);
    ("key", the key its checkpoint recorded) for a resumed run, which only reads them."""
    import numpy as np

    import masks
    import preference
    train = preference.load_pairs(cfg.TRAIN_FILE, tokenizer, rendering, cfg.BLOCK_SIZE)
    val = preference.load_pairs(cfg.VAL_FILE, tokenizer, rendering, cfg.BLOCK_SIZE)
    if cfg.VAL_MAX_TOKENS:
        ends = np.cumsum([len(val.sequences[2 * i][0]) + len(val.sequences[2 * i + 1][0]) for i in range(len(val))])
        val.sequences = val.sequences[:2 * max(int(np.searchsorted(ends, cfg.VAL_MAX_TOKENS, side="right")), 1)]
    split = masks.form(layout.model) is None
    pad = tokenizer.eos_token_id
    val_batches = preference.pair_batches(val, cfg.BATCH_SIZE, pad, cfg.BLOCK_SIZE, split)
    data = Data(train, train, val, val_batches, split, train_sha, 0.0)
    if preference.objective_of(cfg).needs_reference:
        kind, key = reference
        if kind == "weights":
            key = preference.reference_key(key, (cfg.TRAIN_FILE, cfg.VAL_FILE), tokenizer, rendering, cfg.BLOCK_SIZE,
                                           layout.dtype)
        sets = {"train": (preference.pair_batches(train, cfg.BATCH_SIZE, pad, cfg.BLOCK_SIZE, split), len(train)),
                "val": (val_batches, len(val))}
        data.reference = preference.reference(layout, sets, key, cfg.CACHE_DIR, say, build=kind == "weights")
        data.reference_key = key
    data.seconds = time.time() - t0
    return data


def restore(run, layout, optimizer, scaler):
    """The RunState to start from, with the optimizer, the loss scaler and each rank's random stream restored; from
    an FSDP checkpoint, the trained weights too. A checkpoint of any layout resumes under any other."""
    import torch
    cfg, state, rank = run.cfg, run.state, layout.rank
    torch.manual_seed(cfg.SEED + rank)  # dropout; each rank its own stream
    if state is None:
        return RunState()
    layout.load_checkpoint(run.resume_from, state, optimizer)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == layout.size:  # same number of ranks: each continues its own random stream exactly
        torch.set_rng_state(state["rng"][rank]["torch"])
        if layout.device.type == "cuda" and state["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], layout.device)
    else:  # streams that cannot be split or merged: new ones, not a repeat of the run's first steps'
        torch.manual_seed(cfg.SEED + rank + 1_000_003 * state["step"])
    return RunState.restore(state)


def total_steps(cfg, s, steps, n_blocks):
    """The step the run ends at: MAX_STEPS, or the end of its last epoch (counted from where it stands)."""
    if cfg.MAX_STEPS > 0:
        return cfg.MAX_STEPS
    return s.step + math.ceil((n_blocks - s.offset) / steps.per_step) + (cfg.EPOCHS - s.epoch - 1) * steps.per_epoch


def early_stop(cfg, s):
    """Whether EARLY_STOP_EVALS validations in a row have brought no new best: the run ends here."""
    return bool(cfg.EARLY_STOP_EVALS) and s.stale >= cfg.EARLY_STOP_EVALS


def stopped_early(cfg, s, end_step):
    return (f"stopped early at step {s.step} of {end_step}: {s.stale} validations in a row without a new best "
            f"(EARLY_STOP_EVALS={cfg.EARLY_STOP_EVALS}); the best, val loss {s.best_val:.4f} at step {s.best_step}, "
            f"is in {os.path.join(cfg.OUT_DIR, 'best')}")


def schedule_change(run, s, steps, n_blocks, end_step):
    """A resumed run whose end moves (a larger EPOCHS or MAX_STEPS) moves its learning-rate curve too: the line that
    says so, with the old and new end and the rate at the resumed step on each; None where the end is the same."""
    if run.state is None:
        return None
    was = type(run.cfg)(**{**vars(run.cfg), **{k: run.state["config"][k] for k in ("EPOCHS", "MAX_STEPS")}})
    old_end = total_steps(was, s, steps, n_blocks)
    if old_end == end_step:
        return None
    before, after = get_lr(s.step, was, old_end), get_lr(s.step, run.cfg, end_step)
    return (f"the schedule changes: the run ended at step {old_end} and now ends at step {end_step}, so the learning "
            f"rate at step {s.step} goes from {before:.3g} to {after:.3g} and decays over the new length")


def nothing_left(run, s, end_step, say):
    """A resumed run already at its end: say so and touch nothing (True); past its end: refused."""
    cfg = run.cfg
    if run.state is not None and early_stop(cfg, s) and os.path.isdir(os.path.join(cfg.OUT_DIR, "final")):
        say(f"the run in {cfg.OUT_DIR} stopped early at step {s.step} ({s.stale} validations without a new best, "
            f"EARLY_STOP_EVALS={cfg.EARLY_STOP_EVALS}); nothing to do. To train on, resume with a larger "
            f"--early_stop_evals, or 0")
        return True
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
    """A line of metrics.jsonl (rank 0), and the same figures to REPORT_TO's trackers."""
    try:
        with open(run.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full disk, say: a torn last line is skipped when the file is read back
        raise UserError(f"cannot write {run.metrics}: {e.strerror}") from None
    if run.trackers is not None:
        run.trackers.log(record)


def log_train(run, s, lr):
    """The training loss, lr and tokens/s since the last line."""
    if len(s.recent[0]) > 3:  # a preference objective's figures, means over the pairs since the last line
        n = max(sum(r[1] for r in s.recent), 1)
        means = {k: sum(r[3][k] * r[1] for r in s.recent) / n for k in s.recent[0][3] if k != "pairs"}
        log(run, step=s.step, epoch=s.epoch + 1, **means, lr=lr, pairs_per_s=tokens_per_s(s.recent))
    else:
        log(run, step=s.step, epoch=s.epoch + 1, loss=sum(r[0] for r in s.recent) / len(s.recent), lr=lr,
            tokens_per_s=tokens_per_s(s.recent))
    s.recent = []


def validate(run, s, layout, tokenizer, data):
    """The validation loss now, every rank scoring its share of the batches; logged, and best/ saved when it is the
    best so far. Returns (the loss, the line to print)."""
    import step
    from preference import objective_of
    objective, epoch = objective_of(run.cfg), s.epoch + 1 if s.step else 0
    if objective is not None:
        figures = step.evaluate_pairs(layout, data.val, len(data.val_tokens), objective,
                                      data.reference and data.reference["val"], desc="validation")
        val_loss = figures["loss"]
        if layout.master:
            log(run, step=s.step, epoch=epoch, **{f"val_{k}": v for k, v in figures.items()})
    else:
        val_loss = step.evaluate(layout, data.val, desc="validation")
        if layout.master:
            log(run, step=s.step, epoch=epoch, val_loss=val_loss, val_ppl=step.ppl(val_loss))
    best = val_loss < s.best_val and s.step > 0
    if best:
        s.best_val, s.best_step, s.stale = val_loss, s.step, 0
        layout.save_model(tokenizer, os.path.join(run.cfg.OUT_DIR, "best"))
    elif s.step > 0:
        s.stale += 1
    if objective is not None:
        return val_loss, (f"step {s.step}: val loss {val_loss:.4f}, reward accuracy {figures['reward_acc']:.1%}, "
                          f"margin {figures['margin']:.3f} (chosen {figures['chosen']:.3f}, rejected "
                          f"{figures['rejected']:.3f}){' best' * best}")
    return val_loss, f"step {s.step}: val loss {val_loss:.4f} (ppl {step.ppl(val_loss):.2f}){' best' * best}"


def save_checkpoint(run, s, layout, tokenizer, optimizer, scaler, extra):
    """The checkpoint of step s.step, with every rank's random state (a resume with as many ranks continues each
    exactly), written as the layout writes checkpoints."""
    import torch
    device = layout.device
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    state = {**s.saved(), **extra, "world_size": layout.size, "scaler": scaler.state_dict() if scaler else None,
             "rng": layout.world.gather(rng), "config": vars(run.cfg)}
    layout.save_checkpoint(run.cfg.OUT_DIR, tokenizer, optimizer, state, run.cfg.KEEP_CHECKPOINTS)


def stopped(run, s, problem):
    return UserError(f"step {s.step + 1}: {problem}; stopped before the update. The last good checkpoint is "
                     f"{checkpoints.last_good(run.cfg.OUT_DIR) or 'none'}; try a lower LEARNING_RATE")


# ---------------------------------------------------------------------------------------------------------------------

def main():
    """A run of train.py; the run's lock on OUT_DIR is let go however it ends (a process lets go of it as it exits,
    but a test runs one run after another in its own)."""
    try:
        train()
    finally:
        checkpoints.release()


def train():
    t_main = time.time()
    given = set()
    cfg = load_config(doc=__doc__, given=given)
    check_config(cfg)
    # the heavy imports (torch, transformers) wait until the settings are checked: --help and a mistyped setting
    # answer at once
    quiet_libraries()
    if cfg.SHOW_EXAMPLE:
        return show_example(cfg)
    import hardware
    from step import set_lr, train_step
    run, layout = setup(cfg, given)
    cfg, master = run.cfg, layout.master
    say = print if master else silent
    tokenizer, data = build(run, layout, say, given)
    optimizer, scaler = optimization(layout, cfg)
    s = restore(run, layout, optimizer, scaler)
    steps, pairs = data_order(cfg, data, tokenizer, layout)
    unit = "tokens" if pairs is None else "pairs"
    end_step = total_steps(cfg, s, steps, len(data.train))
    say(describe(cfg, layout.model, data, steps, end_step))
    if note := schedule_change(run, s, steps, len(data.train), end_step):
        say(note)
    say(f"start-up: {time.time() - t_main:.1f}s (data {data.seconds:.1f}s, the rest mostly imports and the model); "
        f"peak memory so far {hardware.peak_rss_mb():,.0f} MB")
    if nothing_left(run, s, end_step, say):
        return layout.close()
    extra = begin(run, layout, data, steps, s)  # every check passed: the run's files begin here

    # -----------------------------------------------------------------------------------------------------------------
    # the loop: lr, micro-batches (forward, backward), clip, step, log; then validate and checkpoint when due. Every
    # write by rank 0 ends with a barrier inside the layout's save: no rank runs ahead of a write
    start_step, t_start, first_val = s.step, time.time(), None
    if run.state is None:  # the starting point, for "val loss X -> Y" and the loss curve
        first_val, line = validate(run, s, layout, tokenizer, data)
        say(line)
    # closed on an error too: the error line comes after the bar's, and Ctrl-C is Python's again
    signum = None
    with Interrupt(master) as stop, progress(total=end_step, initial=s.step, desc="train", unit="step",
                                             disable=not master) as bar:
        while s.step < end_step and not signum and not early_stop(cfg, s):
            lr = set_lr(optimizer, get_lr(s.step, cfg, end_step))
            blocks, micro, positions = steps.at(s.epoch, s.offset)
            t0 = time.time()
            loss, n, problem = train_step(layout, optimizer, scaler, micro, cfg.GRAD_CLIP, pairs)
            if problem:
                raise stopped(run, s, problem)
            figures = n if pairs else None
            n = figures["pairs"] if pairs else n
            s.advance(len(blocks), steps.real(blocks), positions, loss, n, time.time() - t0, figures)
            rate = "tok_s" if pairs is None else "pairs_s"
            bar.set_postfix(**{"loss": f"{loss:.3f}", rate: f"{tokens_per_s(s.recent):,.0f}"})
            bar.update(1)
            if master and (due(s.step, cfg.LOG_INTERVAL) or s.step == end_step):
                log_train(run, s, lr)

            end_of_epoch = s.offset >= len(data.train)
            last = end_of_epoch or s.step == end_step
            if last or due(s.step, cfg.EVAL_INTERVAL):
                line = validate(run, s, layout, tokenizer, data)[1]
                if master:
                    bar.write(line)
            if end_of_epoch:
                if master:
                    bar.write(s.epoch_line(data.train_tokens.count_trained(), unit=unit))
                s.epoch, s.offset, s.tokens, s.real, s.positions = s.epoch + 1, 0, 0, 0, 0
            signum = stop.asked(layout.world, layout.device)
            if last or due(s.step, cfg.CHECKPOINT_INTERVAL) or signum or early_stop(cfg, s):
                save_checkpoint(run, s, layout, tokenizer, optimizer, scaler, extra)

    # -----------------------------------------------------------------------------------------------------------------
    if signum and s.step < end_step:  # said after the bar is closed
        raise interrupted(run, s, signum, layout)
    if s.offset > 0 and s.positions:  # a run that ends inside an epoch: its figures too
        say(s.epoch_line(data.train_tokens.count_trained(), ended=False, unit=unit))
    if early_stop(cfg, s) and s.step < end_step:
        say(stopped_early(cfg, s, end_step))
    finish(run, layout, tokenizer)
    say(summary(cfg, layout.model, s, start_step, time.time() - t_start, first_val))


def data_order(cfg, data, tokenizer, layout):
    """(the run's steps over its data, a step's preference objective with the reference's train log-probabilities, or
    None for supervised training): blocks of dialogues (batching.Steps) or pairs (preference.PairSteps)."""
    from batching import Steps
    from preference import PairSteps, objective_of
    objective = objective_of(cfg)
    steps = (Steps if objective is None else PairSteps)(data.train, cfg.BATCH_SIZE, cfg.GRAD_ACCUM_STEPS,
                                                        cfg.BLOCK_SIZE, cfg.SEED, tokenizer.eos_token_id,
                                                        layout.rank, layout.size, data.split)
    return steps, None if objective is None else (objective, data.reference and data.reference["train"])


def begin(run, layout, data, steps, s):
    """The run's files begin (rank 0: config.json, metrics.jsonl cut back to the checkpoint's step, the trackers);
    returns what each checkpoint records besides the run's state."""
    if layout.master:
        logged = checkpoints.begin(run, {"global_batch": steps.per_step, "torchrun_job": run.job, "run_id": run.id})
        run.trackers = trackers.Trackers(run.cfg, s.step, run.state is not None, logged, run.id)
    return {"train_sha256": data.sha256, "global_batch": steps.per_step, "run_id": run.id,
            "reference_key": data.reference_key}


def finish(run, layout, tokenizer):
    """The run's end: final/, the trackers closed, the scratch tokenizer's temp files gone, the processes' group."""
    layout.save_model(tokenizer, os.path.join(run.cfg.OUT_DIR, "final"))
    if layout.master:
        run.trackers.close()
        shutil.rmtree(os.path.join(run.cfg.OUT_DIR, ".tmp-scratch-tokenizer"), ignore_errors=True)
    layout.close()


def silent(*args, **kwargs):
    """`print` on the ranks but rank 0, which alone speaks."""


def describe(cfg, model, data, steps, end_step):
    """The start-up line: the model, what it trains, and the data."""
    import modeling
    from batching import IGNORE
    n_params, n_trained = modeling.parameters(model)
    lora = f"LoRA r={cfg.LORA_R} on {cfg.LORA_TARGETS or 'all linear layers'}, " if cfg.LORA_R else ""
    model_part = (f"model: {cfg.MODEL} ({n_params / 1e6:.1f}M parameters, {lora}{n_trained / 1e6:.2f}M trained"
                  f"{', gradient checkpointing' if cfg.GRADIENT_CHECKPOINTING else ''}); FORMAT={cfg.FORMAT}; ")
    if cfg.OBJECTIVE != "sft":
        train, val = data.train, data.val_tokens
        cut = f"; {train.cut + val.cut:,} sequences cut to BLOCK_SIZE={cfg.BLOCK_SIZE}" if train.cut + val.cut else ""
        return (f"{model_part}OBJECTIVE={cfg.OBJECTIVE} (BETA={cfg.BETA}); {len(train):,} train pairs, "
                f"{train.scored():,} reply tokens scored; {steps.per_epoch} steps/epoch of {steps.per_step} pairs, "
                f"{end_step} steps; validation on {len(val):,} pairs{cut}")
    notes = data.train_tokens.notes  # what a chat template's rendering changed (render.messages), where any
    changed = "".join([f"; {notes['merged']:,} turns merged into the message before them (same role)"] *
                      bool(notes.get("merged")) + [f"; {notes['context']:,} opening assistant turns kept as untrained "
                                                   f"context (the template wants the user first)"] *
                      bool(notes.get("context")))
    return (f"{model_part}"
            f"{len(data.train_tokens):,} train dialogues -> {data.train_tokens.count_trained():,} tokens in "
            f"{len(data.train)} blocks of <= {cfg.BLOCK_SIZE}; {steps.per_epoch} steps/epoch of {steps.per_step} "
            f"blocks, {end_step} steps; validation on {len(data.val_tokens):,} dialogues, "
            f"{sum(int((y != IGNORE).sum()) for _, y, _ in data.val):,} tokens{changed}")


def summary(cfg, model, s, start_step, seconds, first_val):
    """The last line: what was trained, how fast, and how validation went."""
    import modeling
    from step import ppl
    n_params, n_trained = modeling.parameters(model)
    trained, train_time = s.trained, s.train_time
    start_val = f"{first_val:.4f} -> " if first_val is not None else ""
    unit, rate = ("tokens", "tok/s") if cfg.OBJECTIVE == "sft" else ("pairs", "pairs/s")
    return (f"trained steps {start_step}->{s.step} in {seconds:.0f}s: {trained:,} {unit} at "
            f"{trained / max(train_time, 1e-9):,.0f} {rate}; val loss {start_val}best {s.best_val:.4f} "
            f"{f'(ppl {ppl(s.best_val):.2f}) ' * (cfg.OBJECTIVE == 'sft')}at step {s.best_step}; "
            f"{n_trained:,} of {n_params:,} parameters "
            f"trained; models in {cfg.OUT_DIR}/best and {cfg.OUT_DIR}/final"
            f"{' (merged; the LoRA adapter in adapter/ of each)' if cfg.LORA_R else ''}")


def tokens_per_s(recent):
    return sum(r[1] for r in recent) / max(sum(r[2] for r in recent), 1e-9)


def due(step, interval):
    return bool(interval) and step % interval == 0


if __name__ == "__main__":
    run(main)
