"""Builders for placement tests: synthetic layouts and meshes (no sockets, no torch)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from mesh402.placement import MeshSnapshot, ModelLayout, NodeSnapshot
from tests.support.engine import smollm2_gguf

KEY = "m@0"
MB = 10**6


def layout(n_layers: int = 10, layer: int = 10 * MB, embed: int = 20 * MB, head: int | None = None,
           norm: int = 1000, tied: bool = True, shared: int = 0, key: str = KEY, **kw) -> ModelLayout:
    """A dense model; with ``tied`` the head is the embedding again (counted on both end stages)."""
    if head is None:
        head = embed
    return ModelLayout(key, n_layers, (layer,) * n_layers, embed, head, norm, tied, shared, **kw)


def node(nid: str, cap: int, rtt: Mapping[str, float] | None = None, *, speed: float | None = None,
         bw: float | None = None, models: Iterable[str] = (KEY,), client: bool = False, **kw) -> NodeSnapshot:
    return NodeSnapshot(nid, cap, dict(rtt or {}), speed, bw, frozenset(models), client, **kw)


def mesh(*nodes: NodeSnapshot) -> MeshSnapshot:
    return MeshSnapshot(nodes)


def full_mesh(caps: Mapping[str, int], rtt: float = 1.0, **kw) -> MeshSnapshot:
    """Every node measured every other at ``rtt`` ms."""
    return MeshSnapshot(node(n, c, {m: rtt for m in caps if m != n}, **kw) for n, c in caps.items())


def smollm2_layout(key: str = "smollm2@test") -> ModelLayout:
    from mesh402.models.gguf_meta import read_gguf_meta

    return ModelLayout.from_gguf_meta(read_gguf_meta(smollm2_gguf()), key)


def check_plan(plan, lay: ModelLayout, snap: MeshSnapshot) -> None:
    """Invariants every Plan must hold."""
    from mesh402.placement import fits, stage_bytes

    assert plan.stages[0].node_id == plan.host
    assert plan.stages[0].start == 0 and plan.stages[-1].end == lay.n_layers
    for a, b in zip(plan.stages, plan.stages[1:]):
        assert a.end == b.start
    assert len(set(plan.nodes)) == len(plan.nodes)
    for s in plan.stages:
        assert s.end > s.start
        assert s.tensor_bytes == stage_bytes(lay, s.start, s.end)
        assert fits(s.tensor_bytes, snap.capacity(s.node_id))
        assert s.tensor_bytes * 1.1 <= snap.capacity(s.node_id) * (1 + 1e-12)
        assert not snap.node(s.node_id).is_client
    assert not set(plan.standbys) & set(plan.nodes)
