"""What a user meets at the edges of a run (issue 21): CPU threads, the memory preflight, --help's explanations, a
mistyped or abbreviated setting, a MODEL path that is not there, library warnings, and progress in a log.

Run: .venv/bin/python -m pytest -q tests/test_edges.py
"""

import logging
import os
import re
import warnings

import pytest
import torch
import transformers

import checkpoints
import cli
import config
import hardware
import loss
import memory
import modeling
from conftest import in_background, run_script_env, script_env
from tiny import save_tiny_gpt2, save_tiny_llama, synthetic, write_split

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="module", autouse=True)
def processes(request, tmp_path_factory, tiny_model):
    """The module's real train.py runs, started from its start one after another in a thread, while the tests before
    theirs run in this process. test name -> Future of (its directory, the CompletedProcess)."""
    env = script_env(ENV)  # made now: the tests in this process change os.environ meanwhile
    d = tmp_path_factory.mktemp
    jobs = {"test_an_absurd_block_size_is_refused_in_seconds": (
                train_py, d("absurd"), env, (synthetic(20, seed=1), synthetic(5, seed=2)),
                ["--model=scratch", "--block_size=100000", "--scratch_vocab=300", "--device=cpu"]),
            "test_train_in_a_log_has_no_bar_frames": (
                train_py, d("log"), env, (synthetic(40, seed=2), synthetic(8, seed=3)),
                [f"--model={tiny_model}", "--device=cpu", "--max_steps=20", "--block_size=64", "--batch_size=2",
                 "--eval_interval=10", "--learning_rate=1e-3"])}
    with in_background(request, jobs) as started:
        yield started


def train_py(d, env, data, args):
    """train.py as a user runs it, from d, which holds `data`'s train and val files."""
    write_split(d, *data)
    return d, run_script_env(env, "train.py", *args, cwd=d, timeout=300)


# ---------------------------------------------------------------------------------------------------------------------
# threads: the cores this process may use, shared among the ranks on this machine

@pytest.mark.parametrize("cores, ranks, env, default, threads", [
    (8, 1, {}, 8, 8),
    (8, 2, {}, 8, 4),  # torchrun --nproc_per_node=2: half each
    (8, 3, {}, 8, 2),
    (2, 4, {}, 2, 1),  # more ranks than cores: still one thread each
    (16, 1, {}, 8, 8),  # never more than torch's own default (physical cores)
    (4, 1, {}, 8, 4),  # taskset to 4 of the 8: 4
    (8, 1, {"OMP_NUM_THREADS": "3"}, 3, None),  # the user chose: left alone
])
def test_cpu_threads(cores, ranks, env, default, threads):
    assert hardware.cpu_threads(cores, ranks, env, default) == threads


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_device_line_says_how_many_threads(monkeypatch, keep_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cores", lambda: 4)
    monkeypatch.setattr(hardware, "TORCH_THREADS", 64)
    _, _, line = hardware.pick("cpu", processes=2)
    assert line == "device: cpu (DEVICE setting), fp32, 2 threads (4 cores / 2 processes)"
    assert torch.get_num_threads() == 2

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    _, _, line = hardware.pick("cpu")
    assert line.endswith(", fp32, 1 thread (OMP_NUM_THREADS)") and torch.get_num_threads() == 1


# ---------------------------------------------------------------------------------------------------------------------
# memory preflight

def gpt2(n_layer=2, n_embd=32, n_head=2, vocab=512, positions=4096, dropout=0.1):
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(config)


CPU = torch.device("cpu")


def total(shape, *args, **kw):
    return sum(memory.step_memory(shape, *args, **kw).values())


def test_the_estimate_grows_with_batch_and_block_and_shrinks_with_checkpointing_and_lora(tmp_path):
    shape = memory.model_shape(gpt2(), CPU)
    assert shape["scores"]  # SDPA on CPU with attention dropout: the scores are materialized, O(T^2)
    for ckpt in (False, True):
        by_batch = [total(shape, b, 256, ckpt) for b in (1, 2, 4, 8)]
        by_block = [total(shape, 4, t, ckpt) for t in (64, 128, 256, 512)]
        assert by_batch == sorted(set(by_batch)) and by_block == sorted(set(by_block))
    assert total(shape, 8, 512, True) < total(shape, 8, 512, False)
    # quadratic in the block where the scores are materialized, linear where attention is a fused kernel
    assert total(shape, 1, 8192, False) > 6 * total(shape, 1, 2048, False)
    fused = memory.model_shape(gpt2(dropout=0.0), CPU)
    assert not fused["scores"] and memory.step_memory(fused, 1, 8192, False)["attention scores"] == 0

    path = save_tiny_gpt2(str(tmp_path / "m"))
    full = modeling.adapt(modeling.load(path)[1], cli.load_config([]))
    lora = modeling.adapt(modeling.load(path)[1], cli.load_config(["--lora_r=4"]))
    full_terms = memory.estimate(full, cli.load_config([]), CPU)
    lora_terms = memory.estimate(lora, cli.load_config(["--lora_r=4"]), CPU)
    assert lora_terms["gradients and AdamW state"] < full_terms["gradients and AdamW state"] / 50
    assert sum(lora_terms.values()) < sum(full_terms.values())


def test_preflight_refuses_warns_or_passes(monkeypatch):
    model = gpt2(n_layer=8)
    cfg = cli.load_config(["--batch_size=8", "--block_size=2048", "--model=some/model"])
    terms = memory.estimate(model, cfg, CPU)
    need = sum(terms.values()) - terms["weights"]  # the weights are loaded already
    cfg.GRADIENT_CHECKPOINTING = True
    terms = memory.estimate(model, cfg, CPU)
    need_ckpt = sum(terms.values()) - terms["weights"]
    cfg.GRADIENT_CHECKPOINTING = False
    assert need_ckpt < need
    for room, expect in ((need * 2, None), (need * 1.1, "warning: "), ((need + need_ckpt) / 2, cli.UserError)):
        monkeypatch.setattr(hardware, "available_memory", lambda device, processes=1: (int(room), "available RAM"))
        if expect is cli.UserError:
            with pytest.raises(cli.UserError) as e:
                memory.preflight(model, cfg, CPU)
            line = str(e.value)
            assert "\n" not in line and "BATCH_SIZE=8 x BLOCK_SIZE=2048" in line and "available RAM" in line
            assert f"{memory.gb(room)}" in line and "attention scores" in line and "logits" in line
            assert "--batch_size=" in line and "--block_size=" in line and "--gradient_checkpointing=True" in line
        else:
            note = memory.preflight(model, cfg, CPU)
            assert note is None if expect is None else note.startswith(expect)


def test_the_settings_suggested_do_fit():
    shape = memory.model_shape(gpt2(), CPU)
    cfg = cli.load_config(["--batch_size=8", "--grad_accum_steps=2", "--block_size=4096", "--model=some/model"])
    need = lambda b, t, ck=False, trained=None: (total(shape, b, t, ck, trained=trained)
                                                 - memory.step_memory(shape, b, t, ck)["weights"])
    room = need(8, 4096) // 3
    fits = memory.fitting_settings(shape, cfg, room, False)
    flags = dict(f.split("=") for s in fits for f in s.split() if f.startswith("--"))
    assert "--lora_r" not in flags  # LoRA's saving is the gradients and AdamW state: not what is short here
    batch, block = int(flags["--batch_size"]), int(flags["--block_size"])
    assert need(batch, 4096) <= room < need(batch * 2, 4096) and 8 % batch == 0
    assert int(flags["--grad_accum_steps"]) == 2 * 8 // batch  # the same global batch
    assert need(8, block) <= room < need(8, block + 8) and block % 8 == 0
    # nothing fits where even one short sequence does not
    assert memory.fitting_settings(shape, cfg, 1000, False) == []


def test_an_absurd_block_size_is_refused_in_seconds(processes):
    """--model=scratch --block_size=100000 was killed by the kernel at 18 GB with no message."""
    tmp_path, p = processes["test_an_absurd_block_size_is_refused_in_seconds"].result()
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("error: a training step of BATCH_SIZE=8 x BLOCK_SIZE=100000 needs about")
    assert "these would fit: " in lines[0] and "--block_size=" in lines[0]
    assert "--lora_r" not in lines[0]  # a scratch model cannot take LoRA
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --help, abbreviations, a MODEL path that is not there

def config_py():
    """config.py read plainly, line by line (not as cli.config_comments reads it): [heading, NAME, comment] in file
    order. A heading is a comment line after a blank one; a setting's comment is what follows "  # " on its line, and
    the comment-only lines right below it go on with it."""
    out, heading, going_on, after_blank = [], None, False, True
    with open(config.__file__, encoding="utf-8") as f:
        for line in f.read().splitlines():
            setting = re.match(r"([A-Z_]+) = .*?  # (.*)", line)
            if setting:
                out.append([heading, setting[1], setting[2].strip()])
            elif line.startswith("# ") and after_blank:
                heading = line[2:].strip()
            elif line.lstrip().startswith("#") and going_on:
                out[-1][2] += " " + line.lstrip().lstrip("#").strip()
            going_on, after_blank = bool(setting) or (going_on and line.lstrip().startswith("#")), not line.strip()
    return out


def help_sections(out):
    """--help's settings as [heading, the setting's text with its comment, unwrapped], in the order printed."""
    lines = out.splitlines()
    heading, sections = None, []
    for line in lines[lines.index("settings (override with --name=value; from config.py, which says why):") + 1:]:
        if line.startswith("  --"):
            sections.append([heading, line])
        elif line.startswith(" "):
            sections[-1][1] += "\n" + line
        elif line:
            heading = line
    return sections


def test_help_shows_each_settings_comment(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # the terminal's width: comments wrap, and SAMPLE_PROMPT's goes below it
    with pytest.raises(SystemExit) as e:
        cli.load_config(["--help"], doc="train.py: the doc")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("train.py: the doc\n\nsettings (override with --name=value")
    settings = config_py()
    assert [name for _, name, _ in settings] == list(cli.defaults()), "settings without a comment in config.py"
    # textwrap breaks lines at spaces and after hyphens ("fine-" / "tuning"), so the text is compared without them
    bare = lambda text: "".join(text.split())
    shown = help_sections(out)
    assert [(h, bare(text)) for h, text in shown] == [
        (h, bare(f"--{name.lower()}={getattr(config, name)!r} {comment}")) for h, name, comment in settings]
    # wrapped to the terminal: no line wider than 79, each comment's next lines indented under the flags
    assert max(map(len, out.splitlines())) <= 79
    wrapped = [text for _, text in shown if "\n" in text]
    assert len(wrapped) > 10 and all(line.startswith(" " * 8) and not line.startswith(" " * 8 + "--")
                                     for text in wrapped for line in text.split("\n")[1:])
    prompt = next(text for _, text in shown if text.startswith("  --sample_prompt="))
    assert prompt.split("\n")[:2] == ["  --sample_prompt='Alex: Hi, how are you?\\nBob:'",
                                       "          a conversation in the training format, ending with a label"]
    # as a reader sees them: a comment that goes on below its setting is kept whole, a heading is a line of its own
    said = " ".join(out.split())
    assert "--learning_rate=5e-05 peak lr; right for" in said and "\noptimization\n" in out
    assert ("--roles=None chat_template: speaker -> role, e.g. {\"Bob\": \"assistant\", \"*\": \"user\"}; None: "
            "TRAIN_SPEAKERS are the assistant") in said
    assert "dialogues up to this many tokens, in train.py and evaluate.py alike: a cap on each pass's cost" in said
    # what --help is built from: cli's reading of config.py is the plain one
    notes, groups = cli.config_comments()
    assert notes == {name: comment for _, name, comment in settings}
    assert groups == {name: h for i, (h, name, _) in enumerate(settings) if i == 0 or settings[i - 1][0] != h}


@pytest.mark.parametrize("flag, meant", [("--lr", "--learning_rate"), ("--bs", "--batch_size"),
                                         ("--batch", "--batch_size"), ("--epoch", "--epochs"),
                                         ("--steps", "--max_steps"), ("--lora", "--lora_r"),
                                         ("--output_dir", "--out_dir"), ("--learning_rat", "--learning_rate")])
def test_abbreviations_suggest_the_setting_meant(flag, meant):
    with pytest.raises(cli.UserError) as e:
        cli.load_config([f"{flag}=1"])
    assert str(e.value).endswith(f"did you mean {meant}?") or f"did you mean {meant}," in str(e.value)


def test_aliases_name_real_settings():
    names = set(cli.defaults())
    assert set(cli.ALIASES.values()) <= names and not set(cli.ALIASES) & names
    assert cli.load_config(["--epochs=1"]).EPOCHS == 1  # a real setting is never taken for an abbreviation


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
# progress: a bar on a terminal, plain lines in a log

def test_a_log_gets_a_line_every_tenth(capsys):
    bar = cli.progress(total=20, desc="train", unit="step")
    assert isinstance(bar, cli.LogProgress)  # capsys: stderr is not a terminal
    with bar:
        for i in range(20):
            bar.set_postfix(loss=f"{i:.1f}")
            bar.update(1)
        bar.write("a line of its own")
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("train: 10% 2/20 step [00:00") and lines[0].endswith("loss=1.0")
    assert lines[-1].startswith("train: 100% 20/20 step") and out == "a line of its own\n"
    assert list(cli.progress(range(5), desc="validation", leave=False)) == list(range(5))
    assert list(cli.progress(range(5), desc="hidden", disable=True)) == list(range(5))
    assert capsys.readouterr().err == ""  # a transient bar under 10 s, and a disabled one: nothing


def test_train_in_a_log_has_no_bar_frames(processes):
    _, p = processes["test_train_in_a_log_has_no_bar_frames"].result()  # 20 steps, stderr to a pipe
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "\x1b" not in p.stderr
    lines = p.stderr.splitlines()
    assert [line.split()[1] for line in lines] == [f"{10 * k}%" for k in range(1, 11)], p.stderr
    assert all(line.startswith("train: ") and " loss=" in line for line in lines)
    assert "step 10: val loss" in p.stdout and "1 thread (OMP_NUM_THREADS)" in p.stdout
