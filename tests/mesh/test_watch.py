"""Heartbeats, probes, PeerDown, leaving, loss and pruning (mesh402.mesh.watch) on a fake clock and
in-memory connections: no QUIC."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

from mesh402.mesh.conns import CLOSE_DOWN, CLOSE_LEAVING, PeerConn
from mesh402.mesh.framing import FramedStream, StreamType, make_frame
from mesh402.mesh.health import Backoff, HealthTracker
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.liveness import PeerState
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.watch import LivenessWatch, missed_ping, stale_ghosts
from tests.support.mesh_fakes import advance, FakeConn, Node, accept_stream, answer_pings, conn_pair, make_node, read_stream, settle, signed_announcement


def test_a_missed_ping_is_slow_while_quic_still_receives() -> None:
    assert missed_ping(10, 10, None, 5.0, 30.0) == (False, None)
    assert missed_ping(None, 12, None, 5.0, 30.0) == (False, None)
    assert missed_ping(10, 12, None, 5.0, 30.0) == (True, 5.0)
    assert missed_ping(12, 14, 5.0, 34.0, 30.0) == (True, 5.0)
    assert missed_ping(14, 16, 5.0, 35.0, 30.0) == (False, 5.0)  # busy too long: a failure after all


class Rig:
    """A node's LivenessWatch with a scripted dial and recorded re-signings."""

    def __init__(self, tmp_path: Path, dial_ok: bool = False) -> None:
        self.node: Node = make_node(tmp_path / "a")
        self.ctx = self.node.ctx
        self.clock = self.node.clock
        self.dials: list[bytes] = []
        self.resigns: list[bool] = []
        self.dial_ok = dial_ok
        self.health: HealthTracker[bytes] = HealthTracker(self.clock, Backoff(base=1.0, cap=4.0))
        self.watch = LivenessWatch(self.ctx, self._dial, self.resigns.append, self.health)
        self.events = self.ctx.events.subscribe()

    async def _dial(self, nid: bytes, addrs: list[str], relay: str, cred: Optional[pb.InviteCredential]) -> PeerConn:
        self.dials.append(nid)
        if not self.dial_ok:
            raise ConnectionError("unreachable")
        mine, _ = conn_pair(self.ctx.node_id, nid)
        pc = PeerConn(nid, mine, True, 1, self.clock.monotonic())
        self.ctx.conns[nid] = pc
        return pc

    def peer(self, announce: bool = True) -> tuple[NodeIdentity, PeerConn, FakeConn]:
        """A connected, alive peer: (its identity, our connection, its end)."""
        ident = NodeIdentity.generate()
        if announce:
            sa = signed_announcement(ident, self.ctx.mesh_gossip.mesh_id, self.clock, addrs=["127.0.0.1:9"])
            self.ctx.mesh_gossip.offer(sa, self.clock.time())
        mine, theirs = conn_pair(self.ctx.node_id, ident.node_id)
        pc = PeerConn(ident.node_id, mine, True, 1, self.clock.monotonic())
        self.ctx.conns[ident.node_id] = pc
        self.ctx.liveness.connected(ident.node_id, boot_id=1)
        return ident, pc, theirs

    def kinds(self) -> list[str]:
        out = []
        while not self.events.empty():
            out.append(str(self.events.get_nowait()["type"]))
        return out

    async def advance(self, seconds: float) -> None:
        await advance(self.clock, seconds)


def test_failed_heartbeats_suspect_probe_and_report_down(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path)
        t = r.ctx.timers
        p, pc, p_end = r.peer()
        q, _, q_end = r.peer()
        p_end.close(0, b"")  # p's process died: its connection is gone
        hb = asyncio.ensure_future(r.watch.heartbeat(pc))
        await r.advance(t.heartbeat_interval)
        assert r.ctx.liveness.get(p.node_id).failures == 1  # type: ignore[union-attr]
        await r.advance(t.failure_retry)
        await r.advance(0)
        assert hb.done() and r.dials == [p.node_id]
        assert r.ctx.liveness.state(p.node_id) == PeerState.DOWN and p.node_id not in r.ctx.conns
        assert pc.closed and r.resigns == [True]
        assert r.kinds() == ["peer_suspect", "peer_down"]
        c = r.ctx.counters
        assert c["liveness.ping_failed"] == 2 and c["liveness.suspect"] == 1 and c["liveness.down"] == 1
        stype, frame, _ = await read_stream(q_end)  # the others are told
        assert stype == StreamType.PEER_DOWN and frame is not None
        assert frame.peer_down.peer_id == p.node_id and frame.peer_down.reporter_id == r.ctx.node_id
        assert q.node_id in r.ctx.conns

    asyncio.run(go())


def test_a_successful_probe_keeps_the_peer(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path, dial_ok=True)
        p, pc, _ = r.peer()
        assert await r.watch.probe(p.node_id, report=True)
        assert pc.closed and r.ctx.conns[p.node_id] is not pc  # the fresh connection replaced it
        assert r.ctx.counters["liveness.probe_ok"] == 1 and r.ctx.liveness.state(p.node_id) == PeerState.ALIVE

    asyncio.run(go())


def test_down_reports_are_checked_before_believed(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path)
        reporter, rep_pc, rep_end = r.peer()
        target, _, target_end = r.peer()
        pinger = asyncio.ensure_future(answer_pings(target_end))

        async def report(reporter_id: bytes) -> None:
            fs = FramedStream.opened(await rep_end.open_bi(), StreamType.PEER_DOWN)
            await fs.send(make_frame(peer_down=pb.PeerDown(peer_id=target.node_id, reporter_id=reporter_id)))
            await fs.finish()
            _, mine = await accept_stream(rep_pc.conn)  # type: ignore[arg-type]
            await r.watch.handle_peer_down(rep_pc, mine)

        await report(target.node_id)  # someone else's name as reporter
        assert r.ctx.counters["liveness.forged_down_report"] == 1
        await report(reporter.node_id)
        await settle()
        assert r.ctx.counters["liveness.down_report_refuted"] == 1  # our own ping got through
        assert r.ctx.liveness.state(target.node_id) == PeerState.ALIVE
        await report(reporter.node_id)  # the same reporter again at once: rate-limited
        assert r.ctx.counters["liveness.down_report_ignored"] == 1
        pinger.cancel()

    asyncio.run(go())


def test_leaving_is_believed_only_from_the_peer_itself(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path)
        p, pc, p_end = r.peer()
        final = signed_announcement(p, r.ctx.mesh_gossip.mesh_id, r.clock, seq=2, leaving=True)

        async def leave(peer_id: bytes) -> None:
            fs = FramedStream.opened(await p_end.open_bi(), StreamType.PEER_LEAVING)
            await fs.send(make_frame(peer_leaving=pb.PeerLeaving(peer_id=peer_id, final_announcement=final)))
            await fs.finish()
            _, mine = await accept_stream(pc.conn)  # type: ignore[arg-type]
            await r.watch.handle_leaving(pc, mine)

        await leave(b"\x04" * 32)
        assert r.ctx.counters["liveness.forged_leaving"] == 1 and p.node_id in r.ctx.conns
        await leave(p.node_id)
        assert r.ctx.liveness.state(p.node_id) == PeerState.LEFT and p.node_id not in r.ctx.conns
        assert r.kinds() == ["peer_left"] and r.resigns == [True]

    asyncio.run(go())


def test_a_lost_connection_is_probed_unless_the_peer_said_it_was_leaving(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path)
        p, pc, _ = r.peer()
        r.watch.conn_lost(pc, f"ApplicationClosed {{ error_code: {CLOSE_LEAVING}, }}")
        assert r.ctx.liveness.state(p.node_id) == PeerState.LEFT and r.dials == []
        q, qc, _ = r.peer()
        r.watch.conn_lost(qc, "connection lost")
        assert r.ctx.counters["conn.lost"] == 2 and q.node_id not in r.ctx.conns
        await r.advance(r.ctx.timers.failure_retry)  # a moment for a winning duplicate to show up
        assert r.dials == [q.node_id] and r.ctx.liveness.state(q.node_id) == PeerState.DOWN

    asyncio.run(go())


def test_prune_forgets_down_peers_and_stale_ghosts(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path)
        t = r.ctx.timers
        p, pc, _ = r.peer()
        r.health.failed(p.node_id)
        r.watch.declare_down(p.node_id, broadcast=False)
        assert pc.conn.closed_with == (CLOSE_DOWN, b"down")  # type: ignore[attr-defined]
        ghost = NodeIdentity.generate()  # learned second-hand, never connected
        r.ctx.mesh_gossip.offer(signed_announcement(ghost, r.ctx.mesh_gossip.mesh_id, r.clock), r.clock.time())
        pruner = asyncio.ensure_future(r.watch.prune_loop())
        await r.advance(t.prune_after + 1)
        await r.advance(1)
        assert r.ctx.mesh_gossip.get(p.node_id) is None and r.ctx.liveness.get(p.node_id) is None
        assert r.health.get(p.node_id) is None and r.ctx.counters["liveness.pruned"] == 1
        assert r.ctx.mesh_gossip.get(ghost.node_id) is not None  # still fresh
        await r.advance(t.stale_after)
        await r.advance(1)
        assert r.ctx.mesh_gossip.get(ghost.node_id) is None and r.ctx.counters["liveness.pruned_stale"] == 1
        assert stale_ghosts([], [], 0.0, 1.0) == []
        pruner.cancel()

    asyncio.run(go())


def test_farewell_reaches_every_peer(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path)
        ends = [r.peer()[2] for _ in range(2)]
        final = r.node.announcer.build(leaving=True)

        async def peer_side(end: FakeConn) -> bytes:
            stype, frame, fs = await read_stream(end)
            await fs.finish()
            assert stype == StreamType.PEER_LEAVING and frame is not None
            return bytes(frame.peer_leaving.peer_id)

        readers = [asyncio.ensure_future(peer_side(e)) for e in ends]
        await r.watch.farewell(lambda: final)
        assert [await x for x in readers] == [r.ctx.node_id] * 2

    asyncio.run(go())
