"""How much memory and time does the loss take with a large vocabulary: chunked (loss.py), from the full logits, and
the Hugging Face way?

    python bench_loss.py --block_size=512 --batch_size=4 --bench_steps=3 --bench_warmup=1   # the README's table
    python bench_loss.py --bench_smoke=True --bench_json=loss.json   # an 8k vocabulary, block 64: checks it runs (CI)

Trains a 2-layer, 64-wide Llama body (tiny.py; its output layer untied, as Llama 3 8B's) with a vocabulary of
BENCH_VOCAB ids on random tokens, BATCH_SIZE sequences of BLOCK_SIZE, every position a target (CPU, fp32, from SEED),
for BENCH_WARMUP + BENCH_STEPS steps, three ways, each in a process of its own (launch.measure): our chunked loss, the
full-logits loss it replaced, and the Hugging Face way (model(x, labels=x).loss, what the Trainer runs). The output
layer and the loss are then nearly all of a step. Prints each way's peak memory above a process that only loads the
model, its best step time (forward, backward, AdamW), and how far apart the chunked and the full-logits losses are.
"""

import json
import os
import shutil
import sys
import tempfile
import time

from cli import UserError, atomic_write, bench_config, quiet_libraries, run
from launch import last_line, measure

HERE = os.path.dirname(os.path.abspath(__file__))
SMOKE = {"BENCH_VOCAB": 8192, "BLOCK_SIZE": 64, "BATCH_SIZE": 2, "BENCH_STEPS": 1, "BENCH_WARMUP": 1}
PATHS = {"chunked": "ours, chunked (loss.py)", "full": "ours, full logits (before)",
         "hf": "HF-style model(x, labels=x).loss"}


def say(line):
    print(line, file=sys.stderr, flush=True)


def worker(model_dir, path, block, batch, steps, warmup, seed, out):
    """One path's training steps (forward, backward, AdamW step) in this process, on random tokens, every position a
    target: the step times, the losses and the chunk size, as JSON to `out`. Run by main in a fresh process per
    path, so that each peak is that path's own."""
    import torch
    from transformers import AutoModelForCausalLM

    import hardware
    import loss
    import processes
    import step
    cpu = torch.device("cpu")
    hardware.keep_freed_memory()  # as hardware.pick does for train.py on a CPU
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = step.make_optimizer(model, 1e-4, 0.01, (0.9, 0.999))
    layout = processes.Single(processes.World(), cpu)
    layout.wrap(model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, block + 1), generator=torch.Generator().manual_seed(seed))
    x, y = ids[:, :-1], ids[:, 1:]
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        if path == "chunked":
            value, _ = step.forward_backward(layout, [(x, y, None)])
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


def check(cfg):
    if min(cfg.BENCH_VOCAB, cfg.BLOCK_SIZE, cfg.BATCH_SIZE, cfg.BENCH_STEPS) < 1 or cfg.BENCH_WARMUP < 0:
        raise UserError("BENCH_VOCAB, BLOCK_SIZE, BATCH_SIZE and BENCH_STEPS must be >= 1, BENCH_WARMUP >= 0")


def main():
    cfg = bench_config(__doc__, SMOKE)
    check(cfg)
    quiet_libraries()
    import tiny
    workdir = tempfile.mkdtemp(prefix="bench-loss-")
    try:
        model_dir = os.path.join(workdir, "model")
        tiny.save_tiny_llama(model_dir, vocab=cfg.BENCH_VOCAB, width=64, mlp=256, positions=max(1024, cfg.BLOCK_SIZE))
        load = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({model_dir!r})"
        base = measure(["-c", load], HERE, os.path.join(workdir, "load"))
        if base["rc"]:
            raise UserError(f"loading {model_dir} failed: {last_line(base['stderr'])}")
        say(f"model alone: peak RSS {base['rss_mb']:,.0f} MB")
        rows = {}
        for path in PATHS:
            out = os.path.join(workdir, path + ".out.json")
            call = (f"import bench_loss; bench_loss.worker({model_dir!r}, {path!r}, {cfg.BLOCK_SIZE}, "
                    f"{cfg.BATCH_SIZE}, {cfg.BENCH_STEPS}, {cfg.BENCH_WARMUP}, {cfg.SEED}, {out!r})")
            r = measure(["-c", call], HERE, os.path.join(workdir, path))
            if r["rc"]:
                raise UserError(f"the {path} path failed: {last_line(r['stderr'])}")
            with open(out) as f:
                rows[path] = {**json.load(f), "rss_above_model_mb": r["rss_mb"] - base["rss_mb"]}
            rows[path]["step_s_best"] = min(rows[path]["step_s"])
            say(f"{PATHS[path]}: peak RSS {r['rss_mb']:,.0f} MB, {rows[path]['step_s_best']:.2f} s a step")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(rows, base["rss_mb"], cfg)


def report(rows, model_rss_mb, cfg):
    import loss
    import torch
    chunk = rows["chunked"]["chunk"]
    print(f"\nLlama body of 2 layers x 64 wide, vocabulary {cfg.BENCH_VOCAB:,}, block {cfg.BLOCK_SIZE}, batch "
          f"{cfg.BATCH_SIZE}, CPU x{torch.get_num_threads()} threads; model alone {model_rss_mb:,.0f} MB peak RSS")
    budget = (f"the minimum of {loss.MIN_CHUNK}" if chunk == loss.MIN_CHUNK else f"{loss.CPU_BUDGET >> 20} MB of "
              f"fp32 logits a chunk on a CPU / (4 bytes x {cfg.BENCH_VOCAB:,} a position)")
    print(f"chunk: {chunk} positions (LOSS_CHUNK=0: {budget})")
    print(f"{'':36}{'peak RSS above':>16}{'step':>10}{'vs full':>10}")
    print(f"{'':36}{'model, MB':>16}{'s':>10}{'':>10}")
    full = rows["full"]["step_s_best"]
    for path, row in rows.items():
        print(f"{PATHS[path]:36}{row['rss_above_model_mb']:>16,.0f}{row['step_s_best']:>10.2f}"
              f"{row['step_s_best'] / full - 1:>+10.0%}")
    same = max(abs(a - b) for a, b in zip(rows["chunked"]["losses"], rows["full"]["losses"]))
    print(f"losses, chunked vs full logits, step by step: largest difference {same:.1e}")
    if cfg.BENCH_JSON:
        shape = {"vocab": cfg.BENCH_VOCAB, "block": cfg.BLOCK_SIZE, "batch": cfg.BATCH_SIZE,
                 "steps": cfg.BENCH_STEPS, "warmup": cfg.BENCH_WARMUP}
        with atomic_write(cfg.BENCH_JSON) as f:
            json.dump({"shape": shape, "model_rss_mb": model_rss_mb, "cpu_threads": torch.get_num_threads(),
                       "paths": rows, "loss_max_diff": same}, f, indent=2)


if __name__ == "__main__":
    run(main)
