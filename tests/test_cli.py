"""Tests for what every script does at its edges (cli.py), and for how fast it answers: settings are parsed and checked
before torch or transformers is imported. Run: .venv/bin/python -m pytest -q tests/test_cli.py"""

import json
import os
import subprocess
import sys

import pytest

import cli
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
         ("bench_loss.py", ["--help"]), ("bench_loss.py", ["--bench_vocab=0"])]


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
    # 9: a CHECKPOINT that is not there is named; passing --checkpoint is not suggested to someone who just did
    missing = [e for e in errors if "/nonexistent" in e]
    assert len(missing) == 2 and all("--checkpoint" not in e for e in missing)


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
