"""Gossip state: signed peer announcements keyed by origin, and merge rules.

Pure state, no I/O. Every announcement is signed by its origin over
``"mesh402-ann-v1\\0" ‖ mesh_id ‖ announcement bytes`` and carries a sequence
number that increases across restarts. Third parties relay announcements
verbatim, so a receiver checks a relayed one exactly like a first-hand one.

Merge rule (a pure function of the set of valid announcements, so gossip
converges whatever the order): per origin keep the highest ``seq``; on equal
``seq`` with different content (the origin equivocated) keep the one with the
larger signature. Everything dropped is counted by reason:

- ``forged``: bad signature, or a direct sender presenting someone else's
  announcement as its own;
- ``replayed``: a valid announcement older than one already seen (including
  origins already pruned: their highest seq is remembered), handed over by its
  own origin or by an unnamed carrier;
- ``outdated``: the same, relayed by a third party. Normal gossip lag (a relay
  that has not yet heard the newer one), so counted apart from replays;
- ``stale``: issued too long ago, or too far in the future;
- ``wrong_mesh`` / ``malformed``.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass
from typing import Iterable, Optional

from google.protobuf.message import DecodeError

from mesh402.mesh import identity
from mesh402.mesh.proto import mesh_pb2 as pb

SIGN_CONTEXT = b"mesh402-ann-v1\0"


class Outcome(str, enum.Enum):
    NEW = "new"
    UPDATED = "updated"
    DUPLICATE = "duplicate"
    REPLAYED = "replayed"
    OUTDATED = "outdated"
    STALE = "stale"
    FORGED = "forged"
    WRONG_MESH = "wrong_mesh"
    MALFORMED = "malformed"
    SELF = "self"

    @property
    def accepted(self) -> bool:
        return self in (Outcome.NEW, Outcome.UPDATED)

    @property
    def dropped(self) -> bool:
        return self in (Outcome.REPLAYED, Outcome.OUTDATED, Outcome.STALE, Outcome.FORGED, Outcome.WRONG_MESH, Outcome.MALFORMED)


class AnnouncementError(Exception):
    def __init__(self, outcome: Outcome, message: str):
        super().__init__(message)
        self.outcome = outcome


def signing_payload(mesh_id: str, announcement_bytes: bytes) -> bytes:
    return SIGN_CONTEXT + mesh_id.encode() + b"\0" + announcement_bytes


def sign_announcement(ident: identity.NodeIdentity, mesh_id: str, ann: pb.PeerAnnouncement) -> pb.SignedAnnouncement:
    if ann.node_id != ident.node_id:
        raise ValueError("announcement node_id must be the signer's id")
    data = ann.SerializeToString(deterministic=True)
    return pb.SignedAnnouncement(announcement=data, signature=ident.sign(signing_payload(mesh_id, data)))


def open_announcement(
    sa: pb.SignedAnnouncement, mesh_id: str, now: float, stale_after: float, max_skew: float
) -> pb.PeerAnnouncement:
    """Decode and verify; raises AnnouncementError. ``now`` is wall-clock seconds."""
    ann = pb.PeerAnnouncement()
    try:
        ann.ParseFromString(sa.announcement)
    except (DecodeError, RuntimeError, ValueError):
        raise AnnouncementError(Outcome.MALFORMED, "undecodable announcement") from None
    if len(ann.node_id) != identity.NODE_ID_LEN:
        raise AnnouncementError(Outcome.MALFORMED, "announcement without a valid node id")
    if not identity.verify(ann.node_id, signing_payload(mesh_id, sa.announcement), sa.signature):
        # Could also be a genuine announcement from another mesh: the mesh id is
        # inside the signed payload, so check which to give a useful reason.
        if ann.mesh_id and ann.mesh_id != mesh_id and identity.verify(
            ann.node_id, signing_payload(ann.mesh_id, sa.announcement), sa.signature
        ):
            raise AnnouncementError(Outcome.WRONG_MESH, "announcement from another mesh")
        raise AnnouncementError(Outcome.FORGED, "bad signature")
    if ann.mesh_id != mesh_id:
        raise AnnouncementError(Outcome.WRONG_MESH, "announcement names another mesh")
    issued = ann.issued_at_ms / 1000.0
    if issued < now - stale_after:
        raise AnnouncementError(Outcome.STALE, "announcement too old")
    if issued > now + max_skew:
        raise AnnouncementError(Outcome.STALE, "announcement from the future")
    return ann


@dataclass
class Entry:
    signed: pb.SignedAnnouncement
    ann: pb.PeerAnnouncement
    received_at: float  # wall seconds, local
    via: Optional[bytes]  # node that handed it to us (None for self)


class GossipState:
    def __init__(self, mesh_id: str, self_id: bytes, stale_after: float = 600.0, max_skew: float = 300.0):
        self.mesh_id = mesh_id
        self.self_id = bytes(self_id)
        self.stale_after = stale_after
        self.max_skew = max_skew
        self.entries: dict[bytes, Entry] = {}
        # Highest seq ever accepted per origin, kept after pruning so replays
        # of a forgotten peer's old announcements are still recognised.
        self.high_water: dict[bytes, int] = {}
        self.counters: collections.Counter = collections.Counter()

    # ------------------------------------------------------------ own announcement

    def set_self(self, signed: pb.SignedAnnouncement, ann: pb.PeerAnnouncement, now: float) -> None:
        self.entries[self.self_id] = Entry(signed, ann, now, None)
        self.high_water[self.self_id] = max(self.high_water.get(self.self_id, 0), ann.seq)

    def self_entry(self) -> Optional[Entry]:
        return self.entries.get(self.self_id)

    # ------------------------------------------------------------ merge

    def offer(
        self, sa: pb.SignedAnnouncement, now: float, via: Optional[bytes] = None, direct_sender: bool = False
    ) -> tuple[Outcome, Optional[pb.PeerAnnouncement]]:
        """Merge one signed announcement received from ``via``.

        ``direct_sender`` means ``via`` claims the announcement as its own (e.g.
        the Hello); then the origin must be ``via`` or it is forged."""
        try:
            ann = open_announcement(sa, self.mesh_id, now, self.stale_after, self.max_skew)
        except AnnouncementError as e:
            self.counters[e.outcome.value] += 1
            return e.outcome, None
        origin = bytes(ann.node_id)
        if direct_sender and via is not None and origin != via:
            self.counters[Outcome.FORGED.value] += 1
            return Outcome.FORGED, None
        if origin == self.self_id:
            # Our own announcement relayed back. A higher seq than ours can only
            # come from an earlier incarnation with a clock ahead of ours: the
            # caller bumps its seq past it.
            self.high_water[origin] = max(self.high_water.get(origin, 0), ann.seq)
            return Outcome.SELF, ann
        cur = self.entries.get(origin)
        hw = self.high_water.get(origin, 0)
        # an older announcement relayed by a third party is lag, not an attack
        older = Outcome.OUTDATED if via is not None and via != origin else Outcome.REPLAYED
        if cur is None:
            if ann.seq < hw or (ann.seq == hw and hw > 0):
                # seen (and since forgotten) a newer or identical one
                self.counters[older.value] += 1
                return older, None
            self.entries[origin] = Entry(sa, ann, now, via)
            self.high_water[origin] = ann.seq
            self.counters["accepted"] += 1
            return Outcome.NEW, ann
        if ann.seq < cur.ann.seq:
            self.counters[older.value] += 1
            return older, None
        if ann.seq == cur.ann.seq:
            if sa.announcement == cur.signed.announcement:
                self.counters["duplicate"] += 1
                return Outcome.DUPLICATE, None
            # equivocation: deterministic pick so every node converges
            self.counters["equivocation"] += 1
            if bytes(sa.signature) <= bytes(cur.signed.signature):
                return Outcome.DUPLICATE, None
        self.entries[origin] = Entry(sa, ann, now, via)
        self.high_water[origin] = max(hw, ann.seq)
        self.counters["accepted"] += 1
        return Outcome.UPDATED, ann

    def merge_all(
        self, items: Iterable[pb.SignedAnnouncement], now: float, via: Optional[bytes] = None
    ) -> list[tuple[Outcome, Optional[pb.PeerAnnouncement]]]:
        return [self.offer(sa, now, via) for sa in items]

    # ------------------------------------------------------------ queries

    def get(self, node_id: bytes) -> Optional[pb.PeerAnnouncement]:
        e = self.entries.get(bytes(node_id))
        return e.ann if e else None

    def peers(self) -> dict[bytes, Entry]:
        return {k: v for k, v in self.entries.items() if k != self.self_id}

    def all_signed(self) -> list[pb.SignedAnnouncement]:
        return [e.signed for e in self.entries.values()]

    def digest(self) -> dict[bytes, int]:
        return {k: e.ann.seq for k, e in self.entries.items()}

    def newer_than(self, theirs: dict[bytes, int]) -> list[pb.SignedAnnouncement]:
        """What we hold that a peer with digest ``theirs`` lacks (push-pull reply)."""
        return [e.signed for k, e in self.entries.items() if e.ann.seq > theirs.get(k, -1)]

    def forget(self, node_id: bytes) -> None:
        self.entries.pop(bytes(node_id), None)

    def snapshot(self) -> dict[bytes, tuple[int, bytes]]:
        """origin -> (seq, announcement bytes); for convergence checks."""
        return {k: (e.ann.seq, bytes(e.signed.announcement)) for k, e in self.entries.items()}


def digest_of(items: Iterable[pb.SignedAnnouncement]) -> dict[bytes, int]:
    """Best-effort digest of a list we received (unverified; only used to pick replies)."""
    out: dict[bytes, int] = {}
    for sa in items:
        ann = pb.PeerAnnouncement()
        try:
            ann.ParseFromString(sa.announcement)
        except (DecodeError, RuntimeError, ValueError):
            continue
        k = bytes(ann.node_id)
        out[k] = max(out.get(k, -1), ann.seq)
    return out
