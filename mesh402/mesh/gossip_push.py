"""Push-pull gossip over GOSSIP streams.

On every change (debounced by ``gossip_debounce``) and every ``gossip_interval`` the node pushes all
the signed announcements it knows to each peer; a receiver merges them and replies with what the
pusher lacks (judged by the sequence numbers it sent). What a merge means for the node (dial a new
peer, mark a leaving one, ...) is decided by mesh402.mesh.effects through the ``on_offer`` callback.

A push (and a reply, and what follows a Welcome) is as many Gossip frames as it takes, each under the
control frame limit (:func:`pack`): however many members, and however large their (bounded)
announcements, no frame grows past what a peer accepts.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Callable, Iterable, Optional

from mesh402.mesh import conns, framing
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


# Room in a control frame for the announcements of one Gossip/Welcome frame (the rest: ids, flags).
FRAME_BUDGET = framing.CONTROL_MAX_FRAME - 4096
# Frames one push (or reply) may take: a table of max_origins announcements at the size limit fits.
MAX_FRAMES = 256


def pack(items: Iterable[pb.SignedAnnouncement], budget: int = FRAME_BUDGET) -> list[list[pb.SignedAnnouncement]]:
    """Announcements in groups of at most ``budget`` encoded bytes (in order; never an empty group
    unless there is nothing at all: an empty push still carries the sender id)."""
    groups: list[list[pb.SignedAnnouncement]] = [[]]
    used = 0
    for sa in items:
        n = sa.ByteSize() + 8  # field tag and length prefix
        if groups[-1] and used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(sa)
        used += n
    return groups


async def send_gossip(fs: FramedStream, sender: bytes, items: list[pb.SignedAnnouncement], reply: bool) -> None:
    for group in pack(items):
        await fs.send(make_frame(gossip=pb.Gossip(sender_id=sender, announcements=group, reply=reply)))


async def recv_gossip(fs: FramedStream, pc: PeerConn, timeout: float, counters: collections.Counter[str],
                      first: Optional[pb.Frame] = None) -> Optional[list[pb.Gossip]]:
    """Every Gossip frame until the peer finishes its side (at most MAX_FRAMES); None if one names a
    sender other than the connection's peer (counted)."""
    out: list[pb.Gossip] = []
    frame = first if first is not None else await fs.recv(timeout, expect=("gossip",))
    while frame is not None:
        if not conns.from_peer(pc, frame.gossip.sender_id, counters, "gossip.forged_sender"):
            return None
        out.append(frame.gossip)
        if len(out) > MAX_FRAMES:
            raise framing.UnexpectedFrame(f"more than {MAX_FRAMES} gossip frames in one exchange")
        frame = await fs.recv(timeout, expect=("gossip",))
    return out


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
        frames = await recv_gossip(fs, pc, ctx.timers.stream_idle_timeout, ctx.counters)
        if frames is None:
            await fs.reset(2)
            return
        if not frames:
            return
        ctx.liveness.seen(pc.node_id)
        for g in frames:
            self.merge(g.announcements, pc.node_id)
        if not frames[0].reply:
            theirs = digest_of(sa for g in frames for sa in g.announcements)
            newer = [(k, e) for k, e in ctx.mesh_gossip.entries.items() if e.ann.seq > theirs.get(k, -1)]
            await send_gossip(fs, ctx.node_id, shareable(ctx, newer), reply=True)
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
            await send_gossip(fs, ctx.node_id, shareable(ctx), reply=False)
            await fs.finish()
            frames = await recv_gossip(fs, pc, ctx.timers.stream_idle_timeout, ctx.counters)
            ctx.counters["gossip.pushes"] += 1
            if frames:
                ctx.liveness.seen(pc.node_id)
                for g in frames:
                    self.merge(g.announcements, pc.node_id)
        except FrameError as e:
            ctx.counters[f"frame.{e.code}"] += 1
        except Exception:
            ctx.counters["gossip.push_failed"] += 1

    async def loop(self) -> None:
        """Anti-entropy: push everything every ``gossip_interval`` even when nothing changed."""
        while not self.ctx.stopping:
            await self.ctx.clock.sleep(self.ctx.timers.gossip_interval)
            await self.push_all()
