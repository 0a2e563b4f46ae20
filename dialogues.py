"""Dialogues: reading them from the record formats (in JSON, Parquet, a dataset directory or a Hub dataset), the
"Speaker: text" text format the later stages train on (written, read and parsed here, prompts included), and the hash
split. A dialogue is a list of (speaker, text) turns."""

import dataclasses
import hashlib
import itertools
import json
import os
import re

import hub as hubs
from cli import UserError

FORMATS = ('an object mapping speaker to text, a list of {"speaker", "text"} turns (bare or under "turns" or '
           '"dialogue"), {"messages": [{"role", "content"}]}, or {"conversations": [{"from", "value"}]}')

# Control characters (C0, DEL, C1) that are not whitespace carry no text: removed. The whitespace ones (newline, tab,
# ...) are folded into spaces by split().
_CONTROL = dict.fromkeys(c for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if not chr(c).isspace())

LIST_KEYS = ("messages", "conversations", "turns", "dialogue")  # keys that name a format, never a speaker

# Half of a \ud83d\ude00-style escape pair: valid JSON, but no character, and UTF-8 can't write it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text):
    """One line: control characters removed, every run of whitespace (newlines, tabs, unicode separators) one space."""
    return " ".join(text.translate(_CONTROL).split())


def clean_speaker(name):
    """A speaker label that can't break the format: no colon (it ends the label), one line."""
    return clean_text(name.replace(":", " ")).strip()


# ---------------------------------------------------------------------------------------------------------------------
# JSON in

class _Object(dict):
    """A JSON object that remembers every key/value pair in order, duplicates included: in the speaker->text format
    the same speaker talking twice is a duplicate key, and a plain dict would silently drop that turn."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


# A JSON Lines file is read a line at a time, so memory is bounded by its longest line, not by the file. A line longer
# than this is refused with its number rather than read: parsing costs several times its bytes in Python objects,
# and a line that size is more likely a file that isn't JSON Lines at all. A JSON array is read whole, as always.
MAX_RECORD_MB = 64
_MAX_LINE = MAX_RECORD_MB * 2 ** 20

_BOM = b"\xef\xbb\xbf"  # a byte-order mark some editors write first; not part of the JSON
_JSON_SPACE = " \t\r\n"  # the whitespace JSON itself allows between values


class _TooLong(Exception):
    """A line over MAX_RECORD_MB; args: its number."""


class _Lines:
    """The file's lines one at a time as (line number, text without its newline, the byte offset where the line
    ends), each checked for UTF-8; the byte-order mark at the start of the file dropped."""

    def __init__(self, f, path):
        self.f, self.path, self.n, self.pos = f, path, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        raw = self.f.readline(_MAX_LINE + 1)
        if not raw:
            raise StopIteration
        self.n += 1
        start, self.pos = self.pos, self.pos + len(raw)
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        if len(raw) > _MAX_LINE:
            raise _TooLong(self.n)
        if self.n == 1 and raw.startswith(_BOM):
            raw, start = raw[len(_BOM):], start + len(_BOM)
        try:
            return self.n, raw.decode("utf-8"), self.pos
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: line {self.n}: not valid UTF-8 (byte {start + e.start})") from None


def load_records(path, bar=None):
    """The records of a JSON array or JSON Lines file, one at a time, each with a label saying where it is. JSON Lines
    is read line by line; an array is read whole. `bar`, a tqdm, counts the bytes of the records taken: a line's once
    the reader asks for the next record, an array's when it has taken them all. A refused record never moves the bar,
    so however slow the machine, no progress line for it comes before its error."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        # a relative path is the usual surprise: the script was run from another directory
        full = os.path.abspath(path)
        hint = "" if os.path.isabs(path) else f"paths are relative to the current directory, {os.getcwd()}; "
        raise UserError(f"{full}: no such file ({hint}set DATA_FILE or pass --data_file=PATH)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        if bar is not None:
            bar.total = os.fstat(f.fileno()).st_size  # not reset(), which draws the bar at once, however small the file
        lines = _Lines(f, path)
        kind, read = _sniff(path, lines)
        if kind == "lines":
            yield from _json_lines(path, lines, read, bar)
            return
        yield from (_array(path, read) if kind == "one value" else _whole(f, path))
        if bar is not None:
            bar.update(bar.total - bar.n)


def _sniff(path, lines):
    """Which kind of file this is, by the rule of old: one value on line 1 (the first line with any JSON), then more,
    is JSON Lines. The first lines settle it: ("lines", the lines read so far) or ("one value", the value that is the
    whole file). What they can't settle (a value over several lines, broken JSON, deep nesting, a huge first line) is
    ("whole", None): read the file whole and judge it as before."""
    try:
        first = next((line for line in lines if line[1].strip(_JSON_SPACE)), None)
        if first is None:
            raise UserError(f"{path}: the file is empty")
        try:
            value = _loads(first[1])
        except json.JSONDecodeError as e:
            # two values on line 1 is JSON Lines with a broken line 1; any other error may be JSON over several lines
            return ("lines", [first]) if e.msg == "Extra data" else ("whole", None)
        except RecursionError:
            return "whole", None
        more = next((line for line in lines if line[1].strip(_JSON_SPACE)), None)
    except _TooLong:
        return "whole", None
    if more is None and isinstance(value, dict):
        return "lines", [first]  # one object on one line: JSON Lines with one record
    return ("one value", value) if more is None else ("lines", [first, more])


def _loads(text):
    # parse_int=float: a number is never dialogue text, and int() refuses one of over 4300 digits (ValueError)
    return json.loads(text, object_pairs_hook=_Object, parse_int=float)


def _whole(f, path):
    """The file read whole and parsed as one JSON value; JSON Lines after all if the value on line 1 is followed by
    more."""
    f.seek(0)
    raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # -sig: drop the byte-order mark
    except UnicodeDecodeError as e:
        start = e.start + len(raw) - len(e.object)  # utf-8-sig counts from after the byte-order mark
        line = raw[:start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not valid UTF-8 (byte {start})") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    try:
        data, json_lines = _loads(text), False
    except json.JSONDecodeError as e:
        # one value on line 1, then more: JSON Lines (_sniff sends one here only when its line 1 is too long)
        if e.msg != "Extra data" or "\n" in text[:e.pos].strip():
            raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        data, json_lines = None, True
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    raw = text = None  # free both copies before the records are used (a JSON error holds one until its block ends)
    if json_lines:
        f.seek(0)
        yield from _json_lines(path, _Lines(f, path), [])
    else:
        yield from _array(path, data)


def _array(path, data):
    if not isinstance(data, list):
        keys = f" with keys {', '.join(map(repr, list(data)[:8]))}" if isinstance(data, dict) and data else ""
        raise UserError(f"{path}: the top level is {_kind(data)}{keys} over several lines; expected a list of records "
                        f"(a JSON array) or one record per line (JSON Lines)")
    for i, r in enumerate(data):
        yield r, f"{path}: record {i + 1}"


def _json_lines(path, lines, read, bar=None):
    """One record per line, starting with the lines already `read`; blank lines skipped. `bar` counts the bytes up to
    the end of each record taken (see load_records)."""
    try:
        for n, line, end in itertools.chain(read, lines):
            if not line.strip():
                continue
            try:
                record = _loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n}: invalid JSON at column {e.colno}: {e.msg}") from None
            except RecursionError:
                raise UserError(f"{path}: line {n}: JSON nested too deeply") from None
            yield record, f"{path}: line {n}"
            if bar is not None:
                bar.update(end - bar.n)
    except _TooLong as e:
        raise UserError(f"{path}: line {e.args[0]}: a record of over {MAX_RECORD_MB} MiB, too large to read one "
                        f"line at a time (the limit is dialogues.MAX_RECORD_MB)") from None
    if bar is not None:
        bar.update(lines.pos - bar.n)  # blank lines at the end


def _kind(v):
    kinds = {dict: "an object", _Object: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(v)) or f"a {type(v).__name__} value"  # Parquet has more types: bytes, dates, decimals


# ---------------------------------------------------------------------------------------------------------------------
# Parquet, dataset directories and Hub datasets in. The `datasets` library (and pyarrow) is imported only here, when
# one is read: a JSON file never waits for it.

# A DATA_FILE that is no local path but has the shape of a Hub dataset id. "data/train.jsonl" has it too, so a name
# ending like a data file, or whose first part is a local directory, is taken for a missing file instead.
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
_ROWS_PER_BATCH = 1024  # Parquet rows turned into Python objects at a time: memory holds a batch, never the file
# pyarrow's defaults read a whole row group (often the whole file) into memory first, and pre-buffer ahead of that:
# 330 MB for a 180 MB file. Read through a 1 MiB buffer, memory stays ~140 MB (90 of them pyarrow's own) at any size.
_PARQUET_READ = dict(pre_buffer=False, buffer_size=2 ** 20)


def source(path):
    """What DATA_FILE names: "parquet" (a .parquet file), "directory" (a dataset in the Hub's layout), "hub" (a Hub
    dataset id: no such local path, and shaped "owner/name"), else "json" (load_records, which also says when a file
    is missing)."""
    if os.path.isdir(path):
        return "directory"
    if os.path.exists(path):
        return "parquet" if path.lower().endswith(".parquet") else "json"
    if (_HUB_ID.fullmatch(path) and not path.lower().endswith(_DATA_SUFFIXES)
            and not os.path.isdir(path.split("/")[0])):
        return "hub"
    return "json"


def read_records(path, split, bar=None):
    """The records DATA_FILE names, one at a time, each with a label saying where it is: a JSON or JSON Lines file
    (load_records; `bar` counts bytes), or a Parquet file, a dataset directory's or a Hub dataset's `split` (`bar`
    counts rows). A record from a table is a dict with its absent fields left out."""
    kind = source(path)
    if kind == "json":
        yield from load_records(path, bar)
    elif kind == "parquet":
        yield from _parquet(path, bar)
    elif kind == "directory":
        yield from _directory(path, split, bar)
    else:
        yield from _stream(path, split, bar, hub=True)


def _parquet(path, bar, total=True):
    """A Parquet file's rows, a batch at a time. `total`: the bar's total is this file's row count."""
    import pyarrow.parquet as pq
    try:
        f = pq.ParquetFile(path, **_PARQUET_READ)
    except Exception as e:  # pyarrow's errors for a file that isn't Parquet, or is cut short, are all ArrowException
        raise UserError(f"{path}: cannot read it as Parquet: {_first_line(e)}") from None
    with f:
        if bar is not None and total:
            bar.total = f.metadata.num_rows
        row = 0
        for batch in _checked(f.iter_batches(batch_size=_ROWS_PER_BATCH), path):
            for record in batch.to_pylist():
                row += 1
                yield _present(record), f"{path}: row {row}"
                if bar is not None:  # once taken, as load_records counts
                    bar.update(1)


def _directory(path, split, bar):
    """A local dataset in the Hub's layout (data/train-00000-of-00001.parquet, train.jsonl, a README.md naming its
    files, ...): `datasets` says which files hold the split, as it would for load_dataset(path). Parquet and JSON files
    are read here, file by file, so a bad record is named by its file and row or line; other kinds (CSV, compressed
    JSON, ...) are streamed by `datasets` itself."""
    import datasets
    try:
        files = datasets.load_dataset_builder(path).config.data_files
    except Exception as e:
        raise UserError(f"{path}: not a dataset directory we can read: {_first_line(e)}") from None
    if split not in files:
        raise UserError(f"{path}: no split {split!r}; it has {', '.join(map(repr, map(str, files)))} (set DATA_SPLIT)")
    files = list(files[split])
    if not all(f.lower().endswith(_DATA_SUFFIXES) for f in files):
        yield from _stream(path, split, bar, hub=False)
        return
    if bar is not None and all(f.lower().endswith(".parquet") for f in files):
        import pyarrow.parquet as pq
        bar.total = sum(pq.read_metadata(f).num_rows for f in files)  # footers only
    for file in files:
        if file.lower().endswith(".parquet"):
            yield from _parquet(file, bar, total=False)
        else:
            for record in load_records(file):  # load_records counts bytes; the bar here counts records
                yield record
                if bar is not None:
                    bar.update(1)


def _stream(name, split, bar, hub):
    """A dataset's split streamed by `datasets` (load_dataset(..., streaming=True)): rows arrive as they are read, so
    a dataset of any size never sits in memory. Rows are numbered in the split, from 1."""
    label = f"{name}[{split}]"
    offline = hub and hubs.offline_unless_reachable()  # else the client retries, a line a try, for 24 s
    import datasets
    datasets.logging.set_verbosity_error()
    try:
        rows = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        where = ("cannot load the dataset" if not hub else
                 "no local file or directory of that name, and the Hub dataset can't be loaded" +
                 (" (the Hub is unreachable: offline?)" if offline else ""))
        raise UserError(f"{label}: {where}: {_first_line(e)}") from None
    known = rows.info.splits and rows.info.splits.get(split)  # the row count, where the dataset's card gives it
    if bar is not None and known and known.num_examples:
        bar.total = known.num_examples
    for row, record in enumerate(_checked(rows, label), 1):
        yield _present(record), f"{label}: row {row}"
        if bar is not None:
            bar.update(1)


def _checked(items, what):
    """The items, with an error while reading one (a broken file, a lost connection, a schema that doesn't fit) made
    one line naming `what`. Only the reading is guarded: what the caller does with an item is not."""
    items = iter(items)
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as e:
            raise UserError(f"{what}: cannot read: {_first_line(e)}") from None
        yield item


def _first_line(e):
    """The library's error as one line: its first two lines (the second often names the choices, such as a dataset's
    configs), capped."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _present(value):
    """A table's row with what is absent left out. A table has every column in every row and a struct every field in
    every turn, None where the record had none: a file mixing {"messages": ...} and {"conversations": ...} rows gives
    both keys to each, and turns with speaker/text and role/content columns all four."""
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_present(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------------
# DATA_FILE: one source, or a list of them, each read in its own format

@dataclasses.dataclass(frozen=True)
class Source:
    """One entry of DATA_FILE: a path or Hub id, its split, and how much of it to take: `weight` copies of each
    dialogue in the train file (a fraction: that share of the dialogues, chosen by hash) or its first `dialogues`."""
    path: str
    split: str
    weight: float = 1.0
    dialogues: int = 0

    def __str__(self):
        return self.path if source(self.path) in ("json", "parquet") else f"{self.path}[{self.split}]"


def sources(data_file, split):
    """DATA_FILE as a list of Sources: a path or Hub id, or a list of them, each a string or {"path": ...,
    "split": ..., "weight": ... or "dialogues": ...}; `split` (DATA_SPLIT) where an entry names none."""
    entries = data_file if isinstance(data_file, list) else [data_file]
    if not entries:
        raise UserError("DATA_FILE is an empty list; expected a path, a Hub dataset id, or a list of them")
    out = []
    for i, entry in enumerate(entries, 1):
        where = "DATA_FILE" if not isinstance(data_file, list) else f"DATA_FILE entry {i}"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"].strip():
            raise UserError(f"{where}: {entry!r}: expected a path or Hub id, or {{'path': ..., 'split': ..., "
                            f"'weight': ... or 'dialogues': ...}}")
        unknown = set(entry) - {"path", "split", "weight", "dialogues"}
        if unknown:
            raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r}; an entry takes 'path', 'split', 'weight' "
                            f"or 'dialogues'")
        if "weight" in entry and "dialogues" in entry:
            raise UserError(f"{where}: give 'weight' or 'dialogues', not both")
        weight, count = entry.get("weight", 1.0), entry.get("dialogues", 0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1000:
            raise UserError(f"{where}: 'weight' must be a number above 0 (0.5 takes half the dialogues, 2 each one "
                            f"twice), got {weight!r}")
        if "dialogues" in entry and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise UserError(f"{where}: 'dialogues' must be a whole number above 0, got {count!r}")
        if not isinstance(entry.get("split", split), str):
            raise UserError(f"{where}: 'split' must be a string, got {entry['split']!r}")
        out.append(Source(entry["path"], entry.get("split", split), float(weight), count))
    return out


def copies(turns, seed, weight):
    """How many times a dialogue goes into the train file under its source's `weight`: the whole part, and one more
    for the fraction of dialogues a hash of its content picks (as the split, independent of what else is read)."""
    h = hashlib.sha256(f"{seed}\nweight\n{format_dialogue(turns)}".encode()).digest()
    return int(weight) + (int.from_bytes(h[:8], "big") / 2 ** 64 < weight - int(weight))


# ---------------------------------------------------------------------------------------------------------------------
# Records to turns. A record is a dialogue in one of four formats, or an SFT record (instruction; prompt/completion)
# whose turns are spoken by the chat roles: user, assistant, and system where it has one. See README.md: Data.

USER, ASSISTANT = "user", "assistant"
SYSTEM = "system"  # the speaker a system message is: messages' and ShareGPT's `system` role, an SFT record's system
INSTRUCTION, OUTPUT, INPUT = ("instruction",), ("output", "response"), ("input", "context")  # Alpaca's, Dolly's
# Keys that name a field of some record format, never a speaker: a mapping record {"text": ...} or {"question": ...,
# "answer": ...} is not a dialogue of speakers called "text" or "question".
FIELD_KEYS = {*LIST_KEYS, *INSTRUCTION, *OUTPUT, *INPUT, "prompt", "completion", "chosen", "rejected", "text",
              "history", "question", "answer", "query", "id", "label", "category", "source", "score"}
RECORD_FORMATS = FORMATS + ('; or SFT records: {"instruction", "input", "output"} (Alpaca; Dolly\'s "context" and '
                            '"response"), {"prompt", "completion"} (strings or message lists)')


def parse_record(record, where, use_chosen=False):
    """One record as (its format's name, a list of (speaker, text) turns); empty turns are left out. `use_chosen`:
    a preference record (prompt, chosen, rejected) is its prompt and chosen reply, else it is refused."""
    if isinstance(record, list):
        return "turns", _turns(record, ("speaker", "text"), where)
    if not isinstance(record, dict):
        raise UserError(f"{where}: {_kind(record)} is not a dialogue; expected {FORMATS}")
    for key, keys, name in (("messages", ("role", "content"), "messages"),
                            ("conversations", ("from", "value"), "conversations"),
                            ("turns", ("speaker", "text"), "turns"), ("dialogue", ("speaker", "text"), "turns")):
        if isinstance(record.get(key), list):
            return name, _turns(record[key], keys, where)
    if key := next((k for k in LIST_KEYS if k in record), None):
        # {"messages": "hi"} is not one turn by a speaker called "messages": the format is right, the value wrong
        raise UserError(f"{where}: {key!r} is {_kind(record[key])}; expected a list of turns")
    if "chosen" in record or "rejected" in record:
        return "preference", _preference(record, where, use_chosen)
    if "prompt" in record or "completion" in record:
        return "prompt/completion", _prompt_completion(record, where)
    if any(k in record for k in INSTRUCTION):
        return "instruction", _instruction(record, where)
    fields = [k for k in record if k.strip().lower() in FIELD_KEYS]
    if "text" in (k.strip().lower() for k in fields):
        raise UserError(f"{where}: a plain-text record ({{'text': ...}}): text to continue, not a dialogue of "
                        f"turns; expected {RECORD_FORMATS}")
    if fields:
        raise UserError(f"{where}: keys {', '.join(map(repr, list(record)[:8]))} match no record format (a speaker is "
                        f"never named {fields[0]!r}); expected {RECORD_FORMATS}")
    if any(isinstance(v, str) for _, v in getattr(record, "pairs", record.items())):
        pairs = getattr(record, "pairs", record.items())  # every turn, a repeated speaker's too
        return "mapping", [t for t in (_turn(s, v, where, f"speaker {s[:60]!r}") for s, v in pairs) if t]
    keys = f" with keys {', '.join(map(repr, list(record)[:8]))}" if record else ""
    raise UserError(f"{where}: {_kind(record)}{keys} is not a dialogue; expected {RECORD_FORMATS}")


def _turns(pairs, keys, where):
    turns = []
    for i, item in enumerate(pairs, 1):
        missing = [k for k in keys if not isinstance(item, dict) or k not in item]
        if missing:
            raise UserError(f"{where}: turn {i} is {_kind(item)}"
                            f"{' without ' + ' and '.join(map(repr, missing)) if isinstance(item, dict) else ''}"
                            f"; expected {{{keys[0]!r}: ..., {keys[1]!r}: ...}}")
        given = [k for k, _ in getattr(item, "pairs", ())]
        for k in keys:
            if given.count(k) > 1:  # a dict keeps the last and drops the rest; which one did the writer mean?
                raise UserError(f"{where}: turn {i}: {k!r} appears {given.count(k)} times; expected once")
        turn = _turn(item[keys[0]], item[keys[1]], where, f"turn {i}")
        if turn:
            turns.append(turn)
    return turns


def _field(record, names, where, what, required=True):
    """The string under the first of `names` in the record ("" where absent and not `required`)."""
    key = next((k for k in names if k in record), None)
    if key is None:
        if required:
            raise UserError(f"{where}: {what} without {' or '.join(map(repr, names))}; expected {RECORD_FORMATS}")
        return ""
    if not isinstance(record[key], str):
        raise UserError(f"{where}: {key!r} is {_kind(record[key])}, expected a string")
    return record[key]


def _said(record, key, role, where, what):
    """A prompt or completion: a string (one turn by `role`) or a list of messages ({"role", "content"})."""
    if key not in record:
        raise UserError(f"{where}: {what} without {key!r}; expected {RECORD_FORMATS}")
    value = record[key]
    if isinstance(value, str):
        turn = _turn(role, value, where, repr(key))
        return [turn] if turn else []
    if isinstance(value, list):
        return _turns(value, ("role", "content"), f"{where}: {key!r}")
    raise UserError(f"{where}: {key!r} is {_kind(value)}; expected a string or a list of messages")


def _instruction(record, where):
    """Alpaca: the instruction (and the input, where there is one) is the user's turn, the output the assistant's;
    `system` a system turn first, `history` ([[question, answer], ...]) the exchanges before."""
    what = "an instruction record"
    turns = []
    if "system" in record:
        turns.append(_turn(SYSTEM, _field(record, ("system",), where, what), where, "'system'"))
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise UserError(f"{where}: 'history' is {_kind(history)}; expected a list of [question, answer] pairs")
    for i, (question, answer) in enumerate(history, 1):
        turns += [_turn(USER, question, where, f"history {i}"), _turn(ASSISTANT, answer, where, f"history {i}")]
    asked = "\n\n".join(t for t in (_field(record, INSTRUCTION, where, what),
                                      _field(record, INPUT, where, what, required=False)) if t.strip())
    output = _field(record, OUTPUT, where, what)
    turns += [_turn(USER, asked, where, "the instruction"), _turn(ASSISTANT, output, where, "the output")]
    return [t for t in turns if t]


def _prompt_completion(record, where):
    """TRL's: the prompt (a user turn, or messages) is the context, the completion (an assistant turn, or messages)
    the reply."""
    what = "a prompt/completion record"
    return _said(record, "prompt", USER, where, what) + _said(record, "completion", ASSISTANT, where, what)


def _preference(record, where, use_chosen):
    """A preference pair read as one dialogue: refused, unless `use_chosen`, then the prompt and the chosen reply."""
    if not use_chosen:
        raise UserError(f"{where}: a preference record (chosen/rejected): it ranks two replies, it is not one "
                        f"dialogue; to train on the prompt and its chosen reply, dropping the rejected one, set "
                        f"--use_chosen=True; to train on the ranking, prepare_data.py --objective=dpo")
    prompt, chosen, _ = parse_pair(record, where)
    return prompt + chosen


OBJECTIVES = ("sft", "dpo", "simpo")  # OBJECTIVE's choices: the last two read preference pairs (preference.py)
PAIR_FORMATS = ('{"prompt", "chosen", "rejected"} (strings or message lists), or {"chosen", "rejected"}: two '
                'conversations (message lists, or "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts) whose shared '
                'opening is the prompt')
_TRANSCRIPT = re.compile(r"\n\n(Human|Assistant): ?")  # Anthropic HH's: a conversation in one string
_TRANSCRIPT_ROLES = {"Human": USER, "Assistant": ASSISTANT}


def parse_pair(record, where):
    """A preference record as (prompt, chosen reply, rejected reply), each a list of (speaker, text) turns: with an
    explicit `prompt` (a string is a user turn, a reply string an assistant turn), or without one, two whole
    conversations whose longest shared opening is the prompt and whose rest is each reply."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        keys = f" with keys {', '.join(map(repr, list(record)[:8]))}" if isinstance(record, dict) else ""
        raise UserError(f"{where}: {_kind(record)}{keys} is not a preference pair; expected {PAIR_FORMATS}")
    what = "a preference record"
    if "prompt" in record:
        return (_said(record, "prompt", USER, where, what), _said(record, "chosen", ASSISTANT, where, what),
                _said(record, "rejected", ASSISTANT, where, what))
    chosen, rejected = (_conversation(record, key, where) for key in ("chosen", "rejected"))
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if chosen == rejected:
        return chosen[:-1], chosen[-1:], rejected[-1:]  # a tie: the last turn is each "reply"
    if shared == len(chosen) or shared == len(rejected):
        raise UserError(f"{where}: one conversation is the other's opening, so one of them has no reply of its own; "
                        f"expected two conversations that differ in their last turn(s)")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _conversation(record, key, where):
    """A whole conversation under `key`: a message list, or a transcript string (Human:/Assistant:)."""
    value = record[key]
    if isinstance(value, str):
        parts = _TRANSCRIPT.split(value)
        if len(parts) < 3:
            raise UserError(f"{where}: {key!r} is a string but there is no 'prompt': expected {PAIR_FORMATS}")
        turns = [_turn(_TRANSCRIPT_ROLES[s], t, where, f"{key!r} turn {i}")
                 for i, (s, t) in enumerate(zip(parts[1::2], parts[2::2]), 1)]
        return [t for t in turns if t]
    if isinstance(value, list):
        return _turns(value, ("role", "content"), f"{where}: {key!r}")
    raise UserError(f"{where}: {key!r} is {_kind(value)}; expected a string or a list of messages")


def _turn(speaker, text, where, which):
    if not isinstance(speaker, str):
        raise UserError(f"{where}: {which}: the speaker is {_kind(speaker)}, expected a string")
    if not isinstance(text, str):
        raise UserError(f"{where}: {which}: the text is {_kind(text)}, expected a string")
    text = clean_text(text)
    if not text:
        return None  # an empty turn says nothing; skipped
    name = clean_speaker(speaker)
    if not name:
        raise UserError(f"{where}: {which}: empty speaker name")
    for part, s in (("speaker", name), ("text", text)):
        if m := _SURROGATE.search(s):
            raise UserError(f"{where}: {which}: the {part} holds an unpaired surrogate {m.group()!r}, not a character")
    return name, text


# ---------------------------------------------------------------------------------------------------------------------
# The text format: one turn per line as "Speaker: text", a blank line between dialogues.

def format_dialogue(turns):
    return "".join(f"{s}: {t}\n" for s, t in turns)


def write_dialogue(f, turns, first):
    """Append one dialogue to a text file: after a blank line unless it is the file's `first`, so one blank line
    separates dialogues and none ends the file (prepare_data.py writes every file of dialogues so)."""
    f.write(format_dialogue(turns) if first else "\n" + format_dialogue(turns))


def parse_turn(line):
    """(speaker, text) of one line "Speaker: text" of the text format; None for a line that is not one."""
    speaker, sep, said = line.partition(": ")
    if not sep or not speaker.strip() or ":" in speaker:
        return None
    return speaker, said


def parse_prompt(text, what="SAMPLE_PROMPT"):
    """A conversation in the text format that ends with the label of who speaks next ("Alex: Hi!\nBob:"), as
    (turns, that speaker); `what` names it in the error."""
    *lines, label = text.strip().split("\n")
    turns = []
    for n, line in enumerate(lines, 1):
        turn = parse_turn(line)
        if turn is None:
            raise UserError(f"{what}: line {n}: expected 'Speaker: text', got {line[:60]!r}")
        turns.append((turn[0].strip(), turn[1].strip()))
    speaker = label.strip()[:-1].strip()
    if not label.strip().endswith(":") or not speaker or ":" in speaker:
        raise UserError(f"{what}: its last line must be the label of who speaks next, like 'Bob:', got "
                        f"{label[:60]!r}")
    return turns, speaker


def read_dialogues(path):
    """Read a text file written by prepare_data.py back into dialogues."""
    return list(iter_dialogues(path))


def write_pair(f, pair):
    """Append one preference pair to a pairs file (prepare_data.py with OBJECTIVE="dpo" or "simpo"): JSON Lines, one
    record {"prompt", "chosen", "rejected"} a line, each a list of {"role": speaker, "content": text}, cleaned; the
    form parse_pair reads back as it was written."""
    record = {k: [{"role": s, "content": t} for s, t in turns] for k, turns in zip(("prompt", "chosen", "rejected"),
                                                                                    pair)}
    f.write(json.dumps(record, ensure_ascii=False) + "\n")


def iter_pairs(path):
    """The pairs of a pairs file, one at a time, as parse_pair gives them; a file of dialogues ("Speaker: text") is
    refused with what to run."""
    with open(path, "rb") as f:
        head = f.read(1)
    if head and head != b"{":
        raise UserError(f"{path} holds dialogues, not preference pairs: run prepare_data.py --objective=dpo on "
                        f"preference records first")
    for record, where in load_records(path):
        yield parse_pair(record, where)


def iter_dialogues(path, progress=None):
    """The dialogues of a text file written by prepare_data.py, one at a time: memory holds one dialogue, never the
    file. `progress(n)` is told of every n bytes read."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (run prepare_data.py first)") from None
    with f:
        turns = []
        for n, raw in enumerate(f, 1):
            if progress:
                progress(len(raw))
            try:
                line = raw.decode("utf-8").rstrip("\n")
            except UnicodeDecodeError:
                raise UserError(f"{path}: line {n}: not valid UTF-8") from None
            if not line.strip():
                if turns:
                    yield turns
                turns = []
                continue
            turn = parse_turn(line)
            if turn is None:
                raise UserError(f"{path}: line {n}: expected 'Speaker: text', got {line[:60]!r}")
            turns.append(turn)
        if turns:
            yield turns


# ---------------------------------------------------------------------------------------------------------------------
# The split

def split_key(turns, seed):
    """A number in [0, 1) fixed by the dialogue's content and the seed alone: a dialogue's side of the split never
    depends on what else is in the file. Below VAL_FRACTION is val (prepare_data.py)."""
    h = hashlib.sha256(f"{seed}\n{format_dialogue(turns)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64

