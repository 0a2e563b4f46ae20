"""Did fine-tuning help, and how does the model talk now?

    python evaluate.py                          # the best model in OUT_DIR
    python evaluate.py --checkpoint=out/final   # another model directory

Reads the model (CHECKPOINT, else OUT_DIR/best), VAL_FILE, and OUT_DIR's config.json and metrics.jsonl from train.py.
Computes validation loss and perplexity exactly as training does (token-weighted, padding excluded) for the fine-tuned
model and the base model it started from, per-speaker loss where speakers recur, and generated replies for the last
turn of NUM_REPLIES validation dialogues. Writes OUT_DIR/eval_report.json, eval_report.md and loss_curve.png.
"""

import collections
import json
import math
import os
import random
import re

import torch

import modeling
from batching import encode, eval_batches, make_blocks, start_id
from cli import UserError, atomic_write, load_config, read_jsonl, run
from dialogues import read_dialogues
from generation import chat_roles, prompt_ids, reply, sample

RECURRING = 3  # a speaker in at least this many validation dialogues gets a loss of their own


def words(text):
    return re.findall(r"\w+", text.lower())


def token_f1(pred, ref):
    """Word-overlap F1 between a generated and the real reply."""
    p, r = words(pred), words(ref)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def distinct(texts, n):
    """Unique n-grams / all n-grams over all replies: low means the model repeats itself."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ppl(loss):
    return math.exp(min(loss, 50))


def plot_loss_curve(metrics, path):
    """Train and validation loss over steps; returns a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss_curve.png not written: matplotlib is not installed (pip install matplotlib)"
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return None


def main():
    cfg = load_config(doc=__doc__)
    model_dir = cfg.CHECKPOINT or os.path.join(cfg.OUT_DIR, "best")
    if not os.path.isdir(model_dir):
        raise UserError(f"model directory {model_dir!r} does not exist: run train.py first, or pass --checkpoint=DIR")
    if not os.path.isfile(cfg.VAL_FILE):
        raise UserError(f"VAL_FILE {cfg.VAL_FILE!r} does not exist: run prepare_data.py first")
    val_dialogues = read_dialogues(cfg.VAL_FILE)
    if not val_dialogues:
        raise UserError(f"VAL_FILE {cfg.VAL_FILE!r} holds no dialogues: run prepare_data.py first")
    run_cfg = {}  # what train.py recorded, where it ran
    if os.path.isfile(os.path.join(cfg.OUT_DIR, "config.json")):
        with open(os.path.join(cfg.OUT_DIR, "config.json")) as f:
            run_cfg = json.load(f)
    metrics = read_jsonl(os.path.join(cfg.OUT_DIR, "metrics.jsonl"))
    device, dtype, device_note = modeling.pick_device(cfg.DEVICE, cfg.PRECISION)
    print(device_note)
    tokenizer, model = modeling.load(model_dir)
    model.to(device).eval()
    context = modeling.context_size(model)

    # -----------------------------------------------------------------------------------------------------------------
    # validation loss: the fine-tuned model, the base model, and per recurring speaker
    block_size = min(run_cfg.get("BLOCK_SIZE", cfg.BLOCK_SIZE), context)
    train_speakers = run_cfg.get("TRAIN_SPEAKERS", cfg.TRAIN_SPEAKERS)
    # a model trained in its own chat template is evaluated and prompted in it, with the run's roles
    roles = chat_roles(tokenizer, run_cfg.get("ROLES", cfg.ROLES), train_speakers)
    batches = lambda speakers: eval_batches(make_blocks(tokenizer, val_dialogues, block_size, speakers, roles,
                                                        cfg.VAL_FILE),
                                            cfg.BATCH_SIZE, tokenizer.eos_token_id, block_size)
    val = batches(train_speakers)
    n_tokens = sum(int((y != -100).sum()) for _, y in val)
    val_loss = modeling.evaluate(model, val, device, dtype)

    base_name, base_loss, base_note = run_cfg.get("MODEL", cfg.MODEL), None, ""
    try:
        if base_name == "scratch":  # the untrained model: the same architecture, initialised with the run's seed
            torch.manual_seed(run_cfg.get("SEED", cfg.SEED))
            base = type(model)(model.config)
        else:
            base = modeling.load(base_name)[1]
        base_loss = modeling.evaluate(base.to(device), val, device, dtype)
        del base
    except UserError as e:
        step0 = [m["val_loss"] for m in metrics if m.get("step") == 0 and "val_loss" in m]
        if step0:
            base_loss, base_note = step0[0], " (base not loadable here; its loss from metrics.jsonl step 0)"
        else:
            base_note = f" (base not evaluated: {e})"

    per_speaker = {}
    seen = collections.Counter(s for d in val_dialogues for s in {s for s, _ in d})
    for speaker, n in seen.most_common(5):
        if n >= RECURRING and (train_speakers is None or speaker in train_speakers):
            per_speaker[speaker] = modeling.evaluate(model, batches([speaker]), device, dtype)

    # -----------------------------------------------------------------------------------------------------------------
    # replies: the last turn of NUM_REPLIES validation dialogues, generated and compared with the real one
    generator = torch.Generator().manual_seed(cfg.SEED)
    candidates = [d for d in val_dialogues if len(d) >= 2]
    chosen = random.Random(cfg.SEED).sample(candidates, min(cfg.NUM_REPLIES, len(candidates)))
    replies = []
    for d in chosen:
        speaker, real = d[-1]
        text, ended, n_new = reply(model, tokenizer, d[:-1], speaker, cfg, generator, context, roles)
        replies.append({"context": d[:-1], "speaker": speaker, "real": real, "generated": text, "ended": ended,
                        "new_tokens": n_new, "f1": token_f1(text, real)})
    texts = [r["generated"] for r in replies]
    figures = {
        "replies": len(replies),
        "stop_rate": sum(r["ended"] for r in replies) / max(len(replies), 1),
        "mean_words": sum(len(words(t)) for t in texts) / max(len(texts), 1),
        "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2),
        "token_f1": sum(r["f1"] for r in replies) / max(len(replies), 1),
    }

    # the sample dialogue: SAMPLE_PROMPT continued until EOS (in a chat template: its turns, then the last label's)
    if roles is None:
        ids = [start_id(tokenizer)] + encode(tokenizer, [cfg.SAMPLE_PROMPT])[0]
    else:
        *lines, label = cfg.SAMPLE_PROMPT.rstrip().split("\n")
        turns = [(s.strip(), t.strip()) for s, _, t in (line.partition(":") for line in lines)]
        ids = prompt_ids(tokenizer, turns, label.rstrip(":").strip(), context, 0, roles)[0]
    if len(ids) + cfg.SAMPLE_MAX_NEW_TOKENS > context:
        raise UserError(f"SAMPLE_PROMPT is {len(ids)} tokens; with SAMPLE_MAX_NEW_TOKENS={cfg.SAMPLE_MAX_NEW_TOKENS} "
                        f"it does not fit the model's context of {context} tokens")
    new = sample(model, ids, cfg.SAMPLE_MAX_NEW_TOKENS, cfg.TEMPERATURE, cfg.TOP_K, cfg.TOP_P,
                 cfg.REPETITION_PENALTY, generator, stop=lambda new: new[-1] == tokenizer.eos_token_id)
    sample_text = (cfg.SAMPLE_PROMPT + tokenizer.decode(new, skip_special_tokens=True) if roles is None else
                   tokenizer.decode(ids + new))  # the template's special tokens shown: what the model sees

    # -----------------------------------------------------------------------------------------------------------------
    # report
    report = {"model": model_dir, "base_model": base_name, "val_file": cfg.VAL_FILE, "val_tokens": n_tokens,
              "val_loss": val_loss, "val_ppl": ppl(val_loss), "base_val_loss": base_loss,
              "base_val_ppl": ppl(base_loss) if base_loss is not None else None,
              "per_speaker_loss": per_speaker, **figures, "samples": replies, "sample_dialogue": sample_text}
    plot_note = plot_loss_curve(metrics, os.path.join(cfg.OUT_DIR, "loss_curve.png")) if metrics else \
        "loss_curve.png not written: no metrics.jsonl in OUT_DIR"
    headline = (f"fine-tuning took validation perplexity from {ppl(base_loss):.2f} to {ppl(val_loss):.2f}"
                f"{base_note}" if base_loss is not None else f"validation perplexity {ppl(val_loss):.2f}{base_note}")
    md = [f"# Evaluation of `{model_dir}`", "", headline + ".", "",
          "| model | val loss | val perplexity |", "|---|---|---|",
          f"| base `{base_name}` | {base_loss:.4f} | {ppl(base_loss):.2f} |" if base_loss is not None else
          f"| base `{base_name}` | - | - |",
          f"| fine-tuned | {val_loss:.4f} | {ppl(val_loss):.2f} |", "",
          f"Over {n_tokens:,} validation tokens of {cfg.VAL_FILE}, token-weighted, padding excluded.", ""]
    if per_speaker:
        md += ["| speaker | val loss | perplexity |", "|---|---|---|",
               *[f"| {s} | {v:.4f} | {ppl(v):.2f} |" for s, v in per_speaker.items()], ""]
    md += [f"## Replies ({figures['replies']} validation dialogues)", "",
           f"stop rate {figures['stop_rate']:.0%}, mean length {figures['mean_words']:.1f} words, "
           f"distinct-1 {figures['distinct_1']:.2f}, distinct-2 {figures['distinct_2']:.2f}, "
           f"token F1 vs the real reply {figures['token_f1']:.3f}", ""]
    for r in replies[:5]:
        md += ["```", *[f"{s}: {t}" for s, t in r["context"][-3:]], "```",
               f"- real: **{r['speaker']}:** {r['real']}", f"- generated: **{r['speaker']}:** {r['generated']}"
               f"{'' if r['ended'] else ' *(did not end)*'}", ""]
    md += ["## Sample dialogue", "", "```", sample_text, "```", ""]
    if plot_note:
        md += [f"*{plot_note}*", ""]
    else:
        md += ["![loss curve](loss_curve.png)", ""]
    with atomic_write(os.path.join(cfg.OUT_DIR, "eval_report.json")) as f:
        json.dump(report, f, indent=2)
    with atomic_write(os.path.join(cfg.OUT_DIR, "eval_report.md")) as f:
        f.write("\n".join(md))

    for r in replies[:3]:
        print("\n" + "\n".join(f"  {s}: {t}" for s, t in r["context"][-2:]))
        print(f"  real      {r['speaker']}: {r['real']}\n  generated {r['speaker']}: {r['generated']}")
    print(f"\nsample dialogue:\n{sample_text}\n")
    if plot_note:
        print(plot_note)
    print(f"{headline}; replies: stop rate {figures['stop_rate']:.0%}, {figures['mean_words']:.1f} words, "
          f"distinct-2 {figures['distinct_2']:.2f}, F1 {figures['token_f1']:.3f}; "
          f"report in {os.path.join(cfg.OUT_DIR, 'eval_report.md')}")


if __name__ == "__main__":
    run(main)
