"""Generating one speaker's reply: the prompt is the conversation in the training format plus the speaker's label (or,
for a model trained in its own chat template, the template's turns plus the header of the speaker's role); sampling
runs with the KV cache; the reply ends at the end of that speaker's turn (line end, EOS, or another speaker's label;
in a chat template, the token that ends a turn) and never runs into the next turn."""

import inspect
import re

import torch

from batching import chat_pieces, encode, role_map, start_id
from cli import UserError
from dialogues import CHAT_TEMPLATE, format_dialogue


def chat_roles(tokenizer, roles=None, train_speakers=None):
    """None for a model that speaks the speaker format (our template, or none), else the role map its own chat
    template is prompted with: a model saved by train.py keeps its own template only when FORMAT="chat_template"."""
    if not tokenizer.chat_template or tokenizer.chat_template == CHAT_TEMPLATE:
        return None
    return role_map(roles, train_speakers)


def end_ids(tokenizer):
    """In a chat template, turn text is plain text: any special token (EOS, <|im_end|>, <|eot_id|>, ...) ends it."""
    return {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)


def prompt_ids(tokenizer, turns, speaker, context, max_new_tokens, roles=None):
    """The token ids asking `speaker` to reply after `turns`, dropping the oldest turns until the prompt and the
    reply fit in the model's context."""
    for start in range(len(turns) + 1):
        if roles is None:
            ids = [start_id(tokenizer)] + encode(tokenizer, [format_dialogue(turns[start:]) + f"{speaker}:"])[0]
        else:  # the turns as trained, then the header of the speaker's turn
            *before, (_, header, _, _) = chat_pieces(tokenizer, [turns[start:] + [(speaker, ".")]], roles)[0]
            ids = [start_id(tokenizer)] + [t for _, h, x, f in before for t in h + x + f] + header
        if len(ids) + max_new_tokens <= context:
            return ids, start
    raise UserError(f"the prompt for {speaker!r} alone is {len(ids)} tokens; with MAX_NEW_TOKENS={max_new_tokens} "
                    f"it does not fit the model's context of {context} tokens")


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


@torch.no_grad()
def sample(model, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, generator, stop=None):
    """Sample up to max_new_tokens after `ids` (a list) with the KV cache; `stop(new_ids)` -> True ends early.
    temperature 0 means greedy."""
    device = next(model.parameters()).device
    # transformers renamed the KV cache argument and output from past_key_values to cache (5.2x); take either
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    x, past, new, seen = torch.tensor([ids], device=device), None, [], None
    for _ in range(max_new_tokens):
        out = model(input_ids=x, use_cache=True, **{key: past})
        past, logits = out[key], out.logits[0, -1].float()
        if seen is None:
            seen = torch.zeros(logits.numel(), dtype=torch.bool, device=device)
            seen[torch.tensor(ids, device=device)] = True
        if repetition_penalty != 1.0:  # CTRL-style: tokens already in the text become less likely
            logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty,
                                                   logits * repetition_penalty), logits)
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                drop = torch.cumsum(torch.softmax(sorted_logits, -1), -1) > top_p
                drop[1:] = drop[:-1].clone()  # keep the token that crosses top_p
                drop[0] = False
                logits[order[drop]] = float("-inf")
            probs = torch.softmax(logits, -1).cpu()
            token = int(torch.multinomial(probs, 1, generator=generator))
        new.append(token)
        seen[token] = True
        if stop is not None and stop(new):
            break
        x = torch.tensor([[token]], device=device)
    return new


def reply(model, tokenizer, turns, speaker, cfg, generator, context, roles=None):
    """Generate `speaker`'s next turn after `turns`: (text, ended properly, number of new tokens). With `roles`, in
    the model's own chat template."""
    ids, _ = prompt_ids(tokenizer, turns, speaker, context, cfg.MAX_NEW_TOKENS, roles)
    if roles is not None:
        ends = end_ids(tokenizer)
        new = sample(model, ids, cfg.MAX_NEW_TOKENS, cfg.TEMPERATURE, cfg.TOP_K, cfg.TOP_P, cfg.REPETITION_PENALTY,
                     generator, lambda new: new[-1] in ends)
        ended = bool(new) and new[-1] in ends
        return tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True).strip(), ended, len(new)
    speakers = sorted({s for s, _ in turns} | {speaker})
    eos = tokenizer.eos_token_id

    def stop(new):
        return new[-1] == eos or cut_reply(tokenizer.decode(new), speakers)[1]

    new = sample(model, ids, cfg.MAX_NEW_TOKENS, cfg.TEMPERATURE, cfg.TOP_K, cfg.TOP_P, cfg.REPETITION_PENALTY,
                 generator, stop)
    ended_by_eos = bool(new) and new[-1] == eos
    text, ended = cut_reply(tokenizer.decode(new[:-1] if ended_by_eos else new), speakers)
    return text, ended or ended_by_eos, len(new)
