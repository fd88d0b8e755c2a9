"""Dialling (mesh402.mesh.dialer) with a scripted connect and handshake on a fake clock: who is
dialled when, how failures back off through the health tracker, and what joining reports."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import pytest

from mesh402.mesh.announce import LocalInfo
from mesh402.mesh.config import MeshConfig, MeshTimers
from mesh402.mesh.conns import PeerConn
from mesh402.mesh.dialer import Dialer
from mesh402.mesh.errors import AdmissionRefused, JoinError
from mesh402.mesh.health import Backoff, HealthTracker
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.service import MeshService
from tests.support.mesh_fakes import FakeConn, advance, make_node, settle, signed_announcement


class Rig:
    def __init__(self, tmp_path: Path, reachable: bool = False, refuse: bool = False) -> None:
        self.node = make_node(tmp_path / "a")
        self.ctx = self.node.ctx
        self.clock = self.node.clock
        self.reachable = reachable
        self.refuse = refuse
        self.connects: list[tuple[bytes, float]] = []  # (node id, monotonic time)
        t = self.ctx.timers
        self.health: HealthTracker[bytes] = HealthTracker(self.clock, Backoff(t.reconnect_interval, t.redial_backoff_max))
        self.local = LocalInfo()
        self.dialer = Dialer(self.ctx, self.local, self._connect, self._handshake, self.health, lambda nid: False)

    async def _connect(self, nid: bytes, addrs: list[str], relay: str) -> FakeConn:
        self.connects.append((nid, self.clock.monotonic()))
        if not self.reachable:
            raise ConnectionError("unreachable")
        return FakeConn(remote=nid)

    async def _handshake(self, conn: FakeConn, nid: bytes, cred: Optional[pb.InviteCredential]) -> PeerConn:  # type: ignore[override]
        if self.refuse:
            raise AdmissionRefused(nid, "no credential", "no_credential")
        pc = PeerConn(nid, conn, True, 1, self.clock.monotonic())
        self.ctx.conns[nid] = pc
        return pc

    def learn(self, larger: bool = True, **fields: object) -> bytes:
        """A peer in gossip whose id is larger (it waits for us to dial) or smaller than ours."""
        while True:
            ident = NodeIdentity.generate()
            if (ident.node_id > self.ctx.node_id) == larger:
                break
        sa = signed_announcement(ident, self.ctx.mesh_gossip.mesh_id, self.clock, addrs=["127.0.0.1:9"], **fields)
        self.ctx.mesh_gossip.offer(sa, self.clock.time())
        return ident.node_id

    def dialled(self) -> list[float]:
        return [t for _, t in self.connects]

    async def advance(self, seconds: float) -> None:
        await advance(self.clock, seconds)


def test_the_smaller_id_dials_first_the_larger_after_a_grace(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path, reachable=True)
        larger, smaller = r.learn(larger=True), r.learn(larger=False)
        r.dialer.maybe_dial(larger)
        r.dialer.maybe_dial(smaller)
        await settle()
        assert [n for n, _ in r.connects] == [larger]
        await r.advance(r.ctx.timers.transitive_dial_grace)
        assert [n for n, _ in r.connects] == [larger, smaller] and r.dialer.dialing == {}
        assert r.ctx.counters["dial.transitive_ok"] == 2 and set(r.ctx.conns) == {larger, smaller}
        r.dialer.maybe_dial(larger)  # connected: nothing to do
        r.dialer.maybe_dial(r.ctx.node_id)
        await settle()
        assert len(r.connects) == 2

    asyncio.run(go())


def test_leaving_and_client_peers_are_not_dialled(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path, reachable=True)
        r.dialer.maybe_dial(r.learn(leaving=True))
        r.dialer.maybe_dial(b"\xff" * 32)  # never heard of
        r.ctx.config.dial_client_peers = False
        r.local.kind = "client"
        r.dialer.maybe_dial(r.learn(kind=pb.NODE_KIND_CLIENT))
        await settle()
        assert r.connects == []

    asyncio.run(go())


def test_redials_back_off_exponentially_up_to_the_cap(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path)
        t = r.ctx.timers
        assert (t.reconnect_interval, t.redial_backoff_max) == (1.0, 4.0)
        peer = r.learn()
        loop = asyncio.ensure_future(r.dialer.reconnect_loop())
        for _ in range(13):
            await r.advance(t.reconnect_interval)
        # one try a round at first, then every 2, then every 4 (the cap)
        assert r.dialled() == [1.0, 2.0, 4.0, 8.0, 12.0]
        assert r.health.failures(peer) == 5 and r.ctx.counters["dial.backoff"] == 8
        r.dialer.maybe_dial(peer, immediate=True)  # fresh evidence it is up: no waiting
        await settle()
        assert r.dialled()[-1] == 13.0
        r.reachable = True
        await r.advance(4.0)
        assert peer in r.ctx.conns and r.health.failures(peer) == 0
        loop.cancel()

    asyncio.run(go())


def test_join_reports_one_line(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path)
        mesh_id = r.ctx.mesh_gossip.mesh_id
        own = pb.InviteToken(mesh_id=mesh_id, node_id=r.ctx.node_id, addrs=["127.0.0.1:1"])
        with pytest.raises(JoinError, match="points at this node itself"):
            await r.dialer.join([own])
        tok = pb.InviteToken(mesh_id=mesh_id, node_id=b"\x07" * 32, addrs=["10.0.0.1:7"])
        assert (r.ctx.timers.join_attempts, r.ctx.timers.join_backoff) == (3, 0.3)
        joining = asyncio.ensure_future(r.dialer.join([tok]))
        await r.advance(0.2)
        assert len(r.connects) == 1  # join_backoff between the first two attempts...
        await r.advance(0.1)
        await r.advance(0.6)  # ...then twice that
        with pytest.raises(JoinError, match=r"could not reach the mesh at 10\.0\.0\.1:7 \(unreachable\)"):
            await joining
        assert r.dialled() == pytest.approx([0.0, 0.3, 0.9])
        r.reachable, r.refuse = True, True
        with pytest.raises(JoinError, match="join refused by .*: no credential"):
            await r.dialer.join([tok])
        r.refuse = False
        await r.dialer.join([tok])
        assert b"\x07" * 32 in r.ctx.conns

    asyncio.run(go())


def test_rejoin_dials_remembered_peers_not_held_back(tmp_path: Path) -> None:
    async def go() -> None:
        r = Rig(tmp_path)
        ok, failing = b"\x21" * 32, b"\x22" * 32
        for nid in (ok, failing):
            r.ctx.membership.remember_peer(nid.hex(), ["127.0.0.1:9"])
        r.health.failed(failing)
        await r.dialer.rejoin_known()
        await settle()
        assert [n for n, _ in r.connects] == [ok]

    asyncio.run(go())


def test_the_service_hands_one_tracker_to_its_collaborators(tmp_path: Path) -> None:
    """MeshService.health is the tracker the redials use (replica retry and failover can share it)."""
    s = MeshService(MeshConfig(home=tmp_path / "s", bind_ip="127.0.0.1", timers=MeshTimers.fast()))
    assert s.dialer.health is s.health and s.watch.health is s.health
    assert s.health.backoff == Backoff(base=1.0, cap=4.0)
