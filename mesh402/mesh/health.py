"""Per-peer health: consecutive failures, and when a peer may be tried again.

One small, pure, clock-driven tracker (no I/O, no tasks) that every retry policy can share: the mesh
redials peers through it, and the same class can back replica retry and pipeline failover, so "this
peer keeps failing, leave it alone a while" is decided in one place (as Petals' sequence manager keeps
its failures and bans together). After the n-th consecutive failure a peer waits
``base * factor**(n-1)`` seconds, at most ``cap``; one success clears it. No jitter: callers already
retry on their own ticks, and a deterministic schedule is what the tests pin down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, Hashable, Iterable, Optional, TypeVar

from mesh402.clock import Clock

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: how long to wait after ``failures`` consecutive failures."""

    base: float
    cap: float = math.inf
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        # bounded exponent: a peer down for days must not overflow the float; it sits at the cap
        exponent = min(failures - 1, 64)
        return min(self.cap, self.base * self.factor**exponent)


@dataclass
class PeerHealth:
    failures: int = 0  # consecutive; a success resets it
    total_failures: int = 0
    successes: int = 0
    last_failure: Optional[float] = None  # monotonic seconds
    last_success: Optional[float] = None
    retry_at: float = 0.0  # monotonic: no attempt before this


class HealthTracker(Generic[K]):
    """Failures and successes per peer, and the backoff that follows from them."""

    def __init__(self, clock: Clock, backoff: Backoff) -> None:
        self.clock = clock
        self.backoff = backoff
        self._peers: dict[K, PeerHealth] = {}

    def failed(self, peer: K) -> float:
        """Record a failed attempt; returns the monotonic time before which the peer is not tried."""
        h = self._peers.setdefault(peer, PeerHealth())
        now = self.clock.monotonic()
        h.failures += 1
        h.total_failures += 1
        h.last_failure = now
        h.retry_at = now + self.backoff.delay(h.failures)
        return h.retry_at

    def succeeded(self, peer: K) -> None:
        h = self._peers.setdefault(peer, PeerHealth())
        h.failures = 0
        h.successes += 1
        h.last_success = self.clock.monotonic()
        h.retry_at = 0.0

    def may_try(self, peer: K) -> bool:
        h = self._peers.get(peer)
        return h is None or self.clock.monotonic() >= h.retry_at

    def retry_in(self, peer: K) -> float:
        """Seconds until the peer may be tried (0 when it may be now)."""
        h = self._peers.get(peer)
        return 0.0 if h is None else max(0.0, h.retry_at - self.clock.monotonic())

    def failures(self, peer: K) -> int:
        h = self._peers.get(peer)
        return h.failures if h else 0

    def get(self, peer: K) -> Optional[PeerHealth]:
        return self._peers.get(peer)

    def usable(self, peers: Iterable[K]) -> list[K]:
        """The peers that may be tried now, in the caller's order (its preference)."""
        return [p for p in peers if self.may_try(p)]

    def forget(self, peer: K) -> None:
        self._peers.pop(peer, None)

    def clear(self) -> None:
        self._peers.clear()
