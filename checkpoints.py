"""Durable storage: every directory the pipeline writes (model directories, checkpoints, the token cache) is written
whole or not at all, with a manifest that later reads verify; and a training run's directory: its checkpoints (save,
find the latest intact one, load it, prune), and the rules for starting a run in OUT_DIR or resuming the one there.

    OUT_DIR/config.json                    the run's settings, written once when it starts
    OUT_DIR/checkpoints/step-NNNNNNNN/     the model (a LoRA run: the adapter alone), state.pt, manifest.json
    OUT_DIR/best/, OUT_DIR/final/          Hugging Face model directories, with manifest.json

A directory is written in a temp directory beside its place, gets a manifest of every file's size and sha256, and is
renamed into place: a kill at any moment leaves the old directory or the new one, and `recover_dirs` clears what a
kill left behind. Only the standard library is imported here at the top: the token cache uses the writer without
torch; what saves or loads a model imports torch when it is called.
"""

import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # Windows: no run lock
    fcntl = None

from cli import UserError, atomic_write, read_jsonl, read_run_config, run_settings, umask

MANIFEST = "manifest.json"
before_rename = None  # tests: called with a directory's temp path once its files are written, before it is put in place


# ---------------------------------------------------------------------------------------------------------------------
# writing a directory whole, with a manifest; checking it; mending what a kill left

@contextmanager
def atomic_dir(path, known=None):
    """A temp directory beside `path` to write into; when the block ends without an exception it gets its manifest
    and replaces `path`. On any failure (a full disk) the temp directory goes, and `path` is as it was. OSError and
    the writers' own errors pass through: the caller says what could not be written. `known`: a dict the block may
    fill with files' manifest entries hashed elsewhere (sharding.save: each rank hashes its own shard)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's directory is private (0700); what we write is not
        yield tmp
        write_manifest(tmp, known)
        if before_rename:
            before_rename(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(d, known=None):
    """manifest.json in directory d: every file's size and sha256, subdirectories' too, so damage is detected.
    `known`: entries already computed, by relative path."""
    files = sorted(os.path.relpath(os.path.join(p, f), d) for p, _, names in os.walk(d) for f in names)
    known = known or {}
    manifest = {f: known.get(f) or {"size": os.path.getsize(os.path.join(d, f)), "sha256": sha256(os.path.join(d, f))}
                for f in files}
    with open(os.path.join(d, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def sha256(path):
    """A file's sha256, read in pieces: never the whole file in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def check_manifest(path, required=False, share=None):
    """What is wrong with a directory we saved (a file missing, truncated or changed since), or None if nothing.
    A directory without a manifest (a model from elsewhere) passes unless `required`. `share` (rank, ranks): this
    rank reads and hashes only its share of the files, the others' it checks by size."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "no manifest.json" if required else None
    except (OSError, ValueError):
        return "manifest.json is unreadable"
    rank, ranks = share or (0, 1)
    for i, (name, want) in enumerate(sorted(manifest.items())):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != want["size"]:
            return f"{name} is {os.path.getsize(p):,} bytes, the manifest says {want['size']:,} (truncated?)"
        if i % ranks == rank and sha256(p) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted or replaced)"
    return None


def replace_dir(src, dst):
    """Put directory src at dst, replacing what is there: two renames, and `recover_dirs` mends a kill between."""
    old = os.path.join(os.path.dirname(dst), ".tmp-old-" + os.path.basename(dst))
    if os.path.exists(dst):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(path):
    """Delete a directory so it is never seen half-deleted: rename it to a temp name first."""
    tmp = os.path.join(os.path.dirname(path), ".tmp-del-" + os.path.basename(path))
    os.rename(path, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def recover_dirs(parent):
    """After a kill: put back a directory that replace_dir had moved aside but not yet replaced, and delete every
    other temp directory (unfinished saves, unfinished deletes)."""
    names = os.listdir(parent) if os.path.isdir(parent) else []
    for name in names:
        if name.startswith(".tmp-old-") and not os.path.exists(os.path.join(parent, name[len(".tmp-old-"):])):
            os.rename(os.path.join(parent, name), os.path.join(parent, name[len(".tmp-old-"):]))
        elif name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# model directories and checkpoints

def save_model(model, tokenizer, path, state=None, weights=None):
    """The model as a Hugging Face directory at `path` (save_pretrained, safetensors), written whole; with `state`
    (a checkpoint) also state.pt. A LoRA model's directory holds the merged model and the adapter in adapter/; a LoRA
    checkpoint holds the adapter alone, its base being MODEL, unchanged. `weights`: the model's state dict where the
    model cannot give it itself (FSDP's, gathered: sharding.full_weights). A failed write (a full disk, say) leaves
    what was at `path` as it was."""
    import torch
    from safetensors import SafetensorError
    try:
        with atomic_dir(path) as tmp:
            if hasattr(model, "peft_config") and state is None:
                model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model, weights))
                model.save_pretrained(os.path.join(tmp, "adapter"), state_dict=weights)
            else:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            if state is not None:
                torch.save(state, os.path.join(tmp, "state.pt"))
            for p, _, names in os.walk(tmp):  # safetensors writes its files private (0600); the rest is not
                for name in names:
                    os.chmod(os.path.join(p, name), 0o666 & ~umask())
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: safetensors and torch.save raise their own
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("\n")[0] + " (disk full?)"
        raise UserError(f"could not write {path}: {why}; what was there before is intact") from None


def merged_state_dict(model, weights=None):
    """A LoRA model's weights as a plain model of the base architecture: W + scale * B @ A for every adapted layer,
    computed into new tensors from `weights` (the peft model's state dict; None: its own). Merging in place (peft's
    merge_and_unload) would change the weights the run goes on training, and unmerging does not restore them bit for
    bit."""
    import torch
    from peft.tuners.lora import LoraLayer
    weights = model.state_dict() if weights is None else weights
    lora = {f"base_model.model.{name}.base_layer.weight": m for name, m in model.get_base_model().named_modules()
            if isinstance(m, LoraLayer)}
    merged = {}
    with torch.no_grad():
        for key, w in weights.items():
            if "lora_" in key:
                continue
            if key in lora:
                m = lora[key]
                name, stem = m.active_adapters[0], key.removesuffix("base_layer.weight")
                delta = weights[f"{stem}lora_B.{name}.weight"].float() @ weights[f"{stem}lora_A.{name}.weight"].float()
                w = w + ((delta.T if m.fan_in_fan_out else delta) * m.scaling[name]).to(w.dtype)
            merged[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] = w.detach()
    return merged


def find(out_dir):
    """A run's checkpoint directories, oldest first. Each is renamed into place when complete, so a half-written one
    never has a step-* name; its manifest catches later damage."""
    d = os.path.join(out_dir, "checkpoints")
    names = sorted(n for n in os.listdir(d) if n.startswith("step-")) if os.path.isdir(d) else []
    return [os.path.join(d, n) for n in names if os.path.isfile(os.path.join(d, n, "state.pt"))]


def last_good(out_dir):
    """The newest checkpoint whose files match its manifest, or None."""
    return next((c for c in reversed(find(out_dir)) if not check_manifest(c)), None)


def load_latest(checkpoints, say, world=None):
    """The newest checkpoint whose files match its manifest and whose state loads without running code, and its
    state; damaged ones are reported and passed over. (None, None) where there is none. Under torchrun (`world`, a
    processes.World whose ranks all have the same `checkpoints`) each rank hashes its share of a checkpoint's files,
    and all take the verdict of all: a sharded checkpoint is read once, not once a rank."""
    import torch
    ranks = world.size if world is not None else 1
    for path in reversed(checkpoints):
        share = (world.rank, ranks) if ranks > 1 else None
        problem, state = check_manifest(path, required=True, share=share), None
        if problem is None:
            try:  # weights_only: tensors and plain data only; a pickle that would run code is refused
                state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
            except Exception as e:
                problem = f"state.pt cannot be loaded safely ({type(e).__name__})"
        if ranks > 1:
            problem = next((p for p in world.gather(problem) if p), None)
        if problem is None:
            return path, state
        say(f"skipping damaged checkpoint {path}: {problem}")
    return None, None


def save(out_dir, model, tokenizer, state, keep):
    """The checkpoint of step state['step'], then the oldest of this run's pruned down to `keep`."""
    path = os.path.join(out_dir, "checkpoints", f"step-{state['step']:08d}")
    save_model(model, tokenizer, path, state)
    prune(out_dir, path, keep)


def prune(out_dir, path, keep):
    """The run's checkpoints up to `path`, the newest, down to `keep`. This run's own only: newer, damaged ones that
    the resume passed over must not crowd out the new ones (each is replaced when the run gets there)."""
    for old in [c for c in find(out_dir) if c <= path][:-keep]:
        remove_dir(old)


# ---------------------------------------------------------------------------------------------------------------------
# a run in OUT_DIR: a new one, or the one there resumed with its own settings

# Settings of the run that a resume may change (cli.run_settings): how long the run goes on, what it logs and keeps,
# and where it runs. None of them changes the arithmetic of a step. Every other setting of the run is its own: a
# resume takes it from the checkpoint, so a setting added to config.py is protected without being listed anywhere.
# (The scripts' own settings, cli.OWN_SETTINGS, are never a run's.)
MAY_CHANGE_ON_RESUME = ["EPOCHS", "MAX_STEPS", "EVAL_INTERVAL", "CHECKPOINT_INTERVAL", "KEEP_CHECKPOINTS",
                        "LOG_INTERVAL", "REPORT_TO", "DEVICE", "CACHE_DIR", "EARLY_STOP_EVALS",
                        "GRADIENT_CHECKPOINTING",  # recomputing activations gives the same loss and gradients
                        "FSDP",  # as does sharding them (the checkpoints of either kind resume under the other)
                        "LOSS_CHUNK",  # as does the loss taken in other chunks (to rounding)
                        "BATCH_SIZE", "GRAD_ACCUM_STEPS"]  # how the global batch is split; it is kept (split_batch)


class Run:
    """Where a run starts: its settings (`cfg`: a resumed run's own), the checkpoint it resumes (`resume_from`, with
    its `state`; None for a new run) and torchrun's job id (`job`), recorded so that a restart continues the run."""

    def __init__(self, cfg, state=None, resume_from=None, job="none"):
        self.cfg, self.state, self.resume_from, self.job = cfg, state, resume_from, job
        self.config_json = os.path.join(cfg.OUT_DIR, "config.json")
        self.metrics = os.path.join(cfg.OUT_DIR, "metrics.jsonl")
        self.trackers = None  # rank 0's trackers.Trackers: REPORT_TO's
        self.id = None  # the run's own id, for a tracker that continues the run on resume


def open_run(cfg, given, world, say):
    """The run in OUT_DIR that train.py starts or continues: a new one (refused where OUT_DIR holds a run that was not
    asked to be resumed), or the latest intact checkpoint of the one there with the run's own settings. Under torchrun
    every rank of the `world` (processes.World) calls this and all agree; rank 0 alone mends what a killed run
    left."""
    if world.master:  # a model directory moved aside mid-swap, unfinished temp directories
        hold(cfg.OUT_DIR)  # first: a running run's temp directories are not a killed one's
        recover_dirs(cfg.OUT_DIR)
        recover_dirs(os.path.join(cfg.OUT_DIR, "checkpoints"))
    world.barrier()
    checkpoints, config_json = find(cfg.OUT_DIR), os.path.join(cfg.OUT_DIR, "config.json")
    job, automatic = torchrun_restart(cfg, config_json, world.size, say)
    if cfg.OVERWRITE and cfg.RESUME:
        raise UserError("--overwrite=True starts the run in OUT_DIR over, --resume=True continues it: give one")
    if world.size > 1:  # every rank must take up the run where rank 0 does; on machines that do not share OUT_DIR,
        seen = world.gather([os.path.basename(c) for c in checkpoints])  # not so
        if any(names != seen[0] for names in seen):
            steps = [int(names[-1][len("step-"):]) if names else None for names in seen]
            raise UserError(f"the ranks find different checkpoints in OUT_DIR {cfg.OUT_DIR!r} (steps {steps}): on "
                            f"more than one machine, OUT_DIR must be on a filesystem they share")
    resume_from, state = (None, None) if not (cfg.RESUME and checkpoints) else load_latest(checkpoints, say, world)
    if cfg.RESUME and checkpoints and state is None:
        if automatic:  # starting over is for a user to decide, not a restart
            raise UserError(f"torchrun restarted the run in {cfg.OUT_DIR}, and none of its {len(checkpoints)} "
                            f"checkpoints is intact; nothing was changed. To start the run again from step 0, run "
                            f"train.py with --resume=True")
        say(f"no intact checkpoint in {cfg.OUT_DIR}: starting the run again")
    elif cfg.RESUME and not checkpoints:
        if not os.path.isfile(config_json):
            raise UserError(f"--resume=True, but OUT_DIR {cfg.OUT_DIR!r} holds no run to resume (no checkpoint, no "
                            f"config.json); nothing was written. Start a new run without --resume=True, or point "
                            f"--out_dir at the run")
        say(f"no checkpoint in {cfg.OUT_DIR} to resume from: starting the run")  # killed before its first one
    elif cfg.OVERWRITE and os.path.isdir(cfg.OUT_DIR) and os.listdir(cfg.OUT_DIR):
        last = f" (its checkpoints up to step {int(os.path.basename(checkpoints[-1])[5:])})" if checkpoints else ""
        say(f"--overwrite=True: the run in {cfg.OUT_DIR}{last} is deleted, all of it, once every check has passed")
    elif not cfg.RESUME and (checkpoints or os.path.exists(os.path.join(cfg.OUT_DIR, "final"))):
        restarted = (" torchrun restarted the workers, but it continues a run only where the same job began it "
                     "(--standalone, or the same --rdzv-id)." if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                     != "0" else "")
        raise UserError(f"OUT_DIR {cfg.OUT_DIR!r} already holds a run:{restarted} continue it with --resume=True, "
                        f"start it over with --overwrite=True (deleting it), or choose another --out_dir (nothing "
                        f"there is overwritten)")
    if cfg.RESUME and (state is not None or os.path.isfile(config_json)):  # the run's settings, not config.py's
        cfg = resumed_settings(cfg, given, state, resume_from, config_json, world.size, say)
    run = Run(cfg, state, resume_from, job)
    # trackers continue a run under its id (trackers.py): the checkpoint's, else config.json's, else a new one's
    run.id = ((state or {}).get("run_id") or (cfg.RESUME and read_run_config(config_json).get("run_id"))
              or secrets.token_hex(6))
    return run


_held = {}  # the run locks this process holds: OUT_DIR's real path -> its open directory


def hold(out_dir):
    """Claim the run in OUT_DIR for this process, or a UserError where another process runs it: a lock on the
    directory itself (flock), so nothing is written for it, and the OS lets go of it when the process ends, however
    it ends (a kill leaves no stale lock). Where OUT_DIR is not there yet there is nothing to claim: begin() claims it
    once it has made it."""
    path = os.path.realpath(out_dir)
    if fcntl is None or path in _held or not os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"OUT_DIR {out_dir!r} is in use: another process is running the run there; wait for it to "
                        f"end, stop it (Ctrl-C), or choose another --out_dir") from None
    _held[path] = fd


def release():
    """Let go of this process's run locks (train.py's main, however it ends: a test runs one run after another in
    its own process)."""
    while _held:
        os.close(_held.popitem()[1])


def torchrun_restart(cfg, config_json, world, say):
    """torchrun --max-restarts=N restarts every rank after one fails (and when machines join or leave a
    --nnodes=MIN:MAX job). A run that this torchrun job began (config.json has its id) is continued, not refused:
    sets RESUME. Returns (the job id, whether it was such a restart)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # "none": torchrun was given no job id
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    automatic = not cfg.RESUME and job != "none" and read_run_config(config_json).get("torchrun_job") == job
    if automatic:
        cfg.RESUME, cfg.OVERWRITE = True, False  # OVERWRITE was for the job's first attempt
        say(f"torchrun restarted this run ({restarts} restart{'s' if restarts != 1 else ''}, {world} "
            f"process{'es' if world > 1 else ''}): continuing it from its latest intact checkpoint")
    return job, automatic


def resumed_settings(cfg, given, state, resume_from, config_json, world, say):
    """A resumed run's settings: its own (cli.run_settings; those that change a step's arithmetic may not be
    overridden), with its global batch split over `world` processes."""
    if state is not None:
        source, saved = resume_from, state["config"]
        # the run's global batch: recorded since it is kept across a change in processes, else as it was made
        global_batch = state.get("global_batch") or (
            saved["BATCH_SIZE"] * saved["GRAD_ACCUM_STEPS"] * state["world_size"])
    else:
        source, saved = config_json, read_run_config(config_json)
        global_batch = saved.get("global_batch")
    cfg, taken = resume_config(cfg, given, saved, source, say)
    if global_batch:  # BATCH_SIZE x GRAD_ACCUM_STEPS x processes stays what it was
        was = (saved["BATCH_SIZE"], saved["GRAD_ACCUM_STEPS"],
               global_batch // (saved["BATCH_SIZE"] * saved["GRAD_ACCUM_STEPS"]))
        cfg.BATCH_SIZE, cfg.GRAD_ACCUM_STEPS, note = split_batch(cfg, given, was, world)
        if (cfg.BATCH_SIZE, cfg.GRAD_ACCUM_STEPS, world) != was:
            say(f"the run's global batch of {global_batch} blocks a step ({batch_words(*was)}) is kept: "
                f"{batch_words(cfg.BATCH_SIZE, cfg.GRAD_ACCUM_STEPS, world)}{note}")
            taken = [k for k in taken if k not in ("BATCH_SIZE", "GRAD_ACCUM_STEPS")]
    if taken:
        say(f"the run's own settings, from {source}: " + " ".join(f"--{k.lower()}={getattr(cfg, k)!r}"
                                                                for k in taken))
    return cfg


def resume_config(cfg, given, saved, source, say):
    """The settings of a resumed run, by the rule of every script that works on a run (cli.run_settings), save that
    a command-line value other than the run's is refused for a setting not in MAY_CHANGE_ON_RESUME. Returns (the
    settings, the names taken from the run whose value differs from config.py's)."""
    return run_settings(cfg, given, saved, source, say, fixed=[k for k in vars(cfg) if k not in MAY_CHANGE_ON_RESUME])


def batch_words(batch, accum, processes):
    """How a global batch is made, in words: 'BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4 x 1 process'."""
    return f"BATCH_SIZE={batch} x GRAD_ACCUM_STEPS={accum} x {processes} process{'es' if processes > 1 else ''}"


def split_batch(cfg, given, was, world):
    """BATCH_SIZE and GRAD_ACCUM_STEPS that make the run's global batch (`was`: its BATCH_SIZE, GRAD_ACCUM_STEPS and
    processes) on `world` processes, and a note where BATCH_SIZE had to change. BATCH_SIZE, the memory a rank needs,
    is kept (or taken from the command line) and GRAD_ACCUM_STEPS makes up the rest, even where the command line
    gives it: an elastic job restarts with the command line it began with, on however many processes there are now.
    Where BATCH_SIZE does not divide a process's share, the largest that does and is no larger is taken: a smaller
    batch always fits in memory, so a machine that joins an elastic job never ends it. Only GRAD_ACCUM_STEPS given:
    BATCH_SIZE makes up the rest. Refused only where the global batch does not divide over the processes."""
    global_batch = math.prod(was)
    per_rank, left = divmod(global_batch, world)
    if left:
        counts = [str(n) for n in range(1, global_batch + 1) if global_batch % n == 0]
        run = f"the run's global batch of {global_batch} blocks a step ({batch_words(*was)})"
        raise UserError(f"{run} does not divide over {world} processes; resume it on "
                        f"{', '.join(counts[:-1])} or {counts[-1]} processes" if len(counts) > 1 else
                        f"{run} does not divide over {world} processes; resume it in one process")
    accum = cfg.GRAD_ACCUM_STEPS
    if "GRAD_ACCUM_STEPS" in given and "BATCH_SIZE" not in given and per_rank % accum == 0:
        return per_rank // accum, accum, ""
    batch = max(b for b in range(1, min(cfg.BATCH_SIZE, per_rank) + 1) if per_rank % b == 0)
    note = "" if batch == cfg.BATCH_SIZE else (
        f" (BATCH_SIZE={cfg.BATCH_SIZE} does not divide a process's {per_rank} blocks; {batch} is the largest that "
        f"does)")
    if "GRAD_ACCUM_STEPS" in given and "BATCH_SIZE" not in given:
        note = (f" (GRAD_ACCUM_STEPS={accum} does not divide a process's {per_rank} blocks, so BATCH_SIZE is kept"
                f"{note and ', as near ' + str(cfg.BATCH_SIZE) + ' as divides them'})")
    return batch, per_rank // batch, note


def check_writable(out_dir):
    """OUT_DIR, or the nearest folder above it that exists, must take writes: said before the token cache is built
    for a run that could not be written. Returns that folder."""
    existing = out_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise UserError(f"OUT_DIR {out_dir!r} cannot be made: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"OUT_DIR {out_dir!r} is not writable ({existing} does not take writes)")
    return existing


def check_space(out_dir, n_trained, n_params, keep):
    """A checkpoint is the trained weights and AdamW's two moments (12 bytes a parameter in fp32); KEEP_CHECKPOINTS of
    them, one being written, best/ and final/: better to say so now than to fill the disk an hour in."""
    need = n_trained * 12 * (keep + 1) + n_params * 8
    free = shutil.disk_usage(check_writable(out_dir)).free
    if free < need:
        raise UserError(f"OUT_DIR {out_dir!r} has {free / 1e9:.1f} GB free; this run's checkpoints and models "
                        f"need about {need / 1e9:.1f} GB (free space, or lower KEEP_CHECKPOINTS)")


def begin(run, extra):
    """Every check has passed: the run's files begin here (rank 0). A new run writes config.json (its settings, and in
    lower case `extra`: what a restart needs to know); a resumed one keeps its own. metrics.jsonl keeps what came
    before the resumed step; the run writes later lines again as it redoes them. With OVERWRITE, the run that was
    there goes first, all of it. Returns the last step that metrics.jsonl held before (None: none), which trackers
    that cannot take a step back need."""
    cfg = run.cfg
    try:
        os.makedirs(cfg.OUT_DIR, exist_ok=True)
    except OSError as e:
        raise UserError(f"OUT_DIR {cfg.OUT_DIR!r} cannot be made: {e.strerror}") from None
    hold(cfg.OUT_DIR)
    if cfg.OVERWRITE:
        for name in os.listdir(cfg.OUT_DIR):
            path = os.path.join(cfg.OUT_DIR, name)
            if os.path.isdir(path) and not os.path.islink(path):
                remove_dir(path)
            else:
                os.unlink(path)
    logged = max((m["step"] for m in read_jsonl(run.metrics)), default=None)
    if run.state is None:
        with atomic_write(run.config_json) as f:
            json.dump({**vars(cfg), **extra}, f, indent=2)
    step = run.state["step"] if run.state is not None else 0
    lines = [json.dumps(m) + "\n" for m in read_jsonl(run.metrics) if m["step"] <= step] if run.state else []
    with atomic_write(run.metrics) as f:
        f.writelines(lines)
    return logged
