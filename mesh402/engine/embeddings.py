"""Pooled sentence embeddings from embedding models (OpenAI `/v1/embeddings`).

An embedding model is a decoder the engine already runs (e.g. Qwen3-Embedding: architecture qwen3) whose
files say how to pool its final hidden states:
- GGUF: ``<arch>.pooling_type`` (llama.cpp's enum: 1 mean, 2 cls, 3 last; 0 none and 4 rank are not
  embedding models: a chat model, a reranker);
- Hugging Face folder: sentence-transformers' ``1_Pooling/config.json`` (``pooling_mode_*``).
A model without either is a chat model (`pooling_of` returns None; the API answers 400).

The vector is the final RMS-normed hidden state (what llama.cpp and transformers' base model return),
pooled over the input's tokens, then L2-normalised (as llama.cpp's server and sentence-transformers'
Normalize do). Prefill runs in the engine's fixed chunks, so a text embeds to the same bits whatever
else the node is doing. Attention is causal, as these decoders are trained; a GGUF that asks for
bidirectional attention (``<arch>.attention.causal = false``) is refused rather than embedded wrongly.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import torch

from .chunks import prefill_steps
from .errors import EngineError
from .weights import GGUFSource, HFSource

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine


class Pooling(str, Enum):
    MEAN = "mean"
    CLS = "cls"
    LAST = "last"


_GGUF_POOLING = {1: Pooling.MEAN, 2: Pooling.CLS, 3: Pooling.LAST}  # llama.cpp's llama_pooling_type
_ST_POOLING = {"pooling_mode_lasttoken": Pooling.LAST, "pooling_mode_mean_tokens": Pooling.MEAN,
               "pooling_mode_cls_token": Pooling.CLS}


class NotAnEmbeddingModel(EngineError):
    """The loaded model declares no pooling: it is a chat/completion model."""


def pooling_of(engine: Engine) -> Pooling | None:
    """How this model's embeddings are pooled, or None for a chat model."""
    src = engine.source
    if isinstance(src, GGUFSource):
        arch = src.meta.architecture
        if src.meta.get(f"{arch}.attention.causal") is False:
            raise NotImplementedError("bidirectional (non-causal) embedding models are not supported")
        kind = src.meta.get(f"{arch}.pooling_type")
        return _GGUF_POOLING.get(int(kind)) if kind is not None else None
    if isinstance(src, HFSource):
        cfg = src.path / "1_Pooling" / "config.json"
        if cfg.is_file():
            flags = json.loads(cfg.read_text(encoding="utf-8"))
            return next((p for key, p in _ST_POOLING.items() if flags.get(key)), None)
    return None


def is_embedding_model(engine: Engine) -> bool:
    return pooling_of(engine) is not None


@torch.inference_mode()
def hidden_states(engine: Engine, token_ids: Sequence[int]) -> torch.Tensor:
    """Final-normed hidden states [n, hidden] (fp32) of `token_ids`, run in a throwaway session."""
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("an embedding input needs at least one token")
    if not engine.is_full_model:
        raise EngineError(f"this engine holds only layers {engine.layers!r}")
    V = engine.config.vocab_size
    if min(ids) < 0 or max(ids) >= V:
        raise ValueError(f"token id out of range [0, {V})")
    C, dev = engine.prefill_chunk, engine.device
    rows: list[torch.Tensor] = []
    with engine.new_session(len(ids)) as s:
        for i, n in prefill_steps(0, len(ids), C):  # fixed chunk boundaries, padded to C rows
            x: torch.Tensor = torch.tensor(ids[i:i + n] + [0] * (C - n), dtype=torch.long, device=dev)
            for st, kv in zip(engine.stages, s.kvs):
                x = st.forward(kv, x, i, n_real=n, logits="hidden" if st.last else "last")
            rows.append(x[:n].float().cpu())
    return torch.cat(rows)


def pool(h: torch.Tensor, pooling: Pooling, normalize: bool = True) -> torch.Tensor:
    """One vector from hidden states [n, hidden]."""
    if pooling is Pooling.LAST:
        v = h[-1]
    elif pooling is Pooling.CLS:
        v = h[0]
    else:  # sequential float64 sum: no thread-count-dependent reduction order
        v = (torch.cumsum(h.double(), 0)[-1] / h.shape[0]).float()
    if normalize:
        v = v / torch.clamp(torch.linalg.vector_norm(v.double()), min=1e-12).float()
    return v


def embed(engine: Engine, token_ids: Sequence[int], *, normalize: bool = True) -> torch.Tensor:
    """The embedding (fp32 [hidden]) of one tokenized input. Raises NotAnEmbeddingModel for chat models."""
    pooling = pooling_of(engine)
    if pooling is None:
        raise NotAnEmbeddingModel("this model is not an embedding model (its files declare no pooling)")
    return pool(hidden_states(engine, token_ids), pooling, normalize)


def embed_batch(engine: Engine, inputs: Sequence[Sequence[int]], *, normalize: bool = True) -> list[torch.Tensor]:
    """Embeddings of several tokenized inputs (OpenAI batch input), each computed alone (no padding
    across inputs, so a text's vector does not depend on its batch)."""
    return [embed(engine, ids, normalize=normalize) for ids in inputs]


def to_base64(vector: torch.Tensor) -> str:
    """OpenAI `encoding_format: "base64"`: little-endian float32 bytes, base64."""
    return base64.b64encode(vector.detach().cpu().numpy().astype("<f4").tobytes()).decode("ascii")


def from_base64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")
