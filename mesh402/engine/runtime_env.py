"""Process-wide torch settings for a node: how many threads one node's engine may use."""

from __future__ import annotations


def configure_torch(threads: int) -> None:
    """Several nodes may share one machine, so each node runs torch with a fixed small thread count."""
    from .engine import _trim_heap

    _trim_heap()  # pins glibc's mmap threshold before the first load (less fragmentation)
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work; harmless afterwards
        pass


def detected_memory_bytes(device: str) -> int:
    """Usable memory for weights on `device`: free accelerator memory, or available system RAM on CPU."""
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(int(device.split(":")[1]) if ":" in device else 0)
        return int(free)
    import psutil

    # MPS shares system memory with the CPU, so both read the same figure.
    return int(psutil.virtual_memory().available)
