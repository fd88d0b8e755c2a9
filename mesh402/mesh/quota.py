"""Per-peer quotas on the streams a peer opens here: stream credit, frames/s and bytes/s.

Each peer (by node id, so reconnecting starts no fresh allowance) has token buckets
(mesh402.mesh.limits.MeshLimits):

- **streams**: opening a stream takes a token; when the bucket is empty the node stops accepting that
  peer's streams until one refills. QUIC stream credit then holds the peer back at its own end, so a
  stream flood costs this node nothing. How many may be open at once is QUIC's own stream limit
  (``max_streams``), set on every connection.
- **frames and bytes**: every frame read from a peer's stream is charged before its body is read. Control
  traffic and anything a handler has not *entitled* share one modest allowance; a stage or expert stream
  that a handler authorized (a session opened with the elected host's grant, the host's expert traffic)
  is charged to a large one, so honest activations never hit it. A frame over the allowance raises
  :class:`QuotaExceeded`: the stream is reset (QUIC stops the sender; the rest never reaches Python)
  and the refusal counted; until the allowance refills the node accepts none of the peer's new streams
  (QUIC stream credit holds it back at its own end), so a flood turns into a trickle of refusals.
- **abuse**: ``abuse_refusals`` refusals within ``abuse_window`` seconds close the peer's connection and
  refuse it for ``abuse_ban`` seconds (its handshake gets ``Reject{banned}``, nobody here dials it).
- **fresh identities**: a node id costs nothing, so a ban also marks the address the peer connected from
  for ``abuse_ban`` seconds. From a marked address the node takes at most one new connection per
  ``rejoin_interval``, doubling with every further ban from there up to ``abuse_ban`` (the others are
  refused before the QUIC handshake: no crypto, no Python beyond the triage), and an identity admitted
  from it starts with empty buckets (the sustained rates, never a fresh burst) and is cut off after a
  tenth of the refusals.
- **many addresses**: a Sybil with addresses to spare escapes the marks, so the burst itself is rationed:
  new identities draw it from one pool shared by everyone (``newcomer_burst``, refilled at
  ``newcomers_per_s``). Beyond the pool a newcomer starts with empty buckets and earns its burst at the
  sustained rates (a tunnelled 8 MiB body waits ~8 s); a wave of fresh identities so gets the sustained
  rates each, never a burst each, and honest members already known keep theirs.

A token bucket is a few lines over the injectable clock; no library is worth a dependency for it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import MutableMapping, Optional, TypeVar

from mesh402.clock import Clock
from mesh402.mesh.framing import FrameError
from mesh402.mesh.limits import MeshLimits

K = TypeVar("K", bytes, str)


class QuotaExceeded(FrameError):
    code = "over_quota"


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # most tokens held; the bucket starts full
    tokens: float = field(init=False)
    stamp: Optional[float] = field(init=False, default=None)  # time of the last refill

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: float, now: float) -> bool:
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def wait(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are there (0: now); ``n`` above the burst waits for a full bucket."""
        self._refill(now)
        return max(0.0, (min(n, self.burst) - self.tokens) / self.rate) if self.rate > 0 else 0.0


@dataclass
class PeerQuota:
    lim: MeshLimits
    streams: TokenBucket
    frames: TokenBucket
    bytes: TokenBucket
    work_frames: TokenBucket
    work_bytes: TokenBucket
    refusals: collections.deque[float] = field(default_factory=collections.deque)
    open_streams: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    frames_refused: int = 0
    streams_delayed: int = 0

    @classmethod
    def of(cls, lim: MeshLimits) -> "PeerQuota":
        return cls(lim, TokenBucket(lim.streams_per_s, lim.stream_burst), TokenBucket(lim.frames_per_s, lim.frame_burst),
                   TokenBucket(lim.bytes_per_s, lim.byte_burst),
                   TokenBucket(lim.work_frames_per_s, lim.work_frame_burst),
                   TokenBucket(lim.work_bytes_per_s, lim.work_byte_burst),
                   collections.deque(maxlen=max(1, lim.abuse_refusals)))

    @classmethod
    def earning(cls, lim: MeshLimits) -> "PeerQuota":
        """For a newcomer when the shared burst pool is spent: the same rates, with the burst still to earn."""
        q = cls.of(lim)
        for b in (q.streams, q.frames, q.bytes):
            b.tokens = 0.0
        return q

    @classmethod
    def lean(cls, lim: MeshLimits) -> "PeerQuota":
        """For an identity admitted from an address marked for abuse: the same rates, no burst to spend, and
        cut off after a tenth of the refusals."""
        q = cls.earning(lim)
        q.refusals = collections.deque(maxlen=max(1, lim.abuse_refusals // 10))
        return q

    def refill_wait(self, now: float) -> float:
        """Seconds until the peer may open a stream again: stream credit, and the unentitled allowance a new
        stream's first frame is charged to (none of its streams is accepted while that is spent)."""
        return max(self.streams.wait(1, now), self.frames.wait(1, now), self.bytes.wait(1, now))

    def charge(self, nbytes: int, entitled: bool, now: float) -> None:
        """One frame of ``nbytes`` read from this peer; QuotaExceeded when it is over the allowance."""
        frames, byts = (self.work_frames, self.work_bytes) if entitled else (self.frames, self.bytes)
        if nbytes > byts.burst or not frames.take(1, now):
            self._refuse(now)
            raise QuotaExceeded(f"over the peer's frame allowance ({frames.rate:g} frames/s)")
        if not byts.take(nbytes, now):
            frames.tokens += 1  # not taken after all
            self._refuse(now)
            raise QuotaExceeded(f"over the peer's byte allowance ({byts.rate / 2**20:g} MiB/s)")
        self.frames_in += 1
        self.bytes_in += nbytes

    def _refuse(self, now: float) -> None:
        self.frames_refused += 1
        self.refusals.append(now)

    def abusive(self, now: float) -> bool:
        """``abuse_refusals`` refusals within the last ``abuse_window`` seconds."""
        r = self.refusals
        return len(r) == r.maxlen and now - r[0] <= self.lim.abuse_window

    def view(self) -> dict[str, int]:
        return {"open_streams": self.open_streams, "frames_in": self.frames_in, "bytes_in": self.bytes_in,
                "frames_refused": self.frames_refused, "streams_delayed": self.streams_delayed}


class QuotaBook:
    """Every peer's quota and the peers refused for abuse, by node id; bounded."""

    def __init__(self, lim: MeshLimits, clock: Clock) -> None:
        self.lim = lim
        self.clock = clock
        self.peers: collections.OrderedDict[bytes, PeerQuota] = collections.OrderedDict()
        self.banned: dict[bytes, float] = {}  # node id -> monotonic time the ban ends
        # address a banned peer connected from -> monotonic time the mark ends; at most max_pending entries
        self.marked: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.next_from: dict[str, float] = {}  # marked address -> when it may connect again
        self.strikes: dict[str, int] = {}  # marked address -> peers from it banned while it was marked
        self.newcomers = TokenBucket(lim.newcomers_per_s, lim.newcomer_burst)  # bursts left for new identities

    def of(self, node_id: bytes) -> PeerQuota:
        q = self.peers.get(node_id)
        if q is None:
            q = self._add(node_id, self._newcomer()[1])
        self.peers.move_to_end(node_id)
        return q

    def admitted(self, node_id: bytes, source: str) -> Optional[str]:
        """``node_id`` was admitted from ``source``: from an address marked for abuse it starts ``lean``;
        otherwise a new identity takes a burst from the shared pool (``burst``) or starts ``earning`` it.
        None: a peer already known keeps its quota."""
        if node_id in self.peers:
            return None
        if self.mark_left(source) is not None:
            self._add(node_id, PeerQuota.lean(self.lim))
            return "lean"
        kind, q = self._newcomer()
        self._add(node_id, q)
        return kind

    def _newcomer(self) -> tuple[str, PeerQuota]:
        if self.newcomers.take(1, self.clock.monotonic()):
            return "burst", PeerQuota.of(self.lim)
        return "earning", PeerQuota.earning(self.lim)

    def _add(self, node_id: bytes, q: PeerQuota) -> PeerQuota:
        self.peers[node_id] = q
        while len(self.peers) > 2 * self.lim.max_origins:  # the least recently used idle one goes
            idle = next((k for k, v in self.peers.items() if v.open_streams == 0), None)
            if idle is None:
                break
            del self.peers[idle]
        return q

    def ban(self, node_id: bytes, source: Optional[str] = None) -> None:
        """Refuse ``node_id`` for ``abuse_ban`` seconds and mark the address it connected from."""
        now = self.clock.monotonic()
        self.banned[node_id] = now + self.lim.abuse_ban
        q = self.peers.get(node_id)
        if q is not None:
            q.refusals.clear()
        if source and source != "?":
            self.marked[source] = now + self.lim.abuse_ban
            self.marked.move_to_end(source)
            self.strikes[source] = self.strikes.get(source, 0) + 1
            self.next_from[source] = max(self.next_from.get(source, 0.0), now + self._interval(source))
            while len(self.marked) > self.lim.max_pending:
                old, _ = self.marked.popitem(last=False)
                self._unmark(old)

    def _interval(self, source: str) -> float:
        """Between two connections from a marked address: doubling with each ban from it, up to the ban."""
        return min(self.lim.abuse_ban, self.lim.rejoin_interval * 2 ** (self.strikes.get(source, 1) - 1))

    def _unmark(self, source: str) -> None:
        self.next_from.pop(source, None)
        self.strikes.pop(source, None)

    def mark_left(self, source: str) -> Optional[float]:
        """Seconds ``source`` stays marked for abuse, or None."""
        left = self._left(self.marked, source)
        if left is None:
            self._unmark(source)
        return left

    def may_connect(self, source: str) -> bool:
        """Whether a new connection from ``source`` may start its handshake: always, unless the address is
        marked for abuse; then one per ``rejoin_interval``."""
        if self.mark_left(source) is None:
            return True
        now = self.clock.monotonic()
        if now < self.next_from.get(source, 0.0):
            return False
        self.next_from[source] = now + self._interval(source)
        return True

    def ban_left(self, node_id: bytes) -> Optional[float]:
        """Seconds the peer stays refused, or None."""
        return self._left(self.banned, node_id)

    def _left(self, table: MutableMapping[K, float], key: K) -> Optional[float]:
        """Seconds until ``table[key]`` (a monotonic time) runs out; an expired entry is dropped."""
        until = table.get(key)
        if until is None:
            return None
        left = until - self.clock.monotonic()
        if left <= 0:
            del table[key]
            return None
        return left
