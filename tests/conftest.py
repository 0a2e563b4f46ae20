"""Shared test helpers. Run the suite with: python -m pytest -q tests"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def script_env(extra=None):
    """The environment the scripts run in under test: offline (the Hub is never asked), unbuffered output."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", **(extra or {})}


def run_script(script, *args, cwd, env=None, timeout=600, stdin=None):
    """Run one of the pipeline's scripts as a user would, from `cwd`; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=script_env(env),
                          capture_output=True, text=True, timeout=timeout, input=stdin)


@pytest.fixture
def script():
    return run_script
