"""Tests for hardware.py: the CPU threads a process takes (the cores shared among the ranks on a machine), the device
and precision, and a process's own peak memory.

Run: .venv/bin/python -m pytest -q tests/test_hardware.py
"""

import subprocess
import sys

import pytest
import torch

import hardware
from cli import UserError
from conftest import ROOT, script_env


# ---------------------------------------------------------------------------------------------------------------------
# threads: the cores this process may use, shared among the ranks on this machine

@pytest.mark.parametrize("cores, ranks, env, default, threads", [
    (8, 1, {}, 8, 8),
    (8, 2, {}, 8, 4),  # torchrun --nproc_per_node=2: half each
    (8, 3, {}, 8, 2),
    (2, 4, {}, 2, 1),  # more ranks than cores: still one thread each
    (16, 1, {}, 8, 8),  # never more than torch's own default (physical cores)
    (4, 1, {}, 8, 4),  # taskset to 4 of the 8: 4
    (8, 1, {"OMP_NUM_THREADS": "3"}, 3, None),  # the user chose: left alone
])
def test_cpu_threads(cores, ranks, env, default, threads):
    assert hardware.cpu_threads(cores, ranks, env, default) == threads


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_device_line_says_how_many_threads(monkeypatch, keep_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cores", lambda: 4)
    monkeypatch.setattr(hardware, "TORCH_THREADS", 64)
    _, _, line = hardware.pick("cpu", processes=2)
    assert line == "device: cpu (DEVICE setting), fp32, 2 threads (4 cores / 2 processes)"
    assert torch.get_num_threads() == 2

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    _, _, line = hardware.pick("cpu")
    assert line.endswith(", fp32, 1 thread (OMP_NUM_THREADS)") and torch.get_num_threads() == 1


# ---------------------------------------------------------------------------------------------------------------------
# precision

@pytest.mark.parametrize("precision, dtype", [("auto", None), ("fp32", None), ("bf16", torch.bfloat16)])
def test_precision_on_cpu(precision, dtype):
    device, chosen, note = hardware.pick("cpu", precision)
    assert device.type == "cpu" and chosen == dtype
    assert ("autocast" in note) == (dtype is not None)


@pytest.mark.parametrize("precision", ["fp16", "half", "FP32"])
def test_unsupported_precision_is_a_user_error(precision):
    with pytest.raises(UserError, match="PRECISION"):
        hardware.pick("cpu", precision)


# ---------------------------------------------------------------------------------------------------------------------
# memory taken

def test_peak_memory_is_the_processs_own():
    # a child of a process that has touched 1 GB: Linux carries ru_maxrss over across exec, so it would say 1 GB
    child = "import hardware; print(hardware.peak_rss_mb())"
    parent = f"import subprocess, sys; big = b'x' * (1 << 30); subprocess.run([sys.executable, '-c', {child!r}])"
    p = subprocess.run([sys.executable, "-c", parent], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert 50 < float(p.stdout) < 700, p.stdout  # its own: importing torch takes ~300 MB
