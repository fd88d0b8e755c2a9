"""Push-pull gossip over GOSSIP streams.

On every change (debounced by ``gossip_debounce``) and every ``gossip_interval`` the node pushes all
the signed announcements it knows to each peer; a receiver merges them and replies with what the
pusher lacks (judged by the sequence numbers it sent). What a merge means for the node (dial a new
peer, mark a leaving one, ...) is decided by mesh402.mesh.effects through the ``on_offer`` callback.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable, Optional

from mesh402.mesh import conns
from mesh402.mesh.context import MeshContext
from mesh402.mesh.conns import PeerConn
from mesh402.mesh.framing import FrameError, FramedStream, StreamType, make_frame
from mesh402.mesh.gossip import Entry, Outcome, digest_of
from mesh402.mesh.liveness import PeerState
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.tasks import Debounce

# (outcome, announcement, relayed by, it came in a Hello)
OnOffer = Callable[[Outcome, Optional[pb.PeerAnnouncement], Optional[bytes], bool], None]


def shareable(ctx: MeshContext, items: Optional[Iterable[tuple[bytes, Entry]]] = None) -> list[pb.SignedAnnouncement]:
    """What we tell others: everything except peers we believe are down
    (their last announcement would only send others dialling a dead node)."""
    down = {k for k, p in ctx.liveness.peers.items() if p.state == PeerState.DOWN}
    src = ctx.mesh_gossip.entries.items() if items is None else items
    return [e.signed for k, e in src if k not in down]


class GossipPush:
    def __init__(self, ctx: MeshContext, on_offer: OnOffer) -> None:
        self.ctx = ctx
        self.on_offer = on_offer
        self._soon = Debounce(ctx.tasks, lambda: ctx.clock.sleep(ctx.timers.gossip_debounce), self.push_all)

    def merge(self, items: Iterable[pb.SignedAnnouncement], via: bytes) -> None:
        now = self.ctx.clock.time()
        for sa in items:
            outcome, ann = self.ctx.mesh_gossip.offer(sa, now, via=via)
            self.on_offer(outcome, ann, via, False)

    async def handle(self, pc: PeerConn, fs: FramedStream) -> None:
        """A peer's push: merge it, and answer with what it lacks (unless it is itself a reply)."""
        ctx = self.ctx
        frame = await fs.recv(ctx.timers.stream_idle_timeout, expect=("gossip",))
        if frame is None:
            return
        g = frame.gossip
        if not conns.from_peer(pc, g.sender_id, ctx.counters, "gossip.forged_sender"):
            await fs.reset(2)
            return
        ctx.liveness.seen(pc.node_id)
        self.merge(g.announcements, pc.node_id)
        if not g.reply:
            theirs = digest_of(g.announcements)
            newer = [(k, e) for k, e in ctx.mesh_gossip.entries.items() if e.ann.seq > theirs.get(k, -1)]
            reply = pb.Gossip(sender_id=ctx.node_id, announcements=shareable(ctx, newer), reply=True)
            await fs.send(make_frame(gossip=reply))
        await fs.finish()

    def schedule(self) -> None:
        """Push to every peer soon; changes until then go out in the same push."""
        if not self.ctx.stopping and self.ctx.gossip is not None:
            self._soon()

    async def push_all(self) -> None:
        pcs = [pc for pc in self.ctx.conns.values() if not pc.closed]
        if pcs:
            await asyncio.gather(*(self.push(pc) for pc in pcs), return_exceptions=True)

    async def push(self, pc: PeerConn) -> None:
        ctx = self.ctx
        try:
            fs = await asyncio.wait_for(conns.open_stream(ctx.conns, pc.node_id, StreamType.GOSSIP),
                                        ctx.timers.stream_idle_timeout)
            msg = pb.Gossip(sender_id=ctx.node_id, announcements=shareable(ctx))
            await fs.send(make_frame(gossip=msg))
            await fs.finish()
            frame = await fs.recv(ctx.timers.stream_idle_timeout, expect=("gossip",))
            ctx.counters["gossip.pushes"] += 1
            if frame is not None and bytes(frame.gossip.sender_id) == pc.node_id:
                ctx.liveness.seen(pc.node_id)
                self.merge(frame.gossip.announcements, pc.node_id)
        except FrameError as e:
            ctx.counters[f"frame.{e.code}"] += 1
        except Exception:
            ctx.counters["gossip.push_failed"] += 1

    async def loop(self) -> None:
        """Anti-entropy: push everything every ``gossip_interval`` even when nothing changed."""
        while not self.ctx.stopping:
            await self.ctx.clock.sleep(self.ctx.timers.gossip_interval)
            await self.push_all()
