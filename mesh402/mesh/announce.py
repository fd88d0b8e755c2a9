"""This node's own signed announcement: what goes in it, and when it is signed again.

Built from :class:`LocalInfo` (set by the Node), the RTTs liveness measured and the mesh's spent
invite nonces; re-signed with a fresh sequence number on every change, when the RTTs moved, and
before it gets old. Each re-signing is persisted (the sequence number survives restarts) and, unless
the caller says otherwise, pushed to the peers.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from mesh402.mesh import framing, identity, spent
from mesh402.mesh.context import MeshContext
from mesh402.mesh.gossip import sign_announcement
from mesh402.mesh.limits import MeshLimits
from mesh402.mesh.proto import mesh_pb2 as pb

log = logging.getLogger("mesh402.mesh")


@dataclass
class LocalInfo:
    """Facts about this node that go into its announcement (set by the Node)."""

    kind: str = "serving"
    name: str = ""
    version: str = ""
    api_port: int = 0
    console_port: int = 0
    hardware: pb.Hardware = field(default_factory=pb.Hardware)
    models: list[pb.ModelEntry] = field(default_factory=list)
    demand: list[pb.DemandEntry] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


def kind_enum(kind: str) -> pb.NodeKind:
    return pb.NODE_KIND_CLIENT if kind == "client" else pb.NODE_KIND_SERVING


def rtts_moved(rtts: dict[bytes, float], sent: dict[bytes, float]) -> bool:
    """Peers came or went, or an RTT moved by more than 20 % (and 0.05 ms) since it was announced."""
    return set(rtts) != set(sent) or any(
        abs(rtts[k] - sent.get(k, 0.0)) > max(0.05, 0.2 * sent.get(k, 0.0)) for k in rtts
    )


def fit_labels(ann: pb.PeerAnnouncement, lim: MeshLimits, counters: collections.Counter[str]) -> None:
    """Drop the labels that would make peers refuse the whole announcement (an over-long label, then
    the largest ones until it fits), counted and logged: a bug above must not cut this node off."""
    def dropped(key: str, why: str) -> None:
        del ann.labels[key]
        counters["announce.label_dropped"] += 1
        log.warning("label %r left out of this node's announcement: %s", key[:60], why)

    for k in [k for k, v in ann.labels.items() if len(k) > lim.max_label_key or len(v) > lim.max_label_value]:
        dropped(k, "over the label size limit")
    while ann.labels and (len(ann.labels) > lim.max_labels or ann.ByteSize() > lim.max_announcement_bytes):
        k = max(ann.labels, key=lambda k: (len(ann.labels[k]), k) if k != spent.SPENT_LABEL else (-1, k))
        dropped(k, "the announcement is over its size limit")


class Announcer:
    def __init__(self, ctx: MeshContext, local: LocalInfo, addrs: Callable[[], list[str]],
                 save: Callable[[], None], push: Callable[[], None]) -> None:
        self.ctx = ctx
        self.local = local
        self.addrs = addrs  # the node's current addresses (they depend on the bound endpoint)
        self.save = save  # persist mesh.json soon
        self.push = push  # gossip to the peers soon
        self.sent_rtts: dict[bytes, float] = {}
        self.last_signed_mono = 0.0

    def build(self, leaving: bool = False) -> pb.SignedAnnouncement:
        """Sign a new announcement (a new sequence number) without storing it."""
        ctx = self.ctx
        gossip = ctx.mesh_gossip
        now = ctx.clock.time()
        loc = self.local
        lim = ctx.config.limits
        # within our own limits, so no peer refuses it: the freshest demand, the nearest peers
        rtts = dict(sorted(ctx.liveness.rtts().items(), key=lambda kv: kv[1])[:lim.max_rtts])
        demand = sorted(loc.demand, key=lambda d: -d.last_active_ms)[:lim.max_demand]
        ann = pb.PeerAnnouncement(
            node_id=ctx.node_id,
            seq=ctx.membership.next_seq(now),
            issued_at_ms=int(now * 1000),
            boot_id=ctx.boot_id,
            mesh_id=gossip.mesh_id,
            kind=kind_enum(loc.kind),
            version=loc.version,
            api_port=loc.api_port,
            console_port=loc.console_port,
            addrs=self.addrs(),
            relay_url=ctx.config.relay_url or "",
            hardware=loc.hardware,
            models=list(loc.models),
            demand=sorted(demand, key=lambda d: d.model_id),
            rtts=[pb.PeerRtt(node_id=k, rtt_ms=v) for k, v in sorted(rtts.items())],
            protocol_gen=framing.PROTOCOL_GENERATION,
            leaving=leaving,
            name=loc.name,
            labels=self.labels(now),
        )
        self.sent_rtts = dict(rtts)
        fit_labels(ann, lim, ctx.counters)
        return sign_announcement(ctx.identity, gossip.mesh_id, ann)

    def labels(self, now: float) -> dict[str, str]:
        """The node's labels plus the mesh's spent invite nonces, which every member carries."""
        labels = {k: v for k, v in self.local.labels.items() if k != spent.SPENT_LABEL}
        nonces = self.ctx.membership.spent
        spent.prune(nonces, now)
        ctx = self.ctx
        for n, r in list(nonces.items()):
            if not r.sig:  # ours, from before entries were signed: vouch for it now
                nonces[n] = spent.vouch(ctx.identity.sign, ctx.node_id, ctx.mesh_gossip.mesh_id, n, r.expires_at)
        if nonces:
            labels[spent.SPENT_LABEL] = spent.encode(nonces)
        return labels

    def resign(self, flush: bool = True) -> None:
        """Sign and store a new own announcement; ``flush`` also tells subscribers and the peers."""
        ctx = self.ctx
        if ctx.gossip is None:
            return
        sa = self.build()
        ann = pb.PeerAnnouncement.FromString(sa.announcement)
        ctx.gossip.set_self(sa, ann, ctx.clock.time())
        self.last_signed_mono = ctx.clock.monotonic()
        self.save()
        if flush:
            ctx.events.emit("self_updated", seq=ann.seq)
            self.push()

    def update_local(self, **fields: object) -> None:
        for k, v in fields.items():
            if not hasattr(self.local, k):
                raise AttributeError(f"LocalInfo has no field {k!r}")
            setattr(self.local, k, v)
        self.resign(flush=True)

    def own(self) -> Optional[pb.PeerAnnouncement]:
        e = self.ctx.gossip.self_entry() if self.ctx.gossip else None
        return e.ann if e else None

    def spend(self, entries: dict[str, int]) -> bool:
        """Tokens this node spent or revoked (nonce -> expiry): vouch for them, merge, re-announce."""
        ctx = self.ctx
        mesh_id = ctx.mesh_gossip.mesh_id
        return self.merge_spent({n: spent.vouch(ctx.identity.sign, ctx.node_id, mesh_id, n, e)
                                 for n, e in entries.items()})

    def merge_spent(self, entries: dict[str, spent.Revocation]) -> bool:
        """Merge spent or revoked invite nonces (checking who vouches for each); re-announce (and persist)
        when the set changed."""
        ctx = self.ctx
        changed, bad = spent.merge(ctx.membership.spent, entries, ctx.clock.time(), ctx.mesh_gossip.mesh_id,
                                   identity.verify, ctx.node_id)
        if bad:
            ctx.counters["invites.spent_bad_signature"] += bad
        if not changed:
            return False
        ctx.counters["invites.spent_merged"] += 1
        self.resign()
        return True

    def jump_past(self, seq: int) -> None:
        """An earlier incarnation of this node got ``seq`` out: sign past it so peers take ours."""
        self.ctx.membership.bump_seq(seq)
        self.resign()

    async def loop(self) -> None:
        """Re-sign when the RTTs moved or the announcement is getting old."""
        ctx = self.ctx
        while not ctx.stopping:
            await ctx.clock.sleep(ctx.timers.rtt_interval)
            old = ctx.clock.monotonic() - self.last_signed_mono >= ctx.timers.announce_refresh
            if rtts_moved(ctx.liveness.rtts(), self.sent_rtts) or old:
                self.resign(flush=True)
