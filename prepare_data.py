"""Turn dialogue data into the train/val text files the later stages read.

    python prepare_data.py                        # llm_train_text.json -> train_data.txt, val_data.txt
    python prepare_data.py --data_file=mine.jsonl --val_fraction=0.1
    python prepare_data.py --data_file=chats.parquet
    python prepare_data.py --data_file=HuggingFaceH4/ultrachat_200k --data_split=train_sft
    python prepare_data.py --data_file='["chats.jsonl", {"path": "alpaca.json", "weight": 0.5}]'
    python prepare_data.py --data_file=prefs.jsonl --objective=dpo   # preference pairs -> train/val pairs files

Reads DATA_FILE: a JSON array or JSON Lines file, a Parquet file, a local dataset directory in the Hub's layout, or a
Hub dataset id (its DATA_SPLIT), or a list of them, each read in its own format and taken as its weight says. Records
are dialogues (four formats) or SFT records (instruction, prompt/completion), see README.md: Data; preference pairs
and plain text are refused. Writes TRAIN_FILE and VAL_FILE: one turn per line as "Speaker: text", a blank line between
dialogues. Each dialogue's side is fixed by a hash of its content and SEED, so adding dialogues later never moves an
existing one across. Exact duplicates are dropped first. The summary says what was read: the formats and the most
frequent speakers, with counts.

With OBJECTIVE="dpo" or "simpo" the records must be preference pairs (prompt/chosen/rejected, or two conversations
whose shared opening is the prompt: README, Preference tuning), and TRAIN_FILE and VAL_FILE are pairs files: JSON
Lines, one {"prompt", "chosen", "rejected"} record of cleaned {"role": speaker, "content": text} turns a line
(dialogues.write_pair). A pair's side is fixed by its prompt's hash, so pairs on one prompt stay together and the
held-out accuracy is on prompts never trained on; ties (chosen = rejected) are dropped and counted.

It streams: JSON Lines is read a record at a time, Parquet a batch of rows at a time, a Hub dataset as `datasets`
streams it, and each dialogue is written as soon as it is read, so memory grows only by a 16-byte digest per dialogue
(to spot duplicates), about 100 bytes each in a Python set. A JSON array is read whole.
"""

import hashlib
import os
from collections import Counter

from cli import UserError, atomic_write, load_config, progress, run
from dialogues import (ASSISTANT, OBJECTIVES, copies, format_dialogue, parse_pair, parse_record, read_records,
                       source, sources, split_key, write_dialogue, write_pair)

SPEAKERS_KEPT = 10_000  # distinct speakers counted for the summary; more (a name per dialogue?) are "others"
REPLY_FORMATS = ("instruction", "prompt/completion", "preference")  # whose replies are the assistant's turns


def main():
    cfg = load_config(doc=__doc__)
    if cfg.OBJECTIVE not in OBJECTIVES:
        raise UserError(f"OBJECTIVE must be one of {', '.join(map(repr, OBJECTIVES))}, got {cfg.OBJECTIVE!r}")
    if not 0 < cfg.VAL_FRACTION < 1:
        raise UserError(f"VAL_FRACTION must be between 0 and 1, got {cfg.VAL_FRACTION}")
    inputs = sources(cfg.DATA_FILE, cfg.DATA_SPLIT)
    named = [str(s) for s in inputs]
    if len(set(named)) < len(named):
        raise UserError(f"DATA_FILE names {next(s for s in named if named.count(s) > 1)} twice (its dialogues would be "
                        f"duplicates, dropped); a weight of 2 takes each of them twice")
    for s in inputs:
        if os.path.abspath(s.path) in map(os.path.abspath, (cfg.TRAIN_FILE, cfg.VAL_FILE)):
            raise UserError(f"DATA_FILE {s.path} is also TRAIN_FILE or VAL_FILE, which this writes")
    if os.path.abspath(cfg.TRAIN_FILE) == os.path.abspath(cfg.VAL_FILE):
        raise UserError(f"TRAIN_FILE and VAL_FILE must be different files (both {cfg.TRAIN_FILE})")

    # both files appear together or not at all: a bad record halfway leaves the old ones as they were
    with atomic_write(cfg.TRAIN_FILE) as ft, atomic_write(cfg.VAL_FILE) as fv:
        counts, found, lowest, highest = write_split(cfg, inputs, ft, fv)
        n = sum(counts.values(), Counter())
        if n["kept"] < 2:
            raise UserError(f"{cfg.DATA_FILE}: {n['kept']} usable dialogue(s) of {n['read']} records "
                            f"({dropped(n)}); need at least 2 to make a train and a val split")
        if not n["train"] or not n["val"]:
            # The hash left one side empty, which happens on a tiny file: the dialogue closest to the threshold
            # crosses over. Which one that is is known only now, so both files are written again with it moved.
            for f in (ft, fv):
                f.seek(0)
                f.truncate()
            counts, found, _, _ = write_split(cfg, inputs, ft, fv, cross=lowest if n["train"] else highest)
            n = sum(counts.values(), Counter())

    if len(inputs) > 1:
        for s, c in counts.items():
            extra = f", {c['copies']:,} more copies" if c["copies"] else ""
            print(f"  {s}: read {c['read']:,}, kept {c['kept']:,} ({dropped(c)}); train {c['train']:,}{extra} / "
                  f"val {c['val']:,}")
    name = str(inputs[0]) if len(inputs) == 1 else f"{len(inputs)} sources"
    what = "dialogues" if cfg.OBJECTIVE == "sft" else "preference pairs"
    print(f"read {n['read']:,} {what} from {name}: kept {n['kept']:,}, dropped {n['read'] - n['kept']:,} "
          f"({dropped(n)}); train {n['train']:,} / val {n['val']:,} {what}, {n['train turns']:,} / "
          f"{n['val turns']:,} turns -> "
          f"{cfg.TRAIN_FILE}, {cfg.VAL_FILE}")
    print(found_line(found, hint=cfg.OBJECTIVE == "sft"))


def dropped(n):
    """Why the records of some counts that were not kept were not: every one is empty, a duplicate or left out."""
    out = f"{n['empty']:,} empty, {n['duplicate']:,} duplicate" + (f", {n['tied']:,} tied" if n["tied"] else "")
    return out + (f", {n['weighted out']:,} left out by weight" if n["weighted out"] else "")


def write_split(cfg, inputs, ft, fv, cross=None):
    """Read each source, clean it, drop empties and exact duplicates, and write each dialogue to the train file ft or
    the val file fv as its hash says, in file order, as many times to ft as its source's weight says; the kept
    dialogue numbered `cross` (from 0) goes to the other side. Returns the counts per source, the formats and
    speakers found, and the numbers of the dialogues with the lowest and the highest split key."""
    counts, found = {}, {"formats": Counter(), "speakers": Counter()}
    seen = set()  # a digest of each kept dialogue, not the dialogue: memory per dialogue is fixed
    lowest, highest = (2.0, None), (-1.0, None)  # (split key, number); keys are in [0, 1)
    kept = 0  # over all sources
    written = Counter()  # dialogues in each file so far
    for s in inputs:
        n = counts[s] = Counter()
        # a JSON file's bar counts bytes; a table's rows, as their number is known (and often their bytes are not)
        unit = dict(unit="B", unit_divisor=1024) if source(s.path) == "json" else dict(unit=" rows")
        with progress(desc="prepare" if len(inputs) == 1 else f"prepare {s}", **unit, unit_scale=True,
                      delay=1) as bar:  # none under 1 s
            for record, where in read_records(s.path, s.split, bar):
                n["read"] += 1
                fmt, turns, pair = read_one(cfg, record, where)
                if not turns:
                    n["empty"] += 1
                    continue
                if pair and pair[1] == pair[2]:
                    n["tied"] += 1  # no preference: no signal, and no gradient
                    continue
                # one string per dialogue: "Speaker: text" can't be read two ways; nor a pair's three parts as JSON
                text = format_dialogue(turns) if not pair else repr(pair)
                digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
                if digest in seen:
                    n["duplicate"] += 1
                    continue
                seen.add(digest)
                times = copies(turns, cfg.SEED, s.weight)
                if not times:
                    n["weighted out"] += 1
                    continue
                count(found, fmt, turns)
                key = split_key(pair[0] if pair else turns, cfg.SEED)  # a pair's by its prompt
                # strictly lower or higher: on a tie the first one wins, as min() and max() did when this kept a list
                lowest = (key, kept) if key < lowest[0] else lowest
                highest = (key, kept) if key > highest[0] else highest
                side = "val" if (key < cfg.VAL_FRACTION) != (kept == cross) else "train"
                times = times if side == "train" else 1  # a validation dialogue counts once
                for _ in range(times):
                    if pair:
                        write_pair(fv if side == "val" else ft, pair)
                    else:
                        write_dialogue(fv if side == "val" else ft, turns, first=not written[side])
                    written[side] += 1
                n[side] += 1
                n[side + " turns"] += len(turns)
                n["copies"] += times - 1
                n["kept"] += 1
                kept += 1
                if n["kept"] == s.dialogues:
                    break
    return counts, found, lowest[1], highest[1]


def read_one(cfg, record, where):
    """A record as (its format, its turns, None), or with a preference OBJECTIVE (format, every turn of the pair,
    (prompt, chosen, rejected)); turns empty where a reply (or the dialogue) is."""
    if cfg.OBJECTIVE == "sft":
        return (*parse_record(record, where, cfg.USE_CHOSEN), None)
    pair = parse_pair(record, where)
    return "preference", pair[0] + pair[1] + pair[2] if pair[1] and pair[2] else [], pair


def count(found, fmt, turns):
    found["formats"][fmt] += 1
    speakers = found["speakers"]
    for speaker, _ in turns:
        if speaker in speakers or len(speakers) < SPEAKERS_KEPT:
            speakers[speaker] += 1
        else:
            speakers[None] += 1  # others


def found_line(found, hint=True):
    """What was read, in one line: the record formats and the most frequent speakers, with counts; where every record
    was an instruction or a prompt with its reply, how to train the replies alone."""
    formats = ", ".join(f"{f} {c:,}" for f, c in found["formats"].most_common())
    speakers = found["speakers"]
    others = speakers.pop(None, 0)
    top = speakers.most_common(6)
    rest = len(speakers) - len(top)
    line = (f"formats: {formats}; speakers (turns): {', '.join(f'{s} {c:,}' for s, c in top)}"
            + (f" and {rest:,} more" if rest else "") + (f" (and others, {others:,} turns)" if others else ""))
    # only where every record had a reply: mixed with dialogues, the setting would leave their speakers untrained
    if hint and set(found["formats"]) <= set(REPLY_FORMATS) and ASSISTANT in speakers:
        line += (f"; the replies are the {ASSISTANT!r} turns: train.py --train_speakers='[\"{ASSISTANT}\"]' trains "
                 f"them alone")
    return line

if __name__ == "__main__":
    run(main)
