"""The Hugging Face Hub, asked once: offline, its client retries each request for most of a minute and logs every
try, so a model or dataset that is not in the local cache would be an error after 24 s and a dozen lines. A Hub
found unreachable puts the client (and `datasets`, which keeps its own copy of the setting) in offline mode for the
rest of the process, as HF_HUB_OFFLINE=1 would: what is cached loads at once, what is not fails at once."""

import functools
import os
import socket
import sys
import threading
from urllib.parse import urlparse

PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_unless_reachable():
    """True where the Hub cannot be reached and the clients were put offline; False where it can."""
    from huggingface_hub import constants
    if reachable():
        return False
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # what `datasets` reads when it is imported
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return True


@functools.lru_cache(maxsize=None)  # asked once a run: the tokenizer's load and the model's
def reachable(timeout=3.0):
    """Whether the Hub answers a connection within `timeout` seconds. True where HF_HUB_OFFLINE is set (the client
    then never asks) or a proxy is set (only the client knows how to go through it)."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXIES):
        return True
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    result = []

    def connect():  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection(address, timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def revision(repo_id):
    """The commit of Hub model `repo_id` that loading it takes: the Hub's newest where the Hub answers, else the one the
    local cache's refs/main names; None where neither knows the model. Keys what is computed from the model's
    weights (evaluate.py's base figures), so a new revision on the Hub is not taken for the old one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    offline_unless_reachable()
    try:  # the snapshot's directory is named by its commit; config.json alone is fetched, a few hundred bytes
        return os.path.basename(snapshot_download(repo_id, allow_patterns=["config.json"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):  # not cached, no such model, a bad id
        return None
