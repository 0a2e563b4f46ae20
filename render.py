"""Rendering a dialogue to tokens: one list of (ids, mask) turns per dialogue, in one of two formats, and the prompts
generation asks a model to continue in the same format.

The speaker format (`render`, FORMAT="speaker") writes each turn as its text-file line, "Speaker: text\\n", and ends
the dialogue with EOS; speaker_template, saved with every model trained in it, renders the same text for any tool that
uses apply_chat_template. The chat-template format (`render_chat`, FORMAT="chat_template") renders the dialogue with
the model's own template, each speaker as a role (`role_map`), token for token what apply_chat_template writes for
the messages `messages` makes of the turns (repeated roles merged; see README). Either way the last turn ends with
EOS (or the template's end of turn), a real target, so the model learns to stop. `mask` marks the tokens that are
trained: all of them, or with TRAIN_SPEAKERS their turns' text and end, never the label or role header (the prompt
at generation), never a system message (the speaker `system`). batching.py cuts and packs what this renders;
generation.py samples after `prompt_ids`.
"""

import collections
import json
import os
from dataclasses import dataclass

import numpy as np

from cli import UserError
from dialogues import SYSTEM, clean_speaker, clean_text, format_dialogue, iter_dialogues  # SYSTEM: the speaker a system message is


# The chat template saved with every model trained in the speaker format (speaker_template): apply_chat_template
# renders the training text exactly (BOS, or EOS where the model has no BOS, then "Speaker: text" lines, then EOS).
# A message's speaker is its "name", else its role: "user" and "assistant" are the run's two speakers (so a tool that
# knows only roles, pipeline() or `transformers serve`, prompts the model as it was trained), "system" is the
# speaker `system`, any other role is a speaker's name. add_generation_prompt=True ends with the assistant's label.
# Every such template starts with the same line (is_speaker_template); jinja string literals take json's escapes.
SPEAKER_TEMPLATE = (
    "{{- bos_token or eos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m.name -%}{%- set s = m.name -%}{%- elif m.role == 'user' -%}{%- set s = USER -%}"
    "{%- elif m.role == 'assistant' -%}{%- set s = BOT -%}{%- else -%}{%- set s = m.role -%}{%- endif -%}"
    "{{ s | replace(':', ' ') | trim }}: {{ m.content.split() | join(' ') }}{{ '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ BOT }}:{%- else -%}{{ eos_token }}{%- endif -%}")


def speaker_template(user, bot):
    """The speaker format's chat template for a run whose user is `user` and whose trained speaker is `bot`."""
    user, bot = clean_speaker(user), clean_speaker(bot)  # as their lines in the text files spell them
    return SPEAKER_TEMPLATE.replace("USER", json.dumps(user)).replace("BOT", json.dumps(bot))


def is_speaker_template(template):
    """Whether a chat template is the speaker format's (of any run, or the one saved before it named the run's
    speakers, which opened the same way)."""
    return bool(template) and template.startswith(SPEAKER_TEMPLATE[:SPEAKER_TEMPLATE.index("-}}") + 3])


def template_speakers(tokenizer):
    """(the user, the trained speaker) that a speaker-format chat template names, read back from what it writes."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    first, label = text[len(tokenizer.bos_token or tokenizer.eos_token):].split("\n")
    return first.removesuffix(": x"), label.removesuffix(":")


def run_speakers(cfg, given=()):
    """(the user's name, the trained speaker's) of a run: the trained speaker is the first of TRAIN_SPEAKERS, else
    the one ROLES makes the assistant; the user the one ROLES makes the user, else VAL_FILE's commonest other
    speaker. USER_NAME and BOT_NAME where `given` (on the command line), or where the run names no trained
    speaker. chat.py talks as these; train.py saves them in the speaker format's template."""
    named = lambda role: [s for s, r in (cfg.ROLES or {}).items() if r == role and s not in ("*", SYSTEM)]
    bot = (cfg.TRAIN_SPEAKERS or named("assistant") or [None])[0]
    if bot is None or "BOT_NAME" in given:
        return cfg.USER_NAME, cfg.BOT_NAME
    others = collections.Counter(s for d in (iter_dialogues(cfg.VAL_FILE) if os.path.isfile(cfg.VAL_FILE) else [])
                                 for s, _ in d if s not in (bot, SYSTEM))
    user = cfg.USER_NAME if "USER_NAME" in given else (named("user") + [s for s, _ in others.most_common(1)] +
                                                         [cfg.USER_NAME])[0]
    return user, bot


def start_id(tokenizer):
    """The token a dialogue starts after: BOS where the model has one (Llama-family models are trained with it
    there), else EOS (GPT-2 and Pythia separate documents with it)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, texts, plain=True):
    """Token ids of a list of texts, as plain text: a dialogue that mentions "<|endoftext|>" must not get a real EOS
    (the model would learn to stop there), so special tokens are never parsed out of it (with plain=False they are:
    a chat template's own text). The fast tokenizer's backend is called directly: the same ids as tokenizer(texts),
    without the per-text Python objects that made transformers' wrapper half the cost of the token cache."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=plain, verbose=False)["input_ids"]
    before = backend.encode_special_tokens
    backend.encode_special_tokens = plain  # what split_special_tokens=True sets in transformers
    try:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


def with_system(turns, system_prompt):
    """SYSTEM_PROMPT as the first turn, spoken by `system`, of a dialogue that has no system message: one line, as
    every turn's text is (the speaker format writes it as the line "system: text")."""
    if not system_prompt or not clean_text(system_prompt) or any(s == SYSTEM for s, _ in turns):
        return list(turns)
    return [(SYSTEM, clean_text(system_prompt))] + list(turns)


def render(tokenizer, dialogues, train_speakers=None):
    """Each dialogue as a list of turns, each turn (ids, mask); the last turn carries the EOS. A system message is
    the line "system: text", given as context and never trained."""
    turns = [t for d in dialogues for t in d]
    names = list({s: None for s, _ in turns})  # a label is tokenized once per speaker, not once per turn
    labels = dict(zip(names, encode(tokenizer, [f"{s}:" for s in names])))
    bodies = encode(tokenizer, [f" {t}\n" for _, t in turns])
    eos, out, k = tokenizer.eos_token_id, [], 0
    for d in dialogues:
        rendered = []
        for i, (speaker, _) in enumerate(d):
            label, body = labels[speaker], bodies[k] + ([eos] if i == len(d) - 1 else [])
            if speaker == SYSTEM:
                mask = [0] * (len(label) + len(body) - (i == len(d) - 1)) + [1] * (i == len(d) - 1)
            elif train_speakers is None:
                mask = [1] * (len(label) + len(body))
            else:  # the label is given at generation time; the reply, its line end and EOS are what we train
                mask = [0] * len(label) + [int(speaker in train_speakers)] * len(body)
            rendered.append((label + body, mask))
            k += 1
        out.append(rendered)
    return out



# ---------------------------------------------------------------------------------------------------------------------
# FORMAT="chat_template": the model's own template renders the dialogue, each speaker as a role

MARK = "\ue000{}\ue001"  # a stand-in for message i's text while the template renders: private-use characters
HEADER, TEXT, FOOTER = range(3)  # the parts of a turn: what the template writes before its text, the text, after it


def role_map(roles=None, train_speakers=None):
    """A function from a dialogue's turns to each turn's chat role. ROLES maps speakers to roles ("*": everyone
    else). Without it, TRAIN_SPEAKERS are the assistant and everyone else the user; without either, in a two-speaker
    dialogue whoever speaks first is the user and the other the assistant. The speaker `system` (a system message of
    the data, or SYSTEM_PROMPT) is the system role unless ROLES names it."""
    def assign(turns):
        speakers = [s for s in dict.fromkeys(s for s, _ in turns) if s != SYSTEM]
        system = lambda s, role: "system" if s == SYSTEM and (roles is None or SYSTEM not in roles) else role
        if roles is not None:
            missing = [s for s in speakers if s not in roles and "*" not in roles]
            if missing:
                raise UserError(f"speaker {missing[0]!r} has no role in ROLES (add it, or a '*' entry for everyone "
                                f"else)")
            return [system(s, roles.get(s, roles.get("*"))) for s, _ in turns]
        if train_speakers is not None:
            return [system(s, "assistant" if s in train_speakers else "user") for s, _ in turns]
        if len(speakers) > 2:
            raise UserError(f"{len(speakers)} speakers ({', '.join(speakers)}); without ROLES or TRAIN_SPEAKERS only "
                            f"two-speaker dialogues get roles: set ROLES, e.g. --roles='{{\"{speakers[1]}\": "
                            f"\"assistant\", \"*\": \"user\"}}'")
        return [system(s, "user" if s == speakers[0] else "assistant") for s, _ in turns]
    return assign


def sample_roles(roles, train_speakers, turns, speaker):
    """The role map a prompt of made-up speakers (SAMPLE_PROMPT) is rendered with: the run's (ROLES, TRAIN_SPEAKERS)
    where it names the speaker asked to answer (or names no one and the prompt has two speakers), else the prompt's
    own: the speaker asked is the assistant, everyone else the user. So "Alex: Hi\\nBob:" asks the assistant to
    answer the user, whatever the run's speakers were called."""
    named = set(roles or {}) - {"*"} | set(train_speakers or [])
    if speaker in named or (not named and len({s for s, _ in turns} | {speaker}) <= 2):
        return role_map(roles, train_speakers)
    return role_map({**{s: "user" for s, _ in turns}, SYSTEM: "system", speaker: "assistant"})


_RULES = {}  # chat template -> what it insists on (template_rules)


def template_rules(tokenizer):
    """What the chat template insists on: (whether the user must speak first, whether it has a system slot). Found by
    rendering two small conversations: a template that raises on a leading assistant message (Gemma's, Mistral's,
    Llama 2's) needs the user first; one that raises on a system message or writes it anywhere but first (some of
    Mistral's put it in the last user message) has no slot of its own."""
    if tokenizer.chat_template not in _RULES:
        try:
            tokenizer.apply_chat_template([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                                          tokenize=False)
            user_first = False
        except Exception:  # the template's raise_exception, whatever it is called
            user_first = True
        try:
            _template(tokenizer, [{"role": r, "content": MARK.format(i)}
                                  for i, r in enumerate(["system", "user", "assistant", "user"])])
            slot = True
        except UserError:
            slot = False
        _RULES[tokenizer.chat_template] = (user_first, slot)
    return _RULES[tokenizer.chat_template]


def messages(roles, user_first=False, system_slot=True):
    """A dialogue's turns (their roles) as chat messages, each [role, turn indices, the leading turns kept as
    context]. Consecutive turns of one role become one message (a template that wants roles to alternate would
    refuse them). Where the template wants the user first, leading assistant turns open the conversation as (part
    of) the first user message: context, never trained. Where it has no system slot, a system turn joins the user
    message after it, as Gemma's template does itself."""
    out, opening = [], True
    for i, role in enumerate(roles):
        context = user_first and opening and role == "assistant"
        opening = opening and (context or role == "system")
        role = "user" if context or (role == "system" and not system_slot) else role
        if out and out[-1][0] == role:
            out[-1][1].append(i)
        else:
            out.append([role, [i], set()])
        if context:
            out[-1][2].add(i)
    return out


def _template(tokenizer, messages):
    """The chat template's text for some messages, each of whose content is MARK.format(i); split at the marks."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # a template's own raise_exception ("roles must alternate ...") or a jinja error
        raise UserError(f"the model's chat template refused it: {str(e).splitlines()[0] if str(e) else type(e)}")
    parts, pos = [], 0
    for i, m in enumerate(messages):
        at = text.find(MARK.format(i), pos)
        if at < 0:
            raise UserError(f"the model's chat template does not write turn {i + 1}'s text as given "
                            f"(role {m['role']!r}): that role may not exist in this template")
        parts.append(text[pos:at])
        pos = at + len(MARK.format(i))
    return parts + [text[pos:]]


def _segments(tokenizer, turns, roles, msgs):
    """The template's text of one dialogue as segments (text, turn, part) that together spell it: each message's
    header, its turns' texts (joined by a newline; the joiner starts the later turn's segment) and its footer. The
    footer is what the template writes after the message when it is the last one, and what it writes between two
    messages beyond that is the next one's header."""
    texts = []
    for _, idx, _ in msgs:
        texts.append([("\n\n" if roles[idx[j - 1]] == "system" else "\n") * (j > 0) + turns[i][1]
                      for j, i in enumerate(idx)])
    marked = [{"role": role, "content": MARK.format(k)} for k, (role, _, _) in enumerate(msgs)]
    gaps = _template(tokenizer, marked)
    segments, footer = [], ""
    for k, (role, idx, _) in enumerate(msgs):
        segments.append((gaps[k][len(footer):], idx[0], HEADER))
        segments += [(text, i, TEXT) for text, i in zip(texts[k], idx)]
        if k == len(msgs) - 1:
            footer = gaps[-1]
        elif role == "system":  # a system message alone may write nothing (Gemma folds it into the next message)
            footer = ""
        else:  # the longest common start of "after message k, at the end" and "between k and k + 1"
            alone = _template(tokenizer, marked[:k + 1])[-1]
            footer = gaps[k + 1][:next((j for j, (a, b) in enumerate(zip(gaps[k + 1], alone)) if a != b),
                                       min(len(gaps[k + 1]), len(alone)))]
        segments.append((footer, idx[-1], FOOTER))
    return segments


def special_ids(tokenizer):
    return {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)


def _encode(tokenizer, dialogues):
    """Token ids of each segment of each dialogue (see _segments). A dialogue's text is tokenized whole, as
    apply_chat_template(tokenize=True) does (tokenizing its pieces apart can merge differently: GPT-2's BPE writes
    "\\n\\n" alone as one token and before a word as two), and each token goes to the segment it starts in, or to
    the turn's text it reaches into from the header; one that runs on from a footer into the next header (the
    footer is cut by characters) is the header's. A dialogue whose text spells a special token is tokenized
    segment by segment instead, its texts as plain text (see encode): a turn can't end itself early."""
    backend, special = getattr(tokenizer, "backend_tokenizer", None), special_ids(tokenizer)
    whole = [None] * len(dialogues)
    if backend is not None:
        before = backend.encode_special_tokens
        backend.encode_special_tokens = False
        try:
            whole = backend.encode_batch(["".join(s for s, _, _ in d) for d in dialogues], add_special_tokens=False)
        finally:
            backend.encode_special_tokens = before
    out = []
    for segments, e in zip(dialogues, whole):
        starts = np.cumsum([0] + [len(s) for s, _, _ in segments])
        parts = np.array([p for _, _, p in segments] + [-1])
        if e is not None and e.ids:
            offsets = np.array(e.offsets)
            which = np.searchsorted(starts[:-1], offsets[:, 0], side="right") - 1
            over = offsets[:, 1] > starts[which + 1]  # a token that runs on into the next segment
            which += over & (((parts[which] == HEADER) & (parts[which + 1] == TEXT)) | (parts[which] == FOOTER))
            ids = np.array(e.ids)
            if not any(ids[t] in special for t in np.flatnonzero(parts[which] == TEXT)):
                cuts = np.searchsorted(which, np.arange(1, len(segments)))
                out.append([c.tolist() for c in np.split(ids, cuts)])
                continue
        plain = encode(tokenizer, [s for s, _, p in segments if p == TEXT])[::-1]
        rest = encode(tokenizer, [s for s, _, p in segments if p != TEXT], plain=False)[::-1]
        out.append([(plain if p == TEXT else rest).pop() for _, _, p in segments])
    return out


def chat_pieces(tokenizer, dialogues, roles_of, source="data", stats=None):
    """Each dialogue rendered by the model's chat template: per turn, (header, text, footer) token ids and whether
    they are trainable (see render_chat). Turns of one role in a row are one message (the later ones have no
    header, the earlier no footer); see messages() for what a template that wants the user first, or has no
    system slot, gets. The ids of a dialogue are exactly apply_chat_template(tokenize=True)'s for those messages
    (texts as plain text), BOS and all, save that EOS ends the last turn where the template ends it with no special
    token at all. `stats`, a Counter, counts the turns merged into the message before them and the leading turns
    kept as context."""
    user_first, slot = template_rules(tokenizer)
    all_segments, plans = [], []
    for n, turns in enumerate(dialogues):
        try:
            r = roles_of(turns)
            msgs = messages(r, user_first, slot)
            all_segments.append(_segments(tokenizer, turns, r, msgs))
        except UserError as e:
            raise UserError(f"{source}: dialogue {n + 1}: {e}") from None
        plans.append((r, msgs))
        if stats is not None:
            stats["merged"] += sum(len(idx) - 1 for _, idx, _ in msgs)
            stats["context"] += sum(len(c) for _, _, c in msgs)
    special, eos, out = special_ids(tokenizer), tokenizer.eos_token_id, []
    for turns, (r, msgs), segments, ids in zip(dialogues, plans, all_segments, _encode(tokenizer, all_segments)):
        parts = [([], [], []) for _ in turns]
        for (_, i, part), t in zip(segments, ids):
            parts[i][part].extend(t)
        if not special & set(parts[-1][FOOTER]):
            parts[-1][FOOTER].append(eos)
        rendered = [None] * len(turns)
        for _, idx, context in msgs:
            for i in idx:
                rendered[i] = (*parts[i], (r[i] == "system", i in context, tuple(turns[j][0] for j in idx
                                                                                  if r[j] != "system")))
        out.append(rendered)
    return out


def render_chat(tokenizer, dialogues, roles_of, train_speakers=None, source="data", stats=None):
    """As render, through the chat template: each turn is (header + text + footer, mask). Trained: everything but
    system text and the very first token (which only gives context), or with TRAIN_SPEAKERS, a message's text and
    footer (the end-of-turn token, so the model learns to stop) where every speaker of it is trained, never a header
    (the prompt at generation time), a system message or the context a template that wants the user first got. Of a
    footer, only what the model writes is trained: up to its first special token (<|im_end|>, <|eot_id|>, ...),
    where generation stops; what the template writes after it (ChatML's newline) the model never writes, and
    scoring it would make the loss read better than the model is."""
    special, out = special_ids(tokenizer), []
    for d in chat_pieces(tokenizer, dialogues, roles_of, source, stats):
        rendered = []
        for header, text, footer, (system, context, speakers) in d:
            if train_speakers is None:
                on = not system
            else:
                on = bool(speakers) and not context and all(s in train_speakers for s in speakers)
            head = int(train_speakers is None)
            # of the footer, what the model writes: up to and including its first special token
            end = next((k + 1 for k, t in enumerate(footer) if t in special), len(footer))
            mask = ([head] * len(header) + [int(on and not system)] * len(text) + [int(on)] * end
                    + [0] * (len(footer) - end))
            rendered.append((header + text + footer, mask))
        if rendered and rendered[0][1]:
            rendered[0][1][0] = 0  # the first token is the first window's context, never a target
        out.append(rendered)
    return out


def render_any(tokenizer, dialogues, train_speakers=None, roles_of=None, source="data", stats=None):
    """render_chat with `roles_of` (FORMAT="chat_template"), else render. Either way one (ids, mask) per turn."""
    if roles_of is None:
        return render(tokenizer, dialogues, train_speakers)
    return render_chat(tokenizer, dialogues, roles_of, train_speakers, source, stats)


@dataclass(frozen=True)
class Rendering:
    """How a run renders its dialogues: FORMAT ("speaker" or "chat_template") and the settings that change which
    tokens are rendered and trained (ROLES, TRAIN_SPEAKERS, SYSTEM_PROMPT): what the token cache is keyed by."""
    format: str = "speaker"
    roles: dict = None
    train_speakers: list = None
    system_prompt: str = None

    @classmethod
    def of(cls, cfg):
        return cls(cfg.FORMAT, cfg.ROLES, cfg.TRAIN_SPEAKERS, cfg.SYSTEM_PROMPT)

    @property
    def roles_of(self):
        """The function from a dialogue's turns to their chat roles (role_map), or None in the speaker format."""
        return role_map(self.roles, self.train_speakers) if self.format == "chat_template" else None


def context_token(tokenizer, roles_of=None):
    """The token a rendered dialogue is read after (never a target): start_id in the speaker format; None in a chat
    template, whose own first token (BOS, or <|im_start|> where the model has none) is the context: the sequence is
    the template's, not one token more."""
    return start_id(tokenizer) if roles_of is None else None


# ---------------------------------------------------------------------------------------------------------------------
# Prompts: what generation continues, rendered as training rendered the turns before it

def chat_roles(tokenizer, roles=None, train_speakers=None):
    """None for a model that speaks the speaker format (our template, or none), else the function from turns to
    roles (role_map of ROLES and TRAIN_SPEAKERS) its own chat template is prompted with: a model saved by train.py
    keeps its own template only when FORMAT="chat_template"."""
    if not tokenizer.chat_template or is_speaker_template(tokenizer.chat_template):
        return None
    return role_map(roles, train_speakers)


def end_ids(tokenizer, roles_of=None):
    """The tokens that end a turn: EOS in the speaker format; in a chat template, whose turn text is plain text, any
    special token (EOS, <|im_end|>, <|eot_id|>, ...)."""
    if roles_of is None:
        return {tokenizer.eos_token_id}
    return special_ids(tokenizer)


def turn_closers(tokenizer, turns, roles_of):
    """The special tokens the model's chat template closes a message with (<|im_end|>, <|eot_id|>, <end_of_turn>):
    those in the footers of `turns` rendered, not the ones that open the next message's header; every special token
    where the footers hold none."""
    footers = {t for _, _, footer, _ in chat_pieces(tokenizer, [list(turns)], roles_of)[0] for t in footer}
    return (footers & special_ids(tokenizer)) or special_ids(tokenizer)


def prompt(tokenizer, turns, speaker, roles_of=None):
    """The token ids asking `speaker` to speak after `turns`: the turns as trained, then the speaker's label (in a
    chat template, the header of the speaker's role)."""
    if roles_of is None:
        return [start_id(tokenizer)] + encode(tokenizer, [format_dialogue(turns) + f"{speaker}:"])[0]
    *before, (header, _, _, _) = chat_pieces(tokenizer, [list(turns) + [(speaker, ".")]], roles_of)[0]
    return [t for h, x, f, _ in before for t in h + x + f] + header  # the template's own tokens, from its first


def prompt_ids(tokenizer, turns, speaker, context, max_new_tokens, roles_of=None):
    """prompt(), dropping the oldest turns (a leading system message stays) until the prompt and the reply fit in the
    model's context: (ids, how many turns were dropped)."""
    system = [t for t in turns[:1] if t[0] == SYSTEM]
    for start in range(len(turns) + 1 - len(system)):
        ids = prompt(tokenizer, system + list(turns[len(system) + start:]), speaker, roles_of)
        if len(ids) + max_new_tokens <= context:
            return ids, start
    raise UserError(f"the prompt for {speaker!r} alone is {len(ids)} tokens; with MAX_NEW_TOKENS={max_new_tokens} "
                    f"it does not fit the model's context of {context} tokens")
