"""Mesh configuration: every timer in one dataclass, and an injectable clock.

Production defaults are chosen for LAN/WAN meshes; tests pass
``MeshTimers.fast()`` so that they exercise the same code paths in a
fraction of a second instead of sleeping through production timeouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

# The project's injectable clock (wall time, monotonic time, sleep).
from mesh402.clock import Clock, FakeClock, SystemClock  # noqa: F401
from mesh402.mesh.limits import MeshLimits


@dataclass(frozen=True)
class MeshTimers:
    heartbeat_interval: float = 2.0  # ping each direct peer this often
    heartbeat_timeout: float = 1.5  # a ping without pong after this is a failure
    failures_to_suspect: int = 2  # consecutive failures before the probe
    failure_retry: float = 0.5  # after a failure, ping again this soon
    max_unresponsive: float = 30.0  # QUIC alive but no pong this long -> treat as failed
    probe_timeout: float = 2.5  # probe = fresh dial + handshake; fail -> peer down
    prune_after: float = 300.0  # forget down/left peers after this long
    rtt_interval: float = 10.0  # re-sign own announcement with fresh RTTs
    announce_refresh: float = 60.0  # re-sign own announcement at least this often
    gossip_interval: float = 30.0  # anti-entropy push to every peer
    gossip_debounce: float = 0.02  # coalesce bursts of changes
    stale_after: float = 600.0  # announcements issued longer ago are dropped
    max_clock_skew: float = 300.0  # announcements from further in the future are dropped
    connect_timeout: float = 5.0  # QUIC handshake
    hello_timeout: float = 5.0  # Hello/Welcome exchange
    stream_idle_timeout: float = 30.0  # control stream waiting for its frame
    transitive_dial_grace: float = 1.0  # higher id waits this long for the lower id to dial
    duplicate_window: float = 2.0  # two connections this close in time were a simultaneous dial
    down_report_ignore: float = 60.0  # repeat PeerDown from the same reporter ignored
    reconnect_interval: float = 15.0  # retry known-but-unconnected peers
    redial_backoff_max: float = 60.0  # a peer failing again and again is redialled at most this seldom
    demand_announce_delay: float = 2.0  # coalesce demand updates into one re-announcement
    demand_ttl: float = 86400.0  # demand entries older than this are dropped
    join_attempts: int = 3
    join_backoff: float = 1.0

    @classmethod
    def fast(cls, **over) -> "MeshTimers":
        """Short timers for tests and benchmarks."""
        base = cls(
            heartbeat_interval=0.25,
            heartbeat_timeout=0.5,
            failures_to_suspect=2,
            failure_retry=0.1,
            max_unresponsive=5.0,
            probe_timeout=0.8,
            prune_after=3.0,
            rtt_interval=1.0,
            announce_refresh=5.0,
            gossip_interval=2.0,
            stale_after=60.0,
            connect_timeout=3.0,
            hello_timeout=3.0,
            stream_idle_timeout=3.0,
            transitive_dial_grace=0.3,
            duplicate_window=1.0,
            down_report_ignore=2.0,
            reconnect_interval=1.0,
            redial_backoff_max=4.0,
            join_attempts=3,
            join_backoff=0.3,
            demand_announce_delay=0.05,
        )
        return replace(base, **over)


@dataclass
class MeshConfig:
    home: Path
    bind_ip: str = "0.0.0.0"
    bind_port: int = 0
    relay_url: Optional[str] = None
    kind: str = "serving"  # or "client"
    name: str = ""
    policy: str = "secret"  # or "open": admission policy when this node creates a mesh
    new_mesh_id: Optional[str] = None  # id for a mesh this node creates (--mesh-name); random when None
    api_port: int = 0
    console_port: int = 0
    version: str = ""
    invite_expires: float = 24 * 3600.0  # the token `serve` prints
    timers: MeshTimers = field(default_factory=MeshTimers)
    limits: MeshLimits = field(default_factory=MeshLimits)  # what one peer may send or make us keep
    clock: Clock = field(default_factory=SystemClock)
    # Extra addresses to put in tokens/announcements (e.g. a public ip:port).
    external_addrs: list[str] = field(default_factory=list)
    # Dial client-only peers learned transitively? (client<->client links carry nothing useful)
    dial_client_peers: bool = True
