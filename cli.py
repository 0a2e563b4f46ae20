"""What every script does at its edges: read config.py with --name=value overrides, turn a user's mistake into one
line on stderr with exit code 2, and write files atomically so a failure never leaves a half-written one."""

import ast
import difflib
import io
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
import tokenize
import types
from contextlib import contextmanager, suppress

import config


class UserError(Exception):
    """A problem with the user's input or settings: reported as one line, exit code 2, no traceback."""


def run(main):
    """Call main(); a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        say_once(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python train.py --help | head`: the reader has gone, and so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as e:
        if not lost_peer(e):
            raise
        # a rank that died (killed, out of memory) takes its connections with it: its peers' collectives fail. Their
        # tracebacks say nothing about why; torchrun's own lines name the rank that failed, and restart or end the job
        say_once(f"error: rank {os.environ.get('RANK', '?')}: another process of this job stopped ("
                 f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); torchrun restarts or ends the job")
        sys.exit(1)


def lost_peer(e):
    """Whether an exception under torchrun is a collective that failed because another rank went away."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"DistBackendError", "DistNetworkError"}) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("closed by peer", "reset by peer", "Broken pipe", "remote worker crash")))


def say_once(line):
    """Print `line` on stderr, once per machine under torchrun. There every rank meets the same error, and the first
    to exit makes torchrun stop the others (SIGTERM): leaving it to rank 0 lost the line whenever another rank was
    quicker. So the first rank to get here prints it; it claims the job with a file that only one process can create,
    in torchrun's directory for this attempt. The others wait until the line is out, then exit."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # torchrun's .../attempt_N/<local rank>/error.json
    if not error_file:  # not under torchrun, or it keeps no files: a launcher's rank 0 speaks for all
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(line, file=sys.stderr, flush=True)
        return
    flag = os.path.join(os.path.dirname(os.path.dirname(error_file)), "error-reported")
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # another rank says it; it writes a byte once the line is out
        deadline = time.time() + 10
        while os.path.getsize(flag) == 0 and time.time() < deadline:
            time.sleep(0.01)
        return
    except OSError:
        fd = None
    print(line, file=sys.stderr, flush=True)
    if fd is not None:
        os.write(fd, b"1")
        os.close(fd)


# Names from other trainers (Hugging Face's Trainer, nanoGPT, Axolotl) and short forms people type, with the setting
# they mean, and where the name says the value too, that value (--bf16 is --precision=bf16): spelling alone misleads
# here (--lr is closest to --lora_r)
ALIASES = {"LR": "LEARNING_RATE", "BS": "BATCH_SIZE", "BATCH": "BATCH_SIZE", "EPOCH": "EPOCHS",
           "NUM_TRAIN_EPOCHS": "EPOCHS", "NUM_EPOCHS": "EPOCHS", "STEPS": "MAX_STEPS", "MAX_ITERS": "MAX_STEPS",
           "ITERS": "MAX_STEPS", "LORA": "LORA_R", "LORA_RANK": "LORA_R", "RANK": "LORA_R", "ACCUM": "GRAD_ACCUM_STEPS",
           "GRADIENT_ACCUMULATION_STEPS": "GRAD_ACCUM_STEPS", "PER_DEVICE_TRAIN_BATCH_SIZE": "BATCH_SIZE",
           "MICRO_BATCH_SIZE": "BATCH_SIZE", "WD": "WEIGHT_DECAY", "WARMUP": "WARMUP_STEPS", "CLIP": "GRAD_CLIP",
           "MAX_GRAD_NORM": "GRAD_CLIP", "CONTEXT": "BLOCK_SIZE", "CONTEXT_LENGTH": "BLOCK_SIZE",
           "SEQ_LEN": "BLOCK_SIZE", "SEQUENCE_LEN": "BLOCK_SIZE", "MAX_LENGTH": "BLOCK_SIZE",
           "MAX_SEQ_LENGTH": "BLOCK_SIZE", "MODEL_NAME": "MODEL", "MODEL_NAME_OR_PATH": "MODEL",
           "BASE_MODEL": "MODEL", "OUTPUT_DIR": "OUT_DIR", "DTYPE": "PRECISION", "BF16": "PRECISION=bf16",
           "FP16": "PRECISION=fp16", "FP32": "PRECISION=fp32", "TEMP": "TEMPERATURE", "EVAL_STEPS": "EVAL_INTERVAL",
           "SAVE_STEPS": "CHECKPOINT_INTERVAL", "SAVE_TOTAL_LIMIT": "KEEP_CHECKPOINTS",
           "LOGGING_STEPS": "LOG_INTERVAL", "GRADIENT_CHECKPOINTING_ENABLE": "GRADIENT_CHECKPOINTING",
           "LR_SCHEDULER_TYPE": "LR_SCHEDULE", "LEARNING_RATE_SCHEDULE": "LR_SCHEDULE",
           "RESUME_FROM_CHECKPOINT": "RESUME=True", "OVERWRITE_OUTPUT_DIR": "OVERWRITE=True",
           "EARLY_STOPPING_PATIENCE": "EARLY_STOP_EVALS", "PATIENCE": "EARLY_STOP_EVALS", "THREADS": "CPU_THREADS",
           "NUM_THREADS": "CPU_THREADS",
           "CONFIG": "an experiment file is given as it is, without a name (python train.py experiments/small_lr.py)"}


def closest(key, names):
    """Up to three of `names` closest to `key`: first those that hold it whole as their words' start or end
    (--compare_hf means --bench_compare_hf before --compare), then difflib's nearest spellings."""
    whole = [n for n in names if n.startswith(key + "_") or n.endswith("_" + key)]
    return list(dict.fromkeys(whole + difflib.get_close_matches(key, names, n=3, cutoff=0.5)))[:3]


def defaults():
    return {k: v for k, v in vars(config).items() if k.isupper()}


HELP = ("settings (override with --name=value or --name value; --flag and --no_flag for True and False. An "
        "experiment file on the command line, `python train.py experiments/small_lr.py`, sets them too: NAME = value "
        "lines read as literals, never run, or a run's own config.json to repeat that run; the command line overrides "
        "the file, and the file config.py. From config.py, which says why):")


def load_config(argv=None, doc=None, given=None):
    """config.py's names as a namespace, overridden by an experiment file (settings_file) and then by the command
    line's settings (sys.argv[1:] by default): --name=value, --name value, --flag, --no_flag. `given`, a set, receives
    the names set by the file or the command line: a resumed run and chat.py's seed need to tell them apart."""
    cfg = defaults()
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print((doc or "").strip() + "\n\n" + textwrap.fill(HELP, help_width()))
        print_settings(cfg)
        sys.exit(0)
    files, settings = read_args(argv, cfg)
    if len(files) > 1:
        raise UserError(f"more than one experiment file: {', '.join(map(repr, files))}; give one, and the rest as "
                        f"--name=value")
    for key, value in (settings_file(files[0], cfg) if files else []) + settings:
        cfg[key] = value
        if given is not None:
            given.add(key)
    return types.SimpleNamespace(**cfg)


def read_args(argv, cfg):
    """The command line read: (the experiment files, [(setting, value)]). --name=value and --name value (argparse's
    habit and the Hugging Face scripts'); a bare --name sets a True/False setting to True, --no_name to False; any
    other word is an experiment file."""
    files, settings, i = [], [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("--"):
            if arg.startswith("-") or "=" in arg and not os.path.exists(arg):  # -seed=1, seed=1
                name = arg.lstrip("-").split("=")[0]
                raise UserError(f"argument {arg!r}: expected --name=value or --name value, e.g. "
                                f"--{name}={arg.split('=', 1)[1] if '=' in arg else 'VALUE'} (see --help)")
            files.append(arg)
            continue
        name, eq, text = arg[2:].partition("=")
        key = name.upper().replace("-", "_")
        if key not in cfg and key.startswith("NO_") and type(cfg.get(key[3:])) is bool and not eq:
            settings.append((key[3:], False))
            continue
        if key not in cfg:
            raise UserError(unknown("--" + name, key, cfg))
        if not eq:
            follows = argv[i] if i < len(argv) else None
            if type(cfg[key]) is bool and (follows is None or follows.lower() not in ("true", "false")):
                settings.append((key, True))
                continue
            if follows is None or follows.startswith("--"):
                raise UserError(f"--{name} needs a value: --{name}=VALUE or --{name} VALUE, e.g. "
                                f"--{name}={cfg[key]!r}")
            text, i = follows, i + 1
        settings.append((key, _parse_value(key, text, cfg[key], f"--{name}={text}")))
    return files, settings


def unknown(name, key, cfg, flag=True):
    """The line for a setting there is none of (`name` as typed): the setting meant by a name from other tools, else
    the closest. `flag`: the names are shown as on the command line (--learning_rate), else as in a file."""
    show = (lambda k: "--" + k.lower()) if flag else (lambda k: k)
    if key in ALIASES and (ALIASES[key].partition("=")[0] not in cfg):  # a habit with no setting: what to do instead
        return f"unknown setting {name}: {ALIASES[key]}"
    if key in ALIASES:
        meant, _, value = ALIASES[key].partition("=")
        close = [show(meant) + (f"={value}" if flag else f" = {value!r}") * bool(value)]
    else:
        close = list(map(show, closest(key, cfg)))
    return f"unknown setting {name}" + (f"; did you mean {', '.join(close)}?" if close else " (see --help)")


def settings_file(path, cfg):
    """An experiment's settings: [(setting, value)] from a file of NAME = value lines (read as config.py's source
    is, by assignments(), each value a Python literal: nothing in it runs), or from a run's own config.json (its
    settings: the lower-case names are what the run recorded about itself; RESUME and OVERWRITE say what that
    command was asked to do, not what the run is). A name config.py does not have is refused, with its line."""
    if not os.path.isfile(path):
        raise UserError(no_such("experiment file", path))
    if path.endswith(".json"):
        saved = read_run_config(path)
        if not isinstance(saved, dict):
            raise UserError(f"{path}: expected a run's config.json, a JSON object of settings")
        pairs = [(k, v, None) for k, v in saved.items() if k.isupper() and k not in ("RESUME", "OVERWRITE")]
    else:
        try:
            with open(path, encoding="utf-8") as f:
                pairs = list(assignments(f.read(), path))
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path} cannot be read ({type(e).__name__})") from None
    out = []
    for key, value, node in pairs:
        where = f"{path}:{node.lineno}" if node else path
        if key not in cfg:
            raise UserError(f"{where}: {unknown(key, key, cfg, flag=False)}")
        if isinstance(cfg[key], tuple) and isinstance(value, list):  # JSON has lists where config.py has tuples
            value = tuple(value)
        out.append((key, _check_value(key, value, cfg[key], f"{where}: {key} = {value!r}")))
    return out


def assignments(source, path):
    """The NAME = value lines of a settings file (config.py, an experiment) as (name, value, ast node), each value a
    Python literal (ast.literal_eval): a file of settings is read, never run. Anything else is refused with its
    line."""
    try:
        tree = ast.parse(source, path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: not a NAME = value line ({e.msg})") from None
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path}:{node.lineno}: expected NAME = value, got "
                            f"{ast.get_source_segment(source, node)!r}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"{path}:{node.lineno}: {node.targets[0].id}'s value must be a literal (a number, a "
                            f"string, a list...): {ast.get_source_segment(source, node.value)!r}") from None
        yield node.targets[0].id, value, node


def bench_config(doc, smoke):
    """A benchmark's settings: config.py's and the command line's, and where BENCH_SMOKE, `smoke`'s values (a tiny
    model, a few steps) for those the command line does not give."""
    given = set()
    cfg = load_config(doc=doc, given=given)
    if cfg.BENCH_SMOKE:
        cfg = type(cfg)(**{**vars(cfg), **{k: v for k, v in smoke.items() if k not in given}})
    return cfg


# A script's own settings, never a run's: what prepare_data.py reads and writes, what evaluate.py and chat.py
# generate, what this command is asked to do, and the benchmarks' (BENCH_*). A script that works on a run
# (run_settings) takes these from config.py and its command line, and every other setting from the run.
OWN_SETTINGS = ("DATA_FILE", "DATA_SPLIT", "USE_CHOSEN", "VAL_FRACTION", "CHECKPOINT", "COMPARE", "NUM_REPLIES",
                "TEMPERATURE", "TOP_K", "TOP_P", "REPETITION_PENALTY", "MAX_NEW_TOKENS", "SAMPLE_PROMPT",
                "SAMPLE_MAX_NEW_TOKENS", "USER_NAME", "BOT_NAME", "SHOW_EXAMPLE", "OUT_DIR", "RESUME", "OVERWRITE",
                "CPU_THREADS", "GGUF_TYPES", "GGUF_DIR",
                *(k for k in vars(config) if k.startswith("BENCH_")))


def run_settings(cfg, given, saved, source, say, fixed=()):
    """The settings of a script that works on a run (train.py --resume=True, evaluate.py, chat.py), one rule for
    every setting: the run's value (`saved`: its config.json or checkpoint; config.py's for a setting newer than the
    run) unless the command line gives one; OWN_SETTINGS from config.py and the command line. A command-line value
    that differs from the run's is said in one line; where its name is in `fixed` (the settings a resume may not
    change) it is refused instead, all such named. `saved` empty (no run): cfg as it is. Returns (the settings, the
    names taken from the run whose value differs from config.py's)."""
    if not saved:
        return cfg, []
    plain = lambda v: json.loads(json.dumps(v))  # config.json has lists where config.py has tuples
    current, known = vars(cfg), defaults()
    run_has = {k: saved.get(k, known[k]) for k in current if k not in OWN_SETTINGS}
    overridden = [k for k in sorted(given) if k in run_has and plain(run_has[k]) != plain(current[k])]
    flag = lambda k: f"--{k.lower()}={current[k]!r} (the run has --{k.lower()}={run_has[k]!r})"
    if refused := [k for k in overridden if k in fixed]:
        raise UserError(f"{source} belongs to a run with other settings, and only EPOCHS, MAX_STEPS, the intervals, "
                        f"KEEP_CHECKPOINTS, DEVICE, GRADIENT_CHECKPOINTING, LOSS_CHUNK, FSDP and the split of the "
                        f"global batch (BATCH_SIZE, GRAD_ACCUM_STEPS) may change on resume: "
                        f"{', '.join(map(flag, refused))}. Resume without them (the run's own settings are taken), or "
                        f"start a new run in another OUT_DIR")
    if overridden:
        say(f"the command line overrides the run's settings ({source}): {', '.join(map(flag, overridden))}")
    merged = dict(current)
    for k, v in run_has.items():
        if k not in given:
            merged[k] = tuple(v) if isinstance(current[k], tuple) and isinstance(v, list) else v
    return type(cfg)(**merged), [k for k in merged if plain(merged[k]) != plain(current[k])]


def load_run_settings(doc, say=print):
    """load_config, then the settings of the run in OUT_DIR (run_settings), as evaluate.py and chat.py take them.
    Returns (the settings, the names given on the command line)."""
    given = set()
    cfg = load_config(doc=doc, given=given)
    return settings_of_run(cfg, given, say), given


def settings_of_run(cfg, given, say=print):
    """cfg (config.py with the command line's `given` settings) under the settings of the run in cfg.OUT_DIR
    (run_settings)."""
    path = os.path.join(cfg.OUT_DIR, "config.json")
    return run_settings(cfg, given, read_run_config(path), path, say)[0]


def quiet_libraries():
    """The libraries' own warnings off, so that an error stays one line: transformers' and peft's, the Hub client's
    ("... thrown while requesting HEAD ...", when offline) and DCP's (a traceback each); transformers' "writing
    shards" bars too, which would break our own progress bar. The Hub client's download bars stay: a first download
    takes minutes. Each script that loads a model calls this once its settings are checked."""
    import logging
    from huggingface_hub import utils as hub_utils
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()
    hub_utils.enable_progress_bars()
    logging.getLogger("torch.distributed.checkpoint").setLevel(logging.ERROR)


def print_settings(cfg):
    """Each setting as --name=value, with its comment from config.py wrapped to the terminal, under its group."""
    notes, groups = config_comments()
    width = help_width()
    for k, v in cfg.items():
        if k in groups:
            print(f"\n{groups[k]}")
        flag = f"  --{k.lower()}={v!r}"
        if len(flag) > width // 2:  # a long value (SAMPLE_PROMPT): the comment goes below it
            print(flag)
            flag = ""
        print(textwrap.fill(notes.get(k, ""), width, initial_indent=flag.ljust(8) + "  ", subsequent_indent=" " * 8)
              if notes.get(k) else flag)


def help_width():
    return max(60, shutil.get_terminal_size((120, 24)).columns - 1)


def config_comments():
    """config.py's comments, read from its source: ({setting: its comment}, {setting: the group heading above it}).
    A setting's comment is the one on its line and any comment-only lines right below it, which go on with it; a
    group heading is a comment-only line after a blank one."""
    with open(config.__file__, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    alone = lambda n: n in comments and lines[n - 1].lstrip().startswith("#")  # a line that is only a comment
    notes, groups = {}, {}
    for name, _, node in assignments(source, config.__file__):
        end = node.end_lineno
        parts = [comments[n] for n in range(node.lineno, end + 1) if n in comments]
        while alone(end + 1):
            end += 1
            parts.append(comments[end])
        notes[name] = " ".join(parts)
        above = node.lineno - 1
        if alone(above) and (above == 1 or not lines[above - 2].strip()):
            groups[name] = comments[above]
    return notes, groups


# types a setting takes besides its default's; its user checks the value
MORE_TYPES = {"DATA_FILE": (list,), "REPORT_TO": (list, tuple)}


def _parse_value(key, text, default, shown):
    """A command-line value: a Python literal, else the word itself (--model=gpt2 is a string); then _check_value."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text
    if type(default) is bool and text.lower() in ("true", "false"):  # --fsdp true, as other tools take it
        value = text.lower() == "true"
    return _check_value(key, value, default, shown)


def _check_value(key, value, default, shown):
    """`value` for setting `key` if it has the default's type (an int for a float is taken as the float); `shown`:
    where it came from, for the error."""
    if default is None or type(value) in MORE_TYPES.get(key, ()):
        return value  # a setting that is off by default (TRAIN_SPEAKERS) takes any value; its user checks it
    if type(default) is float and type(value) is int:
        return float(value)  # --learning_rate=1 means 1.0
    if type(value) is not type(default):
        raise UserError(f"{shown}: expected {_a(type(default).__name__)} like {default!r}, "
                        f"got {_a(type(value).__name__)}")
    return value


def _a(noun):
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def no_such(what, path):
    """The start of an error about a file or directory that is not there: the path as given and, since paths are
    relative to the current directory, where that is."""
    where = "" if os.path.isabs(path) else f" ({os.path.abspath(path)}: paths are relative to the current directory)"
    return f"{what} {path!r} does not exist{where}"


def which_model(cfg):
    """The model directory evaluate.py and chat.py load: CHECKPOINT, else OUT_DIR/best; a UserError where it is not
    there."""
    path = cfg.CHECKPOINT or os.path.join(cfg.OUT_DIR, "best")
    if cfg.CHECKPOINT and not os.path.isdir(path):
        raise UserError(no_such("CHECKPOINT", path))
    if not os.path.isdir(path):
        raise UserError(f"{no_such('model directory', path)}: run train.py first, or pass --checkpoint=DIR")
    return path


@contextmanager
def atomic_write(path, mode="w"):
    """Open a temp file next to `path`; it replaces `path` only if the block finishes without an exception."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        # mkstemp makes the file private (0600); the result should look like any file written here: the old file's
        # permissions, or the usual ones under the umask
        os.chmod(fd, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, say, or an error while writing: the old file stays as it was
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        raise


def umask():
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_run_config(path):
    """A run's config.json (train.py writes it once, atomically) as a dict; {} where there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}): it holds the run's settings; restore it, or "
                        f"start a new run in another OUT_DIR") from None


def read_jsonl(path):
    """The records of a JSON Lines log such as metrics.jsonl; a missing file is empty, and a line a killed process
    left half-written is skipped."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return records


def progress(iterable=None, **kwargs):
    """A tqdm progress bar (same arguments) on a terminal. Where stderr is not one (a log file, a pipe), a bar's
    frames would land there as `\\r` and escape codes, so a LogProgress writes a plain line every 10% instead."""
    from tqdm import tqdm
    if sys.stderr.isatty():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, **kwargs)
    return LogProgress(iterable, **kwargs)


class LogProgress:
    """What progress() gives where stderr is not a terminal: tqdm's API as our scripts use it (iterate, update,
    set_postfix, write, close, `with`, n and total), printing a line such as `train: 30% 6/20 step [00:12] loss=2.1`
    at each tenth of the total. A log keeps every line, so a bar that a terminal would erase (leave=False:
    validation, tokenizing) stays quiet for its first 10 s, as any bar does for its first `delay` seconds."""

    def __init__(self, iterable=None, desc=None, total=None, initial=0, unit="it", unit_scale=False, unit_divisor=1000,
                 leave=True, disable=False, delay=0.0, **_):
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        self.scale, self.divisor = unit_scale, unit_divisor
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.postfix, self.disable = initial, "", bool(disable)
        self.start = time.time()
        self.quiet_until = self.start + max(delay or 0.0, 0.0 if leave else 10.0)
        self.tenth = self._tenth()

    def _tenth(self):
        return int(10 * self.n / self.total) if self.total else 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        tenth = self._tenth()
        if tenth > self.tenth:
            self.tenth = tenth
            if not self.disable and time.time() >= self.quiet_until:
                print(self._line(), file=sys.stderr, flush=True)

    def _line(self):
        from tqdm import tqdm
        size = lambda x: tqdm.format_sizeof(x, divisor=self.divisor)
        done, total = ((size(self.n), size(self.total) + self.unit) if self.scale else
                       (f"{self.n:,}", f"{self.total:,} {self.unit}"))
        elapsed = tqdm.format_interval(time.time() - self.start)
        return f"{self.desc}: {10 * self.tenth}% {done}/{total} [{elapsed}]{self.postfix}"

    def set_postfix(self, **values):
        self.postfix = " " + " ".join(f"{k}={v}" for k, v in values.items())

    @staticmethod
    def write(line):
        print(line, flush=True)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
