"""Replicas: every node that can hold a model whole serves it (unless started `--standby`), so a
model can have several independent hosts; host election and pipeline plans apply only to models
that fit no single node (splits). A `--standby` node serves nothing until the mesh's demand for a
model it has on disk calls for it (mesh402.routing.demand).

Each replica announces a ready solo plan (`plan:<key>` label), which is how the API finds all
replicas of a model (:func:`replica_routes`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.placement import MeshSnapshot, Plan, fits
from mesh402.placement.types import StageAssignment
from mesh402.routing.demand import standby_promotions

if TYPE_CHECKING:
    from mesh402.serving.distributed import DistributedRuntime, Route
    from mesh402.serving.registry import ModelEntry

log = logging.getLogger(__name__)

def replica_routes(dist: "DistributedRuntime") -> dict[str, list["Route"]]:
    """model id -> every node whose ready plan for it this node believes (solo replicas and split hosts):
    self-named, and proven to hold the model where this node can check (DistributedRuntime._claims)."""
    from mesh402.serving.distributed import Route  # lazy: loads gguf, numpy, torch only when needed

    out: dict[str, list[Route]] = {}
    for key in dist.claimed_keys(connected=False):
        model_id = key.rsplit("@", 1)[0]
        for host, (claim, port) in sorted(dist._claims(key, connected=False).items()):
            if claim.ready:
                out.setdefault(model_id, []).append(Route(model_id, key, host, port, True, claim.data))
    return out


def on_disk_somewhere(dist: "DistributedRuntime", model_id: str) -> bool:
    return any(m.model_id == model_id for ann in dist._announcements(connected=False) for m in ann.models)


def _servers(dist: "DistributedRuntime") -> dict[str, int]:
    return {m: len(rs) for m, rs in replica_routes(dist).items()}


def promoted(dist: "DistributedRuntime") -> set[str]:
    """Models a --standby node serves now: those it already started, plus new demand."""
    on_disk = [e.model_id for e in dist.node.registry.all()]
    now_ms = int(dist.mesh.clock.time() * 1000)
    want = standby_promotions(dist.mesh.demand_view(), _servers(dist), on_disk, now_ms=now_ms,
                              ttl_s=dist.mesh.timers.demand_ttl)
    keep = {k.rsplit("@", 1)[0] for k in dist.hosted}
    return keep | set(want)


async def ensure_replica(dist: "DistributedRuntime", key: str, entry: "ModelEntry", snap: MeshSnapshot) -> bool:
    """Serve ``key`` whole on this node when it fits here; True when handled (replica or standby),
    False when the model needs the election / split path."""
    layout = await asyncio.to_thread(dist._layout, key, entry)
    cap = snap.capacity(dist.me) if dist.me in snap else dist.capacity
    if not fits(layout.total_bytes, cap):
        if getattr(dist.node.config, "standby", False) and entry.model_id not in promoted(dist):
            dist._drop_hosting(key)
            entry.local, entry.state, entry.error = None, "standby", None
            return True
        return False
    cur = dist.hosted.get(key)
    if cur is not None and getattr(cur.plan, "is_solo", False):
        return True
    if getattr(dist.node.config, "standby", False):
        if entry.model_id not in promoted(dist):
            entry.local, entry.state, entry.error = None, "standby", None
            return True
        used = sum(getattr(h.layout, "total_bytes", 0) for h in dist.hosted.values())
        if not fits(used + layout.total_bytes, cap):
            entry.local, entry.state, entry.error = None, "standby", "no spare capacity"
            return True
        log.info("standby: demand for %s, starting to serve it", entry.model_id)
    from mesh402.serving.distributed import Hosted  # lazy: loads gguf, numpy, torch only when needed

    epoch = dist._seen_epoch(key) + 1
    plan = Plan(key, epoch, dist.me, (StageAssignment(dist.me, 0, layout.n_layers, layout.total_bytes),))
    entry.state = "loading"
    try:
        engine = await dist._run(dist._load_engine, entry, None)
    except Exception as e:
        entry.local, entry.state, entry.error = None, "failed", f"{type(e).__name__}: {e}"
        return True
    serving: Any = dist.local_model(engine, key, entry, layout.n_layers)
    dist.hosted[key] = Hosted(key, plan, serving, layout)
    dist.epochs[key] = epoch
    dist.waiting.pop(key, None)
    entry.local, entry.state, entry.error = serving, "ready", None
    dist.roles.by_key[key] = (pb.MODEL_ROLE_HOST, 0, layout.n_layers, epoch)
    log.info("serving %s whole (replica)", key)
    return True
