"""A run's model behind an OpenAI-compatible endpoint: `transformers serve` (transformers' own server; pip install
fastapi uvicorn openai) started on 127.0.0.1 with no model of its own, each request naming a model directory, and
the real `openai` client: a chat completion and a streamed one of each of conftest's `replying` models (a tiny GPT-2
in the speaker format, a tiny Llama in its own template), each reply ending where its turn ends, as the trained
speaker. One server for the module, stopped with it.

Run: .venv/bin/python -m pytest -q tests/test_serve.py
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPLY, script_env

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

STARTUP = 180  # seconds the server may take to answer /health: its imports, on a busy machine


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """`transformers serve` on 127.0.0.1, a free port, on the CPU, offline; its base URL once /health answers. It
    starts before conftest's `replying` models are trained, and starts up meanwhile (its imports take seconds)."""
    cli = shutil.which("transformers", path=os.path.dirname(sys.executable))
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([cli, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=script_env({"OMP_NUM_THREADS": "1"}))
    url = f"http://127.0.0.1:{port}"
    try:
        request.getfixturevalue("replying")
        deadline = time.monotonic() + STARTUP
        while not healthy(url):
            assert time.monotonic() < deadline, f"no answer in {STARTUP} s:\n{log.read_text()[-3000:]}"
            try:  # the pause between two polls, which ends at once where the server has stopped
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"transformers serve stopped:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHAT = [{"role": "user", "content": "We like the cat."}, {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "The dog ran home today."}]


def expected(fmt):
    # the speaker format's reply is the training text after "Bob:", its line end (where the turn ends) included
    return f" {REPLY}\n" if fmt == "speaker" else REPLY


@pytest.mark.parametrize("fmt", ["speaker", "chat_template"])
def test_openai_chat_completion_ends_at_the_turns_end(server, replying, fmt):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    answer = client.chat.completions.create(model=str(replying[fmt] / "out" / "best"), messages=CHAT)
    choice = answer.choices[0]
    assert choice.message.content == expected(fmt) and choice.finish_reason == "stop"


@pytest.mark.parametrize("fmt", ["speaker", "chat_template"])
def test_openai_streamed_chat_completion_ends_at_the_turns_end(server, replying, fmt):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    chunks = list(client.chat.completions.create(model=str(replying[fmt] / "out" / "best"), messages=CHAT,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(fmt)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
