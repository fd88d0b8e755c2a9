"""Meshes found through the ERC-8004 IdentityRegistry (`--discover-registry`), and this node's own mesh as
the listing its registration file carries.

A registered node's registration file (served at its agentURI) may carry a live listing of its mesh; a
listing counts only when the agent's node binding verifies on chain, the file names the same node and the
listing was published by that node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mesh402.discovery.auto import mesh_view
from mesh402.discovery.listing import MeshListing
from mesh402.economics.chain import web3_for
from mesh402.economics.erc8004 import registered_agents
from mesh402.economics.networks import NAMED, Deployment, erc8004_registries
from mesh402.mesh.proto import mesh_pb2 as pb


def resolve_registry_source(spec: str) -> tuple[str, str]:
    """(RPC URL, IdentityRegistry address) from a `--discover-registry` value: a deployment.json (or its
    folder), a network name (base-sepolia, base: the canonical ERC-8004 registry), or RPC_URL,REGISTRY."""

    p = Path(spec).expanduser()
    if p.exists():
        dep = Deployment.load(p)
        return dep.rpc_url, erc8004_registries(None, dep)["IdentityRegistry"]
    if spec in NAMED:
        return NAMED[spec].rpc_url, erc8004_registries(spec)["IdentityRegistry"]
    if "," in spec:
        rpc, reg = spec.split(",", 1)
        return rpc.strip(), reg.strip()
    raise ValueError(f"--discover-registry {spec!r}: pass a deployment.json, a network name "
                     f"({', '.join(NAMED)}) or RPC_URL,REGISTRY_ADDRESS")


def registry_listings(rpc_url: str, registry: str, *, timeout: float = 5.0, exclude_node: str = "",
                      from_block: int = 0) -> list[Any]:
    """Mesh listings of registered nodes: every agent whose node binding verifies, whose registration file
    (at its agentURI) names that same node, and whose listing was published by that node."""
    import httpx


    w3 = web3_for(rpc_url, timeout=timeout)
    out = []
    for info in registered_agents(w3, w3.to_checksum_address(registry), from_block=from_block):
        if info.node_id is None or info.node_id == exclude_node or not info.agent_uri.startswith(("http://", "https://")):
            continue
        try:
            doc = httpx.get(info.agent_uri, timeout=timeout).json()
            m = doc.get("mesh402") or {}
            if m.get("nodeId") != info.node_id or not isinstance(m.get("listing"), dict):
                continue
            lst = MeshListing.from_json(json.dumps(m["listing"]))
        except Exception:
            continue
        if lst.publisher_node != info.node_id:
            continue
        lst.author = f"erc8004:{info.agent_id}"
        lst.created_at = int(time.time())
        out.append(lst)
    return out


def live_listing(mesh: Any) -> dict[str, Any] | None:
    """This node's mesh as a discovery listing (the public invite only for an open mesh)."""
    if mesh is None or not getattr(mesh, "mesh_id", None):
        return None
    v = mesh_view(mesh)
    open_ = mesh.membership.policy == pb.ADMISSION_OPEN
    lst = MeshListing(mesh_id=mesh.mesh_id, policy="open" if open_ else "private",
                      invite=mesh.mint_invite(3600.0) if open_ else "", serving=v["serving"], wanted=v["wanted"],
                      total_capacity_bytes=v["capacity"], node_count=v["nodes"], client_count=v["clients"],
                      version=mesh.local.version, publisher_node=mesh.node_id.hex())
    return json.loads(lst.to_json())
