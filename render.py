"""Rendering a dialogue to tokens: one list of (ids, mask) turns per dialogue, in one of two formats, and the prompts
generation asks a model to continue in the same format.

The speaker format (`render`, FORMAT="speaker") writes each turn as its text-file line, "Speaker: text\\n", and ends
the dialogue with EOS; CHAT_TEMPLATE, saved with every model trained in it, renders the same text for any tool that
uses apply_chat_template. The chat-template format (`render_chat`, FORMAT="chat_template") renders the dialogue with
the model's own template, each speaker as a role (`role_map`). Either way the last turn ends with EOS (or the
template's end of turn), a real target, so the model learns to stop. `mask` marks the tokens that are trained: all of
them, or with TRAIN_SPEAKERS their turns' text and end, never the label or role header (the prompt at generation).
batching.py cuts and packs what this renders; generation.py samples after `prompt_ids`.
"""

from cli import UserError
from dialogues import format_dialogue

# The chat template saved with every model trained in the speaker format: apply_chat_template(messages) renders the
# training text exactly (BOS, or EOS where the model has no BOS, then "Speaker: text" lines, then EOS); with
# add_generation_prompt=True it ends with the next speaker's label instead: `next_speaker` if given, else the one who
# spoke before the last message. A message's speaker is its "name", else its "role".
CHAT_TEMPLATE = (
    "{{- bos_token or eos_token -}}"
    "{%- for m in messages -%}{{ (m.name or m.role) | replace(':', ' ') | trim }}: "
    "{{ m.content.split() | join(' ') }}{{ '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if next_speaker is defined and next_speaker -%}{%- set label = next_speaker -%}"
    "{%- elif messages | length > 1 -%}{%- set label = messages[-2].name or messages[-2].role -%}"
    "{%- else -%}{%- set label = 'assistant' -%}{%- endif -%}"
    "{{ label | replace(':', ' ') | trim }}:"
    "{%- else -%}{{ eos_token }}{%- endif -%}")


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


def render(tokenizer, dialogues, train_speakers=None):
    """Each dialogue as a list of turns, each turn (ids, mask); the last turn carries the EOS."""
    turns = [t for d in dialogues for t in d]
    names = list({s: None for s, _ in turns})  # a label is tokenized once per speaker, not once per turn
    labels = dict(zip(names, encode(tokenizer, [f"{s}:" for s in names])))
    bodies = encode(tokenizer, [f" {t}\n" for _, t in turns])
    eos, out, k = tokenizer.eos_token_id, [], 0
    for d in dialogues:
        rendered = []
        for i, (speaker, _) in enumerate(d):
            label, body = labels[speaker], bodies[k] + ([eos] if i == len(d) - 1 else [])
            if train_speakers is None:
                mask = [1] * (len(label) + len(body))
            else:  # the label is given at generation time; the reply, its line end and EOS are what we train
                mask = [0] * len(label) + [int(speaker in train_speakers)] * len(body)
            rendered.append((label + body, mask))
            k += 1
        out.append(rendered)
    return out



# ---------------------------------------------------------------------------------------------------------------------
# FORMAT="chat_template": the model's own template renders the dialogue, each speaker as a role

MARK = "\ue000{}\ue001"  # a stand-in for turn i's text while the template renders: private-use characters


def role_map(roles=None, train_speakers=None):
    """A function from a dialogue's turns to each turn's chat role. ROLES maps speakers to roles ("*": everyone
    else). Without it, TRAIN_SPEAKERS are the assistant and everyone else the user; without either, in a two-speaker
    dialogue whoever speaks first is the user and the other the assistant."""
    def assign(turns):
        speakers = list(dict.fromkeys(s for s, _ in turns))
        if roles is not None:
            missing = [s for s in speakers if s not in roles and "*" not in roles]
            if missing:
                raise UserError(f"speaker {missing[0]!r} has no role in ROLES (add it, or a '*' entry for everyone "
                                f"else)")
            return [roles.get(s, roles.get("*")) for s, _ in turns]
        if train_speakers is not None:
            return ["assistant" if s in train_speakers else "user" for s, _ in turns]
        if len(speakers) > 2:
            raise UserError(f"{len(speakers)} speakers ({', '.join(speakers)}); without ROLES or TRAIN_SPEAKERS only "
                            f"two-speaker dialogues get roles: set ROLES, e.g. --roles='{{\"{speakers[1]}\": "
                            f"\"assistant\", \"*\": \"user\"}}'")
        return ["user" if s == speakers[0] else "assistant" for s, _ in turns]
    return assign


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


def chat_pieces(tokenizer, dialogues, roles, source="data"):
    """Each dialogue rendered by the model's chat template, as turns (speaker, header, text, footer) of token ids:
    what the template writes before the turn's text (its role header; before the first turn also any preamble, such
    as a default system prompt), the text, tokenized as plain text as in the speaker format, and what the template
    writes to end the turn. Which of the template's text between two turns ends one and which begins the next is
    what it writes after a turn when that turn is the last one. A BOS at the very start is dropped (the context
    token is that BOS), and EOS ends the last turn where the template did not write it."""
    gaps, lasts = [], []  # per dialogue: the template's text before, between and after the turns; and after each
    for n, turns in enumerate(dialogues):  # turn but the last when that turn ends the conversation
        try:
            messages = [{"role": r, "content": MARK.format(i)} for i, r in enumerate(roles(turns))]
            gaps.append(_template(tokenizer, messages))
            lasts.append([_template(tokenizer, messages[:i + 1])[-1] for i in range(len(messages) - 1)])
        except UserError as e:
            raise UserError(f"{source}: dialogue {n + 1}: {e}") from None
    flat = [t for g, l in zip(gaps, lasts) for t in g + l]
    special = iter(encode(tokenizer, flat, plain=False))
    texts = iter(encode(tokenizer, [t for d in dialogues for _, t in d]))
    bos, eos, out = tokenizer.bos_token_id, tokenizer.eos_token_id, []
    for turns, g, l in zip(dialogues, gaps, lasts):
        between, after = [next(special) for _ in g], [next(special) for _ in l]
        header = between[0][1:] if bos is not None and between[0][:1] == [bos] else between[0]
        rendered = []
        for i, (speaker, _) in enumerate(turns):
            if i < len(turns) - 1:  # the longest common start of "after turn i, at the end" and "between i and i+1"
                gap, alone = between[i + 1], after[i]
                k = next((j for j, (a, b) in enumerate(zip(gap, alone)) if a != b), min(len(gap), len(alone)))
                footer, next_header = gap[:k], gap[k:]
            else:
                footer, next_header = between[-1] + ([eos] if eos not in between[-1] else []), []
            rendered.append((speaker, header, next(texts), footer))
            header = next_header
        out.append(rendered)
    return out


def render_chat(tokenizer, dialogues, roles, train_speakers=None, source="data"):
    """As render, through the chat template: each turn is (header + text + footer, mask). Trained: everything, or
    with TRAIN_SPEAKERS, their turns' text and footer (the end-of-turn token, so the model learns to stop), never a
    header: the header is the prompt at generation time."""
    out = []
    for d in chat_pieces(tokenizer, dialogues, roles, source):
        rendered = []
        for speaker, header, text, footer in d:
            if train_speakers is None:
                mask = [1] * (len(header) + len(text) + len(footer))
            else:
                mask = [0] * len(header) + [int(speaker in train_speakers)] * (len(text) + len(footer))
            rendered.append((header + text + footer, mask))
        out.append(rendered)
    return out



def render_any(tokenizer, dialogues, train_speakers=None, roles=None, source="data"):
    """render_chat with `roles` (FORMAT="chat_template"), else render. Either way one (ids, mask) per turn."""
    if roles is None:
        return render(tokenizer, dialogues, train_speakers)
    return render_chat(tokenizer, dialogues, roles, train_speakers, source)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts: what generation continues, rendered as training rendered the turns before it

def chat_roles(tokenizer, roles=None, train_speakers=None):
    """None for a model that speaks the speaker format (our template, or none), else the role map its own chat
    template is prompted with: a model saved by train.py keeps its own template only when FORMAT="chat_template"."""
    if not tokenizer.chat_template or tokenizer.chat_template == CHAT_TEMPLATE:
        return None
    return role_map(roles, train_speakers)


def end_ids(tokenizer, roles=None):
    """The tokens that end a turn: EOS in the speaker format; in a chat template, whose turn text is plain text, any
    special token (EOS, <|im_end|>, <|eot_id|>, ...)."""
    if roles is None:
        return {tokenizer.eos_token_id}
    return {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)


def prompt(tokenizer, turns, speaker, roles=None):
    """The token ids asking `speaker` to speak after `turns`: the turns as trained, then the speaker's label (in a
    chat template, the header of the speaker's role)."""
    if roles is None:
        return [start_id(tokenizer)] + encode(tokenizer, [format_dialogue(turns) + f"{speaker}:"])[0]
    *before, (_, header, _, _) = chat_pieces(tokenizer, [list(turns) + [(speaker, ".")]], roles)[0]
    return [start_id(tokenizer)] + [t for _, h, x, f in before for t in h + x + f] + header


def prompt_ids(tokenizer, turns, speaker, context, max_new_tokens, roles=None):
    """prompt(), dropping the oldest turns until the prompt and the reply fit in the model's context: (ids, how many
    turns were dropped)."""
    for start in range(len(turns) + 1):
        ids = prompt(tokenizer, turns[start:], speaker, roles)
        if len(ids) + max_new_tokens <= context:
            return ids, start
    raise UserError(f"the prompt for {speaker!r} alone is {len(ids)} tokens; with MAX_NEW_TOKENS={max_new_tokens} "
                    f"it does not fit the model's context of {context} tokens")
