"""train.py end to end, offline, with tiny GPT-2 models from tiny.py: a run's outputs, its loss and logged figures, the
model it saves in Hugging Face's tools, gradient accumulation, validation, the token cache, the lr schedule, resuming
with the run's own settings, mistakes in one line, scratch mode, the Hub unreachable, the memory preflight and
progress in a log. Other model families, formats and LoRA: test_train_families.py; faults: test_train_faults.py;
torchrun: test_train_torchrun.py.

Run: .venv/bin/python -m pytest -q tests/test_train.py
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import cache
import cli
import hub
import launch
import loss
import masks
import modeling
import step
import tiny
import train
from batching import IGNORE, collate, epoch_order, eval_batches, make_blocks
from conftest import ROOT, command, in_background, one_error_line, run, script_env, train_args
from dialogues import format_dialogue, load_records, parse_record, read_dialogues
from render import render, speaker_template
from test_cache import cached_tokens
from tiny import (EOS_ID, chat_tokenizer, curve, gpt2_tokenizer, max_diff, metrics, save_tiny_gpt2, save_tiny_llama,
                  synthetic, weights, write_split)


# ---------------------------------------------------------------------------------------------------------------------
# helpers

# One thread: tiny models gain nothing from a second one, and the arithmetic is that of the runs in this process,
# which take one too.
ENV = {"OMP_NUM_THREADS": "1"}


def run_all(jobs):
    """train.py once per (cwd, args), in this process: most of a script's run would be its imports. The real script
    runs in the tests at the end of the file."""
    return [run("train.py", *args, cwd=cwd) for cwd, args in jobs]


def snapshot(path):
    """Every file under path with its size, mtime and content hash; None when path does not exist."""
    if not os.path.exists(path):
        return None
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.stat(p)
            digest = None if name in dirs else hashlib.sha256(open(p, "rb").read()).hexdigest()
            out[os.path.relpath(p, path)] = (st.st_size if digest else None, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory):
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("models") / "dropout"), dropout=0.1)


# The real train.py processes of this module: started from its start, one after another in a thread, while the tests
# before theirs run in this process (each mostly waits on its own process). Their tests are last in the file.

PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(scope="module", autouse=True)
def processes(request, tmp_path_factory, dropout_model, tiny_model):
    """test name -> Future of its run of train.py."""
    # the Hub asked for real, where nothing listens (port 9), with no proxy in between
    hub = {**ENV, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           **dict.fromkeys(PROXIES)}
    d, missing = tmp_path_factory.mktemp, train_args("no-such-org/no-such-model")
    jobs = {"test_resume_after_kill": (killed_run, d("killed"), dropout_model),
            "test_scratch_end_to_end": (train_py, d("scratch"), SCRATCH_DATA, SCRATCH_ARGS),
            "test_missing_model": (train_py, d("missing"), RESUME_DATA, missing),  # HF_HUB_OFFLINE=1: no Hub
            "test_an_unreachable_hub_is_asked_once": (hub_run, d("hub"), tiny_model, hub),
            "test_an_absurd_block_size_is_refused_in_seconds": (
                train_py, d("absurd"), (synthetic(20, seed=1), synthetic(5, seed=2)),
                ["--model=scratch", "--block_size=100000", "--scratch_vocab=300", "--device=cpu"], 300),
            "test_train_in_a_log_has_no_bar_frames": (
                train_py, d("log"), (synthetic(40, seed=2), synthetic(8, seed=3)),
                [f"--model={tiny_model}", "--device=cpu", "--max_steps=20", "--block_size=64", "--batch_size=2",
                 "--eval_interval=10", "--learning_rate=1e-3"], 300)}
    with in_background(request, jobs) as started:
        yield started


def train_py(d, data, args, timeout=600):
    """train.py run as a user runs it, a process, from d, which holds `data`'s train and val files. Returns d and the
    CompletedProcess."""
    write_split(d, *data)
    return d, run("train.py", *args, cwd=d, env=ENV, process=True, timeout=timeout)


# train.py with the count of the connections it makes, by anything in it (modeling's probe, the Hub client,
# transformers), and which loads asked whether to keep to the local cache, written to hub.json as it exits
COUNTED = """import atexit, json, socket
import modeling
asked, loads, connect = [], [], socket.socket.connect
def counted(self, address):
    asked.append(list(address))
    return connect(self, address)
socket.socket.connect = counted
cache_only = modeling.cache_only
def noted(name):
    loads.append(sys._getframe(1).f_code.co_name)
    return cache_only(name)
modeling.cache_only = noted
atexit.register(lambda: open("hub.json", "w").write(json.dumps({"asked": asked, "loads": loads})))
"""
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_run(d, model, env):
    """train.py on MODEL=no-such-org/no-such-model with the Hub unreachable, as COUNTED counts. The Hub cache holds
    that model's tokenizer and config, not its weights: the tokenizer loads from it, and then the model's load asks
    too. As a cache filled by `hf download` would, it does not know that the model has no adapter_config.json:
    transformers then looks for one on the Hub, local_files_only or not, and the client retries for 20 s, unless it
    is offline. Returns d and the CompletedProcess."""
    repo = d / "hub" / "models--no-such-org--no-such-model"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(model, name), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    write_split(d, *RESUME_DATA)
    return d, run("train.py", *train_args("no-such-org/no-such-model"), cwd=d,
                  env={**env, "HF_HUB_CACHE": str(d / "hub")}, patch=COUNTED, timeout=60)


SCRATCH_DATA = (synthetic(30, seed=10), synthetic(5, seed=11))
SCRATCH_ARGS = ["--model=scratch", "--scratch_layers=1", "--scratch_embd=32", "--scratch_heads=2",
                "--scratch_vocab=300", "--block_size=64", "--max_steps=5", "--device=cpu", "--out_dir=out",
                "--learning_rate=1e-3"]


def killed_run(tmp_path, dropout_model):
    """Run A's settings in a fresh train.py, killed once its first checkpoint is written (or, if quicker, ended).
    Returns tmp_path and its exit code."""
    write_split(tmp_path, *RESUME_DATA)
    proc = subprocess.Popen(command("train.py", resume_args(dropout_model)), cwd=tmp_path, env=script_env(ENV),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "out" / "checkpoints"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if ckpts.is_dir() and any(n.startswith("step-") for n in os.listdir(ckpts)):
            break
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    return tmp_path, proc.returncode


# ---------------------------------------------------------------------------------------------------------------------
# one real training run on a mixed set, one epoch

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("trained")
    write_split(d, synthetic(100, seed=2, max_turns=12), synthetic(20, seed=3, max_turns=12))
    # lr 1e-2: a 32-wide model moves its 50257 logits slowly at 1e-3
    p = run("train.py", *train_args(tiny_model, "--learning_rate=1e-2", "--block_size=64", "--batch_size=4",
                                    "--epochs=1", "--log_interval=1", "--eval_interval=10", "--checkpoint_interval=10",
                                    "--keep_checkpoints=10"), cwd=d)
    assert p.returncode == 0, p.stderr
    return d / "out", p


def test_loss_goes_down(trained):
    out, _ = trained
    rows = metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r for r in rows if "val_loss" in r]
    assert len(losses) >= 25
    assert losses[-1] < 0.6 * losses[0], losses
    assert vals[0]["step"] == 0
    assert vals[-1]["val_loss"] < 0.6 * vals[0]["val_loss"], vals


def test_run_outputs(trained, tiny_model):
    out, p = trained
    total = int(re.search(r"(\d+) steps/epoch", p.stdout).group(1))
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, total + 1))  # --log_interval=1
    for r in train_rows:
        assert {"step", "loss", "lr", "tokens_per_s"} <= r.keys() and r["tokens_per_s"] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [0, *range(10, total, 10), total]

    with open(out / "config.json") as f:
        saved = json.load(f)
    assert saved["MODEL"] == tiny_model and saved["LEARNING_RATE"] == 1e-2 and saved["BLOCK_SIZE"] == 64
    assert saved["EPOCHS"] == 1 and saved["BATCH_SIZE"] == 4

    steps = sorted(os.listdir(out / "checkpoints"))
    assert steps == [f"step-{s:08d}" for s in [*range(10, total, 10), total]]
    for s in steps:
        assert (out / "checkpoints" / s / "state.pt").is_file()
    assert max_diff(weights(out / "final"), weights(out / "checkpoints" / steps[-1])) == 0

    for name in ("best", "final"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o777 & ~cli.umask()  # not the temp dir's private 0700
        for f in ("model.safetensors", "tokenizer.json", "manifest.json"):  # safetensors writes its file 0600
            assert stat.S_IMODE(os.stat(out / name / f).st_mode) == 0o666 & ~cli.umask(), f
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tok = AutoTokenizer.from_pretrained(out / name)
        assert model.config.n_positions == 256
        assert tok("Hello world")["input_ids"] == [15496, 995] and tok.eos_token_id == EOS_ID
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / "final" / "pytorch_model.bin").exists()

    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith(f"trained steps 0->{total} in ") and "out/best" in last and "out/final" in last, last


def test_epoch_line_reports_low_padding(trained):
    _, p = trained
    train_tokens = int(re.search(r"-> ([\d,]+) tokens in", p.stdout).group(1).replace(",", ""))
    m = re.search(r"epoch 1: ([\d,]+) tokens trained \((\d+)% of the train set\), padding ([\d.]+)%", p.stdout)
    assert m, p.stdout
    assert int(m.group(1).replace(",", "")) == train_tokens and m.group(2) == "100"
    assert float(m.group(3)) < 5


def test_epoch_line_counts_the_positions_collate_pads_to(trained):
    """The padding figure is over the positions the steps really process: collate rounds each batch's width up to a
    multiple of 8 (bench.py counts them so too). Replayed here: the epoch's order, 4 blocks a step, each collated."""
    out, p = trained
    positions = int(re.search(r"epoch 1: .* padding [\d.]+% of ([\d,]+) positions", p.stdout).group(1).replace(",", ""))
    blocks = make_blocks(gpt2_tokenizer(), read_dialogues(out.parent / "train_data.txt"), 64)
    order = epoch_order(blocks, 16 * 4, cli.defaults()["SEED"])
    steps = [[blocks[j] for j in order[i:i + 4]] for i in range(0, len(order), 4)]
    assert positions == sum(collate(step, EOS_ID, 64)[0].numel() for step in steps)


# ---------------------------------------------------------------------------------------------------------------------
# the saved model speaks the training format in Hugging Face's tools: its chat template, pipeline()

CHAT = [("Alex", "Hi there, how are you?"), ("Bob", "Fine, thanks."), ("Alex", "Good to hear.")]


@pytest.fixture(scope="module")
def trained_tok(trained_run):
    return AutoTokenizer.from_pretrained(str(trained_run / "out" / "best"))


def test_saved_tokenizer_has_the_chat_template(trained_tok):
    # what test_render checks the template on: the run names no trained speaker, so USER_NAME and BOT_NAME
    assert trained_tok.chat_template == speaker_template("Alex", "Bob")
    messages = [{"role": "user" if s == "Alex" else "assistant", "name": s, "content": t} for s, t in CHAT]
    text = trained_tok.apply_chat_template(messages, tokenize=False)
    assert text == trained_tok.eos_token + format_dialogue(CHAT) + trained_tok.eos_token


def test_pipeline_generates(trained_run):
    pipe = transformers.pipeline("text-generation", model=str(trained_run / "out" / "best"), device="cpu")
    prompt = "Alex: Hi, how are you?\nBob:"
    out = pipe(prompt, max_new_tokens=4, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"].startswith(prompt)
    new = pipe(prompt, max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert out[0]["generated_text"] == prompt + new


# ---------------------------------------------------------------------------------------------------------------------
# gradient accumulation is the same step as one big batch (step.py's own check: test_step)

def test_accumulation_equals_one_batch_in_train_py(tmp_path, tiny_model):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        write_split(d, synthetic(24, seed=4, max_turns=8), synthetic(4, seed=9))
    common = train_args(tiny_model, "--block_size=32", "--max_steps=3")
    p1, p2 = run_all([(one, [*common, "--batch_size=4", "--grad_accum_steps=1"]),
                      (two, [*common, "--batch_size=2", "--grad_accum_steps=2"])])
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr + p2.stderr
    w1, w2 = weights(one / "out" / "final"), weights(two / "out" / "final")
    assert max_diff(w1, w2) < 1e-5
    assert max_diff(w1, load_file(os.path.join(tiny_model, "model.safetensors"))) > 1e-4  # it did train


# ---------------------------------------------------------------------------------------------------------------------
# validation: VAL_MAX_TOKENS caps what it costs, the same way in train.py and evaluate.py; in chunks, the loss of
# the full logits

def test_validation_is_capped(tmp_path, tiny_model):
    val = synthetic(8, seed=6)
    write_split(tmp_path, synthetic(12, seed=5, max_turns=4), val)
    tok = gpt2_tokenizer()
    cap = sum(len(ids) for turns in render(tok, val[:3]) for ids, _ in turns)
    p = run("train.py", *train_args(tiny_model, "--block_size=32", "--max_steps=1", f"--val_max_tokens={cap}"),
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "validation on 3 dialogues" in p.stdout
    first = metrics(tmp_path / "out")[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batches = eval_batches(make_blocks(tok, val[:3], 32), 8, EOS_ID, 32)
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(
        step.evaluate(tiny.single(model), batches), rel=1e-5)
    assert re.search(r"epoch 1 \(the run ends inside it\): [\d,]+ tokens trained .* padding", p.stdout), p.stdout


def test_train_py_validation_loss_is_the_full_logits_one(tmp_path):
    """A short train.py run in chunks of 5 positions (loss.py): its validation losses are those of the full logits."""
    model_dir = save_tiny_gpt2(str(tmp_path / "tiny"))
    val = synthetic(6, seed=2)
    write_split(tmp_path, synthetic(10, seed=1, max_turns=4), val)
    p = run("train.py", f"--model={model_dir}", "--device=cpu", "--out_dir=out", "--block_size=32", "--batch_size=4",
            "--max_steps=2", "--eval_interval=1", "--loss_chunk=5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    logged = {m["step"]: m["val_loss"] for m in metrics(tmp_path / "out") if "val_loss" in m}
    assert sorted(logged) == [0, 1, 2]
    batches = eval_batches(make_blocks(gpt2_tokenizer(), val, 32), 4, EOS_ID, 32)
    for at, path in ((0, model_dir), (2, tmp_path / "out" / "final")):
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            total = sum(loss.full_losses(model, x, y, **masks.inputs(seg, masks.form(model))).item()
                    for x, y, seg in batches)
        n = sum(int((y != IGNORE).sum()) for _, y, _ in batches)
        assert logged[at] == pytest.approx(total / n, rel=1e-5, abs=1e-5), at
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["LOSS_CHUNK"] == 5


# ---------------------------------------------------------------------------------------------------------------------
# the validation loss is the per-dialogue score: each dialogue alone, its targets what the model writes, computed
# here without any of the project's rendering or batching

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
def chat_trained(tmp_path_factory, request):
    """A tiny ChatML model trained a little on alternating dialogues (its final/): a model that has learned where a
    turn ends, and what the template writes after it."""
    d = tmp_path_factory.mktemp("separation")
    write_split(d, alternating(80, seed=1), alternating(16, seed=2))
    (save_tiny_llama if request.param == "llama" else save_chat_gpt2)(str(d / "model"))
    args = train_args(str(d / "model"), "--format=chat_template", "--train_speakers=['Bob']", "--block_size=256",
                      "--batch_size=4", "--max_steps=120", "--learning_rate=5e-3", "--eval_interval=0")
    assert run("train.py", *args, cwd=d).returncode == 0
    return d


def test_the_step_0_validation_loss_is_the_per_dialogue_score(chat_trained):
    d = chat_trained
    val = alternating(16, seed=2)
    args = train_args(str(d / "out" / "final"), "--format=chat_template", "--train_speakers=['Bob']",
                      "--block_size=256", "--batch_size=4", "--max_steps=1", "--out_dir=again")
    p = run("train.py", *args, cwd=d)
    assert p.returncode == 0, p.stderr
    logged = next(json.loads(line)["val_loss"] for line in open(d / "again" / "metrics.jsonl")
                  if json.loads(line).get("step") == 0)
    reference = per_dialogue_score(str(d / "out" / "final"), val)
    # exact but for rounding: every dialogue fits a block, so each is scored as it is alone (pieces that saw each
    # other read 0.14% to 0.2% off here, scoring the template's newline too 12%)
    assert logged == pytest.approx(reference, rel=1e-5)
    # the reference can tell: the newline after <|im_end|> is what the trained model finds easiest
    assert abs(per_dialogue_score(str(d / "out" / "final"), val, newline=True) / reference - 1) > 0.01


# ---------------------------------------------------------------------------------------------------------------------
# the token cache: the same weights from a cold one and a warm one; start-up memory flat in the corpus

def test_the_cached_pipeline_trains_the_same_weights(tmp_path):
    """Cold (tokenizes and packs into the cache), warm (maps it), and with the cache deleted half way (resumed)."""
    model = save_tiny_gpt2(str(tmp_path / "tiny"), dropout=0.1)
    write_split(tmp_path, synthetic(40, seed=5, max_turns=8), synthetic(8, seed=6))
    args = [f"--model={model}", "--device=cpu", "--block_size=32", "--batch_size=2", "--max_steps=6",
            "--checkpoint_interval=3", "--learning_rate=1e-3", "--log_interval=1"]
    # in this process (no cache lives in memory between runs: a run finds the cache on disk or not at all)
    cold = run("train.py", *args, "--out_dir=cold", cwd=tmp_path)
    assert cold.returncode == 0, cold.stderr
    assert "tokenized train_data.txt: " in cold.stdout and "start-up: " in cold.stdout
    warm = run("train.py", *args, "--out_dir=warm", cwd=tmp_path)
    assert warm.returncode == 0, warm.stderr
    assert "tokenized" not in warm.stdout
    assert max_diff(weights(tmp_path / "cold" / "final"), weights(tmp_path / "warm" / "final")) == 0
    # in memory: make_blocks over the dialogues, the loop as train.py runs it (test_train checks that loop further)
    t = cached_tokens(tmp_path, modeling.load_tokenizer(model))
    assert list(cache.blocks(t, 32, print)) == list(make_blocks(gpt2_tokenizer(), read_dialogues(
        tmp_path / "train_data.txt"), 32))


def corpus(n, seed):
    """n distinct dialogues in the shipped data's style: its dialogues, each turn numbered."""
    shipped = [parse_record(r, where)[1] for r, where in load_records(os.path.join(ROOT, "llm_train_text.json"))]
    rng = random.Random(seed)
    return [[(s, f"{t} ({i})") for s, t in rng.choice(shipped)] for i in range(n)]


def test_start_up_memory_does_not_grow_with_the_corpus(tmp_path):
    """train.py's own peak at the end of its start-up (its start-up line: hardware.peak_rss_mb), with a warm cache,
    on 1x and 20x the shipped data's size: the warm runs are processes of their own (launch.measure, as the
    benchmarks start them), side by side; the cache is built in this process."""
    model = save_tiny_gpt2(str(tmp_path / "tiny"))
    args = [f"--model={model}", "--device=cpu", "--max_steps=1", "--eval_interval=0", "--checkpoint_interval=0",
            "--block_size=128"]
    dirs = {scale: tmp_path / f"x{scale}" for scale in (1, 20)}
    for scale, d in dirs.items():
        d.mkdir()
        dialogues = corpus(216 * scale, seed=scale)
        write_split(d, dialogues, dialogues[:20])
        assert run("train.py", *args, "--out_dir=cold", cwd=d).returncode == 0  # builds the cache
    with ThreadPoolExecutor(len(dirs)) as pool:
        warm = dict(zip(dirs, pool.map(lambda d: launch.measure(
            command("train.py", [*args, "--out_dir=warm"])[1:], str(d), str(d / "warm"), env=script_env(ENV)),
            dirs.values())))
    rss = {}
    for scale, p in warm.items():
        assert p["rc"] == 0 and "tokenizing" not in p["stdout"], p["stdout"] + p["stderr"]
        rss[scale] = float(re.search(r"^start-up: .*peak memory so far ([\d,]+) MB", p["stdout"], re.M).group(1)
                           .replace(",", ""))
    tokens = os.path.getsize(next((tmp_path / "x20" / "cache").glob("train_data.txt-*")) / "ids.bin") // 2
    assert tokens > 800_000  # 20x the shipped data: the old in-memory lists took ~250 bytes a token, ~200 MB here
    assert rss[20] - rss[1] < 40, rss


# ---------------------------------------------------------------------------------------------------------------------
# the learning-rate schedule

@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_get_lr(schedule):
    cfg = cli.load_config(["--learning_rate=1e-3", "--warmup_steps=10", "--min_lr_fraction=0.1",
                           f"--lr_schedule={schedule}"])
    total = 100
    lrs = [train.get_lr(step, cfg, total) for step in range(total)]  # the steps of a 100-step run: 0..99
    assert lrs[:10] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert max(lrs) == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-2] > lrs[-1]
    if schedule == "linear":
        drops = [a - b for a, b in zip(lrs[10:], lrs[11:])]
        assert max(drops) == pytest.approx(min(drops))
    else:
        assert lrs[10] - lrs[11] < lrs[50] - lrs[51]  # cosine: slow, fast, slow
    # the last optimizer step of the run (step index total - 1) decays all the way to LEARNING_RATE * MIN_LR_FRACTION
    assert lrs[-1] == pytest.approx(1e-3 * 0.1), f"lr at the last step {total - 1}"


# ---------------------------------------------------------------------------------------------------------------------
# resuming continues the same run, with the run's own settings

RESUME_DATA = (synthetic(12, seed=5, max_turns=4), synthetic(4, seed=6))  # 10 blocks of 32: 5 steps per epoch


def resume_args(model):
    # a log line every 3 steps and a checkpoint every 4: the step-8 checkpoint falls inside a log window (steps 7-9),
    # which the resumed run must average as the uninterrupted one does
    return train_args(model, "--block_size=32", "--batch_size=2", "--max_steps=12", "--checkpoint_interval=4",
                      "--keep_checkpoints=10", "--log_interval=3")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, dropout_model):
    """An uninterrupted run, with dropout so that the RNG state matters."""
    d = tmp_path_factory.mktemp("run_a")
    write_split(d, *RESUME_DATA)
    p = run("train.py", *resume_args(dropout_model), cwd=d)
    assert p.returncode == 0, p.stderr
    assert re.search(r"\b5 steps/epoch\b", p.stdout), p.stdout  # so resuming from step 8 crosses into epoch 3
    return d / "out"


def crash_after_step_8(out):
    """The disk state of a run killed right after writing its step-8 checkpoint."""
    for name in os.listdir(out / "checkpoints"):
        if int(name.split("-")[1]) > 8:
            shutil.rmtree(out / "checkpoints" / name)
    for name in ("final", "best"):
        shutil.rmtree(out / name, ignore_errors=True)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, run_a, dropout_model):
    """Two copies of run A's directory crashed after step 8 (a copy is what a second, identical run would have
    written; test_resume_after_kill checks a fresh run), one also holding half-written checkpoints; both resumed.
    name -> (OUT_DIR, CompletedProcess)."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("plain", "half_written")}
    for d in dirs.values():
        write_split(d, *RESUME_DATA)
        shutil.copytree(run_a, d / "out")
        crash_after_step_8(d / "out")
    ckpts = dirs["half_written"] / "out" / "checkpoints"
    (ckpts / ".tmp-step-00000099").mkdir()
    (ckpts / ".tmp-step-00000099" / "state.pt").write_bytes(b"junk")
    (ckpts / "step-00000098").mkdir()  # renamed into place but without state.pt: not complete
    (ckpts / "step-00000098" / "config.json").write_text("{}")
    results = run_all([(d, [*resume_args(dropout_model), "--resume=True"]) for d in dirs.values()])
    return {name: (d / "out", p) for (name, d), p in zip(dirs.items(), results)}


def test_resume_gives_the_same_weights(resumed, run_a):
    out, p = resumed["plain"]
    assert p.returncode == 0, p.stderr
    assert "(step 8)" in p.stdout
    assert max_diff(weights(out / "final"), weights(run_a / "final")) < 1e-6
    assert curve(out) == pytest.approx(curve(run_a), rel=1e-5)
    assert sorted(os.listdir(out / "checkpoints")) == sorted(os.listdir(run_a / "checkpoints"))


def test_half_written_checkpoint_is_ignored(resumed, run_a):
    out, p = resumed["half_written"]
    assert p.returncode == 0, p.stderr
    assert re.search(r"resuming from \S*step-00000008 \(step 8\)", p.stdout), p.stdout
    assert not (out / "checkpoints" / ".tmp-step-00000099").exists()
    assert max_diff(weights(out / "final"), weights(run_a / "final")) < 1e-6


@pytest.fixture(scope="module")
def resume_cases(tmp_path_factory, run_a):
    """Copies of run A resumed with few or no settings. name -> (OUT_DIR, CompletedProcess, config.json before)."""
    cases = {
        # nothing retyped: config.py's defaults (another model, block 256, EPOCHS=3 instead of MAX_STEPS=12) unused
        "alone": (["--resume=True"], crash_after_step_8),
        # settings that may change on resume: how often to validate and keep checkpoints
        "allowed": (["--resume=True", "--eval_interval=5", "--checkpoint_interval=3", "--keep_checkpoints=3"],
                    crash_after_step_8),
        # a finished run extended by two steps
        "extend": (["--resume=True", "--max_steps=14"], lambda out: None),
    }
    jobs, dirs = [], {}
    for name, (args, crash) in cases.items():
        d = tmp_path_factory.mktemp(name)
        write_split(d, *RESUME_DATA)
        shutil.copytree(run_a, d / "out")
        crash(d / "out")
        dirs[name] = (d, (d / "out" / "config.json").read_bytes())
        jobs.append((d, args))
    results = run_all(jobs)
    return {name: (d / "out", p, config) for (name, (d, config)), p in zip(dirs.items(), results)}


def test_resume_takes_the_run_settings(resume_cases, run_a):
    out, p, config = resume_cases["alone"]
    assert p.returncode == 0, p.stderr
    assert "(step 8)" in p.stdout and "the run's own settings" in p.stdout
    assert max_diff(weights(out / "final"), weights(run_a / "final")) < 1e-6
    assert curve(out) == pytest.approx(curve(run_a), rel=1e-5)
    assert (out / "config.json").read_bytes() == config


def test_resume_may_change_intervals(resume_cases, run_a):
    out, p, config = resume_cases["allowed"]
    assert p.returncode == 0, p.stderr
    assert max_diff(weights(out / "final"), weights(run_a / "final")) < 1e-6  # the same arithmetic
    assert sorted(os.listdir(out / "checkpoints")) == [f"step-{s:08d}" for s in (9, 10, 12)]  # every 3, 3 kept
    assert [m["step"] for m in metrics(out) if "val_loss" in m and m["step"] > 8] == [10, 12]  # 10: epoch 2's end
    assert (out / "config.json").read_bytes() == config  # config.json is the run's, never rewritten


def test_resume_extends_a_finished_run(resume_cases):
    out, p, _ = resume_cases["extend"]
    assert p.returncode == 0, p.stderr
    assert "(step 12)" in p.stdout
    # the curve that ended at step 12 is stretched to 14: said, with the rate at step 12 on each
    cfg = cli.load_config(resume_args("m")[1:] + ["--max_steps=14"])
    assert (f"the schedule changes: the run ended at step 12 and now ends at step 14, so the learning rate at step 12 "
            f"goes from {train.get_lr(12, cfg, 12):.3g} to {train.get_lr(12, cfg, 14):.3g}") in p.stdout
    assert [m["step"] for m in metrics(out) if "loss" in m][-1] == 14
    assert (out / "checkpoints" / "step-00000014").is_dir()


def test_resume_refuses_other_settings_naming_them_all(tmp_path, run_a, dropout_model):
    write_split(tmp_path, *RESUME_DATA)
    shutil.copytree(run_a, tmp_path / "out")
    crash_after_step_8(tmp_path / "out")
    before = snapshot(tmp_path / "out")
    # --max_steps may change; --device=cpu and --batch_size=2 are the run's own values: none of them is refused
    p = run("train.py", *resume_args(dropout_model), "--resume=True", "--block_size=64", "--seed=7",
            "--lr_schedule=linear", "--max_steps=13", cwd=tmp_path)
    line = one_error_line(p)
    for flag in ("--block_size=64 (the run has --block_size=32)", "--seed=7 (the run has --seed=1337)",
                 "--lr_schedule='linear' (the run has --lr_schedule='cosine')"):
        assert flag in line
    assert "max_steps=13" not in line and "batch_size" not in line and "--device=" not in line
    assert snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("case", ["past_the_end", "complete"])
def test_resume_with_nothing_left_changes_nothing(case, tmp_path, run_a):
    write_split(tmp_path, *RESUME_DATA)
    shutil.copytree(run_a, tmp_path / "out")  # finished: its last checkpoint is step 12, of MAX_STEPS=12
    before = snapshot(tmp_path / "out")
    if case == "past_the_end":  # the run's end moved before its checkpoint: say so, train nothing, exit 2
        p = run("train.py", "--resume=True", "--max_steps=10", cwd=tmp_path)
        assert "is at step 12, past the end of this run at step 10" in one_error_line(p)
    else:
        p = run("train.py", "--resume=True", cwd=tmp_path)
        assert p.returncode == 0 and "is complete (step 12 of 12" in p.stdout, p.stdout + p.stderr
    assert snapshot(tmp_path / "out") == before


def wandb_history(wandb_dir):
    """What the offline W&B runs under `wandb_dir` logged, from their run-ID.wandb files (W&B's records, framed as
    LevelDB's log: 32 KiB blocks of pieces with a 7-byte header, after a 7-byte file header), oldest run first:
    [(run id, [{figure: value, "_step": step}])]."""
    import glob
    import struct
    from wandb.proto import wandb_internal_pb2
    runs = []
    for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data, pos, piece, history = open(path, "rb").read(), 7, b"", []
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            piece, pos = piece + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or a record's last piece
                record = wandb_internal_pb2.Record()
                record.ParseFromString(piece)
                if record.WhichOneof("record_type") == "history":
                    history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in record.history.item})
                piece = b""
        runs.append((os.path.basename(path)[4:-6], history))
    return runs


def test_trackers_curves_go_on_without_duplicates_after_a_resume(tmp_path, tiny_model):
    """REPORT_TO=["tensorboard", "wandb"] writes metrics.jsonl's figures as events and as an (offline) W&B run; a
    run killed at step 9, after its step-8 checkpoint, and resumed purges the events after step 8, and continues the
    W&B run under its id with the steps it had not logged, so TensorBoard's own reader, and W&B's records, see each
    step once, with the values of metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    write_split(tmp_path, *RESUME_DATA)
    args = [*resume_args(tiny_model), "--report_to", "['tensorboard', 'wandb']", "--log_interval=1"]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    assert run("train.py", *args, "--max_steps=9", cwd=tmp_path, env=env).returncode == 0  # as if killed at 9
    crash_after_step_8(tmp_path / "out")
    p = run("train.py", *args, "--resume=True", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    logged = metrics(tmp_path / "out")
    (first, before), (again, after) = wandb_history(tmp_path)
    assert first == again == json.loads((tmp_path / "out" / "config.json").read_text())["run_id"]
    rows = before + after
    for key in ("train/loss", "val/val_loss", "train/lr"):
        steps = [r["_step"] for r in rows if key in r]
        assert steps == sorted(set(steps)) and steps[-1] == 12
        want = {m["step"]: m[key.split("/")[1]] for m in logged if key.split("/")[1] in m}
        assert {r["_step"]: r[key] for r in rows if key in r and r["_step"] != 9} == pytest.approx(
            {s: v for s, v in want.items() if s != 9}, rel=1e-6)  # step 9's lr: the first process's schedule
    assert [r["_step"] for r in after if "train/loss" in r] == [10, 11, 12]  # nothing sent twice
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard")).Reload()
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/val_loss", "val/val_ppl"} <= set(
        events.Tags()["scalars"])
    logged = metrics(tmp_path / "out")
    for tag, key in (("train/loss", "loss"), ("val/val_loss", "val_loss"), ("train/lr", "lr")):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [m["step"] for m in logged if key in m]  # each step once, in order
        assert [e.value for e in scalars] == pytest.approx([m[key] for m in logged if key in m], rel=1e-6)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))


def test_early_stopping_ends_the_run_and_a_resume_knows(tmp_path, tiny_model):
    """EARLY_STOP_EVALS=2: a rate far too high makes validation worse after the first steps, and two validations
    without a new best end the run there, with best/ kept and a line that says why; the count is in the checkpoint,
    so a resume finds the run over."""
    write_split(tmp_path, *RESUME_DATA)
    args = train_args(tiny_model, "--block_size=32", "--batch_size=2", "--max_steps=12", "--eval_interval=1",
                      "--learning_rate=0.5", "--warmup_steps=0", "--early_stop_evals", "2")
    p = run("train.py", *args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    vals = [m for m in metrics(tmp_path / "out") if "val_loss" in m and m["step"] > 0]
    best = min(vals, key=lambda m: m["val_loss"])
    stop = vals[-1]["step"]
    assert stop < 12 and [m["step"] for m in vals if m["step"] > best["step"]] == [best["step"] + 1, stop]
    assert (f"stopped early at step {stop} of 12: 2 validations in a row without a new best (EARLY_STOP_EVALS=2); "
            f"the best, val loss {best['val_loss']:.4f} at step {best['step']}, is in out/best") in p.stdout
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints"))[-1] == f"step-{stop:08d}"
    assert (tmp_path / "out" / "final").is_dir() and (tmp_path / "out" / "best").is_dir()
    p = run("train.py", *args, "--resume", cwd=tmp_path)
    assert p.returncode == 0 and f"stopped early at step {stop} (2 validations" in p.stdout, p.stdout + p.stderr


def test_overwrite_starts_over_and_is_refused_while_the_run_is_held(tmp_path, tiny_model, run_a):
    """--overwrite=True replaces a finished run, keeping nothing of it; while another process holds the run (its
    lock), it is refused and nothing changes."""
    write_split(tmp_path, *RESUME_DATA)
    shutil.copytree(run_a, tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    holder = subprocess.Popen(command("checkpoints.py", patch=None)[:1] + [
        "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import checkpoints; checkpoints.hold('out'); print('held', "
              f"flush=True); sys.stdin.read()"], cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(tmp_path / "out")
        p = run("train.py", *train_args(tiny_model, "--block_size=32", "--max_steps=2", "--overwrite"), cwd=tmp_path)
        assert "OUT_DIR 'out' is in use: another process is running the run there" in one_error_line(p)
        assert snapshot(tmp_path / "out") == before
    finally:
        holder.communicate("")
    p = run("train.py", *train_args(tiny_model, "--block_size=32", "--max_steps=2", "--overwrite"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "--overwrite=True: the run in out (its checkpoints up to step 12) is deleted, all of it" in p.stdout
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == ["step-00000002"]
    assert not (tmp_path / "out" / "notes.txt").exists() and metrics(tmp_path / "out")[-1]["step"] == 2
    assert json.loads((tmp_path / "out" / "config.json").read_text())["MAX_STEPS"] == 2
    p = run("train.py", *train_args(tiny_model, "--overwrite", "--resume"), cwd=tmp_path)
    assert "--overwrite=True starts the run in OUT_DIR over, --resume=True continues it" in one_error_line(p)


def test_resume_with_no_run_to_resume_is_refused(tmp_path, tiny_model):
    write_split(tmp_path, *RESUME_DATA)
    p = run("train.py", *resume_args(tiny_model), "--resume=True", cwd=tmp_path)
    assert "--resume=True, but OUT_DIR 'out' holds no run to resume" in one_error_line(p)
    assert sorted(os.listdir(tmp_path)) == ["train_data.txt", "val_data.txt"]  # no out/, no cache: nothing written


# ---------------------------------------------------------------------------------------------------------------------
# mistakes are one line on stderr, exit code 2, and leave OUT_DIR as it was

def error_cases(tiny_model, dropout_model, run_a):
    """name -> (train.py arguments, what to do to the run directory first, a word the error line must hold)."""
    copy_a = lambda d: shutil.copytree(run_a, d / "out")
    return {
        # bad configuration
        "learning_rate_0": (train_args(tiny_model, "--learning_rate=0"), None, "LEARNING_RATE"),
        "batch_size_0": (train_args(tiny_model, "--batch_size=0"), None, "BATCH_SIZE"),
        "block_beyond_model": (train_args(tiny_model, "--block_size=100000"), None, "100000"),  # 256 positions
        "no_train_file": (train_args(tiny_model), lambda d: os.remove(d / "train_data.txt"), "train_data.txt"),
        "empty_train_file": (train_args(tiny_model), lambda d: (d / "train_data.txt").write_text(""),
                             "train_data.txt"),
        "resume_other_block_size": ([*resume_args(dropout_model), "--block_size=64", "--resume=True"], copy_a,
                                    "--block_size=32"),  # how to resume it right
        "existing_run": (resume_args(dropout_model), copy_a, "already holds a run"),
        # a speaker with no turns, a model directory without a model
        "unknown_train_speaker": (train_args(tiny_model, "--train_speakers=['Nobody']"), None, "Nobody"),
        "empty_model_dir": (train_args("empty_model"), lambda d: (d / "empty_model").mkdir(), "incomplete"),
    }


BAD_CONFIG = ["learning_rate_0", "batch_size_0", "block_beyond_model", "no_train_file", "empty_train_file",
              "resume_other_block_size", "existing_run"]


@pytest.mark.parametrize("case", [*BAD_CONFIG, "unknown_train_speaker", "empty_model_dir"])
def test_rejected_in_one_line(case, tmp_path, tiny_model, dropout_model, run_a):
    # In this process, to save an interpreter start per case; test_missing_model goes through the real script.
    args, setup, word = error_cases(tiny_model, dropout_model, run_a)[case]
    write_split(tmp_path, *RESUME_DATA)
    if setup:
        setup(tmp_path)
    before = snapshot(tmp_path / "out")
    line = one_error_line(run("train.py", *args, cwd=tmp_path))
    assert word in line
    if case in BAD_CONFIG:
        if case in ("resume_other_block_size", "existing_run"):
            assert before is not None
        assert snapshot(tmp_path / "out") == before, f"OUT_DIR changed after: {line}"
    if case == "unknown_train_speaker":
        assert not (tmp_path / "cache").exists()  # said before anything was tokenized


def test_bad_loss_chunk_is_one_line(tmp_path):
    write_split(tmp_path, synthetic(4, seed=1), synthetic(2, seed=2))
    p = run("train.py", "--model=scratch", "--loss_chunk=-3", cwd=tmp_path, process=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "error: LOSS_CHUNK must be a number of positions >= 1, or 0 for automatic, got -3"
    assert not os.path.exists(os.path.join(tmp_path, "out"))


# ---------------------------------------------------------------------------------------------------------------------
# the real script as a user runs it, started with the module (processes): a run killed and resumed, scratch mode
# with no network, a model that is nowhere, the Hub unreachable, the memory preflight, and progress in a log

def test_resume_after_kill(processes, run_a, dropout_model):
    tmp_path, returncode = processes["test_resume_after_kill"].result()
    if returncode == -signal.SIGKILL:
        p = run("train.py", *resume_args(dropout_model), "--resume=True", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert "resuming from" in p.stdout
    else:  # it finished before the kill landed
        assert returncode == 0
    assert max_diff(weights(tmp_path / "out" / "final"), weights(run_a / "final")) < 1e-6
    assert curve(tmp_path / "out") == pytest.approx(curve(run_a), rel=1e-5)


def test_scratch_end_to_end(processes):
    tmp_path, p = processes["test_scratch_end_to_end"].result()  # train.py on SCRATCH_DATA with SCRATCH_ARGS
    assert p.returncode == 0, p.stderr
    final = tmp_path / "out" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    line = "Alex: The cat sat under the table today!\n"
    assert tok.decode(tok(line, add_special_tokens=False)["input_ids"]) == line
    assert tok.eos_token is not None and tok.eos_token_id is not None
    assert model.config.vocab_size == len(tok) <= 300 and model.config.n_layer == 1


def test_missing_model(processes):
    _, p = processes["test_missing_model"].result()  # script_env's HF_HUB_OFFLINE=1 makes the Hub unreachable
    assert "scratch" in one_error_line(p)


def test_an_unreachable_hub_is_asked_once(processes, monkeypatch):
    """Offline, the Hub client retries for most of a minute; a connect that is refused (nothing listens on port 9)
    is noticed at once, and the model then comes from the local cache or not at all: the same one-line error. The
    probe connects once a run: the tokenizer's load and the model's both ask, the second taking the first's answer."""
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    hub.reachable.cache_clear()  # an answer cached by an earlier test would make this one prove nothing
    try:
        assert hub.reachable() is False
    finally:
        hub.reachable.cache_clear()  # nor may this one's answer outlive the settings patched here
    d, p = processes["test_an_unreachable_hub_is_asked_once"].result()  # train.py, asking the Hub there
    assert "scratch" in one_error_line(p)
    counted = json.loads((d / "hub.json").read_text())
    assert counted["loads"] == ["load_tokenizer", "load"]  # the tokenizer came from the cache; the model asked next
    assert counted["asked"] == [["127.0.0.1", 9]]  # once for both, and nothing else asks after it


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


def test_train_in_a_log_has_no_bar_frames(processes):
    _, p = processes["test_train_in_a_log_has_no_bar_frames"].result()  # 20 steps, stderr to a pipe
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "\x1b" not in p.stderr
    lines = p.stderr.splitlines()
    assert [line.split()[1] for line in lines] == [f"{10 * k}%" for k in range(1, 11)], p.stderr
    assert all(line.startswith("train: ") and " loss=" in line for line in lines)
    assert "step 10: val loss" in p.stdout and "1 thread (OMP_NUM_THREADS)" in p.stdout
