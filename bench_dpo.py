"""How much memory and time does a DPO step take: ours (preference.py, step.train_step) against TRL's DPOTrainer, the
anchor, on the same model, pairs and batch?

    python bench_dpo.py                                     # a 2-layer Llama with Llama 3's vocabulary
    python bench_dpo.py --bench_smoke=True                  # a smaller vocabulary, a few steps: checks it runs

Builds a 2-layer, 64-wide Llama body (tiny.py, GPT-2's BPE and a chat template) with a vocabulary of BENCH_VOCAB ids
(at least the tokenizer's 50,260), and BATCH_SIZE x (BENCH_WARMUP + BENCH_STEPS) synthetic pairs of prompts and
replies of tens of words (SEED), rendered once in the speaker format. Each side trains BENCH_WARMUP untimed then
BENCH_STEPS timed DPO steps (BETA, BATCH_SIZE pairs a step, AdamW) on DEVICE in PRECISION, in a fresh process of its
own (launch.measure), the two sides started in turn, twice (ours, TRL, ours, TRL): a shared CPU's speed drifts. TRL
gets the same tokens as text: each pair's rendered prompt, chosen and rejected replies (it adds the end-of-text token
itself), with its defaults (a copy of the model as the reference, the full logits, padding to the longer reply); ours
computes the reference's log-probabilities once before the first step (timed apart) and keeps no second model.
Prints each side's peak RSS above a process that only loads the model (on CUDA also the allocator's peak), its best
step time and pairs per second.
Needs TRL (pip install trl; bench-only, requirements-dev.txt).
"""

import json
import os
import random
import shutil
import sys
import tempfile
import time

from cli import UserError, atomic_write, bench_config, quiet_libraries, run
from launch import last_line, measure

HERE = os.path.dirname(os.path.abspath(__file__))
SMOKE = {"BENCH_VOCAB": 50304, "BLOCK_SIZE": 128, "BATCH_SIZE": 2, "BENCH_STEPS": 2, "BENCH_WARMUP": 1}
SIDES = {"ours": "ours (preference.py)", "trl": "TRL DPOTrainer"}
ROUNDS = 2  # ours, TRL, ours, TRL: the best of each side's runs


def say(line):
    print(line, file=sys.stderr, flush=True)


def write_pairs(path, n, seed):
    """n synthetic pairs: a prompt of 20-60 words, two replies of 10-50 (tiny.WORDS), as a pairs file."""
    import tiny
    from dialogues import write_pair
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(tiny.WORDS) for _ in range(rng.randint(lo, hi)))
    with open(path, "w") as f:
        for _ in range(n):
            write_pair(f, ([("user", text(20, 60))], [("assistant", text(10, 50))], [("assistant", text(10, 50))]))


def worker(side, model_dir, pairs_file, cfg_json, out):
    """One side's DPO steps in this process: the step times (and ours, the reference pass's), as JSON to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hardware
    import preference
    from render import Rendering
    cfg = json.loads(cfg_json)
    device, dtype, _ = hardware.pick(cfg["device"], cfg["precision"])
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = preference.load_pairs(pairs_file, tokenizer, Rendering(), cfg["block"])
    n = cfg["batch"] * (cfg["warmup"] + cfg["steps"])
    times, extra = (ours if side == "ours" else trl)(model, tokenizer, pairs, n, cfg, device, dtype)
    if device.type == "cuda":  # the figure that counts on a GPU: the allocator's peak, not the process's RSS
        extra["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open(out, "w") as f:
        json.dump({"step_s": times[cfg["warmup"]:], **extra}, f)


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(model, tokenizer, pairs, n, cfg, device, dtype):
    import processes
    import step
    from preference import Objective, PairSteps, pair_batches, sequence_logps
    layout = processes.Single(processes.World(), device, dtype)
    layout.wrap(model)
    t = time.perf_counter()
    ref = sequence_logps(layout, pair_batches(pairs, cfg["batch"], tokenizer.eos_token_id, cfg["block"]),
                         len(pairs)).float()
    sync(device)
    ref_s = time.perf_counter() - t
    optimizer = step.make_optimizer(model, 5e-5, 0.0, (0.9, 0.999))
    steps = PairSteps(pairs, cfg["batch"], 1, cfg["block"], cfg["seed"], tokenizer.eos_token_id)
    times, offset = [], 0
    for _ in range(n // cfg["batch"]):
        taken, micro, _ = steps.at(0, offset)
        t = time.perf_counter()
        step.train_step(layout, optimizer, None, micro, 1.0, (Objective("dpo", cfg["beta"]), ref))
        sync(device)
        times.append(time.perf_counter() - t)
        offset += len(taken)
    return times, {"reference_s": ref_s, "reference_pairs": len(pairs)}


def trl(model, tokenizer, pairs, n, cfg, device, dtype):
    """TRL's DPOTrainer on the same tokens, as text, on the same device and in the same precision."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    rows = []
    for i in range(n):
        texts = []
        for ids, mask in pairs.sequences[2 * i:2 * i + 2]:
            first = mask.index(1)
            texts.append((tokenizer.decode(ids[1:first]), tokenizer.decode(ids[first:-1])))  # EOS: TRL adds it
        rows.append({"prompt": texts[0][0], "chosen": texts[0][1], "rejected": texts[1][1]})
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter() - self.t)

    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-dpo-trl-"), per_device_train_batch_size=cfg["batch"],
                     max_steps=n // cfg["batch"], learning_rate=5e-5, beta=cfg["beta"], max_length=cfg["block"] + 1,
                     use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     report_to=[], save_strategy="no", logging_steps=10 ** 6, seed=cfg["seed"],
                     dataloader_num_workers=0, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=1.0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return times, {}


def main():
    cfg = bench_config(__doc__, SMOKE)
    if min(cfg.BLOCK_SIZE, cfg.BATCH_SIZE, cfg.BENCH_STEPS) < 1 or cfg.BENCH_WARMUP < 0:
        raise UserError("BLOCK_SIZE, BATCH_SIZE and BENCH_STEPS must be >= 1, BENCH_WARMUP >= 0")
    if cfg.BENCH_VOCAB < 50260:
        raise UserError(f"BENCH_VOCAB={cfg.BENCH_VOCAB}: the tokenizer (GPT-2's BPE and 3 special tokens) needs at "
                        f"least 50,260 ids")
    quiet_libraries()
    import tiny
    workdir = tempfile.mkdtemp(prefix="bench-dpo-")
    try:
        model_dir, pairs_file = os.path.join(workdir, "model"), os.path.join(workdir, "pairs.jsonl")
        tiny.save_tiny_llama(model_dir, vocab=cfg.BENCH_VOCAB, width=64, mlp=256, positions=max(1024, cfg.BLOCK_SIZE))
        write_pairs(pairs_file, cfg.BATCH_SIZE * (cfg.BENCH_WARMUP + cfg.BENCH_STEPS), cfg.SEED)
        load = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({model_dir!r})"
        base = measure(["-c", load], HERE, os.path.join(workdir, "load"))
        if base["rc"]:
            raise UserError(f"loading {model_dir} failed: {last_line(base['stderr'])}")
        say(f"model alone: peak RSS {base['rss_mb']:,.0f} MB")
        settings = json.dumps({"device": cfg.DEVICE, "precision": cfg.PRECISION, "block": cfg.BLOCK_SIZE,
                               "batch": cfg.BATCH_SIZE, "steps": cfg.BENCH_STEPS,
                               "warmup": cfg.BENCH_WARMUP, "beta": cfg.BETA, "seed": cfg.SEED})
        rows = {}
        for k in range(ROUNDS):
            for side in SIDES:
                out = os.path.join(workdir, f"{side}-{k}.out.json")  # {side}-{k}.json: measure's own
                call = (f"import bench_dpo; bench_dpo.worker({side!r}, {model_dir!r}, {pairs_file!r}, "
                        f"{settings!r}, {out!r})")
                r = measure(["-c", call], HERE, os.path.join(workdir, f"{side}-{k}"))
                if r["rc"]:
                    raise UserError(f"{SIDES[side]} failed: {last_line(r['stderr'])}")
                with open(out) as f:
                    got = json.load(f)
                best = min(got["step_s"])
                say(f"{SIDES[side]}, run {k + 1}: peak RSS {r['rss_mb']:,.0f} MB, best step {best:.3f} s")
                row = rows.setdefault(side, {"rss_above_model_mb": [], "step_s_best": [], **got})
                row["rss_above_model_mb"].append(r["rss_mb"] - base["rss_mb"])
                row.setdefault("cuda_peak", []).append(got.get("cuda_peak_mb"))
                row["step_s_best"].append(best)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(rows, base["rss_mb"], cfg)


def report(rows, model_rss_mb, cfg):
    import torch
    print(f"\nLlama body of 2 layers x 64 wide, vocabulary {cfg.BENCH_VOCAB:,}, BLOCK_SIZE {cfg.BLOCK_SIZE}, "
          f"{cfg.BATCH_SIZE} pairs a step, DEVICE={cfg.DEVICE} (CPU x{torch.get_num_threads()} threads), "
          f"PRECISION={cfg.PRECISION}; model alone "
          f"{model_rss_mb:,.0f} MB peak RSS; best of {ROUNDS} fresh processes a side")
    cuda = all(v is not None for row in rows.values() for v in row["cuda_peak"])
    print(f"{'':24}{'peak RSS above model, MB':>26}{'peak CUDA, MB' if cuda else '':>15}{'step, s':>10}{'pairs/s':>10}")
    for side, row in rows.items():
        step_s = min(row["step_s_best"])
        peak = f"{min(row['cuda_peak']):,.0f}" if cuda else ""
        print(f"{SIDES[side]:24}{min(row['rss_above_model_mb']):>26,.0f}{peak:>15}{step_s:>10.3f}"
              f"{cfg.BATCH_SIZE / step_s:>10.1f}")
    if "reference_s" in rows.get("ours", {}):
        print(f"ours, the reference pass once before training: {rows['ours']['reference_s']:.2f} s for "
              f"{rows['ours']['reference_pairs']} pairs")
    if cfg.BENCH_JSON:
        with atomic_write(cfg.BENCH_JSON) as f:
            json.dump({"vocab": cfg.BENCH_VOCAB, "block": cfg.BLOCK_SIZE, "batch": cfg.BATCH_SIZE,
                       "model_rss_mb": model_rss_mb, "sides": rows}, f, indent=2)


if __name__ == "__main__":
    run(main)
