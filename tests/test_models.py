"""Model families other than GPT-2, the chat-template format, LoRA and gradient checkpointing, offline, with tiny
Llama (an instruct model's tokenizer: BOS, ChatML template), GPT-NeoX and GPT-2 models from tiny.py.

Run: .venv/bin/python -m pytest -q tests/test_models.py
"""

import json
import os
import shutil

import pytest
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import chat
import checkpoints
import cli
import evaluate
import modeling
import prepare_data
import step
import tiny
import train
from batching import collate, make_blocks
from conftest import in_process, one_error_line, run_main
from render import CHAT_TEMPLATE, role_map
from tiny import (CHATML, chat_tokenizer, gpt2_tokenizer, max_diff, save_tiny_gpt2, save_tiny_llama,
                  save_tiny_neox, synthetic, weights, write_split)

DIALOGUE = [("Alex", "Hi there."), ("Bob", "Hello, Alex!"), ("Alex", "Bye <|im_end|> now.")]


# ---------------------------------------------------------------------------------------------------------------------
# LoRA and gradient checkpointing, in process

def lora_cfg(**kw):
    return cli.load_config([f"--{k}={v!r}" for k, v in {"lora_r": 4, "lora_dropout": 0.0, **kw}.items()])


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_lora_trains_only_the_adapter(tmp_path, family):
    path = {"gpt2": save_tiny_gpt2, "llama": save_tiny_llama, "neox": save_tiny_neox}[family](str(tmp_path / "m"))
    tok, model = modeling.load(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = modeling.adapt(model, lora_cfg())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert any("mlp" in n for n in trained) and any("attn" in n or "attention" in n for n in trained)
    opt = step.make_optimizer(model, 1e-2, 0.0, (0.9, 0.999))
    x, y = collate(make_blocks(tok, synthetic(8), 32)[:4], tok.eos_token_id)
    layout = tiny.single(model.train())
    for _ in range(2):
        step.train_step(layout, opt, None, [(x, y)], 1.0)
    assert sum(len(s) > 0 for s in opt.state.values()) == len(trained)  # optimizer state for the adapter only
    merged = checkpoints.merged_state_dict(model)
    assert merged.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert changed and all(k.endswith("weight") for k in changed)
    for k, v in model.get_base_model().state_dict().items():  # the base weights themselves never moved
        if "lora_" not in k:
            assert torch.equal(before[k.replace(".base_layer.", ".")], v)
    plain = modeling.load(path)[1]  # the merged weights in the base architecture compute what the adapted model does
    plain.load_state_dict(merged)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(plain.eval()(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


def test_lora_targets_naming_no_module():
    _, model = modeling.build_scratch(cli.load_config(["--scratch_layers=1", "--scratch_embd=16"]), ["a b"],
                                      gpt2_tokenizer())
    with pytest.raises(cli.UserError, match=r"LORA_TARGETS=\['q_proj'\]: .*not found"):
        modeling.adapt(model, lora_cfg(lora_targets=["q_proj"]))


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, family):
    path = {"gpt2": save_tiny_gpt2, "llama": save_tiny_llama, "neox": save_tiny_neox}[family](str(tmp_path / "m"))
    grads = []
    for on in (False, True):
        tok, model = modeling.load(path)
        model = modeling.adapt(model, cli.load_config([f"--gradient_checkpointing={on}"])).train()
        assert getattr(model, "is_activation_checkpointing", model.is_gradient_checkpointing) == on
        x, y = collate(make_blocks(tok, synthetic(8), 32)[:4], tok.eos_token_id)
        loss, _ = step.forward_backward(tiny.single(model), [(x, y)])
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert max((g0[n] - g1[n]).abs().max().item() for n in g0) < 1e-6


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_architecture_specific_code_leaves_other_families_alone(tmp_path, family):
    path = {"llama": save_tiny_llama, "neox": save_tiny_neox}[family](str(tmp_path / "m"))
    x = torch.randint(0, 50257, (2, 16))
    ours, plain = modeling.load(path)[1].eval(), AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(ours(x).logits, plain(x).logits)


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
    # each script's main() in this process, as its __main__ runs it: the stages are the point here, and each
    # interpreter start would cost seconds (test_train and test_evaluate run the real scripts)
    procs = {"prepare": run_main(prepare_data.main, d, ["--data_file=data.json"])}
    procs["train"] = run_main(train.main, d, args)
    assert procs["train"].returncode == 0, procs["train"].stderr
    shutil.copytree(d / "out", d / "resumed")
    for sub in ("best", "final", "checkpoints/step-00000006"):
        shutil.rmtree(d / "resumed" / sub)
    procs["resume"] = run_main(train.main, d, [*args, "--out_dir=resumed", "--resume=True"])
    procs["evaluate"] = run_main(evaluate.main, d, args)
    procs["chat"] = run_main(chat.main, d, [*args, "--user_name=Alex", "--bot_name=Bob"],
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
    report = json.loads((d / "out" / "eval_report.json").read_text())
    assert report["val_loss"] < report["base_val_loss"]  # it learned something
    assert procs["chat"].stdout.count("Bob:") == 2
    tok = AutoTokenizer.from_pretrained(d / "out" / "best")
    if name == "llama":  # its own template, kept and used
        assert tok.chat_template == CHATML
        assert "<|im_start|>assistant\n" in report["sample_dialogue"]
        assert "FORMAT=chat_template" in procs["train"].stdout
    else:
        assert tok.chat_template == CHAT_TEMPLATE


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

def test_show_example(tmp_path, monkeypatch, capfd):
    model = save_tiny_llama(str(tmp_path / "m"))
    write_split(tmp_path, [DIALOGUE[:2]], [DIALOGUE])
    before = sorted(os.listdir(tmp_path))
    p = in_process(train.main, tmp_path, [f"--model={model}", "--format=chat_template", "--train_speakers=['Bob']",
                                          "--show_example=True"], monkeypatch, capfd)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path)) == before
    assert "<|begin_of_text|><|im_start|>system\n" in p.stdout
    assert "<|im_start|>assistant\n\u27e6Hello, Alex!<|im_end|>\n\u27e7" in p.stdout
    ids = make_blocks(chat_tokenizer(), [DIALOGUE[:2]], 256, ["Bob"], role_map())[0]
    assert f"{len(ids[0])} tokens, {sum(ids[1])} trained (" in p.stdout


@pytest.mark.parametrize("case, args, mentions", [
    ("roles", ["--format=chat_template", "--roles={'Alex': 'user'}"], "speaker 'Bob' has no role in ROLES"),
    ("no template", ["--format=chat_template"], "has no chat template"),
    ("targets", ["--lora_r=4", "--lora_targets=['nope']"], "LORA_TARGETS=['nope']"),
    ("format", ["--format=chatml"], "FORMAT must be"),
    ("scratch", ["--lora_r=4", "--model=scratch"], "a scratch model"),
])
def test_bad_settings(tmp_path, monkeypatch, capfd, case, args, mentions):
    model = (save_tiny_gpt2 if case == "no template" else save_tiny_llama)(str(tmp_path / "m"))
    write_split(tmp_path, synthetic(6, speakers=["Alex", "Bob"]), synthetic(2, speakers=["Alex", "Bob"]))
    p = in_process(train.main, tmp_path, [f"--model={model}", "--device=cpu", *args], monkeypatch, capfd)
    assert mentions in one_error_line(p)
    assert not (tmp_path / "out").exists()


def test_lora_and_full_checkpoints_do_not_mix(family, tmp_path, monkeypatch, capfd):
    """Each family's checkpoint resumed as the other kind: LoRA as full fine-tuning, full fine-tuning as LoRA."""
    d, model, name, _ = family
    lora = "--lora_r=4" in FAMILIES[name][1]
    resume_with = "full" if lora else "lora"
    shutil.copytree(d / "resumed", tmp_path / "out")
    shutil.copy(d / "train_data.txt", tmp_path)
    shutil.copy(d / "val_data.txt", tmp_path)
    before = sorted(str(p.stat().st_mtime_ns) + str(p) for p in (tmp_path / "out").rglob("*"))
    extra = [a for a in FAMILIES[name][1] if not a.startswith("--lora_r")]
    p = in_process(train.main, tmp_path, [*family_args(model, extra), f"--lora_r={4 if resume_with == 'lora' else 0}",
                                          "--resume=True"], monkeypatch, capfd)
    line = one_error_line(p)
    assert f"(the run has --lora_r={4 if lora else 0})" in line
    assert sorted(str(p.stat().st_mtime_ns) + str(p) for p in (tmp_path / "out").rglob("*")) == before


def test_a_model_saved_in_several_files_loads(tmp_path):
    """Big models come as model-0000N-of-0000M.safetensors with an index, not one model.safetensors."""
    _, model = modeling.load(save_tiny_gpt2(str(tmp_path / "one")))
    model.save_pretrained(tmp_path / "split", max_shard_size="2MB")
    gpt2_tokenizer().save_pretrained(tmp_path / "split")
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert len(list((tmp_path / "split").glob("model-*-of-*.safetensors"))) > 1
    _, loaded = modeling.load(str(tmp_path / "split"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
