"""How do prepare_data.py and train.py's start-up grow with the data?

    python bench_scale.py                               # 1x, 10x and 100x a chitchat corpus (100x: long)
    python bench_scale.py --bench_scales=1,10 --bench_workdir=scale --bench_json=scale.json
    python bench_scale.py --bench_smoke=True            # scales 0.01 and 0.02: checks that it runs (CI)

Runs the pipeline's scripts as a user does, each a process of its own (launch.measure: its wall time and its own
peak memory), on a synthetic corpus the size of a public chitchat corpus (5,356 dialogues, ~3.1M GPT-2 tokens) times
each of BENCH_SCALES, with a 2-layer, 64-wide GPT-2 (tiny.py) so that the data is what costs. Prints, per scale: the
time prepare_data.py takes; the tokens/s of train.py's first run (one step, CPU), which tokenizes the data into its
cache, beside the tokenizer's own batch throughput; the start-up of a second run, which finds the cache warm; and that
run's peak memory at the end of its start-up (its own line) above what a process that only loads the model takes. The
files go to BENCH_WORKDIR, kept, or to a temp directory, removed at the end.
"""

import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time

from cli import UserError, atomic_write, bench_config, quiet_libraries, run
from dialogues import format_dialogue, iter_dialogues
from launch import last_line, measure

HERE = os.path.dirname(os.path.abspath(__file__))
CHITCHAT_DIALOGUES = 5356  # 1x: a public chitchat corpus, 5,356 dialogues and ~3.1M GPT-2 tokens (~580 a dialogue)
SMOKE = {"BENCH_SCALES": (0.01, 0.02)}


def say(line):
    print(line, file=sys.stderr, flush=True)


def write_corpus(path, n, seed=0):
    """n distinct synthetic dialogues as JSON Lines, written as they are made: 8-12 turns of 24-44 words (~600 GPT-2
    tokens a dialogue) from the 6,000 words of the shipped dialogues, between two of their speakers. Deterministic from
    the seed, and a larger n starts with a smaller one's dialogues. Two dialogues of some 340 random words alike is
    too unlikely to happen: prepare_data.py, which drops exact duplicates, drops none."""
    with open(os.path.join(HERE, "llm_train_text.json"), encoding="utf-8") as f:
        shipped = json.load(f)
    words = sorted({w for r in shipped for t in r["turns"] for w in t["text"].split()})
    names = sorted({t["speaker"] for r in shipped for t in r["turns"]})
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            pair = rng.sample(names, 2)
            turns = [{"speaker": pair[i % 2], "text": " ".join(rng.choices(words, k=rng.randint(24, 44)))}
                     for i in range(rng.randint(8, 12))]
            f.write(json.dumps(turns) + "\n")


def number(text):
    return float(text.replace(",", ""))


def parse_train(stdout, train_file="train_data.txt"):
    """What train.py says about its data: the tokenization of the train file on a cold cache (`tokenized PATH: N
    tokens in Ts (R tokens/s)`, the line for train_file, else the largest) and `start-up: Ss (...)`. None for a
    line it did not print."""
    tokenized = [{"path": m[1], "tokens": number(m[2]), "s": number(m[3]), "tokens_per_s": number(m[4])}
                 for m in re.finditer(r"^tokenized (.+): ([\d,]+) tokens in ([\d.,]+)s \(([\d.,]+) tokens/s\)",
                                      stdout, re.M)]
    train = next((t for t in tokenized if os.path.basename(t["path"]) == train_file),
                 max(tokenized, key=lambda t: t["tokens"], default=None))
    startup = re.search(r"^start-up: ([\d.,]+)s.*?(?:peak memory so far ([\d.,]+) MB)?$", stdout, re.M)
    return (train, number(startup[1]) if startup else None,
            number(startup[2]) if startup and startup[2] else None)


def tokenizer_throughput(tokenizer, path, max_dialogues, batch=1000):
    """tokens/s of the tokenizer itself, in batches of `batch` dialogues as "Speaker: text" lines, over the first
    max_dialogues of a train file (read as far as needed: the 100x file is gigabytes). Returns (tokens/s, tokens,
    dialogues)."""
    from render import encode
    texts = [format_dialogue(d) for d in itertools.islice(iter_dialogues(path), max_dialogues)]
    tokens, t = 0, time.perf_counter()
    for i in range(0, len(texts), batch):
        tokens += sum(len(ids) for ids in encode(tokenizer, texts[i:i + batch]))
    return tokens / (time.perf_counter() - t), tokens, len(texts)


def check(cfg):
    scales = cfg.BENCH_SCALES
    if not scales or not all(type(s) in (int, float) and s > 0 for s in scales):
        raise UserError(f"BENCH_SCALES={scales!r}: expected multiples of the chitchat corpus, each > 0, like "
                        f"1,10,100 (one scale: 10,)")


def main():
    cfg = bench_config(__doc__, SMOKE)
    check(cfg)
    quiet_libraries()
    import hardware
    import tiny
    workdir = os.path.abspath(cfg.BENCH_WORKDIR) if cfg.BENCH_WORKDIR else tempfile.mkdtemp(prefix="bench-scale-")
    os.makedirs(workdir, exist_ok=True)
    try:
        model_dir = os.path.join(workdir, "model")
        # small, so that what train.py's start-up and memory show is the data's cost
        tiny.save_tiny_gpt2(model_dir, n_embd=64, n_positions=1024)
        say("model alone: loading it in a fresh process ...")
        base = measure(["-c", f"import modeling; modeling.load({model_dir!r})"], HERE, os.path.join(workdir, "load"))
        if base["rc"]:
            raise UserError(f"loading {model_dir} failed: {last_line(base['stderr'])}")
        say(f"model alone: peak RSS {base['rss_mb']:,.0f} MB")
        rows = [scale_row(scale, workdir, model_dir, tiny.gpt2_tokenizer(), base["rss_mb"])
                for scale in sorted(set(cfg.BENCH_SCALES))]
    finally:
        if not cfg.BENCH_WORKDIR:
            shutil.rmtree(workdir, ignore_errors=True)
    report(rows, base["rss_mb"])
    if cfg.BENCH_JSON:
        with atomic_write(cfg.BENCH_JSON) as f:
            json.dump({"cpu_cores": hardware.usable_cores(), "model_rss_mb": base["rss_mb"], "rows": rows}, f,
                      indent=2)


def scale_row(scale, workdir, model_dir, tokenizer, model_rss_mb):
    """One scale's figures: the corpus written, prepare_data.py, the tokenizer's own rate, and train.py twice (a
    cold token cache, then a warm one)."""
    name, n = f"{scale:g}x", max(10, round(CHITCHAT_DIALOGUES * scale))
    d = os.path.join(workdir, f"scale-{name}")
    shutil.rmtree(d, ignore_errors=True)  # a cache left from an earlier run would make the cold run warm
    os.makedirs(d)
    row = {"scale": scale, "dialogues": n}
    t = time.perf_counter()
    write_corpus(os.path.join(d, "corpus.jsonl"), n)
    say(f"[{name}] wrote corpus.jsonl: {n:,} dialogues in {time.perf_counter() - t:.1f}s")
    prep = measure([os.path.join(HERE, "prepare_data.py"), "--data_file=corpus.jsonl"], d, os.path.join(d, "prepare"))
    if prep["rc"]:
        raise UserError(f"[{name}] prepare_data.py failed: {last_line(prep['stderr'])}")
    row["prepare_s"], row["prepare_rss_mb"] = prep["s"], prep["rss_mb"]
    say(f"[{name}] prepare_data.py: {prep['s']:.1f}s, peak RSS {prep['rss_mb']:,.0f} MB; {last_line(prep['stdout'])}")
    rate, tokens, dialogues = tokenizer_throughput(tokenizer, os.path.join(d, "train_data.txt"), CHITCHAT_DIALOGUES)
    row["tokenizer_tokens_per_s"] = rate
    say(f"[{name}] tokenizer alone, batches of 1000: {rate:,.0f} tokens/s over the first {dialogues:,} train "
        f"dialogues ({tokens:,} tokens)")
    out = os.path.join(d, "out")
    train = [os.path.join(HERE, "train.py"), f"--model={model_dir}", "--device=cpu", "--max_steps=1",
             "--eval_interval=0", "--checkpoint_interval=0", f"--out_dir={out}", "--val_max_tokens=20000",
             f"--cache_dir={os.path.join(d, 'cache')}"]
    runs = {}
    for run_name in ("cold", "warm"):
        shutil.rmtree(out, ignore_errors=True)  # a new run each time; the cache stays
        r = runs[run_name] = measure(train, d, os.path.join(d, f"train-{run_name}"))
        say(f"[{name}] train.py, {run_name} cache: {r['s']:.1f}s, peak RSS {r['rss_mb']:,.0f} MB"
            + (f"; failed (exit {r['rc']}): {last_line(r['stderr'])}" if r["rc"] else ""))
    cold, cold_startup, _ = parse_train(runs["cold"]["stdout"]) if not runs["cold"]["rc"] else (None,) * 3
    _, warm_startup, warm_rss = parse_train(runs["warm"]["stdout"]) if not runs["warm"]["rc"] else (None,) * 3
    row["train_tokens"] = cold and cold["tokens"]
    row["cold_tokens_per_s"] = cold and cold["tokens_per_s"]
    row["cold_startup_s"], row["warm_startup_s"] = cold_startup, warm_startup
    # at the end of start-up (train.py's own figure): the training step's logits and activations are the model's and
    # the batch's cost, the same at any scale, not the data's
    row["rss_above_model_mb"] = warm_rss - model_rss_mb if warm_rss is not None else None
    row["warm_run_rss_mb"] = None if runs["warm"]["rc"] else runs["warm"]["rss_mb"]
    return row


def report(rows, model_rss_mb):
    """The table of the scales' figures ("-" for one train.py did not print)."""
    columns = [("scale", "", "{:g}x", "scale"), ("dialogues", "", "{:,}", "dialogues"),
               ("train", "tokens", "{:,.0f}", "train_tokens"), ("prepare", "s", "{:.1f}", "prepare_s"),
               ("cold tokenize", "tokens/s", "{:,.0f}", "cold_tokens_per_s"),
               ("tokenizer batch", "tokens/s", "{:,.0f}", "tokenizer_tokens_per_s"),
               ("warm start-up", "s", "{:.1f}", "warm_startup_s"),
               ("peak RSS above", "model, MB", "{:,.0f}", "rss_above_model_mb")]
    print(f"\nmodel alone (2 layers, 64 wide, GPT-2 vocabulary): peak RSS {model_rss_mb:,.0f} MB")
    for line in (0, 1):
        print("".join(f"{c[line]:>16}" for c in columns))
    for r in rows:
        print("".join(f"{'-' if r[key] is None else fmt.format(r[key]):>16}" for _, _, fmt, key in columns))


if __name__ == "__main__":
    run(main)
