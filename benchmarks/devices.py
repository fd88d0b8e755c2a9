"""The `--device` option of benchmarks/engine.py and benchmarks/split.py: checking it, timing GPU work, GPU memory.

- The device is checked once, before any worker process or node starts: a machine without CUDA then fails with
  one line naming the reason, not with a traceback from inside an engine load in a subprocess.
- CUDA runs kernels asynchronously: a clock read right after a call can time the launch, not the work, so each
  timed region of GPU work ends with `sync` (a no-op on "cpu").
- GPU memory is torch's own count (`torch.cuda.max_memory_allocated`): what the engine's tensors held, without
  the CUDA context or the caching allocator's slack. Node processes are read from outside, through nvidia-smi
  (their whole use, the CUDA context included).

On "cpu" every helper here does nothing or returns nothing, so a CPU run does the same work it did before the
option existed, and writes the same result files.
"""

from __future__ import annotations

import subprocess
from typing import Any

MIB = 2**20


def is_cuda(device: str) -> bool:
    return device.split(":")[0] == "cuda"


def device_problem(device: str) -> str | None:
    """Why `device` cannot run here (None: it can). Imports torch only for a non-CPU device."""
    if device == "cpu":
        return None
    kind, _, index = device.partition(":")
    if kind != "cuda" or (":" in device and not index.isdigit()):
        return f"--device must be cpu, cuda or cuda:N (got {device!r})"
    import torch

    if torch.version.cuda is None:
        return f"--device {device}: this torch ({torch.__version__}) was built without CUDA"
    if not torch.cuda.is_available():
        return f"--device {device}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    if index and int(index) >= torch.cuda.device_count():
        return f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)"
    return None


def require_device(device: str) -> None:
    """Exit with one line on stderr (status 2, as argparse does for a bad option) when `device` cannot run."""
    why = device_problem(device)
    if why:
        import sys

        print(f"error: {why}", file=sys.stderr)
        raise SystemExit(2)


def tag(device: str) -> str:
    """The device's part of a result file's name: "" on cpu (names as before), "cuda", "cuda1"."""
    return "" if device == "cpu" else device.replace(":", "")


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU, whose work is done when a call returns."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def describe(device: str) -> dict[str, Any]:
    """What a result file records about a GPU run: the card, the torch and CUDA versions."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"device": device, "gpu": props.name, "gpu_memory_mib": props.total_memory / MIB,
            "sm_count": props.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda}


class GpuMemory:
    """torch's allocated bytes on a CUDA device, relative to a baseline taken after the CUDA context exists
    (its set-up is the process's cost, not the model's, as the RSS baseline after warm_up is on the CPU)."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        torch.zeros(1, device=self.device)  # creates the context and the allocator's first pool
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def now_mib(self) -> float:
        import torch

        return (torch.cuda.memory_allocated(self.device) - self.base) / MIB

    def peak_mib(self) -> float:
        """The peak since the last `reset_peak` (or since the baseline)."""
        import torch

        return (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB

    def reset_peak(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)


def process_gpu_mib(pids: list[int]) -> dict[int, float] | None:
    """GPU memory each of these processes uses (nvidia-smi; the CUDA context included), or None where
    nvidia-smi cannot tell (not installed, or a sandbox that hides other processes' use)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    used: dict[int, float] = {}
    for line in out.stdout.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().replace(".", "", 1).isdigit():
            used[int(pid)] = used.get(int(pid), 0.0) + float(mib)
    found = {p: used[p] for p in pids if p in used}
    return found or None
