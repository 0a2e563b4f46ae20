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
