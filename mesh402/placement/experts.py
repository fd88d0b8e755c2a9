"""Expert placement for MoE models: the dense trunk on the host, routed experts spread by capacity.

Unlike splitting the expert set per replica (where each node's gate can pick only among the
experts it holds, which degrades output), every expert is held by at least one node, so the
gate's choice is never restricted. Gate-usage statistics decide two things: experts are handed
out hottest first to the least loaded node relative to its capacity, and hot experts get a
second copy on another node when there is room.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh402.placement.capacity import fits, usable_bytes
from mesh402.placement.election import elect_host
from mesh402.placement.pipeline import (
    DEFAULT_MAX_SPLIT_RTT_MS,
    split_peers,
    standbys_for,
)
from mesh402.placement.types import (
    ExpertId,
    ExpertLayout,
    ExpertPlan,
    ExpertShard,
    MeshSnapshot,
    ModelKey,
    ModelLayout,
    NodeId,
    WaitingForCapacity,
)

__all__ = ["DEFAULT_HOT_FACTOR", "expert_shares", "plan_experts"]

# An expert is hot when its share of its layer's gate mass is at least this many times uniform.
DEFAULT_HOT_FACTOR = 2.0


def expert_shares(experts: ExpertLayout, usage: Mapping[ExpertId, float] | None) -> dict[ExpertId, float]:
    """Each expert's share of its layer's gate usage (summing to 1 per layer); uniform without data."""
    out: dict[ExpertId, float] = {}
    n = experts.n_experts
    for layer in experts.moe_layers:
        counts = [max(0.0, float(usage.get((layer, e), 0.0))) if usage else 0.0 for e in range(n)]
        total = sum(counts)
        for e in range(n):
            out[(layer, e)] = counts[e] / total if total > 0 else 1.0 / n
    return out


def _assign(units: list[ExpertId], shares: dict[ExpertId, float], experts: ExpertLayout,
            nodes: tuple[NodeId, ...], free: dict[NodeId, int], hot: float) -> tuple[dict[NodeId, list[ExpertId]], list[ExpertId]] | None:
    room = dict(free)
    weight = {n: max(1, free[n]) for n in nodes}
    load = dict.fromkeys(nodes, 0.0)
    held: dict[NodeId, list[ExpertId]] = {n: [] for n in nodes}
    primary: dict[ExpertId, NodeId] = {}
    rank = {n: i for i, n in enumerate(nodes)}

    def pick(unit: ExpertId, exclude: NodeId | None) -> NodeId | None:
        size = experts.expert_bytes[unit[0]]
        ok = [n for n in nodes if n != exclude and room[n] >= size]
        if not ok:
            return None
        return min(ok, key=lambda n: ((load[n] + shares[unit]) / weight[n], -room[n], rank[n]))

    for unit in units:
        node = pick(unit, None)
        if node is None:
            return None
        room[node] -= experts.expert_bytes[unit[0]]
        load[node] += shares[unit]
        held[node].append(unit)
        primary[unit] = node

    replicated = []
    if len(nodes) > 1:
        for unit in units:  # hottest first
            if shares[unit] < hot:
                break
            node = pick(unit, primary[unit])
            if node is None:
                continue
            room[node] -= experts.expert_bytes[unit[0]]
            load[node] += shares[unit] / 2
            load[primary[unit]] -= shares[unit] / 2
            held[node].append(unit)
            replicated.append(unit)
    return held, replicated


def plan_experts(model_key: ModelKey, layout: ModelLayout, snapshot: MeshSnapshot,
                 usage: Mapping[ExpertId, float] | None = None, *, epoch: int,
                 max_split_rtt_ms: float | None = DEFAULT_MAX_SPLIT_RTT_MS, allow_transfer: bool = False,
                 hot_factor: float = DEFAULT_HOT_FACTOR) -> ExpertPlan | WaitingForCapacity:
    """Place an MoE model's experts: trunk on the elected host, each expert on >= 1 node.

    ``usage`` maps ``(layer, expert)`` to gate-usage counts or shares (normalised per layer).
    Nodes are the host plus the nearest peers (:func:`~mesh402.placement.pipeline.split_peers`),
    as few as hold every expert. Experts go hottest first (ties by id) to the node whose load
    relative to its free capacity stays lowest; then experts whose share is at least
    ``hot_factor / n_experts`` get a copy on a second node, hottest first, where it fits.
    Every node's bytes x 1.1 fit its capacity. Deterministic.
    """
    if layout.model_key != model_key:
        raise ValueError(f"layout is for {layout.model_key!r}, not {model_key!r}")
    experts = layout.experts
    if experts is None:
        raise ValueError(f"{model_key} is not a mixture-of-experts model")
    host = elect_host(model_key, snapshot)
    if host is None:
        return WaitingForCapacity(model_key, epoch, f"no serving node has {model_key} on disk",
                                  needed_bytes=layout.total_bytes)
    trunk = layout.trunk_bytes
    host_cap = snapshot.capacity(host)
    if not fits(trunk, host_cap):
        return WaitingForCapacity(
            model_key, epoch,
            f"the dense trunk of {model_key} ({trunk / 1e6:.1f} MB, +10% headroom) does not fit host {host}",
            host=host, needed_bytes=trunk, available_bytes=usable_bytes(host_cap))

    shares = expert_shares(experts, usage)
    units = sorted(experts.all_experts(), key=lambda u: (-shares[u], u))
    hot = hot_factor / experts.n_experts
    peers = split_peers(model_key, snapshot, host, max_split_rtt_ms=max_split_rtt_ms, allow_transfer=allow_transfer)
    free_all = {host: usable_bytes(host_cap) - trunk}
    free_all.update({p: usable_bytes(snapshot.capacity(p)) for p in peers})

    result = None
    nodes: tuple[NodeId, ...] = ()
    for m in range(len(peers) + 1):
        nodes = (host, *peers[:m])
        if sum(free_all[n] for n in nodes) < experts.total_bytes:
            continue
        result = _assign(units, shares, experts, nodes, free_all, hot)
        if result is not None:
            break
    if result is None:
        avail = sum(free_all.values())
        return WaitingForCapacity(
            model_key, epoch,
            f"{model_key} experts need {experts.total_bytes / 1e6:.1f} MB (+10% headroom) beside the trunk; "
            f"host {host} and {len(peers)} peer(s) in RTT range have {avail / 1e6:.1f} MB",
            host=host, needed_bytes=experts.total_bytes, available_bytes=avail)

    held, replicated = result
    shards = []
    for n in nodes:
        units_n = tuple(sorted(held[n]))
        if not units_n and n != host:
            continue
        nbytes = sum(experts.expert_bytes[layer] for layer, _ in units_n) + (trunk if n == host else 0)
        assert fits(nbytes, snapshot.capacity(n)), (n, nbytes)
        shards.append(ExpertShard(n, units_n, n == host, nbytes))
    used = [s.node_id for s in shards]
    return ExpertPlan(model_key, epoch, host, tuple(shards), tuple(sorted(replicated)),
                      standbys_for(model_key, snapshot, used))
