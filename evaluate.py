"""Did fine-tuning help, and how does the model talk now?

    python evaluate.py                          # the best model in OUT_DIR
    python evaluate.py --checkpoint=out/final   # another model directory
    python evaluate.py --compare=out_a,out_b,out_a/checkpoints/step-00000100   # runs and checkpoints side by side

Reads the model (CHECKPOINT, else OUT_DIR/best), VAL_FILE, and OUT_DIR's metrics.jsonl and config.json from train.py:
the run's settings, which it takes as its own (one given on the command line overrides the run's, with a line saying
so). Computes validation loss and perplexity exactly as training does (token-weighted, padding excluded, the same
VAL_MAX_TOKENS cap) for the fine-tuned model and the base model it started from, per-speaker loss where speakers recur
(from the same pass), and generated replies at NUM_REPLIES turns where the model speaks (the trained speakers'),
spread over the validation dialogues. Writes eval_report.json, eval_report.md and loss_curve.png to
OUT_DIR/eval/<the model directory's name>, one report per model; the base model's figures are kept in
CACHE_DIR/base_figures and reused while its weights, the validation data and the generation settings are unchanged.

With COMPARE (runs, each standing for its best/, and model directories inside runs), it compares them on the same
validation data, SEED and generation settings: each model's figures come from its report where the report was made on
those, and from an evaluation (the same as above) where it is missing or was made on others. Writes the table (also
printed) to OUT_DIR/comparison.md and the runs' validation curves from their metrics.jsonl to OUT_DIR/comparison.png.

A preference run's (OBJECTIVE="dpo" or "simpo") VAL_FILE holds pairs: for it, the held-out preference accuracy of the
base and the tuned model side by side instead (preference_report).
"""

import collections
import itertools
import json
import os
import random
import re
import time
import types

from checkpoints import sha256
from cli import (UserError, atomic_write, load_config, no_such, quiet_libraries, read_jsonl, read_run_config, run,
                 settings_of_run, which_model)

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


def plot_curves(curves, path, title):
    """Loss over optimizer steps, one line per (label, [(step, loss)], style) of `curves`, as a PNG at `path`;
    returns a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{os.path.basename(path)} not written: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points, style in curves:
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


def plot_loss_curve(metrics, path, title):
    """A run's train and validation loss over steps, from its metrics.jsonl records."""
    return plot_curves([("train", [(m["step"], m["loss"]) for m in metrics if "loss" in m], "-"),
                        ("validation", val_curve(metrics), "o-")], path, title)


def val_curve(metrics):
    return [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]


# ---------------------------------------------------------------------------------------------------------------------
# the parts of an evaluation, in the order main() runs them

def setup(cfg):
    """Everything the passes share, checked before any of them runs: the model on its device (held by a one-process
    layout, whose validation pass is training's), how it renders dialogues, and the sample prompt. `cfg` holds the
    run's own settings (cli.run_settings)."""
    model_dir = which_model(cfg)
    if not os.path.isfile(cfg.VAL_FILE):
        raise UserError(f"{no_such('VAL_FILE', cfg.VAL_FILE)}: run prepare_data.py first")
    # the heavy imports wait until the settings are checked: --help and a mistyped setting answer at once
    quiet_libraries()
    import hardware
    import loss
    import modeling
    import processes
    from dialogues import iter_dialogues, parse_prompt
    from render import Rendering, chat_roles, prompt, sample_roles, with_system

    if next(iter_dialogues(cfg.VAL_FILE), None) is None:
        raise UserError(f"VAL_FILE {cfg.VAL_FILE!r} holds no dialogues: run prepare_data.py first")
    device, dtype, device_note = hardware.pick(cfg.DEVICE, cfg.PRECISION, threads=cfg.CPU_THREADS)
    loss.use_chunk(cfg.LOSS_CHUNK)
    print(device_note)
    tokenizer, model = modeling.load(model_dir)
    layout = processes.Single(processes.World(), device, dtype)
    layout.wrap(model.eval())
    context = modeling.context_size(model)
    # a model trained in its own chat template is evaluated and prompted in it, with the run's roles; what it speaks
    # is the model's to say (its saved template), and the token cache's key names what is rendered
    roles_of = chat_roles(tokenizer, cfg.ROLES, cfg.TRAIN_SPEAKERS)
    rendering = Rendering("speaker" if roles_of is None else "chat_template", cfg.ROLES, cfg.TRAIN_SPEAKERS,
                          cfg.SYSTEM_PROMPT)
    turns, speaker = parse_prompt(cfg.SAMPLE_PROMPT)  # the sample dialogue's prompt, checked before the passes
    turns = with_system(turns, cfg.SYSTEM_PROMPT)
    # SAMPLE_PROMPT's speakers need not be the run's: in a chat template it asks the assistant to answer the user
    sample_roles_of = None if roles_of is None else sample_roles(cfg.ROLES, cfg.TRAIN_SPEAKERS, turns, speaker)
    sample_ids = prompt(tokenizer, turns, speaker, sample_roles_of)
    if len(sample_ids) + cfg.SAMPLE_MAX_NEW_TOKENS > context:
        raise UserError(f"SAMPLE_PROMPT is {len(sample_ids)} tokens; with SAMPLE_MAX_NEW_TOKENS="
                        f"{cfg.SAMPLE_MAX_NEW_TOKENS} it does not fit the model's context of {context} tokens")
    return types.SimpleNamespace(cfg=cfg, model_dir=model_dir, layout=layout, tokenizer=tokenizer, model=model,
                                 context=context, roles_of=roles_of, rendering=rendering, sample_ids=sample_ids,
                                 sample_prompt=(turns, speaker), sample_roles_of=sample_roles_of,
                                 metrics=read_jsonl(os.path.join(cfg.OUT_DIR, "metrics.jsonl")))


def validation(ev):
    """The fine-tuned model's loss on what training validated on (the token cache train.py made, the same
    VAL_MAX_TOKENS cap and block size), and per recurring speaker from the same pass, its targets split by whose
    turn they are in. Returns (batches, the dialogues scored, tokens scored, loss, {speaker: loss})."""
    import cache
    import checkpoints
    import masks
    import step
    from batching import eval_batches, eval_groups, pack_tokens
    from dialogues import iter_dialogues

    cfg, speakers_trained = ev.cfg, ev.rendering.train_speakers
    block_size = min(cfg.BLOCK_SIZE, ev.context)
    all_val = cache.tokens(cfg.VAL_FILE, checkpoints.sha256(cfg.VAL_FILE), ev.tokenizer, ev.rendering, cfg.CACHE_DIR,
                           print)
    val_tok = all_val.head(cfg.VAL_MAX_TOKENS)
    scored = list(itertools.islice(iter_dialogues(cfg.VAL_FILE), len(val_tok)))  # the same dialogues, as text
    seen = collections.Counter(s for d in scored for s in {s for s, _ in d})
    speakers = [s for s, n in seen.most_common(5)
                if n >= RECURRING and (speakers_trained is None or s in speakers_trained)]
    blocks = pack_tokens(val_tok.tagged(speakers) if speakers else val_tok, block_size)  # anyone else: the last tag
    split = masks.form(ev.model) is None  # each piece a row of its own, where the model cannot keep them apart
    val = eval_batches(blocks, cfg.BATCH_SIZE, ev.tokenizer.eos_token_id, block_size, split)
    n_tokens = sum(int((y != -100).sum()) for _, y, _ in val)
    print(f"validation: {len(scored)} of {len(all_val)} dialogues in {cfg.VAL_FILE}, {n_tokens:,} tokens")
    val_loss, by_tag = step.evaluate(ev.layout, val, desc="validation (model)",
                                     groups=eval_groups(blocks, cfg.BATCH_SIZE, block_size, split))
    per_speaker = {name: by_tag[i + 1] for i, name in enumerate(speakers + ["(others)"]) if i + 1 in by_tag}
    if len(per_speaker) < 2:
        per_speaker = {}  # one speaker's loss is the overall loss
    return val, scored, n_tokens, val_loss, per_speaker


def load_base(ev):
    """The model the run started from, on the fine-tuned model's device: the untrained one for MODEL="scratch" (the
    same architecture, initialised with the run's seed). Raises UserError where it can't be loaded here."""
    import torch

    import modeling
    import processes

    if ev.cfg.MODEL == "scratch":
        torch.manual_seed(ev.cfg.SEED)
        base = type(ev.model)(ev.model.config)
    else:
        base = modeling.load(ev.cfg.MODEL)[1]
    layout = processes.Single(processes.World(), ev.layout.device, ev.layout.dtype)
    layout.wrap(base.eval())
    return layout, base


def base_figures(ev, val, asked):
    """The base model's loss on the same batches and its replies to the same prompts with the same sampling seed:
    (its name, loss or None, a note on where the loss came from, its reply figures or None). A base that can't be
    loaded here falls back on what train.py measured at step 0, and has no reply figures."""
    import step

    cfg = ev.cfg
    try:
        layout, base = load_base(ev)
    except UserError as e:
        step0 = [m["val_loss"] for m in ev.metrics if m.get("step") == 0 and "val_loss" in m]
        if step0:
            return cfg.MODEL, step0[0], " (base not loadable here; its loss from metrics.jsonl step 0)", None
        return cfg.MODEL, None, f" (base not evaluated: {e})", None
    loss = step.evaluate(layout, val, desc="validation (base)")
    _, figures = reply_figures(ev, base, asked, "replies (base)")
    return cfg.MODEL, loss, "", figures


GENERATION = ("NUM_REPLIES", "SEED", "TEMPERATURE", "TOP_K", "TOP_P", "REPETITION_PENALTY", "MAX_NEW_TOKENS",
              "BATCH_SIZE")  # what the base's replies depend on besides the prompts (sampling draws by batch)


def base_identity(cfg, model):
    """What names the base model's weights: a local directory's files by content; the untrained model of
    MODEL="scratch" by the seed and the architecture; a Hub id by the id and the commit it resolves to (hub.revision),
    so a new revision on the Hub is scored afresh."""
    import checkpoints
    import hub
    import modeling

    if cfg.MODEL == "scratch":
        return ["scratch", cfg.SEED, model.config.to_json_string()]
    try:
        path = modeling.local_path(cfg.MODEL)
    except UserError:
        return [cfg.MODEL]
    if not os.path.isdir(path):
        return [cfg.MODEL, hub.revision(cfg.MODEL)]
    return [cfg.MODEL] + [(f, checkpoints.sha256(os.path.join(path, f))) for f in sorted(os.listdir(path))
                          if f.endswith((".safetensors", ".json"))]


def base_key(ev, val, asked):
    """The key the base model's figures are kept under: its weights, the validation batches (their tokens and
    targets: the data, the tokenizer and how it renders), the turns asked, the generation settings and the device."""
    import hashlib

    h = hashlib.sha256(json.dumps([base_identity(ev.cfg, ev.model), asked, [getattr(ev.cfg, k) for k in GENERATION],
                                   str(ev.layout.device), str(ev.layout.dtype), ev.tokenizer.chat_template],
                                  default=str).encode())
    for x, y, _ in val:
        h.update(x.cpu().numpy().tobytes())
        h.update(y.cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def cached_base_figures(ev, val, asked):
    """base_figures, kept in CACHE_DIR/base_figures and reused while what they depend on (base_key) is unchanged:
    evaluating another checkpoint, or another run of the same base on the same data, scores the base once."""
    path = os.path.join(ev.cfg.CACHE_DIR, "base_figures", base_key(ev, val, asked) + ".json")
    if os.path.isfile(path):
        with open(path) as f:
            print(f"base model: its figures from {path} (the same weights, validation data and settings)")
            return tuple(json.load(f))
    figures = base_figures(ev, val, asked)
    if figures[2] == "":  # measured here, not a fallback
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path) as out:
            json.dump(figures, out)
    return figures


def reply_turns(ev, dialogues):
    """Where the model speaks in each dialogue, as training rendered it: [(the turns before, the speaker, the real
    reply)] per dialogue. In the speaker format, every turn of a trained speaker (TRAIN_SPEAKERS, or anyone) with a
    turn before it; in a chat template, every assistant message of trained speakers (a speaker's turns in a row are
    one message, its texts the real reply) that is not kept as context."""
    from render import SYSTEM, messages, template_rules, with_system

    train, out = ev.rendering.train_speakers, []
    for d in dialogues:
        turns = with_system(d, ev.rendering.system_prompt)
        if ev.roles_of is None:
            runs = [[i] for i, (s, _) in enumerate(turns) if s != SYSTEM and (train is None or s in train)]
        else:
            runs = [idx for role, idx, context in messages(ev.roles_of(turns), *template_rules(ev.tokenizer))
                    if role == "assistant" and not context and (train is None or
                                                                all(turns[i][0] in train for i in idx))]
        out.append([(turns[:idx[0]], turns[idx[0]][0], " ".join(turns[i][1] for i in idx)) for idx in runs
                    if any(s != SYSTEM for s, _ in turns[:idx[0]])])
    return out


def spread(candidates, n, seed):
    """Up to n of the candidates (a list per dialogue), spread over the dialogues: in a seeded order, one of each
    dialogue's (taken at random) per round."""
    rng = random.Random(seed)
    lists = [rng.sample(c, len(c)) for c in candidates if c]
    rng.shuffle(lists)
    return [x for round_ in itertools.zip_longest(*lists) for x in round_ if x is not None][:n]


def asked_turns(ev, scored):
    """The turns replies are asked at: up to NUM_REPLIES of reply_turns, spread over the dialogues from SEED."""
    return spread(reply_turns(ev, scored), ev.cfg.NUM_REPLIES, ev.cfg.SEED)


def reply_figures(ev, model, asked, desc="replies", generator=None):
    """`model`'s replies at the turns `asked`, generated BATCH_SIZE at a time with a generator seeded by SEED (or the
    one given) and compared with the real ones: (the replies, their figures)."""
    import torch

    from generation import replies

    cfg = ev.cfg
    generator = generator or torch.Generator().manual_seed(cfg.SEED)
    t = time.perf_counter()
    made = replies(model, ev.tokenizer, [(turns, speaker) for turns, speaker, _ in asked], cfg, generator,
                   ev.context, ev.roles_of, batch_size=cfg.BATCH_SIZE, desc=desc)
    seconds = time.perf_counter() - t
    out = [{"context": turns, "speaker": speaker, "real": real, "generated": text, "ended": ended,
            "new_tokens": n_new, "f1": token_f1(text, real)}
           for (turns, speaker, real), (text, ended, n_new) in zip(asked, made)]
    print(f"{desc}: {len(out)} in {seconds:.1f}s ({sum(r['new_tokens'] for r in out) / max(seconds, 1e-9):,.0f} "
          f"new tokens/s, batches of {cfg.BATCH_SIZE})")
    return out, reply_stats(out)


def reply_stats(out):
    """The figures of some replies. Each is one of three: empty (nothing but whitespace, however it ended), stopped
    (ended at its turn's end with something said) or cut at MAX_NEW_TOKENS; the three rates add up to 1."""
    n, texts = max(len(out), 1), [r["generated"] for r in out]
    empty = [not t.strip() for t in texts]
    return {
        "replies": len(out),
        "stop_rate": sum(r["ended"] and not e for r, e in zip(out, empty)) / n,
        "empty_rate": sum(empty) / n,
        "cut_rate": sum(not r["ended"] and not e for r, e in zip(out, empty)) / n,
        "mean_words": sum(len(words(t)) for t in texts) / n,
        "real_mean_words": sum(len(words(r["real"])) for r in out) / n,
        "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2),
        "token_f1": sum(r["f1"] for r in out) / n,
    }


def sample_dialogue(ev, generator):
    """SAMPLE_PROMPT (checked in setup) continued until EOS, or the first turn end after SAMPLE_MAX_NEW_TOKENS (with a
    reply's MAX_NEW_TOKENS more, as the context allows, for that turn to end): never mid-turn."""
    from dialogues import format_dialogue
    from generation import dialogue, sampling
    from render import turn_closers

    cfg, tokenizer = ev.cfg, ev.tokenizer
    turns, speaker = ev.sample_prompt
    closers = None if ev.roles_of is None else turn_closers(tokenizer, turns + [(speaker, ".")], ev.sample_roles_of)
    more = min(cfg.MAX_NEW_TOKENS, ev.context - len(ev.sample_ids) - cfg.SAMPLE_MAX_NEW_TOKENS)
    new = dialogue(ev.model, tokenizer, ev.sample_ids, cfg.SAMPLE_MAX_NEW_TOKENS, more, sampling(cfg), generator,
                   closers)
    if ev.roles_of is not None:  # the template's special tokens shown: what the model sees
        return tokenizer.decode(ev.sample_ids + new)
    return (format_dialogue(turns) + f"{speaker}:" + tokenizer.decode(new, skip_special_tokens=True)).rstrip()


# ---------------------------------------------------------------------------------------------------------------------
# the report: a function of the figures alone

REPLY_FIGURES = ("replies", "stop_rate", "empty_rate", "cut_rate", "mean_words", "real_mean_words", "distinct_1",
                 "distinct_2", "token_f1")


def reply_row(name, r):
    """A model's reply figures as a row of the report's table; dashes where it has none."""
    if r is None:
        return f"| {name} | - | - | - | - | - | - | - |"
    return (f"| {name} | {r['stop_rate']:.0%} | {r['empty_rate']:.0%} | {r['cut_rate']:.0%} | {r['mean_words']:.1f} "
            f"| {r['token_f1']:.3f} | {r['distinct_1']:.2f} | {r['distinct_2']:.2f} |")


def report(f):
    """The report of an evaluation's figures `f` (a dict: model, base_model, val_file, val_tokens, val_loss,
    base_val_loss, base_note, per_speaker_loss, the reply figures (REPLY_FIGURES), base_replies (the base's, or
    None), samples, sample_dialogue, plot_note): (the JSON report, the markdown, the headline)."""
    from step import ppl

    base, loss, base_loss = f["base_model"], f["val_loss"], f["base_val_loss"]
    data = {k: f[k] for k in ("model", "base_model", "val_file", "val_tokens", "val_loss")}
    data.update(val_ppl=ppl(loss), base_val_loss=base_loss, base_val_ppl=ppl(base_loss) if base_loss is not None
                else None, per_speaker_loss=f["per_speaker_loss"],
                **{k: f[k] for k in REPLY_FIGURES + ("base_replies", "samples", "sample_dialogue")})
    if base_loss is None:
        headline = f"validation perplexity {ppl(loss):.2f}{f['base_note']}"
    elif base == "scratch":  # nothing was fine-tuned: the base is the untrained model
        headline = (f"trained from scratch: validation perplexity went from {ppl(base_loss):.2f} (untrained) to "
                    f"{ppl(loss):.2f}{f['base_note']}")
    else:
        headline = (f"fine-tuning took validation perplexity from {ppl(base_loss):.2f} to {ppl(loss):.2f}"
                    f"{f['base_note']}")
    md = [f"# Evaluation of `{f['model']}`", "", headline + ".", "",
          "| model | val loss | val perplexity |", "|---|---|---|",
          f"| base `{base}` | {base_loss:.4f} | {ppl(base_loss):.2f} |" if base_loss is not None else
          f"| base `{base}` | - | - |",
          f"| {'trained' if base == 'scratch' else 'fine-tuned'} | {loss:.4f} | {ppl(loss):.2f} |", "",
          f"Over {f['val_tokens']:,} validation tokens of {f['val_file']}, token-weighted, padding excluded.", ""]
    if f["per_speaker_loss"]:
        md += ["Per speaker, the fine-tuned model's loss over the same targets, split by whose turn each is in (label, "
               "text, line end, EOS). The overall loss is their token-weighted mean, so some speakers are above it "
               "and some below.", "",
               "| speaker | val loss | perplexity |", "|---|---|---|",
               *[f"| {s} | {v:.4f} | {ppl(v):.2f} |" for s, v in f["per_speaker_loss"].items()], ""]
    fine_tuned = "trained" if base == "scratch" else "fine-tuned"
    md += [f"## Replies ({f['replies']} turns where the model speaks)", "",
           "The same prompts and sampling seed for both models. Each reply stopped at its turn's end, came out empty, "
           "or was cut at MAX_NEW_TOKENS; word F1 is against the real reply.", "",
           "| model | stopped | empty | cut at limit | mean words | word F1 | distinct-1 | distinct-2 |",
           "|---|---|---|---|---|---|---|---|",
           reply_row(f"base `{base}`", f["base_replies"]), reply_row(fine_tuned, f),
           f"| real replies | | | | {f['real_mean_words']:.1f} | | | |", ""]
    for r in f["samples"][:5]:
        md += ["```", *[f"{s}: {t}" for s, t in r["context"][-3:]], "```",
               f"- real: **{r['speaker']}:** {r['real']}", f"- generated: **{r['speaker']}:** {r['generated']}"
               f"{'' if r['ended'] else ' *(did not end)*'}", ""]
    md += ["## Sample dialogue", "", "```", f["sample_dialogue"], "```", ""]
    md += [f"*{f['plot_note']}*", ""] if f["plot_note"] else ["![loss curve](loss_curve.png)", ""]
    return data, "\n".join(md), headline


def report_dir(cfg, model_dir):
    """Where an evaluated model's report goes: OUT_DIR/eval/<name>, named by the model directory (best, final,
    step-00000171 for those in OUT_DIR; another's path from here, or from /, its separators as dashes), so no report
    overwrites another's."""
    inside = lambda rel: rel != os.curdir and not rel.startswith(os.pardir)
    rel = os.path.relpath(model_dir, cfg.OUT_DIR)
    if inside(rel):
        name = os.path.basename(rel)
    else:
        rel = os.path.relpath(model_dir)
        name = (rel if inside(rel) else os.path.abspath(model_dir).strip(os.sep)).replace(os.sep, "-")
    return os.path.join(cfg.OUT_DIR, "eval", name)


def write_report(ev, figures, made_on):
    """The loss curve, eval_report.json and eval_report.md in the model's report_dir, and the summary on stdout.
    `made_on` goes into eval_report.json beside the figures: what they were computed on (basis) and at which
    prompts."""
    cfg = ev.cfg
    out_dir = report_dir(cfg, ev.model_dir)
    os.makedirs(out_dir, exist_ok=True)
    title = f"{os.path.abspath(cfg.OUT_DIR)}: {figures['base_model']} on {cfg.TRAIN_FILE}"
    figures["plot_note"] = plot_loss_curve(ev.metrics, os.path.join(out_dir, "loss_curve.png"), title) \
        if ev.metrics else "loss_curve.png not written: no metrics.jsonl in OUT_DIR"
    data, md, headline = report(figures)
    data.update(made_on)
    with atomic_write(os.path.join(out_dir, "eval_report.json")) as out:
        json.dump(data, out, indent=2)
    with atomic_write(os.path.join(out_dir, "eval_report.md")) as out:
        out.write(md)
    for r in figures["samples"][:3]:
        print("\n" + "\n".join(f"  {s}: {t}" for s, t in r["context"][-2:]))
        print(f"  real      {r['speaker']}: {r['real']}\n  generated {r['speaker']}: {r['generated']}")
    print(f"\nsample dialogue:\n{figures['sample_dialogue']}\n")
    if figures["plot_note"]:
        print(figures["plot_note"])
    b = figures["base_replies"] or {}
    then = lambda k, form: f" (base {format(b[k], form)})" if k in b else ""
    print(f"{headline}; replies: stopped {figures['stop_rate']:.0%}{then('stop_rate', '.0%')}, empty "
          f"{figures['empty_rate']:.0%}{then('empty_rate', '.0%')}, cut {figures['cut_rate']:.0%}, "
          f"{figures['mean_words']:.1f} words (real {figures['real_mean_words']:.1f}), "
          f"F1 {figures['token_f1']:.3f}{then('token_f1', '.3f')}; "
          f"report in {os.path.join(out_dir, 'eval_report.md')}")


def preference_report(cfg):
    """A preference run's held-out pairs scored by the base and the tuned model: how often each gives the chosen reply
    the higher log-probability (summed, and per token), and the tuned model's reward accuracy and margin with the base
    as its reference (DPO's, at BETA; what train.py's validation reports for DPO). Written as eval_report.json and
    .md in the model's report_dir."""
    quiet_libraries()
    import hardware
    import loss
    import masks
    import modeling
    import preference
    import processes
    from render import Rendering

    model_dir = which_model(cfg)
    device, dtype, device_note = hardware.pick(cfg.DEVICE, cfg.PRECISION)
    print(device_note)
    loss.use_chunk(cfg.LOSS_CHUNK)
    tokenizer, model = modeling.load(model_dir)
    pairs = preference.load_pairs(cfg.VAL_FILE, tokenizer, Rendering.of(cfg), cfg.BLOCK_SIZE)
    rows, logps = [], {}
    for name, load in (("base", lambda: modeling.load(cfg.MODEL)[1] if cfg.MODEL != "scratch" else None),
                       ("tuned", lambda: model)):
        m = load()
        if m is None:
            continue  # a scratch run's base is random weights: nothing to compare with
        layout = processes.Single(processes.World(), device, dtype)
        layout.wrap(m.eval())
        batches = preference.pair_batches(pairs, cfg.BATCH_SIZE, tokenizer.eos_token_id, cfg.BLOCK_SIZE,
                                          masks.form(m) is None)
        logps[name] = lp = preference.sequence_logps(layout, batches, len(pairs), desc=f"pairs ({name})").cpu()
        tokens = torch_lengths(pairs)
        rows.append({"model": cfg.MODEL if name == "base" else model_dir,
                     "prefers_chosen": float(((lp[:, 0] > lp[:, 1]).double() + 0.5 * (lp[:, 0] == lp[:, 1])).mean()),
                     "prefers_chosen_per_token": float((lp[:, 0] / tokens[:, 0] > lp[:, 1] / tokens[:, 1]).double()
                                                       .mean())})
    if "base" in logps:
        dpo = preference.Objective("dpo", float(cfg.BETA))
        losses, rc, rr = dpo.losses(logps["tuned"].view(-1), logps["base"], None)
        sums = preference.figure_sums(losses, rc, rr) / len(pairs)
        rows[-1].update(reward_acc=float(sums[1]), margin=float(sums[2]))
    out_dir = report_dir(cfg, model_dir)
    os.makedirs(out_dir, exist_ok=True)
    md = [f"# Held-out preference accuracy of `{model_dir}`", "",
          f"{len(pairs):,} pairs of {cfg.VAL_FILE}. Prefers chosen: the share of pairs whose chosen reply the model "
          f"finds likelier than the rejected one (summed log-probability; per token). Reward accuracy and margin: "
          f"DPO's, BETA={cfg.BETA}, with the base as the reference.", "",
          "| model | prefers chosen | per token | reward accuracy | margin |", "|---|---|---|---|---|",
          *[f"| `{r['model']}` | {r['prefers_chosen']:.1%} | {r['prefers_chosen_per_token']:.1%} | "
            f"{format(r['reward_acc'], '.1%') if 'reward_acc' in r else '-'} | "
            f"{format(r['margin'], '.3f') if 'margin' in r else '-'} |" for r in rows], ""]
    with atomic_write(os.path.join(out_dir, "eval_report.json")) as f:
        json.dump({"val_file": cfg.VAL_FILE, "pairs": len(pairs), "models": rows}, f, indent=2)
    with atomic_write(os.path.join(out_dir, "eval_report.md")) as f:
        f.write("\n".join(md))
    print("\n".join(md[4:-1]))
    print(f"held-out preference accuracy over {len(pairs):,} pairs: " + ", ".join(
        f"{'base' if r['model'] == cfg.MODEL else 'tuned'} {r['prefers_chosen']:.1%}" for r in rows)
        + f"; report in {os.path.join(out_dir, 'eval_report.md')}")


def torch_lengths(pairs):
    """Each pair's (chosen, rejected) scored tokens, a float tensor [pairs, 2]."""
    import torch
    return torch.tensor([sum(1 for m in mask[1:] if m) for _, mask in pairs.sequences],
                        dtype=torch.float64).view(-1, 2)


def evaluate_model(cfg):
    """Evaluate the model `cfg` names (its run's settings, cli.run_settings) and write its report."""
    ev = setup(cfg)
    import torch

    val, scored, n_tokens, val_loss, per_speaker = validation(ev)
    asked = asked_turns(ev, scored)
    base_name, base_loss, base_note, base_replies = cached_base_figures(ev, val, asked)
    generator = torch.Generator().manual_seed(cfg.SEED)  # replies and sample dialogue: the same SEED, the same text
    samples, figures = reply_figures(ev, ev.model, asked, generator=generator)
    sample_text = sample_dialogue(ev, generator)
    prompts = sha256_of([[turns, speaker] for turns, speaker, _ in asked])
    write_report(ev, {"model": ev.model_dir, "base_model": base_name, "val_file": cfg.VAL_FILE,
                      "val_tokens": n_tokens, "val_loss": val_loss, "base_val_loss": base_loss, "base_note": base_note,
                      "per_speaker_loss": per_speaker, **figures, "base_replies": base_replies, "samples": samples,
                      "sample_dialogue": sample_text}, {"basis": basis(cfg, ev.model_dir), "prompts": prompts})


# ---------------------------------------------------------------------------------------------------------------------
# runs and checkpoints side by side (COMPARE): what each report holds, evaluated where it is missing or made on other
# data or settings

SHARED = ("VAL_FILE", "VAL_MAX_TOKENS", "SEED")  # run settings a comparison holds the same for every model: the data
# scored, and the turns asked and the sampling seed (both from SEED); the generation settings are the command's own
BASIS = GENERATION + ("VAL_MAX_TOKENS", "SAMPLE_PROMPT", "SAMPLE_MAX_NEW_TOKENS")  # the settings a report records


def sha256_of(value):
    import hashlib
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def basis(cfg, model_dir):
    """What a model's figures were computed on, besides the model's own settings: the validation data (by content)
    and its cap, SEED, the generation settings (BATCH_SIZE too: sampling draws by batch), and the model's files (by
    its manifest: a run that trained again into the same directory is another model). Stored in eval_report.json; a
    comparison reuses only a report whose basis is its own."""
    manifest = os.path.join(model_dir, "manifest.json")
    return {"val_file_sha256": sha256(cfg.VAL_FILE) if os.path.isfile(cfg.VAL_FILE) else None,
            **{k.lower(): getattr(cfg, k) for k in BASIS},
            "model_manifest_sha256": sha256(manifest) if os.path.isfile(manifest) else None}


def is_run(path):
    """Whether `path` is a run's directory: a config.json holding train.py's settings (a model's holds its
    architecture)."""
    return os.path.isfile(os.path.join(path, "config.json")) and "MODEL" in read_run_config(
        os.path.join(path, "config.json"))


def compared(paths):
    """[(a label, the run's OUT_DIR, the model directory)] for COMPARE's paths, each checked: a run stands for its
    best/; a model directory inside a run (best/, final/, checkpoints/step-...) for itself."""
    if isinstance(paths, str):
        paths = paths.split(",")
    if not isinstance(paths, (list, tuple)) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise UserError(f"--compare={paths!r}: expected runs or model directories, comma-separated, e.g. "
                        f"--compare=out_a,out_b,out_a/checkpoints/step-00000100")
    out = []
    for label in dict.fromkeys(os.path.normpath(p.strip()) for p in paths):
        if is_run(label):
            run_dir, model_dir = label, os.path.join(label, "best")
            if not os.path.isdir(model_dir):
                raise UserError(f"COMPARE: run {label!r} has no best/ model yet: let train.py finish, or name one of "
                                f"its checkpoints")
        else:
            model_dir = label
            parent = os.path.dirname(os.path.abspath(label))
            model = any(os.path.isfile(os.path.join(label, f)) for f in ("config.json", "adapter_config.json"))
            runs = [d for d in (parent, os.path.dirname(parent)) if is_run(d)] if model else []
            if not runs:
                if not os.path.exists(label):
                    raise UserError(f"{no_such('COMPARE', label)}: a run or a model directory inside one is expected")
                raise UserError(f"COMPARE: {label!r} is neither a run (a directory train.py wrote) nor a model "
                                f"directory inside one (best/, final/, checkpoints/step-...)")
            run_dir = os.path.relpath(runs[0])
        out.append((label, run_dir, model_dir))
    return out


def settings_of(cfg, given, run_dir, model_dir, shared):
    """A compared model's settings: its run's (cli.run_settings), the command line's, and `shared` (SHARED's values,
    the same for every model) over both."""
    mine = type(cfg)(**{**vars(cfg), "OUT_DIR": run_dir, "CHECKPOINT": model_dir, "COMPARE": None, **shared})
    return settings_of_run(mine, given | set(shared), say=lambda line: None)


def read_report(path, want):
    """(the report at `path`, None) where it was made on `want` (its basis), else (None, why it can't be used)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, "no report yet"
    except (OSError, ValueError):
        return None, "its report is unreadable"
    made_on = data.get("basis") if isinstance(data, dict) else None
    if not isinstance(made_on, dict):
        return None, "its report does not say what it was made on (an older evaluate.py's)"
    if made_on != want:
        differ = sorted(k for k in want if made_on.get(k) != want[k])
        return None, f"its report was made on other data or settings ({', '.join(differ)})"
    return data, None


def cell(value, form):
    return "-" if value is None else format(value, form)


def comparison_rows(reports):
    """The table's rows: each base model once (its figures from the first report that has them), then each model."""
    from step import ppl

    def row(name, loss, per_speaker, r):
        r = r or {}
        speakers = ", ".join(f"{s} {v:.3f}" for s, v in (per_speaker or {}).items()) or "-"
        return (f"| {name} | {cell(loss, '.4f')} | {cell(None if loss is None else ppl(loss), '.2f')} | {speakers} "
                f"| {cell(r.get('stop_rate'), '.0%')} | {cell(r.get('empty_rate'), '.0%')} "
                f"| {cell(r.get('cut_rate'), '.0%')} | {cell(r.get('mean_words'), '.1f')} "
                f"({cell(r.get('real_mean_words'), '.1f')}) | {cell(r.get('token_f1'), '.3f')} "
                f"| {cell(r.get('distinct_2'), '.2f')} |")

    bases = {}
    for _, data in reports:
        if data["base_model"] not in bases and (data["base_val_loss"] is not None or data["base_replies"]):
            bases[data["base_model"]] = row(f"base `{data['base_model']}`", data["base_val_loss"], None,
                                            data["base_replies"])
    return [*bases.values(), *(row(f"`{label}`", data["val_loss"], data["per_speaker_loss"], data)
                               for label, data in reports)]


def compared_reports(cfg, given):
    """[(label, its report)] for COMPARE's models, on the same SHARED settings, and how many were evaluated now: a
    report is read where it was made on this basis, else the model is evaluated (evaluate_model) and it is written.
    Every path is checked before anything is evaluated."""
    models = compared(cfg.COMPARE)
    first = settings_of(cfg, given, models[0][1], models[0][2], {})
    shared = {k: getattr(first, k) for k in SHARED}  # the command line's, else the first model's run's
    if not os.path.isfile(shared["VAL_FILE"]):
        raise UserError(f"{no_such('VAL_FILE', shared['VAL_FILE'])}: run prepare_data.py first")
    reports, evaluated = [], 0
    for label, run_dir, model_dir in models:
        mine = settings_of(cfg, given, run_dir, model_dir, shared)
        path = os.path.join(report_dir(mine, model_dir), "eval_report.json")
        data, why = read_report(path, basis(mine, model_dir))
        if data is None:
            print(f"{label}: {why}; evaluating it")
            evaluate_model(mine)
            data, _ = read_report(path, basis(mine, model_dir))
            evaluated += 1
        else:
            print(f"{label}: its figures from {path}")
        reports.append((label, run_dir, data))
    return reports, shared, evaluated


def compare(cfg, given):
    """COMPARE's models side by side: the table on stdout and in OUT_DIR/comparison.md, their runs' validation
    curves in OUT_DIR/comparison.png."""
    reports, shared, evaluated = compared_reports(cfg, given)
    many = lambda n, noun: f"{n} {noun}{'' if n == 1 else 's'}"
    lines = ["| model | val loss | val perplexity | per speaker (val loss) | stopped | empty | cut at limit "
             "| mean words (real) | word F1 | distinct-2 |", "|---|---|---|---|---|---|---|---|---|---|",
             *comparison_rows([(label, data) for label, _, data in reports])]
    if len({data.get("prompts") for _, _, data in reports}) > 1:
        lines += ["", "Replies were asked at other turns for some models: their runs train other speakers or render "
                      "dialogues otherwise (TRAIN_SPEAKERS, ROLES, FORMAT)."]
    print("\n" + "\n".join(lines) + "\n")
    os.makedirs(cfg.OUT_DIR, exist_ok=True)
    md_path, png_path = os.path.join(cfg.OUT_DIR, "comparison.md"), os.path.join(cfg.OUT_DIR, "comparison.png")
    runs = dict.fromkeys(run_dir for _, run_dir, _ in reports)
    note = plot_curves([(run_dir, val_curve(read_jsonl(os.path.join(run_dir, "metrics.jsonl"))), "o-")
                        for run_dir in runs], png_path, "validation loss of each run")
    scored = (f"the first {shared['VAL_MAX_TOKENS']:,} tokens of" if shared["VAL_MAX_TOKENS"] else "all of")
    with atomic_write(md_path) as out:
        out.write("\n".join([
            f"# {many(len(reports), 'model')} side by side ({time.strftime('%Y-%m-%d')})", "",
            f"Validation loss over {scored} {shared['VAL_FILE']}; replies at up to {cfg.NUM_REPLIES} turns where "
            f"each model speaks (the same turns where runs train the same speakers), SEED={shared['SEED']}, "
            f"TEMPERATURE={cfg.TEMPERATURE}, MAX_NEW_TOKENS={cfg.MAX_NEW_TOKENS}. Mean words: the replies' (the real "
            f"replies').", "", *lines, "", f"*{note}*" if note else "![validation loss](comparison.png)", ""]))
    if note:
        print(note)
    print(f"compared {many(len(reports), 'model')} ({evaluated} evaluated now, {len(reports) - evaluated} from their "
          f"reports); table in {md_path}, validation curves of {many(len(runs), 'run')} in {png_path}")


def main():
    given = set()
    cfg = load_config(doc=__doc__, given=given)
    if cfg.COMPARE is not None:
        return compare(cfg, given)
    cfg = settings_of_run(cfg, given)
    if cfg.OBJECTIVE != "sft":  # a preference run's VAL_FILE holds pairs
        return preference_report(cfg)
    evaluate_model(cfg)


if __name__ == "__main__":
    run(main)
