"""Turn a dialogue file into the train/val text files the later stages read.

    python prepare_data.py                        # llm_train_text.json -> train_data.txt, val_data.txt
    python prepare_data.py --data_file=mine.jsonl --val_fraction=0.1

Reads DATA_FILE (a JSON array or JSON Lines; four record formats, see README.md). Writes TRAIN_FILE and VAL_FILE:
one turn per line as "Speaker: text", a blank line between dialogues. Each dialogue's side is fixed by a hash of its
content and SEED, so adding dialogues later never moves an existing one across. Exact duplicates are dropped first.
"""

import os

from cli import UserError, atomic_write, load_config, run
from dialogues import load_records, parse_record, split, write_dialogues


def main():
    cfg = load_config(doc=__doc__)
    if not 0 < cfg.VAL_FRACTION < 1:
        raise UserError(f"VAL_FRACTION must be between 0 and 1, got {cfg.VAL_FRACTION}")
    paths = [os.path.abspath(p) for p in (cfg.DATA_FILE, cfg.TRAIN_FILE, cfg.VAL_FILE)]
    if len(set(paths)) < 3:
        raise UserError(f"DATA_FILE, TRAIN_FILE and VAL_FILE must be three different files "
                        f"({cfg.DATA_FILE}, {cfg.TRAIN_FILE}, {cfg.VAL_FILE})")

    # -----------------------------------------------------------------------------------------------------------------
    # read, clean, drop empties and exact duplicates
    records = load_records(cfg.DATA_FILE)
    dialogues, seen, empty, duplicate = [], set(), 0, 0
    for record, where in records:
        turns = parse_record(record, where)
        key = tuple(turns)
        if not turns:
            empty += 1
        elif key in seen:
            duplicate += 1
        else:
            seen.add(key)
            dialogues.append(turns)
    if len(dialogues) < 2:
        raise UserError(f"{cfg.DATA_FILE}: {len(dialogues)} usable dialogue(s) of {len(records)} records "
                        f"({empty} empty, {duplicate} duplicate); need at least 2 to make a train and a val split")

    # -----------------------------------------------------------------------------------------------------------------
    # split and write; both files appear together or not at all
    train, val = split(dialogues, cfg.VAL_FRACTION, cfg.SEED)
    with atomic_write(cfg.TRAIN_FILE) as ft, atomic_write(cfg.VAL_FILE) as fv:
        write_dialogues(ft, train)
        write_dialogues(fv, val)

    n_turns = lambda ds: sum(map(len, ds))
    print(f"read {len(records)} dialogues from {cfg.DATA_FILE}: kept {len(dialogues)}, dropped "
          f"{empty + duplicate} ({empty} empty, {duplicate} duplicate); train {len(train)} / val {len(val)} dialogues, "
          f"{n_turns(train):,} / {n_turns(val):,} turns -> {cfg.TRAIN_FILE}, {cfg.VAL_FILE}")


if __name__ == "__main__":
    run(main)
