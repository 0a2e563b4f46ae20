"""Did fine-tuning help, and how does the model talk now?

    python evaluate.py                          # the best model in OUT_DIR
    python evaluate.py --checkpoint=out/final   # another model directory

Reads the model (CHECKPOINT, else OUT_DIR/best), VAL_FILE, and OUT_DIR's config.json and metrics.jsonl from train.py.
Computes validation loss and perplexity exactly as training does (token-weighted, padding excluded, the same
VAL_MAX_TOKENS cap) for the fine-tuned model and the base model it started from, per-speaker loss where speakers recur
(from the same pass), and generated replies for the last turn of NUM_REPLIES validation dialogues. Writes
OUT_DIR/eval_report.json, eval_report.md and loss_curve.png.
"""

import collections
import itertools
import json
import os
import random
import re
import types

from cli import UserError, atomic_write, load_config, no_such, progress, read_jsonl, read_run_config, run

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


def plot_loss_curve(metrics, path, title):
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
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return None


def main():
    given = set()
    cfg = load_config(doc=__doc__, given=given)
    model_dir = cfg.CHECKPOINT or os.path.join(cfg.OUT_DIR, "best")
    if cfg.CHECKPOINT and not os.path.isdir(model_dir):
        raise UserError(no_such("CHECKPOINT", model_dir))
    if not os.path.isdir(model_dir):
        raise UserError(f"{no_such('model directory', model_dir)}: run train.py first, or pass --checkpoint=DIR")
    if not os.path.isfile(cfg.VAL_FILE):
        raise UserError(f"{no_such('VAL_FILE', cfg.VAL_FILE)}: run prepare_data.py first")
    # the heavy imports wait until the settings are checked: --help and a mistyped setting answer at once
    import torch

    import cache
    import modeling
    from batching import encode, eval_batches, eval_groups, pack_tokens, start_id
    from dialogues import iter_dialogues
    from generation import chat_roles, prompt_ids, reply, sample
    from modeling import ppl

    if next(iter_dialogues(cfg.VAL_FILE), None) is None:
        raise UserError(f"VAL_FILE {cfg.VAL_FILE!r} holds no dialogues: run prepare_data.py first")
    run_cfg = read_run_config(os.path.join(cfg.OUT_DIR, "config.json"))  # what train.py recorded, where it ran
    metrics = read_jsonl(os.path.join(cfg.OUT_DIR, "metrics.jsonl"))
    device, dtype, device_note = modeling.pick_device(cfg.DEVICE, cfg.PRECISION)
    print(device_note)
    tokenizer, model = modeling.load(model_dir)
    model.to(device).eval()
    context = modeling.context_size(model)
    train_speakers = run_cfg.get("TRAIN_SPEAKERS", cfg.TRAIN_SPEAKERS)
    # a model trained in its own chat template is evaluated and prompted in it, with the run's roles
    roles = chat_roles(tokenizer, run_cfg.get("ROLES", cfg.ROLES), train_speakers)
    if roles is None:  # the sample dialogue's prompt, checked before the passes
        sample_ids = [start_id(tokenizer)] + encode(tokenizer, [cfg.SAMPLE_PROMPT])[0]
    else:  # in the template: SAMPLE_PROMPT's turns, then the header of its last label's role
        *lines, label = cfg.SAMPLE_PROMPT.rstrip().split("\n")
        turns = [(s.strip(), t.strip()) for s, _, t in (line.partition(":") for line in lines)]
        sample_ids = prompt_ids(tokenizer, turns, label.rstrip(":").strip(), context, 0, roles)[0]
    if len(sample_ids) + cfg.SAMPLE_MAX_NEW_TOKENS > context:
        raise UserError(f"SAMPLE_PROMPT is {len(sample_ids)} tokens; with SAMPLE_MAX_NEW_TOKENS="
                        f"{cfg.SAMPLE_MAX_NEW_TOKENS} it does not fit the model's context of {context} tokens")

    # -----------------------------------------------------------------------------------------------------------------
    # validation loss: the fine-tuned model and the base model, on what training validated on (the same cap); per
    # recurring speaker from the fine-tuned model's same pass, its targets split by whose turn they are in
    block_size = min(run_cfg.get("BLOCK_SIZE", cfg.BLOCK_SIZE), context)
    run = lambda key: getattr(cfg, key) if key in given else run_cfg.get(key, getattr(cfg, key))
    # the token cache train.py made (same tokenizer, rendering and file: same key), or a new one
    rendering = types.SimpleNamespace(FORMAT="speaker" if roles is None else "chat_template", ROLES=run("ROLES"),
                                      TRAIN_SPEAKERS=train_speakers, CACHE_DIR=run("CACHE_DIR"))
    all_val = cache.tokens(cfg.VAL_FILE, modeling.sha256(cfg.VAL_FILE), tokenizer, rendering, roles, print)
    val_tok = all_val.head(run("VAL_MAX_TOKENS"))
    scored = list(itertools.islice(iter_dialogues(cfg.VAL_FILE), len(val_tok)))  # the same dialogues, as text
    seen = collections.Counter(s for d in scored for s in {s for s, _ in d})
    speakers = [s for s, n in seen.most_common(5)
                if n >= RECURRING and (train_speakers is None or s in train_speakers)]
    blocks = pack_tokens(val_tok.tagged(speakers) if speakers else val_tok, block_size)  # anyone else: the last tag
    val = eval_batches(blocks, cfg.BATCH_SIZE, tokenizer.eos_token_id, block_size)
    n_tokens = sum(int((y != -100).sum()) for _, y in val)
    print(f"validation: {len(scored)} of {len(all_val)} dialogues in {cfg.VAL_FILE}, {n_tokens:,} tokens")
    val_loss, by_tag = modeling.evaluate(model, val, device, dtype, desc="validation (model)",
                                         groups=eval_groups(blocks, cfg.BATCH_SIZE, block_size))
    per_speaker = {name: by_tag[i + 1] for i, name in enumerate(speakers + ["(others)"]) if i + 1 in by_tag}
    if len(per_speaker) < 2:
        per_speaker = {}  # one speaker's loss is the overall loss

    base_name, base_loss, base_note = run_cfg.get("MODEL", cfg.MODEL), None, ""
    try:
        if base_name == "scratch":  # the untrained model: the same architecture, initialised with the run's seed
            torch.manual_seed(run_cfg.get("SEED", cfg.SEED))
            base = type(model)(model.config)
        else:
            base = modeling.load(base_name)[1]
        base_loss = modeling.evaluate(base.to(device), val, device, dtype, desc="validation (base)")
        del base
    except UserError as e:
        step0 = [m["val_loss"] for m in metrics if m.get("step") == 0 and "val_loss" in m]
        if step0:
            base_loss, base_note = step0[0], " (base not loadable here; its loss from metrics.jsonl step 0)"
        else:
            base_note = f" (base not evaluated: {e})"


    # -----------------------------------------------------------------------------------------------------------------
    # replies: the last turn of NUM_REPLIES validation dialogues, generated and compared with the real one
    generator = torch.Generator().manual_seed(cfg.SEED)
    candidates = [d for d in scored if len(d) >= 2]  # the validated dialogues: VAL_MAX_TOKENS caps this too
    chosen = random.Random(cfg.SEED).sample(candidates, min(cfg.NUM_REPLIES, len(candidates)))
    replies = []
    for d in progress(chosen, desc="replies", leave=False, unit="reply"):
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

    # the sample dialogue: SAMPLE_PROMPT (checked above) continued until EOS
    new = sample(model, sample_ids, cfg.SAMPLE_MAX_NEW_TOKENS, cfg.TEMPERATURE, cfg.TOP_K, cfg.TOP_P,
                 cfg.REPETITION_PENALTY, generator, stop=lambda new: new[-1] == tokenizer.eos_token_id)
    sample_text = (cfg.SAMPLE_PROMPT + tokenizer.decode(new, skip_special_tokens=True) if roles is None else
                   tokenizer.decode(sample_ids + new))  # the template's special tokens shown: what the model sees

    # -----------------------------------------------------------------------------------------------------------------
    # report
    report = {"model": model_dir, "base_model": base_name, "val_file": cfg.VAL_FILE, "val_tokens": n_tokens,
              "val_loss": val_loss, "val_ppl": ppl(val_loss), "base_val_loss": base_loss,
              "base_val_ppl": ppl(base_loss) if base_loss is not None else None,
              "per_speaker_loss": per_speaker, **figures, "samples": replies, "sample_dialogue": sample_text}
    title = f"{os.path.abspath(cfg.OUT_DIR)}: {base_name} on {run_cfg.get('TRAIN_FILE', cfg.TRAIN_FILE)}"
    plot_note = plot_loss_curve(metrics, os.path.join(cfg.OUT_DIR, "loss_curve.png"), title) if metrics else \
        "loss_curve.png not written: no metrics.jsonl in OUT_DIR"
    if base_loss is None:
        headline = f"validation perplexity {ppl(val_loss):.2f}{base_note}"
    elif base_name == "scratch":  # nothing was fine-tuned: the base is the untrained model
        headline = (f"trained from scratch: validation perplexity went from {ppl(base_loss):.2f} (untrained) to "
                    f"{ppl(val_loss):.2f}{base_note}")
    else:
        headline = f"fine-tuning took validation perplexity from {ppl(base_loss):.2f} to {ppl(val_loss):.2f}{base_note}"
    md = [f"# Evaluation of `{model_dir}`", "", headline + ".", "",
          "| model | val loss | val perplexity |", "|---|---|---|",
          f"| base `{base_name}` | {base_loss:.4f} | {ppl(base_loss):.2f} |" if base_loss is not None else
          f"| base `{base_name}` | - | - |",
          f"| {'trained' if base_name == 'scratch' else 'fine-tuned'} | {val_loss:.4f} | {ppl(val_loss):.2f} |", "",
          f"Over {n_tokens:,} validation tokens of {cfg.VAL_FILE}, token-weighted, padding excluded.", ""]
    if per_speaker:
        md += ["Per speaker, the fine-tuned model's loss over the same targets, split by whose turn each is in (label, "
               "text, line end, EOS). The overall loss is their token-weighted mean, so some speakers are above it "
               "and some below.", "",
               "| speaker | val loss | perplexity |", "|---|---|---|",
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
