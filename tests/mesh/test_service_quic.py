"""MeshService instances in one process over real loopback QUIC."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mesh402.mesh import invite
from mesh402.mesh.config import MeshConfig, MeshTimers
from mesh402.mesh.framing import StreamType, make_frame
from mesh402.mesh.invite import InviteError
from mesh402.mesh.liveness import PeerState
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.service import JoinError, MeshService

pytestmark = pytest.mark.timeout(300)  # a hang guard, with room for a loaded 2-worker run


def svc(tmp: Path, name: str, timers: MeshTimers | None = None, **kw) -> MeshService:
    return MeshService(MeshConfig(home=tmp / name, bind_ip="127.0.0.1", timers=timers or MeshTimers.fast(), **kw))


async def wait_for(pred, timeout=10.0, step=0.02) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if pred():
            return time.perf_counter() - t0
        await asyncio.sleep(step)
    raise AssertionError("condition not met in time")


def full_mesh(nodes) -> bool:
    ids = {n.node_id for n in nodes}
    return all(set(n.connected_peers()) == ids - {n.node_id} for n in nodes)


def run(coro):
    return asyncio.run(coro)


def test_three_nodes_full_mesh_and_leave_and_rejoin(tmp_path):
    async def go():
        a, b, c = svc(tmp_path, "a"), svc(tmp_path, "b", kind="client"), svc(tmp_path, "c")
        await a.start()
        await b.start(join=a.invite_token)
        t0 = time.perf_counter()
        await c.start(join=b.invite_token)  # joins through b, must still reach a
        waited = await wait_for(lambda: full_mesh([a, b, c]))
        print(f"full mesh {time.perf_counter() - t0:.3f}s after the third join")
        assert a.mesh_id == b.mesh_id == c.mesh_id
        assert a.membership.secret == b.membership.secret == c.membership.secret
        # b's kind gossips to c; statuses carry RTTs after a heartbeat
        await wait_for(lambda: all(p["rtt_ms"] is not None for n in (a, b, c) for p in n.status()["peers"]))
        kinds = {p["node_id"]: p["announcement"]["kind"] for p in c.status()["peers"]}
        assert kinds[b.node_id.hex()] == "client"
        # model roles propagate
        a.update_local(models=[pb.ModelEntry(model_id="m1", content_hash="aa" * 32, role=pb.MODEL_ROLE_HOST, n_layers=30)])
        await wait_for(lambda: c.gossip.get(a.node_id).models and c.gossip.get(a.node_id).models[0].model_id == "m1")
        # graceful leave
        c_id, c_home = c.node_id, c.home
        await c.stop()
        # LEFT, or already pruned after it (fast timers prune 3 s after the leave, which c.stop() can outlast)
        def saw_c_leave(n: MeshService) -> bool:
            state = n.liveness.state(c_id)
            return state == PeerState.LEFT or (state is None and n.counters.get("liveness.left", 0) >= 1)

        await wait_for(lambda: saw_c_leave(a) and saw_c_leave(b))
        # restart with the same home: same id, rejoins without a token
        c2 = MeshService(MeshConfig(home=c_home, bind_ip="127.0.0.1", timers=MeshTimers.fast()))
        assert c2.node_id == c_id
        await c2.start()
        await wait_for(lambda: full_mesh([a, b, c2]))
        assert a.liveness.state(c_id) == PeerState.ALIVE
        for n in (a, b, c2):
            assert n.counters.get("internal.task_error", 0) == 0
        await asyncio.gather(a.stop(), b.stop(), c2.stop())

    run(go())


def test_abrupt_loss_is_detected_and_reported(tmp_path):
    async def go():
        a, b, c = svc(tmp_path, "a"), svc(tmp_path, "b"), svc(tmp_path, "c")
        await a.start()
        await b.start(join=a.invite_token)
        await c.start(join=a.invite_token)
        await wait_for(lambda: full_mesh([a, b, c]))
        # c vanishes without a goodbye: drop its endpoint only
        c.tasks.stopping = True
        for t in list(c.tasks.running):
            t.cancel()
        await c.endpoint.close()
        t0 = time.perf_counter()
        await wait_for(lambda: a.liveness.state(c.node_id) == PeerState.DOWN and b.liveness.state(c.node_id) == PeerState.DOWN)
        print(f"down after {time.perf_counter() - t0:.3f}s")
        assert a.liveness.state(b.node_id) == PeerState.ALIVE
        # pruned after prune_after
        await wait_for(lambda: a.gossip.get(c.node_id) is None, timeout=10)
        await asyncio.gather(a.stop(), b.stop())

    run(go())


def test_bad_tokens_are_refused_clearly(tmp_path):
    async def go():
        a = svc(tmp_path, "a")
        await a.start()
        good = invite.decode_token(a.invite_token)
        # a token minted with the wrong secret, pointing at a
        wrong = invite.mint_token(mesh_id=a.mesh_id, secret=b"W" * 32, policy=pb.ADMISSION_SECRET, node_id=a.node_id, addrs=list(good.addrs))
        x = svc(tmp_path, "x")
        with pytest.raises(JoinError) as ei:
            await x.start(join=wrong)
        assert "credential check failed" in str(ei.value) and "\n" not in str(ei.value)
        # edited expiry, checksum recomputed
        edited = pb.InviteToken()
        edited.CopyFrom(good)
        edited.credential.expires_at += 10_000
        y = svc(tmp_path, "y")
        with pytest.raises(JoinError, match="credential check failed"):
            await y.start(join=invite.encode_token(edited))
        # expired: refused locally before dialing
        expired = invite.mint_token(mesh_id=a.mesh_id, secret=a.membership.secret, policy=pb.ADMISSION_SECRET,
                                    node_id=a.node_id, addrs=list(good.addrs), expires_in=-5)
        with pytest.raises(InviteError, match="expired"):
            await svc(tmp_path, "z").start(join=expired)
        # garbled
        with pytest.raises(InviteError):
            await svc(tmp_path, "w").start(join=a.invite_token[:-6] + "AAAAAA")
        counters = a.all_counters()
        assert counters["admission.rejected.bad_credential"] == 2
        assert a.connected_peers() == []
        # nothing a rejected node sent made it into a's view
        assert a.gossip.peers() == {}
        await a.stop()

    run(go())


def test_open_mesh_and_registered_handlers(tmp_path):
    async def go():
        a = svc(tmp_path, "a", policy="open")
        b = svc(tmp_path, "b")
        await a.start()
        tok = invite.decode_token(a.invite_token)
        assert tok.policy == pb.ADMISSION_OPEN
        await b.start(join=a.invite_token)
        assert b.membership.policy == pb.ADMISSION_OPEN and b.membership.secret is None

        async def stage_handler(peer_id: bytes, fs):
            f = await fs.recv(5)
            f.stage.output_hash = b"\x01" * 32
            f.stage.kind = pb.STAGE_KIND_RESULT
            await fs.send(f)

        a.register_handler(StreamType.STAGE, stage_handler)
        reply = await b.request(a.node_id, StreamType.STAGE, make_frame(stage=pb.StageFrame(request_id="r1", plan_epoch=4, activations=b"\x00" * 100_000)))
        assert reply.stage.request_id == "r1" and reply.stage.kind == pb.STAGE_KIND_RESULT and reply.stage.plan_epoch == 4
        # an unregistered stream type is refused without hurting the connection
        with pytest.raises(Exception):
            await b.request(a.node_id, StreamType.HTTP_TUNNEL, make_frame(http=pb.HttpTunnelFrame(request_id="x")), timeout=3)
        assert a.all_counters()["stream.no_handler"] == 1
        assert await b.ping(a.node_id) > 0
        with pytest.raises(ValueError):
            a.register_handler(StreamType.GOSSIP, stage_handler)
        await asyncio.gather(a.stop(), b.stop())

    run(go())


def test_busy_peer_is_slow_not_down(tmp_path):
    """A peer whose Python loop is blocked (a long import, GIL-heavy work) keeps its QUIC
    connection alive: heartbeats count it slow, not down. Here b blocks for 4 s, eight
    times the heartbeat timeout (a gives up after 8 s unanswered: room for b's backlog on a loaded machine)."""
    import threading

    ready, stop, box = threading.Event(), threading.Event(), {}

    def run_a() -> None:
        async def main() -> None:
            a = svc(tmp_path, "a", MeshTimers.fast(max_unresponsive=8.0))
            await a.start()
            box["a"], box["token"] = a, a.invite_token
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await a.stop()

        asyncio.run(main())

    t = threading.Thread(target=run_a, daemon=True)
    t.start()
    assert ready.wait(10)

    async def go() -> None:
        b = svc(tmp_path, "b", MeshTimers.fast(max_unresponsive=8.0))
        await b.start(join=box["token"])
        a = box["a"]
        await wait_for(lambda: a.liveness.state(b.node_id) == PeerState.ALIVE)
        await asyncio.sleep(0.5)
        t_end = time.monotonic() + 4.0
        while time.monotonic() < t_end:  # b's event loop is stuck
            pass
        await asyncio.sleep(1.0)
        assert a.liveness.state(b.node_id) == PeerState.ALIVE, a.all_counters()
        assert a.counters["liveness.ping_slow"] >= 1
        assert a.counters.get("liveness.down", 0) == 0
        assert b.liveness.state(a.node_id) == PeerState.ALIVE, b.all_counters()
        await b.stop()

    try:
        asyncio.run(go())
    finally:
        stop.set()
        t.join(10)


def test_demand_signals_gossip(tmp_path):
    async def go():
        a, b = svc(tmp_path, "a"), svc(tmp_path, "b")
        await a.start()
        await b.start(join=a.invite_token)
        a.update_local(models=[pb.ModelEntry(model_id="m1", role=pb.MODEL_ROLE_HOST)])
        b.update_local(models=[pb.ModelEntry(model_id="m2", role=pb.MODEL_ROLE_ON_DISK)])
        await wait_for(lambda: all(n.demand.in_mesh(m) for n in (a, b) for m in ("m1", "m2")))
        for _ in range(3):
            a.note_request("m1")
        b.note_request("m1")
        b.note_request("m2", 5)
        a.note_request("auto")  # not a demand signal
        for n in (a, b):  # each learns the other's signals by gossip, in its own time
            await wait_for(lambda: n.demand_view().get("m1", {}).get("requests") == 4 and "m2" in n.demand_view())
        v = b.status()["demand"]
        assert v["m1"]["requests"] == 4 and v["m1"]["nodes"] == 2 and v["m2"]["requests"] == 5
        assert "auto" not in v
        await asyncio.gather(a.stop(), b.stop())

    run(go())


def test_single_use_and_revoked_tokens_are_refused_mesh_wide(tmp_path):
    """A single-use token admits one node, at its issuer only; a revoked token admits no one at any member,
    the revocation reaching them by gossip and surviving a restart; members admitted before stay."""
    async def go():
        a, b = svc(tmp_path, "a"), svc(tmp_path, "b")
        await a.start()
        once = a.mint_invite(600, single_use=True)
        assert invite.describe_token(invite.decode_token(once))["single_use"] is True
        await b.start(join=once)
        await wait_for(lambda: full_mesh([a, b]))
        with pytest.raises(JoinError, match="already used") as ei:
            await svc(tmp_path, "c").start(join=once)
        assert "\n" not in str(ei.value) and a.all_counters()["admission.rejected.spent"] == 1
        # the flag is under the MAC: a single-use token edited into a reusable one fails the check
        edited = invite.decode_token(once)
        edited.credential.single_use = False
        with pytest.raises(JoinError, match="credential check failed"):
            await svc(tmp_path, "c2").start(join=invite.encode_token(edited))
        # a single-use token is honoured by its issuer alone
        with pytest.raises(InviteError, match="only by the member that minted it"):
            b.invites.use(invite.decode_token(a.mint_invite(600, single_use=True)).credential)

        # b mints a reusable token; a revokes it; b learns it by gossip and refuses it
        by_b = b.mint_invite(600)
        assert a.revoke_invite(by_b)["state"] == "revoked" and a.revoke_invite(by_b)["state"] == "already revoked"
        assert a.revoke_invite(a.mint_invite(-5))["state"] == "expired"
        nonce = invite.decode_token(by_b).credential.nonce.hex()
        waited = await wait_for(lambda: nonce in b.membership.spent)
        print(f"\nrevocation reached the other member in {waited * 1000:.0f} ms")
        with pytest.raises(JoinError, match="revoked"):
            await svc(tmp_path, "d").start(join=by_b)
        assert b.all_counters()["admission.rejected.spent"] == 1
        with pytest.raises(InviteError, match="another mesh"):
            a.revoke_invite(invite.mint_token(
                mesh_id="ff" * 16, secret=b"S" * 32, policy=pb.ADMISSION_SECRET, node_id=a.node_id, addrs=["127.0.0.1:1"]))
        assert full_mesh([a, b])  # b itself, admitted by a spent token, stays a member

        # the spent set is kept across a restart
        b_home = b.home
        await b.stop()
        b2 = MeshService(MeshConfig(home=b_home, bind_ip="127.0.0.1", timers=MeshTimers.fast()))
        assert nonce in b2.membership.spent
        await b2.start()
        await wait_for(lambda: full_mesh([a, b2]))
        from mesh402.mesh import spent
        b2_says = spent.decode(a.gossip.get(b2.node_id).labels.get(spent.SPENT_LABEL, ""))
        assert nonce in b2_says and len(b2_says) == 2  # the used single-use token and the revoked one
        await asyncio.gather(a.stop(), b2.stop())

    run(go())
