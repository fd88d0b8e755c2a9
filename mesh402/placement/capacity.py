"""Capacity, stage bytes and KV budgets: each rule is defined here once.

* A node's weight capacity is ``min(--max-vram x 10^9, detected usable memory)``.
* A stage fits when ``bytes x 1.1 <= capacity`` (checked in integers: ``bytes * 11 <= capacity * 10``).
* KV cache is not part of the weight capacity: each request reserves ``prompt + max_tokens`` tokens
  of KV when it starts, never the full context window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh402.placement.types import ModelLayout, NodeId, NodeSnapshot

__all__ = [
    "HEADROOM",
    "fits",
    "fixed_stage_bytes",
    "kv_bytes_per_token",
    "kv_tokens",
    "max_vram_bytes",
    "node_capacity",
    "request_kv_budget",
    "shared_machine_capacities",
    "stage_bytes",
    "usable_bytes",
]

# Weights need 10% headroom over their tensor bytes (allocator slack, activations, scratch).
_HEADROOM_NUM, _HEADROOM_DEN = 11, 10
HEADROOM = _HEADROOM_NUM / _HEADROOM_DEN


def max_vram_bytes(max_vram_gb: float) -> int:
    """``--max-vram`` in bytes (decimal GB: 0.08 -> 80_000_000 exactly, no float drift)."""
    if isinstance(max_vram_gb, bool) or not isinstance(max_vram_gb, (int, float)):
        raise TypeError(f"--max-vram must be a number, got {max_vram_gb!r}")
    if math.isnan(max_vram_gb) or max_vram_gb < 0:
        raise ValueError(f"--max-vram must be >= 0, got {max_vram_gb!r}")
    if math.isinf(max_vram_gb):
        raise ValueError("--max-vram must be finite (leave it unset for no limit)")
    return int(Decimal(repr(float(max_vram_gb))) * 10**9)


def node_capacity(max_vram_gb: float | None, detected_bytes: int) -> int:
    """Bytes of weights this node offers: ``min(--max-vram x 10^9, detected)``; detected if unset.

    ``detected_bytes`` is the usable memory the node measured for itself. Several nodes on one
    machine each see the whole machine, so they must be divided with ``--max-vram``; the planner
    also scales down nodes that report one ``machine_id`` and overbook it
    (:func:`shared_machine_capacities`).
    """
    if isinstance(detected_bytes, bool) or not isinstance(detected_bytes, int) or detected_bytes < 0:
        raise ValueError(f"detected_bytes must be a non-negative int, got {detected_bytes!r}")
    if max_vram_gb is None:
        return detected_bytes
    return min(max_vram_bytes(max_vram_gb), detected_bytes)


def fits(n_bytes: int, capacity: int) -> bool:
    """True when ``n_bytes`` of weights fit ``capacity`` with the 10% headroom."""
    return n_bytes * _HEADROOM_NUM <= capacity * _HEADROOM_DEN


def usable_bytes(capacity: int) -> int:
    """The largest byte count that :func:`fits` ``capacity``."""
    return max(0, capacity) * _HEADROOM_DEN // _HEADROOM_NUM


def shared_machine_capacities(nodes: Iterable[NodeSnapshot]) -> dict[NodeId, int]:
    """Effective capacity per node: nodes that share a ``machine_id`` share its memory.

    If the capacities of a machine's nodes add up to more than the machine's detected memory (the
    smallest ``machine_bytes`` any of them reports), each is scaled down in proportion (floor), so
    that the machine is never booked twice. Nodes without a ``machine_id`` keep their figure.
    """
    nodes = list(nodes)
    out = {n.node_id: n.capacity_bytes for n in nodes}
    groups: dict[str, list[NodeSnapshot]] = {}
    for n in nodes:
        if n.machine_id is not None:
            groups.setdefault(n.machine_id, []).append(n)
    for group in groups.values():
        reported = [n.machine_bytes for n in group if n.machine_bytes is not None]
        if not reported:
            continue
        machine = min(reported)
        booked = sum(n.capacity_bytes for n in group)
        if booked > machine:
            for n in group:
                out[n.node_id] = n.capacity_bytes * machine // booked
    return out


# ---------------------------------------------------------------------------
# stage bytes


def fixed_stage_bytes(layout: ModelLayout, first: bool, last: bool) -> int:
    """Bytes a stage holds besides its layers: embeddings if first, norm + head if last, shared always."""
    b = layout.shared_bytes
    if first:
        b += layout.embed_bytes
    if last:
        b += layout.norm_bytes
        if not (first and layout.tied):  # a single stage holds the tied matrix once
            b += layout.head_bytes
    return b


def stage_bytes(layout: ModelLayout, start: int, end: int) -> int:
    """Exact tensor bytes of a stage holding layers ``[start, end)``.

    Equal to ``GGUFMeta.stage_bytes(start, end)`` for a layout built by ``from_gguf_meta``.
    """
    if not (0 <= start < end <= layout.n_layers):
        raise ValueError(f"bad layer range [{start}, {end}) for {layout.n_layers} layers")
    return sum(layout.layer_bytes[start:end]) + fixed_stage_bytes(layout, start == 0, end == layout.n_layers)


# ---------------------------------------------------------------------------
# KV budgets


def kv_bytes_per_token(layout: ModelLayout, start: int = 0, end: int | None = None, *, dtype_bytes: int) -> int:
    """KV bytes one token takes in layers ``[start, end)``: K and V, ``n_kv_heads x head_dim`` each."""
    end = layout.n_layers if end is None else end
    if not (0 <= start < end <= layout.n_layers):
        raise ValueError(f"bad layer range [{start}, {end}) for {layout.n_layers} layers")
    if dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be >= 1, got {dtype_bytes}")
    if not (layout.n_kv_heads and layout.head_dim):
        raise ValueError(f"{layout.model_key}: layout has no KV shape (n_kv_heads/head_dim)")
    return 2 * (end - start) * layout.n_kv_heads * layout.head_dim * dtype_bytes


def kv_tokens(prompt_tokens: int, max_tokens: int, *, chunk: int | None = None) -> int:
    """Tokens of KV one request reserves: ``prompt + max_tokens``, never the whole context.

    With ``chunk`` (chunked prefill), the count is rounded up to a whole chunk plus one chunk of
    slack, the allocation rule of the engine's KV cache.
    """
    if prompt_tokens < 0 or max_tokens < 0:
        raise ValueError("token counts must be >= 0")
    n = prompt_tokens + max_tokens
    if chunk is None:
        return n
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return -(-max(n, 1) // chunk) * chunk + chunk


def request_kv_budget(prompt_tokens: int, max_tokens: int, *, kv_bytes_per_token: int,
                      chunk: int | None = None) -> int:
    """Bytes of KV to reserve for one request (see :func:`kv_tokens`)."""
    if kv_bytes_per_token < 0:
        raise ValueError("kv_bytes_per_token must be >= 0")
    return kv_tokens(prompt_tokens, max_tokens, chunk=chunk) * kv_bytes_per_token
