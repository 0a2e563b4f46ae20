"""prepare_data.py end to end on malformed dataset files. Each one is either prepared correctly, or rejected with exit
code 2 and exactly one stderr line "error: data.json: ..." naming the problem and where (record N, line N), with no
traceback, the train/val files of an earlier good run left byte for byte as they were, and no other file left behind.

    .venv/bin/python -m pytest -q tests/test_prepare_data_bad_input.py

The cases: a generator that puts each wrong-typed value at each node of a valid record of each format, and hand-written
ones (deep nesting, huge strings, JSON Lines records over the size limit, control characters, bad UTF-8, byte-order
marks, duplicate keys, empty speaker names, mixed formats, broken JSON Lines). Each case states its outcome.
prepare_data.py runs once per case, all cases concurrently in a module fixture; the tests then check each result. The
basic bad inputs are in test_prepare_data.py.
"""

import copy
import hashlib
import json
import os
import re
import tempfile
import types
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest

import cli
from conftest import one_error_line, run
from dialogues import MAX_RECORD_MB, read_dialogues
from test_prepare_data import FORMATS, HELLO, HOW, record

OUTPUTS = {"train_data.txt", "val_data.txt"}


def accept(*dialogues):
    """prepare_data.py succeeds and train + val hold exactly these dialogues, each on whichever side its hash says."""
    return "accept", sorted(list(d) for d in dialogues)


def reject(*fragments):
    """Exit code 2 and one error line holding every fragment."""
    return "reject", fragments


def array(*records):
    """A JSON array with one record per line, so a JSON error's line is its record's."""
    return ("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]").encode()


def lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def around(middle):
    """`middle` as record 2 of 3 in a JSON array; records 1 and 3 are good, so a valid but empty middle leaves 2."""
    return array(dict(HELLO), middle, record(HOW, "messages"))


def around_lines(middle):
    """The same as line 2 of JSON Lines."""
    return lines(dict(HELLO), middle, record(HOW, "messages"))


def raw_around(middle):
    """`middle` as record 2, written as raw JSON text (duplicate keys, numbers json.dumps can't write)."""
    first, last = (json.dumps(r).encode() for r in (dict(HELLO), record(HOW, "messages")))
    return b"[\n" + first + b",\n" + middle + b",\n" + last + b"\n]"


# ---------------------------------------------------------------------------------------------------------------------
# generated: every wrong type at every node

WRONG = [(None, "null"), (7, "a number"), (True, "a boolean"), ("oops", "a string"), ([], "a list"), ({}, "an object")]
PING = [("Cy", "Ping"), ("Dee", "Pong")]
SHAPES = {  # format: (key holding the list of turns, None for a bare list; speaker key; text key)
    "bare": (None, "speaker", "text"), "turns": ("turns", "speaker", "text"),
    "dialogue": ("dialogue", "speaker", "text"), "messages": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value")}


def spoiled(rec, path, value):
    """A copy of rec with the node at path (keys and indexes) replaced by value."""
    rec = copy.deepcopy(rec)
    node = rec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return rec


def generated():
    cases = {}

    def add(name, middle, outcome):
        """The spoiled record as record 2 of a JSON array and as line 2 of JSON Lines; `where` starts each fragment."""
        verdict, expected = outcome
        for wrap, where, container in ((around, "record 2", "array"), (around_lines, "line 2", "lines")):
            cases[f"{container}: {name}"] = wrap(middle), (
                outcome if verdict == "accept" else reject(*(f"{where}: {f}" for f in expected)))

    for value, kind in WRONG:
        name = kind.split()[-1]
        if not isinstance(value, list):  # a list is the right type for the whole file
            cases[f"top level is {name}"] = json.dumps(value).encode(), reject("the top level is " + kind)
        add(f"record is {name}", value,
            accept(HELLO, HOW) if value == [] else  # a bare list of no turns: an empty dialogue, dropped
            reject(kind + " is not a dialogue; expected an object mapping speaker"))
        if not isinstance(value, str):  # a string is right for a speaker or a text
            add(f"mapping: text is {name}", {"Cy": "Ping", "Dee": value},
                reject(f"speaker 'Dee': the text is {kind}, expected a string"))
        for fmt, (key, spk, txt) in SHAPES.items():
            at = (key,) if key else ()
            good = record(PING, fmt)
            if key:
                add(f"{fmt}: list of turns is {name}", spoiled(good, at, value),
                    accept(HELLO, HOW) if value == [] else  # no turns: an empty dialogue, dropped
                    reject(f"{key!r} is {kind}; expected a list of turns"))  # not a speaker called {key}
            add(f"{fmt}: turn is {name}", spoiled(good, at + (1,), value), reject(
                f"turn 2 is an object without {spk!r} and {txt!r}; expected" if isinstance(value, dict) else
                f"turn 2 is {kind}; expected {{{spk!r}: ..., {txt!r}: ...}}"))
            if not isinstance(value, str):
                for k, part in ((spk, "speaker"), (txt, "text")):
                    add(f"{fmt}: {k} is {name}", spoiled(good, at + (1, k), value),
                        reject(f"turn 2: the {part} is {kind}, expected a string"))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# hand-written

BIG_TURN = " ".join(f"word{i:06d}" for i in range(100_000))  # 1.1 MB in one turn
HUGE = "0123456789" * (5 * 2 ** 20)  # 50 MiB, one word (a 50 MB run of words would cost the test GBs of str objects)


def write_huge_text(path):
    with open(path, "wb") as f:
        f.write(array({"Alex": "x", "Bob": "Long."}, dict(HOW)).replace(b'"x"', b'"' + HUGE.encode() + b'"'))


def write_long_line(at):
    """JSON Lines whose line `at` (1 or 3) is one record just over the limit on a record read a line at a time."""
    def write(path):
        long = b'{"Alex": "' + b"x" * (MAX_RECORD_MB * 2 ** 20) + b'", "Bob": "Long."}\n'
        with open(path, "wb") as f:
            f.write(long + lines(dict(HELLO), dict(HOW)) if at == 1 else lines(dict(HELLO), dict(HOW)) + long)
    return write


def write_huge_speaker(path):
    with open(path, "wb") as f:
        f.write(raw_around(b'{"' + HUGE.encode() + b'": 5, "Bob": "Hi"}'))


BOM = b"\xef\xbb\xbf"
SIX = [[("Alex", f"Hi {i}"), ("Bob", f"Yo {i}")] for i in range(len(FORMATS))]
BAD_UTF8 = b'[\n{"Alex": "Hi", "Bob": "Yo"},\n{"Alex": "How", "Bob": "Fine"},\n{"Cy": "caf\xe9"}\n]'
BOM_BAD_UTF8 = BOM + b'[{"Alex": "Hi", "Bob": "Yo"},\n{"A":\n"\xe9"}]'  # the bad byte just after a line break
CONTROL = {"Al\x00ex": "a\x00b \x1b[31mred\x1b[0m",
           "\x1bB\tob ": "1\r\n2\u20283\u2029x\x85y\tz\x0bw\x0cv\x7f!\x9b nb\xa0sp"}

HAND = {
    # nesting: Python's json raises RecursionError past ~1000 levels
    "100000 nested [": (
        b"[" * 100_000, reject("data.json: JSON nested too deeply")),
    "100000 nested objects on JSON Lines line 3": (
        lines(dict(HELLO), dict(HOW)) + b'{"a": ' * 100_000 + b"\n", reject("line 3: JSON nested too deeply")),
    "50 nested lists as a record": (
        around(json.loads("[" * 50 + '"x"' + "]" * 50)), reject("record 2: turn 1 is a list; expected")),

    # huge values
    "1.1 MB single turn": (
        array({"Alex": BIG_TURN, "Bob": "Wow."}, dict(HOW)), accept([("Alex", BIG_TURN), ("Bob", "Wow.")], HOW)),
    "50 MB text": (
        write_huge_text, accept([("Alex", HUGE), ("Bob", "Long.")], HOW)),
    "50 MB speaker name with a number for text": (  # the error quotes only the start of the name
        write_huge_speaker, reject("record 2: speaker '0123456789", "': the text is a number, expected a string")),
    "JSON Lines line 3 over the record limit": (
        write_long_line(3), reject(f"data.json: line 3: a record of over {MAX_RECORD_MB} MiB")),
    "JSON Lines line 1 over the record limit": (  # too long to tell JSON Lines from an array: read whole, then refused
        write_long_line(1), reject(f"data.json: line 1: a record of over {MAX_RECORD_MB} MiB")),
    "5000-digit number as text": (  # int() refuses over 4300 digits
        raw_around(b'{"Alex": "Hi", "Bob": ' + b"9" * 5000 + b"}"),
        reject("record 2: speaker 'Bob': the text is a number")),

    # control characters: removed, or folded into one space where they are whitespace (see dialogues.clean_text)
    "control characters in speaker and text": (
        array(CONTROL, dict(HOW)), accept([("Alex", "ab [31mred[0m"), ("B ob", "1 2 3 x y z w v! nb sp")], HOW)),
    "raw U+2028 and NEL inside a JSON Lines string": (  # JSON allows them raw; they must not end the line
        b'{"Alex": "one\xe2\x80\xa8two\xc2\x85three", "Bob": "Yo"}\n' + lines(dict(HOW)),
        accept([("Alex", "one two three"), ("Bob", "Yo")], HOW)),
    "raw tab inside a JSON string": (
        b'[\n{"Alex": "Hi", "Bob": "Yo"},\n{"Alex": "a\tb", "Bob": "c"}\n]',
        reject("line 3, column 12", "control character")),
    "raw NUL byte on JSON Lines line 2": (
        b'{"Alex": "Hi", "Bob": "Yo"}\n{"Alex": "a\x00b", "Bob": "c"}\n',
        reject("line 2: invalid JSON at column 12", "control character")),
    "unpaired surrogate escape in a text": (  # UTF-8 can't write it
        around({"Alex": "Hi \ud800 there", "Bob": "Yo"}), reject("record 2: speaker 'Alex': the text", "surrogate")),
    "unpaired surrogate escape in a speaker": (
        around([{"speaker": "Al\udc00", "text": "Hi"}]), reject("record 2: turn 1: the speaker", "surrogate")),
    "surrogate pair escape is one character": (  # json.dumps writes \ud83d\ude00
        around({"Alex": "Hi \U0001F600"}), accept(HELLO, HOW, [("Alex", "Hi \U0001F600")])),

    # encodings
    "invalid UTF-8 on line 4": (
        BAD_UTF8, reject(f"data.json: line 4: not valid UTF-8 (byte {BAD_UTF8.index(0xE9)})")),
    "UTF-8-encoded surrogate on JSON Lines line 3": (
        lines(dict(HELLO), dict(HOW)) + b'{"Cy": "\xed\xa0\x80"}\n', reject("line 3: not valid UTF-8")),
    "file cut inside a multi-byte character": (
        b'{"Alex": "Hi", "Bob": "Yo"}\n{"Alex": "caf\xc3', reject("line 2: not valid UTF-8")),
    "byte-order mark, then invalid UTF-8 on line 3": (
        BOM_BAD_UTF8, reject(f"line 3: not valid UTF-8 (byte {BOM_BAD_UTF8.index(0xE9)})")),
    "UTF-16 file": (
        json.dumps([dict(HELLO), dict(HOW)]).encode("utf-16"), reject("line 1: not valid UTF-8 (byte 0)")),
    "byte-order mark before a pretty-printed array with CRLF line ends": (
        BOM + json.dumps([dict(HELLO), record(HOW, "sharegpt")], indent=2).replace("\n", "\r\n").encode(),
        accept(HELLO, HOW)),
    "a second byte-order mark starting JSON Lines line 3": (  # two files with marks, concatenated
        BOM + lines(dict(HELLO), dict(HOW)) + BOM + lines({"Cy": "Hey"}),
        reject("line 3: invalid JSON at column 1", "BOM")),
    "only a byte-order mark": (
        BOM, reject("data.json: the file is empty")),

    # duplicate keys: the same speaker twice in the mapping format is two turns; in a turn object it is ambiguous
    "mapping: one speaker three times with an empty turn between": (
        raw_around(b'{"Alex": "a", "Bob": " ", "Alex": "a", "Alex": "b"}'),
        accept(HELLO, HOW, [("Alex", "a"), ("Alex", "a"), ("Alex", "b")])),
    "mapping: a repeated speaker whose last text is a number": (
        raw_around(b'{"Alex": "a", "Alex": 5}'), reject("record 2: speaker 'Alex': the text is a number")),
    "turn object with two speakers": (
        raw_around(b'[{"speaker": "Alex", "speaker": "Bob", "text": "Hi"}]'),
        reject("record 2: turn 1: 'speaker' appears 2 times")),
    "message with two contents": (
        raw_around(b'{"messages": [{"role": "a", "content": "Hi"}, {"role": "b", "content": "x", "content": "y"}]}'),
        reject("record 2: turn 2: 'content' appears 2 times")),
    "turn object with an unused key twice": (
        raw_around(b'[{"speaker": "Alex", "text": "Hi", "id": 1, "id": 2}]'), accept(HELLO, HOW, [("Alex", "Hi")])),

    # empty speaker names
    "empty speaker": (
        around([{"speaker": "Alex", "text": "Hi"}, {"speaker": "", "text": "Yo"}]),
        reject("record 2: turn 2: empty speaker name")),
    "blank speaker in the mapping format": (
        around({"Alex": "Hi", "   ": "Yo"}), reject("record 2: speaker '   ': empty speaker name")),
    "role that is only a colon": (
        around({"messages": [{"role": ":", "content": "Hi"}]}), reject("record 2: turn 1: empty speaker name")),
    "speaker of control characters only": (
        around({"conversations": [{"from": "\x00\x1b\u2028", "value": "Hi"}]}),
        reject("record 2: turn 1: empty speaker name")),
    "empty speaker with empty text": (  # an empty turn is skipped before its speaker matters
        around({"": "", "Cy": "  "}), accept(HELLO, HOW)),

    # mixed formats, broken JSON Lines
    "all six record shapes in one JSON array": (
        array(*(record(d, f) for d, f in zip(SIX, FORMATS))), accept(*SIX)),
    "mixed formats in JSON Lines with CRLF and blank lines": (
        lines(record(HELLO, "bare"), record(HOW, "dialogue")).replace(b"\n", b"\r\n\r\n"), accept(HELLO, HOW)),
    "JSON Lines cut off at the end": (
        lines(dict(HELLO), dict(HOW), {"Cy": "Hey"}) + b'\n{"Alex": "unfin',
        reject("line 5: invalid JSON at column 10: Unterminated string")),
    "JSON Lines with a stray comma ending line 2": (
        lines(dict(HELLO)) + lines(dict(HOW)).replace(b"\n", b",\n") + lines({"Cy": "Hey"}),
        reject("line 2: invalid JSON", "Extra data")),
    "JSON Lines with a bare word on line 3": (
        lines(dict(HELLO), dict(HOW)) + b"hello\n", reject("line 3: invalid JSON at column 1")),
    "pretty-printed array, then a stray comma": (  # not JSON Lines: the error is on line 11, not line 1
        json.dumps([dict(HELLO), dict(HOW)], indent=2).encode() + b"\n,\n",
        reject("invalid JSON at line 11, column 1", "Extra data")),
    "trailing comma in a JSON array": (
        b'[\n{"Alex": "Hi", "Bob": "Yo"},\n{"Alex": "x", "Bob": "y"},\n]', reject("invalid JSON at line 4, column 1")),
    "turn without its text": (
        around([{"speaker": "Alex", "text": "Hi"}, {"speaker": "Bob"}]),
        reject("record 2: turn 2 is an object without 'text'; expected")),
}

GENERATED = generated()
CASES = {**GENERATED, **HAND}
assert not GENERATED.keys() & HAND.keys()


# ---------------------------------------------------------------------------------------------------------------------
# running them

EARLIER = [[("Eve", "An earlier run.")], [("Fay", "Its files must survive.")]]


def snapshot(d):
    """Every file in d, hidden ones included, as name -> sha256 (the 50 MB files make bytes costly to keep)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}


def run_case(d, content, earlier):
    """data.json in a fresh directory d beside the files of an earlier good run, then prepare_data.py on it."""
    d.mkdir()
    for name, data in earlier.items():
        (d / name).write_bytes(data)
    content(d / "data.json") if callable(content) else (d / "data.json").write_bytes(content)
    before = snapshot(d)
    result = run("prepare_data.py", "--data_file=data.json", cwd=d, process=True)
    return types.SimpleNamespace(dir=d, result=result, before=before, after=snapshot(d))


@pytest.fixture(scope="module")
def results(request):
    # only the cases this session selected (-k), all at once: most of a run is starting the scripts
    selected = {i.callspec.params.get("case") for i in request.session.items
                if getattr(i, "module", None) is request.module and hasattr(i, "callspec")}
    names = [n for n in CASES if n in selected]
    with tempfile.TemporaryDirectory() as top:  # removed at the end, 50 MB files and all
        top = Path(top)
        (top / "earlier").mkdir()
        (top / "earlier" / "data.json").write_bytes(array(*map(dict, EARLIER)))
        assert run("prepare_data.py", "--data_file=data.json", cwd=top / "earlier", process=True).returncode == 0
        earlier = {n: (top / "earlier" / n).read_bytes() for n in OUTPUTS}
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            done = dict(zip(names, pool.map(lambda i, n: run_case(top / str(i), CASES[n][0], earlier),
                                            range(len(names)), names)))
        yield done


# ---------------------------------------------------------------------------------------------------------------------
# the checks

ACCEPTED = [n for n, (_, (outcome, _)) in CASES.items() if outcome == "accept"]
REJECTED = [n for n, (_, (outcome, _)) in CASES.items() if outcome == "reject"]


def test_every_case_is_a_different_file():
    contents = [c for c, _ in CASES.values() if not callable(c)]
    assert len(set(contents)) == len(contents)
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", ACCEPTED)
def test_accepted(results, case):
    r = results[case]
    assert r.result.returncode == 0, r.result.stderr[:2000]
    # nothing but progress: a file that takes over a second (50 MB, a loaded machine) shows it, and no timing decides
    assert all(re.fullmatch(r"prepare: \d+% .*", line) for line in r.result.stderr.splitlines()), r.result.stderr
    assert set(r.after) == {"data.json", *OUTPUTS}  # no temp files
    assert r.after["data.json"] == r.before["data.json"]
    train, val = (read_dialogues(r.dir / n) for n in sorted(OUTPUTS))
    assert train and val
    assert sorted(map(list, train + val)) == CASES[case][1][1]


@pytest.mark.parametrize("case", REJECTED)
def test_rejected(results, case):
    r = results[case]
    out, err = r.result.stdout, r.result.stderr
    assert "Traceback" not in out + err, err[-3000:]
    assert r.result.returncode == 2, err[:2000]
    assert out == ""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err[:2000]
    line = err.rstrip("\n")
    assert line.startswith("error: data.json: ") and len(line) < 500, line[:2000]  # names the file; readable
    for fragment in CASES[case][1][1]:
        assert fragment in line
    assert r.after == r.before  # the earlier run's files byte for byte; nothing new


# ---------------------------------------------------------------------------------------------------------------------
# a slow machine

class SlowClock:
    """time for cli's progress lines on a machine so slow that each look at the clock finds 10 s gone: every bar's
    quiet start (delay=1) is over by its first update."""

    def __init__(self):
        self.now = 1e9

    def time(self):
        self.now += 10
        return self.now


def write_rows(path):
    """A Parquet file of ten rows, each refused (a column has one type): the bar counts rows, a tenth each."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"Alex": f"Hi {i}", "Bob": float(i)} for i in range(10)]), path)


# a refused record that is most of the file, or a good part of it: reading it would take the bar past a tenth
SLOW = {**{case: ("data.json", CASES[case][0], CASES[case][1][1]) for case in [
            "JSON Lines line 1 over the record limit", "JSON Lines line 3 over the record limit",
            "50 MB speaker name with a number for text", "100000 nested objects on JSON Lines line 3"]},
        "JSON Lines, valid JSON refused on line 1": (  # 45% of the file
            "data.json", lines({"Alex": "x" * 200, "Bob": 5}, *[{"Alex": f"Hi {i}", "Bob": "Yo"} for i in range(9)]),
            ["data.json: line 1: speaker 'Bob': the text is a number"]),
        "Parquet row 1 of 10": (
            "data.parquet", write_rows, ["data.parquet: row 1: speaker 'Bob': the text is a number"])}


@pytest.mark.parametrize("slow", SLOW)  # not "case": the results fixture would run those cases too
def test_a_slow_machine_prints_the_one_line_too(slow, tmp_path, monkeypatch):
    name, content, fragments = SLOW[slow]
    content(tmp_path / name) if callable(content) else (tmp_path / name).write_bytes(content)
    monkeypatch.setattr(cli, "time", SlowClock())
    p = run("prepare_data.py", f"--data_file={name}", cwd=tmp_path)
    line = one_error_line(p)
    assert all(fragment in line for fragment in fragments), line


@pytest.mark.parametrize("content", [lines(dict(HELLO), dict(HOW), {"Cy": "Hey"}), array(dict(HELLO), dict(HOW))],
                         ids=["JSON Lines", "array"])
def test_a_slow_machine_still_shows_progress(content, tmp_path, monkeypatch):
    """The bar's quiet start has passed: a good file's progress is shown, up to 100%."""
    (tmp_path / "data.json").write_bytes(content)
    monkeypatch.setattr(cli, "time", SlowClock())
    p = run("prepare_data.py", "--data_file=data.json", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("read "), p.stderr
    shown = p.stderr.splitlines()
    assert shown and all(s.startswith("prepare: ") for s in shown) and shown[-1].startswith("prepare: 100% "), shown
