"""Tests for render.py: dialogues to (ids, mask) turns in the speaker format and in a model's own chat template, roles,
the speaker format's chat template, and the prompts generation continues.

Run: .venv/bin/python -m pytest -q tests/test_render.py
"""

import pytest

import cli
from batching import collate, make_blocks
from dialogues import clean_text, format_dialogue
from render import CHAT_TEMPLATE, encode, prompt, render, render_chat, role_map, start_id
from tiny import EOS_ID, chat_tokenizer, gpt2_bpe, gpt2_tokenizer, synthetic

DIALOGUE = [("Alex", "Hi there."), ("Bob", "Hello, Alex!"), ("Alex", "Bye <|im_end|> now.")]


# ---------------------------------------------------------------------------------------------------------------------
# the speaker format, with the real GPT-2 tokenizer

def test_eos_ends_every_dialogue_and_is_a_target():
    tok = gpt2_tokenizer()
    dialogues = synthetic(30, seed=6, max_turns=8)
    for d, turns in zip(dialogues, render(tok, dialogues)):
        ids = [t for tid, _ in turns for t in tid]
        assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
        assert tok.decode(ids[:-1]) == format_dialogue(d)
    blocks = make_blocks(tok, dialogues, 64)
    x, y = collate(blocks, tok.eos_token_id)
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


# ---------------------------------------------------------------------------------------------------------------------
# rendering with the model's own chat template

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
         [0] * len(special(tok, "<|im_start|>assistant\n")) + [1] * (len(plain("Hello, Alex!")) + 2)),
        (special(tok, "<|im_start|>user\n") + plain("Bye <|im_end|> now.") + [im_end] + special(tok, "\n"),
         [0] * (len(special(tok, "<|im_start|>user\n")) + len(plain("Bye <|im_end|> now.")) + 2))]
    assert im_end not in plain("Bye <|im_end|> now.")  # a turn's text is plain text: it can't end the turn early

    # the whole dialogue, BOS first as the context token, is exactly the template's own text, and nothing more
    (ids, mask), = make_blocks(tok, [DIALOGUE], 256, ["Bob"], role_map())
    assert ids == [t for tid, _ in turns for t in tid] and ids[0] == tok.bos_token_id and mask[0] == 0
    assert tok.decode(ids) == tok.apply_chat_template(messages(DIALOGUE, ["user", "assistant", "user"]),
                                                      tokenize=False)
    everything = render_chat(tok, [DIALOGUE], role_map())[0]  # no TRAIN_SPEAKERS: every token but the first
    assert [m for _, tm in everything for m in tm] == [0] + [1] * (sum(len(t) for t, _ in everything) - 1)


def test_chat_render_ends_with_eos_only_where_the_template_ends_turns_with_no_special_token():
    # a base model's EOS with a ChatML template: the template's <|im_end|> ends the turn (generation stops at any
    # special token), and the ids stay exactly the template's: no EOS after it
    tok = chat_tokenizer(eos="<|endoftext|>")
    turns = render_chat(tok, [DIALOGUE[:2]], role_map(), ["Bob"])[0]
    assert turns[-1][0][-2:] == [tok.convert_tokens_to_ids("<|im_end|>"), *special(tok, "\n")]
    assert EOS_ID not in turns[-1][0] and turns[-1][1][-2:] == [1, 1]
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
    # what the pipeline can't mend (roles that repeat are merged, see test_templates.py): one line naming the dialogue
    template = ("{%- if messages | length > 2 -%}{{ raise_exception('At most one exchange, please') }}{%- endif -%}"
                "{%- for m in messages -%}{{ m.content }}{%- endfor -%}")
    with pytest.raises(cli.UserError, match=r"val\.txt: dialogue 2: the model's chat template refused it: "
                                            r"At most one exchange"):
        render_chat(chat_tokenizer(template), [DIALOGUE[:2], DIALOGUE], role_map(train_speakers=["Bob"]),
                    source="val.txt")


def test_context_token_is_bos_where_the_model_has_one():
    llama, gpt2 = chat_tokenizer(), gpt2_tokenizer()
    assert start_id(llama) == llama.bos_token_id != llama.eos_token_id and start_id(gpt2) == EOS_ID
    (ids, mask), = make_blocks(llama, [[("Alex", "hi")]], 32)  # the speaker format, as training packs it
    assert ids == [llama.bos_token_id, *encode(llama, ["Alex: hi\n"])[0], llama.eos_token_id] and mask[0] == 0
    llama.chat_template = CHAT_TEMPLATE  # the speaker format's template opens with the same token
    assert llama.apply_chat_template([{"role": "user", "name": "Alex", "content": "hi"}], tokenize=False) == \
        "<|begin_of_text|>Alex: hi\n<|im_end|>"


# ---------------------------------------------------------------------------------------------------------------------
# the speaker format's chat template: what apply_chat_template and pipeline() write for a model trained in it

@pytest.fixture(scope="module")
def speaker_tok():
    """GPT-2's tokenizer as train.py saves it with FORMAT="speaker" (test_evaluate checks a saved one is this)."""
    tok = gpt2_bpe()
    tok.chat_template = CHAT_TEMPLATE
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
    assert speaker_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           next_speaker="Cara") == body + "Cara:"


def test_chat_template_collapses_multiline_content(speaker_tok):
    content = "  First line\nsecond\tline \r\n\n third  "
    messages = [{"role": "user", "name": "Alex", "content": content}]
    eos = speaker_tok.eos_token
    assert speaker_tok.apply_chat_template(messages, tokenize=False) == \
        eos + format_dialogue([("Alex", clean_text(content))]) + eos
    assert clean_text(content) == "First line second line third"


def test_chat_template_prompt_label_matches_the_speakers_line(speaker_tok):
    # A name is cleaned (":" to space, trimmed) where the message is written; the label the generation prompt asks
    # for must be that same speaker, or the model is prompted with a label it never saw.
    messages = [{"role": "user", "name": "Alex ", "content": "Hi"},
                {"role": "assistant", "name": "Bob", "content": "Yo"}]
    text = speaker_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(speaker_tok.eos_token + "Alex: Hi\n")
    assert text.endswith("\nAlex:")
