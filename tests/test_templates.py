"""Today's chat-template families, written here as Jinja strings that follow each family's rules, on GPT-2's BPE with
each family's special tokens: a dialogue's ids are exactly apply_chat_template's, the mask covers the assistant's
text and end of turn (never a header or a system message), roles that repeat are merged, a leading assistant turn
is context where the template wants the user first, and a system message goes where the template puts it.

Run: .venv/bin/python -m pytest -q tests/test_templates.py
"""

import collections

import pytest
import transformers
from tokenizers import Tokenizer

from batching import make_blocks
from render import SYSTEM, prompt, render_chat, role_map, template_rules, with_system
from tiny import gpt2_tokenizer, synthetic

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

# name: (template, special tokens, BOS, EOS, other added tokens, what ends an assistant turn)
FAMILIES = {
    "qwen3": (QWEN3, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", ["<think>", "</think>"], "<|im_end|>\n"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", [], "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", [],
              "<end_of_turn>\n"),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", [], "</s>"),
    "phi3": (PHI3, ["<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>", [],
             "<|end|>\n"),
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
DIALOGUE = [("Riley", "Hi there, how are you?"), ("Jordan", "Fine, thanks. And you?"), ("Riley", "Good."),
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
    for turns in (DIALOGUE, with_system(DIALOGUE, "Be brief.")):
        rendered = render_chat(tok, [turns], roles, train_speakers=["Jordan"])[0]
        ids = [t for tid, _ in rendered for t in tid]
        assert ids == template_ids(tok, reference(tok, turns)), name
        (block, mask), = make_blocks(tok, [turns], 256, ["Jordan"], roles)
        assert block == ids and mask[0] == 0  # packed, the sequence is the template's: no token before it
        last = end + (tok.eos_token if name == "phi3" else "")  # Phi-3's template writes EOS after the last message
        assert trained_runs(tok, rendered) == [f"{t}{end}" for s, t in DIALOGUE[:-1] if s == "Jordan"] + \
            [DIALOGUE[-1][1] + last]
        assert "Be brief" not in "".join(trained_runs(tok, render_chat(tok, [turns], roles)[0]))  # never trained


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_prompt_is_the_training_sequence_up_to_the_reply(name):
    tok = family(name)
    roles = role_map(ROLES)
    for turns in (DIALOGUE, with_system(DIALOGUE, "Be brief."), DIALOGUE[:1] + DIALOGUE[:1] + DIALOGUE[1:]):
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
    assert trained_runs(tok, rendered) == ["Three<|im_end|>\n"]  # Jordan+Sam's message is not all Jordan's
    rendered = render_chat(tok, [turns], roles, ["Jordan", "Sam"])[0]
    assert trained_runs(tok, rendered) == ["One\nTwo<|im_end|>\n", "Three<|im_end|>\n"]
