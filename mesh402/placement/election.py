"""Per-model host election: a pure function of the snapshot, so every node reaches the same answer."""

from __future__ import annotations

from mesh402.placement.types import MeshSnapshot, ModelKey, NodeId

__all__ = ["elect_host", "host_ranking"]


def host_ranking(model_key: ModelKey, snapshot: MeshSnapshot) -> tuple[NodeId, ...]:
    """Nodes that may host ``model_key``, best first.

    Eligible: not a client, effective capacity > 0, the model on local disk. Order: most capacity
    first; equal capacity -> the higher node id first.
    """
    holders = snapshot.holders(model_key)
    return tuple(sorted(holders, key=lambda n: (snapshot.capacity(n), n), reverse=True))


def elect_host(model_key: ModelKey, snapshot: MeshSnapshot) -> NodeId | None:
    """The host of ``model_key``, or None if no node can host it."""
    ranking = host_ranking(model_key, snapshot)
    return ranking[0] if ranking else None
