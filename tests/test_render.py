"""Tests for render.py: dialogues to (ids, mask) turns in the speaker format and in a model's own chat template, roles,
the speaker format's chat template, and the prompts generation continues. Today's chat-template families (Qwen3,
Llama 3.1, Gemma, Mistral, Phi-3), written here as Jinja strings that follow each family's rules, on GPT-2's BPE with
each family's special tokens: a dialogue's ids are exactly apply_chat_template's, the mask covers the assistant's
text and end of turn (never a header or a system message), roles that repeat are merged, a leading assistant turn
is context where the template wants the user first, and a system message goes where the template puts it.

Run: .venv/bin/python -m pytest -q tests/test_render.py
"""

import collections

import pytest
import transformers
from tokenizers import Tokenizer

import cli
from batching import collate, make_blocks
from dialogues import clean_text, format_dialogue, parse_record
from render import (SYSTEM, speaker_template, encode, prompt, render, render_chat, role_map, start_id, template_rules,
                    with_system)
from tiny import EOS_ID, chat_tokenizer, gpt2_bpe, gpt2_tokenizer, synthetic

DIALOGUE = [("Alex", "Hi there."), ("Bob", "Hello, Alex!"), ("Alex", "Bye <|im_end|> now.")]


# ---------------------------------------------------------------------------------------------------------------------
# the speaker format, with the real GPT-2 tokenizer

def test_tokenizer_is_real_gpt2():
    tok = gpt2_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == EOS_ID == 50256
    assert len(tok) == 50257


def test_eos_ends_every_dialogue_and_is_a_target():
    tok = gpt2_tokenizer()
    dialogues = synthetic(30, seed=6, max_turns=8)
    for d, turns in zip(dialogues, render(tok, dialogues)):
        ids = [t for tid, _ in turns for t in tid]
        assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
        assert tok.decode(ids[:-1]) == format_dialogue(d)
    blocks = make_blocks(tok, dialogues, 64)
    x, y, _ = collate(blocks, tok.eos_token_id)
    assert int((y == EOS_ID).sum()) == len(dialogues)  # the context EOS before each dialogue is never one


def test_text_that_spells_eos_is_not_eos():
    # A dialogue that quotes GPT-2's special token (scraped text does) must not end there: only the real end is EOS.
    d = [("Alex", "Models end text with <|endoftext|> usually."), ("Bob", "I see.")]
    ids = [t for tid, _ in render(gpt2_tokenizer(), [d])[0] for t in tid]
    assert ids.count(EOS_ID) == 1 and ids[-1] == EOS_ID, ids


def test_train_speakers_mask():
    tok = gpt2_tokenizer()
    bob_last = [("Alex", "Hi Bob."), ("Bob", "Hello Alex, how are you?"), ("Cara", "Fine."), ("Bob", "Bye now.")]
    bob_first = [("Bob", "First."), ("Alex", "Last word.")]
    for d, turns in zip([bob_last, bob_first], render(tok, [bob_last, bob_first], train_speakers=["Bob"])):
        for i, ((speaker, text), (ids, mask)) in enumerate(zip(d, turns)):
            last = i == len(d) - 1
            trained = [t for t, m in zip(ids, mask) if m]
            assert mask == sorted(mask)  # the label first, untrained; then the body
            assert tok.decode([t for t, m in zip(ids, mask) if not m]) == (f"{speaker}:" if speaker == "Bob" else
                                                                            tok.decode(ids))
            if speaker == "Bob":
                assert tok.decode(trained) == f" {text}\n" + ("<|endoftext|>" if last else "")
                assert trained[-2:] == ([198, EOS_ID] if last else [trained[-2], 198])
            else:
                assert trained == []
            assert (ids[-1] == EOS_ID) == last

def test_a_prompt_is_the_turns_as_trained_then_the_label():
    tok = gpt2_tokenizer()
    ids = prompt(tok, DIALOGUE[:2], "Cara")
    as_trained = [t for tid, _ in render(tok, [DIALOGUE[:2]])[0] for t in tid][:-1]  # without the EOS
    assert ids == [EOS_ID] + as_trained + encode(tok, ["Cara:"])[0]
    assert tok.decode(ids) == tok.eos_token + format_dialogue(DIALOGUE[:2]) + "Cara:"


# ---------------------------------------------------------------------------------------------------------------------
# rendering with the model's own chat template

def special(tok, text):
    """Template text: its special tokens are real ones."""
    return tok(text, add_special_tokens=False)["input_ids"]


def messages(turns, roles):
    return [{"role": r, "content": t} for (_, t), r in zip(turns, roles)]


def test_chat_render_matches_a_hand_written_expectation():
    tok = chat_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert special(tok, "<|im_end|>") == [im_end] == [tok.eos_token_id]
    plain = lambda text: encode(tok, [text])[0]
    # the template's own first token, BOS, opens the first turn: it is the context, so the sequence is the template's
    header0 = special(tok, "<|begin_of_text|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\n")
    turns = render_chat(tok, [DIALOGUE], role_map(), ["Bob"])[0]
    assert turns == [
        (header0 + plain("Hi there.") + [im_end] + special(tok, "\n"),
         [0] * (len(header0) + len(plain("Hi there.")) + 2)),
        (special(tok, "<|im_start|>assistant\n") + plain("Hello, Alex!") + [im_end] + special(tok, "\n"),
         [0] * len(special(tok, "<|im_start|>assistant\n")) + [1] * (len(plain("Hello, Alex!")) + 1) + [0]),
        (special(tok, "<|im_start|>user\n") + plain("Bye <|im_end|> now.") + [im_end] + special(tok, "\n"),
         [0] * (len(special(tok, "<|im_start|>user\n")) + len(plain("Bye <|im_end|> now.")) + 2))]
    assert im_end not in plain("Bye <|im_end|> now.")  # a turn's text is plain text: it can't end the turn early

    # the whole dialogue, BOS first as the context token, is exactly the template's own text, and nothing more
    (ids, mask, starts), = make_blocks(tok, [DIALOGUE], 256, ["Bob"], role_map())
    assert starts == [0]
    assert ids == [t for tid, _ in turns for t in tid] and ids[0] == tok.bos_token_id and mask[0] == 0
    assert tok.decode(ids) == tok.apply_chat_template(messages(DIALOGUE, ["user", "assistant", "user"]),
                                                      tokenize=False)
    # no TRAIN_SPEAKERS: every token but the first, and but each turn's last, the newline after its <|im_end|>
    everything = render_chat(tok, [DIALOGUE], role_map())[0]
    assert all(tid[-2:] == [im_end, *special(tok, "\n")] for tid, _ in everything)
    assert [m for _, tm in everything for m in tm] == [0] + [1] * (len(everything[0][0]) - 2) + [0] + [
        m for tid, _ in everything[1:] for m in [1] * (len(tid) - 1) + [0]]


def test_chat_render_ends_with_eos_only_where_the_template_ends_turns_with_no_special_token():
    # a base model's EOS with a ChatML template: the template's <|im_end|> ends the turn (generation stops at any
    # special token), and the ids stay exactly the template's: no EOS after it
    tok = chat_tokenizer(eos="<|endoftext|>")
    turns = render_chat(tok, [DIALOGUE[:2]], role_map(), ["Bob"])[0]
    assert turns[-1][0][-2:] == [tok.convert_tokens_to_ids("<|im_end|>"), *special(tok, "\n")]
    assert EOS_ID not in turns[-1][0] and turns[-1][1][-2:] == [1, 0]  # not the newline: the model never writes it
    # a template that ends a turn with plain text: EOS ends the dialogue, trained, so the model learns to stop
    tok = chat_tokenizer("{%- for m in messages -%}{{ m.role }}: {{ m.content }}{{ '\\n' }}{%- endfor -%}")
    turns = render_chat(tok, [DIALOGUE[:2]], role_map(), ["Bob"])[0]
    assert turns[-1][0][-2:] == [*special(tok, "\n"), tok.eos_token_id] and turns[-1][1][-2:] == [1, 1]


def test_a_template_that_writes_the_next_header_with_the_turn():
    """Phi-3's writes "<|assistant|>" after every user message: that belongs to the user's turn, never trained."""
    template = ("{%- for m in messages -%}{%- if m.role == 'user' -%}<|im_start|>{{ m.content }}<|im_end|>"
                "<|im_start|>{%- else -%}{{ m.content }}<|im_end|>{%- endif -%}{%- endfor -%}")
    tok = chat_tokenizer(template)
    turns = render_chat(tok, [DIALOGUE[:2]], role_map(), ["Bob"])[0]
    im_start, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert turns[0][0][-2:] == [im_end, im_start] and turns[0][1] == [0] * len(turns[0][0])
    assert turns[1] == (encode(tok, ["Hello, Alex!"])[0] + [im_end], [1] * (len(turns[1][0])))


@pytest.mark.parametrize("roles, train_speakers, turns, expected", [
    (None, None, DIALOGUE, ["user", "assistant", "user"]),  # two speakers: the first is the user
    (None, ["Alex"], DIALOGUE, ["assistant", "user", "assistant"]),  # TRAIN_SPEAKERS are the assistant
    (None, ["Bob"], DIALOGUE + [("Cara", "Hi.")], ["user", "assistant", "user", "user"]),
    ({"Bob": "assistant", "*": "user"}, None, DIALOGUE + [("Cara", "Hi.")], ["user", "assistant", "user", "user"]),
    ({"Alex": "system", "Bob": "user"}, None, DIALOGUE, ["system", "user", "system"]),
])
def test_roles(roles, train_speakers, turns, expected):
    assert role_map(roles, train_speakers)(turns) == expected


def test_roles_refused():
    with pytest.raises(cli.UserError, match=r"speaker 'Bob' has no role in ROLES"):
        role_map({"Alex": "user"})(DIALOGUE)
    with pytest.raises(cli.UserError, match=r"3 speakers \(Alex, Bob, Cara\).*set ROLES"):
        role_map()(DIALOGUE + [("Cara", "Hi.")])
    # what the pipeline can't mend (roles that repeat are merged: see the families below): one line naming the dialogue
    template = ("{%- if messages | length > 2 -%}{{ raise_exception('At most one exchange, please') }}{%- endif -%}"
                "{%- for m in messages -%}{{ m.content }}{%- endfor -%}")
    with pytest.raises(cli.UserError, match=r"val\.txt: dialogue 2: the model's chat template refused it: "
                                            r"At most one exchange"):
        render_chat(chat_tokenizer(template), [DIALOGUE[:2], DIALOGUE], role_map(train_speakers=["Bob"]),
                    source="val.txt")


def test_context_token_is_bos_where_the_model_has_one():
    llama, gpt2 = chat_tokenizer(), gpt2_tokenizer()
    assert start_id(llama) == llama.bos_token_id != llama.eos_token_id and start_id(gpt2) == EOS_ID
    (ids, mask, _), = make_blocks(llama, [[("Alex", "hi")]], 32)  # the speaker format, as training packs it
    assert ids == [llama.bos_token_id, *encode(llama, ["Alex: hi\n"])[0], llama.eos_token_id] and mask[0] == 0
    llama.chat_template = speaker_template("Alex", "Bob")  # the speaker format's template opens with the same token
    assert llama.apply_chat_template([{"role": "user", "name": "Alex", "content": "hi"}], tokenize=False) == \
        "<|begin_of_text|>Alex: hi\n<|im_end|>"


# ---------------------------------------------------------------------------------------------------------------------
# today's chat-template families, each written to its own rules

NL = "{{ '\\n' }}"

# Qwen3: ChatML, no BOS; the last assistant turn after the last user message opens with an empty <think> block
QWEN3 = ("{%- set ns = namespace(last_user=-1) -%}"
         "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
         "{%- endfor -%}"
         "{%- for m in messages -%}"
         "{%- if m.role == 'assistant' -%}<|im_start|>assistant" + NL +
         "{%- if loop.last and loop.index0 > ns.last_user -%}<think>" + NL + NL + "</think>" + NL + NL +
         "{%- endif -%}{{ m.content }}<|im_end|>" + NL +
         "{%- else -%}<|im_start|>{{ m.role }}" + NL + "{{ m.content }}<|im_end|>" + NL + "{%- endif -%}"
         "{%- endfor -%}"
         "{%- if add_generation_prompt -%}<|im_start|>assistant" + NL + "<think>" + NL + NL + "</think>" + NL + NL +
         "{%- endif -%}")

# Llama 3.1: BOS, a system header always (a dated preamble, then the system message), headers in special tokens
LLAMA3 = ("{{- bos_token -}}"
          "{%- if messages[0].role == 'system' -%}{%- set system = messages[0].content | trim -%}"
          "{%- set rest = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set rest = messages -%}{%- endif -%}"
          "<|start_header_id|>system<|end_header_id|>" + NL + NL + "Cutting Knowledge Date: December 2023" + NL +
          "Today Date: 26 Jul 2024" + NL + NL + "{{ system }}<|eot_id|>"
          "{%- for m in rest -%}<|start_header_id|>{{ m.role }}<|end_header_id|>" + NL + NL +
          "{{ m.content | trim }}<|eot_id|>{%- endfor -%}"
          "{%- if add_generation_prompt -%}<|start_header_id|>assistant<|end_header_id|>" + NL + NL +
          "{%- endif -%}")

# Gemma: BOS, strict alternation, `model` for the assistant, the system message folded into the first user turn
GEMMA = ("{{- bos_token -}}"
         "{%- if messages[0].role == 'system' -%}{%- set prefix = messages[0].content + '\\n\\n' -%}"
         "{%- set rest = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}{%- set rest = messages -%}{%- endif -%}"
         "{%- for m in rest -%}"
         "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
         "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}" + NL +
         "{{ prefix if loop.first else '' }}{{ m.content | trim }}<end_of_turn>" + NL +
         "{%- endfor -%}"
         "{%- if add_generation_prompt -%}<start_of_turn>model" + NL + "{%- endif -%}")

# Mistral: BOS, [INST] ... [/INST], strict alternation, no system role at all
MISTRAL = ("{{- bos_token -}}"
           "{%- for m in messages -%}"
           "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
           "{%- endif -%}"
           "{%- if m.role == 'user' -%}[INST] {{ m.content }} [/INST]"
           "{%- elif m.role == 'assistant' -%}{{ m.content }}{{ eos_token }}"
           "{%- else -%}{{ raise_exception('Only user and assistant roles are supported!') }}{%- endif -%}"
           "{%- endfor -%}")

# Phi-3: no BOS written, <|user|> ... <|end|>, EOS after the last message
PHI3 = ("{%- for m in messages -%}<|{{ m.role }}|>" + NL + "{{ m.content }}<|end|>" + NL + "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>" + NL + "{%- else -%}{{ eos_token }}{%- endif -%}")

# name: (template, special tokens, BOS, EOS, other added tokens, what ends an assistant turn: what the model writes,
# not the newline some templates write after it)
FAMILIES = {
    "qwen3": (QWEN3, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", ["<think>", "</think>"], "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", [], "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", [], "<end_of_turn>"),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", [], "</s>"),
    "phi3": (PHI3, ["<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>", [],
             "<|end|>"),
}


def family(name):
    """The family's tokenizer: GPT-2's BPE with its special tokens (and other added tokens) and its template."""
    template, specials, bos, eos, added, _ = FAMILIES[name]
    backend = Tokenizer.from_str(gpt2_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens(specials)
    backend.add_tokens(added)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                                chat_template=template)


ROLES = {"Riley": "user", "Jordan": "assistant"}
# a user and an assistant, as ROLES makes them
EXCHANGE = [("Riley", "Hi there, how are you?"), ("Jordan", "Fine, thanks. And you?"), ("Riley", "Good."),
            ("Jordan", "Glad to hear it.")]


def reference(tok, turns):
    """The messages the pipeline should give the template, by the rules the README states: roles by ROLES (the
    system speaker is the system role), repeats merged with a newline, where the template wants the user first
    leading assistant turns made the first user message, and where it has no system slot the system message joined
    to the user message after it by a blank line."""
    user_first, slot = template_rules(tok)
    out, opening = [], True
    for speaker, text in turns:
        role = "system" if speaker == SYSTEM else ROLES[speaker]
        opening = opening and role in ("system", "assistant")
        if (user_first and opening and role == "assistant") or (role == "system" and not slot):
            role = "user"
        if out and out[-1]["role"] == role:
            out[-1]["content"] += ("\n\n" if out[-1].get("system") else "\n") + text
            out[-1]["system"] = False
        else:
            out.append({"role": role, "content": text, "system": speaker == SYSTEM})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def template_ids(tok, msgs, **kwargs):
    return list(tok.apply_chat_template(msgs, tokenize=True, **kwargs)["input_ids"])


def trained_runs(tok, turns):
    """The decoded runs of trained tokens of a rendered dialogue."""
    ids = [t for tid, _ in turns for t in tid]
    mask = [m for _, tm in turns for m in tm]
    runs, cur = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ids_are_the_templates_and_the_mask_is_the_assistants_text_and_end(name):
    tok, end = family(name), FAMILIES[name][-1]
    roles = role_map(ROLES)
    for turns in (EXCHANGE, with_system(EXCHANGE, "Be brief.")):
        rendered = render_chat(tok, [turns], roles, train_speakers=["Jordan"])[0]
        ids = [t for tid, _ in rendered for t in tid]
        assert ids == template_ids(tok, reference(tok, turns)), name
        (block, mask, _), = make_blocks(tok, [turns], 256, ["Jordan"], roles)
        assert block == ids and mask[0] == 0  # packed, the sequence is the template's: no token before it
        # Phi-3's template writes a newline and EOS after the last message: the model stops at <|end|>, and they are
        # not trained
        assert trained_runs(tok, rendered) == [f"{t}{end}" for s, t in EXCHANGE if s == "Jordan"]
        assert "Be brief" not in "".join(trained_runs(tok, render_chat(tok, [turns], roles)[0]))  # never trained


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sft_records_render_as_their_roles_and_train_the_replies_alone(name):
    """An instruction or prompt/completion record is a dialogue of the roles themselves (prepare_data.py): in a chat
    template, with TRAIN_SPEAKERS=["assistant"] as prepare_data.py's summary suggests, the ids are the template's for
    those messages and only the replies (and their end of turn) are trained."""
    tok, end = family(name), FAMILIES[name][-1]
    alpaca = {"instruction": "And 3+3?", "input": "", "output": "6", "history": [["2+2?", "4"]]}
    if template_rules(tok)[1]:  # a system slot (where a system message goes otherwise: test_the_system_message_...)
        alpaca["system"] = "Be brief."
    chat = {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hey."}]}
    for record, replies in ((alpaca, ["4", "6"]), (chat, ["Hey."])):
        _, turns = parse_record(record, "record")
        rendered = render_chat(tok, [turns], role_map(None, ["assistant"]), train_speakers=["assistant"])[0]
        msgs = [{"role": s, "content": t} for s, t in turns]
        assert [t for tid, _ in rendered for t in tid] == template_ids(tok, msgs), name
        assert trained_runs(tok, rendered) == [f"{r}{end}" for r in replies]  # what follows the end is no target


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_prompt_is_the_training_sequence_up_to_the_reply(name):
    tok = family(name)
    roles = role_map(ROLES)
    for turns in (EXCHANGE, with_system(EXCHANGE, "Be brief."), EXCHANGE[:1] + EXCHANGE[:1] + EXCHANGE[1:]):
        rendered = render_chat(tok, [turns], roles, train_speakers=["Jordan"])[0]
        before = [t for tid, _ in rendered[:-1] for t in tid]
        header = rendered[-1][0][:rendered[-1][1].index(1)]
        assert prompt(tok, turns[:-1], "Jordan", roles) == before + header


def test_the_system_message_goes_in_the_templates_own_slot():
    tok = family("llama3")
    turns = render_chat(tok, [[(SYSTEM, "Be brief."), ("Riley", "Hi"), ("Jordan", "Yo")]], role_map(ROLES))[0]
    assert tok.decode([t for tid, _ in turns for t in tid]).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user")
    assert not any(turns[0][1][-len(tok("Be brief.")["input_ids"]):])  # trained everything else, not the system
    gemma = family("gemma")  # folded by the template itself into the first user turn
    (ids, mask), (ids2, mask2) = render_chat(gemma, [[(SYSTEM, "Be brief."), ("Riley", "Hi")]], role_map(ROLES))[0]
    assert gemma.decode(ids + ids2) == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
    assert template_rules(gemma) == (True, True) and template_rules(family("mistral")) == (True, False)
    mistral = family("mistral")  # no system role: folded by us the same way
    turns = render_chat(mistral, [[(SYSTEM, "Be brief."), ("Riley", "Hi"), ("Jordan", "Yo")]], role_map(ROLES),
                        ["Jordan"])[0]
    assert mistral.decode([t for tid, _ in turns for t in tid]) == "<s>[INST] Be brief.\n\nHi [/INST]Yo</s>"
    assert trained_runs(mistral, turns) == ["Yo</s>"]


@pytest.mark.parametrize("name", ["gemma", "mistral"])
def test_a_chitchat_corpus_trains_in_a_template_that_insists_on_alternation(name):
    """Two speakers who often talk twice in a row, and dialogues that the assistant opens: every dialogue is used,
    each exactly as the template writes its merged messages, and what was changed is counted."""
    tok = family(name)
    dialogues = synthetic(200, seed=3, min_turns=1, max_turns=8, speakers=["Riley", "Jordan"])
    for d in dialogues[::4]:
        d.insert(0, ("Jordan", "Hey!"))  # a quarter open with the assistant
    stats = collections.Counter()
    rendered = render_chat(tok, dialogues, role_map(ROLES), ["Jordan"], stats=stats)
    assert len(rendered) == len(dialogues)
    for d, turns in zip(dialogues, rendered):
        assert [t for tid, _ in turns for t in tid] == template_ids(tok, reference(tok, d))
        assert len(turns) == len(d)  # one (ids, mask) per turn of the text file: per-speaker losses stay right
    repeats = sum(1 for d in dialogues for a, b in zip(d, d[1:]) if a[0] == b[0])
    assert stats["merged"] >= repeats > 20 and stats["context"] >= 50
    # a leading assistant turn is context: never trained, though Jordan's other turns are
    (first, first_mask), *_ = render_chat(tok, [[("Jordan", "Hey!"), ("Riley", "Hi.")]], role_map(ROLES),
                                          ["Jordan"])[0]
    assert not any(first_mask)


def test_merged_turns_train_only_where_every_speaker_is_trained():
    tok = family("qwen3")
    roles = role_map({"Riley": "user", "Jordan": "assistant", "Sam": "assistant"})
    turns = [("Riley", "Hi"), ("Jordan", "One"), ("Sam", "Two"), ("Riley", "Ok"), ("Jordan", "Three")]
    rendered = render_chat(tok, [turns], roles, ["Jordan"])[0]
    assert trained_runs(tok, rendered) == ["Three<|im_end|>"]  # Jordan+Sam's message is not all Jordan's
    rendered = render_chat(tok, [turns], roles, ["Jordan", "Sam"])[0]
    assert trained_runs(tok, rendered) == ["One\nTwo<|im_end|>", "Three<|im_end|>"]


# ---------------------------------------------------------------------------------------------------------------------
# the speaker format's chat template: what apply_chat_template and pipeline() write for a model trained in it

@pytest.fixture(scope="module")
def speaker_tok():
    """GPT-2's tokenizer as train.py saves it with FORMAT="speaker" for a run of Alex and Bob (test_train checks a
    saved one is this)."""
    tok = gpt2_bpe()
    tok.chat_template = speaker_template("Alex", "Bob")
    return tok


CHAT = [("Alex", "Hi there, how are you?"), ("Bob", "Fine, thanks."), ("Alex", "Good to hear.")]


def test_chat_template_role_is_the_speaker_without_a_name(speaker_tok):
    messages = [{"role": s, "content": t} for s, t in CHAT]
    eos = speaker_tok.eos_token
    assert speaker_tok.apply_chat_template(messages, tokenize=False) == eos + format_dialogue(CHAT) + eos


def test_chat_template_generation_prompt(speaker_tok):
    messages = [{"role": "user", "name": s, "content": t} for s, t in CHAT]
    body = speaker_tok.eos_token + format_dialogue(CHAT)
    assert speaker_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == body + "Bob:"


def test_chat_template_roles_are_the_runs_speakers():
    # a tool that knows only roles (pipeline(), transformers serve) gets the training text, the run's trained
    # speaker answering, with no variable of ours
    tok = gpt2_bpe()
    tok.chat_template = speaker_template("Hana", "Farid:")
    roles = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there."},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."}]
    text = tok.apply_chat_template(roles, tokenize=False, add_generation_prompt=True)
    turns = [(SYSTEM, "Be kind."), ("Hana", "Hi there."), ("Farid", "Hello."), ("Hana", "Bye.")]
    assert text == tok.eos_token + format_dialogue(turns) + "Farid:"
    ids = tok.apply_chat_template(roles[:3], tokenize=True, return_dict=False)
    assert list(ids) == [tok.eos_token_id] + [t for ids, _ in render(tok, [turns[:3]])[0] for t in ids]


def test_chat_template_collapses_multiline_content(speaker_tok):
    content = "  First line\nsecond\tline \r\n\n third  "
    messages = [{"role": "user", "name": "Alex", "content": content}]
    eos = speaker_tok.eos_token
    assert speaker_tok.apply_chat_template(messages, tokenize=False) == \
        eos + format_dialogue([("Alex", clean_text(content))]) + eos
    assert clean_text(content) == "First line second line third"


def test_chat_template_names_are_cleaned_as_the_speakers_lines(speaker_tok):
    # A name is cleaned (":" to space, trimmed) where the message is written, as the text files spell it.
    messages = [{"role": "user", "name": "Alex ", "content": "Hi"},
                {"role": "assistant", "name": "Bob", "content": "Yo"}]
    text = speaker_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == speaker_tok.eos_token + "Alex: Hi\nBob: Yo\nBob:"


def test_what_follows_the_end_of_turn_is_no_target():
    tok = chat_tokenizer()
    turns = [("Alex", "Hi there."), ("Bob", "Hello!"), ("Alex", "Bye."), ("Bob", "See you.")]
    (rendered,) = render_chat(tok, [turns], role_map(None, ["Bob"]), ["Bob"])
    ids = [t for tid, _ in rendered for t in tid]
    mask = [m for _, tm in rendered for m in tm]
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "Hello!<|im_end|>See you.<|im_end|>"  # the newline after each <|im_end|> is not
    newline = tok.convert_tokens_to_ids(tok.tokenize("\n"))[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    after = [m for k, m in enumerate(mask[1:], 1) if ids[k] == newline and ids[k - 1] == end]
    assert after and not any(after)
