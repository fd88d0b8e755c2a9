"""Push-pull gossip (mesh402.mesh.gossip_push) between two nodes on an in-memory connection."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

from mesh402.mesh.conns import PeerConn
from mesh402.mesh.framing import FramedStream, StreamType, make_frame
from mesh402.mesh.gossip import Outcome
from mesh402.mesh.gossip_push import GossipPush, shareable
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.proto import mesh_pb2 as pb
from tests.support.mesh_fakes import Node, accept_stream, conn_pair, make_node, settle, signed_announcement


class Side:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.offers: list[tuple[Outcome, Optional[bytes]]] = []
        self.push = GossipPush(node.ctx, lambda o, a, via, hello: self.offers.append((o, bytes(a.node_id) if a else None)))


def link(a: Node, b: Node) -> tuple[PeerConn, PeerConn]:
    """(a's connection to b, b's connection to a), both registered and alive."""
    at_a, at_b = conn_pair(a.node_id, b.node_id)
    pa, pb_ = PeerConn(b.node_id, at_a, True, 1, 0.0), PeerConn(a.node_id, at_b, False, 1, 0.0)
    a.ctx.conns[b.node_id], b.ctx.conns[a.node_id] = pa, pb_
    a.ctx.liveness.connected(b.node_id)
    b.ctx.liveness.connected(a.node_id)
    return pa, pb_


def test_a_push_is_merged_and_answered_with_what_the_pusher_lacks(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        b = Side(make_node(tmp_path / "b", mesh_of=a.node))
        c, d = NodeIdentity.generate(), NodeIdentity.generate()
        mesh_id = a.node.ctx.mesh_gossip.mesh_id
        b.node.ctx.mesh_gossip.offer(signed_announcement(c, mesh_id, a.node.clock), a.node.clock.time())
        a.node.ctx.mesh_gossip.offer(signed_announcement(d, mesh_id, a.node.clock), a.node.clock.time())
        pa, pb_ = link(a.node, b.node)
        pushing = asyncio.ensure_future(a.push.push(pa))
        _, fs = await accept_stream(pb_.conn)  # type: ignore[arg-type]
        await b.push.handle(pb_, fs)
        await pushing
        assert sorted(b.offers) == sorted([(Outcome.NEW, a.node.node_id), (Outcome.NEW, d.node_id)])
        assert (Outcome.NEW, c.node_id) in a.offers and (Outcome.NEW, b.node.node_id) in a.offers
        assert set(a.node.ctx.mesh_gossip.snapshot()) == set(b.node.ctx.mesh_gossip.snapshot())
        assert a.node.ctx.counters["gossip.pushes"] == 1

    asyncio.run(go())


def test_a_push_in_someone_elses_name_is_reset(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        b = Side(make_node(tmp_path / "b", mesh_of=a.node))
        pa, pb_ = link(a.node, b.node)
        fs = FramedStream.opened(await pa.conn.open_bi(), StreamType.GOSSIP)
        await fs.send(make_frame(gossip=pb.Gossip(sender_id=b"\x05" * 32)))
        await fs.finish()
        _, theirs = await accept_stream(pb_.conn)  # type: ignore[arg-type]
        await b.push.handle(pb_, theirs)
        assert b.node.ctx.counters["gossip.forged_sender"] == 1 and b.offers == []

    asyncio.run(go())


def test_down_peers_are_not_shared(tmp_path: Path) -> None:
    a = make_node(tmp_path / "a")
    c = NodeIdentity.generate()
    a.ctx.mesh_gossip.offer(signed_announcement(c, a.ctx.mesh_gossip.mesh_id, a.clock), a.clock.time())
    assert len(shareable(a.ctx)) == 2
    a.ctx.liveness.mark_down(c.node_id)
    assert [pb.PeerAnnouncement.FromString(s.announcement).node_id for s in shareable(a.ctx)] == [a.node_id]


def test_changes_are_pushed_once_per_debounce(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        b = Side(make_node(tmp_path / "b", mesh_of=a.node))
        pa, pb_ = link(a.node, b.node)
        a.push.schedule()
        a.push.schedule()
        await settle()
        a.node.clock.advance(a.node.ctx.timers.gossip_debounce)
        _, fs = await accept_stream(pb_.conn)  # type: ignore[arg-type]
        await b.push.handle(pb_, fs)
        await settle()
        assert pb_.conn.incoming.empty()  # type: ignore[attr-defined]  # one push, not two
        assert a.node.ctx.counters["gossip.pushes"] == 1

    asyncio.run(go())
