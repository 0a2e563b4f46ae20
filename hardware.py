"""Where this process computes, decided once per script: the device and precision, the CPU threads, the C library's
handling of freed memory; and the memory: how much the device has left, and the most this process has taken. Nothing
here knows about models."""

import contextlib
import ctypes
import os
import sys

import torch

from cli import UserError

TORCH_THREADS = torch.get_num_threads()  # torch's own choice at start-up, before pick() changes it


def pick(name, precision="auto", processes=1, threads=0, rank_device=None):
    """(device, autocast dtype or None for fp32, a line saying what was chosen and why). `name`: the DEVICE setting;
    `processes`: the ranks on this machine (torchrun's LOCAL_WORLD_SIZE), which share its cores; `threads`: the
    CPU_THREADS setting; `rank_device`: the device processes.start gave a torchrun rank, which the setting chose."""
    if rank_device is not None:  # torchrun: each rank its own GPU where DEVICE allows CUDA, else the CPU
        why = ("torchrun's LOCAL_RANK" if rank_device.startswith("cuda") else
               "DEVICE setting" if name == "cpu" else "no CUDA found")
        name = rank_device
    elif name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        why = "CUDA found" if name == "cuda" else "no CUDA found"
    else:
        why = "DEVICE setting"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"DEVICE={name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"DEVICE={name!r}: no such CUDA device here (use --device=auto or --device=cpu)")
    elif device.type == "cpu":
        if type(threads) is not int or threads < 0:
            raise UserError(f"CPU_THREADS must be a number of threads, or 0 for automatic, got {threads!r}")
        keep_freed_memory()
        threads = set_cpu_threads(processes, threads)
    else:
        raise UserError(f"DEVICE={name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes or (precision == "fp16" and device.type == "cpu"):
        raise UserError(f"PRECISION={precision!r}: expected 'auto', 'fp32', 'bf16' or (on CUDA) 'fp16'")
    how = "fp32" if precision == "fp32" else f"{precision} autocast, fp32 weights"
    return device, dtypes[precision], f"device: {device} ({why}), {how}" + (
        f", {threads}" if device.type == "cpu" else "")


def autocast(device, dtype):
    """The forward pass's autocast context: `dtype` (bf16, fp16) on `device`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------------
# CPU threads

def cpu_threads(cores, local_world, env, default, busy=0.0):
    """Intra-op threads for one process: the cores it may use shared among the ranks on this machine (torchrun's
    LOCAL_WORLD_SIZE), at least 1, and never more than torch's own `default` (it counts physical cores where it can
    tell); fewer where other work keeps `busy` of those cores busy, down to one. None where OMP_NUM_THREADS is set:
    the user chose, and torch took it at start-up. Every rank taking every core, or a shared machine's busy cores,
    made a step 10x slower: a thread that waits for a core holds up the others at the end of every operation
    (issue 21: 618 tokens/s with the default threads, 5,162 with one, at the same moment; issue 32: two epochs in
    70.6 s with 2 threads, 18.1 s with 1)."""
    if env.get("OMP_NUM_THREADS"):
        return None
    share = max(1, min(cores // max(1, local_world), default))
    free = int((cores - busy) / max(1, local_world) + 0.5)  # rounded: a core 40% taken by others still serves
    return max(1, min(share, free))


def usable_cores():
    """The cores this process may run on: its CPU affinity (taskset, a batch scheduler's cgroup), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cores(cores):
    """How many of this process's `cores` other work keeps busy: the last minute's load average, which counts the
    whole machine's runnable processes, as a share of the machine's cores. 0 where there is none (Windows). Right
    after other work ends it still counts for a while: a minute's average."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0
    return min(cores, load * cores / max(os.cpu_count() or cores, cores))


def set_cpu_threads(processes=1, setting=0):
    """torch's intra-op threads: the CPU_THREADS `setting`, else OMP_NUM_THREADS, else cpu_threads(); returns how
    many, and why, for the device line: where the machine's load made them fewer, with the figures and the way to
    take more."""
    if setting:
        torch.set_num_threads(setting)
        return f"{setting} thread{'s' if setting > 1 else ''} (CPU_THREADS setting)"
    cores = usable_cores()
    busy = busy_cores(cores)
    n = cpu_threads(cores, processes, os.environ, TORCH_THREADS, busy)
    if n is None:
        return f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''} (OMP_NUM_THREADS)"
    torch.set_num_threads(n)
    quiet = cpu_threads(cores, processes, os.environ, TORCH_THREADS)
    why = f"{cores} core{'s' if cores > 1 else ''} / {processes} process{'es' if processes > 1 else ''}"
    if quiet < cores // processes:
        why += f", torch's default {TORCH_THREADS}"
    if n < quiet:
        why += (f"; other work keeps {busy:.1f} of the cores busy (load average {os.getloadavg()[0]:.1f}), and "
                f"threads that wait for a core slow every step: {n} rather than {quiet}; --cpu_threads={quiet} "
                f"takes {quiet}")
    return f"{n} thread{'s' if n > 1 else ''} ({why})"


# ---------------------------------------------------------------------------------------------------------------------
# memory

def keep_freed_memory():
    """On CPU, glibc hands every freed allocation over 32 MB (logits, gradients) straight back to the OS, and the next step
    page-faults the same sizes back in, zero-filled: a fifth of a distilgpt2 step here. Keep them in the heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocations up to 1 GB come from the heap, not fresh mappings
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: give memory back only when 1 GB is free at the top
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        pass


def return_freed_memory():
    """FSDP on a CPU wants the opposite: its gathered weights and reduced gradients are freed layer by layer, every
    step, and kept in the heap they fragment it until a rank takes DDP's memory (GPT-2 124M on 2 ranks: 2.5 GB of
    RSS for 0.7 GB of tensors). Allocations over 1 MB come from fresh mappings again and go back to the OS when freed,
    which halves the memory and costs the page faults keep_freed_memory saves."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, fixed (glibc raises it as it goes, unless it is set)
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_rss_mb():
    """This process's own peak resident memory, in MB: VmHWM where Linux's /proc is. Not ru_maxrss there: Linux
    carries that over from the parent across fork and exec, so a script started by a big process (a test, a
    benchmark) said its parent's peak. Elsewhere ru_maxrss, which macOS does not carry over."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)


def peak_memory_mb(device):
    """The peak since reset_peak_memory: allocated on CUDA, this process's resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mb()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the process's peak resident size to its current size
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def available_memory(device, processes=1):
    """(bytes this process can still take on `device`, where that figure is from), or (None, why) where unknown.
    CPU: MemAvailable, or the cgroup's limit where lower (a container's), shared among the `processes` ranks on this
    machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    figures = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            figures.append(int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024)
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2, then v1
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            with open(f"/sys/fs/cgroup/{limit}") as f, open(f"/sys/fs/cgroup/{usage}") as g:
                figures.append(int(f.read()) - int(g.read()))  # "max" (no limit) is a ValueError
    if not figures:
        return None, "unknown"  # not Linux: no check
    return min(figures) // processes, "available RAM" + (f" / {processes} processes" if processes > 1 else "")
