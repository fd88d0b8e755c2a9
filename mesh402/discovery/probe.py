"""Counting a listed mesh's members by what this node can verify, not by what the listing claims.

A listing's `node_count` is whatever its publisher wrote: anyone can claim 10,000 nodes. Before
`--auto` joins or merges toward a mesh, it joins that mesh's public invite with a throwaway
identity (an API-only client in a temporary home, so nothing links it to the node or stays in
its mesh.json) and counts the serving members it actually reaches: a member counts only when
this probe holds a live QUIC connection to it (the handshake proves the node id's key) and holds
its signed announcement from gossip. Then the probe leaves (PeerLeaving) and its home is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from mesh402.mesh.config import MeshConfig
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.service import MeshService

log = logging.getLogger(__name__)

SETTLE_S = 1.0  # the count must hold this long (new members are still being dialled before)
PROBE_DEADLINE_S = 8.0  # a probe that takes longer is cut off and counts as unverified


@dataclass(frozen=True)
class ProbeResult:
    mesh_id: str
    verified_nodes: int  # serving members reached and announced (0 when the join failed)
    error: str = ""


def verified_members(mesh: MeshService) -> set[bytes]:
    """Serving members this service is connected to and holds a signed, not-leaving announcement of."""
    if mesh.gossip is None:
        return set()
    live = set(mesh.connected_peers())
    return {nid for nid, e in mesh.gossip.peers().items()
            if nid in live and not e.ann.leaving and e.ann.kind != pb.NODE_KIND_CLIENT}


async def _settle(mesh: MeshService, deadline_s: float) -> int:
    """Wait until the verified count stops changing for SETTLE_S (or the deadline), and return it."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    last, since = -1, loop.time()
    while loop.time() < end:
        n = len(verified_members(mesh))
        known = {nid for nid, e in mesh.gossip.peers().items()
                 if not e.ann.leaving and e.ann.kind != pb.NODE_KIND_CLIENT} if mesh.gossip else set()
        pending = bool(known - set(mesh.connected_peers()))  # learned members not dialled yet
        if n != last or pending:
            last, since = n, loop.time()
        elif loop.time() - since >= SETTLE_S:
            break
        await asyncio.sleep(0.1)
    return max(last, 0)


async def probe_mesh(base: MeshConfig, mesh_id: str, invite: str,
                     deadline_s: float = PROBE_DEADLINE_S) -> ProbeResult:
    """Join ``invite`` as a throwaway client and count the mesh's verified serving members."""
    with tempfile.TemporaryDirectory(prefix="mesh402-probe-") as home:
        cfg = replace(base, home=Path(home), bind_port=0, kind="client", name="probe", policy="secret",
                      new_mesh_id=None, api_port=0, console_port=0, external_addrs=[],
                      dial_client_peers=False)
        svc = MeshService(cfg)
        try:
            await asyncio.wait_for(svc.start(join=invite), deadline_s)
            if svc.mesh_id != mesh_id:  # the invite belongs to another mesh than the listing says
                return ProbeResult(mesh_id, 0, f"invite is for mesh {str(svc.mesh_id)[:12]}")
            return ProbeResult(mesh_id, await _settle(svc, deadline_s))
        except Exception as e:  # a garbled invite, a refused or unreachable mesh: nothing verified
            return ProbeResult(mesh_id, 0, f"{type(e).__name__}: {e}"[:200])
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(svc.stop(graceful=True), 5.0)


def beats(target: tuple[int, str], mine: tuple[int, str]) -> bool:
    """Whether a mesh with verified ``target`` = (nodes, mesh id) should absorb ``mine``.

    Strictly more verified nodes wins. Of two equal meshes only lone nodes merge (the larger mesh
    id wins, so of two racing `--auto` nodes exactly one moves); equal meshes of two or more stay
    put, so counts that wobble by a node while members come and go do not make meshes flap."""
    if target[0] != mine[0]:
        return target[0] > mine[0]
    return target[0] == 1 and target[1] > mine[1]


def rank_verified(results: list[ProbeResult]) -> Optional[ProbeResult]:
    best = [r for r in results if r.verified_nodes > 0]
    return max(best, key=lambda r: (r.verified_nodes, r.mesh_id)) if best else None
