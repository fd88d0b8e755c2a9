"""Work units: the compute a pipeline stage did, derived from the model's tensor shapes (never from a
node's self-reported speed).

    flops_per_token(stage [s, e)) = 2 · Σ elements of the weight matrices the stage multiplies by
        (layers s..e-1; the lm_head on the last stage: output.weight, or the tied token embedding)
    work_units(stage, request)    = flops_per_token(stage) · tokens the stage processed
                                    (prompt tokens in prefill + one per decode step)

Matrices are tensors of rank >= 2. An embedding lookup is a gather, not a matmul, and counts 0; norms
and biases (rank 1) are negligible and count 0. For mixture-of-experts tensors (`*_exps`, expert-major,
rank 3) only the routed share counts: elements · experts_used / expert_count. The attention score and
value products (2 · 2 · n_heads · head_dim · context per layer) depend on the context length, not on
the weights, and are left out, so the same stage earns the same per token at every position.

An MoE model split by experts (docs/moe.md) is counted by what each node ran, not by the routed share:

    trunk_flops_per_token     = flops_per_token(all layers) without the routed experts (`*_exps`)
    expert_flops_per_row(l)   = 2 · elements of one expert's gate + up + down matrices at layer l
    units(host)               = trunk_flops_per_token · tokens + Σ its local experts' rows · expert_flops_per_row
    units(expert node)        = Σ over (layer, expert) of rows · expert_flops_per_row(layer)

With top-k routing every token puts k rows through each MoE layer, so the nodes' units sum to
flops_per_token(all layers) · tokens, what a single node earns for the same request.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable


def _matmul_elements(t: Any, expert_count: int, expert_used: int) -> Fraction:
    if len(t.shape) < 2:
        return Fraction(0)
    n = Fraction(t.n_elements)
    if "_exps." in t.name and expert_count > 0:
        n = n * expert_used / expert_count
    return n


def _routed(t: Any) -> bool:
    return "_exps." in t.name


def _stage_elements(meta: Any, start: int, end: int, *, routed: bool = True) -> Fraction:
    if not (0 <= start < end <= meta.n_layers):
        raise ValueError(f"bad layer range [{start}, {end}) for {meta.n_layers} layers")
    total = Fraction(0)
    for t in meta.stage_tensors(start, end):
        if t.layer is not None and (routed or not _routed(t)):
            total += _matmul_elements(t, meta.expert_count, meta.expert_used_count)
    if end == meta.n_layers:
        head = meta.tensor("output.weight") or meta.tensor("token_embd.weight")
        if head is not None:
            total += Fraction(head.n_elements)
    return total


def flops_per_token(meta: Any, start: int, end: int) -> int:
    """Multiply-add FLOPs per token for a stage holding layers [start, end) of a GGUF model (GGUFMeta)."""
    return int(2 * _stage_elements(meta, start, end))


def trunk_flops_per_token(meta: Any) -> int:
    """FLOPs per token of the whole model without its routed experts: what an MoE expert-parallel host
    computes for every token (attention, routers, shared experts, lm_head)."""
    return int(2 * _stage_elements(meta, 0, meta.n_layers, routed=False))


def expert_flops_per_row(meta: Any, layer: int) -> int:
    """FLOPs of one routed expert of `layer` on one token row: 2 · the elements of its gate, up and down
    matrices (`ffn_{gate,up,down}_exps` are expert-major, so one expert holds 1/expert_count of each)."""
    total = 0
    for kind in ("gate", "up", "down"):
        t = meta.tensor(f"blk.{layer}.ffn_{kind}_exps.weight")
        if t is not None and meta.expert_count > 0:
            total += t.n_elements // meta.expert_count
    return 2 * total


@dataclass(frozen=True)
class MoEFlops:
    """Per-model FLOPs table of an expert-parallel split: trunk per token and one expert's per row, by layer."""
    trunk: int
    per_row: dict[int, int]

    def units(self, trunk_tokens: int, rows: Iterable[tuple[int, int, int]]) -> int:
        """Work units of a node that ran the trunk for `trunk_tokens` tokens and (layer, expert, rows)."""
        return self.trunk * int(trunk_tokens) + sum(self.per_row.get(int(la), 0) * int(n) for la, _, n in rows)


def moe_flops(meta: Any) -> MoEFlops:
    """The MoEFlops of a GGUF model (GGUFMeta); layers without routed experts are absent from per_row."""
    per_row = {la: f for la in range(meta.n_layers) if (f := expert_flops_per_row(meta, la))}
    return MoEFlops(trunk_flops_per_token(meta), per_row)


def stage_work_units(meta: Any, start: int, end: int, tokens: int) -> int:
    return flops_per_token(meta, start, end) * int(tokens)


class FlopsTable:
    """flops_per_token memoised per (model hash, layer range), for the entry node's epoch accounting."""

    def __init__(self) -> None:
        self._metas: dict[str, Any] = {}
        self._cache: dict[tuple[str, int, int], int] = {}

    def add_model(self, model_hash: str, meta: Any) -> None:
        self._metas[model_hash] = meta

    def flops(self, model_hash: str, start: int, end: int) -> int:
        key = (model_hash, start, end)
        if key not in self._cache:
            if model_hash not in self._metas:
                raise KeyError(f"unknown model {model_hash[:16]}: add its GGUF metadata first")
            self._cache[key] = flops_per_token(self._metas[model_hash], start, end)
        return self._cache[key]


def split_pro_rata(amount: int, units: dict[str, int]) -> dict[str, int]:
    """`amount` (atomic token units) split in proportion to `units`, exactly: the integer shares sum to
    `amount`; the remainder of the floor division goes one unit each to the largest fractional parts
    (ties broken by key, so every node computes the same split)."""
    amount = int(amount)
    positive = {k: int(v) for k, v in units.items() if int(v) > 0}
    if amount <= 0 or not positive:
        return {k: 0 for k in units}
    total = sum(positive.values())
    base = {k: amount * v // total for k, v in positive.items()}
    rest = amount - sum(base.values())
    order = sorted(positive, key=lambda k: (-((amount * positive[k]) % total), k))
    for k in order[:rest]:
        base[k] += 1
    return {k: base.get(k, 0) for k in units}


def opow_weights(shares: dict[str, dict[str, float]], *, imbalance_multiplier: float = 3.0) -> dict[str, float]:
    """Optional OPOW-style influence with an imbalance penalty (after TIG): `shares[node][c]` is the node's
    fraction of the work on challenge c (e.g. a model or a layer slot). A node's weight is
    avg · exp(-m · imbalance), imbalance = var / (avg · (1 - avg)) over its fractions; weights are
    normalised to sum to 1. With a single challenge the imbalance is 0 and the weights equal the shares."""
    import math
    challenges = sorted({c for s in shares.values() for c in s})
    if not challenges:
        return {}
    raw: dict[str, float] = {}
    for node, s in shares.items():
        f = [float(s.get(c, 0.0)) for c in challenges]
        avg = sum(f) / len(f)
        var = sum((x - avg) ** 2 for x in f) / len(f)
        imb = var / (avg * (1 - avg)) if 0 < avg < 1 else 0.0
        raw[node] = avg * math.exp(-imbalance_multiplier * imb)
    z = sum(raw.values())
    return {k: (v / z if z > 0 else 0.0) for k, v in raw.items()}


def expert_pay_shares(meta: Any, experts: Iterable[tuple[int, int]],
                      copies: dict[tuple[int, int], int] | None = None) -> tuple[Fraction, Fraction]:
    """What an expert node earns of a request's price, as fractions of the whole model's work per token:
    (expected share: its experts' routed FLOPs under uniform routing, each expert held by `copies` nodes split
    between them; per-row share: one row of the cheapest MoE layer's expert). Summed over the nodes of a split,
    the expected shares never exceed the routed experts' part of a token, and k rows per MoE layer at the
    per-row share never exceed it either, so an entry paying every expert node by them never pays out more
    than the request earned."""
    total = flops_per_token(meta, 0, meta.n_layers)
    if total <= 0 or meta.expert_count <= 0:
        return Fraction(0), Fraction(0)
    k, n = meta.expert_used_count, meta.expert_count
    share = Fraction(0)
    for la, e in experts:
        row = expert_flops_per_row(meta, int(la))
        share += Fraction(row * k, n * max(1, (copies or {}).get((int(la), int(e)), 1)))
    rows = [f for la in range(meta.n_layers) if (f := expert_flops_per_row(meta, la))]
    return share / total, Fraction(min(rows), total) if rows else Fraction(0)
