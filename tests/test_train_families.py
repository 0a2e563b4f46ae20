"""train.py end to end on model families other than GPT-2, in the chat-template format, with LoRA and gradient
checkpointing, offline, with tiny Llama (an instruct model's tokenizer: BOS, ChatML template), GPT-NeoX and GPT-2
models from tiny.py: each family through prepare -> train -> resume -> evaluate -> chat; --show_example; settings
a model cannot take.

Run: .venv/bin/python -m pytest -q tests/test_train_families.py
"""

import json
import os
import shutil

import pytest
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from batching import make_blocks
from conftest import one_error_line, run
from render import role_map, speaker_template
from tiny import (CHATML, chat_tokenizer, max_diff, save_tiny_gpt2, save_tiny_llama, save_tiny_neox, synthetic,
                  weights, write_split)

DIALOGUE = [("Alex", "Hi there."), ("Bob", "Hello, Alex!"), ("Alex", "Bye <|im_end|> now.")]


# ---------------------------------------------------------------------------------------------------------------------
# three families end to end: prepare -> train -> resume -> evaluate -> chat

FAMILIES = {
    # an instruct Llama in its own template, LoRA (with dropout, so resuming must restore the RNG)
    "llama": (save_tiny_llama, ["--format=chat_template", "--lora_r=4", "--lora_dropout=0.1",
                                "--train_speakers=['Bob']", "--learning_rate=1e-2"]),
    "neox": (save_tiny_neox, ["--gradient_checkpointing=True", "--learning_rate=1e-3"]),
    "gpt2": (lambda p: save_tiny_gpt2(p, dropout=0.1), ["--lora_r=4", "--learning_rate=1e-2"]),
}


def family_args(model, extra):
    return [f"--model={model}", "--device=cpu", "--block_size=64", "--batch_size=4", "--max_steps=6",
            "--checkpoint_interval=3", "--eval_interval=3", "--log_interval=1", "--warmup_steps=2",
            "--keep_checkpoints=5", "--max_new_tokens=8", "--sample_max_new_tokens=8", "--num_replies=3", *extra]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """One family's run: prepared data, an uninterrupted run in out/, and a copy of it crashed after step 3 and
    resumed in resumed/. Returns (directory, model path, args, {stage: CompletedProcess})."""
    name = request.param
    save, extra = FAMILIES[name]
    d = tmp_path_factory.mktemp(name)
    model = save(str(d / "model"))
    speakers = ["Alex", "Bob"]
    with open(d / "data.json", "w") as f:
        json.dump([[{"speaker": s, "text": t} for s, t in turns] for turns in synthetic(60, 4, 2, speakers=speakers)],
                  f)
    args = family_args(model, extra)
    # each script in this process: the stages are the point here, and each interpreter start would cost seconds
    # (test_train and test_evaluate run the real scripts)
    procs = {"prepare": run("prepare_data.py", "--data_file=data.json", cwd=d)}
    procs["train"] = run("train.py", *args, cwd=d)
    assert procs["train"].returncode == 0, procs["train"].stderr
    shutil.copytree(d / "out", d / "resumed")
    for sub in ("best", "final", "checkpoints/step-00000006"):
        shutil.rmtree(d / "resumed" / sub)
    procs["resume"] = run("train.py", *args, "--out_dir=resumed", "--resume=True", cwd=d)
    procs["evaluate"] = run("evaluate.py", *args, cwd=d)
    procs["chat"] = run("chat.py", *args, "--user_name=Alex", "--bot_name=Bob", cwd=d,
                        stdin="Hi there!\nHow are you?\n/quit\n")
    return d, model, name, procs


def test_family_end_to_end(family):
    d, model, name, procs = family
    for stage, p in procs.items():
        assert p.returncode == 0, (stage, p.stdout + p.stderr)
    assert "(step 3)" in procs["resume"].stdout
    # resumed: the same weights, bit for bit, and the same metrics
    assert max_diff(weights(d / "out" / "final"), weights(d / "resumed" / "final")) == 0
    with open(d / "out" / "metrics.jsonl") as a, open(d / "resumed" / "metrics.jsonl") as b:
        strip = lambda f: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]
        assert strip(a) == strip(b)
    report = json.loads((d / "out" / "eval" / "best" / "eval_report.json").read_text())
    assert report["val_loss"] < report["base_val_loss"]  # it learned something
    assert procs["chat"].stdout.count("Bob:") == 2
    tok = AutoTokenizer.from_pretrained(d / "out" / "best")
    if name == "llama":  # its own template, kept and used
        assert tok.chat_template == CHATML
        assert "<|im_start|>assistant\n" in report["sample_dialogue"]
        assert "FORMAT=chat_template" in procs["train"].stdout
    else:
        assert tok.chat_template == speaker_template("Alex", "Bob")


@pytest.mark.parametrize("which", ["best", "final"])
def test_lora_saves_merged_models_that_load_without_peft(family, which):
    d, model, name, procs = family
    out = d / "out"
    assert not (out / which / "adapter_config.json").exists()  # else transformers would load it as an adapter
    if "--lora_r=4" not in FAMILIES[name][1]:  # full fine-tuning: a plain model, no adapter beside it
        assert not (out / which / "adapter").exists() and (out / which / "model.safetensors").is_file()
        return
    assert (out / which / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / which).eval()
    base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out / which / "adapter").eval()
    x = torch.randint(0, 50257, (2, 16))
    assert (merged(x).logits - base(x).logits).abs().max().item() < 1e-5
    pipe = transformers.pipeline("text-generation", model=str(out / which), device="cpu")
    assert pipe("Alex: hi\nBob:", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("Alex: hi")
    m = [line for line in procs["train"].stdout.splitlines() if line.startswith("trained steps")][0]
    assert " of " in m and "parameters trained" in m and "adapter/" in m
    n_trained = int(m.split(" of ")[0].split("; ")[-1].replace(",", ""))
    assert 0 < n_trained < sum(p.numel() for p in merged.parameters()) / 10


# ---------------------------------------------------------------------------------------------------------------------
# --show_example and bad input: one line, exit 2, nothing written

def test_show_example(tmp_path):
    model = save_tiny_llama(str(tmp_path / "m"))
    write_split(tmp_path, [DIALOGUE[:2]], [DIALOGUE])
    before = sorted(os.listdir(tmp_path))
    p = run("train.py", f"--model={model}", "--format=chat_template", "--train_speakers=['Bob']",
            "--show_example=True", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path)) == before
    assert "<|begin_of_text|><|im_start|>system\n" in p.stdout
    assert "<|im_start|>assistant\n\u27e6Hello, Alex!<|im_end|>\u27e7\n" in p.stdout  # not the newline after it
    ids = make_blocks(chat_tokenizer(), [DIALOGUE[:2]], 256, ["Bob"], role_map())[0]
    assert f"{len(ids[0])} tokens, {sum(ids[1])} trained (" in p.stdout


@pytest.mark.parametrize("case, args, mentions", [
    ("roles", ["--format=chat_template", "--roles={'Alex': 'user'}"], "speaker 'Bob' has no role in ROLES"),
    ("no template", ["--format=chat_template"], "has no chat template"),
    ("targets", ["--lora_r=4", "--lora_targets=['nope']"], "LORA_TARGETS=['nope']"),
    ("format", ["--format=chatml"], "FORMAT must be"),
    ("scratch", ["--lora_r=4", "--model=scratch"], "a scratch model"),
])
def test_bad_settings(tmp_path, case, args, mentions):
    model = (save_tiny_gpt2 if case == "no template" else save_tiny_llama)(str(tmp_path / "m"))
    write_split(tmp_path, synthetic(6, speakers=["Alex", "Bob"]), synthetic(2, speakers=["Alex", "Bob"]))
    p = run("train.py", f"--model={model}", "--device=cpu", *args, cwd=tmp_path)
    assert mentions in one_error_line(p)
    assert not (tmp_path / "out").exists()


def test_lora_and_full_checkpoints_do_not_mix(family, tmp_path):
    """Each family's checkpoint resumed as the other kind: LoRA as full fine-tuning, full fine-tuning as LoRA."""
    d, model, name, _ = family
    lora = "--lora_r=4" in FAMILIES[name][1]
    resume_with = "full" if lora else "lora"
    shutil.copytree(d / "resumed", tmp_path / "out")
    shutil.copy(d / "train_data.txt", tmp_path)
    shutil.copy(d / "val_data.txt", tmp_path)
    before = sorted(str(p.stat().st_mtime_ns) + str(p) for p in (tmp_path / "out").rglob("*"))
    extra = [a for a in FAMILIES[name][1] if not a.startswith("--lora_r")]
    p = run("train.py", *family_args(model, extra), f"--lora_r={4 if resume_with == 'lora' else 0}", "--resume=True",
            cwd=tmp_path)
    line = one_error_line(p)
    assert f"(the run has --lora_r={4 if lora else 0})" in line
    assert sorted(str(p.stat().st_mtime_ns) + str(p) for p in (tmp_path / "out").rglob("*")) == before
