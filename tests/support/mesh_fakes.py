"""In-memory stand-ins for iroh connections and streams, and a mesh node's context without an
endpoint: the mesh's collaborators run on these in unit tests, with a FakeClock, no QUIC."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mesh402.clock import FakeClock
from mesh402.mesh.announce import Announcer, LocalInfo
from mesh402.mesh.config import MeshConfig, MeshTimers
from mesh402.mesh.context import MeshContext
from mesh402.mesh.framing import FramedStream, StreamType, make_frame, read_stream_type
from mesh402.mesh.gossip import GossipState, sign_announcement
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.membership import Membership
from mesh402.mesh.proto import mesh_pb2 as pb


class Pipe:
    """One direction of a stream: bytes written at one end are read at the other."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.reset_code: Optional[int] = None
        self.changed = asyncio.Event()

    async def write_all(self, data: bytes) -> None:
        if self.reset_code is not None or self.eof:
            raise ConnectionError("stream closed")
        self.buf += data
        self.changed.set()

    async def finish(self) -> None:
        self.eof = True
        self.changed.set()

    async def reset(self, code: int) -> None:
        self.reset_code = code
        self.changed.set()

    async def stop(self, code: int) -> None:
        await self.reset(code)

    async def read(self, n: int) -> bytes:
        while not self.buf and not self.eof and self.reset_code is None:
            self.changed.clear()
            await self.changed.wait()
        if not self.buf and self.reset_code is not None:
            raise ConnectionError(f"stream reset ({self.reset_code})")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


@dataclass
class Bi:
    out: Pipe
    inc: Pipe

    def send(self) -> Pipe:
        return self.out

    def recv(self) -> Pipe:
        return self.inc


@dataclass
class RemoteId:
    raw: bytes

    def to_bytes(self) -> bytes:
        return self.raw


@dataclass
class Stats:
    udp_rx_datagrams: int = 0


@dataclass(eq=False)
class FakeConn:
    """One end of an in-memory connection (see :func:`conn_pair`)."""

    remote: bytes
    peer: Optional["FakeConn"] = None
    incoming: asyncio.Queue[Bi] = field(default_factory=asyncio.Queue)
    closed_with: Optional[tuple[int, bytes]] = None
    stats_: Stats = field(default_factory=Stats)
    max_bi: int = 0

    async def open_bi(self) -> Bi:
        if self.closed_with is not None or self.peer is None or self.peer.closed_with is not None:
            raise ConnectionError("connection lost")
        a, b = Pipe(), Pipe()
        self.peer.incoming.put_nowait(Bi(out=b, inc=a))
        return Bi(out=a, inc=b)

    async def accept_bi(self) -> Bi:
        bi = await self.incoming.get()
        if self.closed_with is not None:
            raise ConnectionError(self.close_reason())  # iroh's words, as closed_as_leaving reads them
        return bi

    def close(self, error_code: int, reason: bytes) -> None:
        if self.closed_with is not None:
            return
        self.closed_with = (error_code, reason)
        self.incoming.put_nowait(Bi(Pipe(), Pipe()))  # wakes accept_bi, which then raises
        if self.peer is not None and self.peer.closed_with is None:
            self.peer.close(error_code, reason)

    def close_reason(self) -> Optional[str]:
        return None if self.closed_with is None else f"ApplicationClosed {{ error_code: {self.closed_with[0]}, }}"

    def remote_id(self) -> RemoteId:
        return RemoteId(self.remote)

    def stats(self) -> Stats:
        return self.stats_

    def set_max_concurrent_bi_streams(self, n: int) -> None:
        self.max_bi = n


def conn_pair(a: bytes, b: bytes) -> tuple[FakeConn, FakeConn]:
    """(a's end, b's end) of a connection between nodes ``a`` and ``b``."""
    at_a, at_b = FakeConn(remote=b), FakeConn(remote=a)
    at_a.peer, at_b.peer = at_b, at_a
    return at_a, at_b


@dataclass
class Node:
    """A context with an own signed announcement, as a running node has after entering a mesh."""

    ctx: MeshContext
    announcer: Announcer
    clock: FakeClock
    saves: list[int] = field(default_factory=list)
    pushes: list[int] = field(default_factory=list)

    @property
    def node_id(self) -> bytes:
        return self.ctx.node_id

    def events(self) -> asyncio.Queue[dict[str, object]]:
        return self.ctx.events.subscribe()


def make_node(home: Path, *, clock: Optional[FakeClock] = None, mesh_of: Optional[Node] = None,
              member: bool = True, policy: int = pb.ADMISSION_SECRET, timers: Optional[MeshTimers] = None) -> Node:
    """A node in a new mesh, or (``mesh_of``) in that node's mesh: a member, or (``member=False``) a
    newcomer about to join it."""
    clock = clock or (mesh_of.clock if mesh_of is not None else FakeClock())
    config = MeshConfig(home=home, bind_ip="127.0.0.1", timers=timers or MeshTimers.fast(), clock=clock)
    membership = Membership.load(home)
    mesh_id: Optional[str] = None
    if mesh_of is None:
        membership.create(policy)
        mesh_id = membership.mesh_id
    else:
        other = mesh_of.ctx.membership
        mesh_id = other.mesh_id
        if member:
            assert other.mesh_id is not None
            membership.adopt(other.mesh_id, other.policy, other.secret)
    ctx = MeshContext.create(config, NodeIdentity.generate(), membership)
    saves: list[int] = []
    pushes: list[int] = []
    announcer = Announcer(ctx, LocalInfo(), lambda: ["127.0.0.1:1"], lambda: saves.append(1),
                          lambda: pushes.append(1))
    assert mesh_id is not None
    ctx.gossip = GossipState(mesh_id, ctx.node_id, config.timers.stale_after, config.timers.max_clock_skew,
                             config.limits)
    announcer.resign(flush=False)
    return Node(ctx, announcer, clock, saves, pushes)


async def settle(rounds: int = 50) -> None:
    """Let every ready task run (fakes answer without real waiting)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def signed_announcement(ident: NodeIdentity, mesh_id: str, clock: FakeClock, seq: int = 1,
                        **fields: object) -> pb.SignedAnnouncement:
    """A peer's announcement in ``mesh_id``, issued now on ``clock``."""
    ann = pb.PeerAnnouncement(node_id=ident.node_id, seq=seq, issued_at_ms=int(clock.time() * 1000),
                              mesh_id=mesh_id, **fields)  # type: ignore[arg-type]
    return sign_announcement(ident, mesh_id, ann)


async def accept_stream(conn: FakeConn, timeout: float = 1.0) -> tuple[StreamType, FramedStream]:
    """The next stream opened towards ``conn``'s end, past its type byte (as the mesh hands it on)."""
    bi = await asyncio.wait_for(conn.accept_bi(), timeout)
    stype = await read_stream_type(bi.recv(), timeout)
    return stype, FramedStream(bi.send(), bi.recv(), stype)


async def read_stream(conn: FakeConn, timeout: float = 1.0) -> tuple[StreamType, Optional[pb.Frame], FramedStream]:
    """The next stream opened towards ``conn``'s end: its type and first frame."""
    stype, fs = await accept_stream(conn, timeout)
    return stype, await fs.recv(timeout), fs


async def answer_pings(conn: FakeConn, boot_id: int = 1) -> None:
    """Play a healthy peer on ``conn``'s end: answer every PING stream."""
    while True:
        stype, frame, fs = await read_stream(conn, timeout=3600)
        if stype == StreamType.PING and frame is not None:
            await fs.send(make_frame(pong=pb.Pong(nonce=frame.ping.nonce, boot_id=boot_id)))
            await fs.finish()


async def advance(clock: FakeClock, seconds: float) -> None:
    """Let ready tasks run, move the clock, let the woken ones run."""
    await settle()
    clock.advance(seconds)
    await settle()

