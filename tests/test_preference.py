"""Tests for preference tuning (preference.py, loss.model_logps, step.forward_backward_pairs): the pairs' records in
their common forms, rendered as training renders a dialogue with only the replies scored; the sequence
log-probabilities and the DPO loss and gradient against a direct computation from the full logits; a tie has no
gradient; a policy equal to its reference has loss log 2; and train.py's DPO runs end to end (accuracy up, resume
bit-exact after SIGKILL, LoRA, best/ and final/), prepare_data.py's pairs files, show_example and evaluate.py.

Run: .venv/bin/python -m pytest -q tests/test_preference.py
"""

import copy
import json
import math

import numpy as np
import pytest
import torch

import cli
import loss
import preference
import step
import tiny
from conftest import in_background, one_error_line, run, train_args
from dialogues import parse_pair, write_pair
from render import Rendering
from test_train_faults import KILL_IN_WRITE

PAIRS = [([("user", "what is the cat doing today")], [("assistant", "the cat sat on the table")],
          [("assistant", "dog")]),
         ([("user", "hi")], [("assistant", "hello there, how are you")], [("assistant", "go away now please")]),
         ([("user", "where"), ("assistant", "here"), ("user", "when")], [("assistant", "tomorrow")],
          [("assistant", "yesterday was very sad")])]


# ---------------------------------------------------------------------------------------------------------------------
# records

@pytest.mark.parametrize("record", [
    {"prompt": "hi", "chosen": "hello", "rejected": "go"},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "assistant", "content": "go"}]},
    {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
])
def test_the_common_forms_give_one_pair(record):
    assert parse_pair(record, "r") == ([("user", "hi")], [("assistant", "hello")], [("assistant", "go")])


@pytest.mark.parametrize("record, says", [
    ({"chosen": "a", "rejected": "b"}, "no 'prompt'"),
    ({"prompt": "hi", "chosen": 3, "rejected": "b"}, "'chosen' is a number"),
    ({"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "go"}]},
     "no reply of its own"),
    ({"prompt": "hi", "chosen": "a"}, "not a preference pair"),
])
def test_a_bad_record_is_one_line(record, says):
    with pytest.raises(cli.UserError, match=says):
        parse_pair(record, "r")


# ---------------------------------------------------------------------------------------------------------------------
# the sequence log-probabilities and the loss, against the full logits

@pytest.fixture(scope="module")
def batch():
    """The pairs rendered in the speaker format and packed into rows of 48 (so some rows hold several sequences)."""
    pairs = preference.Pairs(preference.render_pair(tiny.gpt2_tokenizer(), PAIRS, Rendering()))
    return pairs, preference.pair_batch(pairs, [0, 1, 2], tiny.EOS_ID, 48)


def direct_logps(model, pairs):
    """Each sequence's summed log-probability of its scored tokens, each sequence alone, from its full logits."""
    out = []
    for ids, mask in pairs.sequences:
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        out.append((logp * torch.tensor(mask[1:])).sum())
    return torch.stack(out)


def test_only_the_replies_are_scored_each_ending_with_eos(batch):
    pairs, _ = batch
    tok = tiny.gpt2_tokenizer()
    for (ids, mask), (_, reply) in zip(pairs.sequences, [(p, r) for p, c, r0 in PAIRS for r in (c, r0)]):
        scored = [t for t, m in zip(ids, mask) if m]
        assert scored[-1] == tiny.EOS_ID
        assert tok.decode(scored[:-1]) == f" {reply[0][1]}\n"
        assert tok.decode(ids).endswith(f"assistant: {reply[0][1]}\n<|endoftext|>")


def test_a_chat_template_renders_the_prompt_as_training_does_system_prompt_included():
    tok = tiny.chat_tokenizer()
    prompt, chosen, rejected = PAIRS[2]
    rendering = Rendering("chat_template", system_prompt="Be kind.")
    for (ids, mask), reply in zip(preference.render_pair(tok, [PAIRS[2]], rendering), (chosen, rejected)):
        messages = [{"role": "system", "content": "Be kind."}] + [{"role": r, "content": t} for r, t in prompt + reply]
        want = tok.apply_chat_template(messages, tokenize=True)
        want = want["input_ids"] if "input_ids" in want else want  # a BatchEncoding in transformers 5
        assert ids == list(want)
        scored = tok.decode([t for t, m in zip(ids, mask) if m])
        assert scored == f"{reply[0][1]}<|im_end|>"  # the reply and its end of turn; not the header, nor "\n"


def test_logps_and_gradient_equal_the_full_logits(batch):
    pairs, (x, y, seg, which, index, _) = batch
    assert seg is not None  # packed: pieces kept apart
    loss.use_chunk(5)  # several chunks per row
    try:
        got_model = tiny.gpt2()
        want_model = copy.deepcopy(got_model)
        ref = torch.tensor([[-30.0, -40.0], [-20.0, -25.0], [-10.0, -60.0]])
        dpo = preference.Objective("dpo", 0.1)
        got = loss.ChunkedLoss(got_model)(x, y, seg, which=which, n=6)
        want = direct_logps(want_model, pairs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        lengths = torch.bincount(which, minlength=6)
        dpo.losses(got, ref, lengths)[0].sum().backward()
        dpo.losses(want, ref, lengths)[0].sum().backward()
        for (name, a), b in zip(got_model.named_parameters(), want_model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)
    finally:
        loss.use_chunk(0)


def test_policy_as_its_reference_has_loss_log_2(batch):
    pairs, micro = batch
    layout = tiny.single(tiny.gpt2())
    ref = preference.sequence_logps(layout, [micro], 3).float()  # the policy itself is the reference
    mean, figures = step.forward_backward_pairs(layout, [micro], preference.Objective("dpo", 0.1), ref)
    assert mean == pytest.approx(math.log(2), abs=1e-6)
    assert figures["pairs"] == 3 and figures["margin"] == pytest.approx(0, abs=1e-6)


def test_a_tie_has_no_gradient(batch):
    pairs, _ = batch
    tie = preference.Pairs([pairs.sequences[0], pairs.sequences[0]])
    model = tiny.gpt2()
    micro = [preference.pair_batch(tie, [0], tiny.EOS_ID, 64)]
    for objective, ref in ((preference.Objective("dpo", 0.1), torch.tensor([[-3.0, -9.0]])),
                           (preference.Objective("simpo", 2.0, 0.5), None)):
        model.zero_grad()
        mean, _ = step.forward_backward_pairs(tiny.single(model), micro, objective, ref)
        assert mean > 0.1  # a loss, but no direction to move in
        grads = [p.grad.abs().max().item() for p in model.parameters() if p.grad is not None]
        assert grads and max(grads) < 1e-7


# ---------------------------------------------------------------------------------------------------------------------
# prepare_data.py and train.py end to end: a tiny GPT-2 (dropout on, so a resume must restore the random state too)

def fsdp_runs(d):
    """In d: a DPO run on 2 ranks under FSDP (two/) and in one process with the same global batch (one/), both real
    processes (in_background's rule), on a tiny GPT-2 without dropout (its masks differ between layouts)."""
    from test_train_torchrun import torchrun
    records = tiny.synthetic_pairs(40, seed=3)
    for name, part in (("train_data.txt", records[:32]), ("val_data.txt", records[32:])):
        with open(d / name, "w") as f:
            for r in part:
                write_pair(f, parse_pair(r, name))
    args = ["--model=base", "--objective=dpo", "--beta=0.5", "--block_size=64", "--max_steps=3", "--log_interval=1",
            "--grad_accum_steps=2", "--learning_rate=3e-3", "--warmup_steps=1"]
    two = torchrun(2, *args, "--batch_size=2", "--fsdp=True", "--out_dir=two", cwd=d)
    assert two.returncode == 0, two.stderr
    one = run("train.py", *args, "--batch_size=4", "--device=cpu", "--out_dir=one", cwd=d, process=True,
              env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    return d, two


@pytest.fixture(scope="module", autouse=True)
def processes(request, tmp_path_factory):
    """The torchrun job, in a thread from the module's start while the other tests run here; its test, last in the
    file, checks it."""
    d = tmp_path_factory.mktemp("fsdp")
    tiny.save_tiny_gpt2(str(d / "base"), dropout=0.0)  # here: the thread must not draw from torch's random stream
    jobs = {"test_fsdp_on_two_ranks_equals_one_process_with_the_global_batch": (fsdp_runs, d)}
    with in_background(request, jobs) as started:
        yield started


PAIR_ARGS = ["--objective=dpo", "--beta=0.5", "--block_size=64", "--batch_size=4", "--max_steps=12",
             "--eval_interval=4", "--checkpoint_interval=4", "--log_interval=2", "--learning_rate=3e-3"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """prepare_data.py's pairs files from 80 synthetic records, and a tiny GPT-2 in base/."""
    d = tmp_path_factory.mktemp("pairs")
    tiny.save_tiny_gpt2(str(d / "base"), dropout=0.1)
    (d / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tiny.synthetic_pairs(80, seed=3)))
    p = run("prepare_data.py", "--data_file=prefs.jsonl", "--objective=dpo", cwd=d)
    assert p.returncode == 0, p.stderr
    assert "train 6" in p.stdout and "preference pairs" in p.stdout  # ~80% of 80 pairs
    return d


@pytest.fixture(scope="module")
def dpo_run(pairs_dir):
    """An uninterrupted DPO run in pairs_dir/out."""
    p = run("train.py", *train_args("base", *PAIR_ARGS), cwd=pairs_dir)
    assert p.returncode == 0, p.stderr
    return p


def test_prepare_data_writes_pairs_split_by_prompt(pairs_dir, tmp_path):
    train = [json.loads(line) for line in (pairs_dir / "train_data.txt").read_text().splitlines()]
    val = [json.loads(line) for line in (pairs_dir / "val_data.txt").read_text().splitlines()]
    assert len(train) + len(val) == 80
    assert set(train[0]) == {"prompt", "chosen", "rejected"} and train[0]["prompt"][0]["role"] == "user"
    # 40 pairs on 5 prompts: each prompt's pairs all on one side
    records = [{**r, "prompt": f"question {i % 5}"} for i, r in enumerate(tiny.synthetic_pairs(40, seed=4))]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run("prepare_data.py", "--data_file=p.jsonl", "--objective=dpo", "--val_fraction=0.4",
               cwd=tmp_path).returncode == 0
    prompts = [{json.dumps(json.loads(line)["prompt"]) for line in (tmp_path / name).read_text().splitlines()}
               for name in ("train_data.txt", "val_data.txt")]
    assert prompts[0] and prompts[1] and not prompts[0] & prompts[1]


def test_prepare_data_refuses_a_dialogue_and_drops_ties(tmp_path):
    records = [*tiny.synthetic_pairs(4), {"prompt": "a", "chosen": "same", "rejected": "same"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    p = run("prepare_data.py", "--data_file=p.jsonl", "--objective=dpo", cwd=tmp_path)
    assert p.returncode == 0 and "1 tied" in p.stdout, p.stdout + p.stderr
    (tmp_path / "p.jsonl").write_text(json.dumps({"Alex": "hi", "Bob": "yo"}) + "\n")
    assert "line 1" in one_error_line(run("prepare_data.py", "--data_file=p.jsonl", "--objective=dpo",
                                          cwd=tmp_path))


def test_show_example_marks_the_scored_reply(pairs_dir):
    p = run("train.py", "--model=base", "--objective=dpo", "--show_example=True", cwd=pairs_dir)
    assert p.returncode == 0, p.stderr
    first = json.loads((pairs_dir / "train_data.txt").read_text().splitlines()[0])
    for name in ("chosen", "rejected"):
        reply = first[name][0]["content"]
        assert f"assistant:\u27e6 {reply}\n<|endoftext|>\u27e7" in p.stdout


def test_held_out_accuracy_rises_and_the_margin_grows(dpo_run, pairs_dir):
    val = [m for m in tiny.metrics(pairs_dir / "out") if "val_reward_acc" in m]
    assert val[0]["step"] == 0 and val[0]["val_reward_acc"] == 0.5  # policy = reference: every pair a tie
    assert val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert val[-1]["val_reward_acc"] >= 0.9
    margins = [m["val_margin"] for m in val]
    assert margins == sorted(margins) and margins[-1] > 1
    train = [m for m in tiny.metrics(pairs_dir / "out") if "reward_acc" in m]
    assert train and {"loss", "margin", "chosen", "rejected", "pairs_per_s"} <= set(train[-1])
    assert (pairs_dir / "out" / "best" / "model.safetensors").exists()
    assert (pairs_dir / "out" / "final" / "model.safetensors").exists()


def test_a_dpo_run_resumes_exactly_after_sigkill(dpo_run, pairs_dir, tmp_path):
    import shutil
    for name in ("base", "train_data.txt", "val_data.txt", "cache"):
        (shutil.copytree if name in ("base", "cache") else shutil.copy)(pairs_dir / name, tmp_path / name)
    shutil.rmtree(tmp_path / "cache" / "reference")  # the first start computes them; the resume must only read them
    patch = KILL_IN_WRITE.format(prefix=".tmp-step-", k=2)  # killed while writing its second checkpoint
    p = run("train.py", *train_args("base", *PAIR_ARGS), cwd=tmp_path, patch=patch, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == -9, p.stdout + p.stderr
    assert "reference log-probabilities of" in p.stdout
    p = run("train.py", *train_args("base", *PAIR_ARGS, "--resume=True"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "reference log-probabilities from" in p.stdout and "reference log-probabilities of" not in p.stdout
    assert tiny.max_diff(tiny.weights(tmp_path / "out" / "final"), tiny.weights(pairs_dir / "out" / "final")) < 1e-6
    assert ([m for m in tiny.metrics(tmp_path / "out") if "val_loss" in m] ==
            [m for m in tiny.metrics(pairs_dir / "out") if "val_loss" in m])


def test_lora_takes_the_model_without_adapters_as_reference(dpo_run, pairs_dir, tmp_path):
    import shutil
    for name in ("base", "train_data.txt", "val_data.txt"):
        (shutil.copytree if name == "base" else shutil.copy)(pairs_dir / name, tmp_path / name)
    p = run("train.py", *train_args("base", *PAIR_ARGS, "--lora_r=4", "--max_steps=4", "--learning_rate=1e-2"),
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lora, full = (next((d / "cache" / "reference").iterdir()) for d in (tmp_path, pairs_dir))
    assert lora.name == full.name  # the same starting weights, the same key
    assert np.array_equal(np.load(lora / "train.npy"), np.load(full / "train.npy"))
    val = [m for m in tiny.metrics(tmp_path / "out") if "val_loss" in m]
    assert val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6) and val[-1]["val_loss"] < val[0]["val_loss"]
    assert (tmp_path / "out" / "final" / "adapter").is_dir()


def test_evaluate_reports_base_and_tuned_side_by_side(dpo_run, pairs_dir):
    p = run("evaluate.py", "--out_dir=out", cwd=pairs_dir)
    assert p.returncode == 0, p.stderr
    report = json.loads((pairs_dir / "out" / "eval" / "best" / "eval_report.json").read_text())
    base, tuned = report["models"]
    assert base["model"] == "base" and "reward_acc" not in base
    assert tuned["prefers_chosen"] >= 0.9 > base["prefers_chosen"] and tuned["reward_acc"] >= 0.9
    assert "| `base` |" in (pairs_dir / "out" / "eval" / "best" / "eval_report.md").read_text()


def test_train_refuses_a_dialogues_file_for_dpo(tmp_path):
    tiny.write_split(tmp_path, tiny.synthetic(3), tiny.synthetic(2))
    line = one_error_line(run("train.py", "--model=base", "--objective=dpo", "--device=cpu", cwd=tmp_path))
    assert "holds dialogues, not preference pairs: run prepare_data.py --objective=dpo" in line


# the torchrun job's check, last in the file: it runs while the tests before it do

def test_fsdp_on_two_ranks_equals_one_process_with_the_global_batch(processes):
    """2 ranks x 2 pairs x 2 micro-batches, sharded, against 1 process x 4 pairs x 2: the same 8 pairs a step, the
    same weights and figures. (DDP runs the same forward_backward_pairs; test_train_torchrun.py holds DDP to FSDP.)"""
    d, two = processes["test_fsdp_on_two_ranks_equals_one_process_with_the_global_batch"].result()
    assert "2 processes (gloo, FSDP)" in two.stdout
    assert tiny.max_diff(tiny.weights(d / "one" / "final"), tiny.weights(d / "two" / "final")) < 1e-5
    figures = [[m.get(k, -1) for m in tiny.metrics(d / run_dir) for k in ("loss", "reward_acc", "val_margin")]
               for run_dir in ("one", "two")]
    assert figures[0] == pytest.approx(figures[1], abs=1e-5)
