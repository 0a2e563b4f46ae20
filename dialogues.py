"""Dialogues: reading them from the four JSON record formats, the "Speaker: text" text format the later stages train
on, and the hash split. A dialogue is a list of (speaker, text) turns."""

import hashlib
import json
import re

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


def load_records(path):
    """The records of a JSON array or JSON Lines file, and for each a label saying where it is."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (set DATA_FILE, or pass --data_file=PATH)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not part of the JSON
    except UnicodeDecodeError as e:
        start = e.start + len(raw) - len(e.object)  # utf-8-sig counts from after the byte-order mark
        line = raw[:start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not valid UTF-8 (byte {start})") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    try:
        # parse_int=float: a number is never dialogue text, and int() refuses one of over 4300 digits (ValueError)
        data = json.loads(text, object_pairs_hook=_Object, parse_int=float)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and "\n" not in text[:e.pos].strip():  # one value on line 1, then more: JSON Lines
            return _load_json_lines(path, text)
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: the top level is {_kind(data)}; expected a list of dialogues (a JSON array) "
                        f"or one dialogue per line (JSON Lines)")
    return [(r, f"{path}: record {i + 1}") for i, r in enumerate(data)]


def _load_json_lines(path, text):
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line, object_pairs_hook=_Object, parse_int=float), f"{path}: line {n}"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n}: invalid JSON at column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise UserError(f"{path}: line {n}: JSON nested too deeply") from None
    return records


def _kind(v):
    return {dict: "an object", _Object: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}[type(v)]


def parse_record(record, where):
    """One record, in any of the four formats, as a list of (speaker, text) turns; empty turns are left out."""
    if isinstance(record, list):
        pairs, keys = record, ("speaker", "text")
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
        pairs, keys = record["messages"], ("role", "content")
    elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
        pairs, keys = record["conversations"], ("from", "value")
    elif isinstance(record, dict) and isinstance(record.get("turns", record.get("dialogue")), list):
        pairs, keys = record.get("turns", record.get("dialogue")), ("speaker", "text")
    elif isinstance(record, dict) and (key := next((k for k in LIST_KEYS if k in record), None)):
        # {"messages": "hi"} is not one turn by a speaker called "messages": the format is right, the value wrong
        raise UserError(f"{where}: {key!r} is {_kind(record[key])}; expected a list of turns")
    elif isinstance(record, dict) and any(isinstance(v, str) for _, v in getattr(record, "pairs", record.items())):
        pairs = getattr(record, "pairs", record.items())  # every turn, a repeated speaker's too
        return [t for t in (_turn(s, v, where, f"speaker {s[:60]!r}") for s, v in pairs) if t]
    else:
        raise UserError(f"{where}: {_kind(record)} is not a dialogue; expected {FORMATS}")
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


def write_dialogues(f, dialogues):
    f.write("\n".join(format_dialogue(d) for d in dialogues))


# The chat template saved with every model trained in the speaker format: apply_chat_template(messages) renders the
# training text exactly (BOS, or EOS where the model has no BOS, then "Speaker: text" lines, then EOS); with
# add_generation_prompt=True it ends with the next speaker's label instead: `next_speaker` if given, else the one who
# spoke before the last message. A message's speaker is its "name", else its "role".
CHAT_TEMPLATE = (
    "{{- bos_token or eos_token -}}"
    "{%- for m in messages -%}{{ (m.name or m.role) | replace(':', ' ') | trim }}: "
    "{{ m.content.split() | join(' ') }}{{ '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if next_speaker is defined and next_speaker -%}{%- set label = next_speaker -%}"
    "{%- elif messages | length > 1 -%}{%- set label = messages[-2].name or messages[-2].role -%}"
    "{%- else -%}{%- set label = 'assistant' -%}{%- endif -%}"
    "{{ label | replace(':', ' ') | trim }}:"
    "{%- else -%}{{ eos_token }}{%- endif -%}")


def read_dialogues(path):
    """Read a text file written by prepare_data.py back into dialogues."""
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (run prepare_data.py first)") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    dialogues, turns = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            if turns:
                dialogues.append(turns)
            turns = []
            continue
        speaker, sep, said = line.partition(": ")
        if not sep or not speaker.strip() or ":" in speaker:
            raise UserError(f"{path}: line {n}: expected 'Speaker: text', got {line[:60]!r}")
        turns.append((speaker, said))
    if turns:
        dialogues.append(turns)
    return dialogues


# ---------------------------------------------------------------------------------------------------------------------
# The split

def split_key(turns, seed):
    """A number in [0, 1) fixed by the dialogue's content and the seed alone: a dialogue's side of the split never
    depends on what else is in the file."""
    h = hashlib.sha256(f"{seed}\n{format_dialogue(turns)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def split(dialogues, val_fraction, seed):
    """(train, val) in file order. Both sides get at least one dialogue: on a tiny file where the hash left one side
    empty, the dialogue closest to the threshold crosses over."""
    keys = [split_key(d, seed) for d in dialogues]
    is_val = [k < val_fraction for k in keys]
    if len(dialogues) >= 2 and (all(is_val) or not any(is_val)):
        i = (max if all(is_val) else min)(range(len(keys)), key=keys.__getitem__)
        is_val[i] = not is_val[i]
    return ([d for d, v in zip(dialogues, is_val) if not v], [d for d, v in zip(dialogues, is_val) if v])
