"""prepare_data.py end to end on Parquet files, local dataset directories in the Hub's layout and (offline) Hub ids,
and the system message it keeps. Never the network. (How dialogues.py reads them is in test_dialogues.py.)

Run: .venv/bin/python -m pytest -q tests/test_prepare_data_datasets.py
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run
from dialogues import read_dialogues
from test_prepare_data import HELLO, HOW, everything, ok, outputs, record, summary, synthetic, write_jsonl

# datasets keeps lock files under HF_HOME even when it streams: the tests' go to their own directory
ENV_HOME = "HF_HOME"


def write_parquet(path, records):
    """The records as one Parquet table. pa.array infers the type from every record, so a column or struct field some
    records lack is null in those, as in any real table mixing formats."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_struct_array(pa.array(records)), path)
    return path


def prepare(tmp_path, data_file, *args):
    """prepare_data.py on data_file, a process, from tmp_path."""
    return run("prepare_data.py", f"--data_file={data_file}", *args, cwd=tmp_path,
               env={ENV_HOME: str(tmp_path / ".hf")}, process=True)


def one_error(result):
    """The single stderr line of a refused run."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def mixed(dialogues):
    """The dialogues in turn as messages, ShareGPT and turn-list records: one table then has all three columns."""
    fmts = ["messages", "sharegpt", "turns", "dialogue"]
    return [record(d, fmts[i % len(fmts)]) for i, d in enumerate(dialogues)]


# ---------------------------------------------------------------------------------------------------------------------
# Parquet files

@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "turns", "dialogue", "mapping"])
def test_a_parquet_file_in_each_format_gives_the_same_files_as_json_lines(tmp_path, fmt):
    ok(prepare(tmp_path, write_jsonl(tmp_path / "data.jsonl", [record(HELLO, fmt), record(HOW, fmt)])))
    want = everything(tmp_path)
    ok(prepare(tmp_path, write_parquet(tmp_path / "data.parquet", [record(HELLO, fmt), record(HOW, fmt)])))
    got = everything(tmp_path)
    assert got["train_data.txt"] == want["train_data.txt"] and got["val_data.txt"] == want["val_data.txt"]
    assert set(map(tuple, sum(outputs(tmp_path), []))) == {tuple(HELLO), tuple(HOW)}


def test_the_split_from_parquet_is_the_split_from_json_lines(tmp_path):
    # formats mixed in one table (every row has every column, null where absent), and duplicates, which are dropped
    dialogues = synthetic(600)
    records = mixed(dialogues + dialogues[:50])
    ok(prepare(tmp_path, write_jsonl(tmp_path / "data.jsonl", records)))
    want = everything(tmp_path)
    s = summary(ok(prepare(tmp_path, write_parquet(tmp_path / "data.parquet", records))))
    assert s["read"] == 650 and s["duplicate"] == 50 and s["train"] > 400 and s["val"] > 80
    got = everything(tmp_path)
    assert got["train_data.txt"] == want["train_data.txt"] and got["val_data.txt"] == want["val_data.txt"]


@pytest.mark.parametrize("bad, says", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
     "turn 2 is an object without 'content'; expected {'role': ..., 'content': ...}"),
    # a turn list whose structs have both speaker/text and role/content fields: the nulls are absent, as in JSON
    ({"turns": [{"speaker": "Alex", "text": "Hi"}, {"role": "user", "content": "Hello"}]},
     "turn 2 is an object without 'speaker' and 'text'; expected {'speaker': ..., 'text': ...}"),
    ({}, "an object is not a dialogue"),
])
def test_a_bad_row_is_one_line_naming_the_file_and_row(tmp_path, bad, says):
    records = mixed(synthetic(30))
    records[16] = bad
    data = write_parquet(tmp_path / "data.parquet", records)
    before = everything(tmp_path)
    assert one_error(prepare(tmp_path, data.name)).startswith(f"error: data.parquet: row 17: {says}")
    assert everything(tmp_path) == before  # no train or val file, not even an empty one


def test_a_value_of_a_type_json_lacks_is_named(tmp_path):
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"Alex": [b"Hi", b"Yo"], "Bob": ["Hello.", "Hey."]}), data)
    assert one_error(prepare(tmp_path, data.name)) == \
        "error: data.parquet: row 1: speaker 'Alex': the text is a bytes value, expected a string"


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    (tmp_path / "data.parquet").write_text(json.dumps([dict(HELLO), dict(HOW)]))
    line = one_error(prepare(tmp_path, "data.parquet"))
    assert line.startswith("error: data.parquet: cannot read it as Parquet: ")


# ---------------------------------------------------------------------------------------------------------------------
# dataset directories in the Hub's layout

def test_a_dataset_directory_reads_its_split_from_every_shard(tmp_path):
    dialogues = synthetic(90)
    write_parquet(tmp_path / "chats/data/train-00000-of-00002.parquet", mixed(dialogues[:40]))
    write_parquet(tmp_path / "chats/data/train-00001-of-00002.parquet", mixed(dialogues[40:80]))
    write_parquet(tmp_path / "chats/data/test-00000-of-00001.parquet", mixed(dialogues[80:]))
    result = ok(prepare(tmp_path, "chats"))
    assert summary(result)["read"] == summary(result)["kept"] == 80
    assert "from chats[train]:" in result.stdout
    assert set(map(tuple, sum(outputs(tmp_path), []))) == set(map(tuple, dialogues[:80]))
    ok(prepare(tmp_path, "chats", "--data_split=test"))
    assert set(map(tuple, sum(outputs(tmp_path), []))) == set(map(tuple, dialogues[80:]))
    line = one_error(prepare(tmp_path, "chats", "--data_split=validation"))
    assert line == "error: chats: no split 'validation'; it has 'train', 'test' (set DATA_SPLIT)"


def test_a_dataset_card_names_the_files_of_a_split(tmp_path):
    write_parquet(tmp_path / "chats/sft/part-0.parquet", mixed(synthetic(20)))
    (tmp_path / "chats/README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                             "  - split: train_sft\n    path: sft/*.parquet\n---\n# Chats\n")
    s = summary(ok(prepare(tmp_path, "chats", "--data_split=train_sft")))
    assert s["kept"] == 20


def test_json_lines_in_a_dataset_directory_get_the_json_reader(tmp_path):
    records = mixed(synthetic(20))
    records[4] = {"messages": "hi"}
    (tmp_path / "chats").mkdir()
    write_jsonl(tmp_path / "chats/train.jsonl", records[:10])
    write_jsonl(tmp_path / "chats/test.jsonl", records[10:])
    # the error names the file and its line, as for a JSON Lines DATA_FILE
    line = one_error(prepare(tmp_path, "chats"))
    assert line == (f"error: {os.path.realpath(tmp_path)}/chats/train.jsonl: line 5: 'messages' is a string; "
                    f"expected a list of turns")
    s = summary(ok(prepare(tmp_path, "chats", "--data_split=test")))
    assert s["kept"] == 10


def test_an_empty_directory_is_one_line(tmp_path):
    (tmp_path / "chats").mkdir()
    assert one_error(prepare(tmp_path, "chats")).startswith("error: chats: not a dataset directory we can read: ")


def test_a_directory_of_several_configs_is_one_line_naming_them(tmp_path):
    for name in ("short", "long"):
        write_parquet(tmp_path / f"chats/{name}/part-0.parquet", mixed(synthetic(5)))
    (tmp_path / "chats/README.md").write_text("---\nconfigs:\n- config_name: short\n  data_files: short/*.parquet\n"
                                             "- config_name: long\n  data_files: long/*.parquet\n---\n")
    line = one_error(prepare(tmp_path, "chats"))
    assert line.startswith("error: chats: not a dataset directory we can read: ") and "['short', 'long']" in line
    assert summary(ok(prepare(tmp_path, "chats/long")))["kept"] == 5  # a config's own folder is a dataset


# ---------------------------------------------------------------------------------------------------------------------
# Hub ids, offline

def test_a_hub_id_offline_is_one_clear_line(tmp_path):
    line = one_error(prepare(tmp_path, "someone/chats", "--data_split=train_sft"))
    assert line.startswith("error: someone/chats[train_sft]: no local file or directory of that name, and the Hub "
                           "dataset can't be loaded: ")
    assert "offline" in line.lower()
    assert everything(tmp_path).keys() <= {".hf"}


def test_a_missing_file_shaped_like_a_hub_id_is_still_no_such_file(tmp_path):
    (tmp_path / "data").mkdir()
    line = one_error(prepare(tmp_path, "data/chats"))
    assert line.startswith(f"error: {os.path.realpath(tmp_path)}/data/chats: no such file")


# ---------------------------------------------------------------------------------------------------------------------
# the system message, and the JSON path's imports

SYSTEM = "You are a helpful assistant.\nAnswer briefly."


@pytest.mark.parametrize("container", ["jsonl", "parquet"])
def test_a_system_message_keeps_the_speaker_system(tmp_path, container):
    records = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"},
                             {"role": "assistant", "content": "Hello."}]},
               {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "How are you?"},
                                  {"from": "gpt", "value": "Fine, thanks."}]}]
    writer = write_jsonl if container == "jsonl" else write_parquet
    ok(prepare(tmp_path, writer(tmp_path / f"data.{container}", records)))
    got = sorted(read_dialogues(tmp_path / "train_data.txt") + read_dialogues(tmp_path / "val_data.txt"))
    # the label is exactly "system", first, so the rendering can give it the template's system slot; its text is one
    # line, as every turn's is in the text format
    assert got == [[("system", "You are a helpful assistant. Answer briefly."), ("human", "How are you?"),
                    ("gpt", "Fine, thanks.")],
                   [("system", "You are a helpful assistant. Answer briefly."), ("user", "Hi!"),
                    ("assistant", "Hello.")]]


def test_a_json_file_imports_neither_datasets_nor_pyarrow(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [record(HELLO, "messages"), record(HOW, "messages")])
    # what the script's process has imported when it ends, said last
    said = ("import atexit; "
            "atexit.register(lambda: print(sorted(m for m in ('datasets', 'pyarrow') if m in sys.modules)))")
    result = run("prepare_data.py", "--data_file=data.jsonl", cwd=tmp_path, patch=said, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
