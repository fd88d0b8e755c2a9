"""What merging an announcement means (mesh402.mesh.effects.after_offer): a pure function, no I/O."""

from __future__ import annotations

from typing import Optional

from mesh402.mesh import spent
from mesh402.mesh.effects import Dial, Effect, Emit, JumpSeq, Left, Push, Spend, after_offer
from mesh402.mesh.gossip import Outcome
from mesh402.mesh.liveness import PeerState
from mesh402.mesh.proto import mesh_pb2 as pb

P, VIA = b"\x05" * 32, b"\x07" * 32


def ann(seq: int = 5, **kw: object) -> pb.PeerAnnouncement:
    return pb.PeerAnnouncement(node_id=P, seq=seq, **kw)  # type: ignore[arg-type]


def decide(outcome: Outcome, a: Optional[pb.PeerAnnouncement], *, from_hello: bool = False,
           own: Optional[pb.PeerAnnouncement] = None, boot_id: int = 1,
           state: Optional[PeerState] = None) -> list[Effect]:
    return after_offer(outcome, a, VIA, from_hello=from_hello, own=own, boot_id=boot_id, peer_state=state)


def test_a_new_peer_is_announced_dialled_and_pushed() -> None:
    assert decide(Outcome.NEW, ann()) == [
        Emit("peer_learned", {"node_id": P.hex(), "via": VIA.hex()}), Dial(P), Push()]


def test_a_peer_from_a_hello_is_not_dialled_back() -> None:
    assert Dial(P) not in decide(Outcome.NEW, ann(), from_hello=True)
    assert not any(isinstance(e, Dial) for e in decide(Outcome.UPDATED, ann(), from_hello=True, state=PeerState.DOWN))


def test_an_update_redials_only_a_peer_believed_gone() -> None:
    alive = decide(Outcome.UPDATED, ann(seq=9), state=PeerState.ALIVE)
    assert alive == [Emit("peer_updated", {"node_id": P.hex(), "seq": 9}), Push()]
    for gone in (PeerState.DOWN, PeerState.LEFT):
        assert Dial(P, immediate=True) in decide(Outcome.UPDATED, ann(seq=9), state=gone)


def test_a_leaving_announcement_marks_the_peer_left() -> None:
    assert decide(Outcome.UPDATED, ann(leaving=True), state=PeerState.ALIVE) == [Left(P), Push()]


def test_spent_invites_travel_with_any_accepted_announcement() -> None:
    nonce = "ab" * 16
    r = spent.Revocation(2_000_000_000, b"\x01" * 32, b"\x02" * 64)  # checked when merged, not here
    a = ann(labels={spent.SPENT_LABEL: spent.encode({nonce: r})})
    out = decide(Outcome.NEW, a)
    assert out[0] == Spend({nonce: r}) and out[-1] == Push()


def test_dropped_and_duplicate_announcements_change_nothing() -> None:
    for o in (Outcome.DUPLICATE, Outcome.REPLAYED, Outcome.OUTDATED, Outcome.STALE, Outcome.FORGED,
              Outcome.WRONG_MESH, Outcome.MALFORMED):
        assert decide(o, ann()) == [] and decide(o, None) == []


def test_our_own_announcement_from_an_earlier_incarnation_makes_us_jump_past_it() -> None:
    own = ann(seq=10, boot_id=1)
    assert decide(Outcome.SELF, ann(seq=12, boot_id=2), own=own, boot_id=1) == [JumpSeq(12)]
    assert decide(Outcome.SELF, ann(seq=10, boot_id=2), own=own, boot_id=1) == [JumpSeq(10)]
    assert decide(Outcome.SELF, ann(seq=9, boot_id=2), own=own, boot_id=1) == []  # older: ours wins anyway
    assert decide(Outcome.SELF, ann(seq=12, boot_id=1), own=own, boot_id=1) == []  # this incarnation's own
    assert decide(Outcome.SELF, None, own=own) == []
