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


def warm_up() -> None:
    """Run each kernel family once on tiny inputs, so one-off library set-up (oneDNN/MKL buffers,
    op dispatch tables) is not counted as the memory or time of the first model loaded."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(4, 64)
    F.linear(x, torch.randn(32, 64))
    xb = x.to(torch.bfloat16)
    if hasattr(torch, "_weight_int8pack_mm"):
        torch._weight_int8pack_mm(xb, torch.zeros(32, 64, dtype=torch.int8), torch.ones(32, dtype=torch.bfloat16))
    if hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        packed = torch._convert_weight_to_int4pack_for_cpu(torch.zeros(32, 64, dtype=torch.int32), 1)
        torch._weight_int4pack_mm_for_cpu(xb, packed, 32, torch.zeros(2, 32, 2, dtype=torch.bfloat16))
    q = torch.randn(1, 2, 4, 16)
    F.scaled_dot_product_attention(q, q, q)
    F.rms_norm(x, (64,))
    from .fast_loop import script
    from .quant import fast_mm

    script(fast_mm)  # TorchScript's one-off set-up (~3 MiB), which fast mode's first stage would otherwise pay
