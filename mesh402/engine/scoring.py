"""Logprobs of a prompt's own tokens (OpenAI completions with `echo` and `logprobs`).

Runs the prompt through a throwaway session in the engine's fixed prefill chunks, keeping every row's
logits (the last stage's `logits="all"`), so a token's logprob is what the model gave it after the tokens
before it. The first token has none (nothing precedes it), as OpenAI reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .chunks import prefill_steps
from .errors import EngineError
from .sampling import TokenLogprob, token_logprobs

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine


@torch.inference_mode()
def prompt_logprobs(engine: Engine, token_ids: Sequence[int], top_n: int = 0) -> list[TokenLogprob | None]:
    """Per prompt token: its logprob given the tokens before it (None for the first), with `top_n` alternatives."""
    ids = [int(t) for t in token_ids]
    if not ids:
        return []
    if not engine.is_full_model:
        raise EngineError("prompt logprobs need the whole model on this node")
    C, dev = engine.prefill_chunk, engine.device
    out: list[TokenLogprob | None] = [None]
    with engine.new_session(len(ids)) as s:
        for i, n in prefill_steps(0, len(ids), C):
            x: torch.Tensor = torch.tensor(ids[i:i + n] + [0] * (C - n), dtype=torch.long, device=dev)
            for st, kv in zip(engine.stages, s.kvs):
                x = st.forward(kv, x, i, n_real=n, logits="all" if st.last else "last")
            for r in range(n):
                j = i + r + 1  # row r predicts the token after it
                if j < len(ids):
                    out.append(token_logprobs(x[r], ids[j], top_n))
    return out
