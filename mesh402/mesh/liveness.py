"""Liveness bookkeeping: heartbeats, suspicion, probe-confirmed down, leave, prune.

Pure state driven by :class:`mesh402.mesh.watch.LivenessWatch` and an
injectable clock (``MeshTimers`` holds every interval):

- every ``heartbeat_interval`` the service pings each direct peer; a pong
  updates the RTT (EWMA) and clears the failure count; so does any other
  frame from the peer (:meth:`LivenessTable.seen`);
- after ``failures_to_suspect`` consecutive failures the peer is SUSPECT and
  the service probes it (a fresh dial + handshake within ``probe_timeout``);
  only a failed probe makes it DOWN and sends PeerDown to the others, who
  confirm with their own probe before believing it;
- a PeerLeaving (graceful shutdown) makes it LEFT at once;
- DOWN/LEFT peers are pruned after ``prune_after``; a peer that comes back
  (same id, new boot id) is ALIVE again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from mesh402.mesh.config import Clock, MeshTimers


class PeerState(str, enum.Enum):
    CONNECTING = "connecting"
    ALIVE = "alive"
    SUSPECT = "suspect"
    DOWN = "down"
    LEFT = "left"


RTT_ALPHA = 0.3


@dataclass
class PeerLiveness:
    node_id: bytes
    state: PeerState = PeerState.CONNECTING
    failures: int = 0
    last_seen: float = 0.0  # monotonic
    since: float = 0.0  # monotonic time of the last state change
    rtt_ms: Optional[float] = None
    rtt_last_ms: Optional[float] = None
    pings_ok: int = 0
    pings_failed: int = 0
    boot_id: int = 0
    down_reports: dict[bytes, float] = field(default_factory=dict)  # reporter -> monotonic


class LivenessTable:
    def __init__(self, timers: MeshTimers, clock: Clock):
        self.timers = timers
        self.clock = clock
        self.peers: dict[bytes, PeerLiveness] = {}

    def _get(self, node_id: bytes) -> PeerLiveness:
        node_id = bytes(node_id)
        p = self.peers.get(node_id)
        if p is None:
            now = self.clock.monotonic()
            p = self.peers[node_id] = PeerLiveness(node_id, last_seen=now, since=now)
        return p

    def get(self, node_id: bytes) -> Optional[PeerLiveness]:
        return self.peers.get(bytes(node_id))

    def state(self, node_id: bytes) -> Optional[PeerState]:
        p = self.peers.get(bytes(node_id))
        return p.state if p else None

    def _set(self, p: PeerLiveness, state: PeerState) -> bool:
        if p.state == state:
            return False
        p.state = state
        p.since = self.clock.monotonic()
        return True

    # ------------------------------------------------------------ events

    def connected(self, node_id: bytes, boot_id: int = 0) -> bool:
        """A handshake completed. Returns True if the peer was not ALIVE before."""
        p = self._get(node_id)
        p.failures = 0
        p.last_seen = self.clock.monotonic()
        if boot_id:
            p.boot_id = boot_id
        p.down_reports.clear()
        return self._set(p, PeerState.ALIVE)

    def seen(self, node_id: bytes) -> None:
        """Any valid frame from the peer is evidence of life."""
        p = self.peers.get(bytes(node_id))
        if p is None or p.state in (PeerState.DOWN, PeerState.LEFT):
            return
        p.last_seen = self.clock.monotonic()
        p.failures = 0
        if p.state == PeerState.SUSPECT:
            self._set(p, PeerState.ALIVE)

    def heartbeat_ok(self, node_id: bytes, rtt_ms: float) -> None:
        p = self.peers.get(bytes(node_id))
        if p is None:
            return
        p.pings_ok += 1
        p.rtt_last_ms = rtt_ms
        p.rtt_ms = rtt_ms if p.rtt_ms is None else (1 - RTT_ALPHA) * p.rtt_ms + RTT_ALPHA * rtt_ms
        self.seen(node_id)

    def heartbeat_failed(self, node_id: bytes) -> bool:
        """Count a failed ping. True when the peer just became SUSPECT (probe it)."""
        p = self.peers.get(bytes(node_id))
        if p is None or p.state not in (PeerState.ALIVE, PeerState.SUSPECT, PeerState.CONNECTING):
            return False
        p.pings_failed += 1
        p.failures += 1
        if p.failures >= self.timers.failures_to_suspect and p.state != PeerState.SUSPECT:
            self._set(p, PeerState.SUSPECT)
            return True
        return False

    def suspect(self, node_id: bytes) -> bool:
        """Connection lost: go straight to SUSPECT. True if it was not already."""
        p = self.peers.get(bytes(node_id))
        if p is None or p.state in (PeerState.DOWN, PeerState.LEFT, PeerState.SUSPECT):
            return False
        return self._set(p, PeerState.SUSPECT)

    def mark_down(self, node_id: bytes) -> bool:
        p = self._get(node_id)
        if p.state == PeerState.LEFT:
            return False
        p.rtt_ms = None
        return self._set(p, PeerState.DOWN)

    def mark_left(self, node_id: bytes) -> bool:
        p = self._get(node_id)
        p.rtt_ms = None
        return self._set(p, PeerState.LEFT)

    def accept_down_report(self, reporter: bytes, node_id: bytes) -> bool:
        """Rate-limit PeerDown reports: one per (reporter, peer) per ``down_report_ignore``."""
        p = self.peers.get(bytes(node_id))
        if p is None or p.state in (PeerState.DOWN, PeerState.LEFT):
            return False
        now = self.clock.monotonic()
        last = p.down_reports.get(bytes(reporter))
        if last is not None and now - last < self.timers.down_report_ignore:
            return False
        p.down_reports[bytes(reporter)] = now
        return True

    # ------------------------------------------------------------ queries

    def prunable(self) -> list[bytes]:
        now = self.clock.monotonic()
        return [
            k
            for k, p in self.peers.items()
            if p.state in (PeerState.DOWN, PeerState.LEFT) and now - p.since >= self.timers.prune_after
        ]

    def remove(self, node_id: bytes) -> None:
        self.peers.pop(bytes(node_id), None)

    def alive(self) -> list[bytes]:
        return [k for k, p in self.peers.items() if p.state in (PeerState.ALIVE, PeerState.SUSPECT)]

    def rtts(self) -> dict[bytes, float]:
        return {k: p.rtt_ms for k, p in self.peers.items() if p.rtt_ms is not None and p.state == PeerState.ALIVE}
