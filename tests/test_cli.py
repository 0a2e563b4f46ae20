"""Tests for cli.py, what every script does at its edges: --name=value settings (names, values, types, a mistyped or
abbreviated one, --help with each setting's comment from config.py), how fast a script answers (settings are checked
before torch or transformers is imported), one-line errors, a run's own settings, and progress on a terminal or in a
log.

Run: .venv/bin/python -m pytest -q tests/test_cli.py
"""

import json
import os
import re
import subprocess
import sys

import pytest

import cli
import config
from conftest import ROOT, script_env


def test_load_config_reports_the_names_given():
    given = set()
    cfg = cli.load_config(["--epochs=5", "--Learning-Rate=1e-3"], given=given)
    assert given == {"EPOCHS", "LEARNING_RATE"}
    assert cfg.EPOCHS == 5 and cfg.LEARNING_RATE == 1e-3
    assert "given" not in vars(cfg)  # the settings stay the settings: config.json holds nothing else


@pytest.mark.parametrize("arg, words", [("--epochs=1.5", "expected an int like 3, got a float"),
                                        ("--learning_rate=fast", "expected a float like 5e-05, got a str"),
                                        ("--betas=1", "expected a tuple like (0.9, 0.999), got an int")])
def test_type_errors_read_well(arg, words):
    with pytest.raises(cli.UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        cli.load_config([arg])


def test_a_missing_path_is_shown_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = cli.no_such("TRAIN_FILE", "data/train.txt")
    assert line == (f"TRAIN_FILE 'data/train.txt' does not exist ({tmp_path / 'data' / 'train.txt'}: paths are "
                    f"relative to the current directory)")
    assert cli.no_such("CHECKPOINT", "/nonexistent") == "CHECKPOINT '/nonexistent' does not exist"


def test_which_model_is_one_rule_for_evaluate_and_chat(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = lambda *args: cli.load_config(list(args))
    with pytest.raises(cli.UserError, match=r"^model directory 'out/best' does not exist .*: run train.py first, or "
                                            r"pass --checkpoint=DIR$"):
        cli.which_model(cfg())
    with pytest.raises(cli.UserError, match=r"^CHECKPOINT 'mine' does not exist \("):
        cli.which_model(cfg("--checkpoint=mine"))
    (tmp_path / "out" / "best").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    assert cli.which_model(cfg()) == os.path.join("out", "best")
    assert cli.which_model(cfg("--checkpoint=mine")) == "mine"
    assert cli.which_model(cfg("--out_dir=elsewhere", "--checkpoint=mine")) == "mine"  # CHECKPOINT wins


# ---------------------------------------------------------------------------------------------------------------------
# --name=value: names, values, types

@pytest.mark.parametrize("arg", ["--VAL_FRACTION=0.5", "--val_fraction=0.5", "--Val-Fraction=0.5"])
def test_setting_names_are_case_insensitive(arg):
    assert cli.load_config([arg]).VAL_FRACTION == 0.5


def test_overrides_do_not_leak_into_the_next_load():
    cli.load_config(["--seed=7"])
    assert cli.load_config([]).SEED == config.SEED


def test_values_are_python_literals():
    cfg = cli.load_config(["--seed=42", "--compile=True", "--betas=(0.8, 0.95)", "--train_speakers=['Bob']",
                           "--data_file='my data.json'"])
    assert cfg.SEED == 42 and type(cfg.SEED) is int
    assert cfg.COMPILE is True
    assert cfg.BETAS == (0.8, 0.95)
    assert cfg.TRAIN_SPEAKERS == ["Bob"]
    assert cfg.DATA_FILE == "my data.json"


@pytest.mark.parametrize("value", ["mydata", "dir/my data.jsonl", "x.json"])
def test_a_bare_word_is_a_string(value):
    assert cli.load_config([f"--data_file={value}"]).DATA_FILE == value


def test_an_int_for_a_float_setting_becomes_a_float():
    value = cli.load_config(["--val_fraction=1"]).VAL_FRACTION
    assert value == 1.0 and type(value) is float


@pytest.mark.parametrize("arg", ["--val_fraction=abc", "--seed=1.5", "--seed=True", "--compile=1", "--model=3"])
def test_a_type_mismatch_is_rejected(arg):
    with pytest.raises(cli.UserError, match="expected a"):
        cli.load_config([arg])


def test_an_unknown_name_suggests_the_closest():
    with pytest.raises(cli.UserError, match="--val_fractoin") as e:
        cli.load_config(["--val_fractoin=0.1"])
    assert "--val_fraction" in str(e.value)


@pytest.mark.parametrize("args, example", [(["val_fraction=0.5"], "--val_fraction=0.5"), (["-seed=1"], "--seed=1"),
                                           (["--val_fraction"], "--val_fraction=0.2"),
                                           (["--epochs", "--seed=1"], "--epochs=3")])
def test_an_argument_without_a_value_is_rejected_with_an_example_of_its_own_name(args, example):
    with pytest.raises(cli.UserError, match="--name=value|needs a value") as e:
        cli.load_config(args)
    assert f"e.g. {example}" in str(e.value)


def test_both_command_line_habits():
    """--name value as argparse and the Hugging Face scripts take it, a bare --flag for True, --no_flag for False,
    next to --name=value; and a True/False after a bare flag is its value."""
    given = set()
    cfg = cli.load_config(["--epochs", "5", "--lr-schedule", "linear", "--compile", "--no_use_chosen",
                           "--learning_rate=1e-3", "--betas", "(0.8, 0.9)", "--fsdp", "false", "--resume", "True"],
                          given=given)
    assert (cfg.EPOCHS, cfg.LR_SCHEDULE, cfg.COMPILE, cfg.USE_CHOSEN, cfg.LEARNING_RATE, cfg.BETAS, cfg.FSDP,
            cfg.RESUME) == (5, "linear", True, False, 1e-3, (0.8, 0.9), False, True)
    assert given == {"EPOCHS", "LR_SCHEDULE", "COMPILE", "USE_CHOSEN", "LEARNING_RATE", "BETAS", "FSDP", "RESUME"}
    assert cli.load_config(["--max_steps", "-1"]).MAX_STEPS == -1  # a negative number is a value, not a flag
    with pytest.raises(cli.UserError, match="--no_epochs"):  # --no_ is for True/False settings only
        cli.load_config(["--no_epochs"])


# ---------------------------------------------------------------------------------------------------------------------
# --help: each setting with its comment from config.py

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
    start = next(i for i, line in enumerate(lines) if line.startswith("settings (override"))
    for line in lines[lines.index("", start) + 1:]:
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
    assert out.startswith("train.py: the doc\n\nsettings (override with --name=value or --name value")
    assert "python train.py experiments/small_lr.py" in " ".join(out.split()) and "to repeat that run" in out
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


# ---------------------------------------------------------------------------------------------------------------------
# a mistyped or abbreviated setting

@pytest.mark.parametrize("flag, meant", [("--lr", "--learning_rate"), ("--bs", "--batch_size"),
                                         ("--batch", "--batch_size"), ("--epoch", "--epochs"),
                                         ("--steps", "--max_steps"), ("--lora", "--lora_r"),
                                         ("--output_dir", "--out_dir"), ("--learning_rat", "--learning_rate"),
                                         ("--bf16", "--precision=bf16"), ("--fp16", "--precision=fp16"),
                                         ("--num_train_epochs", "--epochs"),
                                         ("--overwrite_output_dir", "--overwrite=True")])
def test_abbreviations_suggest_the_setting_meant(flag, meant):
    with pytest.raises(cli.UserError) as e:
        cli.load_config([f"{flag}=1"])
    assert str(e.value).endswith(f"did you mean {meant}?") or f"did you mean {meant}," in str(e.value)


def test_aliases_name_real_settings():
    names = set(cli.defaults())
    for alias, meant in cli.ALIASES.items():
        name, _, value = meant.partition("=")
        assert name in names or alias == "CONFIG", alias
        assert not value or cli.load_config([f"--{meant.lower()}"])  # --precision=bf16 is a value it takes
    assert not set(cli.ALIASES) & names
    with pytest.raises(cli.UserError, match=r"^unknown setting --config: an experiment file is given as it is"):
        cli.load_config(["--config=experiments/small_lr.py"])
    assert cli.load_config(["--epochs=1"]).EPOCHS == 1  # a real setting is never taken for an abbreviation


# ---------------------------------------------------------------------------------------------------------------------
# start-up: --help and setting errors come before the heavy imports

# Runs each script's __main__ in one process, as `python script.py ARGS` would, and reports its exit code and whether
# torch or transformers had been imported by then.
PROBE = """
import json, runpy, sys
sys.path.insert(0, {root!r})
out = []
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    out.append([script, code, sorted(m for m in ("torch", "transformers") if m in sys.modules)])
print(json.dumps(out))
"""

EARLY = [("prepare_data.py", ["--help"]), ("prepare_data.py", ["--val_fraction=2"]),
         ("train.py", ["--help"]), ("train.py", ["--learning_rate=0"]), ("train.py", ["--epochs=1.5"]),
         ("train.py", ["--no_such_setting=1"]), ("train.py", ["--train_file=nope.txt"]),
         ("evaluate.py", ["--help"]), ("evaluate.py", ["--checkpoint=/nonexistent"]), ("evaluate.py", ["--top_k=x"]),
         ("chat.py", ["--help"]), ("chat.py", ["--checkpoint=/nonexistent"]), ("chat.py", ["--bot_name=Alex"]),
         ("bench.py", ["--help"]), ("bench.py", ["--bench_stpes=3"]), ("bench.py", ["--bench_shape=(2, 64, 3)"]),
         ("bench_scale.py", ["--help"]), ("bench_scale.py", ["--bench_scales=(0,)"]),
         ("bench_loss.py", ["--help"]), ("bench_loss.py", ["--bench_vocab=0"]),
         # every script reads its command line one way: --name value, and other tools' names point to ours
         ("bench_loss.py", ["--bench_vocab", "0"]), ("bench.py", ["--bf16"]), ("chat.py", ["--temperature", "x"])]


def test_settings_are_checked_before_torch_is_imported(tmp_path):
    (tmp_path / "train_data.txt").write_text("Alex: Hi.\nBob: Hello.\n")
    (tmp_path / "val_data.txt").write_text("Alex: Hi.\nBob: Hello.\n")
    os.makedirs(tmp_path / "out" / "best")  # so chat.py gets as far as the names
    cases = [(os.path.join(ROOT, s), a) for s, a in EARLY]
    p = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT), json.dumps(cases)], cwd=tmp_path,
                       env=script_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for (script, args), (_, code, heavy) in zip(EARLY, results):
        assert code == (0 if args == ["--help"] else 2), (script, args, p.stderr)
        assert heavy == [], f"{script} {' '.join(args)} imported {heavy} before answering"
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == sum(args != ["--help"] for _, args in EARLY)  # one line per mistake
    # a CHECKPOINT that is not there is named; passing --checkpoint is not suggested to someone who just did
    missing = [e for e in errors if "/nonexistent" in e]
    assert len(missing) == 2 and all("--checkpoint" not in e for e in missing)
    assert errors[-3:] == ["error: BENCH_VOCAB, BLOCK_SIZE, BATCH_SIZE and BENCH_STEPS must be >= 1, BENCH_WARMUP >= 0",
                           "error: unknown setting --bf16; did you mean --precision=bf16?",
                           "error: --temperature=x: expected a float like 0.8, got a str"]


def test_outside_torchrun_an_error_is_printed(capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def main():
        raise cli.UserError("boom")

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: boom\n"


# ---------------------------------------------------------------------------------------------------------------------
# a run's settings: one rule for resume, evaluate.py and chat.py

RUN = {**cli.defaults(), "MODEL": "scratch", "TRAIN_SPEAKERS": ["Bob"], "BLOCK_SIZE": 64, "BETAS": [0.9, 0.98],
       "TEMPERATURE": 0.3, "NUM_REPLIES": 7, "OUT_DIR": "elsewhere", "global_batch": 8}


def settings(args, saved=RUN, fixed=()):
    given, said = set(), []
    cfg = cli.load_config(args, given=given)
    out, taken = cli.run_settings(cfg, given, saved, "out/config.json", said.append, fixed)
    return out, taken, said


def test_the_run_s_own_settings_are_taken_and_the_scripts_own_are_not():
    cfg, taken, said = settings([])
    assert (cfg.MODEL, cfg.TRAIN_SPEAKERS, cfg.BLOCK_SIZE, cfg.BETAS) == ("scratch", ["Bob"], 64, (0.9, 0.98))
    assert taken == ["MODEL", "BLOCK_SIZE", "BETAS", "TRAIN_SPEAKERS"]  # config.py's order
    # where the run is and what evaluate.py and chat.py generate are this command's, never the run's
    assert (cfg.OUT_DIR, cfg.TEMPERATURE, cfg.NUM_REPLIES) == ("out", 0.8, 20)
    assert said == [] and "global_batch" not in vars(cfg)  # nothing overridden; config.json's extras stay there


def test_the_command_line_overrides_the_run_and_says_so():
    cfg, taken, said = settings(["--train_speakers=['Alex']", "--block_size=64", "--temperature=0.5"])
    assert cfg.TRAIN_SPEAKERS == ["Alex"] and cfg.BLOCK_SIZE == 64 and cfg.TEMPERATURE == 0.5
    assert said == ["the command line overrides the run's settings (out/config.json): --train_speakers=['Alex'] "
                    "(the run has --train_speakers=['Bob'])"]  # the same value as the run's, or a script's own: no
    assert "TRAIN_SPEAKERS" not in taken


def test_a_setting_newer_than_the_run_is_config_py_s():
    saved = {k: v for k, v in RUN.items() if k != "VAL_MAX_TOKENS"}
    cfg, _, said = settings(["--val_max_tokens=5"], saved)
    assert cfg.VAL_MAX_TOKENS == 5 and said and "(the run has --val_max_tokens=100000)" in said[0]


def test_no_run_no_change():
    cfg, taken, said = settings(["--block_size=32"], saved={})
    assert cfg.BLOCK_SIZE == 32 and cfg.MODEL == "distilgpt2" and taken == [] and said == []


def test_fixed_settings_are_refused_all_named_and_nothing_said():
    with pytest.raises(cli.UserError) as e:
        settings(["--block_size=32", "--model=gpt2", "--epochs=9"], fixed=["MODEL", "BLOCK_SIZE"])
    assert ("--block_size=32 (the run has --block_size=64), --model='gpt2' (the run has --model='scratch')"
            in str(e.value))
    assert "--epochs" not in str(e.value)


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


# ---------------------------------------------------------------------------------------------------------------------
# an experiment is a file: NAME = value lines, or a run's config.json

def test_an_experiment_file_overrides_config_py_and_the_command_line_overrides_it(tmp_path):
    exp = tmp_path / "exp.py"
    exp.write_text('"""my experiment"""\nLEARNING_RATE = 2e-5  # gentler\nEPOCHS = 5\nBETAS = (0.8, 0.9)\n'
                   'OUT_DIR = "out/exp"\n')
    given = set()
    cfg = cli.load_config([str(exp), "--epochs", "2"], given=given)
    assert (cfg.LEARNING_RATE, cfg.EPOCHS, cfg.BETAS, cfg.OUT_DIR) == (2e-5, 2, (0.8, 0.9), "out/exp")
    assert cfg.SEED == config.SEED and given == {"LEARNING_RATE", "EPOCHS", "BETAS", "OUT_DIR"}
    assert cli.load_config(["--epochs=2", str(exp)]).EPOCHS == 2  # wherever the file is on the line


@pytest.mark.parametrize("text, words", [
    ("EPOCHS = 2\nLERNING_RATE = 1e-4\n", r"exp.py:2: unknown setting LERNING_RATE; did you mean LEARNING_RATE"),
    ("BF16 = True\n", r"exp.py:1: unknown setting BF16; did you mean PRECISION = 'bf16'\?"),
    ("import os\nEPOCHS = 1\n", r"exp.py:1: expected NAME = value, got 'import os'"),
    ("EPOCHS = int('3')\n", r"exp.py:1: EPOCHS's value must be a literal .*: \"int\('3'\)\""),
    ("EPOCHS = 1.5\n", r"exp.py:1: EPOCHS = 1.5: expected an int like 3, got a float"),
    ("EPOCHS = \n", r"exp.py:1: not a NAME = value line")])
def test_an_experiment_file_is_read_never_run_and_its_mistakes_name_the_line(tmp_path, text, words):
    (tmp_path / "exp.py").write_text(text)
    with pytest.raises(cli.UserError, match=words):
        cli.load_config([str(tmp_path / "exp.py")])


def test_a_run_s_config_json_repeats_the_run(tmp_path):
    saved = {**cli.defaults(), "EPOCHS": 7, "BETAS": [0.8, 0.9], "RESUME": True, "global_batch": 8,
             "torchrun_job": "none"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = cli.load_config([str(tmp_path / "config.json"), "--out_dir=again"])
    assert (cfg.EPOCHS, cfg.BETAS, cfg.OUT_DIR, cfg.RESUME) == (7, (0.8, 0.9), "again", False)  # not its RESUME
    assert "global_batch" not in vars(cfg)
    (tmp_path / "config.json").write_text(json.dumps({"EPOCHS": 7, "GONE_SETTING": 1}))
    with pytest.raises(cli.UserError, match=r"config.json: unknown setting GONE_SETTING"):
        cli.load_config([str(tmp_path / "config.json")])


def test_the_shipped_experiments_hold_real_settings():
    for name in os.listdir(os.path.join(ROOT, "experiments")):
        cli.load_config([os.path.join(ROOT, "experiments", name)])


def test_one_experiment_file_at_a_time(tmp_path):
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text("EPOCHS = 1\n")
    with pytest.raises(cli.UserError, match="more than one experiment file"):
        cli.load_config([str(tmp_path / "a.py"), str(tmp_path / "b.py")])
    with pytest.raises(cli.UserError, match=r"experiment file 'nope.py' does not exist"):
        cli.load_config(["nope.py"])
