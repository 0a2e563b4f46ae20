"""What every script does at its edges: read config.py with --name=value overrides, turn a user's mistake into one
line on stderr with exit code 2, and write files atomically so a failure never leaves a half-written one."""

import ast
import difflib
import json
import os
import sys
import tempfile
import time
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


def defaults():
    return {k: v for k, v in vars(config).items() if k.isupper()}


def load_config(argv=None, doc=None, given=None):
    """config.py's names as a namespace, with --name=value overrides from argv (sys.argv[1:] by default). `given`, a
    set, receives the names set on the command line: a resumed run and chat.py's seed need to tell them apart."""
    cfg = defaults()
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print((doc or "").strip() + "\n\nsettings (override with --name=value):")
        for k, v in cfg.items():
            print(f"  --{k.lower()}={v!r}")
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"argument {arg!r}: expected --name=value, e.g. --epochs=1 (see --help)")
        name, text = arg[2:].split("=", 1)
        key = name.upper().replace("-", "_")
        if key not in cfg:
            close = difflib.get_close_matches(key, cfg, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('--' + c.lower() for c in close)}?" if close else " (see --help)"
            raise UserError(f"unknown setting --{name}{hint}")
        cfg[key] = _parse_value(key, text, cfg[key])
        if given is not None:
            given.add(key)
    return types.SimpleNamespace(**cfg)


def _parse_value(key, text, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text  # a bare word like --model=gpt2 is a string
    if default is None:
        return value  # a setting that is off by default (TRAIN_SPEAKERS) takes any value; its user checks it
    if type(default) is float and type(value) is int:
        return float(value)  # --learning_rate=1 means 1.0
    if type(value) is not type(default):
        raise UserError(f"--{key.lower()}={text}: expected {_a(type(default).__name__)} like {default!r}, "
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
