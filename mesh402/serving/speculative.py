"""Lossless speculative decoding: drafts verified in one batched forward, accepted while the sampler agrees.

A draft proposes the next k tokens; the model runs the last sampled token and the k drafts as k+1 rows of one
step (``Engine.decode_batch``: every row bit-identical to the 1-row decode it stands for), and each row's
logits are sampled exactly as plain decoding samples that position ((seed, position)-keyed draws over the same
history). Drafts are accepted while the draw equals them; the first draw that differs (or the draw after the
last draft) is the next token, and the KV past the accepted rows is rolled back. So the output is plain
decoding's, token for token, greedy or sampled; only the number of forwards changes.

Drafts here: prompt lookup (n-gram): the continuation of the latest earlier occurrence of the history's last
n tokens (no second model).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ngram_draft"]


def ngram_draft(history: Sequence[int], k: int, max_n: int = 3, window: int = 4096) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n (max_n..1) tokens of
    ``history`` (searched over its last ``window`` tokens); [] when none."""
    if k < 1 or len(history) < 2:
        return []
    h = list(history[-window:])
    for n in range(min(max_n, len(h) - 1), 0, -1):
        tail = h[-n:]
        for i in range(len(h) - n - 1, -1, -1):  # latest earlier occurrence first
            if h[i:i + n] == tail:
                return h[i + n:i + n + k]
    return []
