"""Inference engine core: GGUF / safetensors loading, quantized weights, stages, KV cache.

Public interface::

    eng = Engine.load(path, mode="exact" | "fast", device="cpu", layers=None,
                      max_sessions=16, prefill_chunk=32)
    s = eng.new_session(max_len)        # ContextTooLong / EngineFull
    logits = s.prefill(ids); logits = s.decode(tok); s.truncate(n); s.close()

Pipeline stages: ``Stage.load(path, layers=(a, b), mode, device)``,
``stage.new_kv(max_len)``, ``stage.forward(kv, x, start_pos)``.

No networking here.
"""

from .engine import Engine, ModelInfo, Session
from .errors import ContextTooLong, EngineError, EngineFull
from .kv import KVCache
from .model import Stage

__all__ = ["ContextTooLong", "Engine", "EngineError", "EngineFull", "KVCache", "ModelInfo", "Session", "Stage"]
