"""Talk to the trained model in the terminal: the model speaks as the run's trained speaker (the first of
TRAIN_SPEAKERS, or the one ROLES makes the assistant) and you as the run's other speaker; where the run names none,
you are USER_NAME and the model BOT_NAME (either given on the command line wins).

    python chat.py                                  # the best model in OUT_DIR
    python chat.py --user_name=Maya --bot_name=Sam --checkpoint=out/final
    printf 'Hi!\\nWhat now?\\n/quit\\n' | python chat.py    # scripted: one line of stdin per turn

Type a line and press enter; /reset starts a new conversation, /quit (or end of input) leaves; any other line that
starts with a /command is not sent to the model. Piped, it prints both sides of the conversation: a transcript. The
history is kept up to the model's context: the oldest turns are dropped first (a system message stays: the run's
SYSTEM_PROMPT, or --system_prompt=...). Replies differ from one session to the next; --seed=N makes them repeatable.
In a model's own chat template you are the user and the model the assistant, whatever the names.
"""

import collections
import os
import re
import sys

from cli import UserError, load_run_settings, quiet_libraries, run, which_model
from dialogues import SYSTEM, clean_speaker, clean_text, iter_dialogues

HELP = "commands: /reset starts a new conversation, /quit leaves"


def speakers(cfg, given):
    """(the user's name, the model's): the run's trained speaker (the first of TRAIN_SPEAKERS, else the one ROLES makes
    the assistant) and the run's other speaker (the one ROLES makes the user, else the commonest other speaker of
    VAL_FILE); USER_NAME and BOT_NAME where given on the command line, or where the run names no trained speaker."""
    named = lambda role: [s for s, r in (cfg.ROLES or {}).items() if r == role and s not in ("*", SYSTEM)]
    bot = (cfg.TRAIN_SPEAKERS or named("assistant") or [None])[0]
    if bot is None or "BOT_NAME" in given:
        return cfg.USER_NAME, cfg.BOT_NAME
    others = collections.Counter(s for d in (iter_dialogues(cfg.VAL_FILE) if os.path.isfile(cfg.VAL_FILE) else [])
                                 for s, _ in d if s not in (bot, SYSTEM))
    user = cfg.USER_NAME if "USER_NAME" in given else (named("user") + [s for s, _ in others.most_common(1)] +
                                                         [cfg.USER_NAME])[0]
    return user, bot


def main():
    # the run's own settings (its SYSTEM_PROMPT): a line on stderr where the command line overrides one, which a
    # scripted session's transcript on stdout does not show
    cfg, given = load_run_settings(__doc__, say=lambda line: print(line, file=sys.stderr))
    model_dir = which_model(cfg)
    user, bot = (clean_speaker(name) for name in speakers(cfg, given))
    if not user or not bot or user == bot:
        raise UserError(f"USER_NAME and BOT_NAME must be two different names, got {cfg.USER_NAME!r}, {cfg.BOT_NAME!r}")
    # the heavy imports wait until the settings are checked: --help and a mistyped setting answer at once
    quiet_libraries()
    import torch

    import hardware
    import modeling
    from generation import reply
    from render import chat_roles, with_system

    device, _, device_note = hardware.pick(cfg.DEVICE, cfg.PRECISION, threads=cfg.CPU_THREADS)
    tokenizer, model = modeling.load(model_dir)
    model.to(device).eval()
    context = modeling.context_size(model)
    roles_of = chat_roles(tokenizer, {user: "user", bot: "assistant"})  # None: the model speaks the speaker format
    system = cfg.SYSTEM_PROMPT
    generator = torch.Generator()
    if "SEED" in given:  # --seed=N replays a session; without it, each session samples afresh
        generator.manual_seed(cfg.SEED)
    else:
        generator.seed()
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{device_note}; chatting with {model_dir} as {user}; the model is {bot}. {HELP}")

    history = with_system([], system)  # what the model was trained with, as it was trained
    while True:
        if interactive:
            print(f"{user}: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line and interactive:  # Ctrl-D: end the prompt's line
            print()
        if not line or line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = with_system([], system)
            print("(new conversation)")
            continue
        if re.match(r"/\w+(\s|$)", line.strip()):  # an unknown command (a typo?) gets help, not a reply
            print(f"(unknown command {line.split()[0]}; {HELP})")
            continue
        text = clean_text(line)
        if not text:
            continue
        history.append((user, text))
        if not interactive:  # a transcript: both sides of the conversation, as a terminal would show them
            print(f"{user}: {text}")
        answer, _, _ = reply(model, tokenizer, history, bot, cfg, generator, context, roles_of)
        history.append((bot, answer))
        print(f"{bot}: {answer}", flush=True)


if __name__ == "__main__":
    run(main)
