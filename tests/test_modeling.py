"""Tests for modeling.py: loading a model (a local directory, one saved in several files, a MODEL path that is not
there, Hub ids), adapting it (LoRA, gradient checkpointing) on GPT-2, Llama and GPT-NeoX without touching what is
not ours to change and without library warnings that are noise for our users, and the fused GELU.

Run: .venv/bin/python -m pytest -q tests/test_modeling.py
"""

import logging
import os
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.activations import NewGELUActivation

import checkpoints
import cli
import loss
import modeling
import step
import tiny
from batching import collate, make_blocks
from tiny import gpt2_tokenizer, save_tiny_gpt2, save_tiny_llama, save_tiny_neox, synthetic

SAVE = {"gpt2": save_tiny_gpt2, "llama": save_tiny_llama, "neox": save_tiny_neox}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("models") / "tiny"))


# ---------------------------------------------------------------------------------------------------------------------
# loading: a model in several files, a MODEL path that is not there

def test_a_model_saved_in_several_files_loads(tmp_path):
    """Big models come as model-0000N-of-0000M.safetensors with an index, not one model.safetensors."""
    _, model = modeling.load(save_tiny_gpt2(str(tmp_path / "one")))
    model.save_pretrained(tmp_path / "split", max_shard_size="2MB")
    gpt2_tokenizer().save_pretrained(tmp_path / "split")
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert len(list((tmp_path / "split").glob("model-*-of-*.safetensors"))) > 1
    _, loaded = modeling.load(str(tmp_path / "split"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("name", ["./missing_dir", "../missing_dir", "missing/dir/x", "~/no-such-model-dir"])
def test_a_missing_model_path_is_named(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = os.path.expanduser(name) if name.startswith("~") else str((tmp_path / name).resolve())
    for load in (modeling.load, modeling.load_tokenizer):
        with pytest.raises(cli.UserError) as e:
            load(name)
        assert where in str(e.value) and "does not exist" in str(e.value) and "Hub is" not in str(e.value)


def test_hub_ids_and_local_directories_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert modeling.local_path("gpt2") == "gpt2" and modeling.local_path("owner/name") == "owner/name"
    assert modeling.local_path("./models/mine") == "./models/mine"
    with pytest.raises(cli.UserError, match="does not exist"):  # 'models/x' is a path here: models/ is a directory
        modeling.local_path("models/x")
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(cli.UserError, match="is a file"):
        modeling.local_path("./weights.bin")


# ---------------------------------------------------------------------------------------------------------------------
# LoRA

def lora_cfg(**kw):
    return cli.load_config([f"--{k}={v!r}" for k, v in {"lora_r": 4, "lora_dropout": 0.0, **kw}.items()])


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_lora_trains_only_the_adapter(tmp_path, family):
    path = SAVE[family](str(tmp_path / "m"))
    tok, model = modeling.load(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = modeling.adapt(model, lora_cfg())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert any("mlp" in n for n in trained) and any("attn" in n or "attention" in n for n in trained)
    opt = step.make_optimizer(model, 1e-2, 0.0, (0.9, 0.999))
    x, y, _ = collate(make_blocks(tok, synthetic(8), 32)[:4], tok.eos_token_id)
    layout = tiny.single(model.train())
    for _ in range(2):
        step.train_step(layout, opt, None, [(x, y, None)], 1.0)
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


# ---------------------------------------------------------------------------------------------------------------------
# gradient checkpointing, and code for one architecture that leaves the others alone

@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, family):
    path = SAVE[family](str(tmp_path / "m"))
    grads = []
    for on in (False, True):
        tok, model = modeling.load(path)
        model = modeling.adapt(model, cli.load_config([f"--gradient_checkpointing={on}"])).train()
        assert getattr(model, "is_activation_checkpointing", model.is_gradient_checkpointing) == on
        x, y, _ = collate(make_blocks(tok, synthetic(8), 32)[:4], tok.eos_token_id)
        loss, _ = step.forward_backward(tiny.single(model), [(x, y, None)])
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert max((g0[n] - g1[n]).abs().max().item() for n in g0) < 1e-6


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_architecture_specific_code_leaves_other_families_alone(tmp_path, family):
    path = SAVE[family](str(tmp_path / "m"))
    x = torch.randint(0, 50257, (2, 16))
    ours, plain = modeling.load(path)[1].eval(), AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(ours(x).logits, plain(x).logits)


# ---------------------------------------------------------------------------------------------------------------------
# library warnings that are noise for our users

@pytest.fixture
def no_warnings(caplog):
    """Fails the test if anything warns: Python warnings, or log records from peft or transformers."""
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("peft", "transformers")] == []


@pytest.mark.parametrize("ckpt", [False, True])
def test_lora_and_checkpointing_on_gpt2_say_nothing(tiny_model, ckpt, request):
    _, model = modeling.load(tiny_model)
    request.getfixturevalue("no_warnings")
    cfg = cli.load_config(["--lora_r=4", f"--gradient_checkpointing={ckpt}"])
    model = modeling.adapt(model, cfg).train()
    x = torch.randint(0, 50257, (2, 16))
    loss.model_loss(model, x, x).backward()


def test_checkpointing_alone_says_nothing(tiny_model, request):
    _, model = modeling.load(tiny_model)
    request.getfixturevalue("no_warnings")
    model = modeling.adapt(model, cli.load_config(["--gradient_checkpointing=True"])).train()
    x = torch.randint(0, 50257, (2, 16))
    loss.model_loss(model, x, x).backward()


def test_llama_lora_says_nothing(tmp_path, request):
    _, model = modeling.load(save_tiny_llama(str(tmp_path / "llama")))
    request.getfixturevalue("no_warnings")
    modeling.adapt(model, cli.load_config(["--lora_r=4"]))


def test_telling_peft_about_conv1d_changes_no_arithmetic(tiny_model):
    """peft, left to find GPT-2's Conv1D itself, sets fan_in_fan_out=True and warns: the same model results."""
    from peft import LoraConfig, get_peft_model
    cfg = cli.load_config(["--lora_r=4", "--lora_dropout=0.0"])
    ours = modeling.adapt(modeling.load(tiny_model)[1], cfg)
    torch.manual_seed(cfg.SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(modeling.load(tiny_model)[1], LoraConfig(
            r=4, lora_alpha=cfg.LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():  # B is zero at init: give it values, so the adapters take part in the output
        for k in a:
            if "lora_B" in k:
                a[k].normal_()
                b[k].copy_(a[k])
    x = torch.randint(0, 50257, (2, 16))
    assert torch.equal(ours(input_ids=x).logits, theirs(input_ids=x).logits)
    assert torch.equal(checkpoints.merged_state_dict(ours)["transformer.h.0.attn.c_attn.weight"],
                       checkpoints.merged_state_dict(theirs)["transformer.h.0.attn.c_attn.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# speed-ups that compute what the model's own code does

def test_fused_gelu_computes_what_gelu_new_does():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2,
                                                                 vocab_size=100)).eval()
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        before = model(input_ids=x).logits
        assert any(isinstance(m, NewGELUActivation) for m in model.modules())
        modeling.fused_gelu(model)
        assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
        after = model(input_ids=x).logits
    assert (before - after).abs().max().item() < 1e-5
    assert model.config.activation_function == "gelu_new"  # what is saved is unchanged
