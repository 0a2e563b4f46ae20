"""prepare_data.py end to end, as a user runs it: every input format, the text files it writes, the split, the summary
line, bad input, streaming (byte for byte the files it wrote before it streamed, in memory set by the longest record),
the shipped dataset, settings on the command line. Parquet, dataset directories and Hub ids are in
test_prepare_data_datasets.py, the malformed files in test_prepare_data_bad_input.py.

Run: .venv/bin/python -m pytest -q tests/test_prepare_data.py
"""

import hashlib
import json
import os
import re
import stat

import pytest

import cli
import launch
from conftest import ROOT, one_error_line, run, script_env
from dialogues import read_dialogues, split_key

SHIPPED = os.path.join(ROOT, "llm_train_text.json")


def shipped():
    """The dataset the repository ships. Missing, the tests on it fail (never skip): a skip passes unnoticed."""
    assert os.path.isfile(SHIPPED), f"{SHIPPED} is missing: it is part of the repository (git checkout it)"
    return SHIPPED


HELLO = [("Alex", "Hi!"), ("Bob", "Hello.")]
HOW = [("Alex", "How are you?"), ("Bob", "Fine, thanks.")]


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def record(turns, fmt):
    """One dialogue in one of the input formats."""
    if fmt == "mapping":
        return dict(turns)  # callers keep speakers unique per dialogue
    if fmt == "bare":
        return [{"speaker": s, "text": t} for s, t in turns]
    if fmt in ("turns", "dialogue"):
        return {fmt: [{"speaker": s, "text": t} for s, t in turns]}
    if fmt == "messages":
        return {"messages": [{"role": s, "content": t} for s, t in turns]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": s, "value": t} for s, t in turns]}
    raise ValueError(fmt)


def write_array(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def synthetic(n, start=0):
    """n distinct dialogues; every turn text is unique, so a turn tells which dialogue it came from."""
    return [[("Alex", f"Question number {i}?"), ("Bob", f"Answer number {i}."), ("Alex", f"Thanks for {i}.")]
            for i in range(start, start + n)]


def prepare(tmp_path, data_file, *args):
    """prepare_data.py on data_file, a process, from tmp_path."""
    return run("prepare_data.py", f"--data_file={data_file}", *args, cwd=tmp_path, process=True)


def outputs(tmp_path):
    """(train, val) dialogues as lists of (speaker, text) tuples."""
    return (read_dialogues(tmp_path / "train_data.txt"), read_dialogues(tmp_path / "val_data.txt"))


def as_set(dialogues):
    return {tuple(d) for d in dialogues}


def everything(tmp_path):
    """Every file in the directory, hidden ones included, with its bytes."""
    return {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def summary(result):
    n = r"(\d{1,3}(?:,\d{3})*)"  # a count as the summary writes it, thousands separated: 3,000
    m = re.search(rf"read {n} dialogues .*kept {n}, dropped {n} \({n} empty, {n} duplicate"
                  rf"(?:, {n} left out by weight)?\); train {n} / val {n} dialogues", result.stdout)
    assert m, result.stdout
    counts = [int(g.replace(",", "")) for g in m.groups()[:5] + m.groups()[6:]]
    return dict(zip(["read", "kept", "dropped", "empty", "duplicate", "train", "val"], counts))


# ---------------------------------------------------------------------------------------------------------------------
# input formats

FORMATS = ["mapping", "bare", "turns", "dialogue", "messages", "sharegpt"]


@pytest.mark.parametrize("writer", [write_array, write_jsonl], ids=["array", "jsonl"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_turns(tmp_path, fmt, writer):
    data = writer(tmp_path / "data.json", [record(HELLO, fmt), record(HOW, fmt)])
    ok(prepare(tmp_path, data))
    train, val = outputs(tmp_path)
    assert sorted(train + val) == sorted([HELLO, HOW])


def test_formats_can_be_mixed_in_one_file(tmp_path):
    dialogues = [[("Alex", f"Hi {i}"), ("Bob", f"Yo {i}")] for i in range(len(FORMATS))]
    data = write_jsonl(tmp_path / "data.jsonl", [record(d, f) for d, f in zip(dialogues, FORMATS)])
    ok(prepare(tmp_path, data))
    train, val = outputs(tmp_path)
    assert sorted(train + val) == sorted(dialogues)


# SFT records: each (record, the dialogue it becomes), its turns spoken by the chat roles. One format per file, as a
# Parquet table has one schema (test_prepare_data_datasets.py reads them as Parquet).
SYS = [{"role": "system", "content": "Be brief."}]
SFT = {
    "alpaca": ([{"instruction": "Say hi", "input": "", "output": "hi"},
                {"instruction": "Translate to English.", "input": "Bonjour", "output": "Hello"}],
               [[("user", "Say hi"), ("assistant", "hi")],
                [("user", "Translate to English. Bonjour"), ("assistant", "Hello")]]),
    "alpaca with system and history": (
        [{"system": "Be brief.", "instruction": "And 3+3?", "input": "", "output": "6",
          "history": [["2+2?", "4"], ["And 3+2?", "5"]]},
         {"system": "", "instruction": "Name a color.", "input": "", "output": "Red", "history": []}],
        [[("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "And 3+2?"), ("assistant", "5"),
          ("user", "And 3+3?"), ("assistant", "6")], [("user", "Name a color."), ("assistant", "Red")]]),
    "dolly": ([{"instruction": "Who wrote it?", "context": "Hamlet is a play.", "response": "Shakespeare.",
                "category": "closed_qa"},
               {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "brainstorming"}],
              [[("user", "Who wrote it? Hamlet is a play."), ("assistant", "Shakespeare.")],
               [("user", "Name a fruit."), ("assistant", "Apple.")]]),
    "prompt/completion strings": ([{"prompt": "The sky is", "completion": " blue."},
                                   {"prompt": "Grass is", "completion": " green."}],
                                  [[("user", "The sky is"), ("assistant", "blue.")],
                                   [("user", "Grass is"), ("assistant", "green.")]]),
    "prompt/completion messages": (
        [{"prompt": SYS + [{"role": "user", "content": "Hi?"}],
          "completion": [{"role": "assistant", "content": "Hello."}]},
         {"prompt": SYS + [{"role": "user", "content": "Bye?"}],
          "completion": [{"role": "assistant", "content": "Bye."}]}],
        [[("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello.")],
         [("system", "Be brief."), ("user", "Bye?"), ("assistant", "Bye.")]]),
}
# preference pairs, read with --use_chosen=True: the prompt and the chosen reply, never the rejected one
CHOSEN = {
    "explicit prompt": ([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
                         {"prompt": "Bye", "chosen": "See you!", "rejected": "Finally."}],
                        [[("user", "Hi"), ("assistant", "Hello!")], [("user", "Bye"), ("assistant", "See you!")]]),
    "implicit prompt": ([{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                          "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}]},
                         {"chosen": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao!"}],
                          "rejected": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ugh."}]}],
                        [[("user", "Hi"), ("assistant", "Hello!")], [("user", "Bye"), ("assistant", "Ciao!")]]),
}


@pytest.mark.parametrize("writer", [write_array, write_jsonl], ids=["array", "jsonl"])
@pytest.mark.parametrize("fmt", SFT)
def test_sft_records_become_dialogues_of_roles(tmp_path, fmt, writer):
    records, expected = SFT[fmt]
    result = ok(prepare(tmp_path, writer(tmp_path / "data.json", records)))
    train, val = outputs(tmp_path)
    assert sorted(train + val) == sorted(expected)
    kind = "instruction" if "completion" not in fmt else "prompt/completion"
    assert f"formats: {kind} 2;" in result.stdout
    assert "the replies are the 'assistant' turns: train.py --train_speakers='[\"assistant\"]'" in result.stdout


@pytest.mark.parametrize("writer", [write_array, write_jsonl], ids=["array", "jsonl"])
@pytest.mark.parametrize("case", CHOSEN)
def test_preference_records_are_their_chosen_dialogue_when_asked(tmp_path, case, writer):
    records, expected = CHOSEN[case]
    data = writer(tmp_path / "data.json", records)
    refused = prepare(tmp_path, data)
    assert "a preference record" in one_error_line(refused)
    assert sorted(os.listdir(tmp_path)) == ["data.json"]
    result = ok(prepare(tmp_path, data, "--use_chosen=True"))
    train, val = outputs(tmp_path)
    assert sorted(train + val) == sorted(expected)
    assert "formats: preference 2;" in result.stdout


def test_the_summary_names_the_formats_and_the_speakers(tmp_path):
    records = ([record(d, "messages") for d in synthetic(3)] + [dict(d) for d in synthetic(2, start=3)]
               + SFT["alpaca"][0])
    result = ok(prepare(tmp_path, write_jsonl(tmp_path / "data.jsonl", records)))
    found = result.stdout.strip().splitlines()[-1]
    # the most frequent first (a tie in the order found): Alex speaks twice in a message list, once in a mapping
    assert found.startswith("formats: messages 3, mapping 2, instruction 2; speakers (turns): Alex 8, Bob 5, "
                            "user 2, assistant 2"), found
    assert "--train_speakers" not in found  # mixed with dialogues, training the assistant alone is no advice
    mapping_only = ok(prepare(tmp_path, write_jsonl(tmp_path / "data.jsonl", [dict(d) for d in synthetic(4)])))
    assert mapping_only.stdout.strip().splitlines()[-1] == "formats: mapping 4; speakers (turns): Alex 4, Bob 4"


def test_a_json_lines_file_of_one_record_is_read(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [record(synthetic(1)[0] + HELLO + HOW, "messages")])
    line = one_error_line(prepare(tmp_path, data))
    assert "1 usable dialogue(s) of 1 records" in line  # the record was read: one dialogue is too few to split


# ---------------------------------------------------------------------------------------------------------------------
# several sources

def test_sources_are_mixed_each_in_its_own_format(tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [record(d, "sharegpt") for d in synthetic(40)])
    alpaca = write_array(tmp_path / "alpaca.json", [{"instruction": f"Say {i}", "input": "", "output": f"{i}!"}
                                                    for i in range(40)])
    result = ok(prepare(tmp_path, f'["{chats}", "{alpaca}"]'))
    train, val = outputs(tmp_path)
    assert len(train) + len(val) == 80
    alone = {}
    for name in ("chats", "alpaca"):  # each dialogue on the side it takes alone: the split is per dialogue
        d = tmp_path / name
        d.mkdir()
        ok(prepare(d, tmp_path / f"{name}{'.jsonl' if name == 'chats' else '.json'}"))
        alone[name] = outputs(d)
    assert as_set(train) == as_set(alone["chats"][0] + alone["alpaca"][0])
    assert as_set(val) == as_set(alone["chats"][1] + alone["alpaca"][1])
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"  {chats}: read 40, kept 40 (0 empty, 0 duplicate); train ")
    assert lines[1].startswith(f"  {alpaca}: read 40, kept 40 (0 empty, 0 duplicate); train ")
    assert summary(result)["kept"] == 80 and "from 2 sources" in lines[2]
    assert lines[3].startswith("formats: conversations 40, instruction 40;")


def test_a_weight_takes_a_share_or_copies_and_dialogues_the_first(tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [record(d, "messages") for d in synthetic(200)])
    more = write_jsonl(tmp_path / "more.jsonl", [record(d, "messages") for d in synthetic(100, start=500)])
    half = ok(prepare(tmp_path, f'[{{"path": "{chats}", "weight": 0.5}}]'))
    n = summary(half)
    assert 70 <= n["kept"] <= 130  # a hash picks about half
    assert n["dropped"] == 200 - n["kept"] and n["empty"] == n["duplicate"] == 0  # the rest left out by weight
    kept = as_set(sum(outputs(tmp_path), []))
    assert kept < as_set(synthetic(200)) and "left out by weight" in half.stdout
    again = ok(prepare(tmp_path, f'[{{"path": "{chats}", "weight": 0.5}}, "{more}"]'))
    assert as_set(sum(outputs(tmp_path), [])) == kept | as_set(synthetic(100, start=500))  # the same half
    twice = ok(prepare(tmp_path, f'[{{"path": "{more}", "weight": 2}}, {{"path": "{chats}", "dialogues": 30}}]'))
    train, val = outputs(tmp_path)
    more_train = [d for d in train if d in synthetic(100, start=500)]
    assert len(more_train) == 2 * len(as_set(more_train))  # each twice in the train file
    assert len(val) == len(as_set(val))  # once in the validation file
    assert as_set(d for d in train + val if d in synthetic(200)) == as_set(synthetic(30))  # the first 30
    assert f"  {more}: read 100, kept 100" in twice.stdout and "more copies" in twice.stdout
    assert f"  {chats}: read 30, kept 30" in twice.stdout  # the rest is never read


@pytest.mark.parametrize("value, fragment", [
    ("[]", "DATA_FILE is an empty list"),
    ('["a.json", 5]', "DATA_FILE entry 2: 5: expected a path or Hub id"),
    ('[{"path": "a.json", "weight": 0}]', "DATA_FILE entry 1: 'weight' must be a number above 0"),
    ('[{"path": "a.json", "weight": 2, "dialogues": 5}]', "DATA_FILE entry 1: give 'weight' or 'dialogues', not both"),
    ('[{"path": "a.json", "dialogues": 0.5}]', "DATA_FILE entry 1: 'dialogues' must be a whole number above 0"),
    ('[{"path": "a.json", "wieght": 2}]', "DATA_FILE entry 1: unknown key 'wieght'"),
    ('["a.json", "a.json"]', "DATA_FILE names a.json twice"),
    ('["a.json", "missing.json"]', "missing.json: no such file"),
])
def test_bad_sources_are_one_line(tmp_path, value, fragment):
    write_jsonl(tmp_path / "a.json", [dict(d) for d in synthetic(5)])
    line = one_error_line(prepare(tmp_path, value))
    assert fragment in line
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_speakers_trimmed_colons_removed_and_whitespace_collapsed(tmp_path):
    data = write_array(tmp_path / "data.json", [
        {"  Alex:  ": "Hi\nthere,\t\tfriend  ", "Bob:": "  Hello\r\n\n  again. "},
        [{"speaker": " Dr Who ", "text": "tab\tand\nnewline"}, {"speaker": "Bob", "text": "x"}],
    ])
    ok(prepare(tmp_path, data))
    train, val = outputs(tmp_path)
    assert sorted(train + val) == sorted([
        [("Alex", "Hi there, friend"), ("Bob", "Hello again.")],
        [("Dr Who", "tab and newline"), ("Bob", "x")],
    ])


@pytest.mark.parametrize("separator", [", ", "\n"], ids=["array", "jsonl"])
def test_a_speaker_repeated_in_the_mapping_format_keeps_every_turn(tmp_path, separator):
    raw = '{"Alex": "a", "Bob": "b", "Alex": "c"}' + separator + '{"Alex": "d", "Bob": "e"}'
    data = tmp_path / "data.json"
    data.write_text(f"[{raw}]" if separator == ", " else raw + "\n", encoding="utf-8")
    ok(prepare(tmp_path, data))
    train, val = outputs(tmp_path)
    assert sorted(train + val) == sorted([[("Alex", "a"), ("Bob", "b"), ("Alex", "c")], [("Alex", "d"), ("Bob", "e")]])


def test_byte_order_mark_is_accepted(tmp_path):
    data = tmp_path / "data.json"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps([record(HELLO, "mapping"), record(HOW, "bare")]).encode())
    ok(prepare(tmp_path, data))
    train, val = outputs(tmp_path)
    assert sorted(train + val) == sorted([HELLO, HOW])


def test_byte_order_mark_is_accepted_in_json_lines(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + f"{json.dumps(dict(HELLO))}\n{json.dumps(dict(HOW))}\n".encode())
    ok(prepare(tmp_path, data))
    train, val = outputs(tmp_path)
    assert sorted(train + val) == sorted([HELLO, HOW])


# ---------------------------------------------------------------------------------------------------------------------
# the text format

def test_output_files_are_speaker_lines_with_one_blank_line_between_dialogues(tmp_path):
    data = write_array(tmp_path / "data.json", [dict(HELLO), dict(HOW), {"Cy": "One: two", "Dee": "ünïcödé ✓"}])
    ok(prepare(tmp_path, data))
    expected = {"Alex: Hi!\nBob: Hello.\n", "Alex: How are you?\nBob: Fine, thanks.\n", "Cy: One: two\nDee: ünïcödé ✓\n"}
    written = []
    for name in ("train_data.txt", "val_data.txt"):
        text = (tmp_path / name).read_bytes().decode("utf-8")
        assert text and "\r" not in text and not text.startswith("\n") and not text.endswith("\n\n")
        assert "\n\n\n" not in text
        written += [d if d.endswith("\n") else d + "\n" for d in text.split("\n\n")]
    assert sorted(written) == sorted(expected)


# ---------------------------------------------------------------------------------------------------------------------
# the split

def test_val_share_is_close_to_val_fraction(tmp_path):
    data = write_array(tmp_path / "data.json", [record(d, "bare") for d in synthetic(500)])
    s = summary(ok(prepare(tmp_path, data, "--val_fraction=0.2")))
    train, val = outputs(tmp_path)
    assert (len(train), len(val)) == (s["train"], s["val"])
    assert len(train) + len(val) == 500
    assert 0.15 <= len(val) / 500 <= 0.25


def test_split_is_by_whole_dialogue(tmp_path):
    dialogues = synthetic(500)
    data = write_array(tmp_path / "data.json", [record(d, "messages") for d in dialogues])
    ok(prepare(tmp_path, data))
    train, val = outputs(tmp_path)
    assert as_set(train) | as_set(val) == as_set(dialogues)
    assert not {t for d in train for t in d} & {t for d in val for t in d}


def test_same_input_and_seed_give_identical_files(tmp_path):
    data = write_array(tmp_path / "data.json", [record(d, "bare") for d in synthetic(200)])
    ok(prepare(tmp_path, data))
    first = everything(tmp_path)
    ok(prepare(tmp_path, data))
    assert everything(tmp_path) == first


def test_a_different_seed_gives_a_different_split(tmp_path):
    data = write_array(tmp_path / "data.json", [record(d, "bare") for d in synthetic(200)])
    ok(prepare(tmp_path, data, "--seed=1"))
    val_1 = as_set(outputs(tmp_path)[1])
    ok(prepare(tmp_path, data, "--seed=2"))
    assert as_set(outputs(tmp_path)[1]) != val_1


def test_appending_dialogues_moves_none_across(tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [record(d, "sharegpt") for d in synthetic(500)])
    ok(prepare(tmp_path, data))
    train_before, val_before = map(as_set, outputs(tmp_path))
    write_jsonl(data, [record(d, "sharegpt") for d in synthetic(500) + synthetic(100, start=500)])
    s = summary(ok(prepare(tmp_path, data)))
    train_after, val_after = map(as_set, outputs(tmp_path))
    assert s["kept"] == 600
    assert train_before <= train_after
    assert val_before <= val_after


def test_exact_duplicates_are_dropped(tmp_path):
    dialogues = synthetic(50)
    # the same dialogue in another format, or with other whitespace, is still a duplicate once cleaned
    extra = [record(dialogues[0], "bare"), record(dialogues[1], "messages"), {"Alex": "  Question\nnumber 2? "}]
    dialogues.append([("Alex", "Question number 2?")])
    data = write_array(tmp_path / "data.json", [record(d, "bare") for d in dialogues] + extra)
    s = summary(ok(prepare(tmp_path, data)))
    assert (s["read"], s["kept"], s["dropped"], s["duplicate"]) == (54, 51, 3, 3)
    train, val = outputs(tmp_path)
    assert len(train) + len(val) == len(as_set(train + val)) == 51
    assert not as_set(train) & as_set(val)


def test_empty_turns_are_skipped_and_empty_dialogues_dropped(tmp_path):
    data = write_array(tmp_path / "data.json", [
        [{"speaker": "Alex", "text": "Hi!"}, {"speaker": "Cy", "text": ""}, {"speaker": "Bob", "text": "Hello."}],
        {"Alex": "How are you?", "Cy": " \n\t ", "Bob": "Fine, thanks."},
        {"Alex": "", "Bob": "   "},
        {"messages": [{"role": "user", "content": "\n"}]},
        [],
    ])
    s = summary(ok(prepare(tmp_path, data)))
    assert (s["read"], s["kept"], s["dropped"], s["empty"], s["duplicate"]) == (5, 2, 3, 3, 0)
    train, val = outputs(tmp_path)
    assert sorted(train + val) == sorted([HELLO, HOW])


# ---------------------------------------------------------------------------------------------------------------------
# the summary line

def test_summary_line_reports_counts(tmp_path):
    data = write_array(tmp_path / "data.json", [dict(HELLO), dict(HOW), dict(HELLO), {"Alex": " "}, {"Cy": "Yo"}])
    result = ok(prepare(tmp_path, data))
    assert len(result.stdout.strip().splitlines()) == 2  # the counts, then what was read
    s = summary(result)
    assert s == {"read": 5, "kept": 3, "dropped": 2, "empty": 1, "duplicate": 1,
                 "train": s["train"], "val": 3 - s["train"]}
    train, val = outputs(tmp_path)
    assert (len(train), len(val)) == (s["train"], s["val"])
    assert s["train"] >= 1 and s["val"] >= 1


def test_a_good_run_leaves_only_the_two_output_files(tmp_path):
    data = write_array(tmp_path / "data.json", [dict(HELLO), dict(HOW)])
    ok(prepare(tmp_path, data))
    assert sorted(os.listdir(tmp_path)) == ["data.json", "train_data.txt", "val_data.txt"]


def test_outputs_get_the_usual_permissions_and_keep_changed_ones(tmp_path):
    # written through a private temp file, the outputs must still end up like any file written here
    data = write_array(tmp_path / "data.json", [dict(HELLO), dict(HOW)])
    ok(prepare(tmp_path, data))
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)
    assert mode("train_data.txt") == mode("val_data.txt") == 0o666 & ~cli.umask()
    os.chmod(tmp_path / "val_data.txt", 0o640)
    ok(prepare(tmp_path, data))
    assert mode("val_data.txt") == 0o640  # a file the user made private stays private


# ---------------------------------------------------------------------------------------------------------------------
# bad input

TWO_GOOD = json.dumps([dict(HELLO), dict(HOW)])

BAD = {
    "missing file": (None, ["no such file"]),
    "invalid json": (b'[{"Alex": "Hi"},\n {"Bob": }]', ["line 2", "column"]),
    "broken second json line": (b'{"Alex": "Hi", "Bob": "Yo"}\n{"Alex": "oops"\n{"Alex": "x", "Bob": "y"}\n',
                                ["line 2"]),
    "top level object": (b'{"Alex": "Hi", "Bob": "Yo"}', ["1 usable dialogue(s) of 1 records"]),  # JSON Lines
    "top level number": (b"42", ["top level", "number"]),
    "record is a number": (b'[{"Alex": "Hi"}, 7, {"Bob": "Yo"}]', ["record 2", "number", "expected", "speaker"]),
    "record of no known format": (b'[{"Alex": "Hi"}, {"x": 1}, {"Bob": "Yo"}]', ["record 2", "expected", "messages"]),
    "text is a number": (b'[{"Alex": "Hi", "Bob": 5}, {"Alex": "x", "Bob": "y"}]', ["record 1", "text", "string"]),
    "text is null": (b'[{"Alex": "x", "Bob": "y"}, [{"speaker": "Alex", "text": null}]]',
                     ["record 2", "text", "null", "string"]),
    "content is a number": (b'[{"messages": [{"role": "user", "content": 1}]}, {"A": "x"}, {"B": "y"}]',
                            ["record 1", "text", "string"]),
    "one usable dialogue": (b'[{"Alex": "Hi", "Bob": "Yo"}, {"Alex": "  "}, {"Alex": "Hi", "Bob": "Yo"}]',
                            ["at least 2"]),
    "invalid utf-8": (b'[{"Alex": "caf\xe9"},\n{"Bob": "Yo"}]', ["UTF-8", "line 1"]),
    "empty file": (b"  \n", ["empty"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_changes_nothing(tmp_path, case):
    content, fragments = BAD[case]
    (tmp_path / "good.json").write_text(TWO_GOOD, encoding="utf-8")
    ok(prepare(tmp_path, "good.json"))
    if content is not None:
        (tmp_path / "bad.json").write_bytes(content)
    before = everything(tmp_path)
    assert "train_data.txt" in before and "val_data.txt" in before

    result = prepare(tmp_path, "bad.json")

    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert everything(tmp_path) == before


def test_a_missing_file_is_named_by_its_full_path(tmp_path):
    # a relative path is the usual surprise (the script was run from elsewhere): the error says where it looked
    here = os.path.realpath(tmp_path)
    result = prepare(tmp_path, "nope.json")
    assert result.returncode == 2
    assert result.stderr == (f"error: {os.path.join(here, 'nope.json')}: no such file (paths are relative to the "
                             f"current directory, {here}; set DATA_FILE or pass --data_file=PATH)\n")
    gone = os.path.join(here, "gone", "x.json")
    result = prepare(tmp_path, gone)
    assert result.stderr == f"error: {gone}: no such file (set DATA_FILE or pass --data_file=PATH)\n"


def test_bad_input_with_no_earlier_run_creates_no_files(tmp_path):
    (tmp_path / "bad.json").write_bytes(b"[1, 2]")
    result = prepare(tmp_path, "bad.json")
    assert result.returncode == 2
    assert os.listdir(tmp_path) == ["bad.json"]


# ---------------------------------------------------------------------------------------------------------------------
# streaming: the same files as before it streamed

def corpus(n):
    """n generated records, the same on every run: five formats, a third speaker now and then, unicode, and every tenth
    one a duplicate of an earlier dialogue (in another format, with other whitespace) or empty."""
    def turns(i):
        speakers = ["Alex", "Bob", "Zoë"][:2 + (i % 3 == 0)]
        said = lambda j: f"Turn {j} of dialogue {i}: {'ü✓ ' * (i % 4)}ok"
        return [(speakers[j % len(speakers)], said(j)) for j in range(2 + i % 7)]

    records = []
    for i in range(n):
        dialogue = turns(i)
        if i % 10 == 3:  # an empty dialogue, or an earlier one again
            dialogue = [(s, f"  {t.replace(' ', chr(10))} ") for s, t in turns(i // 2)] if i % 20 == 3 else []
        fmt = FORMATS[1 + i % (len(FORMATS) - 1)]  # not the mapping format: a speaker repeats within a dialogue
        records.append(record(dialogue, fmt))
    return records


# sha256 (first 16 hex digits) of train_data.txt and val_data.txt as prepare_data.py wrote them before it streamed
# (commit 341f248, which read the whole file, kept every dialogue, split the list and wrote it at the end); streaming
# must not move a byte.
BEFORE_STREAMING = {
    "shipped": ("4e811cbe662e1dc1", "eab37b16356f3125"),
    "corpus": ("d57a7281bdb56068", "91e3975cb5b9e8db"),
    "corpus --val_fraction=0.05 --seed=7": ("b0b051f4d249d426", "2779a547b2c7bb18"),
    "all train": ("e03d6a527ede4334", "a0d23a51329ed48c"),
    "all val": ("9ceedf4b0cfd797c", "9c5dc1215b6b3974"),
}


def digests(tmp_path):
    return tuple(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()[:16]
                 for name in ("train_data.txt", "val_data.txt"))


def test_shipped_dataset_gives_the_same_files_as_before_streaming(tmp_path):
    ok(prepare(tmp_path, shipped()))
    assert digests(tmp_path) == BEFORE_STREAMING["shipped"]


@pytest.mark.parametrize("writer", [write_array, write_jsonl], ids=["array", "jsonl"])
@pytest.mark.parametrize("args", [(), ("--val_fraction=0.05", "--seed=7")], ids=["default", "small-val"])
def test_generated_corpus_gives_the_same_files_as_before_streaming(tmp_path, writer, args):
    data = writer(tmp_path / "data.json", corpus(3000))
    s = summary(ok(prepare(tmp_path, data, *args)))
    assert s["duplicate"] > 100 and s["empty"] > 0  # the corpus tests dropping as well as splitting
    assert digests(tmp_path) == BEFORE_STREAMING[" ".join(("corpus",) + args)]


def peak_mb(tmp_path, data):
    """Run prepare_data.py on data; its own peak resident memory in MB (launch.measure)."""
    result = launch.measure([os.path.join(ROOT, "prepare_data.py"), f"--data_file={data}"], str(tmp_path),
                            str(tmp_path / "prepare"), env=script_env())
    assert result["rc"] == 0 and "Traceback" not in result["stderr"], result["stderr"]
    return result["rss_mb"]


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="launch.measure needs os.wait4 (POSIX)")
def test_memory_grows_with_the_longest_record_not_the_file(tmp_path):
    # 24 MB of JSON Lines. Read whole, it took 105 MB more than a small file; streamed, what stays per dialogue is a
    # 16-byte digest (about 1 MB for these 12,000)
    write = lambda name, n: write_jsonl(tmp_path / name, [{"Alex": f"{i} " + "words " * 330, "Bob": "ok"}
                                                          for i in range(n)])
    small = peak_mb(tmp_path, write("small.jsonl", 100))
    big = peak_mb(tmp_path, write("big.jsonl", 12_000))
    assert os.path.getsize(tmp_path / "big.jsonl") > 20e6
    assert big - small < 20, (small, big)


# On a tiny file the hash can leave one side empty; then the dialogue closest to the threshold crosses over.
CROSSING = {"all train": (synthetic(3), "--seed=10"), "all val": (synthetic(3, start=100), "--seed=18")}


@pytest.mark.parametrize("case", CROSSING)
def test_a_tiny_file_crosses_over_as_before_streaming(tmp_path, case):
    dialogues, seed = CROSSING[case]
    keys = [split_key(d, int(seed.split("=")[1])) for d in dialogues]
    assert all(k < 0.5 for k in keys) if case == "all val" else all(k >= 0.5 for k in keys)  # the premise holds
    data = write_jsonl(tmp_path / "data.jsonl", [record(d, "bare") for d in dialogues])
    s = summary(ok(prepare(tmp_path, data, "--val_fraction=0.5", seed)))
    assert (s["train"], s["val"]) == ((2, 1) if case == "all train" else (1, 2))
    assert digests(tmp_path) == BEFORE_STREAMING[case]


# ---------------------------------------------------------------------------------------------------------------------
# the shipped dataset

def test_shipped_dataset_prepares_cleanly(tmp_path):
    result = ok(prepare(tmp_path, shipped()))
    s = summary(result)
    assert s["read"] >= 200
    assert os.path.getsize(tmp_path / "train_data.txt") > 0 and os.path.getsize(tmp_path / "val_data.txt") > 0
    train, val = outputs(tmp_path)
    assert len(train) + len(val) == s["kept"]
    assert 0.15 <= len(val) / s["kept"] <= 0.25


# ---------------------------------------------------------------------------------------------------------------------
# --name=value settings on the command line

def test_overrides_through_the_script(tmp_path):
    data = write_array(tmp_path / "data.json", [record(d, "bare") for d in synthetic(200)])
    s = summary(ok(prepare(tmp_path, data, "--VAL_FRACTION=0.5", "--train_file=t.txt", "--Val_File=v.txt")))
    assert 0.4 <= s["val"] / 200 <= 0.6
    assert len(read_dialogues(tmp_path / "v.txt")) == s["val"]
    assert not (tmp_path / "train_data.txt").exists()


@pytest.mark.parametrize("arg, fragment", [
    ("--val_fractoin=0.1", "--val_fraction"),
    ("--seed=1.5", "int like"),
    ("--val_fraction=abc", "float like"),
    ("--val_fraction", "--val_fraction needs a value: --val_fraction=VALUE or --val_fraction VALUE"),
    ("--val_fraction=1.5", "between 0 and 1"),
])
def test_bad_overrides_through_the_script(tmp_path, arg, fragment):
    (tmp_path / "good.json").write_text(TWO_GOOD, encoding="utf-8")
    ok(prepare(tmp_path, "good.json"))
    before = everything(tmp_path)
    result = prepare(tmp_path, "good.json", arg)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stdout
    assert everything(tmp_path) == before
