"""The admission handshake from both ends over in-memory connections (no QUIC), on a fake clock."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Optional

import pytest

from mesh402.mesh import invite
from mesh402.mesh.admission import Admission
from mesh402.mesh.conns import CLOSE_PROTOCOL, CLOSE_REJECTED, PeerConn
from mesh402.mesh.errors import AdmissionRefused
from mesh402.mesh.framing import FramedStream, StreamType, make_frame
from mesh402.mesh.gossip import Outcome
from mesh402.mesh.invite import InviteError
from mesh402.mesh.invites import InviteBook
from mesh402.mesh.proto import mesh_pb2 as pb
from tests.support.mesh_fakes import FakeConn, Node, conn_pair, make_node, settle


class Side:
    """One node's admission, recording what it registers and what its merges were."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registered: list[PeerConn] = []
        self.offers: list[tuple[Outcome, Optional[bytes], bool]] = []
        self.invites = InviteBook(node.ctx, lambda: ["127.0.0.1:1"], node.announcer.spend)
        self.adm = Admission(node.ctx, self.invites.use,
                             lambda o, a, via, hello: self.offers.append((o, via, hello)), self.registered.append)


def credential(a: Node, single_use: bool = False) -> pb.InviteCredential:
    m = a.ctx.membership
    assert m.secret is not None and m.mesh_id is not None
    return invite.make_credential(m.secret, m.mesh_id, a.node_id, int(a.clock.time()) + 3600, pb.ADMISSION_SECRET,
                                  single_use=single_use)


async def handshake(acceptor: Side, dialer: Side, cred: Optional[pb.InviteCredential]) -> PeerConn:
    at_acceptor, at_dialer = conn_pair(acceptor.node.node_id, dialer.node.node_id)
    server = asyncio.ensure_future(acceptor.adm.server_handshake(at_acceptor))
    try:
        return await dialer.adm.client_handshake(at_dialer, acceptor.node.node_id, cred)
    finally:
        await server


def test_a_newcomer_with_an_invite_is_admitted_and_given_the_secret(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        b = Side(make_node(tmp_path / "b", mesh_of=a.node, member=False))
        assert not b.node.ctx.membership.is_member
        pc = await handshake(a, b, credential(a.node))
        assert pc.initiator and pc.node_id == a.node.node_id and pc.boot_id == a.node.ctx.boot_id
        assert b.registered == [pc]
        (theirs,) = a.registered
        assert theirs.node_id == b.node.node_id and not theirs.initiator and theirs.boot_id == b.node.ctx.boot_id
        assert b.node.ctx.membership.secret == a.node.ctx.membership.secret  # adopted from the Welcome
        assert a.node.ctx.counters["admission.accepted"] == 1
        assert (Outcome.NEW, b.node.node_id, True) in a.offers  # the Hello's announcement, not dialled back
        assert (Outcome.NEW, a.node.node_id, False) in b.offers  # the Welcome's announcements
        assert b.node.ctx.mesh_gossip.get(a.node.node_id) is not None

    asyncio.run(go())


def test_a_member_is_admitted_by_its_membership_proof(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        b = Side(make_node(tmp_path / "b", mesh_of=a.node))
        assert b.adm.hello(b.node.ctx.mesh_gossip.mesh_id, a.node.node_id, None).WhichOneof("proof") == "member_proof"
        await handshake(a, b, None)
        assert len(a.registered) == len(b.registered) == 1

    asyncio.run(go())


def test_no_credential_is_rejected_and_the_connection_closed(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        b = Side(make_node(tmp_path / "b", mesh_of=a.node, member=False))
        at_a, at_b = conn_pair(a.node.node_id, b.node.node_id)
        server = asyncio.ensure_future(a.adm.server_handshake(at_a))
        with pytest.raises(AdmissionRefused) as ei:
            await b.adm.client_handshake(at_b, a.node.node_id, None)
        await server
        assert ei.value.code == "no_credential" and b.node.ctx.counters["dial.rejected"] == 1
        assert at_a.closed_with == (CLOSE_REJECTED, b"no_credential")
        assert a.node.ctx.counters["admission.rejected.no_credential"] == 1 and not a.registered
        assert a.node.ctx.mesh_gossip.peers() == {}  # a refused Hello stores nothing

    asyncio.run(go())


def test_anything_but_a_hello_first_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        at_a, at_b = conn_pair(a.node.node_id, b"\x09" * 32)
        fs = FramedStream.opened(await at_b.open_bi(), StreamType.STAGE)
        await fs.send(make_frame(ping=pb.Ping(nonce=1)))
        await a.adm.server_handshake(at_a)
        assert at_a.closed_with == (CLOSE_PROTOCOL, b"hello first")
        assert a.node.ctx.counters["admission.rejected.unadmitted_stream"] == 1

    asyncio.run(go())


def test_spent_and_single_use_tokens(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        b = Side(make_node(tmp_path / "b", mesh_of=a.node))
        once = credential(a.node, single_use=True)
        with pytest.raises(InviteError, match="only by the member that minted it"):
            b.invites.use(once)
        a.invites.use(once)  # honoured once, by its issuer, and spent mesh-wide
        assert once.nonce.hex() in a.node.ctx.membership.spent
        with pytest.raises(InviteError) as ei:
            a.invites.use(once)
        assert ei.value.code == "spent"
        token = a.invites.mint(600)
        assert a.invites.revoke(token)["state"] == "revoked"
        assert a.invites.revoke(token)["state"] == "already revoked"
        with pytest.raises(InviteError, match="revoked"):
            a.invites.use(invite.decode_token(token).credential)

    asyncio.run(go())


class Incoming:
    def __init__(self, conn: Optional[FakeConn], ip: str = "10.0.0.1", validated: bool = True) -> None:
        self.conn = conn
        self.refused = False
        self.retried = False
        self.ip = ip
        self.validated = validated

    async def remote_addr(self) -> object:
        return types.SimpleNamespace(addr=f"{self.ip}:4433")

    async def remote_addr_validated(self) -> bool:
        return self.validated

    async def retry(self) -> None:
        self.retried = True

    async def accept(self) -> "Incoming":
        if self.conn is None:
            raise ConnectionError("handshake failed")
        return self

    async def connect(self) -> FakeConn:
        assert self.conn is not None
        return self.conn

    async def refuse(self) -> None:
        self.refused = True


class Listener:
    def __init__(self, items: list[Optional[Incoming]]) -> None:
        self.items = items

    async def accept_next(self) -> Optional[Incoming]:
        return self.items.pop(0) if self.items else None


def test_accept_loop_counts_failures_and_refuses_when_busy(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        broken = Incoming(None)
        await a.adm.accept_loop(Listener([broken]))
        await settle()
        assert a.node.ctx.counters["admission.handshake_failed"] == 1 and a.adm.pending == 0
        lim = a.node.ctx.config.limits
        a.adm.pending = lim.max_pending
        extra = Incoming(None)
        await a.adm.accept_loop(Listener([extra]))
        assert extra.refused and a.node.ctx.counters["admission.refused_busy"] == 1

    asyncio.run(go())


def test_one_address_holds_at_most_its_share_of_pending_handshakes(tmp_path: Path) -> None:
    async def go() -> None:
        a = Side(make_node(tmp_path / "a"))
        lim = a.node.ctx.config.limits
        a.adm.pending = lim.max_pending_per_addr
        a.adm.pending_by_source["10.0.0.66"] = lim.max_pending_per_addr  # a flood from one address
        flood, other = Incoming(None, "10.0.0.66"), Incoming(None, "10.0.0.7")
        await a.adm.accept_loop(Listener([flood, other]))
        await settle()
        assert flood.refused and not other.refused  # the other address got its handshake (it failed: no conn)
        assert a.node.ctx.counters["admission.refused_busy_source"] == 1
        assert a.node.ctx.counters["admission.handshake_failed"] == 1
        # under load, an address QUIC has not validated is asked to prove it first (no spoofed slots)
        a.adm.pending = lim.max_pending // 2
        spoofed = Incoming(None, "10.0.0.7", validated=False)
        await a.adm.accept_loop(Listener([spoofed]))
        assert spoofed.retried and not spoofed.refused and a.node.ctx.counters["admission.retry"] == 1

    asyncio.run(go())
