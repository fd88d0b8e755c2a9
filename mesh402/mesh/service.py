"""MeshService: the asyncio mesh node.

One iroh endpoint (ALPN ``mesh402/1``), one persistent QUIC connection per
peer, bidirectional streams typed by their first byte (framing.StreamType).

Connection life cycle
---------------------
1. The dialer opens a GOSSIP stream and sends ``Hello`` (its signed
   announcement + an invite credential, a membership proof, or nothing for an
   open mesh). The acceptor checks the announcement's origin equals the
   TLS-authenticated remote id, the signature, freshness, and the proof.
   A failed check gets a ``Reject`` and the connection is closed: no gossip,
   no service. Nothing else is read from an unadmitted connection.
2. The acceptor answers ``Welcome`` (all announcements it knows; the mesh
   secret if the dialer was admitted by invite; an ack proving it is itself a
   member). Both sides then serve streams on the connection.
3. Duplicate connections (both sides dialled at once) are resolved the same
   way on both sides: keep the one dialled by the smaller node id. A
   connection from a new incarnation (boot id) of a peer, or one replacing a
   suspect connection, always wins.

Gossip pushes all known signed announcements on every change (debounced)
and every ``gossip_interval``; the receiver replies with what the pusher
lacks. Newly learned peers are dialled directly (the smaller id first; the
larger after a grace period), so the mesh becomes a full mesh.

Later issues register handlers for STAGE / HTTP_TUNNEL / ROUTE_REQUEST /
PLUGIN streams with :meth:`MeshService.register_handler` and open streams
with :meth:`MeshService.open_stream`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

from iroh import Endpoint, EndpointAddr, EndpointOptions, RelayMode, preset_minimal

from mesh402.mesh import ALPN, framing, invite, iroh_fastcopy, spent  # noqa: F401
from mesh402.mesh.config import MeshConfig
from mesh402.mesh.framing import FramedStream, FrameError, StreamType, make_frame
from mesh402.mesh.gossip import (
    AnnouncementError,
    GossipState,
    Outcome,
    digest_of,
    open_announcement,
    sign_announcement,
)
from mesh402.mesh.hardware import default_hardware
from mesh402.mesh.identity import NodeIdentity, endpoint_id, ensure_home, short_id
from mesh402.mesh.invite import InviteError
from mesh402.mesh.liveness import LivenessTable, PeerState
from mesh402.mesh.membership import Membership
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.render import announcement_to_dict

log = logging.getLogger("mesh402.mesh")

# Application close codes
CLOSE_NORMAL = 0
CLOSE_REJECTED = 1
CLOSE_DUPLICATE = 2
CLOSE_REPLACED = 3
CLOSE_LEAVING = 4
CLOSE_DOWN = 5
CLOSE_PROTOCOL = 6

MAX_PENDING_HANDSHAKES = 64
STREAM_TYPE_TIMEOUT = 10.0

Handler = Callable[[bytes, FramedStream], Awaitable[None]]


class JoinError(Exception):
    """Joining failed; str() is one line for a person."""


class PeerUnavailable(Exception):
    pass


@dataclass
class LocalInfo:
    """Facts about this node that go into its announcement (set by the Node)."""

    kind: str = "serving"
    name: str = ""
    version: str = ""
    api_port: int = 0
    console_port: int = 0
    hardware: pb.Hardware = field(default_factory=pb.Hardware)
    models: list = field(default_factory=list)  # [pb.ModelEntry]
    demand: list = field(default_factory=list)  # [pb.DemandEntry]
    labels: dict = field(default_factory=dict)


class PeerConn:
    def __init__(self, node_id: bytes, conn, initiator: bool, boot_id: int, created: float):
        self.node_id = node_id
        self.conn = conn
        self.initiator = initiator
        self.boot_id = boot_id
        self.created = created
        self.closed = False  # closed or dropped by us / lost
        self.tasks: list[asyncio.Task] = []

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.conn.close(code, reason.encode())
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()


def _kind_enum(kind: str) -> int:
    return pb.NODE_KIND_CLIENT if kind == "client" else pb.NODE_KIND_SERVING


def _now_us() -> int:
    return int(time.time() * 1_000_000)


class MeshService:
    def __init__(self, config: MeshConfig, identity: Optional[NodeIdentity] = None):
        self.config = config
        self.timers = config.timers
        self.clock = config.clock
        self.home = ensure_home(config.home)
        self.identity = identity or NodeIdentity.load_or_create(self.home)
        self.node_id: bytes = self.identity.node_id
        self.membership = Membership.load(self.home)
        self.boot_id = int.from_bytes(os.urandom(8), "big") >> 1 or 1
        self.endpoint: Optional[Endpoint] = None
        self.gossip: Optional[GossipState] = None
        self.liveness = LivenessTable(self.timers, self.clock)
        self.conns: dict[bytes, PeerConn] = {}
        self.handlers: dict[StreamType, Handler] = {}
        self.counters: collections.Counter = collections.Counter()
        self.local = LocalInfo(
            kind=config.kind,
            name=config.name,
            version=config.version,
            api_port=config.api_port,
            console_port=config.console_port,
            hardware=default_hardware(),
        )
        self._subscribers: set[asyncio.Queue] = set()
        self._tasks: set[asyncio.Task] = set()
        self._dialing: dict[bytes, asyncio.Task] = {}
        self._probing: set[bytes] = set()
        self._pending_handshakes = 0
        self._flush_pending = False
        self._save_pending = False
        self._stopping = False
        self._started_mono = self.clock.monotonic()
        self.started_at = self.clock.time()
        self._invite_token: Optional[str] = None
        self._invite_expires_at = 0.0
        self._last_announce_mono = 0.0
        self._last_rtts: dict[bytes, float] = {}
        self.joined_at: Optional[float] = None
        self._sent_rtts: dict[bytes, float] = {}
        self._demand: dict[str, tuple[int, int]] = {}  # model -> (last_active_ms, count)
        self._demand_pending = False
        self.register_handler(StreamType.ECHO, self._handle_echo)

    # ================================================================ lifecycle

    @property
    def mesh_id(self) -> Optional[str]:
        return self.membership.mesh_id

    @property
    def running(self) -> bool:
        return self.endpoint is not None and not self._stopping

    async def start(self, join: Optional[str | list[str]] = None) -> None:
        """Bind, then join through ``join`` token(s), rejoin the remembered mesh,
        or create a new mesh. Raises InviteError/JoinError with one-line messages."""
        tokens = [join] if isinstance(join, str) else list(join or [])
        decoded = [invite.decode_token(t) for t in tokens]  # garbled -> InviteError before binding
        for tok in decoded:
            if not self._member_of(tok.mesh_id):
                invite.check_expiry(tok.credential, self.clock.time())
        await self._bind()
        if decoded:
            mesh_id = decoded[0].mesh_id
            if any(t.mesh_id != mesh_id for t in decoded):
                raise JoinError("the --join tokens belong to different meshes")
            self._init_gossip(mesh_id)
            try:
                await self._join_tokens(decoded)
            except BaseException:
                await self._close_endpoint()
                raise
        elif self.membership.mesh_id:
            self._init_gossip(self.membership.mesh_id)
            if self.membership.peers:
                self._spawn(self._rejoin_known())
        else:
            policy = invite.POLICY_BY_NAME.get(self.config.policy, pb.ADMISSION_SECRET)
            self.membership.create(policy, self.config.new_mesh_id)
            self._init_gossip(self.membership.mesh_id)
        self._spawn(self._accept_loop())
        self._spawn(self._gossip_loop())
        self._spawn(self._announce_loop())
        self._spawn(self._prune_loop())
        self._spawn(self._reconnect_loop())
        self._emit("started", mesh_id=self.mesh_id)

    async def switch_mesh(self, token: str) -> None:
        """Leave the current mesh (peers hear PeerLeaving) and join another through ``token``,
        keeping the endpoint and the node's identity: how a smaller discovered mesh merges into a
        larger one. Raises InviteError/JoinError; on failure the node is alone in the new mesh id."""
        tok = invite.decode_token(token)
        if tok.mesh_id == self.mesh_id:
            return
        invite.check_expiry(tok.credential, self.clock.time())
        if self.gossip is not None and self.conns:
            with contextlib.suppress(Exception):
                final = self._build_signed(leaving=True)
                await asyncio.wait_for(asyncio.gather(
                    *(self._send_leaving(pc, final) for pc in list(self.conns.values())), return_exceptions=True), 1.5)
        for pc in list(self.conns.values()):
            pc.close(CLOSE_LEAVING, "leaving")
        self.conns.clear()
        self.liveness = LivenessTable(self.timers, self.clock)
        self.membership.peers = {}
        self.joined_at = None
        self._init_gossip(tok.mesh_id)
        await self._join_tokens([tok])
        self.counters["mesh.switched"] += 1
        self._emit("mesh_switched", mesh_id=self.mesh_id)

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

    def _init_gossip(self, mesh_id: str) -> None:
        self.gossip = GossipState(mesh_id, self.node_id, self.timers.stale_after, self.timers.max_clock_skew)
        self._resign(flush=False)

    async def stop(self, graceful: bool = True) -> None:
        if self._stopping:
            return
        self._stopping = True
        if graceful and self.gossip is not None and self.conns:
            with contextlib.suppress(Exception):
                final = self._build_signed(leaving=True)
                await asyncio.wait_for(
                    asyncio.gather(
                        *(self._send_leaving(pc, final) for pc in list(self.conns.values())),
                        return_exceptions=True,
                    ),
                    1.5,
                )
        for pc in list(self.conns.values()):
            pc.close(CLOSE_LEAVING if graceful else CLOSE_NORMAL, "leaving" if graceful else "stopping")
        self.conns.clear()
        with contextlib.suppress(Exception):
            self._save_membership()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        await self._close_endpoint()
        self._emit("stopped")

    async def _close_endpoint(self) -> None:
        if self.endpoint is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.endpoint.close(), 2.0)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None and not self._stopping:
            self.counters["internal.task_error"] += 1
            log.warning("mesh task failed: %r", t.exception(), exc_info=t.exception())

    # ================================================================ addresses and announcements

    def local_addrs(self) -> list[str]:
        if self.endpoint is None:
            return []
        addrs: list[str] = []
        try:
            addrs = list(self.endpoint.addr().direct_addresses())
        except Exception:
            pass
        ip = self.config.bind_ip
        if ip in ("0.0.0.0", "127.0.0.1", "::", ""):
            for s in self.endpoint.bound_sockets():
                if s.startswith("0.0.0.0:") or s.startswith("127.0.0.1:"):
                    addrs.append("127.0.0.1:" + s.rsplit(":", 1)[1])
        addrs += list(self.config.external_addrs)
        out: list[str] = []
        for a in addrs:
            if a not in out and not a.startswith("["):
                out.append(a)
        return out

    def _build_signed(self, leaving: bool = False) -> pb.SignedAnnouncement:
        assert self.gossip is not None
        now = self.clock.time()
        loc = self.local
        rtts = self.liveness.rtts()
        ann = pb.PeerAnnouncement(
            node_id=self.node_id,
            seq=self.membership.next_seq(now),
            issued_at_ms=int(now * 1000),
            boot_id=self.boot_id,
            mesh_id=self.gossip.mesh_id,
            kind=_kind_enum(loc.kind),
            version=loc.version,
            api_port=loc.api_port,
            console_port=loc.console_port,
            addrs=self.local_addrs(),
            relay_url=self.config.relay_url or "",
            hardware=loc.hardware,
            models=list(loc.models),
            demand=list(loc.demand),
            rtts=[pb.PeerRtt(node_id=k, rtt_ms=v) for k, v in sorted(rtts.items())],
            protocol_gen=framing.PROTOCOL_GENERATION,
            leaving=leaving,
            name=loc.name,
            labels=self._labels(now),
        )
        self._sent_rtts = dict(rtts)
        return sign_announcement(self.identity, self.gossip.mesh_id, ann)

    def _labels(self, now: float) -> dict[str, str]:
        """The node's labels plus the mesh's spent invite nonces, which every member carries."""
        labels = {k: v for k, v in self.local.labels.items() if k != spent.SPENT_LABEL}
        spent.prune(self.membership.spent, now)
        if self.membership.spent:
            labels[spent.SPENT_LABEL] = spent.encode(self.membership.spent)
        return labels

    def _spend(self, entries: dict[str, int]) -> bool:
        """Merge spent or revoked invite nonces; re-announce (and persist) when the set grew."""
        if not spent.merge(self.membership.spent, entries, self.clock.time()):
            return False
        self.counters["invites.spent_merged"] += 1
        self._resign()
        return True

    def _resign(self, flush: bool = True) -> None:
        if self.gossip is None:
            return
        sa = self._build_signed()
        ann = pb.PeerAnnouncement.FromString(sa.announcement)
        self.gossip.set_self(sa, ann, self.clock.time())
        self._last_announce_mono = self.clock.monotonic()
        self._schedule_save()
        if flush:
            self._emit("self_updated", seq=ann.seq)
            self._schedule_flush()

    def update_local(self, **fields) -> None:
        """Update facts about this node (kind, hardware, models, demand, api_port, ...)
        and gossip the new signed announcement."""
        for k, v in fields.items():
            if not hasattr(self.local, k):
                raise AttributeError(f"LocalInfo has no field {k!r}")
            setattr(self.local, k, v)
        self._resign(flush=True)

    # ---------------------------------------------------------------- demand

    def note_request(self, model_id: str, count: int = 1) -> None:
        """Demand signal: the API layer calls this for each request it serves or
        proxies for ``model_id`` (not for 'auto'). Gossiped in this node's signed
        announcement (debounced), so a peer can only ever speak for its own demand."""
        if not model_id or model_id == "auto":
            return
        now_ms = int(self.clock.time() * 1000)
        last, n = self._demand.get(model_id, (0, 0))
        self._demand[model_id] = (now_ms, n + count)
        if not self._demand_pending and self.gossip is not None:
            self._demand_pending = True
            try:
                self._spawn(self._flush_demand())
            except RuntimeError:  # no running loop (tests building state by hand)
                self._demand_pending = False

    async def _flush_demand(self) -> None:
        try:
            await self.clock.sleep(self.timers.demand_announce_delay)
        finally:
            self._demand_pending = False
        self._publish_demand()

    def _publish_demand(self) -> None:
        cutoff = int((self.clock.time() - self.timers.demand_ttl) * 1000)
        self._demand = {k: v for k, v in self._demand.items() if v[0] >= cutoff}
        self.update_local(demand=[pb.DemandEntry(model_id=k, last_active_ms=v[0], request_count=v[1])
                                  for k, v in sorted(self._demand.items())])

    def demand_view(self) -> dict[str, dict]:
        """Mesh-wide demand per model: requests summed over origins (each origin's
        own signed count, so no peer can inflate another's), latest activity, and
        how many nodes saw requests for it."""
        out: dict[str, dict] = {}
        if self.gossip is None:
            return out
        cutoff = int((self.clock.time() - self.timers.demand_ttl) * 1000)
        down = {k for k, p in self.liveness.peers.items() if p.state in (PeerState.DOWN, PeerState.LEFT)}
        for origin, e in self.gossip.entries.items():
            if origin in down:
                continue
            for d in e.ann.demand:
                if d.last_active_ms < cutoff:
                    continue
                v = out.setdefault(d.model_id, {"requests": 0, "last_active_ms": 0, "nodes": 0})
                v["requests"] += d.request_count
                v["last_active_ms"] = max(v["last_active_ms"], d.last_active_ms)
                v["nodes"] += 1
        return out

    def self_announcement(self) -> Optional[pb.PeerAnnouncement]:
        e = self.gossip.self_entry() if self.gossip else None
        return e.ann if e else None

    # ================================================================ invites

    def mint_invite(self, expires_in: Optional[float] = None, single_use: bool = False) -> str:
        if not self.mesh_id:
            raise InviteError("not part of a mesh yet")
        return invite.mint_token(
            single_use=single_use,
            mesh_id=self.mesh_id,
            secret=self.membership.secret,
            policy=self.membership.policy,
            node_id=self.node_id,
            addrs=self.local_addrs(),
            relay_url=self.config.relay_url or "",
            expires_in=self.config.invite_expires if expires_in is None else expires_in,
            now=self.clock.time(),
        )

    def revoke_invite(self, token: str) -> dict:
        """Stop a token of this mesh from admitting anyone (mesh-wide, through gossip). Members it
        already admitted stay."""
        tok = invite.decode_token(token)
        if tok.mesh_id != self.mesh_id:
            raise InviteError("this token belongs to another mesh", "wrong_mesh")
        cred = tok.credential
        if tok.policy != pb.ADMISSION_SECRET:
            raise InviteError("an open mesh admits anyone: there is nothing to revoke", "open_mesh")
        invite.check_mac(cred, mesh_id=self.mesh_id, secret=self.membership.secret)
        nonce = cred.nonce.hex()
        if cred.expires_at <= self.clock.time():
            state = "expired"  # it admits no one already; nothing to gossip
        else:
            state = "revoked" if self._spend({nonce: int(cred.expires_at)}) else "already revoked"
        return {"nonce": nonce, "expires_at": int(cred.expires_at), "state": state}

    @property
    def invite_token(self) -> str:
        """The token `serve` prints; re-minted when half its lifetime has passed."""
        now = self.clock.time()
        life = self.config.invite_expires
        if self._invite_token is None or now > self._invite_expires_at - life / 2:
            self._invite_token = self.mint_invite(life)
            self._invite_expires_at = now + life
        return self._invite_token

    def _member_of(self, mesh_id: str) -> bool:
        return self.membership.mesh_id == mesh_id and self.membership.is_member

    # ================================================================ dialing

    def _addr_for(self, node_id: bytes, addrs: list[str], relay_url: str = "") -> EndpointAddr:
        return EndpointAddr(endpoint_id(node_id), relay_url or None, list(addrs))

    async def _join_tokens(self, toks: list[pb.InviteToken]) -> None:
        """Dial the token nodes (and, when rejoining, remembered peers) until one admits us."""
        last_err: Optional[BaseException] = None
        tok0 = toks[0]
        targets: list[tuple[bytes, list[str], str, Optional[pb.InviteCredential]]] = [
            (bytes(t.node_id), list(t.addrs), t.relay_url, t.credential) for t in toks
        ]
        if self._member_of(tok0.mesh_id):
            for hexid, info in self.membership.peers.items():
                nid = bytes.fromhex(hexid)
                if nid != self.node_id and all(nid != t[0] for t in targets):
                    targets.append((nid, info.get("addrs", []), info.get("relay_url", ""), None))
        for attempt in range(self.timers.join_attempts):
            tasks = [
                asyncio.ensure_future(self._dial(nid, addrs, relay, cred, join=True))
                for nid, addrs, relay, cred in targets
                if nid != self.node_id
            ]
            if not tasks:
                raise JoinError("the invite token points at this node itself")
            try:
                for fut in asyncio.as_completed(tasks):
                    try:
                        await fut
                        self.joined_at = self.clock.time()
                        return
                    except AdmissionRefused as e:
                        raise JoinError(f"join refused by {short_id(e.node_id)}: {e}") from None
                    except (JoinError, InviteError) as e:
                        last_err = e
                    except Exception as e:  # connection failures
                        last_err = e
            finally:
                # keep successful extra connections; cancel the stragglers
                for t in tasks:
                    if not t.done():
                        t.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            if attempt + 1 < self.timers.join_attempts:
                await self.clock.sleep(self.timers.join_backoff * (2**attempt))
        msg = framing.iroh_error_text(last_err) if last_err else "no reachable address"
        if isinstance(last_err, asyncio.TimeoutError):
            msg = "timed out"
        addrs = ", ".join(tok0.addrs) or tok0.relay_url
        raise JoinError(f"could not reach the mesh at {addrs} ({msg}); is the inviting node running?")

    async def _rejoin_known(self) -> None:
        """After a restart: dial remembered peers with our membership proof."""
        for hexid, info in list(self.membership.peers.items()):
            nid = bytes.fromhex(hexid)
            if nid != self.node_id and nid not in self.conns:
                self._spawn(self._dial_quiet(nid, info.get("addrs", []), info.get("relay_url", "")))

    async def _dial_quiet(self, node_id: bytes, addrs: list[str], relay_url: str = "") -> bool:
        try:
            await self._dial(node_id, addrs, relay_url, None)
            return True
        except Exception:
            return False

    async def _dial(
        self,
        node_id: bytes,
        addrs: list[str],
        relay_url: str,
        credential: Optional[pb.InviteCredential],
        join: bool = False,
    ) -> PeerConn:
        assert self.endpoint is not None and self.gossip is not None
        if not addrs and not relay_url:
            raise PeerUnavailable("no address")
        addr = self._addr_for(node_id, addrs, relay_url)
        try:
            conn = await asyncio.wait_for(self.endpoint.connect(addr, ALPN), self.timers.connect_timeout)
        except asyncio.TimeoutError:
            self.counters["dial.timeout"] += 1
            raise
        except Exception:
            self.counters["dial.failed"] += 1
            raise
        try:
            return await asyncio.wait_for(
                self._client_handshake(conn, node_id, credential), self.timers.hello_timeout
            )
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close(CLOSE_PROTOCOL, b"handshake failed")
            raise

    async def _client_handshake(self, conn, node_id: bytes, credential) -> PeerConn:
        mesh_id = self.gossip.mesh_id
        bi = await conn.open_bi()
        fs = FramedStream.opened(bi, StreamType.GOSSIP)
        hello = pb.Hello(
            mesh_id=mesh_id,
            announcement=self.gossip.self_entry().signed,
            software_version=self.local.version,
        )
        newcomer = not self._member_of(mesh_id)
        if not newcomer and self.membership.policy == pb.ADMISSION_SECRET:
            hello.member_proof = invite.member_proof(self.membership.secret, mesh_id, self.node_id, node_id)
        elif newcomer and credential is not None:
            hello.invite.CopyFrom(credential)
            hello.want_secret = True
        await fs.send(make_frame(hello=hello))
        await fs.finish()
        frame = await fs.recv(expect=("welcome", "reject"))
        if frame is None:
            raise JoinError("the peer closed the handshake without an answer")
        if frame.WhichOneof("body") == "reject":
            self.counters["dial.rejected"] += 1
            raise AdmissionRefused(node_id, frame.reject.reason or frame.reject.code, frame.reject.code)
        w = frame.welcome
        if w.mesh_id != mesh_id:
            raise JoinError("the peer answered for a different mesh")
        if newcomer:
            if w.policy == pb.ADMISSION_SECRET and len(w.mesh_secret) != invite.SECRET_LEN:
                raise JoinError("admitted, but the peer did not hand over the mesh secret")
            self.membership.adopt(mesh_id, w.policy, bytes(w.mesh_secret) or None)
        if self.membership.policy == pb.ADMISSION_SECRET:
            ack = invite.member_ack(self.membership.secret, mesh_id, node_id, self.node_id)
            if bytes(w.member_proof) != ack:
                self.counters["dial.bad_member_ack"] += 1
                raise JoinError("the peer could not prove it is a member of this mesh")
        now = self.clock.time()
        peer_boot = 0
        for sa in w.announcements:
            outcome, ann = self.gossip.offer(sa, now, via=node_id)
            self._after_offer(outcome, ann, via=node_id)
        peer_ann = self.gossip.get(node_id)
        if peer_ann is None:
            raise JoinError("the peer did not announce itself")
        peer_boot = peer_ann.boot_id
        pc = PeerConn(node_id, conn, True, peer_boot, self.clock.monotonic())
        self._register(pc)
        return pc

    def _maybe_dial(self, node_id: bytes, immediate: bool = False) -> None:
        if self._stopping or self.gossip is None or node_id == self.node_id:
            return
        if node_id in self.conns or node_id in self._dialing or node_id in self._probing:
            return
        ann = self.gossip.get(node_id)
        if ann is None or ann.leaving:  # a newer non-leaving announcement means it came back
            return
        if (
            not self.config.dial_client_peers
            and self.local.kind == "client"
            and ann.kind == pb.NODE_KIND_CLIENT
        ):
            return
        delay = 0.0 if (immediate or self.node_id < node_id) else self.timers.transitive_dial_grace
        self._dialing[node_id] = self._spawn(self._dial_later(node_id, delay))

    async def _dial_later(self, node_id: bytes, delay: float) -> None:
        try:
            if delay:
                await self.clock.sleep(delay)
            if node_id in self.conns or self._stopping:
                return
            ann = self.gossip.get(node_id)
            if ann is None:
                return
            try:
                await self._dial(node_id, list(ann.addrs), ann.relay_url, None)
                self.counters["dial.transitive_ok"] += 1
            except Exception:
                self.counters["dial.transitive_failed"] += 1
        finally:
            self._dialing.pop(node_id, None)

    # ================================================================ accepting

    async def _accept_loop(self) -> None:
        assert self.endpoint is not None
        while not self._stopping:
            try:
                incoming = await self.endpoint.accept_next()
            except Exception:
                if self._stopping:
                    return
                await asyncio.sleep(0.05)
                continue
            if incoming is None:
                return
            if self._pending_handshakes >= MAX_PENDING_HANDSHAKES:
                self.counters["admission.refused_busy"] += 1
                with contextlib.suppress(Exception):
                    await incoming.refuse()
                continue
            self._spawn(self._handle_incoming(incoming))

    async def _handle_incoming(self, incoming) -> None:
        self._pending_handshakes += 1
        conn = None
        try:
            try:
                accepting = await incoming.accept()
                conn = await asyncio.wait_for(accepting.connect(), self.timers.connect_timeout)
            except Exception:
                self.counters["admission.handshake_failed"] += 1
                return
            try:
                await asyncio.wait_for(self._server_handshake(conn), self.timers.hello_timeout)
            except asyncio.TimeoutError:
                self.counters["admission.rejected.timeout"] += 1
                conn.close(CLOSE_PROTOCOL, b"hello timeout")
            except FrameError as e:
                self.counters[f"frame.{e.code}"] += 1
                self.counters["admission.rejected.bad_frame"] += 1
                conn.close(CLOSE_PROTOCOL, e.code.encode())
            except Exception:
                self.counters["admission.rejected.stream_error"] += 1
                with contextlib.suppress(Exception):
                    conn.close(CLOSE_PROTOCOL, b"error")
        finally:
            self._pending_handshakes -= 1

    async def _server_handshake(self, conn) -> None:
        remote = conn.remote_id().to_bytes()
        bi = await conn.accept_bi()
        recv = bi.recv()
        stype = await framing.read_stream_type(recv, self.timers.hello_timeout)
        if stype != StreamType.GOSSIP:
            self.counters["admission.rejected.unadmitted_stream"] += 1
            conn.close(CLOSE_PROTOCOL, b"hello first")
            return
        fs = FramedStream(bi.send(), recv, StreamType.GOSSIP)
        frame = await fs.recv(expect=("hello",))
        if frame is None:
            raise framing.TruncatedFrame("stream closed before Hello")
        hello = frame.hello
        try:
            ann, welcome = self._admit(remote, hello)
        except InviteError as e:
            self.counters[f"admission.rejected.{e.code}"] += 1
            await self._reject(conn, fs, e.code, str(e))
            return
        await fs.send(make_frame(welcome=welcome))
        await fs.finish()
        pc = PeerConn(remote, conn, False, ann.boot_id, self.clock.monotonic())
        self.counters["admission.accepted"] += 1
        self._register(pc)

    def _use_invite(self, cred: pb.InviteCredential) -> None:
        """Refuse a spent or revoked token; a single-use one is honoured by its issuer alone (one event
        loop, so two joiners cannot both use it) and is spent here."""
        nonce = cred.nonce.hex()
        if nonce in self.membership.spent:
            raise InviteError("this invite token was revoked or, being single-use, is already used; "
                              "ask a member for a new one (mesh402 invite)", "spent")
        if cred.single_use:
            if bytes(cred.issuer) != self.node_id:
                raise InviteError("a single-use invite is accepted only by the member that minted it",
                                  "single_use_elsewhere")
            self._spend({nonce: int(cred.expires_at)})

    def _admit(self, remote: bytes, hello: pb.Hello) -> tuple[pb.PeerAnnouncement, pb.Welcome]:
        """Check a Hello. Raises InviteError(code) on refusal."""
        g = self.gossip
        assert g is not None
        if hello.mesh_id != g.mesh_id:
            raise InviteError("this node belongs to a different mesh", "wrong_mesh")
        now = self.clock.time()
        try:
            ann = open_announcement(hello.announcement, g.mesh_id, now, g.stale_after, g.max_skew)
        except AnnouncementError as e:
            code = "forged" if e.outcome == Outcome.FORGED else e.outcome.value
            raise InviteError(f"announcement rejected: {e}", code) from None
        if bytes(ann.node_id) != remote:
            raise InviteError("announcement is not from the connecting node", "forged")
        policy = self.membership.policy
        proof = hello.WhichOneof("proof")
        admitted_by_invite = False
        if policy == pb.ADMISSION_OPEN:
            pass
        elif proof == "member_proof":
            invite.check_member_proof(hello.member_proof, self.membership.secret, g.mesh_id, remote, self.node_id)
        elif proof == "invite":
            invite.verify_credential(hello.invite, mesh_id=g.mesh_id, secret=self.membership.secret, policy=policy, now=now)
            self._use_invite(hello.invite)
            admitted_by_invite = True
        else:
            raise InviteError("no admission credential (this mesh needs an invite token)", "no_credential")
        outcome, _ = g.offer(hello.announcement, now, via=remote, direct_sender=True)
        if outcome == Outcome.REPLAYED:
            # Not an attack: the QUIC identity proves the origin itself is dialling
            # (e.g. we pruned it and it comes back with an unchanged announcement).
            # The newer announcement we hold, if any, stays.
            self.counters["admission.old_hello_announcement"] += 1
        ann_stored = g.get(remote)
        if outcome.accepted:
            self._after_offer(outcome, ann, via=remote, from_hello=True)
        welcome = pb.Welcome(
            mesh_id=g.mesh_id,
            policy=policy,
            announcements=self._gossip_items(),
        )
        if policy == pb.ADMISSION_SECRET:
            welcome.member_proof = invite.member_ack(self.membership.secret, g.mesh_id, self.node_id, remote)
            if admitted_by_invite and hello.want_secret:
                welcome.mesh_secret = self.membership.secret
        return (ann_stored or ann), welcome

    async def _reject(self, conn, fs: FramedStream, code: str, reason: str) -> None:
        with contextlib.suppress(Exception):
            await fs.send(make_frame(reject=pb.Reject(code=code, reason=reason)))
            await fs.finish()
            await asyncio.sleep(0.2)  # let the Reject reach the peer before the close
        conn.close(CLOSE_REJECTED, code.encode())

    # ================================================================ connection registry

    def _register(self, pc: PeerConn) -> None:
        nid = pc.node_id
        existing = self.conns.get(nid)
        keep_new = True
        if existing is not None and not existing.closed and existing is not pc:
            st = self.liveness.state(nid)
            existing_dead = False
            with contextlib.suppress(Exception):
                existing_dead = existing.conn.close_reason() is not None
            simultaneous = pc.created - existing.created < self.timers.duplicate_window
            if (
                existing_dead
                or existing.boot_id != pc.boot_id
                or st in (PeerState.SUSPECT, PeerState.DOWN, PeerState.LEFT)
                or not simultaneous
            ):
                # a new incarnation, or a deliberate re-dial: the peer has
                # given up the old connection, so the new one wins
                keep_new = True
            else:
                preferred = min(self.node_id, nid)
                new_initiator = self.node_id if pc.initiator else nid
                keep_new = new_initiator == preferred
                self.counters["conn.duplicate"] += 1
            if keep_new:
                existing.close(CLOSE_DUPLICATE if existing.boot_id == pc.boot_id else CLOSE_REPLACED, "replaced")
            else:
                pc.close(CLOSE_DUPLICATE, "duplicate")
                return
        with contextlib.suppress(Exception):
            pc.conn.set_max_concurrent_bi_streams(1024)
        self.conns[nid] = pc
        was_new = self.liveness.connected(nid, pc.boot_id)
        ann = self.gossip.get(nid) if self.gossip else None
        if ann is not None:
            self.membership.remember_peer(nid.hex(), list(ann.addrs), ann.relay_url)
            self._schedule_save()
        pc.tasks.append(self._spawn(self._serve_conn(pc)))
        pc.tasks.append(self._spawn(self._heartbeat(pc)))
        self.counters["conn.established"] += 1
        if was_new:
            self._emit("peer_up", node_id=nid.hex())
            self._resign(flush=False)  # our RTT table / peer set changed
        self._schedule_flush()

    def _on_conn_lost(self, pc: PeerConn, reason: str) -> None:
        was_closed = pc.closed
        pc.closed = True
        for t in pc.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        if self._stopping or was_closed or self.conns.get(pc.node_id) is not pc:
            return
        self.conns.pop(pc.node_id, None)
        self.counters["conn.lost"] += 1
        if "ApplicationClosed" in reason and f"error_code: {CLOSE_LEAVING}," in reason:
            # the peer closed with "leaving" (authenticated by QUIC) but its
            # PeerLeaving frame did not arrive first
            self._mark_left(pc.node_id)
            return
        self._spawn(self._after_loss(pc.node_id, reason))

    async def _after_loss(self, node_id: bytes, reason: str) -> None:
        # A duplicate-connection close is usually followed at once by the
        # winning connection: give it a moment before suspecting the peer.
        await self.clock.sleep(self.timers.failure_retry)
        if node_id in self.conns or self._stopping:
            return
        st = self.liveness.state(node_id)
        if st in (PeerState.DOWN, PeerState.LEFT):
            return
        if self.liveness.suspect(node_id):
            self._emit("peer_suspect", node_id=node_id.hex(), reason="connection lost")
        await self._probe(node_id, report=True)

    # ================================================================ streams

    async def _serve_conn(self, pc: PeerConn) -> None:
        reason = "closed"
        try:
            while not pc.closed:
                bi = await pc.conn.accept_bi()
                self._spawn(self._handle_stream(pc, bi))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = framing.iroh_error_text(e)
        self._on_conn_lost(pc, reason)

    async def _handle_stream(self, pc: PeerConn, bi) -> None:
        recv = bi.recv()
        try:
            stype = await framing.read_stream_type(recv, STREAM_TYPE_TIMEOUT)
        except FrameError as e:
            self.counters[f"frame.{e.code}"] += 1
            await FramedStream(bi.send(), recv, StreamType.GOSSIP).reset(2)
            return
        except Exception:
            return
        fs = FramedStream(bi.send(), recv, stype)
        try:
            if stype == StreamType.GOSSIP:
                await self._handle_gossip(pc, fs)
            elif stype == StreamType.PING:
                await self._handle_ping(pc, fs)
            elif stype == StreamType.PEER_DOWN:
                await self._handle_peer_down(pc, fs)
            elif stype == StreamType.PEER_LEAVING:
                await self._handle_leaving(pc, fs)
            else:
                handler = self.handlers.get(stype)
                if handler is None:
                    self.counters["stream.no_handler"] += 1
                    await fs.reset(3)
                    return
                self.liveness.seen(pc.node_id)
                await handler(pc.node_id, fs)
                with contextlib.suppress(Exception):
                    await fs.finish()
        except FrameError as e:
            self.counters[f"frame.{e.code}"] += 1
            await fs.reset(2)
        except asyncio.TimeoutError:
            self.counters["stream.timeout"] += 1
            await fs.reset(4)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.counters["stream.error"] += 1
            log.debug("stream %s from %s failed: %s", stype.name, short_id(pc.node_id), framing.iroh_error_text(e))
            await fs.reset(5)

    def register_handler(self, stream_type: StreamType, handler: Handler) -> None:
        """Later issues: handle STAGE / HTTP_TUNNEL / ROUTE_REQUEST / PLUGIN streams.
        ``handler(peer_id, stream)`` reads and writes frames; the stream is
        finished when it returns."""
        if stream_type in framing.CONTROL_STREAMS:
            raise ValueError(f"{stream_type.name} is handled by the mesh itself")
        self.handlers[stream_type] = handler

    async def open_stream(self, peer_id: bytes, stream_type: StreamType, max_frame: Optional[int] = None) -> FramedStream:
        pc = self.conns.get(bytes(peer_id))
        if pc is None or pc.closed:
            raise PeerUnavailable(f"no connection to {short_id(peer_id)}")
        bi = await pc.conn.open_bi()
        return FramedStream.opened(bi, stream_type, max_frame)

    async def request(self, peer_id: bytes, stream_type: StreamType, frame: pb.Frame, timeout: float = 30.0) -> Optional[pb.Frame]:
        """Open a stream, send one frame, finish, return the single reply."""
        fs = await self.open_stream(peer_id, stream_type)
        await fs.send(frame)
        await fs.finish()
        return await fs.recv(timeout)

    def connected_peers(self) -> list[bytes]:
        return [k for k, pc in self.conns.items() if not pc.closed]

    # ---------------------------------------------------------------- gossip

    async def _handle_gossip(self, pc: PeerConn, fs: FramedStream) -> None:
        frame = await fs.recv(self.timers.stream_idle_timeout, expect=("gossip",))
        if frame is None:
            return
        g = frame.gossip
        if bytes(g.sender_id) != pc.node_id:
            self.counters["gossip.forged_sender"] += 1
            await fs.reset(2)
            return
        self.liveness.seen(pc.node_id)
        self._merge(g.announcements, pc.node_id)
        if not g.reply:
            theirs = digest_of(g.announcements)
            newer = {k: e for k, e in self.gossip.entries.items() if e.ann.seq > theirs.get(k, -1)}
            reply = pb.Gossip(sender_id=self.node_id, announcements=self._gossip_items(list(newer.items())), reply=True)
            await fs.send(make_frame(gossip=reply))
        await fs.finish()

    def _gossip_items(self, items: Optional[list] = None) -> list[pb.SignedAnnouncement]:
        """What we tell others: everything except peers we believe are down
        (their last announcement would only send others dialling a dead node)."""
        down = {k for k, p in self.liveness.peers.items() if p.state == PeerState.DOWN}
        src = self.gossip.entries.items() if items is None else items
        return [e.signed for k, e in src if k not in down]

    def _merge(self, items, via: bytes) -> None:
        now = self.clock.time()
        for sa in items:
            outcome, ann = self.gossip.offer(sa, now, via=via)
            self._after_offer(outcome, ann, via)

    def _after_offer(self, outcome: Outcome, ann: Optional[pb.PeerAnnouncement], via: Optional[bytes], from_hello: bool = False) -> None:
        if outcome == Outcome.SELF and ann is not None:
            own = self.self_announcement()
            if own is not None and ann.seq >= own.seq and ann.boot_id != self.boot_id:
                # an earlier incarnation of us got a higher seq out: jump past it
                self.membership.bump_seq(ann.seq)
                self._resign()
            return
        if not outcome.accepted or ann is None:
            return
        nid = bytes(ann.node_id)
        if spent.SPENT_LABEL in ann.labels:
            self._spend(spent.decode(ann.labels[spent.SPENT_LABEL]))
        st = self.liveness.state(nid)
        if ann.leaving:
            if self.liveness.mark_left(nid):
                self._emit("peer_left", node_id=nid.hex())
            pc = self.conns.pop(nid, None)
            if pc is not None:
                pc.close(CLOSE_NORMAL, "left")
        elif outcome == Outcome.NEW:
            self._emit("peer_learned", node_id=nid.hex(), via=via.hex() if via else None)
            if not from_hello:
                self._maybe_dial(nid)
        else:
            self._emit("peer_updated", node_id=nid.hex(), seq=ann.seq)
            if st in (PeerState.DOWN, PeerState.LEFT) and not from_hello:
                # a newer announcement is evidence it is alive (restarted, or a
                # partition healed): try it directly
                self._maybe_dial(nid, immediate=True)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_pending or self._stopping or self.gossip is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_pending = True
        self._spawn(self._flush())

    async def _flush(self) -> None:
        try:
            await self.clock.sleep(self.timers.gossip_debounce)
        finally:
            self._flush_pending = False
        await self._push_all()

    async def _push_all(self) -> None:
        pcs = [pc for pc in self.conns.values() if not pc.closed]
        if pcs:
            await asyncio.gather(*(self._push(pc) for pc in pcs), return_exceptions=True)

    async def _push(self, pc: PeerConn) -> None:
        try:
            fs = await asyncio.wait_for(self.open_stream(pc.node_id, StreamType.GOSSIP), self.timers.stream_idle_timeout)
            msg = pb.Gossip(sender_id=self.node_id, announcements=self._gossip_items())
            await fs.send(make_frame(gossip=msg))
            await fs.finish()
            frame = await fs.recv(self.timers.stream_idle_timeout, expect=("gossip",))
            self.counters["gossip.pushes"] += 1
            if frame is not None and bytes(frame.gossip.sender_id) == pc.node_id:
                self.liveness.seen(pc.node_id)
                self._merge(frame.gossip.announcements, pc.node_id)
        except FrameError as e:
            self.counters[f"frame.{e.code}"] += 1
        except Exception:
            self.counters["gossip.push_failed"] += 1

    async def _gossip_loop(self) -> None:
        while not self._stopping:
            await self.clock.sleep(self.timers.gossip_interval)
            await self._push_all()

    async def _announce_loop(self) -> None:
        """Re-sign our announcement when RTTs moved or it is getting old."""
        while not self._stopping:
            await self.clock.sleep(self.timers.rtt_interval)
            rtts = self.liveness.rtts()
            changed = set(rtts) != set(self._sent_rtts) or any(
                abs(rtts[k] - self._sent_rtts.get(k, 0.0)) > max(0.05, 0.2 * self._sent_rtts.get(k, 0.0))
                for k in rtts
            )
            old = self.clock.monotonic() - self._last_announce_mono >= self.timers.announce_refresh
            if changed or old:
                self._resign(flush=True)

    # ---------------------------------------------------------------- liveness

    async def _ping(self, pc: PeerConn) -> float:
        fs = FramedStream.opened(await pc.conn.open_bi(), StreamType.PING)
        t0 = time.perf_counter()
        nonce = int.from_bytes(os.urandom(8), "big")
        await fs.send(make_frame(ping=pb.Ping(nonce=nonce, sent_at_us=_now_us(), sender_id=self.node_id)))
        await fs.finish()
        frame = await fs.recv(expect=("pong",))
        if frame is None or frame.pong.nonce != nonce:
            raise framing.UnexpectedFrame("bad pong")
        return (time.perf_counter() - t0) * 1000.0

    async def ping(self, peer_id: bytes, timeout: Optional[float] = None) -> float:
        """RTT in ms over the mesh connection (a fresh PING stream)."""
        pc = self.conns.get(bytes(peer_id))
        if pc is None:
            raise PeerUnavailable(short_id(peer_id))
        return await asyncio.wait_for(self._ping(pc), timeout or self.timers.heartbeat_timeout)

    async def _handle_ping(self, pc: PeerConn, fs: FramedStream) -> None:
        frame = await fs.recv(self.timers.stream_idle_timeout, expect=("ping",))
        if frame is None:
            return
        self.liveness.seen(pc.node_id)
        await fs.send(make_frame(pong=pb.Pong(nonce=frame.ping.nonce, sent_at_us=frame.ping.sent_at_us, boot_id=self.boot_id)))
        await fs.finish()

    @staticmethod
    def _rx_datagrams(pc: PeerConn) -> Optional[int]:
        try:
            return int(pc.conn.stats().udp_rx_datagrams)
        except Exception:
            return None

    async def _heartbeat(self, pc: PeerConn) -> None:
        """Ping the peer every heartbeat_interval. A ping that times out while QUIC
        still receives datagrams from the peer means its process is alive but its
        Python loop is busy (a long import, a GIL-heavy step): that is counted as
        slow, not as a failure, for up to ``max_unresponsive`` seconds. A dead
        process sends nothing, so kill -9 is still detected in a few intervals."""
        nid = pc.node_id
        slow_since: Optional[float] = None
        while not pc.closed and not self._stopping:
            p = self.liveness.get(nid)
            await self.clock.sleep(
                self.timers.failure_retry if (p is not None and p.failures) or slow_since else self.timers.heartbeat_interval
            )
            if pc.closed or self.conns.get(nid) is not pc:
                return
            rx0 = self._rx_datagrams(pc)
            try:
                rtt = await asyncio.wait_for(self._ping(pc), self.timers.heartbeat_timeout)
                self.liveness.heartbeat_ok(nid, rtt)
                slow_since = None
            except asyncio.CancelledError:
                raise
            except Exception:
                if pc.closed or self.conns.get(nid) is not pc:
                    return
                rx1 = self._rx_datagrams(pc)
                now = self.clock.monotonic()
                if rx0 is not None and rx1 is not None and rx1 > rx0:
                    slow_since = now if slow_since is None else slow_since
                    if now - slow_since < self.timers.max_unresponsive:
                        self.counters["liveness.ping_slow"] += 1
                        continue
                self.counters["liveness.ping_failed"] += 1
                if self.liveness.heartbeat_failed(nid):
                    self.counters["liveness.suspect"] += 1
                    self._emit("peer_suspect", node_id=nid.hex(), reason="heartbeat")
                    self._spawn(self._probe(nid, report=True))
                    return

    async def _probe(self, node_id: bytes, report: bool) -> bool:
        """Confirm a suspicion: drop the old connection, dial afresh within
        probe_timeout. Success -> alive on the new connection; failure -> down."""
        if node_id in self._probing or self._stopping:
            return False
        self._probing.add(node_id)
        try:
            old = self.conns.get(node_id)
            if old is not None:
                self.conns.pop(node_id, None)
                old.close(CLOSE_REPLACED, "probe")
            ann = self.gossip.get(node_id)
            ok = False
            if ann is not None and not ann.leaving:
                try:
                    await asyncio.wait_for(
                        self._dial(node_id, list(ann.addrs), ann.relay_url, None), self.timers.probe_timeout
                    )
                    ok = True
                except asyncio.CancelledError:
                    raise
                except Exception:
                    ok = False
            if ok:
                self.counters["liveness.probe_ok"] += 1
                return True
            if node_id in self.conns:  # the peer dialled us meanwhile
                return True
            self._declare_down(node_id, broadcast=report)
            return False
        finally:
            self._probing.discard(node_id)

    def _declare_down(self, node_id: bytes, broadcast: bool) -> None:
        if not self.liveness.mark_down(node_id):
            return
        self.counters["liveness.down"] += 1
        pc = self.conns.pop(node_id, None)
        if pc is not None:
            pc.close(CLOSE_DOWN, "down")
        p = self.liveness.get(node_id)
        self._emit("peer_down", node_id=node_id.hex())
        self._resign(flush=True)
        if broadcast:
            msg = pb.PeerDown(peer_id=node_id, reporter_id=self.node_id, boot_id=p.boot_id if p else 0)
            for other in list(self.conns.values()):
                self._spawn(self._send_one(other, StreamType.PEER_DOWN, make_frame(peer_down=msg)))

    async def _send_one(self, pc: PeerConn, stype: StreamType, frame: pb.Frame) -> None:
        with contextlib.suppress(Exception):
            fs = await asyncio.wait_for(self.open_stream(pc.node_id, stype), self.timers.stream_idle_timeout)
            await fs.send(frame)
            await fs.finish()

    async def _handle_peer_down(self, pc: PeerConn, fs: FramedStream) -> None:
        frame = await fs.recv(self.timers.stream_idle_timeout, expect=("peer_down",))
        if frame is None:
            return
        d = frame.peer_down
        if bytes(d.reporter_id) != pc.node_id:
            self.counters["liveness.forged_down_report"] += 1
            return
        self.liveness.seen(pc.node_id)
        target = bytes(d.peer_id)
        if target == self.node_id or not self.liveness.accept_down_report(pc.node_id, target):
            self.counters["liveness.down_report_ignored"] += 1
            return
        self._spawn(self._confirm_down(target))

    async def _confirm_down(self, target: bytes) -> None:
        pc = self.conns.get(target)
        if pc is not None:
            rx0 = self._rx_datagrams(pc)
            try:
                rtt = await asyncio.wait_for(self._ping(pc), self.timers.probe_timeout)
                self.liveness.heartbeat_ok(target, rtt)
                self.counters["liveness.down_report_refuted"] += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                rx1 = self._rx_datagrams(pc)
                if rx0 is not None and rx1 is not None and rx1 > rx0 and not pc.closed:
                    self.counters["liveness.down_report_refuted"] += 1  # alive, only slow
                    return
        if await self._probe(target, report=False):
            self.counters["liveness.down_report_refuted"] += 1
        else:
            self.counters["liveness.down_report_confirmed"] += 1

    async def _send_leaving(self, pc: PeerConn, final: pb.SignedAnnouncement) -> None:
        # Wait for the peer to finish its side: closing the connection right
        # after writing would discard the frame in flight.
        with contextlib.suppress(Exception):
            fs = await self.open_stream(pc.node_id, StreamType.PEER_LEAVING)
            await fs.send(make_frame(peer_leaving=pb.PeerLeaving(peer_id=self.node_id, final_announcement=final)))
            await fs.finish()
            await fs.recv(1.0)

    async def _handle_leaving(self, pc: PeerConn, fs: FramedStream) -> None:
        frame = await fs.recv(self.timers.stream_idle_timeout, expect=("peer_leaving",))
        if frame is None:
            return
        m = frame.peer_leaving
        if bytes(m.peer_id) != pc.node_id:
            self.counters["liveness.forged_leaving"] += 1
            return
        now = self.clock.time()
        outcome, ann = self.gossip.offer(m.final_announcement, now, via=pc.node_id, direct_sender=True)
        if outcome.dropped:
            self.counters["liveness.bad_leaving"] += 1
            return
        self.counters["liveness.left"] += 1
        with contextlib.suppress(Exception):
            await fs.finish()
        self._mark_left(pc.node_id)

    def _mark_left(self, node_id: bytes) -> None:
        if self.liveness.mark_left(node_id):
            self._emit("peer_left", node_id=node_id.hex())
        pc = self.conns.pop(node_id, None)
        if pc is not None:
            pc.closed = True  # the peer closes it; do not treat that as a failure
        self._resign(flush=True)

    async def _prune_loop(self) -> None:
        while not self._stopping:
            await self.clock.sleep(max(0.2, min(self.timers.prune_after / 5, 10.0)))
            for nid in self.liveness.prunable():
                self.liveness.remove(nid)
                self.gossip.forget(nid)
                self.counters["liveness.pruned"] += 1
                self._emit("peer_pruned", node_id=nid.hex())
            # ghosts: learned second-hand, never reachable, announcement gone stale
            now = self.clock.time()
            for nid, e in list(self.gossip.peers().items()):
                if nid in self.conns:
                    continue
                if e.ann.issued_at_ms / 1000.0 < now - self.timers.stale_after:
                    self.gossip.forget(nid)
                    self.liveness.remove(nid)
                    self.counters["liveness.pruned_stale"] += 1
                    self._emit("peer_pruned", node_id=nid.hex())

    async def _reconnect_loop(self) -> None:
        """Retry peers we know of but are not connected to; down peers less often
        (until pruned); remembered peers from mesh.json while we have no connection."""
        rounds = 0
        while not self._stopping:
            await self.clock.sleep(self.timers.reconnect_interval)
            rounds += 1
            for nid, e in list(self.gossip.peers().items()):
                st = self.liveness.state(nid)
                if nid in self.conns or st == PeerState.LEFT or e.ann.leaving:
                    continue
                if st == PeerState.DOWN and rounds % 4:
                    continue
                self._maybe_dial(nid)
            if not self.conns and self.membership.peers:
                await self._rejoin_known()

    # ---------------------------------------------------------------- diagnostics

    async def _handle_echo(self, peer_id: bytes, fs: FramedStream) -> None:
        while True:
            frame = await fs.recv(self.timers.stream_idle_timeout, expect=("echo",))
            if frame is None:
                return
            if frame.echo.discard:
                frame.echo.payload = b""
            await fs.send(frame)

    # ================================================================ persistence

    def _schedule_save(self) -> None:
        if self._save_pending or self._stopping:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._save_membership()
            return
        self._save_pending = True
        self._spawn(self._save_later())

    async def _save_later(self) -> None:
        try:
            await asyncio.sleep(0.2)
        finally:
            self._save_pending = False
        self._save_membership()

    def _save_membership(self) -> None:
        if self.membership.mesh_id:
            self.membership.save()

    # ================================================================ events and status

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    def _emit(self, kind: str, **data) -> None:
        ev = {"type": kind, "ts": self.clock.time(), **data}
        for q in list(self._subscribers):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self.counters["events.dropped"] += 1

    def all_counters(self) -> dict[str, int]:
        out = dict(self.counters)
        if self.gossip is not None:
            for k, v in self.gossip.counters.items():
                out[f"gossip.{k}"] = v
        return dict(sorted(out.items()))

    def status(self) -> dict:

        peers = []
        now_mono = self.clock.monotonic()
        if self.gossip is not None:
            ids = set(self.gossip.peers()) | set(self.liveness.peers)
            for nid in sorted(ids):
                e = self.gossip.entries.get(nid)
                lv = self.liveness.get(nid)
                pc = self.conns.get(nid)
                peers.append(
                    {
                        "node_id": nid.hex(),
                        "state": (lv.state.value if lv else "learned"),
                        "connected": pc is not None and not pc.closed,
                        "initiator": (pc.initiator if pc else None),
                        "rtt_ms": (round(lv.rtt_ms, 3) if lv and lv.rtt_ms is not None else None),
                        "last_seen_s": (round(now_mono - lv.last_seen, 3) if lv else None),
                        "via": (e.via.hex() if e and e.via else None),
                        "announcement": announcement_to_dict(e.ann) if e else None,
                    }
                )
        own = self.self_announcement()
        return {
            "node_id": self.node_id.hex(),
            "mesh_id": self.mesh_id,
            "policy": self.membership.policy_name,
            "kind": self.local.kind,
            "boot_id": self.boot_id,
            "addrs": self.local_addrs(),
            "relay_url": self.config.relay_url,
            "started_at": self.started_at,
            "uptime_s": round(now_mono - self._started_mono, 3),
            "joined_at": self.joined_at,
            "invite_token": self.invite_token if self.mesh_id and self.running else None,
            "self": announcement_to_dict(own) if own else None,
            "models": [m for m in (announcement_to_dict(own)["models"] if own else [])],
            "peers": peers,
            "demand": self.demand_view(),
            "counters": self.all_counters(),
        }


class AdmissionRefused(JoinError):
    def __init__(self, node_id: bytes, reason: str, code: str = ""):
        super().__init__(reason)
        self.node_id = node_id
        self.code = code
