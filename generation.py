"""Generating replies with the model's own generate(): config.py's sampling settings become its arguments, prompts
come from render.py in the format the model was trained in, several replies are generated together (left-padded,
with an attention mask), and a reply ends at the end of its speaker's turn: EOS (in a chat template, any special
token such as <|im_end|>), or, in the speaker format, a line end or another speaker's label. What is ours is the
cut that keeps a reply from running into the next turn (`cut_reply`) and the stopping criterion that applies it; and a
sample dialogue's, which runs over several turns and stops at the end of one (`dialogue`)."""

import re

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from cli import progress
from render import chat_pieces, encode, end_ids, prompt_ids, role_map, special_ids


def cut_reply(text, speakers):
    """(the reply, whether it ended properly) for generated text that follows "Speaker:". It ends at a line end or
    at another turn's label ("Name:" for any speaker in the conversation); EOS is handled by the caller."""
    end = len(text)
    newline = text.find("\n")
    if newline >= 0:
        end = newline
    if speakers:
        label = re.search(r"(?:^|\s)(?:" + "|".join(map(re.escape, speakers)) + r"):", text[:end])
        if label:
            end = label.start()
    return text[:end].strip(), end < len(text)


def sampling(cfg):
    """TEMPERATURE, TOP_K, TOP_P and REPETITION_PENALTY as generate()'s arguments; TEMPERATURE 0 is greedy. Each is
    given even where it does nothing (top_k=0, top_p=1.0): one left out would come from the model's own
    generation_config.json. In greedy mode the sampling ones get generate()'s neutral values, which it does not warn
    about."""
    if cfg.TEMPERATURE <= 0:
        return {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                "repetition_penalty": cfg.REPETITION_PENALTY}
    return {"do_sample": True, "temperature": cfg.TEMPERATURE, "top_k": cfg.TOP_K, "top_p": cfg.TOP_P,
            "repetition_penalty": cfg.REPETITION_PENALTY}


class TurnEnd(StoppingCriteria):
    """Stops each row of a batch where its turn ends: at a token of `ends`, or, where the row has `speakers` (the
    speaker format), where cut_reply finds a line end or another speaker's label in its new text. `at[i]` is then
    the number of new tokens row i ended with. Rows that have ended are not looked at again."""

    def __init__(self, tokenizer, width, ends, speakers=None):
        self.tokenizer, self.width, self.ends, self.speakers, self.at = tokenizer, width, ends, speakers, {}

    def __call__(self, input_ids, scores, **kwargs):
        n = input_ids.shape[1] - self.width
        for i, row in enumerate(input_ids[:, self.width:].tolist()):
            if i in self.at:
                continue
            if row[-1] in self.ends or (self.speakers and self.speakers[i] is not None and
                                        cut_reply(self.tokenizer.decode(row), self.speakers[i])[1]):
                self.at[i] = n
        return torch.tensor([i in self.at for i in range(input_ids.shape[0])], device=input_ids.device)


class DialogueEnd(StoppingCriteria):
    """Stops a dialogue (a batch of one) at the first turn end once `after` new tokens are made: a token of `breaks`
    (a chat template's end-of-turn tokens) or, where `lines` (the speaker format), a token whose text holds a line
    end. `last` is the number of new tokens up to and including the latest turn end (0: none yet)."""

    def __init__(self, tokenizer, width, after, breaks, lines):
        self.tokenizer, self.width, self.after, self.breaks, self.lines, self.last = (tokenizer, width, after,
                                                                                      set(breaks), lines, 0)

    def __call__(self, input_ids, scores, **kwargs):
        row = input_ids[0, self.width:].tolist()
        if row[-1] in self.breaks or (self.lines and "\n" in self.tokenizer.decode(row[-1:])):
            self.last = len(row)
        return torch.tensor([self.last == len(row) >= self.after], device=input_ids.device)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, settings, ends, generator, speakers=None, more=()):
    """The new token ids after each prompt (a list of ids), generated together by model.generate() with `settings`
    (see sampling): each up to and including the token that ended it (see TurnEnd), else max_new_tokens long.
    Prompts are padded on the left with the attention mask off there (generate() derives the position ids from
    it); the pad id is the first prompt's first token (the start token, or a chat template's first token, which
    every prompt of the format begins with), so the repetition penalty sees nothing new.
    Sampling draws its seed from `generator`, on a copy of torch's global random state: the same generator gives
    the same tokens, and nothing else's randomness moves. `more`: stopping criteria besides TurnEnd (dialogue's)."""
    device = next(model.parameters()).device
    width, pad = max(map(len, prompts)), prompts[0][0]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    end = TurnEnd(tokenizer, width, set(ends), speakers)
    seed = int(torch.randint(2 ** 62, (), generator=generator))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(ends), pad_token_id=pad,
                             stopping_criteria=StoppingCriteriaList([end, *more]), **settings)
    return [row[:end.at.get(i, len(row))] for i, row in enumerate(out[:, width:].tolist())]


def replies(model, tokenizer, asks, cfg, generator, context, roles_of=None, batch_size=1, desc=None):
    """The next turn of each (turns, speaker) in `asks`: (text, ended properly, number of new tokens), generated
    batch_size at a time, prompts of similar length together. With `roles_of` (render.chat_roles), in the model's own
    chat template. With `desc`, a progress bar of that name."""
    prompts = [prompt_ids(tokenizer, turns, speaker, context, cfg.MAX_NEW_TOKENS, roles_of)[0]
               for turns, speaker in asks]
    # the speaker format's turn also ends at any label of the conversation; a template's, at its end token alone
    speakers = [None if roles_of is not None else sorted({s for s, _ in turns} | {speaker})
                for turns, speaker in asks]
    ends, eos = end_ids(tokenizer, roles_of), tokenizer.eos_token_id
    order = sorted(range(len(asks)), key=lambda i: len(prompts[i]))
    out = {}
    for k in progress(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False, unit="batch"):
        chosen = order[k:k + batch_size]
        new = generate(model, tokenizer, [prompts[i] for i in chosen], cfg.MAX_NEW_TOKENS, sampling(cfg), ends,
                       generator, [speakers[i] for i in chosen])
        for i, ids in zip(chosen, new):
            if roles_of is not None:
                ended = bool(ids) and ids[-1] in ends
                text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True).strip()
            else:
                by_eos = bool(ids) and ids[-1] == eos
                text, ended = cut_reply(tokenizer.decode(ids[:-1] if by_eos else ids), speakers[i])
                ended = ended or by_eos
            out[i] = (text, ended, len(ids))
    return [out[i] for i in range(len(asks))]


def reply(model, tokenizer, turns, speaker, cfg, generator, context, roles_of=None):
    """Generate `speaker`'s next turn after `turns`: (text, ended properly, number of new tokens). With `roles_of`, in
    the model's own chat template."""
    return replies(model, tokenizer, [(turns, speaker)], cfg, generator, context, roles_of)[0]


def dialogue(model, tokenizer, ids, max_new_tokens, more, settings, generator, closers=None):
    """The new token ids of a dialogue continued from the prompt `ids`, ending at a turn's end: at EOS, or at the first
    turn end once max_new_tokens are made, with up to `more` tokens beyond for that turn to end. Where none ends
    within them, the ids up to the last turn end (all of them where no turn ended at all). A turn ends at a line
    end in the speaker format, and in a chat template at one of `closers` (render.turn_closers)."""
    eos = tokenizer.eos_token_id
    end = DialogueEnd(tokenizer, len(ids), max_new_tokens, closers or (), closers is None)
    new = generate(model, tokenizer, [ids], max_new_tokens + more, settings, {eos}, generator, more=[end])[0]
    if (new and new[-1] == eos) or end.last == len(new):
        return new
    return new[:end.last or len(new)]


# ---------------------------------------------------------------------------------------------------------------------
# the generation settings saved with a model: what generate() does for a tool that passes nothing

def turn_end_id(tokenizer, roles_of=None):
    """The one token that ends a turn, for a tool that takes one (a GGUF's EOS): in the speaker format the line end
    as training's turns end with it (GPT-2's BPE writes it as a token of its own), in a chat template the first
    special token of a turn's end (<|im_end|>, <|eot_id|>, <end_of_turn>), else EOS."""
    if roles_of is None:
        return encode(tokenizer, [" Hi\n"])[0][-1]
    *_, (_, _, footer, _) = chat_pieces(tokenizer, [[("a", "Hi."), ("b", "Hello.")]], role_map())[0]
    special = special_ids(tokenizer)
    return next((t for t in footer if t in special), tokenizer.eos_token_id)


def turn_end_ids(tokenizer, roles_of=None):
    """The token ids that end a reply for a tool that has only the saved files (pipeline(), generate() alone,
    `transformers serve`, a GGUF): EOS, and where a turn is one line (the speaker format) every token whose text
    holds a line end, since training's turn ends with one ("Bob: text\\n", its newline a token of its own in GPT-2's
    BPE, or in one with the punctuation before it in Llama 3's); in a chat template, the first special token of a
    turn's end (<|im_end|>, <|eot_id|>, <end_of_turn>), where training stopped the reply."""
    ends = {tokenizer.eos_token_id}
    if roles_of is not None:
        return sorted(ends | {turn_end_id(tokenizer, roles_of)})
    # decoding every id costs a second in GPT-2's vocabulary: only those whose stored form can be a line end are
    # decoded (byte-level BPE writes it "Ċ", SentencePiece's byte fallback "<0x0A>"), and the tokens that training's
    # own line ends are encoded to go in whatever their form
    special = special_ids(tokenizer)
    maybe = [i for t, i in tokenizer.get_vocab().items() if any(c in t for c in ("\n", "\u010a", "<0x0A>"))]
    lines = {ids[-1] for ids in encode(tokenizer, [" Hi.\n", " hi\n", " Ok!\n", " so?\n", " (yes)\n"])}
    return sorted(ends | lines | {i for i, t in zip(maybe, tokenizer.batch_decode([[i] for i in maybe]))
                                  if "\n" in t and i not in special})


def save_settings(model, tokenizer, roles_of, cfg):
    """The model's generation_config as train.py saves it: its turn ends as EOS (turn_end_ids), so any tool stops
    a reply where training did without being told how, and the run's sampling settings (TEMPERATURE, ...,
    MAX_NEW_TOKENS), so a reply elsewhere is sampled as evaluate.py and chat.py sample it. `model`: the model that
    save_pretrained saves (a LoRA model's base)."""
    config = model.generation_config
    config._from_model_config = False  # else generate() may rebuild it from the model's config.json, our ends lost
    ends = turn_end_ids(tokenizer, roles_of)
    config.eos_token_id = ends if len(ends) > 1 else ends[0]
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config.max_new_tokens = cfg.MAX_NEW_TOKENS
    for name, value in sampling(cfg).items():
        setattr(config, name, value)
