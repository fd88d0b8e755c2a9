"""The connection table, the duplicate-connection rule and stream serving, on in-memory connections."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest

from mesh402.mesh import conns
from mesh402.mesh.conns import CLOSE_DUPLICATE, CLOSE_LEAVING, CLOSE_REPLACED, PeerConn
from mesh402.mesh.errors import PeerUnavailable
from mesh402.mesh.framing import FramedStream, StreamType, make_frame
from mesh402.mesh.limits import MeshLimits
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.streams import StreamRouter
from tests.support.mesh_fakes import FakeConn, conn_pair, make_node, settle

LO, HI = b"\x01" * 32, b"\x09" * 32


def pc(peer: bytes, initiator: bool, boot: int = 1, created: float = 0.0) -> PeerConn:
    return PeerConn(peer, FakeConn(remote=peer), initiator, boot, created)


def test_a_simultaneous_dial_keeps_the_one_the_smaller_id_dialled() -> None:
    # we are LO: our own dial wins, theirs loses; as HI the opposite
    assert conns.new_conn_wins(LO, pc(HI, False), pc(HI, True, created=0.5), False, 1.0) == (True, True)
    assert conns.new_conn_wins(LO, pc(HI, True), pc(HI, False, created=0.5), False, 1.0) == (False, True)
    assert conns.new_conn_wins(HI, pc(LO, True), pc(LO, False, created=0.5), False, 1.0) == (True, True)


def test_a_new_incarnation_a_late_or_doubted_redial_always_wins() -> None:
    old = pc(HI, True)
    assert conns.new_conn_wins(LO, old, pc(HI, False, boot=2, created=0.5), False, 1.0) == (True, False)
    assert conns.new_conn_wins(LO, old, pc(HI, False, created=5.0), False, 1.0) == (True, False)
    assert conns.new_conn_wins(LO, old, pc(HI, False, created=0.5), True, 1.0) == (True, False)
    dead = pc(HI, True)
    dead.conn.close(0, b"")  # type: ignore[attr-defined]
    assert conns.new_conn_wins(LO, dead, pc(HI, False, created=0.5), False, 1.0) == (True, False)


def test_place_closes_the_loser() -> None:
    table: dict[bytes, PeerConn] = {}
    counters: collections.Counter[str] = collections.Counter()
    first = pc(HI, True)
    assert conns.place(table, first, LO, False, 1.0, counters) and table[HI] is first
    assert first.conn.max_bi == MeshLimits().max_streams  # type: ignore[attr-defined]
    theirs = pc(HI, False, created=0.1)
    assert not conns.place(table, theirs, LO, False, 1.0, counters)
    assert theirs.closed and theirs.conn.closed_with == (CLOSE_DUPLICATE, b"duplicate")  # type: ignore[attr-defined]
    assert table[HI] is first and counters["conn.duplicate"] == 1
    restarted = pc(HI, False, boot=2, created=0.2)
    assert conns.place(table, restarted, LO, False, 1.0, counters) and table[HI] is restarted
    assert first.conn.closed_with == (CLOSE_REPLACED, b"replaced")  # type: ignore[attr-defined]
    conns.close_all(table, CLOSE_LEAVING, "leaving")
    assert table == {} and restarted.closed


def test_open_stream_needs_a_live_connection() -> None:
    async def go() -> None:
        table: dict[bytes, PeerConn] = {}
        with pytest.raises(PeerUnavailable):
            await conns.open_stream(table, HI, StreamType.STAGE)
        c = pc(HI, True)
        c.closed = True
        table[HI] = c
        with pytest.raises(PeerUnavailable):
            await conns.open_stream(table, HI, StreamType.STAGE)

    asyncio.run(go())


def test_closed_as_leaving_reads_irohs_close_reason() -> None:
    assert conns.closed_as_leaving("ApplicationClosed(ApplicationClose { error_code: 4, reason: b\"leaving\" })")
    assert not conns.closed_as_leaving("ApplicationClosed(ApplicationClose { error_code: 5, reason: b\"down\" })")
    assert not conns.closed_as_leaving("timed out")


def test_streams_go_to_their_handlers_and_bad_ones_are_reset(tmp_path: Path) -> None:
    async def go() -> None:
        node = make_node(tmp_path / "a")
        ctx = node.ctx
        peer = b"\x03" * 32
        lost: list[str] = []
        seen_by_control: list[bytes] = []

        async def on_gossip(p: PeerConn, fs: FramedStream) -> None:
            seen_by_control.append(p.node_id)
            await fs.finish()

        router = StreamRouter(ctx, {StreamType.GOSSIP: on_gossip}, lambda p, reason: lost.append(reason), lambda p: None)
        with pytest.raises(ValueError):
            router.register(StreamType.PING, on_gossip)  # type: ignore[arg-type]

        async def stage(peer_id: bytes, fs: FramedStream) -> None:
            f = await fs.recv(1)
            assert f is not None
            f.stage.plan_epoch += 1
            await fs.send(f)

        router.register(StreamType.STAGE, stage)
        ctx.liveness.connected(peer)
        at_node, at_peer = conn_pair(ctx.node_id, peer)
        p = PeerConn(peer, at_node, False, 1, 0.0)
        serving = asyncio.ensure_future(router.serve(p))

        async def ask(stype: StreamType, frame: pb.Frame) -> object:
            fs = FramedStream.opened(await at_peer.open_bi(), stype)
            await fs.send(frame)
            await fs.finish()
            try:
                return await fs.recv(1)
            except Exception as e:
                return e

        reply = await ask(StreamType.STAGE, make_frame(stage=pb.StageFrame(plan_epoch=4)))
        assert isinstance(reply, pb.Frame) and reply.stage.plan_epoch == 5
        echo = await ask(StreamType.ECHO, make_frame(echo=pb.Echo(payload=b"x" * 10, discard=True)))
        assert isinstance(echo, pb.Frame) and echo.echo.payload == b""
        assert isinstance(await ask(StreamType.HTTP_TUNNEL, make_frame(ping=pb.Ping())), Exception)
        assert ctx.counters["stream.no_handler"] == 1
        await ask(StreamType.GOSSIP, make_frame(ping=pb.Ping()))
        assert seen_by_control == [peer]
        bi = await at_peer.open_bi()
        await bi.send().write_all(b"\xee")  # no such stream type
        await settle()
        assert ctx.counters["frame.bad_stream_type"] == 1
        at_peer.close(CLOSE_LEAVING, b"leaving")
        await asyncio.wait_for(serving, 1)
        assert len(lost) == 1 and conns.closed_as_leaving(lost[0])

    asyncio.run(go())
