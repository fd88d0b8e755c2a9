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
  and the refusal counted.
- **abuse**: ``abuse_refusals`` refusals within ``abuse_window`` seconds close the peer's connection and
  refuse it for ``abuse_ban`` seconds (its handshake gets ``Reject{banned}``, nobody here dials it).

A token bucket is a few lines over the injectable clock; no library is worth a dependency for it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional

from mesh402.clock import Clock
from mesh402.mesh.framing import FrameError
from mesh402.mesh.limits import MeshLimits


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

    def of(self, node_id: bytes) -> PeerQuota:
        q = self.peers.get(node_id)
        if q is None:
            q = self.peers[node_id] = PeerQuota.of(self.lim)
            while len(self.peers) > 2 * self.lim.max_origins:  # the least recently used idle one goes
                idle = next((k for k, v in self.peers.items() if v.open_streams == 0), None)
                if idle is None:
                    break
                del self.peers[idle]
        self.peers.move_to_end(node_id)
        return q

    def ban(self, node_id: bytes) -> None:
        self.banned[node_id] = self.clock.monotonic() + self.lim.abuse_ban
        q = self.peers.get(node_id)
        if q is not None:
            q.refusals.clear()

    def ban_left(self, node_id: bytes) -> Optional[float]:
        """Seconds the peer stays refused, or None."""
        until = self.banned.get(node_id)
        if until is None:
            return None
        left = until - self.clock.monotonic()
        if left <= 0:
            del self.banned[node_id]
            return None
        return left
