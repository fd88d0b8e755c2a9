"""Dialling peers: joining through tokens, rejoining after a restart, and keeping the mesh full.

Newly learned peers are dialled directly, the smaller node id at once and the larger after
``transitive_dial_grace`` (so two nodes that learn of each other together rarely dial both ways),
which makes the mesh a full mesh. Known peers we are not connected to are retried every
``reconnect_interval``, no sooner than the shared :class:`~mesh402.mesh.health.HealthTracker`
allows: every dial's outcome is recorded there, so a peer that keeps failing is tried less and less
often (up to ``redial_backoff_max``), and one success clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable, Optional

from mesh402.mesh import framing
from mesh402.mesh.announce import LocalInfo
from mesh402.mesh.context import MeshContext
from mesh402.mesh.conns import CLOSE_PROTOCOL, Conn, PeerConn
from mesh402.mesh.errors import AdmissionRefused, JoinError, PeerUnavailable
from mesh402.mesh.health import Backoff, HealthTracker
from mesh402.mesh.identity import short_id
from mesh402.mesh.invite import InviteError
from mesh402.mesh.liveness import PeerState
from mesh402.mesh.proto import mesh_pb2 as pb

Connect = Callable[[bytes, list[str], str], Awaitable[Conn]]  # (node id, addrs, relay url)
Handshake = Callable[[Conn, bytes, Optional[pb.InviteCredential]], Awaitable[PeerConn]]
Target = tuple[bytes, list[str], str, Optional[pb.InviteCredential]]


class Dialer:
    def __init__(self, ctx: MeshContext, local: LocalInfo, connect: Connect, handshake: Handshake,
                 health: HealthTracker[bytes], probing: Callable[[bytes], bool]) -> None:
        self.ctx = ctx
        self.local = local
        self.connect = connect
        self.handshake = handshake  # Hello/Welcome; registers the connection on success
        self.health = health
        self.probing = probing  # a probe is dialling the peer itself
        self.dialing: dict[bytes, asyncio.Task[None]] = {}

    async def dial(self, node_id: bytes, addrs: list[str], relay_url: str,
                   credential: Optional[pb.InviteCredential]) -> PeerConn:
        """Connect and run the handshake; the outcome goes into the health tracker."""
        try:
            pc = await self._dial(node_id, addrs, relay_url, credential)
        except BaseException:  # a timeout cancels the dial: that is a failure too
            self.health.failed(node_id)
            raise
        self.health.succeeded(node_id)
        return pc

    async def _dial(self, node_id: bytes, addrs: list[str], relay_url: str,
                    credential: Optional[pb.InviteCredential]) -> PeerConn:
        ctx = self.ctx
        if not addrs and not relay_url:
            raise PeerUnavailable("no address")
        if ctx.quotas.ban_left(node_id) is not None:
            raise PeerUnavailable(f"{short_id(node_id)} is refused for exceeding its quotas")
        try:
            conn = await asyncio.wait_for(self.connect(node_id, addrs, relay_url), ctx.timers.connect_timeout)
        except asyncio.TimeoutError:
            ctx.counters["dial.timeout"] += 1
            raise
        except Exception:
            ctx.counters["dial.failed"] += 1
            raise
        try:
            return await asyncio.wait_for(self.handshake(conn, node_id, credential), ctx.timers.hello_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close(CLOSE_PROTOCOL, b"handshake failed")
            raise

    async def dial_quiet(self, node_id: bytes, addrs: list[str], relay_url: str = "") -> bool:
        try:
            await self.dial(node_id, addrs, relay_url, None)
            return True
        except Exception:
            return False

    # ------------------------------------------------------------ joining

    async def join(self, toks: list[pb.InviteToken]) -> None:
        """Dial the token nodes (and, when rejoining, remembered peers) until one admits us.
        Raises JoinError with one line for a person."""
        ctx = self.ctx
        last_err: Optional[BaseException] = None
        tok0 = toks[0]
        targets: list[Target] = [(bytes(t.node_id), list(t.addrs), t.relay_url, t.credential) for t in toks]
        if ctx.membership.member_of(tok0.mesh_id):
            for hexid, info in ctx.membership.peers.items():
                nid = bytes.fromhex(hexid)
                if nid != ctx.node_id and all(nid != t[0] for t in targets):
                    targets.append((nid, info.get("addrs", []), info.get("relay_url", ""), None))
        between = Backoff(base=ctx.timers.join_backoff)
        for attempt in range(ctx.timers.join_attempts):
            tasks = [asyncio.ensure_future(self.dial(nid, addrs, relay, cred))
                     for nid, addrs, relay, cred in targets if nid != ctx.node_id]
            if not tasks:
                raise JoinError("the invite token points at this node itself")
            try:
                for fut in asyncio.as_completed(tasks):
                    try:
                        await fut
                        return
                    except AdmissionRefused as e:
                        raise JoinError(f"join refused by {short_id(e.node_id)}: {e}") from None
                    except (JoinError, InviteError) as e:
                        last_err = e
                    except Exception as e:  # connection failures
                        last_err = e
            finally:
                # keep the connections the other targets still make; only silence their errors
                for t in tasks:
                    if not t.done():
                        t.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            if attempt + 1 < ctx.timers.join_attempts:
                await ctx.clock.sleep(between.delay(attempt + 1))
        msg = framing.iroh_error_text(last_err) if last_err else "no reachable address"
        if isinstance(last_err, asyncio.TimeoutError):
            msg = "timed out"
        addrs = ", ".join(tok0.addrs) or tok0.relay_url
        raise JoinError(f"could not reach the mesh at {addrs} ({msg}); is the inviting node running?")

    async def rejoin_known(self) -> None:
        """After a restart, or when every connection is gone: dial remembered peers with our
        membership proof."""
        ctx = self.ctx
        for hexid, info in list(ctx.membership.peers.items()):
            nid = bytes.fromhex(hexid)
            if nid != ctx.node_id and nid not in ctx.conns and self.health.may_try(nid):
                ctx.tasks.spawn(self.dial_quiet(nid, info.get("addrs", []), info.get("relay_url", "")))

    # ------------------------------------------------------------ keeping the mesh full

    def maybe_dial(self, node_id: bytes, immediate: bool = False) -> None:
        """Dial a peer we learned of, unless connected, already dialling, or held back by its
        failures; ``immediate``: fresh evidence it is up (no grace, no backoff)."""
        ctx = self.ctx
        if ctx.stopping or ctx.gossip is None or node_id == ctx.node_id:
            return
        if node_id in ctx.conns or node_id in self.dialing or self.probing(node_id):
            return
        if ctx.quotas.ban_left(node_id) is not None:
            return
        ann = ctx.gossip.get(node_id)
        if ann is None or ann.leaving:  # a newer non-leaving announcement means it came back
            return
        if not ctx.config.dial_client_peers and self.local.kind == "client" and ann.kind == pb.NODE_KIND_CLIENT:
            return
        if not immediate and not self.health.may_try(node_id):
            ctx.counters["dial.backoff"] += 1
            return
        delay = 0.0 if (immediate or ctx.node_id < node_id) else ctx.timers.transitive_dial_grace
        self.dialing[node_id] = ctx.tasks.spawn(self._dial_later(node_id, delay))

    async def _dial_later(self, node_id: bytes, delay: float) -> None:
        ctx = self.ctx
        try:
            if delay:
                await ctx.clock.sleep(delay)
            if node_id in ctx.conns or ctx.stopping:
                return
            ann = ctx.mesh_gossip.get(node_id)
            if ann is None:
                return
            try:
                await self.dial(node_id, list(ann.addrs), ann.relay_url, None)
                ctx.counters["dial.transitive_ok"] += 1
            except Exception:
                ctx.counters["dial.transitive_failed"] += 1
        finally:
            self.dialing.pop(node_id, None)

    async def reconnect_loop(self) -> None:
        """Retry peers we know of but are not connected to (each as its backoff allows, until
        pruned); remembered peers from mesh.json while we have no connection at all."""
        ctx = self.ctx
        while not ctx.stopping:
            await ctx.clock.sleep(ctx.timers.reconnect_interval)
            for nid, e in list(ctx.mesh_gossip.peers().items()):
                if nid in ctx.conns or ctx.liveness.state(nid) == PeerState.LEFT or e.ann.leaving:
                    continue
                self.maybe_dial(nid)
            if not ctx.conns and ctx.membership.peers:
                await self.rejoin_known()
