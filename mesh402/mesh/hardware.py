"""Hardware facts for the announcement, without torch.

The mesh only knows what psutil can tell; the Node (which may ask the
engine about GPUs) passes richer facts in through ``MeshService.update_local``.
"""

from __future__ import annotations

import os

from mesh402.mesh.proto import mesh_pb2 as pb


def default_hardware() -> pb.Hardware:
    h = pb.Hardware(device_kind="cpu", cpu_cores=os.cpu_count() or 1)
    try:
        import psutil

        h.ram_bytes = int(psutil.virtual_memory().available)
        h.cpu_cores = psutil.cpu_count(logical=True) or h.cpu_cores
    except Exception:  # pragma: no cover - psutil is a dependency
        pass
    return h


def hardware_from_dict(d: dict) -> pb.Hardware:
    """Build from a plain dict (e.g. what the engine reports); unknown keys ignored."""
    h = default_hardware()
    for k in ("device_kind", "gpu_name"):
        if d.get(k):
            setattr(h, k, str(d[k]))
    for k in ("vram_bytes", "ram_bytes", "gpu_count", "cpu_cores"):
        if d.get(k) is not None:
            setattr(h, k, int(d[k]))
    for k in ("mem_bandwidth_gbps", "compute_tflops"):
        if d.get(k) is not None:
            setattr(h, k, float(d[k]))
    return h
