"""Tests for generation.py: replies through model.generate(), where they end, the sampling settings, batches.

Run: .venv/bin/python -m pytest -q tests/test_generation.py
"""

import pytest
import torch
import transformers

import cli
import modeling
from dialogues import format_dialogue
from conftest import REPLY
from generation import cut_reply, dialogue, generate, replies, reply, sampling, turn_end_ids
from render import encode, prompt, prompt_ids, role_map, turn_closers
from tiny import EOS_ID, chat_tokenizer, gpt2_tokenizer, save_tiny_gpt2, save_tiny_llama, synthetic


# ---------------------------------------------------------------------------------------------------------------------
# stopping: a scripted model emits given tokens, one per forward call

def scripted(script, vocab=50257):
    """A tiny GPT-2 whose forward calls emit `script`, one token per call (a huge logit), then " la" forever: the
    real generate() loop, KV cache and all, with the outcome fixed. `model.calls` records each call's input ids,
    the cache it was given and that cache's length then."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=16,
                                                                 n_layer=1, n_head=2)).eval()
    model.calls = []
    la = gpt2_tokenizer().encode(" la")[0]

    def before(module, args, kwargs):
        cache = kwargs.get("cache")
        model.calls.append((kwargs["input_ids"][0].tolist(), cache, cache.get_seq_length() if cache else 0))

    def after(module, args, kwargs, out):
        i = len(model.calls) - 1
        out.logits[:, -1] = 0
        out.logits[:, -1, script[i] if i < len(script) else la] = 1e4
        return out

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    return model


TURNS = [("Alex", "Hi Cara, how are you?"), ("Bob", "Hello both.")]


def enc(text):
    return gpt2_tokenizer().encode(text)


def run_reply(script, *flags, turns=TURNS, speaker="Cara", context=1024):
    model = scripted(script)
    cfg = cli.load_config(["--temperature=0", "--max_new_tokens=12", *flags])
    out = reply(model, gpt2_tokenizer(), turns, speaker, cfg, torch.Generator().manual_seed(0), context)
    return out, model.calls


def test_reply_stops_at_line_end():
    head = enc(" Fine, thanks")
    (text, ended, n), calls = run_reply(head + enc("\n") + enc("Alex: more words"))
    assert (text, ended) == ("Fine, thanks", True)
    assert n == len(calls) == len(head) + 1  # nothing generated after the newline


def test_reply_stops_at_eos():
    head = enc(" Fine, thanks")
    (text, ended, n), calls = run_reply(head + [EOS_ID] + enc(" after"))
    assert (text, ended) == ("Fine, thanks", True)
    assert n == len(calls) == len(head) + 1
    assert "endoftext" not in text


@pytest.mark.parametrize("label", ["Bob", "Alex", "Cara"])
def test_reply_stops_at_a_speaker_label(label):
    head = enc(" Fine, thanks")
    (text, ended, n), calls = run_reply(head + enc(f" {label}") + enc(":") + enc(" and you?"))
    assert (text, ended) == ("Fine, thanks", True)
    assert n == len(calls) == len(head) + len(enc(f" {label}")) + 1


def test_reply_without_a_stop_runs_to_max_new_tokens():
    words = enc(" one two three four five six seven eight")
    (text, ended, n), calls = run_reply(words, "--max_new_tokens=5")
    assert (text, ended, n, len(calls)) == ("one two three four five", False, 5, 5)


def test_reply_with_sampling_settings_follows_the_script():
    head = enc(" Sure thing")
    (text, ended, _), _ = run_reply(head + enc("\n"), "--temperature=0.8", "--top_k=50", "--top_p=0.95")
    assert (text, ended) == ("Sure thing", True)


def test_reply_uses_the_prompt_then_the_cache():
    tok = gpt2_tokenizer()
    script = enc(" Fine, thanks") + enc("\n")
    _, calls = run_reply(script)
    prompt_ids_, cache, length = calls[0]
    assert tok.decode(prompt_ids_) == tok.eos_token + format_dialogue(TURNS) + "Cara:" and length == 0
    for i, (ids, later, length) in enumerate(calls[1:], 1):  # then one token a call, the rest from the same cache
        assert ids == [script[i - 1]] and later is cache and length == len(prompt_ids_) + i - 1


def test_reply_drops_oldest_turns_to_fit_the_context():
    tok = gpt2_tokenizer()
    turns = [("Alex", "word " * 30), ("Bob", "Short one."), ("Alex", "Last thing?")]
    last = tok.eos_token + format_dialogue(turns[2:]) + "Bob:"
    context = len(tok.encode(last)) + 12
    (_, ended, _), calls = run_reply(enc(" Ok") + enc("\n"), turns=turns, speaker="Bob", context=context)
    assert tok.decode(calls[0][0]) == last and ended
    with pytest.raises(cli.UserError, match="does not fit"):
        prompt_ids(tok, turns, "Bob", 12 + 2, 12)


def test_cut_reply():
    assert cut_reply(" Hello there\nAlex: more", ["Alex"]) == ("Hello there", True)
    assert cut_reply(" Hello there", ["Alex"]) == ("Hello there", False)
    assert cut_reply(" Sure Bob: next", ["Alex", "Bob"]) == ("Sure", True)
    assert cut_reply("Bob: at once", ["Bob"]) == ("", True)
    assert cut_reply(" Ok\n", []) == ("Ok", True)
    assert cut_reply(" Cara: no speakers", []) == ("Cara: no speakers", False)
    assert cut_reply(" Bobby: is not Bob", ["Bob"]) == ("Bobby: is not Bob", False)
    assert cut_reply(" I said\tMary Ann: hi", ["Mary Ann"]) == ("I said", True)
    assert cut_reply(" x A.B: y", ["A.B"]) == ("x", True)
    assert cut_reply(" x AxB: y", ["A.B"]) == ("x AxB: y", False)  # names are matched literally, not as patterns
    assert cut_reply(" a\nb Bob: c", ["Bob"]) == ("a", True)


def test_replies_in_a_batch_each_end_at_their_own_turns_end():
    """The same tokens for every row: "Dan:" is a label only in the conversation Dan is in; the other row's reply
    runs on to the line end."""
    script = enc(" Fine Dan") + enc(":") + enc(" you\n")
    model = scripted(script)
    cfg = cli.load_config(["--temperature=0", "--max_new_tokens=12"])
    asks = [(TURNS, "Cara"), (TURNS + [("Dan", "Hey.")], "Cara")]
    out = replies(model, gpt2_tokenizer(), asks, cfg, torch.Generator().manual_seed(0), 1024, batch_size=2)
    assert out == [("Fine Dan: you", True, len(script)), ("Fine", True, len(enc(" Fine Dan") + enc(":")))]


# ---------------------------------------------------------------------------------------------------------------------
# generation in the chat template

def messages(turns, roles):
    return [{"role": r, "content": t} for (_, t), r in zip(turns, roles)]


def test_chat_prompt_is_the_templates_generation_prompt_and_a_reply_ends_with_the_turn():
    tok = chat_tokenizer()
    dialogue = [("Alex", "Hi there."), ("Bob", "Hello, Alex!")]
    roles = role_map()
    ids, _ = prompt_ids(tok, dialogue[:1], "Bob", 256, 10, roles)
    assert tok.decode(ids) == tok.apply_chat_template(messages(dialogue[:1], ["user"]), tokenize=False,
                                                      add_generation_prompt=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = cli.load_config(["--temperature=0", "--max_new_tokens=20"])
    model = scripted(encode(tok, [" Fine, thanks"])[0] + [im_end] + encode(tok, ["more"])[0], len(tok))
    text, ended, n = reply(model, tok, dialogue[:1], "Bob", cfg, torch.Generator(), 256, roles)
    assert (text, ended, n) == ("Fine, thanks", True, len(encode(tok, [" Fine, thanks"])[0]) + 1)


# ---------------------------------------------------------------------------------------------------------------------
# real tiny models: batches, seeds and the sampling settings

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_batch_generates_what_one_at_a_time_does(tmp_path, family):
    """Left padding, its attention mask and the position ids generate() derives from it: a reply in a batch of
    prompts of other lengths is the reply it gets alone (greedy, so any difference would show)."""
    path = (save_tiny_gpt2 if family == "gpt2" else save_tiny_llama)(str(tmp_path / family))
    tok, model = modeling.load(path)
    model.eval()
    roles = None if family == "gpt2" else role_map({"Bob": "assistant", "*": "user"})
    asks = [(d[:-1], d[-1][0]) for d in synthetic(5, seed=4, min_turns=2)]
    assert len({len(prompt(tok, t, s, roles)) for t, s in asks}) == len(asks)  # every row padded differently
    cfg = cli.load_config(["--temperature=0", "--max_new_tokens=8"])
    alone = [reply(model, tok, t, s, cfg, torch.Generator(), 256, roles) for t, s in asks]
    assert replies(model, tok, asks, cfg, torch.Generator(), 256, roles, batch_size=len(asks)) == alone


def test_sampling_is_reproducible_from_the_seed(tmp_path):
    tok, model = modeling.load(save_tiny_gpt2(str(tmp_path / "gpt2")))
    asks = [(d[:-1], d[-1][0]) for d in synthetic(3, seed=3, min_turns=2)]
    cfg = cli.load_config(["--max_new_tokens=4"])  # config.py's sampling settings
    draw = lambda seed: replies(model.eval(), tok, asks, cfg, torch.Generator().manual_seed(seed), 256, batch_size=2)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    assert draw(0) == draw(0) != draw(1)
    assert torch.equal(torch.get_rng_state(), state)  # nothing else's randomness moved


def test_temperature_top_k_and_top_p_change_what_is_sampled():
    """On a real tiny model whose next-token distribution is an ordinary one (the likeliest token has p ~ 0.16), 100
    first tokens sampled with a fixed seed under each setting."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=2048, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.5)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = [5, 17, 42, 99, 7, 300, 12]
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    probs, order = p.sort(descending=True)
    assert 0.05 < probs[0] < 0.5  # neither flat nor one certain token: each setting has something to change

    def first_tokens(*flags, seed=0):
        cfg = cli.load_config(["--temperature=1.0", "--top_k=0", "--top_p=1.0", "--repetition_penalty=1.0", *flags])
        new = generate(model, gpt2_tokenizer(), [ids] * 100, 1, sampling(cfg), set(),
                       torch.Generator().manual_seed(seed))
        return [n[0] for n in new]

    plain = first_tokens()
    assert plain == first_tokens() != first_tokens(seed=1)
    top5 = set(order[:5].tolist())
    nucleus = set(order[:int((probs.cumsum(0) < 0.5).sum()) + 1].tolist())  # the top tokens holding half the mass
    assert 5 < len(nucleus) < 50
    assert not set(plain) <= nucleus  # without top-k or top-p, tokens beyond either are sampled
    top_k = first_tokens("--top_k=5")
    assert set(top_k) <= top5 and top_k != plain
    top_p = first_tokens("--top_p=0.5")
    assert set(top_p) <= nucleus and len(set(top_p)) > 5 and top_p != plain
    likeliest = int(order[0])
    cold, hot = first_tokens("--temperature=0.5"), first_tokens("--temperature=2.0")
    assert hot.count(likeliest) < plain.count(likeliest) < cold.count(likeliest)
    assert set(first_tokens("--temperature=0")) == {likeliest}  # greedy


# ---------------------------------------------------------------------------------------------------------------------
# a sample dialogue: several turns, ending at the end of one

def run_dialogue(script, after, more, tok=None, roles_of=None):
    """A dialogue scripted after Alex's first turn, asking Bob: (its new text, the model's forward calls). With
    `roles_of`, in `tok`'s chat template."""
    tok = tok or gpt2_tokenizer()
    ids = prompt(tok, TURNS[:1], "Bob", roles_of)
    model = scripted(script, vocab=len(tok))
    closers = None if roles_of is None else turn_closers(tok, TURNS[:1] + [("Bob", ".")], roles_of)
    new = dialogue(model, tok, ids, after, more, sampling(cli.load_config(["--temperature=0"])),
                   torch.Generator().manual_seed(0), closers)
    return tok.decode(new), len(model.calls)


def test_a_dialogue_runs_past_its_budget_to_the_end_of_a_turn():
    first, second = enc(" Fine, thanks\n"), enc("Alex: And how is the garden these days?\n")
    text, calls = run_dialogue(first + second + enc("Bob: Green"), after=len(first) + 3, more=30)
    assert text == " Fine, thanks\nAlex: And how is the garden these days?\n"  # not cut mid-turn at the budget
    assert calls == len(first + second)  # and nothing made after that turn's end


def test_a_dialogue_that_cannot_end_a_turn_in_time_goes_back_to_the_last_turn_end():
    first = enc(" Fine, thanks\n")
    text, calls = run_dialogue(first + enc("Alex: And how is the garden these days?"), after=len(first) + 2, more=3)
    assert text == " Fine, thanks\n" and calls == len(first) + 5


def test_a_dialogue_ends_at_eos_within_its_budget():
    text, _ = run_dialogue(enc(" Fine") + [EOS_ID] + enc("\nAlex: more"), after=10, more=5)
    assert text == " Fine<|endoftext|>"


def test_a_dialogue_in_a_chat_template_ends_where_a_message_closes():
    """An instruct model whose EOS is not its turn's end (<|endoftext|>, as a base model's): the dialogue runs on
    through the next message's header, whose <|im_start|> is no turn end, to the <|im_end|> that closes it."""
    tok = chat_tokenizer(eos="<|endoftext|>")
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    first = enc(" Fine") + [im_end] + enc("\n")
    second = [im_start] + enc("user\nAnd you?") + [im_end]
    text, calls = run_dialogue(first + second + enc("\n") + [im_start], after=len(first) + 1, more=20, tok=tok,
                               roles_of=role_map({"Alex": "user", "Bob": "assistant"}))
    assert text == " Fine<|im_end|>\n<|im_start|>user\nAnd you?<|im_end|>" and calls == len(first + second)


# ---------------------------------------------------------------------------------------------------------------------
# the saved files alone: pipeline() and generate() with the saved generation_config stop at the turn's end

def test_turn_end_ids_are_the_tokens_that_hold_a_line_end():
    tok = gpt2_tokenizer()
    ends = turn_end_ids(tok)
    assert EOS_ID in ends and encode(tok, [" Fine thanks.\n"])[0][-1] in ends
    assert all("\n" in tok.decode([i]) for i in ends if i != EOS_ID)
    assert turn_end_ids(chat_tokenizer(), role_map()) == [chat_tokenizer().convert_tokens_to_ids("<|im_end|>")]


CHAT = [{"role": "user", "content": "We like the cat."}, {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "The dog ran home today."}]


@pytest.fixture(scope="module")
def saved(replying):
    """format -> (tokenizer, model) of each `replying` run's best/, as any tool loads them."""
    return {fmt: (transformers.AutoTokenizer.from_pretrained(d / "out" / "best"),
                  transformers.AutoModelForCausalLM.from_pretrained(d / "out" / "best"))
            for fmt, d in replying.items()}


@pytest.mark.parametrize("fmt", ["speaker", "chat_template"])
def test_pipeline_chat_reply_ends_at_the_turns_end(saved, fmt):
    tok, model = saved[fmt]
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    answer = pipe(CHAT)[0]["generated_text"][-1]
    # the speaker format's reply is the training text after "Bob:", its line end included: " Fine thanks.\n"
    assert answer["role"] == "assistant" and answer["content"] == (f" {REPLY}\n" if fmt == "speaker" else REPLY)


@pytest.mark.parametrize("fmt", ["speaker", "chat_template"])
def test_generate_with_the_saved_config_alone_stops_where_training_did(saved, fmt):
    tok, model = saved[fmt]
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    turns = [("Alex" if m["role"] == "user" else "Bob", m["content"]) for m in CHAT]
    roles_of = role_map(train_speakers=["Bob"]) if fmt == "chat_template" else None
    assert list(ids) == prompt(tok, turns, "Bob", roles_of)  # the prompt is what training rendered
    out = model.generate(torch.tensor([ids]))[0, len(ids):].tolist()
    assert out[-1] in model.generation_config.eos_token_id if fmt == "speaker" else out[-1] == tok.eos_token_id
    assert tok.decode(out, skip_special_tokens=True) == (f" {REPLY}\n" if fmt == "speaker" else REPLY)
