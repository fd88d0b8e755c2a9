"""One QUIC connection per admitted peer, and the rule that keeps one when both sides dialled at once.

The table itself is a plain ``dict[bytes, PeerConn]`` (node id -> connection) owned by the service;
the functions here put connections in, open streams on them and close them. ``Conn`` names the part
of an iroh connection the mesh uses, so tests hand in fakes instead of QUIC.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass, field
from typing import Any, MutableMapping, Optional, Protocol

from mesh402.mesh.errors import PeerUnavailable
from mesh402.mesh.framing import FramedStream, StreamType
from mesh402.mesh.identity import short_id

# Application close codes
CLOSE_NORMAL = 0
CLOSE_REJECTED = 1
CLOSE_DUPLICATE = 2
CLOSE_REPLACED = 3
CLOSE_LEAVING = 4
CLOSE_DOWN = 5
CLOSE_PROTOCOL = 6
CLOSE_ABUSE = 7  # the peer kept exceeding its quotas (mesh402.mesh.quota)


class BiStream(Protocol):
    def send(self) -> Any: ...

    def recv(self) -> Any: ...


class Conn(Protocol):
    """What the mesh calls on an iroh ``Connection``."""

    async def open_bi(self) -> BiStream: ...

    async def accept_bi(self) -> BiStream: ...

    def close(self, error_code: int, reason: bytes) -> None: ...

    def close_reason(self) -> Optional[str]: ...

    def remote_id(self) -> Any: ...

    def stats(self) -> Any: ...

    def set_max_concurrent_bi_streams(self, n: int) -> None: ...


@dataclass(eq=False)  # compared and hashed by identity: two connections to one peer are different
class PeerConn:
    node_id: bytes
    conn: Conn
    initiator: bool  # we dialled it
    boot_id: int  # the peer's incarnation when it was admitted
    created: float  # monotonic
    closed: bool = False  # closed or dropped by us, or lost
    source: str = "?"  # the address a connection we accepted came from (mesh402.mesh.admission.source_of)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.conn.close(code, reason.encode())
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()


def from_peer(pc: PeerConn, claimed: bytes, counters: collections.Counter[str], forged: str) -> bool:
    """A control frame names its sender; one naming anyone but the connection's own (authenticated)
    peer is counted as ``forged`` and dropped."""
    if bytes(claimed) == pc.node_id:
        return True
    counters[forged] += 1
    return False


def rx_datagrams(pc: PeerConn) -> Optional[int]:
    """UDP datagrams QUIC has received from the peer (None when iroh cannot say)."""
    try:
        return int(pc.conn.stats().udp_rx_datagrams)
    except Exception:
        return None


def still_receiving(rx_before: Optional[int], rx_after: Optional[int]) -> bool:
    """The peer's process sent datagrams meanwhile: alive, even if its Python loop did not answer."""
    return rx_before is not None and rx_after is not None and rx_after > rx_before


def closed_as_leaving(reason: str) -> bool:
    """The peer closed with CLOSE_LEAVING (authenticated by QUIC), whether or not its PeerLeaving
    frame arrived first."""
    return "ApplicationClosed" in reason and f"error_code: {CLOSE_LEAVING}," in reason


def new_conn_wins(self_id: bytes, existing: PeerConn, new: PeerConn, peer_doubtful: bool,
                  window: float) -> tuple[bool, bool]:
    """Which of two connections to one peer to keep: (keep the new one, it was a simultaneous dial).

    A new incarnation, a re-dial after the old connection died or was doubted, or one well after the
    first always wins: the peer has given up the old connection. Two dialled within ``window`` of
    each other were a simultaneous dial; both sides keep the one dialled by the smaller node id, so
    they agree without talking."""
    existing_dead = False
    with contextlib.suppress(Exception):
        existing_dead = existing.conn.close_reason() is not None
    simultaneous = new.created - existing.created < window
    if existing_dead or existing.boot_id != new.boot_id or peer_doubtful or not simultaneous:
        return True, False
    new_initiator = self_id if new.initiator else new.node_id
    return new_initiator == min(self_id, new.node_id), True


def place(conns: MutableMapping[bytes, PeerConn], pc: PeerConn, self_id: bytes, peer_doubtful: bool,
          window: float, counters: collections.Counter[str], max_streams: int = 256) -> bool:
    """Put ``pc`` in the table, closing the connection it replaces; False if an existing one wins
    (``pc`` is closed then). ``max_streams``: how many streams the peer may have open here at once
    (stage, tunnel, expert and control alike; QUIC holds it to that)."""
    existing = conns.get(pc.node_id)
    if existing is not None and not existing.closed and existing is not pc:
        keep_new, simultaneous = new_conn_wins(self_id, existing, pc, peer_doubtful, window)
        if simultaneous:
            counters["conn.duplicate"] += 1
        if not keep_new:
            pc.close(CLOSE_DUPLICATE, "duplicate")
            return False
        existing.close(CLOSE_DUPLICATE if existing.boot_id == pc.boot_id else CLOSE_REPLACED, "replaced")
    with contextlib.suppress(Exception):
        pc.conn.set_max_concurrent_bi_streams(max_streams)
    conns[pc.node_id] = pc
    return True


async def open_stream(conns: MutableMapping[bytes, PeerConn], peer_id: bytes, stream_type: StreamType,
                      max_frame: Optional[int] = None) -> FramedStream:
    pc = conns.get(bytes(peer_id))
    if pc is None or pc.closed:
        raise PeerUnavailable(f"no connection to {short_id(peer_id)}")
    bi = await pc.conn.open_bi()
    return FramedStream.opened(bi, stream_type, max_frame)


def close_all(conns: MutableMapping[bytes, PeerConn], code: int, reason: str) -> None:
    for pc in list(conns.values()):
        pc.close(code, reason)
    conns.clear()
