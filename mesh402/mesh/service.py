"""MeshService: the asyncio mesh node, composed of its collaborators.

One iroh endpoint (ALPN ``mesh402/1``), one persistent QUIC connection per peer, bidirectional
streams typed by their first byte (framing.StreamType). The service binds the endpoint, enters a
mesh (through invite tokens, the remembered mesh, or a new one), wires the collaborators together
and keeps the API the layers above use. None of them imports this module:

- admission.py: the Hello/Welcome handshake on a new connection, from both ends;
- invites.py: the tokens this node mints, revokes and honours;
- dialer.py: joining, rejoining, dialling learned peers, redialling lost ones (paced by health.py);
- conns.py: the connection table and the rule for two connections to one peer;
- streams.py: the streams a peer opens, to the mesh's handlers or those registered from above;
- gossip_push.py: push-pull gossip; effects.py decides what a merged announcement means, and
  :meth:`MeshService._apply` does it;
- announce.py: this node's own signed announcement;
- watch.py: heartbeats, probes, PeerDown reports, leaving, loss and pruning (state in liveness.py);
- demand.py, persistence.py, events.py, status.py: demand signals, mesh.json, events, the report.

The layers above register handlers for STAGE / HTTP_TUNNEL / EXPERT streams with
:meth:`MeshService.register_handler` and open streams with :meth:`MeshService.open_stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Iterable, Optional


from mesh402.mesh import ALPN, conns, effects, framing, invite
from mesh402.mesh import status as status_report
from mesh402.mesh.admission import Admission
from mesh402.mesh.announce import Announcer, LocalInfo
from mesh402.mesh.config import MeshConfig
from mesh402.mesh.conns import CLOSE_ABUSE, CLOSE_LEAVING, CLOSE_NORMAL, Conn, PeerConn
from mesh402.mesh.context import MeshContext
from mesh402.mesh.demand import DemandBook
from mesh402.mesh.dialer import Dialer
from mesh402.mesh.effects import Dial, Effect, Emit, JumpSeq, Left, Push, Spend
from mesh402.mesh.errors import AdmissionRefused, JoinError, PeerUnavailable
from mesh402.mesh.events import Event
from mesh402.mesh.framing import FramedStream, StreamType
from mesh402.mesh.gossip import GossipState, Outcome
from mesh402.mesh.gossip_push import GossipPush
from mesh402.mesh.hardware import default_hardware
from mesh402.mesh.health import Backoff, HealthTracker
from mesh402.mesh.identity import NodeIdentity, endpoint_id, ensure_home, short_id
from mesh402.mesh.invites import InviteBook
from mesh402.mesh.liveness import LivenessTable, PeerState
from mesh402.mesh.membership import Membership
from mesh402.mesh.persistence import MembershipSaver
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.streams import Handler, StreamRouter
from mesh402.mesh.watch import LivenessWatch

from iroh import Endpoint, EndpointAddr, EndpointOptions, RelayMode, preset_minimal

log = logging.getLogger("mesh402.mesh")

# Importers of this module name these; they live with the collaborators now.
__all__ = ["AdmissionRefused", "Handler", "JoinError", "LocalInfo", "MeshService", "PeerConn", "PeerUnavailable"]


class MeshService:
    def __init__(self, config: MeshConfig, identity: Optional[NodeIdentity] = None):
        self.config = config
        self.home = ensure_home(config.home)
        self.identity = identity or NodeIdentity.load_or_create(self.home)
        self.node_id: bytes = self.identity.node_id
        self.ctx = ctx = MeshContext.create(config, self.identity, Membership.load(self.home))
        # Never replaced, so plain attributes (gossip and liveness are: properties below).
        self.timers = config.timers
        self.clock = config.clock
        self.membership = ctx.membership
        self.boot_id = ctx.boot_id
        self.conns = ctx.conns
        self.counters = ctx.counters
        self.tasks = ctx.tasks
        self.endpoint: Optional[Endpoint] = None
        # One record of which peers keep failing: the redials ask it (backoff from one reconnect
        # round up to redial_backoff_max), and replica retry and pipeline failover can share it.
        self.health: HealthTracker[bytes] = HealthTracker(
            config.clock, Backoff(base=config.timers.reconnect_interval, cap=config.timers.redial_backoff_max))
        self.local = LocalInfo(kind=config.kind, name=config.name, version=config.version, api_port=config.api_port,
                               console_port=config.console_port, hardware=default_hardware())
        self.saver = MembershipSaver(ctx.membership, ctx.tasks)
        self.push = GossipPush(ctx, self._after_offer)
        self.announcer = Announcer(ctx, self.local, self.local_addrs, self.saver.schedule, self.push.schedule)
        self.invites = InviteBook(ctx, self.local_addrs, self.announcer.spend)
        self.admission = Admission(ctx, self.invites.use, self._after_offer, self._register)
        self.dialer = Dialer(ctx, self.local, self._connect, self.admission.client_handshake, self.health,
                             probing=lambda nid: nid in self.watch.probing)
        self.watch = LivenessWatch(ctx, self.dialer.dial, self.announcer.resign, self.health)
        self.demand = DemandBook(ctx, lambda entries: self.update_local(demand=entries))
        self.streams = StreamRouter(ctx, {
            StreamType.GOSSIP: self.push.handle,
            StreamType.PING: self.watch.handle_ping,
            StreamType.PEER_DOWN: self.watch.handle_peer_down,
            StreamType.PEER_LEAVING: self.watch.handle_leaving,
        }, self.watch.conn_lost, self._abuse)
        self._started_mono = config.clock.monotonic()
        self.started_at = config.clock.time()
        self.joined_at: Optional[float] = None

    # ================================================================ shared state, read through

    @property
    def gossip(self) -> Optional[GossipState]:
        return self.ctx.gossip

    @property
    def liveness(self) -> LivenessTable:
        return self.ctx.liveness

    @property
    def mesh_id(self) -> Optional[str]:
        return self.membership.mesh_id

    @property
    def running(self) -> bool:
        return self.endpoint is not None and not self.ctx.stopping

    # ================================================================ lifecycle

    async def start(self, join: Optional[str | list[str]] = None) -> None:
        """Bind, then join through ``join`` token(s), rejoin the remembered mesh,
        or create a new mesh. Raises InviteError/JoinError with one-line messages."""
        tokens = [join] if isinstance(join, str) else list(join or [])
        decoded = [invite.decode_token(t) for t in tokens]  # garbled -> InviteError before binding
        for tok in decoded:
            if not self.membership.member_of(tok.mesh_id):
                invite.check_expiry(tok.credential, self.clock.time())
        await self._bind()
        if decoded:
            mesh_id = decoded[0].mesh_id
            if any(t.mesh_id != mesh_id for t in decoded):
                raise JoinError("the --join tokens belong to different meshes")
            self._init_gossip(mesh_id)
            try:
                await self._join(decoded)
            except BaseException:
                await self._close_endpoint()
                raise
        elif self.membership.mesh_id:
            self._init_gossip(self.membership.mesh_id)
            if self.membership.peers:
                self.tasks.spawn(self.dialer.rejoin_known())
        else:
            policy = invite.POLICY_BY_NAME.get(self.config.policy, pb.ADMISSION_SECRET)
            self.membership.create(policy, self.config.new_mesh_id)
            self._init_gossip(self.membership.mesh_id or "")  # create() always names the mesh
        assert self.endpoint is not None
        for loop in (self.admission.accept_loop(self.endpoint), self.push.loop(), self.announcer.loop(),
                     self.watch.prune_loop(), self.dialer.reconnect_loop()):
            self.tasks.spawn(loop)
        self.ctx.events.emit("started", mesh_id=self.mesh_id)

    async def switch_mesh(self, token: str) -> None:
        """Leave the current mesh (peers hear PeerLeaving) and join another through ``token``,
        keeping the endpoint and the node's identity: how a smaller discovered mesh merges into a
        larger one. Raises InviteError/JoinError; on failure the node is alone in the new mesh id."""
        tok = invite.decode_token(token)
        if tok.mesh_id == self.mesh_id:
            return
        invite.check_expiry(tok.credential, self.clock.time())
        await self.watch.farewell(lambda: self.announcer.build(leaving=True))
        conns.close_all(self.conns, CLOSE_LEAVING, "leaving")
        self.ctx.liveness = LivenessTable(self.timers, self.clock)
        self.health.clear()  # failures in the old mesh say nothing about the new one
        self.membership.peers = {}
        self.joined_at = None
        self._init_gossip(tok.mesh_id)
        await self._join([tok])
        self.counters["mesh.switched"] += 1
        self.ctx.events.emit("mesh_switched", mesh_id=self.mesh_id)

    async def _join(self, toks: list[pb.InviteToken]) -> None:
        await self.dialer.join(toks)
        self.joined_at = self.clock.time()

    async def _bind(self) -> None:
        relay_mode = RelayMode.disabled()
        if self.config.relay_url:
            relay_mode = RelayMode.custom_from_urls([self.config.relay_url])
        opts = EndpointOptions(
            preset=preset_minimal(),
            relay_mode=relay_mode,
            bind_addr=f"{self.config.bind_ip}:{self.config.bind_port}",
            secret_key=self.identity.secret_bytes(),
            alpns=[ALPN],
        )
        try:
            self.endpoint = await Endpoint.bind(opts)
        except Exception as e:
            raise JoinError(
                f"cannot bind the mesh socket on {self.config.bind_ip}:{self.config.bind_port}: "
                f"{framing.iroh_error_text(e)}"
            ) from None

    async def _connect(self, node_id: bytes, addrs: list[str], relay_url: str) -> Conn:
        assert self.endpoint is not None
        return await self.endpoint.connect(EndpointAddr(endpoint_id(node_id), relay_url or None, list(addrs)), ALPN)

    def _init_gossip(self, mesh_id: str) -> None:
        self.ctx.gossip = GossipState(mesh_id, self.node_id, self.timers.stale_after, self.timers.max_clock_skew,
                                      self.config.limits)
        self.announcer.resign(flush=False)

    async def stop(self, graceful: bool = True) -> None:
        if self.ctx.stopping:
            return
        self.tasks.stopping = True
        if graceful:
            await self.watch.farewell(lambda: self.announcer.build(leaving=True))
        conns.close_all(self.conns, CLOSE_LEAVING if graceful else CLOSE_NORMAL, "leaving" if graceful else "stopping")
        with contextlib.suppress(Exception):
            self.saver.save_now()
        await self.tasks.cancel_all()
        await self._close_endpoint()
        self.ctx.events.emit("stopped")

    async def _close_endpoint(self) -> None:
        if self.endpoint is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.endpoint.close(), 2.0)

    def local_addrs(self) -> list[str]:
        if self.endpoint is None:
            return []
        addrs: list[str] = []
        with contextlib.suppress(Exception):
            addrs = list(self.endpoint.addr().direct_addresses())
        if self.config.bind_ip in ("0.0.0.0", "127.0.0.1", "::", ""):
            for s in self.endpoint.bound_sockets():
                if s.startswith("0.0.0.0:") or s.startswith("127.0.0.1:"):
                    addrs.append("127.0.0.1:" + s.rsplit(":", 1)[1])
        addrs += list(self.config.external_addrs)
        return list(dict.fromkeys(a for a in addrs if not a.startswith("[")))  # IPv4 only, first seen first

    # ================================================================ wiring the collaborators

    def _register(self, pc: PeerConn) -> None:
        """An admitted connection (either end): keep it unless a duplicate wins, then serve it."""
        ctx, nid = self.ctx, pc.node_id
        doubtful = self.liveness.state(nid) in (PeerState.SUSPECT, PeerState.DOWN, PeerState.LEFT)
        if not conns.place(self.conns, pc, self.node_id, doubtful, self.timers.duplicate_window, self.counters,
                           self.config.limits.max_streams):
            return
        self.health.succeeded(nid)
        was_new = self.liveness.connected(nid, pc.boot_id)
        ann = self.gossip.get(nid) if self.gossip else None
        if ann is not None:
            self.membership.remember_peer(nid.hex(), list(ann.addrs), ann.relay_url)
            self.saver.schedule()
        pc.tasks.append(ctx.tasks.spawn(self.streams.serve(pc)))
        pc.tasks.append(ctx.tasks.spawn(self.watch.heartbeat(pc)))
        self.counters["conn.established"] += 1
        if was_new:
            ctx.events.emit("peer_up", node_id=nid.hex())
            self.announcer.resign(flush=False)  # our RTT table / peer set changed
        self.push.schedule()

    def _abuse(self, pc: PeerConn) -> None:
        """The peer kept going over its quotas: close its connection and refuse it for a while (no
        handshake, no dial from here; the others are not told: each node judges for itself)."""
        nid = pc.node_id
        self.ctx.quotas.ban(nid, pc.source)
        self.counters["quota.banned"] += 1
        log.warning("peer %s exceeded its quotas again and again: refused for %.0f s", short_id(nid),
                    self.config.limits.abuse_ban)
        if self.conns.get(nid) is pc:
            self.conns.pop(nid)
        pc.close(CLOSE_ABUSE, "over quota")
        self.watch.declare_down(nid, broadcast=False)

    def _after_offer(self, outcome: Outcome, ann: Optional[pb.PeerAnnouncement], via: Optional[bytes],
                     from_hello: bool) -> None:
        state = self.liveness.state(bytes(ann.node_id)) if ann is not None else None
        self._apply(effects.after_offer(outcome, ann, via, from_hello=from_hello, own=self.self_announcement(),
                                        boot_id=self.boot_id, peer_state=state))

    def _apply(self, todo: Iterable[Effect]) -> None:
        """Carry out what effects.after_offer decided, in its order."""
        for e in todo:
            match e:
                case Emit(kind, data):
                    self.ctx.events.emit(kind, **data)
                case Dial(node_id, immediate):
                    self.dialer.maybe_dial(node_id, immediate)
                case Spend(entries):
                    self.announcer.merge_spent(entries)
                case JumpSeq(seq):
                    self.announcer.jump_past(seq)
                case Left(node_id):
                    self.watch.announced_leaving(node_id)
                case Push():
                    self.push.schedule()

    # ================================================================ streams

    def register_handler(self, stream_type: StreamType, handler: Handler) -> None:
        """Handle STAGE / HTTP_TUNNEL / EXPERT / ... streams: ``handler(peer_id, stream)`` reads and
        writes frames; the stream is finished when it returns."""
        self.streams.register(stream_type, handler)

    async def open_stream(self, peer_id: bytes, stream_type: StreamType, max_frame: Optional[int] = None) -> FramedStream:
        return await conns.open_stream(self.conns, peer_id, stream_type, max_frame)

    async def request(self, peer_id: bytes, stream_type: StreamType, frame: pb.Frame, timeout: float = 30.0) -> Optional[pb.Frame]:
        """Open a stream, send one frame, finish, return the single reply."""
        fs = await self.open_stream(peer_id, stream_type)
        await fs.send(frame)
        await fs.finish()
        return await fs.recv(timeout)

    def connected_peers(self) -> list[bytes]:
        return [k for k, pc in self.conns.items() if not pc.closed]

    async def ping(self, peer_id: bytes, timeout: Optional[float] = None) -> float:
        """RTT in ms over the mesh connection (a fresh PING stream)."""
        return await self.watch.ping(peer_id, timeout)

    # ================================================================ announcement, demand, invites

    def update_local(self, **fields: object) -> None:
        """Update facts about this node (kind, hardware, models, demand, api_port, ...)
        and gossip the new signed announcement."""
        self.announcer.update_local(**fields)

    def self_announcement(self) -> Optional[pb.PeerAnnouncement]:
        return self.announcer.own()

    def note_request(self, model_id: str, count: int = 1) -> None:
        """Demand signal: the API layer calls this for each request it serves or
        proxies for ``model_id`` (not for 'auto')."""
        self.demand.note(model_id, count)

    def demand_view(self) -> dict[str, dict[str, int]]:
        """Mesh-wide demand per model: requests, latest activity, nodes that saw requests."""
        return self.demand.view()

    def mint_invite(self, expires_in: Optional[float] = None, single_use: bool = False) -> str:
        return self.invites.mint(expires_in, single_use)

    def revoke_invite(self, token: str) -> dict[str, Any]:
        """Stop a token of this mesh from admitting anyone (mesh-wide, through gossip)."""
        return self.invites.revoke(token)

    @property
    def invite_token(self) -> str:
        """The token `serve` prints; re-minted when half its lifetime has passed."""
        return self.invites.token

    # ================================================================ events and status

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue[Event]:
        return self.ctx.events.subscribe(maxsize)

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        self.ctx.events.unsubscribe(q)

    def all_counters(self) -> dict[str, int]:
        return status_report.all_counters(self.counters, self.gossip)

    def status(self) -> dict[str, Any]:
        return status_report.report(
            self.ctx, kind=self.local.kind, addrs=self.local_addrs(), started_at=self.started_at,
            uptime_s=self.clock.monotonic() - self._started_mono, joined_at=self.joined_at,
            invite_token=self.invite_token if self.mesh_id and self.running else None,
            own=self.self_announcement(), demand=self.demand_view())
