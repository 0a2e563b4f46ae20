"""chat.py end to end: a reply to each line, /reset and /quit, end of input, the bot's name, a conversation longer than
the model's context, the history the model is given, unknown commands, the seed, Ctrl-D at a terminal, and the one
line a mistake gets. On conftest's trained_run, a tiny GPT-2 fine-tuned for 6 steps.

Run: .venv/bin/python -m pytest -q tests/test_chat.py
"""

import io
import json

import pytest

import generation
from conftest import in_background, one_error_line, run
from tiny import save_tiny_gpt2

# one thread: the process runs beside this one, and torch's threads fighting over few cores made token-by-token
# sampling several times slower
ENV = {"OMP_NUM_THREADS": "1"}
SESSION = "Hi there\nHow are you?\n/reset\nHello again\n/quit\n"


def chat_py(run_dir):
    """chat.py as a user runs it, a process, from the run's directory, with SESSION typed in."""
    return run("chat.py", "--device=cpu", "--max_new_tokens=12", cwd=run_dir, env=ENV, stdin=SESSION, process=True)


@pytest.fixture(scope="module", autouse=True)
def processes(request, trained_run):
    """The real chat.py, started once the run is trained, while the tests before the one that looks at it run in this
    process. test name -> Future of its CompletedProcess."""
    with in_background(request, {"test_chat_answers_each_line_and_resets": (chat_py, trained_run)}) as started:
        yield started


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("tiny64") / "model"), n_positions=64)


LONG_CHAT = "".join(f"Line {i}: " + "the cat sat on the garden table today and was very happy " * 2 + "\n"
                    for i in range(15)) + "/quit\n"


# ---------------------------------------------------------------------------------------------------------------------
# replies, in this process (an interpreter start costs seconds)

def test_chat_bot_name_and_end_of_input(trained_run):
    proc = run("chat.py", "--device=cpu", "--max_new_tokens=12", "--bot_name=Sam", cwd=trained_run,
               stdin="Hi there\n\nHow are you?\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").split("\n")
    assert lines[0::2] == ["Alex: Hi there", "Alex: How are you?"]  # piped: both sides; the blank line is no turn
    assert len(lines) == 4 and all(line.startswith("Sam: ") for line in lines[1::2])


def test_chat_beyond_the_context_answers_every_line(trained_run, tiny64):
    # greedy: this one is about the context, and sampling over GPT-2's 50k vocabulary is the slow part
    proc = run("chat.py", "--device=cpu", f"--checkpoint={tiny64}", "--max_new_tokens=12", "--temperature=0",
               cwd=trained_run, stdin=LONG_CHAT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").split("\n")
    assert len(lines) == 30 and all(line.startswith("Bob: ") for line in lines[1::2])
    assert [line.split(":")[:2] for line in lines[0::2]] == [["Alex", f" Line {i}"] for i in range(15)]


def test_chat_missing_model(trained_run):
    assert "nowhere" in one_error_line(run("chat.py", "--device=cpu", "--out_dir=nowhere", cwd=trained_run))


# ---------------------------------------------------------------------------------------------------------------------
# the conversation around the replies: generation.reply put in the model's place

def test_chat_history(trained_run, tmp_path, monkeypatch):
    seen = []

    def fake_reply(model, tokenizer, turns, speaker, cfg, generator, context, roles):
        assert roles is None  # a model trained in the speaker format
        seen.append((list(turns), speaker))
        return f"answer {len(seen)}", True, 3

    monkeypatch.setattr(generation, "reply", fake_reply)  # chat.main imports it when it starts
    p = run("chat.py", f"--checkpoint={trained_run / 'out' / 'best'}", "--user_name=Maya", cwd=tmp_path,
            stdin="Hi  there\n   \nMore\tthings\n/reset\nAgain\n")
    assert p.returncode == 0, p.stderr
    assert seen == [([("Maya", "Hi there")], "Bob"),
                    ([("Maya", "Hi there"), ("Bob", "answer 1"), ("Maya", "More things")], "Bob"),
                    ([("Maya", "Again")], "Bob")]


@pytest.mark.parametrize("run_settings, args, expected", [
    ({"TRAIN_SPEAKERS": ["Farid", "Gail"]}, [], ("Hana", "Farid")),  # the other: VAL_FILE's commonest
    ({"ROLES": {"Riley": "user", "Jordan": "assistant", "*": "user"}}, [], ("Riley", "Jordan")),
    ({"TRAIN_SPEAKERS": ["Farid"]}, ["--user_name=Maya"], ("Maya", "Farid")),
    ({"TRAIN_SPEAKERS": ["Farid"]}, ["--bot_name=Sam"], ("Alex", "Sam")),
    ({}, [], ("Alex", "Bob")),  # no trained speaker named: USER_NAME and BOT_NAME
])
def test_chat_speaks_as_the_runs_trained_speaker(trained_run, tmp_path, monkeypatch, run_settings, args, expected):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps(run_settings))
    (tmp_path / "val_data.txt").write_text("Farid: Hi.\nHana: Hey.\nIvo: Yo.\n\nHana: So?\nFarid: Well.\n")
    seen = []

    def fake_reply(model, tokenizer, turns, speaker, cfg, generator, context, roles):
        seen.append((turns[-1][0], speaker))
        return "fine", True, 1

    monkeypatch.setattr(generation, "reply", fake_reply)
    p = run("chat.py", f"--checkpoint={trained_run / 'out' / 'best'}", *args, cwd=tmp_path, stdin="Hi\n")
    assert p.returncode == 0, p.stderr
    user, bot = expected
    assert seen == [expected] and p.stdout == f"{user}: Hi\n{bot}: fine\n"


def test_chat_commands_and_seed(trained_run, tmp_path, monkeypatch):
    seeds = []

    def fake_reply(model, tokenizer, turns, speaker, cfg, generator, context, roles):
        seeds.append(generator.initial_seed())
        return "fine", True, 1

    monkeypatch.setattr(generation, "reply", fake_reply)
    out = ""
    for args in ([], [], ["--seed=5"]):
        p = run("chat.py", f"--checkpoint={trained_run / 'out' / 'best'}", *args, cwd=tmp_path,
                stdin="/help\nHi\n/quit\n")
        assert p.returncode == 0, p.stderr
        out += p.stdout
    assert out.count("(unknown command /help; commands: /reset") == 3 and out.count("Bob: fine") == 3
    assert seeds[2] == 5 and seeds[0] != seeds[1]  # each session its own sampling, unless SEED is given


def test_chat_ctrl_d_ends_the_prompt_line(trained_run, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(generation, "reply", lambda *a: ("fine", True, 1))
    p = run("chat.py", f"--checkpoint={trained_run / 'out' / 'best'}", cwd=tmp_path,
            stdin=Terminal("Hi\n"))  # then Ctrl-D: end of input
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith("Bob: fine\nAlex: \n")


def test_chat_same_names(tmp_path):
    p = run("chat.py", f"--checkpoint={tmp_path}", "--user_name=Bob", cwd=tmp_path)
    assert "two different names" in one_error_line(p)


# ---------------------------------------------------------------------------------------------------------------------
# the real script, started with the module

def test_chat_answers_each_line_and_resets(processes):
    proc = processes["test_chat_answers_each_line_and_resets"].result()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").split("\n")
    assert [line.split(":")[0] for line in lines] == ["Alex", "Bob", "Alex", "Bob", "(new conversation)", "Alex",
                                                      "Bob"]
    assert [lines[i] for i in (0, 2, 5)] == ["Alex: Hi there", "Alex: How are you?", "Alex: Hello again"]


def test_chat_in_a_chat_template_takes_the_runs_roles(tmp_path, monkeypatch):
    """A chat-template run whose ROLES give the system speaker the user's role (as for a template without a system
    slot): chat.py's prompt renders each turn in the role training gave it, not a fixed user/assistant pair."""
    from render import role_map
    from tiny import save_tiny_llama

    roles = {"Riley": "user", "Jordan": "assistant", "system": "user"}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps({"FORMAT": "chat_template", "ROLES": roles,
                                                              "SYSTEM_PROMPT": "Be kind."}))
    save_tiny_llama(str(tmp_path / "model"))
    seen = []

    def fake_reply(model, tokenizer, turns, speaker, cfg, generator, context, roles_of):
        seen.append((speaker, roles_of(list(turns) + [(speaker, "")])))
        return "fine", True, 1

    monkeypatch.setattr(generation, "reply", fake_reply)
    p = run("chat.py", "--checkpoint=model", cwd=tmp_path, stdin="Hi\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Riley: Hi\nJordan: fine\n"
    turns = [("system", "Be kind."), ("Riley", "Hi"), ("Jordan", "")]
    assert seen == [("Jordan", role_map(roles)(turns))] == [("Jordan", ["user", "user", "assistant"])]
