"""What merging one announcement means for the node, decided apart from doing it.

:func:`after_offer` is a pure function of the merge outcome and a few facts; it returns typed
effects, and the service applies them (its ``_apply``). Deciding and doing stay apart, in the spirit
of exo's ``shared/apply.py``, so the rules below are tested without a network, a clock or a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from mesh402.mesh import spent
from mesh402.mesh.gossip import Outcome
from mesh402.mesh.liveness import PeerState
from mesh402.mesh.proto import mesh_pb2 as pb


@dataclass(frozen=True)
class Emit:
    """Tell event subscribers."""

    kind: str
    data: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Dial:
    """Connect to the peer directly (``immediate``: fresh evidence it is up, skip grace and backoff)."""

    node_id: bytes
    immediate: bool = False


@dataclass(frozen=True)
class Spend:
    """Merge the mesh's spent or revoked invite nonces a peer carries."""

    entries: dict[str, spent.Revocation]


@dataclass(frozen=True)
class JumpSeq:
    """An earlier incarnation of this node announced ``seq``: sign past it."""

    seq: int


@dataclass(frozen=True)
class Left:
    """The peer announced it is leaving: mark it left and close our connection to it."""

    node_id: bytes


@dataclass(frozen=True)
class Push:
    """Gossip what changed to the peers (debounced)."""


Effect = Union[Emit, Dial, Spend, JumpSeq, Left, Push]


def after_offer(outcome: Outcome, ann: Optional[pb.PeerAnnouncement], via: Optional[bytes], *,
                from_hello: bool, own: Optional[pb.PeerAnnouncement], boot_id: int,
                peer_state: Optional[PeerState]) -> list[Effect]:
    """The effects of merging ``ann`` (relayed by ``via``) with ``outcome``.

    ``own`` is this node's current announcement, ``boot_id`` its incarnation, ``peer_state`` what
    liveness says of the origin. An announcement from a Hello is not dialled back: the peer is
    connecting to us already."""
    if outcome == Outcome.SELF:
        if ann is not None and own is not None and ann.seq >= own.seq and ann.boot_id != boot_id:
            return [JumpSeq(ann.seq)]
        return []
    if not outcome.accepted or ann is None:
        return []
    nid = bytes(ann.node_id)
    effects: list[Effect] = []
    if spent.SPENT_LABEL in ann.labels:
        effects.append(Spend(spent.decode(ann.labels[spent.SPENT_LABEL])))
    if ann.leaving:
        effects.append(Left(nid))
    elif outcome == Outcome.NEW:
        effects.append(Emit("peer_learned", {"node_id": nid.hex(), "via": via.hex() if via else None}))
        if not from_hello:
            effects.append(Dial(nid))
    else:
        effects.append(Emit("peer_updated", {"node_id": nid.hex(), "seq": ann.seq}))
        if peer_state in (PeerState.DOWN, PeerState.LEFT) and not from_hello:
            # a newer announcement is evidence it is alive (restarted, or a partition healed)
            effects.append(Dial(nid, immediate=True))
    effects.append(Push())
    return effects
