"""Tests for dialogues.py: the "Speaker: text" format written and read back, the records read from a Parquet file (the
progress bar counts its rows), and which kind of source a DATA_FILE names. What prepare_data.py makes of every record
format is tested end to end, in test_prepare_data*.py.

Run: .venv/bin/python -m pytest -q tests/test_dialogues.py
"""

import pytest

import cli
from dialogues import format_dialogue, read_dialogues, read_records, source, write_dialogue
from test_prepare_data import HELLO, record, synthetic
from test_prepare_data_datasets import mixed, write_parquet


# ---------------------------------------------------------------------------------------------------------------------
# the text format

def test_format_dialogue_writes_one_line_per_turn():
    assert format_dialogue([("Alex", "Hi!"), ("Bob", "a: b")]) == "Alex: Hi!\nBob: a: b\n"


def test_write_and_read_dialogues_round_trip(tmp_path):
    dialogues = [
        [("Alex", "Note: this has ': ' inside: twice"), ("Zoë", "héllo 🌍 — 日本語")],
        [("Bob", "x")],
        [("Dr Who", "time: and space"), ("Alex", "ok"), ("Dr Who", "bye")],
    ]
    path = tmp_path / "out.txt"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, turns in enumerate(dialogues):
            write_dialogue(f, turns, first=i == 0)
    assert path.read_text(encoding="utf-8") == ("Alex: Note: this has ': ' inside: twice\nZoë: héllo 🌍 — 日本語\n"
                                                "\nBob: x\n"
                                                "\nDr Who: time: and space\nAlex: ok\nDr Who: bye\n")
    assert read_dialogues(path) == dialogues


def test_read_dialogues_rejects_a_line_without_a_speaker(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("Alex: hi\njust text\n", encoding="utf-8")
    with pytest.raises(cli.UserError, match="line 2"):
        read_dialogues(path)


# ---------------------------------------------------------------------------------------------------------------------
# reading records: Parquet, and what a DATA_FILE names

def test_the_bar_counts_rows_and_knows_their_number(tmp_path):
    class Bar:
        total, n = None, 0

        def update(self, k):
            self.n += k

    data = write_parquet(tmp_path / "data.parquet", mixed(synthetic(2500)))  # more than one batch of rows
    bar = Bar()
    labels = [where for _, where in read_records(str(data), "train", bar)]
    assert bar.total == bar.n == 2500
    assert labels[0] == f"{data}: row 1" and labels[-1] == f"{data}: row 2500"


def test_what_is_a_hub_id_and_what_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data/x.parquet", [record(HELLO, "messages")])
    assert source("someone/chats") == "hub"
    assert source("HuggingFaceH4/ultrachat_200k") == "hub"
    assert source("data") == "directory"
    assert source("data/x.parquet") == "parquet"
    # missing, and not a Hub id: the first part is a local directory, or the name ends like a data file, or it is
    # no "owner/name" at all
    for missing in ["data/chats", "someone/chats.jsonl", "someone/chats.parquet", "chats", "a/b/c", "/abs/chats"]:
        assert source(missing) == "json", missing
