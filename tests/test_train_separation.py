"""train.py's validation loss is the per-dialogue score: each dialogue alone, its targets what the model writes (an
assistant's text and its end-of-turn token, not the template's newline after it), computed here without any of the
project's rendering or batching, and compared with the step-0 validation loss train.py logs.

Run: .venv/bin/python -m pytest -q tests/test_train_separation.py
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from conftest import run_main, train_args
from render import render_chat, role_map
from tiny import chat_tokenizer, save_tiny_llama, synthetic, write_split


def alternating(n, seed):
    """Two-speaker dialogues that alternate (no turns to merge), Alex first: ChatML's user and assistant."""
    return [[("Alex" if i % 2 == 0 else "Bob", text) for i, (_, text) in enumerate(d)]
            for d in synthetic(n, seed=seed, min_turns=2, max_turns=6, max_words=10)]


def per_dialogue_score(model_dir, dialogues, end="<|im_end|>", newline=False):
    """The mean loss over Bob's (the assistant's) text and the end-of-turn token after each, each dialogue alone
    through the tokenizer's own chat template; `newline`: the template's newline after that token as well."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, n = 0.0, 0
    for d in dialogues:
        messages = [{"role": "assistant" if s == "Bob" else "user", "content": t} for s, t in d]
        text = tok.apply_chat_template(messages, tokenize=False)
        spans, at = [], 0
        for m in messages:
            start = text.index(m["content"], at)
            at = start + len(m["content"])
            if m["role"] == "assistant":
                stop = text.index(end, at) + len(end) + newline * len("\n")
                spans.append((start, stop))
        encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        targets = [k for k, (a, b) in enumerate(encoded["offset_mapping"])
                   if k > 0 and any(s <= a and b <= e for s, e in spans)]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        total -= sum(logp[k - 1, ids[k]].item() for k in targets)
        n += len(targets)
    return total / n


def save_chat_gpt2(path):
    """A tiny GPT-2 with the ChatML tokenizer: learned absolute positions, which a piece that does not start at 0
    reads wrong."""
    import transformers
    tok = chat_tokenizer()
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(tmp_path_factory, request):
    """A tiny ChatML model trained a little on alternating dialogues (its final/): a model that has learned where a
    turn ends, and what the template writes after it."""
    d = tmp_path_factory.mktemp("separation")
    write_split(d, alternating(80, seed=1), alternating(16, seed=2))
    (save_tiny_llama if request.param == "llama" else save_chat_gpt2)(str(d / "model"))
    args = train_args(str(d / "model"), "--format=chat_template", "--train_speakers=['Bob']", "--block_size=256",
                      "--batch_size=4", "--max_steps=120", "--learning_rate=5e-3", "--eval_interval=0")
    assert run_main(train.main, d, args).returncode == 0
    return d


def test_the_step_0_validation_loss_is_the_per_dialogue_score(trained):
    d = trained
    val = alternating(16, seed=2)
    args = train_args(str(d / "out" / "final"), "--format=chat_template", "--train_speakers=['Bob']",
                      "--block_size=256", "--batch_size=4", "--max_steps=1", "--out_dir=again")
    p = run_main(train.main, d, args)
    assert p.returncode == 0, p.stderr
    logged = next(json.loads(line)["val_loss"] for line in open(d / "again" / "metrics.jsonl")
                  if json.loads(line).get("step") == 0)
    reference = per_dialogue_score(str(d / "out" / "final"), val)
    # exact but for rounding: every dialogue fits a block, so each is scored as it is alone (pieces that saw each
    # other read 0.14% to 0.2% off here, scoring the template's newline too 12%)
    assert logged == pytest.approx(reference, rel=1e-5)
    # the reference can tell: the newline after <|im_end|> is what the trained model finds easiest
    assert abs(per_dialogue_score(str(d / "out" / "final"), val, newline=True) / reference - 1) > 0.01


def test_what_follows_the_end_of_turn_is_no_target():
    tok = chat_tokenizer()
    turns = [("Alex", "Hi there."), ("Bob", "Hello!"), ("Alex", "Bye."), ("Bob", "See you.")]
    (rendered,) = render_chat(tok, [turns], role_map(None, ["Bob"]), ["Bob"])
    ids = [t for tid, _ in rendered for t in tid]
    mask = [m for _, tm in rendered for m in tm]
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "Hello!<|im_end|>See you.<|im_end|>"  # the newline after each <|im_end|> is not
    newline = tok.convert_tokens_to_ids(tok.tokenize("\n"))[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    after = [m for k, m in enumerate(mask[1:], 1) if ids[k] == newline and ids[k - 1] == end]
    assert after and not any(after)
