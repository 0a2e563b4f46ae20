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


@pytest.mark.parametrize("cores, ranks, busy, threads", [
    (2, 1, 2.0, 1),  # two other processes on two cores: one thread
    (2, 1, 0.3, 2),  # a quiet machine's background: all of them
    (2, 1, 0.7, 1),
    (8, 1, 3.0, 5),
    (8, 2, 4.0, 2),  # what is left, shared among the ranks
    (8, 1, 30.0, 1),
])
def test_busy_cores_mean_fewer_threads(cores, ranks, busy, threads):
    assert hardware.cpu_threads(cores, ranks, {}, 64, busy) == threads
    assert hardware.cpu_threads(cores, ranks, {"OMP_NUM_THREADS": "2"}, 64, busy) is None  # the user's choice wins


def test_a_busy_machine_is_said_with_its_figures_and_the_way_to_take_more(monkeypatch, keep_threads):
    """What the load check reads is the load average: a machine that two other processes keep busy."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    monkeypatch.setattr(hardware, "TORCH_THREADS", 2)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (2.1, 1.5, 0.8))
    _, _, line = hardware.pick("cpu")
    assert line == ("device: cpu (DEVICE setting), fp32, 1 thread (2 cores / 1 process; other work keeps 2.0 of the "
                    "cores busy (load average 2.1), and threads that wait for a core slow every step: 1 rather than "
                    "2; --cpu_threads=2 takes 2)")
    assert torch.get_num_threads() == 1
    _, _, line = hardware.pick("cpu", threads=2)  # the setting wins
    assert line.endswith("2 threads (CPU_THREADS setting)") and torch.get_num_threads() == 2
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 64)  # a big machine's load, of which these 2 cores are
    assert hardware.pick("cpu")[2].endswith("2 threads (2 cores / 1 process)")  # a small share
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    assert hardware.pick("cpu")[2].endswith("2 threads (2 cores / 1 process)")
    with pytest.raises(UserError, match="CPU_THREADS must be a number of threads"):
        hardware.pick("cpu", threads=-1)


@pytest.mark.parametrize("setting, rank_device, why", [("auto", "cpu", "no CUDA found"),
                                                        ("cpu", "cpu", "DEVICE setting"), ("auto", None, "no CUDA found")])
def test_the_device_line_says_where_the_device_came_from_under_torchrun(setting, rank_device, why, keep_threads):
    assert hardware.pick(setting, rank_device=rank_device)[2].startswith(f"device: cpu ({why}), fp32")


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_device_line_says_how_many_threads(monkeypatch, keep_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cores", lambda: 4)
    monkeypatch.setattr(hardware, "TORCH_THREADS", 64)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine
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
