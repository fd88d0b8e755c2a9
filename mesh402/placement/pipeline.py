"""Solo or pipeline placement of one dense model: a pure, deterministic function of the snapshot.

``plan_model`` elects the host; if the whole model fits the host it runs solo. Otherwise it
searches pipelines (host first, then peers within the RTT cap of the host), gives each ordered
candidate its layers by exact bytes (speed-weighted water-filling, capacity-weighted when no
speed is known), and keeps the one with the lowest estimated per-token latency:

    latency = sum over stages of (bytes the stage reads per token / speed)
            + sum over the ring of hops (host -> s1 -> ... -> s_last -> host) of (RTT/2 + overhead)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations, permutations

from mesh402.placement.capacity import (
    fits,
    fixed_stage_bytes,
    stage_bytes,
    usable_bytes,
)
from mesh402.placement.election import elect_host, host_ranking
from mesh402.placement.types import (
    MeshSnapshot,
    ModelKey,
    ModelLayout,
    NodeId,
    Plan,
    StageAssignment,
    WaitingForCapacity,
)

__all__ = [
    "DEFAULT_MAX_SPLIT_RTT_MS",
    "CostModel",
    "SearchLimits",
    "assign_layers",
    "estimate_token_latency_ms",
    "plan_model",
    "replan",
    "split_peers",
    "standbys_for",
    "water_fill",
]

DEFAULT_MAX_SPLIT_RTT_MS = 80.0


@dataclass(frozen=True)
class CostModel:
    """Constants of the per-token latency estimate (milliseconds; speeds in GB of weights per second)."""

    default_speed_gbps: float = 10.0  # a node that reports no speed (roughly a CPU's weight streaming)
    unknown_rtt_ms: float = DEFAULT_MAX_SPLIT_RTT_MS  # a link nobody measured: the worst admissible
    hop_overhead_ms: float = 0.5  # per activation hop: framing, (de)serialisation, scheduling


@dataclass(frozen=True)
class SearchLimits:
    """Bounds that keep the split search small; all enumeration is in a fixed order."""

    max_stages: int = 8
    max_peers: int = 8  # nearest peers (by host RTT) considered for stages
    full_permutations_upto: int = 3  # subsets of at most this many peers are tried in every order
    max_evaluations: int = 4000


DEFAULT_COST = CostModel()
DEFAULT_LIMITS = SearchLimits()


# ---------------------------------------------------------------------------
# layer assignment


class _Prefix:
    """Prefix sums of layer bytes: ``bytes(b, e)`` and the furthest end a byte budget reaches."""

    __slots__ = ("n", "prefix")

    def __init__(self, layout: ModelLayout) -> None:
        self.n = layout.n_layers
        self.prefix = [0]
        for b in layout.layer_bytes:
            self.prefix.append(self.prefix[-1] + b)

    def bytes(self, start: int, end: int) -> int:
        return self.prefix[end] - self.prefix[start]

    def reach(self, start: int, budget: int) -> int:
        """The largest ``end >= start`` with ``bytes(start, end) <= budget`` (``start`` if none)."""
        if budget < 0:
            return start
        return max(start, bisect.bisect_right(self.prefix, self.prefix[start] + budget) - 1)


def water_fill(total: float, caps: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Shares ``t_i = min(cap_i, lam * w_i)`` with ``sum(t) == total`` (or ``t = caps`` if they are short).

    Zero weights get nothing; if every weight is zero they are treated as equal.
    """
    n = len(caps)
    w = [max(0.0, float(x)) for x in weights]
    if not any(w):
        w = [1.0] * n
    t = [0.0] * n
    active = [i for i in range(n) if w[i] > 0]
    remaining = float(total)
    while active and remaining > 0:
        lam = remaining / sum(w[i] for i in active)
        clamped = [i for i in active if lam * w[i] >= caps[i]]
        if not clamped:
            for i in active:
                t[i] = lam * w[i]
            break
        for i in clamped:
            t[i] = float(caps[i])
            remaining -= caps[i]
        active = [i for i in active if i not in clamped]
    return t


def _split(layout: ModelLayout, px: _Prefix, budgets: Sequence[int],
           weights: Sequence[float]) -> tuple[int, ...] | None:
    """Boundaries ``0 = b_0 < b_1 < ... < b_k = L`` so that stage ``i``'s layers fit ``budgets[i]``.

    Exact: ``ok[i][b]`` says whether layers ``[b, L)`` can be packed contiguously into stages
    ``i..k-1`` (each >= 1 layer); it is computed backwards, so a split exists iff ``ok[0][0]``.
    Walking forwards, each boundary is the feasible one nearest the water-filling target.
    """
    n, k = px.n, len(budgets)
    if k > n:
        return None
    ok: list[bytearray] = [bytearray(n + 1) for _ in range(k + 1)]
    ok[k][n] = 1
    for i in range(k - 1, -1, -1):
        nxt = ok[i + 1]
        count = [0] * (n + 2)  # count[j] = number of feasible boundaries < j in stage i+1
        for j in range(n + 1):
            count[j + 1] = count[j] + nxt[j]
        cur = ok[i]
        for b in range(n):
            end = px.reach(b, budgets[i])
            if end > b and count[end + 1] - count[b + 1] > 0:
                cur[b] = 1
        if not any(cur):
            return None
    if not ok[0][0]:
        return None

    mean = px.bytes(0, n) / n
    caps = [max(0, b) / mean if mean > 0 else math.inf for b in budgets]
    targets = water_fill(n, caps, weights)
    bounds = [0]
    acc = 0.0
    for i in range(k - 1):
        acc += targets[i]
        b = bounds[-1]
        end = px.reach(b, budgets[i])
        choices = [x for x in range(b + 1, end + 1) if ok[i + 1][x]]
        bounds.append(min(choices, key=lambda x: (abs(x - acc), x)))
    bounds.append(n)
    return tuple(bounds)


def _layer_budgets(layout: ModelLayout, capacities: Sequence[int]) -> list[int]:
    k = len(capacities)
    return [usable_bytes(c) - fixed_stage_bytes(layout, i == 0, i == k - 1) for i, c in enumerate(capacities)]


def assign_layers(layout: ModelLayout, capacities: Sequence[int],
                  speeds: Sequence[float | None] | None = None) -> tuple[tuple[int, int], ...] | None:
    """Contiguous layer ranges for stages in this order, or None if they cannot hold the model.

    Every range has >= 1 layer and its exact stage bytes fit the stage's capacity (x1.1 headroom).
    Layers go in proportion to ``speeds`` where any is known (unknown ones count as the
    :class:`CostModel` default), else in proportion to the bytes each stage has left for layers,
    capped by what fits (water-filling).
    """
    budgets = _layer_budgets(layout, capacities)
    if speeds is not None and any(s is not None for s in speeds):
        weights = [DEFAULT_COST.default_speed_gbps if s is None else float(s) for s in speeds]
    else:
        weights = [float(max(0, b)) for b in budgets]
    bounds = _split(layout, _Prefix(layout), budgets, weights)
    if bounds is None:
        return None
    return tuple(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------
# cost


def _rtt(snapshot: MeshSnapshot, a: NodeId, b: NodeId, cost: CostModel) -> float:
    ms = snapshot.rtt(a, b)
    return cost.unknown_rtt_ms if ms is None else ms


def _speed(snapshot: MeshSnapshot, node: NodeId, cost: CostModel) -> float:
    s = snapshot.node(node).speed_gbps
    return cost.default_speed_gbps if s is None else s


def _latency(layout: ModelLayout, px: _Prefix, order: Sequence[NodeId], bounds: Sequence[int],
             snapshot: MeshSnapshot, cost: CostModel) -> float:
    k = len(order)
    compute = 0.0
    for i, node in enumerate(order):
        read = px.bytes(bounds[i], bounds[i + 1]) + (layout.head_bytes if i == k - 1 else 0)
        compute += read / (_speed(snapshot, node, cost) * 1e6)  # GB/s == 1e6 bytes per ms
    hops = 0.0
    if k > 1:
        for i in range(k):
            hops += _rtt(snapshot, order[i], order[(i + 1) % k], cost) / 2 + cost.hop_overhead_ms
    return compute + hops


def estimate_token_latency_ms(layout: ModelLayout, stages: Sequence[StageAssignment], snapshot: MeshSnapshot,
                              cost: CostModel = DEFAULT_COST) -> float:
    """The cost model's per-token latency for these stages (in pipeline order, host first)."""
    bounds = [s.start for s in stages] + [stages[-1].end]
    return _latency(layout, _Prefix(layout), [s.node_id for s in stages], bounds, snapshot, cost)


# ---------------------------------------------------------------------------
# candidates


def split_peers(model_key: ModelKey, snapshot: MeshSnapshot, host: NodeId, *,
                max_split_rtt_ms: float | None = DEFAULT_MAX_SPLIT_RTT_MS,
                allow_transfer: bool = False) -> tuple[NodeId, ...]:
    """Peers that may take a stage of the host's split, nearest first.

    Not the host, not a client, capacity > 0, the model on disk (or ``allow_transfer``), and RTT to
    the host within ``max_split_rtt_ms`` (None: no cap). A peer whose RTT nobody measured is kept
    but sorted after every measured one. Order: (RTT unknown, RTT, model missing, node id).
    """
    out = []
    for n in snapshot.nodes:
        nid = n.node_id
        if nid == host or not n.can_serve or snapshot.capacity(nid) <= 0:
            continue
        on_disk = model_key in n.models_on_disk
        if not (on_disk or allow_transfer):
            continue
        rtt = snapshot.rtt(host, nid)
        if rtt is not None and max_split_rtt_ms is not None and rtt > max_split_rtt_ms:
            continue
        out.append((rtt is None, rtt or 0.0, not on_disk, nid))
    return tuple(x[-1] for x in sorted(out))


def standbys_for(model_key: ModelKey, snapshot: MeshSnapshot, used: Iterable[NodeId]) -> tuple[NodeId, ...]:
    """Nodes with capacity and the model on disk that hold no part of it, in host-election order."""
    used = set(used)
    return tuple(n for n in host_ranking(model_key, snapshot) if n not in used)


def _orders(host: NodeId, subset: tuple[NodeId, ...], snapshot: MeshSnapshot, limits: SearchLimits,
            cost: CostModel) -> Iterator[tuple[NodeId, ...]]:
    if len(subset) <= limits.full_permutations_upto:
        for p in permutations(subset):
            yield (host, *p)
        return
    seen: set[tuple[NodeId, ...]] = set()
    # 1. nearest to the host first (the candidate order)
    candidates = [subset]
    # 2. nearest-neighbour chain starting at the host
    chain, left, at = [], list(subset), host
    while left:
        nxt = min(left, key=lambda p: (_rtt(snapshot, at, p, cost), p))
        chain.append(nxt)
        left.remove(nxt)
        at = nxt
    candidates.append(tuple(chain))
    # 3. the largest peer last (the last stage also holds the head)
    big = max(subset, key=lambda p: (snapshot.capacity(p), p))
    candidates.append(tuple(p for p in subset if p != big) + (big,))
    for c in candidates:
        if c not in seen:
            seen.add(c)
            yield (host, *c)


# ---------------------------------------------------------------------------
# planning


def _fmt(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def plan_model(model_key: ModelKey, layout: ModelLayout, snapshot: MeshSnapshot, *, epoch: int,
               max_split_rtt_ms: float | None = DEFAULT_MAX_SPLIT_RTT_MS, allow_transfer: bool = False,
               cost: CostModel = DEFAULT_COST, limits: SearchLimits = DEFAULT_LIMITS) -> Plan | WaitingForCapacity:
    """Where ``model_key`` runs: solo on its host if it fits, else the cheapest pipeline that fits.

    Deterministic: the same snapshot (in any node order) gives the same result on every node.
    """
    if layout.model_key != model_key:
        raise ValueError(f"layout is for {layout.model_key!r}, not {model_key!r}")
    if epoch < 0:
        raise ValueError("epoch must be >= 0")
    n_layers = layout.n_layers
    total = layout.total_bytes
    host = elect_host(model_key, snapshot)
    if host is None:
        return WaitingForCapacity(model_key, epoch, f"no serving node has {model_key} on disk",
                                  needed_bytes=total)
    px = _Prefix(layout)
    host_cap = snapshot.capacity(host)
    if fits(total, host_cap):
        stages = (StageAssignment(host, 0, n_layers, total),)
        return Plan(model_key, epoch, host, stages, standbys_for(model_key, snapshot, [host]),
                    _latency(layout, px, [host], [0, n_layers], snapshot, cost))

    peers = split_peers(model_key, snapshot, host, max_split_rtt_ms=max_split_rtt_ms,
                        allow_transfer=allow_transfer)[: limits.max_peers]
    pool = (host, *peers)

    # Lower bound of the latency of any k-stage plan, to stop adding stages once it cannot win.
    compute_lb = (px.bytes(0, n_layers) + layout.head_bytes) / (max(_speed(snapshot, n, cost) for n in pool) * 1e6)
    pair_rtts = [_rtt(snapshot, a, b, cost) for a, b in combinations(pool, 2)]
    hop_lb = (min(pair_rtts) / 2 if pair_rtts else 0.0) + cost.hop_overhead_ms

    # bytes every k-stage split must place: both ends' fixed parts, shared tensors on every stage
    def needed(k: int) -> int:
        return (px.bytes(0, n_layers) + fixed_stage_bytes(layout, True, False)
                + fixed_stage_bytes(layout, False, True) + (k - 2) * layout.shared_bytes)

    best: tuple[tuple, tuple[NodeId, ...], tuple[int, ...], float] | None = None
    evaluations = 0
    max_peers_in_split = min(len(peers), limits.max_stages - 1, n_layers - 1)
    for n_peers in range(1, max_peers_in_split + 1):
        k = n_peers + 1
        if best is not None and compute_lb + k * hop_lb >= best[0][0]:
            break
        for subset in combinations(peers, n_peers):
            if sum(usable_bytes(snapshot.capacity(n)) for n in (host, *subset)) < needed(k):
                continue
            for order in _orders(host, subset, snapshot, limits, cost):
                evaluations += 1
                if evaluations > limits.max_evaluations:
                    break
                caps = [snapshot.capacity(n) for n in order]
                budgets = _layer_budgets(layout, caps)
                if any(snapshot.node(n).speed_gbps is not None for n in order):
                    weights = [_speed(snapshot, n, cost) for n in order]
                else:
                    weights = [float(max(0, b)) for b in budgets]
                bounds = _split(layout, px, budgets, weights)
                if bounds is None:
                    continue
                lat = _latency(layout, px, order, bounds, snapshot, cost)
                missing = sum(model_key not in snapshot.node(n).models_on_disk for n in order)
                key = (round(lat, 9), k, missing, order)
                if best is None or key < best[0]:
                    best = (key, order, bounds, lat)
            if evaluations > limits.max_evaluations:
                break
        if evaluations > limits.max_evaluations:
            break

    if best is None:
        return _waiting(model_key, layout, snapshot, host, peers, epoch, max_split_rtt_ms, allow_transfer, needed(2))
    _, order, bounds, lat = best
    stages = tuple(StageAssignment(n, s, e, stage_bytes(layout, s, e))
                   for n, s, e in zip(order, bounds[:-1], bounds[1:]))
    for st in stages:  # invariant, cheap to keep checked
        assert fits(st.tensor_bytes, snapshot.capacity(st.node_id)), st
    return Plan(model_key, epoch, host, stages, standbys_for(model_key, snapshot, order), lat)


def _waiting(model_key: ModelKey, layout: ModelLayout, snapshot: MeshSnapshot, host: NodeId,
             peers: Sequence[NodeId], epoch: int, max_split_rtt_ms: float | None, allow_transfer: bool,
             needed: int) -> WaitingForCapacity:
    pool = (host, *peers)
    avail = sum(usable_bytes(snapshot.capacity(n)) for n in pool)
    all_peers = split_peers(model_key, snapshot, host, max_split_rtt_ms=None, allow_transfer=allow_transfer)
    far = len(all_peers) - len(split_peers(model_key, snapshot, host, max_split_rtt_ms=max_split_rtt_ms,
                                           allow_transfer=allow_transfer))
    cap_txt = "any RTT" if max_split_rtt_ms is None else f"{max_split_rtt_ms:g} ms"
    reason = (f"{model_key} needs {_fmt(layout.total_bytes)} of weights on one node or {_fmt(needed)} split "
              f"(+10% headroom); host {host} can use {_fmt(usable_bytes(snapshot.capacity(host)))}")
    if not peers:
        reason += f" and no peer within {cap_txt} can take a stage"
    else:
        reason += f"; with {len(peers)} peer(s) within {cap_txt} the split can use {_fmt(avail)}"
        if avail >= needed:
            reason += ", but no contiguous layer split fits their capacities"
    if far:
        reason += f" ({far} peer(s) beyond the {cap_txt} RTT cap)"
    return WaitingForCapacity(model_key, epoch, reason, host=host, needed_bytes=needed, available_bytes=avail)


def replan(model_key: ModelKey, layout: ModelLayout, snapshot: MeshSnapshot, dead: Iterable[NodeId], *,
           epoch: int, **kwargs) -> Plan | WaitingForCapacity:
    """Plan again without ``dead`` nodes: the same planner, so standbys and spare nodes fill the gap."""
    return plan_model(model_key, layout, snapshot.without(dead), epoch=epoch, **kwargs)
