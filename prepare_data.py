"""Turn a dialogue file into the train/val text files the later stages read.

    python prepare_data.py                        # llm_train_text.json -> train_data.txt, val_data.txt
    python prepare_data.py --data_file=mine.jsonl --val_fraction=0.1
    python prepare_data.py --data_file=chats.parquet
    python prepare_data.py --data_file=HuggingFaceH4/ultrachat_200k --data_split=train_sft

Reads DATA_FILE: a JSON array or JSON Lines file, a Parquet file, a local dataset directory in the Hub's layout, or a
Hub dataset id (its DATA_SPLIT); four record formats, see README.md. Writes TRAIN_FILE and VAL_FILE: one turn per line
as "Speaker: text", a blank line between dialogues. Each dialogue's side is fixed by a hash of its content and SEED, so
adding dialogues later never moves an existing one across. Exact duplicates are dropped first.

It streams: JSON Lines is read a record at a time, Parquet a batch of rows at a time, a Hub dataset as `datasets`
streams it, and each dialogue is written as soon as it is read, so memory grows only by a 16-byte digest per dialogue
(to spot duplicates), about 100 bytes each in a Python set. A JSON array is read whole.
"""

import hashlib
import os
from collections import Counter

from cli import UserError, atomic_write, load_config, progress, run
from dialogues import format_dialogue, parse_record, read_records, source, split_key, write_dialogue


def main():
    cfg = load_config(doc=__doc__)
    if not 0 < cfg.VAL_FRACTION < 1:
        raise UserError(f"VAL_FRACTION must be between 0 and 1, got {cfg.VAL_FRACTION}")
    paths = [os.path.abspath(p) for p in (cfg.DATA_FILE, cfg.TRAIN_FILE, cfg.VAL_FILE)]
    if len(set(paths)) < 3:
        raise UserError(f"DATA_FILE, TRAIN_FILE and VAL_FILE must be three different files "
                        f"({cfg.DATA_FILE}, {cfg.TRAIN_FILE}, {cfg.VAL_FILE})")

    # both files appear together or not at all: a bad record halfway leaves the old ones as they were
    with atomic_write(cfg.TRAIN_FILE) as ft, atomic_write(cfg.VAL_FILE) as fv:
        n, lowest, highest = write_split(cfg, ft, fv)
        if n["kept"] < 2:
            raise UserError(f"{cfg.DATA_FILE}: {n['kept']} usable dialogue(s) of {n['read']} records "
                            f"({n['empty']} empty, {n['duplicate']} duplicate); need at least 2 to make a train and "
                            f"a val split")
        if not n["train"] or not n["val"]:
            # The hash left one side empty, which happens on a tiny file: the dialogue closest to the threshold
            # crosses over. Which one that is is known only now, so both files are written again with it moved.
            for f in (ft, fv):
                f.seek(0)
                f.truncate()
            n, _, _ = write_split(cfg, ft, fv, cross=lowest if n["train"] else highest)

    name = cfg.DATA_FILE if source(cfg.DATA_FILE) in ("json", "parquet") else f"{cfg.DATA_FILE}[{cfg.DATA_SPLIT}]"
    print(f"read {n['read']} dialogues from {name}: kept {n['kept']}, dropped {n['empty'] + n['duplicate']} "
          f"({n['empty']} empty, {n['duplicate']} duplicate); train {n['train']} / val {n['val']} dialogues, "
          f"{n['train turns']:,} / {n['val turns']:,} turns -> {cfg.TRAIN_FILE}, {cfg.VAL_FILE}")


def write_split(cfg, ft, fv, cross=None):
    """Read DATA_FILE, clean it, drop empties and exact duplicates, and write each dialogue to the train file ft or
    the val file fv as its hash says, in file order; the kept dialogue numbered `cross` (from 0) goes to the other
    side. Returns the counts and the numbers of the dialogues with the lowest and the highest split key."""
    n = Counter()
    seen = set()  # a digest of each kept dialogue, not the dialogue: memory per dialogue is fixed
    lowest, highest = (2.0, None), (-1.0, None)  # (split key, number); keys are in [0, 1)
    # a JSON file's bar counts bytes; a table's rows, as their number is known (and often their bytes are not)
    unit = dict(unit="B", unit_divisor=1024) if source(cfg.DATA_FILE) == "json" else dict(unit=" rows")
    with progress(desc="prepare", **unit, unit_scale=True, delay=1) as bar:  # none under 1 s
        for record, where in read_records(cfg.DATA_FILE, cfg.DATA_SPLIT, bar):
            n["read"] += 1
            turns = parse_record(record, where)
            if not turns:
                n["empty"] += 1
                continue
            text = format_dialogue(turns)  # one string per dialogue: "Speaker: text" can't be read two ways
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                n["duplicate"] += 1
                continue
            seen.add(digest)
            key = split_key(turns, cfg.SEED)
            # strictly lower or higher: on a tie the first one wins, as min() and max() did when this kept a list
            lowest = (key, n["kept"]) if key < lowest[0] else lowest
            highest = (key, n["kept"]) if key > highest[0] else highest
            side = "val" if (key < cfg.VAL_FRACTION) != (n["kept"] == cross) else "train"
            write_dialogue(fv if side == "val" else ft, turns, first=not n[side])
            n[side] += 1
            n[side + " turns"] += len(turns)
            n["kept"] += 1
    return n, lowest[1], highest[1]


if __name__ == "__main__":
    run(main)
