"""The bundled model and our engine's logits over a sequence, for engine and placement tests."""
from __future__ import annotations

import os
from pathlib import Path

from mesh402.models.catalog import bundled_model_path


def smollm2_gguf() -> Path:
    """The bundled SmolLM2 GGUF; a missing package fails with the command that installs it."""
    return bundled_model_path()


def our_logits(path, seq: list[int], n_prompt: int, mode: str = "exact"):
    """(logits after the prefill of seq[:n_prompt] and after each decode of the rest, stacked; the engine)."""
    import torch

    from mesh402.engine import Engine

    eng = Engine.load(path, mode=mode, load_tokenizer=False)
    s = eng.new_session(len(seq) + 1)
    out = [s.prefill(seq[:n_prompt])]
    for t in seq[n_prompt:]:
        out.append(s.decode(t))
    s.close()
    return torch.stack(out), eng


def accel_device(monkeypatch) -> str:
    """Where a test of fast mode's accelerator path (engine.accel) runs: the GPU that MESH402_TEST_DEVICE
    names (benchmarks/device.sh sets it on a GPU machine), else the path's CPU twin (fp32 compute)."""
    import pytest
    import torch

    dev = os.environ.get("MESH402_TEST_DEVICE", "cpu")
    if dev == "cpu":
        monkeypatch.setenv("MESH402_FAST_KERNELS", "twin")
    elif dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"MESH402_TEST_DEVICE={dev} but torch sees no CUDA device")
    return dev


def load_engine(path, mode: str, monkeypatch=None, **kw):
    """Engine.load for a test mode: "exact", "fast", or "accel" (fast mode on the accelerator path: see
    accel_device)."""
    from mesh402.engine import Engine

    if mode == "accel":
        return Engine.load(path, mode="fast", device=accel_device(monkeypatch), **kw)
    return Engine.load(path, mode=mode, **kw)
