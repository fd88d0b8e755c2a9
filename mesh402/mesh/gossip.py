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
- ``replayed``: an announcement older than one already seen (including
  origins already pruned: their highest seq is remembered), handed over by its
  own origin or by an unnamed carrier;
- ``outdated``: the same, relayed by a third party. Normal gossip lag (a relay
  that has not yet heard the newer one), so counted apart from replays;
- ``stale``: issued too long ago, or too far in the future;
- ``wrong_mesh`` / ``malformed``;
- ``oversize``: over a bound of mesh402.mesh.limits (size, labels, models, ...);
- ``table_full``: a new origin learned second-hand while ``max_origins`` are held.

Only an announcement that would change what we hold is worth its Ed25519 check:
every drop above except ``forged`` is decided first (``deduped`` counts the
drops that skipped the check, ``sig_checks`` the checks made).
"""

from __future__ import annotations

import collections
import enum
import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional

from google.protobuf.message import DecodeError

from mesh402.mesh import identity
from mesh402.mesh.limits import MeshLimits, announcement_problem
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
    OVERSIZE = "oversize"
    TABLE_FULL = "table_full"
    SELF = "self"

    @property
    def accepted(self) -> bool:
        return self in (Outcome.NEW, Outcome.UPDATED)

    @property
    def dropped(self) -> bool:
        return self in (Outcome.REPLAYED, Outcome.OUTDATED, Outcome.STALE, Outcome.FORGED, Outcome.WRONG_MESH,
                        Outcome.MALFORMED, Outcome.OVERSIZE, Outcome.TABLE_FULL)


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


def parse_announcement(sa: pb.SignedAnnouncement, lim: MeshLimits) -> pb.PeerAnnouncement:
    """Decode and bound-check, without the signature: the cheap part. Raises AnnouncementError."""
    if len(sa.announcement) > lim.max_announcement_bytes:  # before parsing it at all
        raise AnnouncementError(Outcome.OVERSIZE, f"announcement of {len(sa.announcement)} bytes "
                                f"(limit {lim.max_announcement_bytes})")
    ann = pb.PeerAnnouncement()
    try:
        ann.ParseFromString(sa.announcement)
    except (DecodeError, RuntimeError, ValueError):
        raise AnnouncementError(Outcome.MALFORMED, "undecodable announcement") from None
    if len(ann.node_id) != identity.NODE_ID_LEN:
        raise AnnouncementError(Outcome.MALFORMED, "announcement without a valid node id")
    problem = announcement_problem(ann, len(sa.announcement), lim)
    if problem is not None:
        raise AnnouncementError(Outcome.OVERSIZE, problem)
    return ann


def check_fresh(ann: pb.PeerAnnouncement, mesh_id: str, now: float, stale_after: float, max_skew: float) -> None:
    """The mesh id and the issue time (as claimed: the signature is checked after). Raises AnnouncementError."""
    if ann.mesh_id != mesh_id:
        raise AnnouncementError(Outcome.WRONG_MESH, "announcement names another mesh")
    issued = ann.issued_at_ms / 1000.0
    if issued < now - stale_after:
        raise AnnouncementError(Outcome.STALE, "announcement too old")
    if issued > now + max_skew:
        raise AnnouncementError(Outcome.STALE, "announcement from the future")


def check_signature(sa: pb.SignedAnnouncement, ann: pb.PeerAnnouncement, mesh_id: str) -> None:
    if not identity.verify(ann.node_id, signing_payload(mesh_id, sa.announcement), sa.signature):
        raise AnnouncementError(Outcome.FORGED, "bad signature")


def open_announcement(
    sa: pb.SignedAnnouncement, mesh_id: str, now: float, stale_after: float, max_skew: float,
    lim: MeshLimits = MeshLimits(),
) -> pb.PeerAnnouncement:
    """Decode and verify everything; raises AnnouncementError. ``now`` is wall-clock seconds."""
    ann = parse_announcement(sa, lim)
    check_fresh(ann, mesh_id, now, stale_after, max_skew)
    check_signature(sa, ann, mesh_id)
    return ann


@dataclass
class Entry:
    signed: pb.SignedAnnouncement
    ann: pb.PeerAnnouncement
    received_at: float  # wall seconds, local
    via: Optional[bytes]  # node that handed it to us (None for self)


@dataclass(frozen=True)
class HighWater:
    seq: int
    issued: float  # wall seconds the announcement carrying ``seq`` claims


BAD_SIGNATURE_CACHE = 1024  # forged announcements remembered, so a repeat costs no second check


class GossipState:
    def __init__(self, mesh_id: str, self_id: bytes, stale_after: float = 600.0, max_skew: float = 300.0,
                 limits: MeshLimits = MeshLimits()):
        self.mesh_id = mesh_id
        self.self_id = bytes(self_id)
        self.stale_after = stale_after
        self.max_skew = max_skew
        self.limits = limits
        self.entries: dict[bytes, Entry] = {}
        # Highest seq ever accepted per origin, kept after pruning so replays of a forgotten peer's old
        # announcements are still recognised; pruned once any replay would be stale anyway (prune()).
        self.high_water: dict[bytes, HighWater] = {}
        self._forged: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.counters: collections.Counter = collections.Counter()

    # ------------------------------------------------------------ own announcement

    def set_self(self, signed: pb.SignedAnnouncement, ann: pb.PeerAnnouncement, now: float) -> None:
        self.entries[self.self_id] = Entry(signed, ann, now, None)
        self._raise_high_water(self.self_id, ann)

    def self_entry(self) -> Optional[Entry]:
        return self.entries.get(self.self_id)

    def _hw(self, origin: bytes) -> int:
        hw = self.high_water.get(origin)
        return hw.seq if hw else 0

    def _raise_high_water(self, origin: bytes, ann: pb.PeerAnnouncement) -> None:
        if ann.seq >= self._hw(origin):
            self.high_water[origin] = HighWater(ann.seq, ann.issued_at_ms / 1000.0)

    # ------------------------------------------------------------ merge

    def _drop(self, outcome: Outcome) -> tuple[Outcome, None]:
        self.counters[outcome.value] += 1
        return outcome, None

    def offer(
        self, sa: pb.SignedAnnouncement, now: float, via: Optional[bytes] = None, direct_sender: bool = False
    ) -> tuple[Outcome, Optional[pb.PeerAnnouncement]]:
        """Merge one signed announcement received from ``via``.

        ``direct_sender`` means ``via`` claims the announcement as its own (e.g.
        the Hello); then the origin must be ``via`` or it is forged.

        Everything that would drop the announcement anyway (too big, malformed, another mesh, stale,
        a copy of what we hold, older than what we hold, a forgery seen before) is decided before
        the Ed25519 check (~115 µs): a peer repeating announcements costs a parse, not a signature
        check each (counted as ``deduped``)."""
        try:
            ann = parse_announcement(sa, self.limits)
            check_fresh(ann, self.mesh_id, now, self.stale_after, self.max_skew)
        except AnnouncementError as e:
            return self._drop(e.outcome)
        origin = bytes(ann.node_id)
        if direct_sender and via is not None and origin != via:
            return self._drop(Outcome.FORGED)
        cur = self.entries.get(origin)
        hw = self._hw(origin)
        # an older announcement relayed by a third party is lag, not an attack
        older = Outcome.OUTDATED if via is not None and via != origin else Outcome.REPLAYED
        if origin == self.self_id:
            # Our own announcement relayed back. A higher seq than ours can only come from an earlier
            # incarnation with a clock ahead of ours (the caller bumps its seq past it): only that one
            # is worth a signature check.
            if ann.seq <= hw:
                self.counters["deduped"] += 1
                return Outcome.SELF, None
        elif cur is not None and sa.announcement == cur.signed.announcement:
            self.counters["deduped"] += 1
            return self._drop(Outcome.DUPLICATE)
        elif (cur is not None and ann.seq < cur.ann.seq) or (cur is None and (ann.seq < hw or (ann.seq == hw and hw > 0))):
            # seen (perhaps since forgotten) a newer or identical one: dropped whether genuine or not
            self.counters["deduped"] += 1
            return self._drop(older)
        key = hashlib.blake2b(bytes(sa.announcement) + bytes(sa.signature), digest_size=16).digest()
        if key in self._forged:
            self.counters["deduped"] += 1
            return self._drop(Outcome.FORGED)
        self.counters["sig_checks"] += 1
        try:
            check_signature(sa, ann, self.mesh_id)
        except AnnouncementError as e:
            self._forged[key] = None
            while len(self._forged) > BAD_SIGNATURE_CACHE:
                self._forged.popitem(last=False)
            return self._drop(e.outcome)
        if origin == self.self_id:
            self._raise_high_water(origin, ann)
            return Outcome.SELF, ann
        if cur is None:
            if len(self.entries) >= self.limits.max_origins and not self._make_room(origin, via):
                return self._drop(Outcome.TABLE_FULL)
            self.entries[origin] = Entry(sa, ann, now, via)
            self._raise_high_water(origin, ann)
            self.counters["accepted"] += 1
            return Outcome.NEW, ann
        if ann.seq == cur.ann.seq:
            # equivocation: deterministic pick so every node converges
            self.counters["equivocation"] += 1
            if bytes(sa.signature) <= bytes(cur.signed.signature):
                return Outcome.DUPLICATE, None
        self.entries[origin] = Entry(sa, ann, now, via)
        self._raise_high_water(origin, ann)
        self.counters["accepted"] += 1
        return Outcome.UPDATED, ann

    def _make_room(self, origin: bytes, via: Optional[bytes]) -> bool:
        """The table is full. A peer handing over its own announcement (it proved its id on the
        connection) takes the place of the stalest one learned second-hand; a second-hand origin is
        refused. So junk relayed by one member never keeps out a node that connects."""
        if via != origin:
            return False
        second_hand = [(e.ann.issued_at_ms, k) for k, e in self.entries.items() if k != self.self_id and e.via != k]
        if not second_hand:
            return False
        self.forget(min(second_hand)[1])
        self.counters["evicted"] += 1
        return True

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

    def prune(self, now: float) -> int:
        """Drop high-water marks nobody needs: of origins no longer held whose newest announcement is
        older than ``stale_after`` (any replay of it, or of anything before it, is refused as stale),
        then the oldest beyond ``max_high_water``. Returns how many went."""
        gone = [k for k, hw in self.high_water.items()
                if k not in self.entries and hw.issued < now - self.stale_after]
        extra = len(self.high_water) - len(gone) - self.limits.max_high_water
        if extra > 0:
            rest = sorted((hw.issued, k) for k, hw in self.high_water.items() if k not in self.entries and k not in gone)
            gone += [k for _, k in rest[:extra]]
        for k in gone:
            del self.high_water[k]
        return len(gone)

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
