"""Demand signals: requests per model that this node served or proxied, gossiped in its own signed
announcement (debounced), and summed over the mesh. Each origin signs only its own counts, so no
peer can inflate another's.

Only models that exist in the mesh (some announcement lists them, in any role: held, on disk, ...) are
counted: any API client may name any model, and a count per made-up name would grow this table and our
signed announcement with each one (entries live ``demand_ttl``, 24 h) and push real demand out of it.
The table is capped at ``max_demand`` models besides (the least recently active go first)."""

from __future__ import annotations

from typing import Callable, Iterable

from mesh402.mesh.context import MeshContext
from mesh402.mesh.gossip import Entry
from mesh402.mesh.liveness import PeerState
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.tasks import Debounce


def mesh_demand(entries: Iterable[tuple[bytes, Entry]], skip: set[bytes], cutoff_ms: int) -> dict[str, dict[str, int]]:
    """Per model: requests summed over origins, the latest activity, and how many nodes saw
    requests; entries older than ``cutoff_ms`` and origins in ``skip`` (down or left) left out."""
    out: dict[str, dict[str, int]] = {}
    for origin, e in entries:
        if origin in skip:
            continue
        for d in e.ann.demand:
            if d.last_active_ms < cutoff_ms:
                continue
            v = out.setdefault(d.model_id, {"requests": 0, "last_active_ms": 0, "nodes": 0})
            v["requests"] += d.request_count
            v["last_active_ms"] = max(v["last_active_ms"], d.last_active_ms)
            v["nodes"] += 1
    return out


class DemandBook:
    def __init__(self, ctx: MeshContext, publish: Callable[[list[pb.DemandEntry]], None]) -> None:
        self.ctx = ctx
        self.publish = publish  # put the entries in our announcement and re-sign it
        self.counts: dict[str, tuple[int, int]] = {}  # model -> (last_active_ms, count)
        # one re-announcement for a burst of requests
        self._soon = Debounce(ctx.tasks, lambda: ctx.clock.sleep(ctx.timers.demand_announce_delay), self._publish)

    def _cutoff_ms(self) -> int:
        return int((self.ctx.clock.time() - self.ctx.timers.demand_ttl) * 1000)

    def in_mesh(self, model_id: str) -> bool:
        g = self.ctx.gossip
        return g is not None and any(m.model_id == model_id for e in g.entries.values() for m in e.ann.models)

    def note(self, model_id: str, count: int = 1) -> None:
        if not model_id or model_id == "auto":
            return
        if model_id not in self.counts and not self.in_mesh(model_id):
            self.ctx.counters["demand.unknown_model"] += 1
            return
        _, n = self.counts.get(model_id, (0, 0))
        if model_id not in self.counts and len(self.counts) >= self.ctx.config.limits.max_demand:
            del self.counts[min(self.counts, key=lambda k: self.counts[k][0])]
        self.counts[model_id] = (int(self.ctx.clock.time() * 1000), n + count)
        if self.ctx.gossip is not None:
            self._soon()

    async def _publish(self) -> None:
        cutoff = self._cutoff_ms()
        self.counts = {k: v for k, v in self.counts.items() if v[0] >= cutoff}
        self.publish([pb.DemandEntry(model_id=k, last_active_ms=v[0], request_count=v[1])
                      for k, v in sorted(self.counts.items())])

    def view(self) -> dict[str, dict[str, int]]:
        ctx = self.ctx
        if ctx.gossip is None:
            return {}
        down = {k for k, p in ctx.liveness.peers.items() if p.state in (PeerState.DOWN, PeerState.LEFT)}
        return mesh_demand(ctx.gossip.entries.items(), down, self._cutoff_ms())
