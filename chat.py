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
In a model's own chat template the run's ROLES say each speaker's role, as training rendered them; a name they do
not give is the assistant's (the model's) or the user's (yours).
"""

import re
import sys

from cli import UserError, load_run_settings, quiet_libraries, run, which_model
from dialogues import clean_speaker, clean_text
from render import run_speakers

HELP = "commands: /reset starts a new conversation, /quit leaves"


def chat_role_names(cfg, user, bot):
    """The chat roles of a model trained in its own template: the run's ROLES, so that the prompt is the one training
    rendered (its system speaker's role too); a name ROLES does not give (a --user_name or --bot_name of your own)
    gets the role it has here, the model's the assistant's and yours ROLES' "*" or the user's."""
    roles = dict(cfg.ROLES or {})
    roles.setdefault(bot, "assistant")
    roles.setdefault(user, roles.get("*", "user"))
    return roles


def main():
    # the run's own settings (its SYSTEM_PROMPT): a line on stderr where the command line overrides one, which a
    # scripted session's transcript on stdout does not show
    cfg, given = load_run_settings(__doc__, say=lambda line: print(line, file=sys.stderr))
    model_dir = which_model(cfg)
    user, bot = (clean_speaker(name) for name in run_speakers(cfg, given))
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
    roles_of = chat_roles(tokenizer, chat_role_names(cfg, user, bot))  # None: the model speaks the speaker format
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
