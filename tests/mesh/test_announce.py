"""The node's own announcement, demand signals and status (mesh402.mesh.announce, demand, status),
on a fake clock without a network."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mesh402.mesh import spent
from mesh402.mesh.announce import rtts_moved
from mesh402.mesh.demand import DemandBook, mesh_demand
from mesh402.mesh.gossip import Entry
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.status import all_counters, report
from tests.support.mesh_fakes import make_node, settle, signed_announcement

A, B = b"\x01" * 32, b"\x02" * 32


def test_rtts_moved_ignores_jitter() -> None:
    assert not rtts_moved({A: 10.0}, {A: 11.0})
    assert rtts_moved({A: 10.0}, {A: 13.0})
    assert rtts_moved({A: 10.0, B: 1.0}, {A: 10.0})
    assert not rtts_moved({A: 0.01}, {A: 0.05})  # sub-0.05 ms wobble on loopback


def test_resign_stores_persists_and_pushes(tmp_path: Path) -> None:
    n = make_node(tmp_path / "a")
    events = n.events()
    seq0 = n.announcer.own().seq  # type: ignore[union-attr]
    n.announcer.update_local(name="x", api_port=8080)
    own = n.announcer.own()
    assert own is not None and own.seq > seq0 and own.name == "x" and own.api_port == 8080
    assert n.saves and n.pushes == [1] and events.get_nowait()["type"] == "self_updated"
    with pytest.raises(AttributeError):
        n.announcer.update_local(colour="red")
    n.announcer.jump_past(own.seq + 1000)  # an earlier incarnation got further
    assert n.announcer.own().seq > own.seq + 1000  # type: ignore[union-attr]


def test_spent_invites_ride_in_the_labels(tmp_path: Path) -> None:
    n = make_node(tmp_path / "a")
    nonce = "cd" * 16
    exp = int(n.clock.time()) + 600
    assert n.announcer.spend({nonce: exp}) and not n.announcer.spend({nonce: exp})
    own = n.announcer.own()
    assert own is not None and spent.decode(own.labels[spent.SPENT_LABEL]) == {
        nonce: spent.vouch(n.ctx.identity.sign, n.ctx.node_id, n.ctx.mesh_gossip.mesh_id, nonce, exp)}
    assert n.ctx.counters["invites.spent_merged"] == 1


def test_the_announcement_is_signed_again_when_rtts_move_or_it_gets_old(tmp_path: Path) -> None:
    async def go() -> None:
        n = make_node(tmp_path / "a")
        t = n.ctx.timers
        loop = asyncio.ensure_future(n.announcer.loop())
        seq = n.announcer.own().seq  # type: ignore[union-attr]
        n.ctx.liveness.connected(A)
        n.ctx.liveness.heartbeat_ok(A, 5.0)
        await settle()
        n.clock.advance(t.rtt_interval)
        await settle()
        own = n.announcer.own()
        assert own is not None and own.seq > seq and [r.node_id for r in own.rtts] == [A]
        seq = own.seq
        n.clock.advance(t.rtt_interval)
        await settle()
        assert n.announcer.own().seq == seq  # type: ignore[union-attr]  # nothing moved
        n.clock.advance(t.announce_refresh)
        await settle()
        assert n.announcer.own().seq > seq  # type: ignore[union-attr]
        loop.cancel()

    asyncio.run(go())


def test_demand_is_counted_published_once_and_summed_over_the_mesh(tmp_path: Path) -> None:
    async def go() -> None:
        n = make_node(tmp_path / "a")
        published: list[list[pb.DemandEntry]] = []
        book = DemandBook(n.ctx, published.append)
        book.note("m1")  # no one has m1 yet: an API client may name anything, it is not demand
        assert n.ctx.counters["demand.unknown_model"] == 1 and book.counts == {}
        n.announcer.update_local(models=[pb.ModelEntry(model_id="m1", role=pb.MODEL_ROLE_ON_DISK)])
        book.note("m1")
        book.note("m1", 2)
        book.note("auto")
        book.note("")
        await settle()
        n.clock.advance(n.ctx.timers.demand_announce_delay)
        await settle()
        assert len(published) == 1
        assert [(d.model_id, d.request_count) for d in published[0]] == [("m1", 3)]
        n.announcer.update_local(demand=published[0])
        peer, gone = NodeIdentity.generate(), NodeIdentity.generate()
        now_ms = int(n.clock.time() * 1000)
        for ident, count in ((peer, 4), (gone, 100)):
            demand = [pb.DemandEntry(model_id="m1", last_active_ms=now_ms, request_count=count)]
            n.ctx.mesh_gossip.offer(signed_announcement(ident, n.ctx.mesh_gossip.mesh_id, n.clock, demand=demand),
                                    n.clock.time())
        n.ctx.liveness.mark_down(gone.node_id)
        assert book.view() == {"m1": {"requests": 7, "last_active_ms": now_ms, "nodes": 2}}

    asyncio.run(go())


def test_old_demand_is_left_out() -> None:
    def entry(last_ms: int, count: int) -> Entry:
        ann = pb.PeerAnnouncement(demand=[pb.DemandEntry(model_id="m", last_active_ms=last_ms, request_count=count)])
        return Entry(pb.SignedAnnouncement(), ann, 0.0, None)

    assert mesh_demand([(A, entry(10, 3)), (B, entry(99, 1))], set(), cutoff_ms=50) == {
        "m": {"requests": 1, "last_active_ms": 99, "nodes": 1}}


def test_status_report(tmp_path: Path) -> None:
    n = make_node(tmp_path / "a")
    n.ctx.liveness.connected(A)
    n.ctx.counters["conn.established"] += 1
    n.ctx.mesh_gossip.counters["accepted"] += 2
    r = report(n.ctx, kind="serving", addrs=["127.0.0.1:1"], started_at=1.0, uptime_s=2.0004, joined_at=None,
               invite_token=None, own=n.announcer.own(), demand={})
    assert r["node_id"] == n.node_id.hex() and r["policy"] == "secret" and r["uptime_s"] == 2.0
    assert [p["node_id"] for p in r["peers"]] == [A.hex()] and r["peers"][0]["state"] == "alive"
    assert r["self"]["node_id"] == n.node_id.hex() and r["models"] == []
    assert r["counters"] == {"conn.established": 1, "gossip.accepted": 2}
    assert all_counters(n.ctx.counters, None) == {"conn.established": 1}
