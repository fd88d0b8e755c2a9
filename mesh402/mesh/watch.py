"""Watching peers: heartbeats, probes, PeerDown reports, leaving, loss and pruning.

The state machine lives in mesh402.mesh.liveness (pure); this module drives it over the network:
every ``heartbeat_interval`` each direct peer is pinged; after ``failures_to_suspect`` failures, or
when its connection is lost, it is SUSPECT and probed (a fresh dial within ``probe_timeout``); only
a failed probe makes it DOWN, and the others are told (PeerDown) and confirm with their own probe
before believing it. A PeerLeaving, or a close with CLOSE_LEAVING, makes a peer LEFT at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Awaitable, Callable, Iterable, Optional

from mesh402.mesh import conns, framing
from mesh402.mesh.context import MeshContext
from mesh402.mesh.conns import CLOSE_DOWN, CLOSE_NORMAL, CLOSE_REPLACED, PeerConn, rx_datagrams, still_receiving
from mesh402.mesh.errors import PeerUnavailable
from mesh402.mesh.framing import FramedStream, StreamType, make_frame
from mesh402.mesh.gossip import Entry
from mesh402.mesh.health import HealthTracker
from mesh402.mesh.identity import short_id
from mesh402.mesh.liveness import PeerState
from mesh402.mesh.proto import mesh_pb2 as pb

Dial = Callable[[bytes, list[str], str, Optional[pb.InviteCredential]], Awaitable[PeerConn]]
FAREWELL_TIMEOUT = 1.5  # seconds for every peer to take our PeerLeaving before we close


def missed_ping(rx_before: Optional[int], rx_after: Optional[int], slow_since: Optional[float], now: float,
                max_unresponsive: float) -> tuple[bool, Optional[float]]:
    """A ping went unanswered: (count it as slow rather than failed, the new ``slow_since``).

    QUIC still receiving datagrams from the peer means its process is alive but its Python loop is
    busy (a long import, a GIL-heavy step): slow, for up to ``max_unresponsive`` seconds. A dead
    process sends nothing, so kill -9 is still detected in a few intervals."""
    if still_receiving(rx_before, rx_after):
        slow_since = now if slow_since is None else slow_since
        if now - slow_since < max_unresponsive:
            return True, slow_since
    return False, slow_since


def stale_ghosts(entries: Iterable[tuple[bytes, Entry]], connected: Iterable[bytes], now: float,
                 stale_after: float) -> list[bytes]:
    """Peers learned second-hand, never reachable, whose announcement has gone stale."""
    live = set(connected)
    return [nid for nid, e in entries if nid not in live and e.ann.issued_at_ms / 1000.0 < now - stale_after]


class LivenessWatch:
    def __init__(self, ctx: MeshContext, dial: Dial, resign: Callable[[bool], None],
                 health: HealthTracker[bytes]) -> None:
        self.ctx = ctx
        self.dial = dial
        self.resign = resign  # re-sign our announcement (our peer set changed)
        self.health = health
        self.probing: set[bytes] = set()

    # ------------------------------------------------------------ pings and heartbeats

    async def ping_conn(self, pc: PeerConn) -> float:
        """RTT in ms of one PING stream on ``pc``."""
        fs = FramedStream.opened(await pc.conn.open_bi(), StreamType.PING)
        t0 = time.perf_counter()  # the RTT is real time whatever clock drives the timers
        nonce = int.from_bytes(os.urandom(8), "big")
        sent_at_us = int(self.ctx.clock.time() * 1_000_000)
        await fs.send(make_frame(ping=pb.Ping(nonce=nonce, sent_at_us=sent_at_us, sender_id=self.ctx.node_id)))
        await fs.finish()
        frame = await fs.recv(expect=("pong",))
        if frame is None or frame.pong.nonce != nonce:
            raise framing.UnexpectedFrame("bad pong")
        return (time.perf_counter() - t0) * 1000.0

    async def ping(self, peer_id: bytes, timeout: Optional[float] = None) -> float:
        pc = self.ctx.conns.get(bytes(peer_id))
        if pc is None:
            raise PeerUnavailable(short_id(peer_id))
        return await asyncio.wait_for(self.ping_conn(pc), timeout or self.ctx.timers.heartbeat_timeout)

    async def handle_ping(self, pc: PeerConn, fs: FramedStream) -> None:
        ctx = self.ctx
        frame = await fs.recv(ctx.timers.stream_idle_timeout, expect=("ping",))
        if frame is None:
            return
        ctx.liveness.seen(pc.node_id)
        await fs.send(make_frame(pong=pb.Pong(nonce=frame.ping.nonce, sent_at_us=frame.ping.sent_at_us,
                                              boot_id=ctx.boot_id)))
        await fs.finish()

    async def heartbeat(self, pc: PeerConn) -> None:
        """Ping the peer every heartbeat_interval (failure_retry after a miss) until the connection
        ends or the peer turns suspect, then probe it."""
        ctx, t = self.ctx, self.ctx.timers
        nid = pc.node_id
        slow_since: Optional[float] = None
        while not pc.closed and not ctx.stopping:
            p = ctx.liveness.get(nid)
            missed = (p is not None and p.failures) or slow_since
            await ctx.clock.sleep(t.failure_retry if missed else t.heartbeat_interval)
            if pc.closed or ctx.conns.get(nid) is not pc:
                return
            rx0 = rx_datagrams(pc)
            try:
                rtt = await asyncio.wait_for(self.ping_conn(pc), t.heartbeat_timeout)
                ctx.liveness.heartbeat_ok(nid, rtt)
                slow_since = None
            except asyncio.CancelledError:
                raise
            except Exception:
                if pc.closed or ctx.conns.get(nid) is not pc:
                    return
                slow, slow_since = missed_ping(rx0, rx_datagrams(pc), slow_since, ctx.clock.monotonic(),
                                               t.max_unresponsive)
                if slow:
                    ctx.counters["liveness.ping_slow"] += 1
                    continue
                ctx.counters["liveness.ping_failed"] += 1
                if ctx.liveness.heartbeat_failed(nid):
                    ctx.counters["liveness.suspect"] += 1
                    ctx.events.emit("peer_suspect", node_id=nid.hex(), reason="heartbeat")
                    ctx.tasks.spawn(self.probe(nid, report=True))
                    return

    # ------------------------------------------------------------ probes and PeerDown

    async def probe(self, node_id: bytes, report: bool) -> bool:
        """Confirm a suspicion: drop the old connection, dial afresh within probe_timeout.
        Success -> alive on the new connection; failure -> down (and, with ``report``, say so)."""
        ctx = self.ctx
        if node_id in self.probing or ctx.stopping:
            return False
        self.probing.add(node_id)
        try:
            old = ctx.conns.pop(node_id, None)
            if old is not None:
                old.close(CLOSE_REPLACED, "probe")
            ann = ctx.mesh_gossip.get(node_id)
            if ann is not None and not ann.leaving:
                try:
                    await asyncio.wait_for(self.dial(node_id, list(ann.addrs), ann.relay_url, None),
                                           ctx.timers.probe_timeout)
                    ctx.counters["liveness.probe_ok"] += 1
                    return True
                except asyncio.CancelledError:
                    raise
                except Exception:
                    pass
            if node_id in ctx.conns:  # the peer dialled us meanwhile
                return True
            self.declare_down(node_id, broadcast=report)
            return False
        finally:
            self.probing.discard(node_id)

    def declare_down(self, node_id: bytes, broadcast: bool) -> None:
        ctx = self.ctx
        if not ctx.liveness.mark_down(node_id):
            return
        ctx.counters["liveness.down"] += 1
        pc = ctx.conns.pop(node_id, None)
        if pc is not None:
            pc.close(CLOSE_DOWN, "down")
        p = ctx.liveness.get(node_id)
        ctx.events.emit("peer_down", node_id=node_id.hex())
        self.resign(True)
        if broadcast:
            msg = pb.PeerDown(peer_id=node_id, reporter_id=ctx.node_id, boot_id=p.boot_id if p else 0)
            for other in list(ctx.conns.values()):
                ctx.tasks.spawn(self._send_one(other, StreamType.PEER_DOWN, make_frame(peer_down=msg)))

    async def _send_one(self, pc: PeerConn, stype: StreamType, frame: pb.Frame) -> None:
        with contextlib.suppress(Exception):
            fs = await asyncio.wait_for(conns.open_stream(self.ctx.conns, pc.node_id, stype),
                                        self.ctx.timers.stream_idle_timeout)
            await fs.send(frame)
            await fs.finish()

    async def handle_peer_down(self, pc: PeerConn, fs: FramedStream) -> None:
        ctx = self.ctx
        frame = await fs.recv(ctx.timers.stream_idle_timeout, expect=("peer_down",))
        if frame is None or not conns.from_peer(pc, frame.peer_down.reporter_id, ctx.counters,
                                                "liveness.forged_down_report"):
            return
        d = frame.peer_down
        ctx.liveness.seen(pc.node_id)
        target = bytes(d.peer_id)
        if target == ctx.node_id or not ctx.liveness.accept_down_report(pc.node_id, target):
            ctx.counters["liveness.down_report_ignored"] += 1
            return
        ctx.tasks.spawn(self.confirm_down(target))

    async def confirm_down(self, target: bytes) -> None:
        """Someone says ``target`` is down: believe it only if our own ping and probe fail."""
        ctx = self.ctx
        pc = ctx.conns.get(target)
        if pc is not None:
            rx0 = rx_datagrams(pc)
            try:
                rtt = await asyncio.wait_for(self.ping_conn(pc), ctx.timers.probe_timeout)
                ctx.liveness.heartbeat_ok(target, rtt)
                ctx.counters["liveness.down_report_refuted"] += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if still_receiving(rx0, rx_datagrams(pc)) and not pc.closed:
                    ctx.counters["liveness.down_report_refuted"] += 1  # alive, only slow
                    return
        if await self.probe(target, report=False):
            ctx.counters["liveness.down_report_refuted"] += 1
        else:
            ctx.counters["liveness.down_report_confirmed"] += 1

    # ------------------------------------------------------------ leaving

    async def farewell(self, final: Callable[[], pb.SignedAnnouncement]) -> None:
        """Tell every peer we are leaving (``final``: our last, leaving announcement), briefly."""
        ctx = self.ctx
        if ctx.gossip is None or not ctx.conns:
            return
        with contextlib.suppress(Exception):
            msg = final()
            await asyncio.wait_for(
                asyncio.gather(*(self._send_leaving(pc, msg) for pc in list(ctx.conns.values())),
                               return_exceptions=True),
                FAREWELL_TIMEOUT,
            )

    async def _send_leaving(self, pc: PeerConn, final: pb.SignedAnnouncement) -> None:
        # Wait for the peer to finish its side: closing the connection right
        # after writing would discard the frame in flight.
        with contextlib.suppress(Exception):
            fs = await conns.open_stream(self.ctx.conns, pc.node_id, StreamType.PEER_LEAVING)
            await fs.send(make_frame(peer_leaving=pb.PeerLeaving(peer_id=self.ctx.node_id, final_announcement=final)))
            await fs.finish()
            await fs.recv(1.0)

    async def handle_leaving(self, pc: PeerConn, fs: FramedStream) -> None:
        ctx = self.ctx
        frame = await fs.recv(ctx.timers.stream_idle_timeout, expect=("peer_leaving",))
        if frame is None or not conns.from_peer(pc, frame.peer_leaving.peer_id, ctx.counters,
                                                "liveness.forged_leaving"):
            return
        final = frame.peer_leaving.final_announcement
        outcome, _ = ctx.mesh_gossip.offer(final, ctx.clock.time(), via=pc.node_id, direct_sender=True)
        if outcome.dropped:
            ctx.counters["liveness.bad_leaving"] += 1
            return
        ctx.counters["liveness.left"] += 1
        with contextlib.suppress(Exception):
            await fs.finish()
        self.mark_left(pc.node_id)

    def mark_left(self, node_id: bytes) -> None:
        ctx = self.ctx
        if ctx.liveness.mark_left(node_id):
            ctx.events.emit("peer_left", node_id=node_id.hex())
        pc = ctx.conns.pop(node_id, None)
        if pc is not None:
            pc.closed = True  # the peer closes it; do not treat that as a failure
        self.resign(True)

    def announced_leaving(self, node_id: bytes) -> None:
        """Gossip brought the peer's leaving announcement: it is gone, close our side too."""
        ctx = self.ctx
        if ctx.liveness.mark_left(node_id):
            ctx.events.emit("peer_left", node_id=node_id.hex())
        pc = ctx.conns.pop(node_id, None)
        if pc is not None:
            pc.close(CLOSE_NORMAL, "left")

    # ------------------------------------------------------------ loss and pruning

    def conn_lost(self, pc: PeerConn, reason: str) -> None:
        """The connection's stream loop ended (``reason``: iroh's words)."""
        ctx = self.ctx
        was_closed = pc.closed
        pc.closed = True
        for t in pc.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        if ctx.stopping or was_closed or ctx.conns.get(pc.node_id) is not pc:
            return
        ctx.conns.pop(pc.node_id, None)
        ctx.counters["conn.lost"] += 1
        if conns.closed_as_leaving(reason):
            self.mark_left(pc.node_id)  # its PeerLeaving frame did not arrive first
            return
        ctx.tasks.spawn(self._after_loss(pc.node_id))

    async def _after_loss(self, node_id: bytes) -> None:
        ctx = self.ctx
        # A duplicate-connection close is usually followed at once by the
        # winning connection: give it a moment before suspecting the peer.
        await ctx.clock.sleep(ctx.timers.failure_retry)
        if node_id in ctx.conns or ctx.stopping:
            return
        if ctx.liveness.state(node_id) in (PeerState.DOWN, PeerState.LEFT):
            return
        if ctx.liveness.suspect(node_id):
            ctx.events.emit("peer_suspect", node_id=node_id.hex(), reason="connection lost")
        await self.probe(node_id, report=True)

    def _forget(self, node_id: bytes) -> None:
        self.ctx.mesh_gossip.forget(node_id)
        self.ctx.liveness.remove(node_id)
        self.health.forget(node_id)
        self.ctx.events.emit("peer_pruned", node_id=node_id.hex())

    async def prune_loop(self) -> None:
        """Forget peers down or left for ``prune_after``, and stale second-hand ones."""
        ctx = self.ctx
        while not ctx.stopping:
            await ctx.clock.sleep(max(0.2, min(ctx.timers.prune_after / 5, 10.0)))
            for nid in ctx.liveness.prunable():
                ctx.counters["liveness.pruned"] += 1
                self._forget(nid)
            for nid in stale_ghosts(list(ctx.mesh_gossip.peers().items()), ctx.conns, ctx.clock.time(),
                                    ctx.timers.stale_after):
                ctx.counters["liveness.pruned_stale"] += 1
                self._forget(nid)
            ctx.counters["gossip.high_water_pruned"] += ctx.mesh_gossip.prune(ctx.clock.time())
