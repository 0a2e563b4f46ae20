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
import shutil
import time

from cli import UserError, atomic_write, defaults, load_config, no_such, progress, read_jsonl, read_run_config, run
from dialogues import CHAT_TEMPLATE, format_dialogue, iter_dialogues

# Settings a resume may change: how long the run goes on, what it logs and keeps, where it runs, and the other
# scripts' own settings. None of them changes the arithmetic of a step. Every other setting is the run's own: a
# resume takes it from the checkpoint, so a setting added to config.py is protected without being listed anywhere.
MAY_CHANGE_ON_RESUME = ["EPOCHS", "MAX_STEPS", "EVAL_INTERVAL", "CHECKPOINT_INTERVAL", "KEEP_CHECKPOINTS",
                        "LOG_INTERVAL", "DEVICE", "OUT_DIR", "RESUME", "SHOW_EXAMPLE", "CACHE_DIR",
                        "GRADIENT_CHECKPOINTING",  # recomputing activations gives the same loss and gradients
                        "BATCH_SIZE", "GRAD_ACCUM_STEPS",  # how the global batch is split; it is kept (split_batch)
                        "DATA_FILE", "VAL_FRACTION",  # prepare_data.py's
                        "CHECKPOINT", "NUM_REPLIES", "TEMPERATURE", "TOP_K", "TOP_P", "REPETITION_PENALTY",
                        "MAX_NEW_TOKENS", "SAMPLE_PROMPT", "SAMPLE_MAX_NEW_TOKENS", "USER_NAME", "BOT_NAME"]


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
        (isinstance(cfg.LORA_R, int) and cfg.LORA_R >= 0, f"LORA_R must be >= 0 (0 = off), got {cfg.LORA_R!r}"),
        (cfg.LORA_ALPHA > 0, f"LORA_ALPHA must be > 0, got {cfg.LORA_ALPHA}"),
        (0 <= cfg.LORA_DROPOUT < 1, f"LORA_DROPOUT must be in [0, 1), got {cfg.LORA_DROPOUT}"),
        (cfg.LORA_TARGETS is None or (isinstance(cfg.LORA_TARGETS, (list, tuple)) and cfg.LORA_TARGETS
                                      and all(isinstance(t, str) for t in cfg.LORA_TARGETS)),
         f"LORA_TARGETS must be None or a list of module names like ['q_proj', 'v_proj'], got {cfg.LORA_TARGETS!r}"),
        (not (cfg.LORA_R and cfg.MODEL == "scratch"),
         "LORA_R > 0 adapts a pretrained MODEL; a scratch model has nothing to keep frozen (use LORA_R=0)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for name in ("TRAIN_FILE", "VAL_FILE"):
        path = getattr(cfg, name)
        if not os.path.isfile(path):
            raise UserError(f"{no_such(name, path)}: run prepare_data.py first")


def resume_config(cfg, given, saved, source):
    """The settings of a resumed run: the run's own (`saved`, from its checkpoint or config.json; config.py's for a
    setting newer than the run), but OUT_DIR and RESUME, and those of MAY_CHANGE_ON_RESUME set on the command line.
    Any other setting given there with a value other than the run's is refused, all of them named. Returns (the
    settings, the names of those taken from the run that differ from config.py or the command line)."""
    plain = lambda v: json.loads(json.dumps(v))  # config.json has lists where config.py has tuples
    current = vars(cfg)
    run_has = {**defaults(), **{k: v for k, v in saved.items() if k in current}}
    refused = [k for k in sorted(given) if k not in MAY_CHANGE_ON_RESUME and plain(run_has[k]) != plain(current[k])]
    if refused:
        flags = ", ".join(f"--{k.lower()}={current[k]!r} (the run has --{k.lower()}={run_has[k]!r})" for k in refused)
        raise UserError(f"{source} belongs to a run with other settings, and only EPOCHS, MAX_STEPS, the intervals, "
                        f"KEEP_CHECKPOINTS, DEVICE, GRADIENT_CHECKPOINTING and the split of the global batch "
                        f"(BATCH_SIZE, GRAD_ACCUM_STEPS) may change on resume: {flags}. Resume "
                        f"without them (the run's own settings are taken), or start a new run in another OUT_DIR")
    merged = dict(current)
    for k, v in run_has.items():
        if k not in given and k not in ("OUT_DIR", "RESUME"):
            merged[k] = tuple(v) if isinstance(current[k], tuple) and isinstance(v, list) else v
    taken = [k for k in merged if plain(merged[k]) != plain(current[k])]
    return type(cfg)(**merged), taken


def layout(batch, accum, processes):
    """How a global batch is made, in words: 'BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process'."""
    return f"BATCH_SIZE={batch} x GRAD_ACCUM_STEPS={accum} x {processes} process{'es' if processes > 1 else ''}"


def split_batch(cfg, given, was, world):
    """BATCH_SIZE and GRAD_ACCUM_STEPS that make the run's global batch (`was`: its BATCH_SIZE, GRAD_ACCUM_STEPS and
    processes) on `world` processes. BATCH_SIZE, the memory a rank needs, is kept (or taken from the command line)
    and GRAD_ACCUM_STEPS makes up the rest, even where the command line gives it: an elastic job restarts with the
    command line it began with, on however many processes are left. Only GRAD_ACCUM_STEPS given: BATCH_SIZE makes
    up the rest. Where no whole numbers do, one line says which settings or process counts would."""
    global_batch = math.prod(was)
    run = f"the run's global batch of {global_batch} blocks a step ({layout(*was)})"
    per_rank, left = divmod(global_batch, world)
    if left:
        counts = [str(n) for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise UserError(f"{run} does not divide over {world} processes; resume it on "
                        f"{', '.join(counts[:-1])} or {counts[-1]} processes" if len(counts) > 1 else
                        f"{run} does not divide over {world} processes; resume it in one process")
    if "GRAD_ACCUM_STEPS" in given and "BATCH_SIZE" not in given:
        accum = cfg.GRAD_ACCUM_STEPS
        batch, asked = per_rank // accum if per_rank % accum == 0 else 0, f"--grad_accum_steps={accum}"
    else:
        batch = cfg.BATCH_SIZE
        asked = f"--batch_size={batch}" if "BATCH_SIZE" in given else f"BATCH_SIZE={batch}"
    if batch and per_rank % batch == 0:
        return batch, per_rank // batch
    pairs = [f"--batch_size={b} --grad_accum_steps={per_rank // b}"
             for b in range(per_rank, 0, -1) if per_rank % b == 0][:4]
    raise UserError(f"{run} cannot be kept on {world} process{'es' if world > 1 else ''} with {asked}: each "
                    f"process takes {per_rank} blocks a step; use {' or '.join(pairs)}")


def find_checkpoints(out_dir):
    """Checkpoint directories, oldest first. Each is written to a temp directory and renamed into place when
    complete, so a half-written one never has a step-* name; its manifest catches later damage."""
    d = os.path.join(out_dir, "checkpoints")
    names = sorted(n for n in os.listdir(d) if n.startswith("step-")) if os.path.isdir(d) else []
    return [os.path.join(d, n) for n in names if os.path.isfile(os.path.join(d, n, "state.pt"))]


def load_latest_state(checkpoints, say):
    """The newest checkpoint whose files match its manifest and whose state loads without running code, and its
    state; damaged ones are reported and passed over."""
    import torch
    import modeling
    for path in reversed(checkpoints):
        problem = modeling.check_manifest(path, required=True)
        if problem is None:
            try:  # weights_only: tensors and plain data only; a pickle that would run code is refused
                return path, torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
            except Exception as e:
                problem = f"state.pt cannot be loaded safely ({type(e).__name__})"
        say(f"skipping damaged checkpoint {path}: {problem}")
    return None, None


def save_checkpoint(out_dir, model, tokenizer, state, keep):
    import modeling
    d = os.path.join(out_dir, "checkpoints")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"step-{state['step']:08d}")
    modeling.save(model, tokenizer, path, state)
    # prune this run's own only: newer, damaged ones that the resume passed over must not crowd out the new ones (each
    # is replaced when the run gets there)
    for old in [c for c in find_checkpoints(out_dir) if c <= path][:-keep]:
        modeling.remove_dir(old)


def epoch_line(epoch, stats, train_tokens, ended=True):
    tokens, real, processed = stats
    return (f"epoch {epoch + 1}{'' if ended else ' (the run ends inside it)'}: {tokens:,} tokens trained "
            f"({tokens / max(train_tokens, 1):.0%} of the train set), padding {1 - real / max(processed, 1):.1%} of "
            f"{processed:,} positions")


def prepare_tokenizer(tokenizer, cfg, name):
    """The tokenizer as the run uses and saves it: FORMAT="speaker" gives it our template (so apply_chat_template
    and pipeline() speak the training format); "chat_template" keeps the model's own, which it must have."""
    from batching import role_map
    if cfg.FORMAT == "chat_template" and not tokenizer.chat_template:
        raise UserError(f"MODEL {name!r} has no chat template of its own; FORMAT='chat_template' renders dialogues "
                        f"with it (use FORMAT='speaker', or an instruct model)")
    if cfg.FORMAT == "speaker":
        tokenizer.chat_template = CHAT_TEMPLATE
    return role_map(cfg.ROLES, cfg.TRAIN_SPEAKERS) if cfg.FORMAT == "chat_template" else None


def show_example(cfg):
    """--show_example=True: the first training dialogue as the model sees it, with what is trained marked."""
    import modeling
    from batching import render_any, start_id
    first = next(iter_dialogues(cfg.TRAIN_FILE), None)
    if first is None:
        raise UserError(f"{cfg.TRAIN_FILE} holds no dialogues: run prepare_data.py first")
    if cfg.MODEL == "scratch":
        tokenizer = modeling.scratch_tokenizer(cfg, (format_dialogue(d) for d in iter_dialogues(cfg.TRAIN_FILE)))
    else:
        tokenizer = modeling.load_tokenizer(cfg.MODEL)
    roles = prepare_tokenizer(tokenizer, cfg, cfg.MODEL)
    turns = render_any(tokenizer, [first], cfg.TRAIN_SPEAKERS, roles, cfg.TRAIN_FILE)[0]
    ids = [start_id(tokenizer)] + [t for tid, _ in turns for t in tid]
    mask = [0] + [m for _, tm in turns for m in tm]  # mask[j]: is ids[j] a target (the context token never is)
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
    alone, applied to MODEL), else MODEL, else a scratch model; with the adapters and gradient checkpointing of
    modeling.adapt."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import modeling
    if resume_from and os.path.exists(os.path.join(resume_from, "adapter_model.safetensors")):
        tokenizer = modeling.load_tokenizer(resume_from)
        adapter = load_file(os.path.join(resume_from, "adapter_model.safetensors"))
        return tokenizer, modeling.adapt(modeling.load(cfg.MODEL)[1], cfg, adapter)
    if resume_from:
        tokenizer, model = modeling.load(resume_from)
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
        tokenizer, model = modeling.load(cfg.MODEL)
    return tokenizer, modeling.adapt(model, cfg)


def main():
    t_main = time.time()
    given = set()
    cfg = load_config(doc=__doc__, given=given)
    check_config(cfg)
    if cfg.SHOW_EXAMPLE:
        return show_example(cfg)
    # the heavy imports wait until the settings are checked: --help and a mistyped setting answer at once
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import cache
    import modeling
    from batching import collate, count, epoch_order, eval_batches, pack_tokens, step_batches

    # -----------------------------------------------------------------------------------------------------------------
    # processes and device: `torchrun --nproc_per_node=N train.py` starts N ranks (DDP: nccl on CUDA, gloo on CPU);
    # a plain `python train.py` is one. Rank 0 alone prints, evaluates and writes files.
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        if torch.cuda.is_available() and cfg.DEVICE in ("auto", "cuda"):
            cfg_device, backend = f"cuda:{int(os.environ['LOCAL_RANK'])}", "nccl"
            torch.cuda.set_device(cfg_device)
        else:
            cfg_device, backend = "cpu", "gloo"
        init_processes(backend, rank, world)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)

    # -----------------------------------------------------------------------------------------------------------------
    # the run directory: a new run, or the latest complete checkpoint of an earlier one
    if master:  # mend what a killed run left: a model directory moved aside mid-swap, unfinished temp directories
        modeling.recover_dirs(cfg.OUT_DIR)
        modeling.recover_dirs(os.path.join(cfg.OUT_DIR, "checkpoints"))
    if world > 1:
        dist.barrier()
    checkpoints = find_checkpoints(cfg.OUT_DIR)
    config_json = os.path.join(cfg.OUT_DIR, "config.json")
    # torchrun --max-restarts=N restarts every rank after one fails (and when machines join or leave a
    # --nnodes=MIN:MAX job). A run that this torchrun job began (config.json has its id) is continued, not refused.
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # "none": torchrun was given no job id
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    automatic = not cfg.RESUME and job != "none" and read_run_config(config_json).get("torchrun_job") == job
    if automatic:
        cfg.RESUME = True
        say(f"torchrun restarted this run ({restarts} restart{'s' if restarts != 1 else ''}, {world} "
            f"process{'es' if world > 1 else ''}): continuing it from its latest intact checkpoint")
    state = None
    if cfg.RESUME and checkpoints:
        resume_from, state = load_latest_state(checkpoints, say)
        if state is None and automatic:  # starting over is for a user to decide, not a restart
            raise UserError(f"torchrun restarted the run in {cfg.OUT_DIR}, and none of its {len(checkpoints)} "
                            f"checkpoints is intact; nothing was changed. To start the run again from step 0, run "
                            f"train.py with --resume=True")
        if state is None:
            say(f"no intact checkpoint in {cfg.OUT_DIR}: starting the run again")
    elif cfg.RESUME:
        say(f"no checkpoint in {cfg.OUT_DIR} to resume from: starting the run")
    elif not cfg.RESUME and (checkpoints or os.path.exists(os.path.join(cfg.OUT_DIR, "final"))):
        restarted = (" torchrun restarted the workers, but it continues a run only where the same job began it "
                     "(--standalone, or the same --rdzv-id)." if restarts else "")
        raise UserError(f"OUT_DIR {cfg.OUT_DIR!r} already holds a run:{restarted} continue it with --resume=True, or "
                        f"choose another --out_dir (nothing there is overwritten)")
    if world > 1:  # every rank must take up the run where rank 0 does; on machines that do not share OUT_DIR, not so
        steps = [None] * world
        dist.all_gather_object(steps, state and state["step"])
        if len(set(steps)) > 1:
            raise UserError(f"the ranks find different checkpoints in OUT_DIR {cfg.OUT_DIR!r} (steps {steps}): on "
                            f"more than one machine, OUT_DIR must be on a filesystem they share")
    if cfg.RESUME and (state is not None or os.path.isfile(config_json)):  # the run's settings, not config.py's
        if state is not None:
            source, saved = resume_from, state["config"]
            # the run's global batch: recorded since it is kept across a change in processes, else as it was made
            global_batch = state.get("global_batch") or (
                saved["BATCH_SIZE"] * saved["GRAD_ACCUM_STEPS"] * state["world_size"])
        else:
            source, saved = config_json, read_run_config(config_json)
            global_batch = saved.get("global_batch")
        cfg, taken = resume_config(cfg, given, saved, source)
        if global_batch:  # BATCH_SIZE x GRAD_ACCUM_STEPS x processes stays what it was
            was = (saved["BATCH_SIZE"], saved["GRAD_ACCUM_STEPS"], global_batch // (
                saved["BATCH_SIZE"] * saved["GRAD_ACCUM_STEPS"]))
            cfg.BATCH_SIZE, cfg.GRAD_ACCUM_STEPS = split_batch(cfg, given, was, world)
            if (cfg.BATCH_SIZE, cfg.GRAD_ACCUM_STEPS, world) != was:
                say(f"the run's global batch of {global_batch} blocks a step ({layout(*was)}) is kept: "
                    f"{layout(cfg.BATCH_SIZE, cfg.GRAD_ACCUM_STEPS, world)}")
                taken = [k for k in taken if k not in ("BATCH_SIZE", "GRAD_ACCUM_STEPS")]
        check_config(cfg)
        if taken:
            say(f"the run's own settings, from {source}: " + " ".join(f"--{k.lower()}={getattr(cfg, k)!r}"
                                                                    for k in taken))
    device, dtype, device_note = modeling.pick_device(cfg_device if world > 1 else cfg.DEVICE, cfg.PRECISION)
    say(device_note + (f"; {world} processes ({backend})" if world > 1 else ""))
    train_sha = modeling.sha256(cfg.TRAIN_FILE)  # read in pieces: never the whole file in memory
    if state is not None:
        if state["train_sha256"] != train_sha:
            raise UserError(f"{cfg.TRAIN_FILE} has changed since {resume_from} was written; resuming would not "
                            f"continue the same run (start a new one in another OUT_DIR)")
    existing = cfg.OUT_DIR
    while not os.path.exists(existing):  # OUT_DIR, or the nearest folder above it that exists, must take writes
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):  # said now, before the token cache is built for a run that cannot be written
        raise UserError(f"OUT_DIR {cfg.OUT_DIR!r} cannot be made: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"OUT_DIR {cfg.OUT_DIR!r} is not writable ({existing} does not take writes)")

    # -----------------------------------------------------------------------------------------------------------------
    # model, tokenizer and data
    for path in (cfg.TRAIN_FILE, cfg.VAL_FILE):
        if next(iter_dialogues(path), None) is None:
            raise UserError(f"{path} holds no dialogues: run prepare_data.py first")
    if cfg.TRAIN_SPEAKERS is not None:  # before the model and the cache: a typo must not cost a tokenizing pass
        unknown = set(cfg.TRAIN_SPEAKERS)
        for d in iter_dialogues(cfg.TRAIN_FILE):  # read only until each has been seen once
            unknown -= {s for s, _ in d}
            if not unknown:
                break
        if unknown:
            raise UserError(f"TRAIN_SPEAKERS {sorted(unknown)} never speak in {cfg.TRAIN_FILE}")
    tokenizer, model = open_model(cfg, resume_from if state is not None else None, world, master)
    if state is not None:
        say(f"resuming from {resume_from} (step {state['step']})")
    roles = prepare_tokenizer(tokenizer, cfg, cfg.MODEL)
    if cfg.BLOCK_SIZE > modeling.context_size(model):
        raise UserError(f"BLOCK_SIZE={cfg.BLOCK_SIZE} is beyond the model's context of "
                        f"{modeling.context_size(model)} tokens")
    model.to(device).train()
    if memory_note := modeling.preflight(model, cfg, device, dtype):  # a step that cannot fit stops here, at once
        say(memory_note)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # a checkpoint is the trained weights and AdamW's two moments (12 bytes a parameter in fp32); KEEP_CHECKPOINTS of
    # them, one being written, best/ and final/: better to say so now than to fill the disk an hour in
    need = n_trained * 12 * (cfg.KEEP_CHECKPOINTS + 1) + n_params * 8
    free = shutil.disk_usage(existing).free
    if master and free < need:
        raise UserError(f"OUT_DIR {cfg.OUT_DIR!r} has {free / 1e9:.1f} GB free; this run's checkpoints and models "
                        f"need about {need / 1e9:.1f} GB (free space, or lower KEEP_CHECKPOINTS)")

    # the token cache: tokenized once (rank 0 builds it, the others wait), memory-mapped by every later start
    t_data = time.time()

    def cached(build):
        train_tok = cache.tokens(cfg.TRAIN_FILE, train_sha, tokenizer, cfg, roles, say, build)
        val_tok = cache.tokens(cfg.VAL_FILE, modeling.sha256(cfg.VAL_FILE), tokenizer, cfg, roles, say, build)
        return train_tok, val_tok, cache.blocks(train_tok, cfg.BLOCK_SIZE, say, build)

    if master:
        train_tok, val_tok, train_blocks = cached(build=True)
    if world > 1:  # the other ranks map what rank 0 built or checked
        dist.barrier()
        if not master:
            train_tok, val_tok, train_blocks = cached(build=False)
    val_tok = val_tok.head(cfg.VAL_MAX_TOKENS)
    val_blocks = pack_tokens(val_tok, cfg.BLOCK_SIZE)
    t_data = time.time() - t_data
    if count(val_blocks)[0] == 0:
        raise UserError(f"{cfg.VAL_FILE} has no turns by TRAIN_SPEAKERS {cfg.TRAIN_SPEAKERS}, so nothing to validate")
    pad = tokenizer.eos_token_id  # any id will do: padded positions are never targets and never attended to
    val_batches = eval_batches(val_blocks, cfg.BATCH_SIZE, pad, cfg.BLOCK_SIZE)
    train_tokens = count(train_blocks)[0]

    # -----------------------------------------------------------------------------------------------------------------
    # optimizer: AdamW, decay on matrices and embeddings only, never on biases and LayerNorm weights
    optimizer = modeling.make_optimizer(model, cfg.LEARNING_RATE, cfg.WEIGHT_DECAY, cfg.BETAS, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None  # fp16 needs loss scaling; bf16 not
    net = torch.compile(model) if cfg.COMPILE else model  # what the loop runs; `model` is what we evaluate and save
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    # where the run stands: optimizer steps taken, and the position in the data (epoch, blocks of it consumed)
    step, epoch, offset, best_val, best_step = 0, 0, 0, float("inf"), None
    epoch_stats = [0, 0, 0]  # this epoch's trained tokens, real positions, positions processed (real + padding)
    torch.manual_seed(cfg.SEED + rank)  # dropout; each rank its own stream
    metrics_path = os.path.join(cfg.OUT_DIR, "metrics.jsonl")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, offset = state["step"], state["epoch"], state["offset"]
        best_val, best_step, epoch_stats = state["best_val"], state["best_step"], state["epoch_stats"]
        if len(state["rng"]) == world:  # same number of ranks: each continues its own random stream exactly
            torch.set_rng_state(state["rng"][rank]["torch"])
            if device.type == "cuda" and state["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
        else:  # streams that cannot be split or merged: new ones, not a repeat of the run's first steps'
            torch.manual_seed(cfg.SEED + rank + 1_000_003 * step)
    blocks_per_step = cfg.BATCH_SIZE * cfg.GRAD_ACCUM_STEPS * world
    steps_per_epoch = math.ceil(len(train_blocks) / blocks_per_step)
    total_steps = cfg.MAX_STEPS if cfg.MAX_STEPS > 0 else (
        step + math.ceil((len(train_blocks) - offset) / blocks_per_step) + (cfg.EPOCHS - epoch - 1) * steps_per_epoch)
    lora = f"LoRA r={cfg.LORA_R} on {cfg.LORA_TARGETS or 'all linear layers'}, " if cfg.LORA_R else ""
    say(f"model: {cfg.MODEL} ({n_params / 1e6:.1f}M parameters, {lora}{n_trained / 1e6:.2f}M trained"
        f"{', gradient checkpointing' if cfg.GRADIENT_CHECKPOINTING else ''}); FORMAT={cfg.FORMAT}; "
        f"{len(train_tok):,} train dialogues -> "
        f"{train_tokens:,} tokens in {len(train_blocks)} blocks of <= {cfg.BLOCK_SIZE}; "
        f"{steps_per_epoch} steps/epoch of {blocks_per_step} blocks, {total_steps} steps; validation on "
        f"{len(val_tok):,} dialogues, {count(val_blocks)[0]:,} tokens")
    say(f"start-up: {time.time() - t_main:.1f}s (data {t_data:.1f}s, the rest mostly imports and the model); "
        f"peak memory so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    if state is not None and step >= total_steps:  # nothing left to train: say so, and touch nothing
        end = f"MAX_STEPS={cfg.MAX_STEPS}" if cfg.MAX_STEPS > 0 else f"EPOCHS={cfg.EPOCHS}"
        if step > total_steps:
            raise UserError(f"{resume_from} is at step {step}, past the end of this run at step {total_steps} ({end})"
                            f"; nothing was changed. To train on, resume with a larger --epochs or --max_steps")
        if os.path.isdir(os.path.join(cfg.OUT_DIR, "final")):
            say(f"the run in {cfg.OUT_DIR} is complete (step {step} of {total_steps}, {end}); nothing to do. To "
                f"train on, resume with a larger --epochs or --max_steps")
            if world > 1:
                dist.destroy_process_group()
            return

    if master:  # every check passed: the run's files begin here
        try:
            os.makedirs(cfg.OUT_DIR, exist_ok=True)
        except OSError as e:
            raise UserError(f"OUT_DIR {cfg.OUT_DIR!r} cannot be made: {e.strerror}") from None
        if state is None:  # a new run; a resumed one keeps its config.json (its checkpoints carry what changed)
            with atomic_write(config_json) as f:  # the settings, and (lower case) what a restart needs to know
                json.dump({**vars(cfg), "global_batch": blocks_per_step, "torchrun_job": job}, f, indent=2)
        # metrics.jsonl keeps what came before this step; the run writes later lines again as it redoes them
        lines = []
        if state is not None:
            lines = [json.dumps(m) + "\n" for m in read_jsonl(metrics_path) if m["step"] <= step]
        with atomic_write(metrics_path) as f:
            f.writelines(lines)

    def log(**record):
        try:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk, say: a torn last line is skipped when the file is read back
            raise UserError(f"cannot write {metrics_path}: {e.strerror}") from None

    # -----------------------------------------------------------------------------------------------------------------
    # the loop: lr, micro-batches (forward, backward), clip, step; then evaluate and checkpoint when due
    order, order_epoch = None, None
    start_step, t_start, first_val = step, time.time(), None
    tokens_trained, train_time = 0, 0.0
    if state is None and master:  # the starting point, for "val loss X -> Y" and the loss curve
        first_val = modeling.evaluate(model, val_batches, device, dtype, desc="validation")
        log(step=0, epoch=0, val_loss=first_val, val_ppl=modeling.ppl(first_val))
        say(f"step 0: val loss {first_val:.4f} (ppl {modeling.ppl(first_val):.2f})")
    recent = state.get("recent", []) if state else []  # (loss, trained tokens, seconds) since the last log line
    bar = progress(total=total_steps, initial=step, desc="train", unit="step", disable=not master)
    with bar:  # closed on an error too: else the error line would go on after the bar's
        while step < total_steps:
            if order_epoch != epoch:
                order, order_epoch = epoch_order(train_blocks, 16 * blocks_per_step, cfg.SEED + epoch), epoch
            chunk = [train_blocks[j] for j in order[offset:offset + blocks_per_step]]
            slots = step_batches(chunk, cfg.BATCH_SIZE, world)
            # a rank left without blocks at an epoch's end still runs forward/backward (DDP needs every rank's
            # gradients) on a block whose targets are all masked: it adds nothing
            dummy = (chunk[0][0], [0] * len(chunk[0][0]))
            micro = [collate(slot[rank] or [dummy], pad, cfg.BLOCK_SIZE) for slot in slots]

            t0 = time.time()
            lr = get_lr(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_value, n_targets = modeling.forward_backward(net, micro, device, dtype, scaler)
            problem = None if math.isfinite(loss_value) else f"the loss is {loss_value}"
            if not problem and not modeling.optimizer_step(model, optimizer, scaler, cfg.GRAD_CLIP):
                problem = "the gradients are not finite"
            if problem:
                checkpoints = find_checkpoints(cfg.OUT_DIR)
                good = next((c for c in reversed(checkpoints) if not modeling.check_manifest(c)), None)
                raise UserError(f"step {step + 1}: {problem}; stopped before the update. The last good checkpoint "
                                f"is {good or 'none'}; try a lower LEARNING_RATE")
            step += 1
            dt = time.time() - t0
            offset += len(chunk)
            end_of_epoch = offset >= len(train_blocks)

            tokens_trained, train_time = tokens_trained + n_targets, train_time + dt
            epoch_stats[0] += n_targets
            epoch_stats[1] += count(chunk)[1]
            epoch_stats[2] += sum(len(b) * (max(len(ids) for ids, _ in b) - 1) for slot in slots for b in slot if b)
            recent.append((loss_value, n_targets, dt))
            tok_s = sum(r[1] for r in recent) / max(sum(r[2] for r in recent), 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            if master and (cfg.LOG_INTERVAL and step % cfg.LOG_INTERVAL == 0 or step == total_steps):
                log(step=step, epoch=epoch + 1, loss=sum(r[0] for r in recent) / len(recent), lr=lr, tokens_per_s=tok_s)
                recent = []

            evaluate_now = end_of_epoch or step == total_steps or (cfg.EVAL_INTERVAL and step % cfg.EVAL_INTERVAL == 0)
            if evaluate_now and master:
                val_loss = modeling.evaluate(model, val_batches, device, dtype, desc="validation")
                log(step=step, epoch=epoch + 1, val_loss=val_loss, val_ppl=modeling.ppl(val_loss))
                if val_loss < best_val:
                    best_val, best_step = val_loss, step
                    modeling.save(model, tokenizer, os.path.join(cfg.OUT_DIR, "best"))
                bar.write(f"step {step}: val loss {val_loss:.4f} (ppl {modeling.ppl(val_loss):.2f})"
                          f"{' best' if best_step == step else ''}")
            if end_of_epoch:
                if master:
                    bar.write(epoch_line(epoch, epoch_stats, train_tokens))
                epoch, offset, epoch_stats = epoch + 1, 0, [0, 0, 0]
            checkpoint_now = end_of_epoch or step == total_steps or (
                cfg.CHECKPOINT_INTERVAL and step % cfg.CHECKPOINT_INTERVAL == 0)
            if checkpoint_now:
                rng = {"torch": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
                rngs = [rng]
                if world > 1:  # every rank's random state, so a resume with as many ranks continues each exactly
                    rngs = [None] * world
                    dist.all_gather_object(rngs, rng)
                if master:
                    save_checkpoint(cfg.OUT_DIR, model, tokenizer, {
                        "step": step, "epoch": epoch, "offset": offset, "best_val": best_val, "best_step": best_step,
                        "epoch_stats": epoch_stats, "train_sha256": train_sha, "world_size": world,
                        "global_batch": blocks_per_step,
                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                        "rng": rngs, "config": vars(cfg), "recent": recent}, cfg.KEEP_CHECKPOINTS)
            if world > 1 and (evaluate_now or checkpoint_now):
                dist.barrier()  # the other ranks wait while rank 0 evaluates and writes

    # -----------------------------------------------------------------------------------------------------------------
    if offset > 0 and epoch_stats[2]:  # a run that ends inside an epoch: its figures too
        say(epoch_line(epoch, epoch_stats, train_tokens, ended=False))
    if master:
        modeling.save(model, tokenizer, os.path.join(cfg.OUT_DIR, "final"))
        shutil.rmtree(os.path.join(cfg.OUT_DIR, ".tmp-scratch-tokenizer"), ignore_errors=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    elapsed = time.time() - t_start
    start_val = f"{first_val:.4f} -> " if first_val is not None else ""
    say(f"trained steps {start_step}->{step} in {elapsed:.0f}s: {tokens_trained:,} tokens at "
        f"{tokens_trained / max(train_time, 1e-9):,.0f} tok/s; val loss {start_val}best {best_val:.4f} "
        f"(ppl {modeling.ppl(best_val):.2f}) at step {best_step}; {n_trained:,} of {n_params:,} parameters "
        f"trained; models in {cfg.OUT_DIR}/best and {cfg.OUT_DIR}/final"
        f"{' (merged; the LoRA adapter in adapter/ of each)' if cfg.LORA_R else ''}")


if __name__ == "__main__":
    run(main)
