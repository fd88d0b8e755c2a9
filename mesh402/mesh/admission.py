"""Admission: the handshake on a new connection, from both ends.

The dialer opens a GOSSIP stream and sends ``Hello`` (its signed announcement and an invite
credential, a membership proof, or nothing for an open mesh). The acceptor checks that the
announcement's origin is the TLS-authenticated remote id, its signature and freshness, and the proof
(:meth:`Admission.admit`). A failed check gets a ``Reject`` and the connection is closed: nothing else
is read from an unadmitted connection. Otherwise the acceptor answers ``Welcome`` (every announcement
it shares; the mesh secret to a node admitted by invite; an ack proving it is itself a member) and both
sides hand the connection to ``register``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, Callable, Optional, Protocol

from mesh402.mesh import framing, invite
from mesh402.mesh.context import MeshContext
from mesh402.mesh.conns import CLOSE_PROTOCOL, CLOSE_REJECTED, Conn, PeerConn
from mesh402.mesh.errors import AdmissionRefused, JoinError
from mesh402.mesh.framing import PROTOCOL_VERSION, FrameError, FramedStream, StreamType, make_frame, version_name
from mesh402.mesh.gossip import AnnouncementError, Outcome, open_announcement
from mesh402.mesh.gossip_push import OnOffer, pack, send_gossip, shareable
from mesh402.mesh.invite import InviteError
from mesh402.mesh.proto import mesh_pb2 as pb



class Incoming(Protocol):
    async def accept(self) -> Any: ...

    async def refuse(self) -> None: ...


async def source_of(incoming: Incoming) -> str:
    """Where a connection attempt comes from, for the per-address handshake quota: its IP address (any
    port), or the endpoint id a relay names."""
    try:
        a = await incoming.remote_addr()  # type: ignore[attr-defined]
    except Exception:
        return "?"
    ip = getattr(a, "addr", None)
    if isinstance(ip, str):
        return ip.rsplit(":", 1)[0].strip("[]")
    eid = getattr(a, "endpoint_id", None)
    return f"relay:{eid}" if eid is not None else str(a)


async def validated(incoming: Incoming) -> bool:
    try:
        return bool(await incoming.remote_addr_validated())  # type: ignore[attr-defined]
    except Exception:
        return True  # cannot tell: do not ask for a retry we cannot do


class Listener(Protocol):
    """What the accept loop calls on an iroh ``Endpoint``."""

    async def accept_next(self) -> Optional[Incoming]: ...


class Admission:
    def __init__(self, ctx: MeshContext, use_invite: Callable[[pb.InviteCredential], None],
                 on_offer: OnOffer, register: Callable[[PeerConn], None]) -> None:
        self.ctx = ctx
        self.use_invite = use_invite  # refuses spent tokens, spends single-use ones
        self.on_offer = on_offer
        self.register = register
        self.pending = 0  # handshakes in progress
        self.pending_by_source: collections.Counter[str] = collections.Counter()  # at most max_pending keys

    # ------------------------------------------------------------ acceptor

    def admit(self, remote: bytes, hello: pb.Hello
              ) -> tuple[pb.PeerAnnouncement, pb.Welcome, list[pb.SignedAnnouncement]]:
        """Check a Hello from ``remote``. Raises InviteError(code) on refusal, having stored nothing.
        Returns the peer's announcement, the Welcome and the announcements that did not fit in it
        (they follow as Gossip frames)."""
        ctx = self.ctx
        g = ctx.mesh_gossip
        m = ctx.membership
        left = ctx.quotas.ban_left(remote)
        if left is not None:
            raise InviteError(f"this node refuses you for {left:.0f} s more: you kept exceeding its quotas", "banned")
        if hello.protocol_version != PROTOCOL_VERSION:
            raise InviteError(f"the joining node speaks mesh protocol {version_name(hello.protocol_version)} "
                              f"({hello.software_version or 'unknown software'}), this node speaks protocol "
                              f"{PROTOCOL_VERSION} ({ctx.config.version or 'mesh402'}): run the same mesh402 "
                              "release on both", "protocol_version")
        if hello.mesh_id != g.mesh_id:
            raise InviteError("this node belongs to a different mesh", "wrong_mesh")
        now = ctx.clock.time()
        try:
            ann = open_announcement(hello.announcement, g.mesh_id, now, g.stale_after, g.max_skew, g.limits)
        except AnnouncementError as e:
            code = "forged" if e.outcome == Outcome.FORGED else e.outcome.value
            raise InviteError(f"announcement rejected: {e}", code) from None
        if bytes(ann.node_id) != remote:
            raise InviteError("announcement is not from the connecting node", "forged")
        proof = hello.WhichOneof("proof")
        admitted_by_invite = False
        if m.policy == pb.ADMISSION_OPEN:
            pass
        elif proof == "member_proof":
            invite.check_member_proof(hello.member_proof, m.secret, g.mesh_id, remote, ctx.node_id)
        elif proof == "invite":
            invite.verify_credential(hello.invite, mesh_id=g.mesh_id, secret=m.secret, policy=m.policy, now=now)
            self.use_invite(hello.invite)
            admitted_by_invite = True
        else:
            raise InviteError("no admission credential (this mesh needs an invite token)", "no_credential")
        outcome, _ = g.offer(hello.announcement, now, via=remote, direct_sender=True)
        if outcome == Outcome.REPLAYED:
            # Not an attack: the QUIC identity proves the origin itself is dialling
            # (e.g. we pruned it and it comes back with an unchanged announcement).
            # The newer announcement we hold, if any, stays.
            ctx.counters["admission.old_hello_announcement"] += 1
        ann_stored = g.get(remote)
        if outcome.accepted:
            self.on_offer(outcome, ann, remote, True)
        own = g.self_entry()
        everything = shareable(ctx)
        if own is not None:  # ours first: the joiner needs it from the Welcome itself
            everything = [own.signed] + [sa for sa in everything if sa is not own.signed]
        first, *rest = pack(everything)
        welcome = pb.Welcome(mesh_id=g.mesh_id, policy=m.policy, announcements=first,
                             protocol_version=PROTOCOL_VERSION)
        if m.policy == pb.ADMISSION_SECRET:
            assert m.secret is not None  # the proof or credential above was checked against it
            welcome.member_proof = invite.member_ack(m.secret, g.mesh_id, ctx.node_id, remote)
            if admitted_by_invite and hello.want_secret:
                welcome.mesh_secret = m.secret
        return (ann_stored or ann), welcome, [sa for group in rest for sa in group]

    async def accept_loop(self, listener: Listener) -> None:
        ctx = self.ctx
        while not ctx.stopping:
            try:
                incoming = await listener.accept_next()
            except Exception:
                if ctx.stopping:
                    return
                await asyncio.sleep(0.05)
                continue
            if incoming is None:
                return
            await self.triage(incoming)

    async def triage(self, incoming: Incoming) -> None:
        """Start the handshake, or refuse before the QUIC handshake (no work for a flood): past
        ``max_pending`` in all, or ``max_pending_per_addr`` from the source's address, so a flood from
        one address never holds the slots other nodes' joins and redials need; from an address a banned peer
        came from, one connection per ``rejoin_interval`` (fresh identities cost nothing). Under load, an address
        QUIC has not validated must first prove it receives (a retry), so a spoofed source cannot use
        up someone else's slots."""
        ctx, lim = self.ctx, self.ctx.config.limits
        try:
            if self.pending >= lim.max_pending // 2 and not await validated(incoming):
                ctx.counters["admission.retry"] += 1
                await incoming.retry()  # type: ignore[attr-defined]
                return
            source = await source_of(incoming)
            if self.pending >= lim.max_pending:
                ctx.counters["admission.refused_busy"] += 1
                await incoming.refuse()
            elif self.pending_by_source[source] >= lim.max_pending_per_addr:
                ctx.counters["admission.refused_busy_source"] += 1
                await incoming.refuse()
            elif not ctx.quotas.may_connect(source):  # a peer from there was banned: one try per interval
                ctx.counters["admission.refused_marked_source"] += 1
                await incoming.refuse()
            else:
                ctx.tasks.spawn(self.handle_incoming(incoming, source))
        except Exception:
            ctx.counters["admission.handshake_failed"] += 1

    async def handle_incoming(self, incoming: Incoming, source: str = "?") -> None:
        ctx = self.ctx
        self.pending += 1
        self.pending_by_source[source] += 1
        try:
            try:
                accepting = await incoming.accept()
                conn: Conn = await asyncio.wait_for(accepting.connect(), ctx.timers.connect_timeout)
            except Exception:
                ctx.counters["admission.handshake_failed"] += 1
                return
            try:
                await asyncio.wait_for(self.server_handshake(conn, source), ctx.timers.hello_timeout)
            except asyncio.TimeoutError:
                ctx.counters["admission.rejected.timeout"] += 1
                conn.close(CLOSE_PROTOCOL, b"hello timeout")
            except FrameError as e:
                ctx.counters[f"frame.{e.code}"] += 1
                ctx.counters["admission.rejected.bad_frame"] += 1
                conn.close(CLOSE_PROTOCOL, e.code.encode())
            except Exception:
                ctx.counters["admission.rejected.stream_error"] += 1
                with contextlib.suppress(Exception):
                    conn.close(CLOSE_PROTOCOL, b"error")
        finally:
            self.pending -= 1
            self.pending_by_source[source] -= 1
            if self.pending_by_source[source] <= 0:
                del self.pending_by_source[source]

    async def server_handshake(self, conn: Conn, source: str = "?") -> None:
        ctx = self.ctx
        remote = conn.remote_id().to_bytes()
        bi = await conn.accept_bi()
        recv = bi.recv()
        stype = await framing.read_stream_type(recv, ctx.timers.hello_timeout)
        if stype != StreamType.GOSSIP:
            ctx.counters["admission.rejected.unadmitted_stream"] += 1
            conn.close(CLOSE_PROTOCOL, b"hello first")
            return
        fs = FramedStream(bi.send(), recv, StreamType.GOSSIP)
        frame = await fs.recv(expect=("hello",))
        if frame is None:
            raise framing.TruncatedFrame("stream closed before Hello")
        try:
            ann, welcome, rest = self.admit(remote, frame.hello)
        except InviteError as e:
            ctx.counters[f"admission.rejected.{e.code}"] += 1
            await self.reject(conn, fs, e.code, str(e))
            return
        await fs.send(make_frame(welcome=welcome))
        await send_gossip(fs, ctx.node_id, rest, reply=True)
        await fs.finish()
        ctx.counters["admission.accepted"] += 1
        start = ctx.quotas.admitted(remote, source)
        if start is not None:
            ctx.counters[f"quota.start_{start}"] += 1  # lean / earning: no burst for this identity
        self.register(PeerConn(remote, conn, False, ann.boot_id, ctx.clock.monotonic(), source=source))

    async def reject(self, conn: Conn, fs: FramedStream, code: str, reason: str) -> None:
        with contextlib.suppress(Exception):
            await fs.send(make_frame(reject=pb.Reject(code=code, reason=reason, protocol_version=PROTOCOL_VERSION)))
            await fs.finish()
            await asyncio.sleep(0.2)  # let the Reject reach the peer before the close
        conn.close(CLOSE_REJECTED, code.encode())

    # ------------------------------------------------------------ dialer

    def hello(self, mesh_id: str, node_id: bytes, credential: Optional[pb.InviteCredential]) -> pb.Hello:
        """Our Hello to ``node_id``: a membership proof if we are a member, else the invite."""
        ctx = self.ctx
        m = ctx.membership
        own = ctx.mesh_gossip.self_entry()
        assert own is not None  # signed when the node entered the mesh (_init_gossip)
        # own.ann.version is LocalInfo.version: update_local re-signs at once
        hello = pb.Hello(mesh_id=mesh_id, announcement=own.signed, software_version=own.ann.version,
                         protocol_version=PROTOCOL_VERSION)
        newcomer = not m.member_of(mesh_id)
        if not newcomer and m.policy == pb.ADMISSION_SECRET:
            assert m.secret is not None  # a member of a secret mesh holds its secret
            hello.member_proof = invite.member_proof(m.secret, mesh_id, ctx.node_id, node_id)
        elif newcomer and credential is not None:
            hello.invite.CopyFrom(credential)
            hello.want_secret = True
        return hello

    def check_welcome(self, mesh_id: str, node_id: bytes, frame: Optional[pb.Frame], newcomer: bool) -> pb.Welcome:
        """The answer to our Hello: raises AdmissionRefused / JoinError; adopts the mesh if we were
        admitted by invite."""
        ctx = self.ctx
        m = ctx.membership
        if frame is None:
            raise JoinError("the peer closed the handshake without an answer")
        if frame.WhichOneof("body") == "reject":
            ctx.counters["dial.rejected"] += 1
            raise AdmissionRefused(node_id, frame.reject.reason or frame.reject.code, frame.reject.code)
        w = frame.welcome
        if w.protocol_version != PROTOCOL_VERSION:
            ctx.counters["dial.protocol_version"] += 1
            raise JoinError(f"the peer speaks mesh protocol {version_name(w.protocol_version)}, this node speaks "
                            f"protocol {PROTOCOL_VERSION}: run the same mesh402 release on both")
        if w.mesh_id != mesh_id:
            raise JoinError("the peer answered for a different mesh")
        if newcomer:
            if w.policy == pb.ADMISSION_SECRET and len(w.mesh_secret) != invite.SECRET_LEN:
                raise JoinError("admitted, but the peer did not hand over the mesh secret")
            m.adopt(mesh_id, w.policy, bytes(w.mesh_secret) or None)
        if m.policy == pb.ADMISSION_SECRET:
            assert m.secret is not None  # a member's, or the one just adopted (length checked)
            if bytes(w.member_proof) != invite.member_ack(m.secret, mesh_id, node_id, ctx.node_id):
                ctx.counters["dial.bad_member_ack"] += 1
                raise JoinError("the peer could not prove it is a member of this mesh")
        return w

    async def client_handshake(self, conn: Conn, node_id: bytes,
                               credential: Optional[pb.InviteCredential]) -> PeerConn:
        ctx = self.ctx
        mesh_id = ctx.mesh_gossip.mesh_id
        newcomer = not ctx.membership.member_of(mesh_id)
        fs = FramedStream.opened(await conn.open_bi(), StreamType.GOSSIP)
        await fs.send(make_frame(hello=self.hello(mesh_id, node_id, credential)))
        await fs.finish()
        w = self.check_welcome(mesh_id, node_id, await fs.recv(expect=("welcome", "reject")), newcomer)
        items = list(w.announcements)
        frame = await fs.recv(expect=("gossip",))  # the announcements that did not fit in the Welcome
        while frame is not None and bytes(frame.gossip.sender_id) == node_id:
            items += frame.gossip.announcements
            frame = None if len(items) > ctx.config.limits.max_origins else await fs.recv(expect=("gossip",))
        now = ctx.clock.time()
        for sa in items:
            outcome, ann = ctx.mesh_gossip.offer(sa, now, via=node_id)
            self.on_offer(outcome, ann, node_id, False)
        peer_ann = ctx.mesh_gossip.get(node_id)
        if peer_ann is None:
            raise JoinError("the peer did not announce itself")
        pc = PeerConn(node_id, conn, True, peer_ann.boot_id, ctx.clock.monotonic())
        self.register(pc)
        return pc
