"""The bundled model and our engine's logits over a sequence, for engine and placement tests."""
from __future__ import annotations

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
