"""evaluate.py end to end: its report on conftest's trained_run (the figures of its replies, its losses against
training's, per speaker), a scratch run, a model in its own chat template, bad input, and a damaged or unsafe model
refused; and the report as a function of the figures alone.

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

import json
import math
import os
import shutil
import types
from collections import Counter

import numpy as np
import pytest
import transformers

import batching
import cli
import evaluate
import generation
import step
import tiny
from conftest import in_background, last_error_line, one_error_line, run
from dialogues import read_dialogues
from render import Rendering, chat_pieces, prompt, render, role_map
from test_train_faults import evil, put_pickle, truncate  # evil: a fixture, found here by pytest
from tiny import EOS_ID, chat_tokenizer, metrics, save_tiny_gpt2, save_tiny_llama, synthetic, write_split

FAST = ["--num_replies=4", "--max_new_tokens=12", "--sample_max_new_tokens=20"]
# one thread: the process runs beside this one, and torch's threads fighting over few cores made token-by-token
# sampling several times slower
ENV = {"OMP_NUM_THREADS": "1"}


def evaluate_py(run_dir):
    """evaluate.py as a user runs it, a process, from the run's directory."""
    return run("evaluate.py", "--device=cpu", *FAST, cwd=run_dir, env=ENV, process=True)


@pytest.fixture(scope="module", autouse=True)
def processes(request, trained_run):
    """The real evaluate.py, started once the run is trained, while the tests before the ones that look at it run in
    this process. name -> Future of its CompletedProcess."""
    with in_background(request, {"evaluated": (evaluate_py, trained_run)}) as started:
        yield started


@pytest.fixture(scope="module")
def evaluated(processes):
    """evaluate.py's run on the trained run, as a user runs it: its CompletedProcess, once done."""
    return processes["evaluated"].result()


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    """A scratch model trained, then evaluated as evaluate.py --checkpoint=out/final, both in this process."""
    d = tmp_path_factory.mktemp("scratch")
    write_split(d, synthetic(24, seed=5), synthetic(6, seed=6, min_turns=2))
    p = run("train.py", "--device=cpu", "--model=scratch", "--scratch_layers=2", "--scratch_heads=2",
            "--scratch_embd=32", "--scratch_vocab=512", "--block_size=128", "--batch_size=4", "--max_steps=4",
            "--eval_interval=2", "--learning_rate=1e-3", "--warmup_steps=1", cwd=d)
    assert p.returncode == 0, p.stderr
    p = run("evaluate.py", "--device=cpu", "--checkpoint=out/final", *FAST, cwd=d)
    assert p.returncode == 0, p.stderr
    return d


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("tiny64") / "model"), n_positions=64)


# ---------------------------------------------------------------------------------------------------------------------
# the reply figures: words, token F1 and distinct-n by hand, and what the replies say

def f1_by_hand(pred, ref):
    """Word-overlap F1 as multisets: the harmonic mean of the shares of each side's words found in the other."""
    p, r = Counter(evaluate.words(pred)), Counter(evaluate.words(ref))
    same = sum((p & r).values())
    if not same:
        return float(not p and not r)  # two empty replies agree; otherwise nothing in common is 0
    precision, recall = same / sum(p.values()), same / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def distinct_by_hand(texts, n):
    grams = [g for t in texts for g in zip(*(evaluate.words(t)[i:] for i in range(n)))]
    return len(set(grams)) / len(grams)


def test_words_f1_and_distinct_by_hand():
    assert evaluate.words("Don't STOP, 2 go_on!") == ["don", "t", "stop", "2", "go_on"]
    assert evaluate.token_f1("the cat sat", "The cat sat on the mat.") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert evaluate.token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # a word counts once per use
    assert (evaluate.token_f1("", ""), evaluate.token_f1("", "x"), evaluate.token_f1("dog", "cat")) == (1, 0, 0)
    assert evaluate.distinct(["a b a b", "a"], 1) == 2 / 5 and evaluate.distinct(["a b a b", "a"], 2) == 2 / 3
    assert evaluate.distinct([""], 2) == 0.0


# Replies put in generate()'s place, unlike one another, so that each figure has a value a slip would change:
# 10 words, 5 distinct; 7 bigrams, 4 distinct; two stopped, one empty (though it ended), one cut at the limit.
SCRIPTED = [("the cat sat", True, 4), ("The cat sat on the cat!", False, 12), ("", True, 1), ("Dog.", True, 2)]
BASE_SCRIPTED = [("cat", True, 2), ("", True, 1), ("", False, 12), ("the mat", False, 12)]


def test_the_reply_figures_are_what_the_replies_say(trained_run, tmp_path, monkeypatch):
    """evaluate.py on the run with generation scripted: the figures are those of the replies it was given, the base's
    beside the fine-tuned model's, on the same prompts and sampling seed."""
    for name in ("out/config.json", "out/metrics.jsonl", "val_data.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(trained_run / name, tmp_path / name)
    (tmp_path / "base").symlink_to(trained_run / "base")  # the run's MODEL, relative to where it ran
    calls = []

    def scripted(model, tokenizer, asks, cfg, generator, *args, desc=None, **kwargs):
        calls.append((desc, list(asks), generator.initial_seed()))
        return (BASE_SCRIPTED if desc == "replies (base)" else SCRIPTED)[:len(asks)]

    monkeypatch.setattr(generation, "replies", scripted)
    p = run("evaluate.py", "--device=cpu", f"--checkpoint={trained_run / 'out' / 'best'}", "--num_replies=4",
            "--sample_max_new_tokens=8", "--seed=7", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    (report_dir,) = (tmp_path / "out" / "eval").iterdir()  # named by the path of the run's best/
    assert report_dir.name.endswith("-out-best")
    report = json.loads((report_dir / "eval_report.json").read_text())
    (base_desc, asked, base_seed), (_, asked_again, seed) = calls
    assert base_desc == "replies (base)" and asked_again == asked and base_seed == seed == 7
    assert len(asked) == 4 and [s["generated"] for s in report["samples"]] == [t for t, _, _ in SCRIPTED]
    assert [(s["ended"], s["new_tokens"]) for s in report["samples"]] == [(e, n) for _, e, n in SCRIPTED]
    assert [tuple(map(tuple, s["context"])) for s in report["samples"]] == [tuple(turns) for turns, _ in asked]
    assert report["replies"] == 4 and report["mean_words"] == 2.5
    # the empty reply ended, and still is no proper stop
    assert (report["stop_rate"], report["empty_rate"], report["cut_rate"]) == (0.5, 0.25, 0.25)
    assert report["distinct_1"] == 0.5 and report["distinct_2"] == pytest.approx(4 / 7)
    real_words = sum(len(evaluate.words(s["real"])) for s in report["samples"]) / 4
    assert real_words > 0 and report["real_mean_words"] == pytest.approx(real_words)
    f1 = [f1_by_hand(t, s["real"]) for (t, _, _), s in zip(SCRIPTED, report["samples"])]
    assert [s["f1"] for s in report["samples"]] == pytest.approx(f1)
    assert report["token_f1"] == pytest.approx(sum(f1) / 4)
    base = report["base_replies"]
    assert (base["stop_rate"], base["empty_rate"], base["cut_rate"], base["mean_words"]) == (0.25, 0.5, 0.25, 0.75)
    base_f1 = sum(f1_by_hand(t, s["real"]) for (t, _, _), s in zip(BASE_SCRIPTED, report["samples"])) / 4
    assert base["token_f1"] == pytest.approx(base_f1) and base["real_mean_words"] == report["real_mean_words"]
    md = (report_dir / "eval_report.md").read_text()
    assert "| fine-tuned | 50% | 25% | 25% | 2.5 | " in md and "| base `base` | 25% | 50% | 25% | 0.8 | " in md


# ---------------------------------------------------------------------------------------------------------------------
# where the model speaks: the turns replies are asked at

RILEY_JORDAN = [[("Riley", "Hi."), ("Jordan", "Hey."), ("Jordan", "You there?"), ("Riley", "Yes."), ("Riley", "Bye.")],
                [("Jordan", "Morning."), ("Riley", "Hello."), ("Jordan", "Tea?"), ("Riley", "Please.")]]


def asked_at(fmt, roles=None, tokenizer=None, system=None, train=("Jordan",)):
    rendering = Rendering(fmt, roles, train, system)
    ev = types.SimpleNamespace(rendering=rendering, roles_of=rendering.roles_of, tokenizer=tokenizer)
    return evaluate.reply_turns(ev, RILEY_JORDAN)


def test_replies_are_asked_only_at_the_trained_speakers_turns():
    """Dialogues whose speakers repeat and whose last turns are the user's: the speaker format asks at each of
    Jordan's turns with one before it; a chat template at each of Jordan's messages, a run of turns being one."""
    speaker = asked_at("speaker")
    assert [[(len(t), s, r) for t, s, r in d] for d in speaker] == [[(1, "Jordan", "Hey."), (2, "Jordan", "You there?")],
                                                                    [(2, "Jordan", "Tea?")]]
    assert speaker[0][1][0] == RILEY_JORDAN[0][:2]  # the real conversation before it
    tok = chat_tokenizer()
    roles = {"Riley": "user", "Jordan": "assistant"}
    chat = asked_at("chat_template", roles, tok)
    assert [[(len(t), s, r) for t, s, r in d] for d in chat] == [[(1, "Jordan", "Hey. You there?")],
                                                                 [(2, "Jordan", "Tea?")]]
    assert asked_at("chat_template", roles, tok, train=None) == chat  # the assistant's, whoever is trained
    # the prompt is the training sequence up to the header of Jordan's message: what training rendered
    (pieces,) = chat_pieces(tok, [RILEY_JORDAN[0]], role_map(roles))
    trained = [t for h, x, f, _ in pieces[:1] for t in h + x + f] + pieces[1][0]
    turns, who, _ = chat[0][0]
    assert prompt(tok, turns, who, role_map(roles)) == trained
    assert prompt(tok, RILEY_JORDAN[0][:2], "Jordan", role_map(roles)) != trained  # where the old code asked
    # a system prompt is part of the context, as trained, and never asked for
    assert [t[:1] for d in asked_at("speaker", system="Be kind.") for t, _, _ in d] == [[("system", "Be kind.")]] * 3


def test_the_turns_asked_are_spread_over_the_dialogues_and_seeded():
    candidates = [[("a", i) for i in range(5)], [("b", 0)], [("c", i) for i in range(3)]]
    picked = evaluate.spread(candidates, 3, seed=1)
    assert sorted(x[0] for x in picked) == ["a", "b", "c"]  # one of each before a second of any
    assert picked == evaluate.spread(candidates, 3, seed=1) and len(evaluate.spread(candidates, 99, 1)) == 9
    assert {tuple(evaluate.spread(candidates, 3, seed=s)) for s in range(10)} != {tuple(picked)}


# ---------------------------------------------------------------------------------------------------------------------
# a run trained from scratch

def test_evaluate_final_checkpoint_of_a_scratch_run(scratch_run):
    report = json.loads((scratch_run / "out" / "eval" / "final" / "eval_report.json").read_text())
    assert report["model"] == "out/final" and report["base_model"] == "scratch"
    vals = [m for m in metrics(scratch_run / "out") if "val_loss" in m]
    assert report["val_loss"] == pytest.approx(max(vals, key=lambda m: m["step"])["val_loss"], abs=1e-4)
    # the base is rebuilt from the run's seed: it must be the very model train.py scored at step 0
    assert report["base_val_loss"] == pytest.approx(next(m for m in vals if m["step"] == 0)["val_loss"], abs=1e-4)
    md = (scratch_run / "out" / "eval" / "final" / "eval_report.md").read_text()
    assert "trained from scratch: validation perplexity went from" in md


def test_each_checkpoint_gets_its_own_report_and_the_base_is_scored_once(scratch_run):
    """out/final was evaluated (scratch_run); out/best now: two reports, and the base's figures read back from
    CACHE_DIR, not computed again, until a generation setting changes."""
    p = run("evaluate.py", "--device=cpu", "--checkpoint=out/best", *FAST, cwd=scratch_run)
    assert p.returncode == 0, p.stderr
    final, best = (json.loads((scratch_run / "out" / "eval" / name / "eval_report.json").read_text())
                   for name in ("final", "best"))
    assert (final["model"], best["model"]) == ("out/final", "out/best")
    assert "its figures from" in p.stdout and best["base_val_loss"] == final["base_val_loss"]
    assert best["base_replies"] == final["base_replies"] is not None
    # what is read back is what the cache holds: a figure put there shows in the report
    (entry,) = (scratch_run / "cache" / "base_figures").iterdir()
    name, _, note, replies = json.loads(entry.read_text())
    entry.write_text(json.dumps([name, 9.5, note, replies]))
    p = run("evaluate.py", "--device=cpu", "--checkpoint=out/best", *FAST, cwd=scratch_run)
    assert json.loads((scratch_run / "out" / "eval" / "best" / "eval_report.json").read_text())["base_val_loss"] == 9.5
    # another generation setting: the base's replies are no longer those, and it is scored again
    p = run("evaluate.py", "--device=cpu", "--checkpoint=out/best", *FAST, "--max_new_tokens=6", cwd=scratch_run)
    assert p.returncode == 0 and "its figures from" not in p.stdout
    assert len(list((scratch_run / "cache" / "base_figures").iterdir())) == 2
    entry.write_text(json.dumps([name, final["base_val_loss"], note, replies]))  # as it was, for whoever comes next


def test_a_report_is_named_by_its_model_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = types.SimpleNamespace(OUT_DIR="out")
    named = lambda d: os.path.relpath(evaluate.report_dir(cfg, d), os.path.join("out", "eval"))
    assert [named(d) for d in ("out/best", "out/checkpoints/step-00000171", "model", "runs/b/out/best")] == [
        "best", "step-00000171", "model", "runs-b-out-best"]
    assert named("/elsewhere/x/best") == "elsewhere-x-best"


def test_a_hub_base_is_keyed_by_the_revision_it_resolves_to(tmp_path, monkeypatch):
    """A Hub base model's figures are kept under its id and the commit the local cache's refs/main names: a new
    revision downloaded is another key, and its figures are computed afresh."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--tiny"
    for sha in ("a" * 40, "b" * 40):
        (repo / "snapshots" / sha).mkdir(parents=True)
        (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    cfg = types.SimpleNamespace(MODEL="acme/tiny", SEED=1)
    keys = []
    for sha in ("a" * 40, "b" * 40):
        (repo / "refs" / "main").write_text(sha)
        keys.append(evaluate.base_identity(cfg, None))
    assert keys == [["acme/tiny", "a" * 40], ["acme/tiny", "b" * 40]]
    assert evaluate.base_identity(types.SimpleNamespace(MODEL="acme/uncached", SEED=1), None) == ["acme/uncached", None]


# ---------------------------------------------------------------------------------------------------------------------
# bad input

def test_evaluate_missing_model(trained_run):
    assert "fresh" in one_error_line(run("evaluate.py", "--device=cpu", "--out_dir=fresh", cwd=trained_run))


@pytest.fixture(scope="module")
def bad(tiny64, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "half").mkdir()
    shutil.copy(os.path.join(tiny64, "config.json"), d / "half" / "config.json")
    (d / "empty.txt").write_text("")
    (d / "torn").mkdir()
    (d / "torn" / "config.json").write_text('{"BATCH_SIZE": 4, "BLOCK_')
    write_split(d, synthetic(2, seed=3), synthetic(4, seed=4, min_turns=2))
    return d


LONG_PROMPT = "Alex: " + "word " * 200 + "\nBob:"


# In this process: a process each costs seconds.
@pytest.mark.parametrize("case, args, mentions", [
    ("incomplete model", ["--checkpoint=half"], "incomplete"),
    ("missing val", ["--checkpoint=TINY", "--val_file=nope.txt"], "nope.txt"),
    ("empty val", ["--checkpoint=TINY", "--val_file=empty.txt"], "empty.txt"),
    ("torn run settings", ["--checkpoint=TINY", "--out_dir=torn"], "torn/config.json cannot be read (JSONDecodeError)"),
    ("long prompt", ["--checkpoint=TINY", "--model=TINY", "--num_replies=1", "--max_new_tokens=4",
                     "--sample_max_new_tokens=8", f"--sample_prompt={LONG_PROMPT}"], "SAMPLE_PROMPT"),
    ("prompt off the format", ["--checkpoint=TINY", "--sample_prompt=Hello there\nBob:"],
     "SAMPLE_PROMPT: line 1: expected 'Speaker: text', got 'Hello there'"),
])
def test_evaluate_bad_input(bad, tiny64, case, args, mentions):
    p = run("evaluate.py", "--device=cpu", *[a.replace("TINY", tiny64) for a in args], cwd=bad)
    assert mentions in one_error_line(p)


# ---------------------------------------------------------------------------------------------------------------------
# a damaged model is refused; a pickle is never loaded

EVAL_FAST = ["--device=cpu", "--num_replies=1", "--max_new_tokens=4", "--sample_max_new_tokens=4"]
LAST = os.path.join("checkpoints", "step-00000006")  # the trained run's last checkpoint


def copy_of_the_run(trained_run, d):
    """In d, what evaluate.py reads of the trained run, copied, for a test to damage: its data, settings, metrics,
    best/ and last checkpoint, and its MODEL (linked, relative to where it ran). The run's directory is left alone,
    where evaluate.py's real run writes its report meanwhile."""
    (d / "out" / "checkpoints").mkdir(parents=True)
    for name in ("train_data.txt", "val_data.txt", "out/config.json", "out/metrics.jsonl"):
        shutil.copy(trained_run / name, d / name)
    for name in ("best", LAST):
        shutil.copytree(trained_run / "out" / name, d / "out" / name)
    (d / "base").symlink_to(trained_run / "base")
    return d / "out"


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_evaluate_refuses_a_truncated_model(name, tmp_path, trained_run):
    copy_of_the_run(trained_run, tmp_path)
    truncate(tmp_path / "out" / "best" / name)
    p = run("evaluate.py", *EVAL_FAST, "--checkpoint=out/best", cwd=tmp_path)
    line = last_error_line(p)
    assert len(p.stderr.splitlines()) == 1
    assert "'out/best'" in line and f"{name} is" in line and "truncated" in line, line
    assert not (tmp_path / "out" / "eval").exists()


def test_evaluate_never_unpickles(tmp_path, trained_run, evil):
    d = copy_of_the_run(trained_run, tmp_path) / LAST
    put_pickle(d, evil)
    put_pickle(d, evil, "pytorch_model.bin")  # weights as a pickle beside model.safetensors: never the ones read
    p = run("evaluate.py", *EVAL_FAST, f"--checkpoint={d}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert not evil[1].exists(), "evaluate.py unpickled a file of the checkpoint"
    assert json.loads((tmp_path / "out" / "eval" / "step-00000006" / "eval_report.json").read_text())["model"] == str(d)

    (d / "model.safetensors").unlink()  # only the pickle left: refused, not loaded
    p = run("evaluate.py", *EVAL_FAST, f"--checkpoint={d}", cwd=tmp_path)
    assert "no model.safetensors" in last_error_line(p)
    assert not evil[1].exists(), "evaluate.py unpickled pytorch_model.bin"


# ---------------------------------------------------------------------------------------------------------------------
# runs and checkpoints side by side: --compare

@pytest.fixture(scope="module")
def two_runs(trained_run, tmp_path_factory):
    """Two runs, copies of the trained run (run_b's best/ alone, and its validation curve a nat lower), with their
    data and MODEL beside them; no report."""
    d = tmp_path_factory.mktemp("compare")
    shutil.copy(trained_run / "val_data.txt", d / "val_data.txt")
    (d / "base").symlink_to(trained_run / "base")
    for name, models in (("run_a", ("best", "final", LAST)), ("run_b", ("best",))):
        (d / name / "checkpoints").mkdir(parents=True)
        for log in ("config.json", "metrics.jsonl"):
            shutil.copy(trained_run / "out" / log, d / name / log)
        for model in models:
            shutil.copytree(trained_run / "out" / model, d / name / model)
    lower = [{**m, "val_loss": m["val_loss"] - 1} if "val_loss" in m else m for m in metrics(d / "run_b")]
    (d / "run_b" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lower))
    return d


def compare_py(d, *paths):
    return run("evaluate.py", "--device=cpu", *FAST, f"--compare={','.join(paths)}", cwd=d)


@pytest.mark.parametrize("paths, says", [
    (["run_a", "nowhere"], "COMPARE 'nowhere' does not exist"),
    (["run_a", "run_a/checkpoints"], "COMPARE: 'run_a/checkpoints' is neither a run"),
    (["val_data.txt"], "COMPARE: 'val_data.txt' is neither a run"),
])
def test_compare_refuses_what_is_no_run_or_model_before_evaluating_any(two_runs, paths, says):
    assert says in one_error_line(compare_py(two_runs, *paths))
    assert not (two_runs / "run_a" / "eval").exists()


def rows(p):
    """The comparison's table on stdout: {the row's first cell: its cells}."""
    table = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in table[1:])}, table


def test_compare_reads_each_report_and_evaluates_only_what_is_missing(two_runs, monkeypatch):
    """Two runs and two checkpoints: the figures each report holds (edited ones too), read, not computed again; a
    checkpoint never evaluated, and one whose report was made on other settings, evaluated through evaluate.py's own
    evaluation."""
    evaluated, real = [], evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda cfg: (evaluated.append(cfg.CHECKPOINT), real(cfg))[1])
    p = compare_py(two_runs, "run_a", "run_a/final")
    assert p.returncode == 0, p.stderr
    assert evaluated == ["run_a/best", "run_a/final"] and "run_a: no report yet; evaluating it" in p.stdout
    report = lambda model: two_runs / "run_a" / "eval" / model / "eval_report.json"
    best = json.loads(report("best").read_text())
    table, lines = rows(p)
    assert list(table) == ["base `base`", "`run_a`", "`run_a/final`"]
    assert table["`run_a`"][:3] == [f"{best['val_loss']:.4f}", f"{best['val_ppl']:.2f}",
                                    ", ".join(f"{s} {v:.3f}" for s, v in best["per_speaker_loss"].items())]
    assert table["base `base`"][0] == f"{best['base_val_loss']:.4f}"
    md = (two_runs / "out" / "comparison.md").read_text().splitlines()
    assert all(line in md for line in lines) and "![validation loss](comparison.png)" in md

    # run_b's report: run_a's (the same model, data and settings), edited; run_a's edited; run_a/final's made on
    # other settings; the checkpoint has none
    shutil.copytree(two_runs / "run_a" / "eval", two_runs / "run_b" / "eval")
    edit = lambda path, **figures: path.write_text(json.dumps({**json.loads(path.read_text()), **figures}))
    edit(two_runs / "run_b" / "eval" / "best" / "eval_report.json", val_loss=1.2345, token_f1=0.777,
         per_speaker_loss={"Zed": 0.5})
    edit(report("best"), stop_rate=0.123)
    final = json.loads(report("final").read_text())
    edit(report("final"), basis={**final["basis"], "num_replies": 99})
    evaluated.clear()
    plotted, plot = [], evaluate.plot_curves
    monkeypatch.setattr(evaluate, "plot_curves", lambda curves, *a: (plotted.append(curves), plot(curves, *a))[1])
    p = compare_py(two_runs, "run_a", "run_b", "run_a/final", f"run_a/{LAST}")
    assert p.returncode == 0, p.stderr
    assert evaluated == ["run_a/final", f"run_a/{LAST}"]
    assert "run_a/final: its report was made on other data or settings (num_replies); evaluating it" in p.stdout
    table, _ = rows(p)
    assert list(table) == ["base `base`", "`run_a`", "`run_b`", "`run_a/final`", f"`run_a/{LAST}`"]
    assert table["`run_b`"][:3] == ["1.2345", "3.44", "Zed 0.500"] and table["`run_b`"][7] == "0.777"
    assert table["`run_a`"][3] == "12%" and table["`run_a`"][0] == f"{best['val_loss']:.4f}"
    last = json.loads((two_runs / "run_a" / "eval" / "step-00000006" / "eval_report.json").read_text())
    assert table[f"`run_a/{LAST}`"][0] == f"{last['val_loss']:.4f}"
    assert p.stdout.strip().splitlines()[-1].startswith("compared 4 models (2 evaluated now, 2 from their reports)")
    # one plot: each run's validation curve, from its metrics.jsonl
    assert (two_runs / "out" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = lambda run_dir: [(m["step"], m["val_loss"]) for m in metrics(two_runs / run_dir) if "val_loss" in m]
    assert plotted[-1] == [("run_a", curve("run_a"), "o-"), ("run_b", curve("run_b"), "o-")]  # after the reports'
    assert curve("run_a") and curve("run_a") != curve("run_b")


# ---------------------------------------------------------------------------------------------------------------------
# a model in its own chat template: the settings it is rendered with, and SAMPLE_PROMPT read as the text format

@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny Llama with a ChatML template, as a run in FORMAT="chat_template" leaves it (untrained: what matters
    here is how evaluate.py renders)."""
    d = tmp_path_factory.mktemp("llama")
    model = save_tiny_llama(str(d / "model"))
    write_split(d, synthetic(4, seed=1), synthetic(4, seed=2, min_turns=2))
    (d / "out").mkdir()
    (d / "out" / "config.json").write_text(json.dumps({"FORMAT": "chat_template", "MODEL": model, "BLOCK_SIZE": 64,
                                                       "ROLES": {"Alex": "user", "*": "assistant"}}))
    return d


FEW = ["--device=cpu", "--checkpoint=model", "--num_replies=1", "--max_new_tokens=2", "--sample_max_new_tokens=2"]


def test_the_token_cache_is_keyed_by_the_roles_it_was_rendered_with(llama_run):
    """--roles overrides the run's ROLES, with a line saying so; the cache entry that says it holds those roles'
    rendering must hold it."""
    other = {"Alex": "assistant", "*": "user"}
    p = run("evaluate.py", *FEW, f"--roles={json.dumps(other)}", "--cache_dir=cache", cwd=llama_run)
    assert p.returncode == 0, p.stderr
    said = p.stdout.splitlines()[0]
    assert said.startswith("the command line overrides the run's settings (out/config.json): ") and (
        "--roles={'Alex': 'assistant', '*': 'user'} (the run has --roles={'Alex': 'user', '*': 'assistant'})" in said)
    (entry,) = [e for e in (llama_run / "cache").iterdir() if e.name != "base_figures"]  # the token cache's
    meta = json.loads((entry / "meta.json").read_text())
    stored = np.fromfile(entry / "ids.bin", dtype=meta["dtype"]).tolist()
    tok = transformers.AutoTokenizer.from_pretrained(str(llama_run / "model"))
    val = read_dialogues(llama_run / "val_data.txt")
    rendered = lambda roles: batching.tokenize(tok, val, None, role_map(roles)).ids.tolist()
    assert meta["roles"] == other and stored == rendered(other)
    assert stored != rendered({"Alex": "user", "*": "assistant"})  # the run's roles render otherwise: the test can tell


@pytest.mark.parametrize("sample_prompt, says", [
    ("Hello there\nBob:", "SAMPLE_PROMPT: line 1: expected 'Speaker: text', got 'Hello there'"),
    ("Alex: Hi\nBob: I think", "SAMPLE_PROMPT: its last line must be the label of who speaks next"),
])
def test_the_sample_prompt_is_read_as_the_text_format(llama_run, sample_prompt, says):
    p = run("evaluate.py", *FEW, f"--sample_prompt={sample_prompt}", cwd=llama_run)
    assert says in one_error_line(p)


# A Gemma-like template on chat_tokenizer's tokens: BOS, `model` for the assistant, roles must alternate, no system role
STRICT = ("{{- bos_token -}}{%- for m in messages -%}"
          "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
          "<|im_start|>{{ 'model' if m.role == 'assistant' else m.role }}{{ '\\n' }}{{ m.content }}<|im_end|>"
          "{{ '\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>model{{ '\\n' }}{%- endif -%}")


def test_a_run_of_other_speakers_in_a_strict_template_is_evaluated(tmp_path):
    """Speakers other than SAMPLE_PROMPT's Alex and Bob, who often talk twice in a row, a template that wants roles to
    alternate and has no system role, and a SYSTEM_PROMPT: evaluate.py renders all of it and writes its report."""
    model = save_tiny_llama(str(tmp_path / "model"), template=STRICT)
    speakers = ["Riley", "Jordan"]
    write_split(tmp_path, synthetic(4, seed=1, speakers=speakers), synthetic(6, seed=2, min_turns=3, speakers=speakers))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps({
        "FORMAT": "chat_template", "MODEL": model, "BLOCK_SIZE": 64, "TRAIN_SPEAKERS": ["Jordan"],
        "ROLES": {"Riley": "user", "Jordan": "assistant"}, "SYSTEM_PROMPT": "Be kind."}))
    p = run("evaluate.py", *FEW, "--cache_dir=cache", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "out" / "eval" / "model" / "eval_report.json").read_text())
    # the sample prompt's Alex is the user, Bob's answer the assistant's; the system prompt folded into the user turn
    assert report["sample_dialogue"].startswith("<|begin_of_text|><|im_start|>user\nBe kind.\n\nHi, how are you?"
                                                "<|im_end|>\n<|im_start|>model\n")
    assert report["replies"] == 1 and (tmp_path / "out" / "eval" / "model" / "eval_report.md").is_file()
    (entry,) = [e for e in (tmp_path / "cache").iterdir() if e.name != "base_figures"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["system_prompt"] == "Be kind." and meta["merged"] > 0 and meta["start"] is None


# ---------------------------------------------------------------------------------------------------------------------
# the report is a function of the figures alone

FIGURES = {"model": "out/best", "base_model": "gpt2", "val_file": "val.txt", "val_tokens": 1234, "val_loss": 2.0,
           "base_val_loss": 3.0, "base_note": "", "per_speaker_loss": {"Alex": 1.9, "(others)": 2.1}, "replies": 2,
           "stop_rate": 0.5, "empty_rate": 0.25, "cut_rate": 0.25, "mean_words": 3.0, "real_mean_words": 1.0,
           "distinct_1": 0.9, "distinct_2": 1.0, "token_f1": 0.25,
           "base_replies": {"replies": 2, "stop_rate": 0.0, "empty_rate": 1.0, "cut_rate": 0.0, "mean_words": 0.0,
                            "real_mean_words": 1.0, "distinct_1": 0.0, "distinct_2": 0.0, "token_f1": 0.0},
           "samples": [{"context": [["Alex", "Hi"]], "speaker": "Bob", "real": "Yo", "generated": "Hey", "ended": True,
                        "new_tokens": 2, "f1": 0.0},
                       {"context": [["Cara", "So?"]], "speaker": "Dan", "real": "Well", "generated": "Well well",
                        "ended": False, "new_tokens": 12, "f1": 0.5}],
           "sample_dialogue": "Alex: Hi, how are you?\nBob: Fine.", "plot_note": None}


HEADLINE = "fine-tuning took validation perplexity from 20.09 to 7.39"
STATS = "| fine-tuned | 50% | 25% | 25% | 3.0 | 0.250 | 0.90 | 1.00 |"
BASE_ROW = "| base `gpt2` | 0% | 100% | 0% | 0.0 | 0.000 | 0.00 | 0.00 |"
REAL_ROW = "| real replies | | | | 1.0 | | | |"
OVER = "Over 1,234 validation tokens of val.txt, token-weighted, padding excluded."
# a figure changed -> (the JSON report's keys that change, the markdown lines that change, as they then read). Each
# new value is unlike every other figure, so a figure shown in another's place shows.
CHANGES = {
    "val_loss": (2.5, {"val_loss", "val_ppl"}, ["fine-tuning took validation perplexity from 20.09 to 12.18.",
                                                "| fine-tuned | 2.5000 | 12.18 |"]),
    "base_val_loss": (3.5, {"base_val_loss", "base_val_ppl"},
                      ["fine-tuning took validation perplexity from 33.12 to 7.39.",
                       "| base `gpt2` | 3.5000 | 33.12 |"]),
    "base_note": (" (from metrics.jsonl)", set(), [HEADLINE + " (from metrics.jsonl)."]),
    "model": ("out/final", {"model"}, ["# Evaluation of `out/final`"]),
    "base_model": ("gpt2-medium", {"base_model"}, ["| base `gpt2-medium` | 3.0000 | 20.09 |",
                                                   BASE_ROW.replace("gpt2", "gpt2-medium")]),
    "val_file": ("other.txt", {"val_file"}, [OVER.replace("val.txt", "other.txt")]),
    "val_tokens": (56789, {"val_tokens"}, [OVER.replace("1,234", "56,789")]),
    "per_speaker_loss": ({"Alex": 1.8, "(others)": 2.1}, {"per_speaker_loss"}, ["| Alex | 1.8000 | 6.05 |"]),
    "replies": (3, {"replies"}, ["## Replies (3 turns where the model speaks)"]),
    "stop_rate": (0.3, {"stop_rate"}, [STATS.replace("50%", "30%")]),
    "empty_rate": (0.4, {"empty_rate"}, [STATS.replace("50% | 25% | 25%", "50% | 40% | 25%")]),
    "cut_rate": (0.6, {"cut_rate"}, [STATS.replace("50% | 25% | 25%", "50% | 25% | 60%")]),
    "mean_words": (4.5, {"mean_words"}, [STATS.replace("3.0", "4.5")]),
    "real_mean_words": (7.5, {"real_mean_words"}, [REAL_ROW.replace("1.0", "7.5")]),
    "distinct_1": (0.8, {"distinct_1"}, [STATS.replace("0.90", "0.80")]),
    "distinct_2": (0.7, {"distinct_2"}, [STATS.replace("1.00", "0.70")]),
    "token_f1": (0.125, {"token_f1"}, [STATS.replace("0.250", "0.125")]),
    "base_replies": ({**FIGURES["base_replies"], "stop_rate": 0.75}, {"base_replies"},
                     [BASE_ROW.replace("| 0% | 100%", "| 75% | 100%")]),
    "sample_dialogue": ("Alex: Hi\nBob: Bye.", {"sample_dialogue"}, ["Alex: Hi", "Bob: Bye."]),
    "plot_note": ("no plot here", set(), ["*no plot here*"]),
}


def test_the_report_shows_each_figure():
    data, md, headline = evaluate.report(FIGURES)
    assert headline == HEADLINE
    assert data["val_ppl"] == pytest.approx(math.exp(2.0)) and data["base_val_ppl"] == pytest.approx(math.exp(3.0))
    assert data["per_speaker_loss"] == FIGURES["per_speaker_loss"] and data["samples"] == FIGURES["samples"]
    assert data["sample_dialogue"] == FIGURES["sample_dialogue"] and "plot_note" not in data
    assert json.loads(json.dumps(data)) == data  # eval_report.json holds it as it is
    lines = md.split("\n")
    assert lines[:3] == ["# Evaluation of `out/best`", "", headline + "."]
    for line in ("| base `gpt2` | 3.0000 | 20.09 |", "| fine-tuned | 2.0000 | 7.39 |", "| Alex | 1.9000 | 6.69 |",
                 "| (others) | 2.1000 | 8.17 |", OVER, "## Replies (2 turns where the model speaks)", STATS, BASE_ROW,
                 REAL_ROW,
                 "- real: **Bob:** Yo", "- generated: **Bob:** Hey", "- real: **Dan:** Well",
                 "- generated: **Dan:** Well well *(did not end)*", "Alex: Hi, how are you?", "Bob: Fine.",
                 "![loss curve](loss_curve.png)"):
        assert lines.count(line) == 1, line
    # the markdown shows five replies, with the last three turns before each; the JSON keeps them all
    context = [["Alex", "one"], ["Bob", "two"], ["Alex", "three"], ["Bob", "four"]]
    many = [{**FIGURES["samples"][0], "context": context, "real": f"real {i}"} for i in range(7)]
    data, md, _ = evaluate.report({**FIGURES, "samples": many})
    assert data["samples"] == many and [f"real {i}" in md for i in range(7)] == [True] * 5 + [False] * 2
    assert md.count("Alex: one") == 0 and md.count("Bob: two\nAlex: three\nBob: four\n```") == 5


@pytest.mark.parametrize("figure", CHANGES)
def test_the_report_is_a_function_of_the_figures(figure):
    """A figure changed changes its own parts of the report, and nothing else."""
    value, keys, shown = CHANGES[figure]
    data, md, headline = evaluate.report(FIGURES)
    data2, md2, headline2 = evaluate.report({**FIGURES, figure: value})
    assert {k for k in data if data[k] != data2[k]} == keys and data2.keys() == data.keys()
    before, after = md.split("\n"), md2.split("\n")
    assert len(after) == len(before)
    assert [b for a, b in zip(before, after) if a != b] == shown
    moved = figure in ("val_loss", "base_val_loss", "base_note")  # the headline's figures
    assert (headline2 != headline) == moved and (headline2 + "." in shown) == moved


def test_the_headline_says_what_the_base_was():
    _, md, headline = evaluate.report({**FIGURES, "base_model": "scratch"})
    assert headline == "trained from scratch: validation perplexity went from 20.09 (untrained) to 7.39"
    assert "| trained | 2.0000 | 7.39 |" in md and "| base `scratch` | 3.0000 | 20.09 |" in md
    assert STATS.replace("fine-tuned", "trained") in md
    assert "| fine-tuned |" not in md

    data, md, headline = evaluate.report({**FIGURES, "base_val_loss": None, "base_note": " (base not evaluated: x)",
                                          "per_speaker_loss": {}, "plot_note": "no metrics", "base_replies": None})
    assert headline == "validation perplexity 7.39 (base not evaluated: x)" and data["base_val_ppl"] is None
    assert data["base_val_loss"] is None and json.loads(json.dumps(data)) == data
    assert "| base `gpt2` | - | - |" in md and "| base `gpt2` | - | - | - | - | - | - | - |" in md
    assert "Per speaker" not in md and "*no metrics*" in md
    assert "loss_curve.png" not in md


# ---------------------------------------------------------------------------------------------------------------------
# evaluate.py on the trained run, as a user runs it: the real script, started with the module

def test_evaluate_report(trained_run, evaluated):
    proc = evaluated
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained_run / "out" / "eval" / "best" / "eval_report.json").read_text())
    assert report["val_ppl"] == pytest.approx(math.exp(report["val_loss"]), rel=1e-9)
    assert report["base_val_ppl"] == pytest.approx(math.exp(report["base_val_loss"]), rel=1e-9)
    val = [[tuple(t) for t in d] for d in read_dialogues(trained_run / "val_data.txt")]
    samples = report["samples"]
    assert len(samples) == report["replies"] == 4  # NUM_REPLIES
    for s in samples:
        asked = [tuple(t) for t in s["context"]] + [(s["speaker"], s["real"])]
        assert asked in [d[:len(asked)] for d in val]  # a real turn, after the real conversation before it
        assert isinstance(s["generated"], str) and "\n" not in s["generated"]
        assert s["f1"] == pytest.approx(f1_by_hand(s["generated"], s["real"]))
        assert 1 <= s["new_tokens"] <= 12 and (s["ended"] or s["new_tokens"] == 12)  # MAX_NEW_TOKENS, unless it ended
    # the reply figures are those of the replies in the report
    texts = [s["generated"] for s in samples]
    assert report["stop_rate"] == sum(s["ended"] and bool(s["generated"].strip()) for s in samples) / 4
    assert report["stop_rate"] + report["empty_rate"] + report["cut_rate"] == pytest.approx(1)
    assert report["base_replies"]["replies"] == 4  # the base model's, on the same prompts
    assert report["mean_words"] == pytest.approx(sum(len(evaluate.words(t)) for t in texts) / 4)
    assert report["distinct_1"] == pytest.approx(distinct_by_hand(texts, 1))
    assert report["distinct_2"] == pytest.approx(distinct_by_hand(texts, 2))
    assert report["token_f1"] == pytest.approx(sum(f1_by_hand(s["generated"], s["real"]) for s in samples) / 4)
    # the overall loss is the per-speaker losses weighted by each speaker's targets: every token of their turns
    tok = transformers.AutoTokenizer.from_pretrained(str(trained_run / "out" / "best"))
    per, targets = report["per_speaker_loss"], Counter()
    for turns, rendered in zip(val, render(tok, val)):
        for (speaker, _), (ids, _) in zip(turns, rendered):
            targets[speaker if speaker in per else "(others)"] += len(ids)
    assert set(targets) == set(per) and len(per) >= 2 and sum(targets.values()) == report["val_tokens"]
    assert sum(per[s] * n for s, n in targets.items()) / report["val_tokens"] == pytest.approx(report["val_loss"],
                                                                                               rel=1e-5)
    # and both come out again from the model and the dialogues, at the run's block size, without the token cache
    speakers = [s for s in per if s != "(others)"]
    blocks = batching.make_blocks(tok, val, 64, speakers=speakers)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(trained_run / "out" / "best"))
    overall, by_tag = step.evaluate(tiny.single(model), batching.eval_batches(blocks, 4, EOS_ID, 64),
                                    groups=batching.eval_groups(blocks, 4, 64))
    assert report["val_loss"] == pytest.approx(overall, abs=1e-4)
    assert list(per.values()) == pytest.approx([by_tag[i] for i in range(1, len(per) + 1)], abs=1e-4)
    assert report["sample_dialogue"].startswith(cli.defaults()["SAMPLE_PROMPT"])
    md = (trained_run / "out" / "eval" / "best" / "eval_report.md").read_text()
    assert f"fine-tuning took validation perplexity from {report['base_val_ppl']:.2f} to {report['val_ppl']:.2f}" in md
    assert (trained_run / "out" / "eval" / "best" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("fine-tuning took validation perplexity from") and "eval_report.md" in last


def test_evaluate_loss_matches_training(trained_run, evaluated):
    report = json.loads((trained_run / "out" / "eval" / "best" / "eval_report.json").read_text())
    vals = [m for m in metrics(trained_run / "out") if "val_loss" in m]
    best = min((m for m in vals if m["step"] > 0), key=lambda m: m["val_loss"])
    assert report["val_loss"] == pytest.approx(best["val_loss"], abs=1e-4)
    # the base model, loaded from the run's MODEL, is the model train.py scored at step 0
    step0 = next(m for m in vals if m["step"] == 0)
    assert report["base_val_loss"] == pytest.approx(step0["val_loss"], abs=1e-4)
    # the whole validation set is scored: every rendered token is a target once
    tok = transformers.AutoTokenizer.from_pretrained(str(trained_run / "out" / "best"))
    rendered = render(tok, read_dialogues(trained_run / "val_data.txt"))
    assert report["val_tokens"] == sum(len(ids) for d in rendered for ids, _ in d)
